//! Planning: what an install or uninstall would change, computed without changing
//! anything. A plan lists every host file with its content before and after (the
//! `--dry-run` diff is rendered from it), the binary to place or remove, the manifest to
//! record, and whether the CRI runtime must restart: only when a file it reads changes.
//!
//! The no-change path is cheap by construction: the config files are read and edited in
//! memory (a few KB), and the binaries are not hashed again when their fingerprint
//! (device, inode, size, mtime) is the one recorded with their hash.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::binary::{self, BinaryAction, BinaryPlan, BinarySource};
use super::containerd::{self, CriTarget};
use super::error::InstallError;
use super::files::{sha256_hex, FileChange, HostFs};
use super::manifest::{FileRecord, Manifest, Original, Store};
use crate::discover::valid_handler_name;

/// How the CRI runtime is restarted after its config changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartMode {
    /// Through systemd (`RestartUnit` on PID 1's private socket); `unit` overrides the
    /// CRI runtime's usual unit(s).
    Systemd { unit: Option<String> },
    /// Not at all: the operator restarts it (the handler is not verified then).
    None,
}

/// `usernsguard install`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRequest {
    /// The CRI runtime handler name (what a RuntimeClass's `handler` names).
    pub handler: String,
    pub binary: BinarySource,
    /// Host path for a [`BinarySource::Local`] binary; default
    /// `/usr/local/lib/usernsguard/<handler>/<file name>`.
    pub install_path: Option<PathBuf>,
    /// Expected sha256 (hex); without it the binary's hash is recorded.
    pub sha256: Option<String>,
    /// The CRI runtime's config file (host path): containerd's root config (k3s/rke2: the
    /// rendered `config.toml`) or CRI-O's `crio.conf`.
    pub cri_config: PathBuf,
    pub restart: RestartMode,
    /// The CRI socket (host path); default: the one the config names, or its runtime's.
    pub cri_socket: Option<PathBuf>,
}

/// `usernsguard uninstall`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UninstallRequest {
    pub handler: String,
    pub cri_config: PathBuf,
    pub restart: RestartMode,
    pub cri_socket: Option<PathBuf>,
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Install,
    Uninstall,
}

/// The binary part of an uninstall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryRemoval {
    pub path: PathBuf,
}

/// Everything a run would change.
#[derive(Debug, Clone)]
pub struct Plan {
    pub operation: Operation,
    pub handler: String,
    pub target: CriTarget,
    pub restart: RestartMode,
    /// Config files, in the order they are written (undone in reverse).
    pub files: Vec<FileChange>,
    /// The binary to place or register (install).
    pub binary: Option<BinaryPlan>,
    /// The binary to remove (uninstall).
    pub remove_binary: Option<BinaryRemoval>,
    /// The manifest before and after; `after: None` removes it.
    pub manifest_before: Option<Manifest>,
    pub manifest_after: Option<Manifest>,
    /// The CRI runtime must restart for the change to take effect.
    pub restart_needed: bool,
    /// A previous run was interrupted: its journal is rolled back first.
    pub interrupted: bool,
    /// Things the operator should know (handler registered elsewhere, files edited by others).
    pub notes: Vec<String>,
}

impl Plan {
    /// Nothing to do: the host is already as asked.
    pub fn is_noop(&self) -> bool {
        !self.interrupted
            && self.files.iter().all(|f| !f.changes())
            && self
                .binary
                .as_ref()
                .is_none_or(|b| b.action == BinaryAction::InPlace)
            && self.remove_binary.is_none()
            && self.manifest_before == self.manifest_after
    }

    /// The config files that change.
    pub fn changed_files(&self) -> impl Iterator<Item = &FileChange> {
        self.files.iter().filter(|f| f.changes())
    }

    /// A unified diff of every host file the run changes (config files; the binary and the
    /// manifest as one line each), for `--dry-run`.
    pub fn diff(&self) -> String {
        let mut out = String::new();
        for f in self.changed_files() {
            let before = String::from_utf8_lossy(f.before.as_deref().unwrap_or_default()).into_owned();
            let after = String::from_utf8_lossy(f.after.as_deref().unwrap_or_default()).into_owned();
            let a = if f.before.is_some() {
                format!("a{}", f.path.display())
            } else {
                "/dev/null".into()
            };
            let b = if f.after.is_some() {
                format!("b{}", f.path.display())
            } else {
                "/dev/null".into()
            };
            let diff = similar::TextDiff::from_lines(&before, &after);
            let _ = write!(out, "{}", diff.unified_diff().context_radius(3).header(&a, &b));
            if !out.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
        if let Some(b) = &self.binary {
            if let BinaryAction::Place { replaces_own, .. } = &b.action {
                let _ = writeln!(
                    out,
                    "binary: {} {} (sha256 {})",
                    if *replaces_own { "replace" } else { "place" },
                    b.target.display(),
                    b.sha256
                );
            }
        }
        if let Some(r) = &self.remove_binary {
            let _ = writeln!(out, "binary: remove {}", r.path.display());
        }
        out
    }

    /// One line on what the run does about the CRI runtime.
    pub fn restart_summary(&self) -> String {
        if !self.restart_needed {
            return format!("no restart of {} needed", self.target.flavor.as_str());
        }
        match &self.restart {
            RestartMode::Systemd { unit } => format!(
                "restart {} through systemd",
                unit.clone()
                    .unwrap_or_else(|| self.target.flavor.units().join(" or "))
            ),
            RestartMode::None => format!(
                "restart needed: {} (restart mode none: the operator restarts it)",
                self.target.flavor.units().join(" or ")
            ),
        }
    }
}

/// Rejects requests no host could satisfy.
fn check_request(handler: &str, paths: &[&Path], sha256: Option<&str>) -> Result<(), InstallError> {
    if !valid_handler_name(handler) {
        return Err(InstallError::BadRequest(format!(
            "invalid handler name {handler:?}: letters, digits, '-', '_', '.', starting and ending \
             with a letter or digit, at most 55 characters"
        )));
    }
    for p in paths {
        if !p.is_absolute() {
            return Err(InstallError::BadRequest(format!(
                "{} must be an absolute path on the host",
                p.display()
            )));
        }
    }
    if let Some(s) = sha256 {
        if !super::files::is_sha256_hex(s) {
            return Err(InstallError::BadRequest(format!(
                "--sha256 {s:?} is not a sha256: 64 lower-case hex digits"
            )));
        }
    }
    Ok(())
}

fn load(fs: &HostFs<'_>, store: &Store, handler: &str) -> Result<Option<Manifest>, InstallError> {
    store.load(|p| fs.local(p), handler).map_err(InstallError::State)
}

/// Plans an install.
pub fn install(fs: &HostFs<'_>, store: &Store, req: &InstallRequest) -> Result<Plan, InstallError> {
    let mut paths = vec![req.cri_config.as_path()];
    paths.extend(req.install_path.as_deref());
    if let BinarySource::Host(p) = &req.binary {
        paths.push(p);
    }
    check_request(&req.handler, &paths, req.sha256.as_deref())?;
    let manifest = load(fs, store, &req.handler)?;
    let interrupted = manifest.as_ref().is_some_and(|m| m.pending.is_some());
    // An interrupted run's journal is rolled back before this plan is applied: plan against
    // the manifest as it was before that run.
    let committed = match &manifest {
        Some(m) if m.pending.is_some() => m.pending.as_ref().and_then(|p| p.previous.as_deref().cloned()),
        other => other.clone(),
    };
    let target = containerd::detect(fs, &req.cri_config, req.cri_socket.as_deref())?;
    let others = store.others(|p| fs.local(p), &req.handler);
    let bin = binary::plan(
        fs.host(),
        &req.handler,
        &req.binary,
        req.install_path.as_deref(),
        req.sha256.as_deref(),
        committed.as_ref().and_then(|m| m.binary.as_ref()),
        &others,
    )?;
    let config = containerd::plan_install(fs, &target, &req.handler, &bin.target, committed.as_ref())?;
    let mut notes: Vec<String> = config.note.into_iter().collect();
    if interrupted {
        notes.push("an interrupted run is rolled back first".into());
    }

    // The manifest after: the first "before" of each file is its original.
    let mut after = committed.clone().unwrap_or_else(|| Manifest {
        handler: req.handler.clone(),
        flavor: target.flavor,
        cri_config: req.cri_config.clone(),
        schema: target.schema,
        binary: None,
        files: Vec::new(),
        dirs: Vec::new(),
        pending: None,
    });
    after.schema = target.schema;
    after.pending = None;
    for f in &config.changes {
        let written = sha256_hex(f.after.as_deref().unwrap_or_default());
        match after.files.iter_mut().find(|r| r.path == f.path) {
            // Only a file still as the last run left it is restored whole at uninstall;
            // one edited since (by the operator, or another handler's install) keeps the
            // old hash, so uninstall takes out only this handler's part and keeps theirs.
            Some(r) => {
                let ours = f.before.as_deref().map(sha256_hex).as_deref() == Some(r.written_sha256.as_str());
                if f.changes() && ours {
                    r.written_sha256 = written;
                }
            }
            None => after.files.push(FileRecord {
                path: f.path.clone(),
                original: match &f.before {
                    None => Original::Absent,
                    Some(b) => Original::Saved {
                        backup: Store::backup_name("original", &f.path),
                        sha256: sha256_hex(b),
                    },
                },
                written_sha256: written,
                undo: f.undo.clone(),
                temp_in_parent: f.temp_in_parent,
            }),
        }
    }
    let mut record = bin.record.clone();
    // A binary we placed stays ours when a later run finds it in place.
    if let Some(prev) = committed.as_ref().and_then(|m| m.binary.as_ref()) {
        if prev.path == record.path && prev.owned {
            record.owned = true;
        }
    }
    after.binary = Some(record);
    // A binary whose bytes change needs a restart too: containerd introspects each
    // runtime's `features` once, at start, for what it advertises to the kubelet.
    let binary_changes = matches!(
        bin.action,
        BinaryAction::Place {
            replaces_own: true,
            ..
        }
    );
    let restart_needed = config.changes.iter().any(FileChange::changes) || binary_changes;
    Ok(Plan {
        operation: Operation::Install,
        handler: req.handler.clone(),
        target,
        restart: req.restart.clone(),
        files: config.changes,
        binary: Some(bin),
        remove_binary: None,
        manifest_before: committed,
        manifest_after: Some(after),
        restart_needed,
        interrupted,
        notes,
    })
}

/// Plans an uninstall: everything the manifest records, undone.
pub fn uninstall(fs: &HostFs<'_>, store: &Store, req: &UninstallRequest) -> Result<Plan, InstallError> {
    check_request(&req.handler, &[&req.cri_config], None)?;
    let manifest = load(fs, store, &req.handler)?;
    let interrupted = manifest.as_ref().is_some_and(|m| m.pending.is_some());
    let committed = match &manifest {
        Some(m) if m.pending.is_some() => m.pending.as_ref().and_then(|p| p.previous.as_deref().cloned()),
        other => other.clone(),
    };
    let target = containerd::detect(fs, &req.cri_config, req.cri_socket.as_deref())?;
    let mut plan = Plan {
        operation: Operation::Uninstall,
        handler: req.handler.clone(),
        target,
        restart: req.restart.clone(),
        files: Vec::new(),
        binary: None,
        remove_binary: None,
        manifest_before: committed.clone(),
        manifest_after: None,
        restart_needed: false,
        interrupted,
        notes: Vec::new(),
    };
    let Some(m) = committed else {
        plan.notes
            .push(format!("{} was not installed by usernsguard here", req.handler));
        return Ok(plan);
    };
    let handler_dir = store.handler_dir(&req.handler);
    let (files, notes) = containerd::plan_uninstall(fs, &m, |name| {
        let path = handler_dir.join(name);
        fs.read(&path)
            .ok()
            .flatten()
            .ok_or_else(|| InstallError::State(format!("the backup {} is missing", path.display())))
    })?;
    plan.notes.extend(notes);
    plan.restart_needed = files.iter().any(FileChange::changes);
    plan.files = files;
    if let Some(b) = m.binary.as_ref().filter(|b| b.owned) {
        let others = store.others(|p| fs.local(p), &req.handler);
        if others
            .iter()
            .any(|o| o.binary.as_ref().is_some_and(|ob| ob.path == b.path))
        {
            plan.notes
                .push(format!("{} is used by another handler; kept", b.path.display()));
        } else if fs.local(&b.path).exists() {
            plan.remove_binary = Some(BinaryRemoval { path: b.path.clone() });
        }
    }
    Ok(plan)
}
