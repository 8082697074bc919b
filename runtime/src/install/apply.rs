//! Carrying a [`Plan`] out, and taking it back when the CRI runtime does not come back.
//!
//! Order, chosen so that a crash at any instant leaves a config every CRI runtime version
//! accepts (the crash test kills the process before every single step):
//! 1. checks that change nothing: the files are still as planned, the directories are
//!    writable, the unit exists, the binary runs here (copied to a temp file beside its
//!    target and run with `--version` there before it is renamed into place);
//! 2. the journal: the current content of every file about to change, then the manifest
//!    with the journal in it;
//! 3. the binary renamed into place, then the config files in plan order: a containerd
//!    drop-in before the root config's `imports` entry that names it (containerd refuses
//!    to start with an exact import that does not exist), and on uninstall the reverse;
//! 4. the restart (systemd mode), with the journal marked first, then the CRI check;
//! 5. the manifest without the journal.
//!
//! A failure in 3-5 restores every file from the journal, restarts the CRI runtime again
//! if it had been restarted, and waits for it to answer. The next run rolls a journal left
//! by a killed run back the same way before it plans.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::binary::{check_runnable, BinaryAction};
use super::error::{Failure, InstallError};
use super::files::{sha256_hex, temp_name, HostFs};
use super::manifest::{Fingerprint, JournalBinary, JournalFile, Manifest, Original, Pending, Phase, Store};
use super::plan::{Operation, Plan, RestartMode};
use super::systemd::{RestartOutcome, ServiceManager, SystemdError};
use super::verify::{self, HandlerLive};

/// Time limits of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole restart job (systemd ends it itself after the unit's own timeouts).
    pub restart: Duration,
    /// Until the CRI runtime answers with the handler after the restart.
    pub cri: Duration,
    /// The binary's `--version`.
    pub version: Duration,
    /// Waiting for another run on the same CRI config to finish (see `Installer::lock`).
    pub lock: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            restart: Duration::from_secs(300),
            cri: Duration::from_secs(60),
            version: Duration::from_secs(10),
            lock: Duration::from_secs(120),
        }
    }
}

/// What happened to the CRI runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartReport {
    /// Its config did not change.
    NotNeeded,
    /// Restart mode none: the operator must restart one of `units`.
    Operator { units: Vec<String> },
    /// Restarted through systemd; the new `ActiveEnterTimestamp` is in `after`.
    Restarted(Box<RestartOutcome>),
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub operation: Operation,
    pub handler: String,
    /// Host files written or removed (config files; the binary is in `binary`).
    pub changed: Vec<PathBuf>,
    /// What happened to the binary, in words (`None`: nothing).
    pub binary: Option<String>,
    /// The binary's `--version` first line, when it was run.
    pub binary_version: Option<String>,
    pub restart: RestartReport,
    /// The handler as the CRI runtime reports it after the restart (install), or its
    /// absence confirmed (uninstall: `listed` and `configured` false).
    pub live: Option<HandlerLive>,
    /// An interrupted earlier run was rolled back first.
    pub recovered: bool,
    pub notes: Vec<String>,
}

impl Outcome {
    /// Nothing was changed: the host was already as asked.
    pub fn unchanged(&self) -> bool {
        self.changed.is_empty()
            && self.binary.is_none()
            && !self.recovered
            && self.restart == RestartReport::NotNeeded
    }
}

/// What the apply did so far, for the rollback.
struct Progress {
    pending: Pending,
    manifest_path: PathBuf,
    /// The binary temp file, before it is renamed.
    binary_temp: Option<PathBuf>,
    restarted: bool,
    /// The CRI runtime answered before the restart: the rollback waits until it answers
    /// again (one that was down before is not required to be up after).
    cri_was_up: bool,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |source| Failure::Write {
        path: path.to_owned(),
        source,
    }
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |source| Failure::State {
        path: path.to_owned(),
        source,
    }
}

/// The directories missing above `dir`, outermost first.
fn missing_dirs(fs: &HostFs<'_>, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        if fs.local(p).exists() {
            break;
        }
        out.push(p.to_path_buf());
        d = p.parent();
    }
    out.reverse();
    out
}

/// Picks the unit to restart: the one asked for, else the first of the CRI runtime's usual
/// units that is active (else loaded).
fn resolve_unit(
    services: &mut dyn ServiceManager,
    plan: &Plan,
    asked: Option<&str>,
) -> Result<String, InstallError> {
    let candidates: Vec<String> = match asked {
        Some(u) => vec![u.to_owned()],
        None => plan.target.flavor.units().iter().map(|s| s.to_string()).collect(),
    };
    let mut loaded = None;
    for unit in &candidates {
        match services.unit_state(unit) {
            Ok(s) if s.active_state == super::systemd::ActiveState::Active => return Ok(unit.clone()),
            Ok(s) if s.load_state == "loaded" => {
                loaded.get_or_insert_with(|| unit.clone());
            }
            Ok(_) | Err(SystemdError::NoSuchUnit { .. }) => {}
            Err(source) => {
                return Err(InstallError::Systemd {
                    unit: unit.clone(),
                    source,
                })
            }
        }
    }
    loaded.ok_or_else(|| InstallError::UnitNotFound {
        candidates: candidates.join(", "),
    })
}

/// Copies `source` into the temp file beside `target`, hashing it; returns the temp path.
fn copy_binary(
    fs: &mut HostFs<'_>,
    source: &Path,
    target: &Path,
    sha256: &str,
) -> Result<PathBuf, InstallError> {
    let temp = target.with_file_name(temp_name(target));
    let fail = |e: std::io::Error| InstallError::NotWritable {
        path: target.to_owned(),
        source: e,
    };
    let mut input = std::fs::File::open(source).map_err(|e| InstallError::BinaryMissing {
        path: source.to_owned(),
        source: e,
    })?;
    let mut out = fs.create_temp(target, &temp, 0o755).map_err(fail)?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(|e| InstallError::BinaryMissing {
            path: source.to_owned(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
        out.write_all(&buf[..n]).map_err(fail)?;
    }
    let actual = super::files::hex(&sha2::Digest::finalize(hasher));
    if actual != sha256 {
        drop(out);
        let _ = std::fs::remove_file(fs.local(&temp));
        return Err(InstallError::Sha256Mismatch {
            path: source.to_owned(),
            expected: sha256.to_owned(),
            actual,
        });
    }
    out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(fail)?;
    fs.step_fsync(target).map_err(fail)?;
    out.sync_all().map_err(fail)?;
    Ok(temp)
}

/// Runs `--version` of the binary at `host_path`; a busy text file (a concurrent fork still
/// holding the write descriptor) is retried briefly.
fn runnable(
    fs: &HostFs<'_>,
    host_path: &Path,
    shown: &Path,
    timeout: Duration,
) -> Result<String, InstallError> {
    let mut tries = 0;
    loop {
        match check_runnable(fs.host(), host_path, timeout) {
            Ok(v) => return Ok(v),
            Err(detail) if detail.contains("Text file busy") && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(detail) => {
                return Err(InstallError::BinaryNotRunnable {
                    path: shown.to_owned(),
                    detail,
                })
            }
        }
    }
}

/// Carries `plan` out. `force_restart`: restart even if no file changes (an interrupted run
/// that had restarted the CRI runtime was just rolled back).
pub fn apply(
    fs: &mut HostFs<'_>,
    store: &Store,
    mut services: Option<&mut (dyn ServiceManager + '_)>,
    timeouts: Timeouts,
    plan: Plan,
    force_restart: bool,
) -> Result<Outcome, InstallError> {
    let restart_needed = plan.restart_needed || force_restart;
    let mut outcome = Outcome {
        operation: plan.operation,
        handler: plan.handler.clone(),
        changed: Vec::new(),
        binary: None,
        binary_version: None,
        restart: RestartReport::NotNeeded,
        live: None,
        recovered: force_restart,
        notes: plan.notes.clone(),
    };
    if plan.is_noop() && !force_restart {
        return Ok(outcome);
    }

    // 1. Checks that change nothing.
    for f in &plan.files {
        let now = fs.read(&f.path).map_err(|source| InstallError::ConfigRead {
            path: f.path.clone(),
            source,
        })?;
        if now != f.before {
            return Err(InstallError::ConcurrentChange { path: f.path.clone() });
        }
    }
    let mut dirs_to_check: Vec<PathBuf> = vec![store.dir.clone()];
    for f in plan.changed_files() {
        let dir = f.path.parent().unwrap_or(Path::new("/"));
        dirs_to_check.push(dir.to_path_buf());
        if f.temp_in_parent {
            dirs_to_check.push(dir.parent().unwrap_or(dir).to_path_buf());
        }
    }
    if let Some(b) = &plan.binary {
        dirs_to_check.push(b.target.parent().unwrap_or(Path::new("/")).to_path_buf());
    }
    if let Some(r) = &plan.remove_binary {
        dirs_to_check.push(r.path.parent().unwrap_or(Path::new("/")).to_path_buf());
    }
    for d in &dirs_to_check {
        fs.check_writable(d)
            .map_err(|(path, source)| InstallError::NotWritable { path, source })?;
    }
    let unit = match (&plan.restart, restart_needed) {
        (RestartMode::Systemd { unit }, true) => {
            let sm = services.as_deref_mut().ok_or(InstallError::NoServiceManager)?;
            Some(resolve_unit(sm, &plan, unit.as_deref())?)
        }
        _ => None,
    };

    // The binary: in place, or copied beside its target and run there.
    let mut binary_temp = None;
    let mut binary_dirs = Vec::new();
    if let Some(b) = &plan.binary {
        let will_register = plan.changed_files().next().is_some() || restart_needed;
        match &b.action {
            BinaryAction::InPlace if will_register => {
                outcome.binary_version = Some(runnable(fs, &b.target, &b.target, timeouts.version)?);
            }
            BinaryAction::InPlace => {}
            BinaryAction::Place { source, .. } => {
                let dir = b.target.parent().unwrap_or(Path::new("/"));
                let made = fs.make_dirs(dir, &mut binary_dirs);
                let cleanup = |fs: &mut HostFs<'_>, temp: Option<&Path>| {
                    if let Some(t) = temp {
                        let _ = std::fs::remove_file(fs.local(t));
                    }
                    for d in binary_dirs.iter().rev() {
                        let _ = fs.remove_dir_if_empty(d);
                    }
                };
                if let Err(source) = made {
                    cleanup(fs, None);
                    return Err(InstallError::NotWritable {
                        path: dir.to_owned(),
                        source,
                    });
                }
                let _ = fs.remove_stale_temps(dir);
                let temp = match copy_binary(fs, source, &b.target, &b.sha256) {
                    Ok(t) => t,
                    Err(e) => {
                        cleanup(fs, Some(&b.target.with_file_name(temp_name(&b.target))));
                        return Err(e);
                    }
                };
                match runnable(fs, &temp, &b.target, timeouts.version) {
                    Ok(v) => outcome.binary_version = Some(v),
                    Err(e) => {
                        cleanup(fs, Some(&temp));
                        return Err(e);
                    }
                }
                binary_temp = Some(temp);
            }
        }
    }

    // 2. The journal.
    let manifest_path = store.manifest_path(&plan.handler);
    let handler_dir = store.handler_dir(&plan.handler);
    let mut pending = Pending {
        phase: Phase::Writing,
        unit: unit.clone(),
        files: Vec::new(),
        binary: None,
        dirs: binary_dirs,
        previous: plan.manifest_before.clone().map(Box::new),
    };
    let mut progress = Progress {
        pending: pending.clone(),
        manifest_path: manifest_path.clone(),
        binary_temp: binary_temp.clone(),
        restarted: false,
        cri_was_up: false,
    };
    let journal = (|| -> Result<(), Failure> {
        let journal_dir = handler_dir.join("journal");
        let made = fs.make_dirs(&journal_dir, &mut pending.dirs);
        progress.pending.dirs = pending.dirs.clone();
        made.map_err(state_err(&journal_dir))?;
        let made = fs.make_dirs(&handler_dir.join("original"), &mut pending.dirs);
        progress.pending.dirs = pending.dirs.clone();
        made.map_err(state_err(&handler_dir))?;
        let _ = fs.remove_stale_temps(&journal_dir);
        // Originals first seen now are kept for the uninstall.
        if let Some(after) = &plan.manifest_after {
            for rec in &after.files {
                let Original::Saved { backup, .. } = &rec.original else {
                    continue;
                };
                let path = handler_dir.join(backup);
                if fs.local(&path).exists() {
                    continue;
                }
                if let Some(f) = plan.files.iter().find(|f| f.path == rec.path) {
                    let bytes = f.before.clone().unwrap_or_default();
                    // A copy is as private as its file (a config may hold registry
                    // credentials at 0600).
                    let meta = fs.meta(&f.path);
                    fs.write_atomic(&path, &bytes, meta, false)
                        .map_err(state_err(&path))?;
                }
            }
        }
        for f in plan.changed_files() {
            let previous = match &f.before {
                None => Original::Absent,
                Some(bytes) => {
                    let name = Store::backup_name("journal", &f.path);
                    let path = handler_dir.join(&name);
                    let meta = fs.meta(&f.path);
                    fs.write_atomic(&path, bytes, meta, false)
                        .map_err(state_err(&path))?;
                    Original::Saved {
                        backup: name,
                        sha256: sha256_hex(bytes),
                    }
                }
            };
            pending.files.push(JournalFile {
                path: f.path.clone(),
                previous,
                temp_in_parent: f.temp_in_parent,
            });
            pending
                .dirs
                .extend(missing_dirs(fs, f.path.parent().unwrap_or(Path::new("/"))));
        }
        if let Some(b) = &plan.binary {
            if let BinaryAction::Place { replaces_own, .. } = b.action {
                pending.binary = Some(if replaces_own {
                    JournalBinary::Replaced {
                        path: b.target.clone(),
                        backup: b.target.with_file_name(format!(
                            ".{}.usernsguard-prev",
                            b.target.file_name().unwrap_or_default().to_string_lossy()
                        )),
                    }
                } else {
                    JournalBinary::Created {
                        path: b.target.clone(),
                    }
                });
            }
        }
        if let Some(r) = &plan.remove_binary {
            pending.binary = Some(JournalBinary::Removed {
                path: r.path.clone(),
                backup: r.path.with_file_name(format!(
                    ".{}.usernsguard-prev",
                    r.path.file_name().unwrap_or_default().to_string_lossy()
                )),
            });
        }
        progress.pending = pending.clone();
        write_manifest(
            fs,
            &manifest_path,
            plan.manifest_before.as_ref().or(plan.manifest_after.as_ref()),
            &pending,
        )
    })();
    if let Err(cause) = journal {
        return Err(finish_rollback(
            fs, store, services, timeouts, &plan, &progress, cause,
        ));
    }

    // 3. Binary and files.
    let mut placed_fp: Option<Fingerprint> = None;
    let writes = (|| -> Result<(), Failure> {
        match &pending.binary {
            Some(JournalBinary::Created { path }) => {
                let temp = binary_temp.as_ref().expect("copied above");
                fs.rename(temp, path).map_err(write_err(path))?;
                progress.binary_temp = None;
                outcome.binary = Some(format!("placed {}", path.display()));
            }
            Some(JournalBinary::Replaced { path, backup }) => {
                let temp = binary_temp.as_ref().expect("copied above");
                fs.link(path, backup).map_err(write_err(path))?;
                fs.rename(temp, path).map_err(write_err(path))?;
                progress.binary_temp = None;
                outcome.binary = Some(format!("replaced {}", path.display()));
            }
            Some(JournalBinary::Removed { path, backup }) => {
                fs.link(path, backup).map_err(write_err(path))?;
                fs.remove(path).map_err(write_err(path))?;
                outcome.binary = Some(format!("removed {}", path.display()));
            }
            None => {}
        }
        if let Some(b) = &plan.binary {
            placed_fp = Fingerprint::of(&fs.local(&b.target));
        }
        for f in plan.changed_files() {
            let dir = f.path.parent().unwrap_or(Path::new("/"));
            let mut made = Vec::new();
            fs.make_dirs(dir, &mut made).map_err(write_err(dir))?;
            match &f.after {
                Some(bytes) => fs
                    .write_atomic(&f.path, bytes, None, f.temp_in_parent)
                    .map_err(write_err(&f.path))?,
                None => {
                    fs.remove(&f.path).map_err(write_err(&f.path))?;
                }
            }
            outcome.changed.push(f.path.clone());
        }
        Ok(())
    })();
    if let Err(cause) = writes {
        return Err(finish_rollback(
            fs, store, services, timeouts, &plan, &progress, cause,
        ));
    }

    // 4. Restart and check.
    let socket_local = fs.local(&plan.target.socket);
    let restart = (|| -> Result<(), Failure> {
        if !restart_needed {
            return Ok(());
        }
        let Some(unit) = &unit else {
            outcome.restart = RestartReport::Operator {
                units: plan.target.flavor.units().iter().map(|s| s.to_string()).collect(),
            };
            return Ok(());
        };
        pending.phase = Phase::Restarting;
        progress.pending = pending.clone();
        write_manifest(
            fs,
            &manifest_path,
            plan.manifest_before.as_ref().or(plan.manifest_after.as_ref()),
            &pending,
        )?;
        progress.cri_was_up =
            verify::wait_for_runtime(&socket_local, &plan.target.socket, Duration::ZERO).is_ok();
        let sm = services.as_deref_mut().expect("resolved with the unit");
        progress.restarted = true;
        let o = sm
            .restart(unit, timeouts.restart)
            .map_err(|source| Failure::Restart {
                unit: unit.clone(),
                source,
            })?;
        if !o.succeeded() {
            return Err(Failure::RestartFailed {
                unit: unit.clone(),
                outcome: Box::new(o),
            });
        }
        outcome.restart = RestartReport::Restarted(Box::new(o));
        let live = verify::wait_for_handler(
            &socket_local,
            &plan.target.socket,
            &plan.handler,
            plan.operation == Operation::Install,
            timeouts.cri,
        )?;
        outcome.live = Some(live);
        Ok(())
    })();
    if let Err(cause) = restart {
        return Err(finish_rollback(
            fs, store, services, timeouts, &plan, &progress, cause,
        ));
    }

    // 5. Commit.
    let commit = (|| -> Result<(), Failure> {
        match &plan.manifest_after {
            Some(after) => {
                let mut after = after.clone();
                if let (Some(b), Some(fp)) = (after.binary.as_mut(), placed_fp) {
                    b.fingerprint = Some(fp);
                }
                for d in &pending.dirs {
                    if !after.dirs.contains(d) && fs.local(d).exists() {
                        after.dirs.push(d.clone());
                    }
                }
                let bytes = after.to_json();
                fs.write_atomic(&manifest_path, &bytes, None, false)
                    .map_err(state_err(&manifest_path))?;
            }
            None => {
                pending.phase = Phase::Committed;
                write_manifest(fs, &manifest_path, plan.manifest_before.as_ref(), &pending)?;
            }
        }
        Ok(())
    })();
    if let Err(cause) = commit {
        return Err(finish_rollback(
            fs, store, services, timeouts, &plan, &progress, cause,
        ));
    }
    // Past the commit point: leftovers are only clutter.
    for jf in &pending.files {
        if let Original::Saved { backup, .. } = &jf.previous {
            let _ = fs.remove(&handler_dir.join(backup));
        }
    }
    if let Some(JournalBinary::Replaced { backup, .. }) = &pending.binary {
        let _ = fs.remove(backup);
    }
    let _ = fs.remove_dir_if_empty(&handler_dir.join("journal"));
    if plan.operation == Operation::Uninstall {
        if let Some(before) = &plan.manifest_before {
            outcome
                .changed
                .extend(finish_uninstall(fs, store, before, &pending));
        }
    }
    Ok(outcome)
}

/// The rest of a committed uninstall (also run by the next run when this one was killed):
/// the binary's backup, the original copies, the now empty directories the install made,
/// the handler's state directory, and last the manifest. Returns the directories removed.
pub fn finish_uninstall(
    fs: &mut HostFs<'_>,
    store: &Store,
    installed: &Manifest,
    pending: &Pending,
) -> Vec<PathBuf> {
    let handler_dir = store.handler_dir(&installed.handler);
    if let Some(JournalBinary::Removed { backup, .. }) = &pending.binary {
        let _ = fs.remove(backup);
    }
    for sub in ["journal", "original"] {
        let d = handler_dir.join(sub);
        if let Ok(entries) = std::fs::read_dir(fs.local(&d)) {
            for e in entries.flatten() {
                let _ = fs.remove(&d.join(e.file_name()));
            }
        }
        let _ = fs.remove_dir_if_empty(&d);
    }
    let _ = fs.remove_dir_if_empty(&handler_dir);
    let mut removed = Vec::new();
    for d in installed.dirs.iter().rev() {
        if d.starts_with(&store.dir) || store.dir.starts_with(d) {
            continue;
        }
        if let Ok(true) = fs.remove_dir_if_empty(d) {
            removed.push(d.clone());
        }
    }
    let _ = fs.remove(&store.manifest_path(&installed.handler));
    for d in installed.dirs.iter().rev().filter(|d| store.dir.starts_with(d)) {
        if let Ok(true) = fs.remove_dir_if_empty(d) {
            removed.push(d.clone());
        }
    }
    removed
}

fn write_manifest(
    fs: &mut HostFs<'_>,
    path: &Path,
    base: Option<&Manifest>,
    pending: &Pending,
) -> Result<(), Failure> {
    let mut m = base
        .cloned()
        .expect("a plan that changes something has a manifest before or after");
    m.pending = Some(pending.clone());
    fs.write_atomic(path, &m.to_json(), None, false)
        .map_err(state_err(path))
}

fn finish_rollback(
    fs: &mut HostFs<'_>,
    store: &Store,
    services: Option<&mut (dyn ServiceManager + '_)>,
    timeouts: Timeouts,
    plan: &Plan,
    progress: &Progress,
    cause: Failure,
) -> InstallError {
    tracing::warn!(handler = %plan.handler, error = %cause, "install step failed; rolling back");
    if let Some(t) = &progress.binary_temp {
        let _ = std::fs::remove_file(fs.local(t));
    }
    match roll_back(
        fs,
        store,
        services,
        timeouts,
        &plan.handler,
        &progress.manifest_path,
        &progress.pending,
        progress.restarted.then_some(progress.cri_was_up),
        &plan.target.socket,
    ) {
        Ok(restart) => InstallError::RolledBack {
            cause,
            restart: restart.map(Box::new),
        },
        Err(problems) => InstallError::RollbackFailed { cause, problems },
    }
}

/// Undoes what the journal `pending` records: every file back to its previous content,
/// the binary back, the directories the run made removed, the CRI runtime restarted again
/// if `restarted` is `Some` (`Some(true)`: and waited for, as it answered before), and the
/// manifest as it was. Used after a failed step and, for a run
/// that was killed, by the next run.
#[allow(clippy::too_many_arguments)]
pub fn roll_back(
    fs: &mut HostFs<'_>,
    store: &Store,
    services: Option<&mut (dyn ServiceManager + '_)>,
    timeouts: Timeouts,
    handler: &str,
    manifest_path: &Path,
    pending: &Pending,
    restarted: Option<bool>,
    socket: &Path,
) -> Result<Option<RestartOutcome>, Vec<String>> {
    let mut problems = Vec::new();
    let handler_dir = store.handler_dir(handler);
    for jf in pending.files.iter().rev() {
        let result = match &jf.previous {
            Original::Absent => fs.remove(&jf.path).map(drop),
            Original::Saved { backup, sha256 } => match fs.read(&handler_dir.join(backup)) {
                Ok(Some(bytes)) if sha256_hex(&bytes) == *sha256 => {
                    if fs.read(&jf.path).ok().flatten().as_deref() == Some(&bytes[..]) {
                        Ok(())
                    } else {
                        let mut made = Vec::new();
                        fs.make_dirs(jf.path.parent().unwrap_or(Path::new("/")), &mut made)
                            .and_then(|()| fs.write_atomic(&jf.path, &bytes, None, jf.temp_in_parent))
                    }
                }
                Ok(_) => Err(std::io::Error::other(format!(
                    "its backup {backup} is missing or damaged"
                ))),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            problems.push(format!("restoring {}: {e}", jf.path.display()));
        }
    }
    let binary = match &pending.binary {
        Some(JournalBinary::Created { path }) => fs.remove(path).map(drop).map_err(|e| (path, e)),
        Some(JournalBinary::Replaced { path, backup } | JournalBinary::Removed { path, backup }) => {
            if fs.local(backup).exists() {
                let mut made = Vec::new();
                fs.make_dirs(path.parent().unwrap_or(Path::new("/")), &mut made)
                    .and_then(|()| fs.rename(backup, path))
                    .map_err(|e| (path, e))
            } else {
                // Killed before the backup link: the binary was not touched yet.
                Ok(())
            }
        }
        None => Ok(()),
    };
    if let Err((path, e)) = binary {
        problems.push(format!("restoring the binary {}: {e}", path.display()));
    }
    if let Some(JournalBinary::Created { path } | JournalBinary::Replaced { path, .. }) = &pending.binary {
        let _ = fs.remove_stale_temps(path.parent().unwrap_or(Path::new("/")));
    }
    for jf in &pending.files {
        let dir = jf.path.parent().unwrap_or(Path::new("/"));
        let _ = fs.remove_stale_temps(dir);
        if jf.temp_in_parent {
            let _ = fs.remove_stale_temps(dir.parent().unwrap_or(dir));
        }
    }
    // The manifest as before (this also drops the journal).
    let manifest = match &pending.previous {
        Some(prev) => fs.write_atomic(manifest_path, &prev.to_json(), None, false),
        None => fs.remove(manifest_path).map(drop),
    };
    if let Err(e) = manifest {
        problems.push(format!("restoring {}: {e}", manifest_path.display()));
    }
    // The journal's backups belong to this run only (some may not be listed yet).
    let journal_dir = handler_dir.join("journal");
    if let Ok(entries) = std::fs::read_dir(fs.local(&journal_dir)) {
        for e in entries.flatten() {
            let _ = fs.remove(&journal_dir.join(e.file_name()));
        }
    }
    for d in pending.dirs.iter().rev() {
        // Original backups of a first install go with it.
        if pending.previous.is_none() && d.ends_with("original") {
            if let Ok(entries) = std::fs::read_dir(fs.local(d)) {
                for e in entries.flatten() {
                    let _ = fs.remove(&d.join(e.file_name()));
                }
            }
        }
        let _ = fs.remove_dir_if_empty(d);
    }
    let mut restart = None;
    if let Some(was_up) = restarted {
        match (services, &pending.unit) {
            (Some(sm), Some(unit)) => match sm.restart(unit, timeouts.restart) {
                Ok(o) if o.succeeded() => {
                    let back = if was_up {
                        verify::wait_for_runtime(&fs.local(socket), socket, timeouts.cri).map(drop)
                    } else {
                        Ok(())
                    };
                    if let Err(e) = back {
                        problems.push(format!("after restarting {unit} on the restored config: {e}"));
                    }
                    restart = Some(o);
                }
                Ok(o) => problems.push(format!("restarting {unit} on the restored config: {o}")),
                Err(e) => problems.push(format!("restarting {unit} on the restored config: {e}")),
            },
            (_, unit) => problems.push(format!(
                "the CRI runtime was restarted with the new config and must be restarted again ({})",
                unit.as_deref().unwrap_or("its unit")
            )),
        }
    }
    if problems.is_empty() {
        Ok(restart)
    } else {
        Err(problems)
    }
}
