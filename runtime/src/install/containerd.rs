//! Which files register a handler with containerd, k3s/rke2's embedded containerd, or
//! CRI-O, and what they must contain: reads the host's config files and turns the pure
//! edits of [`super::edit`] into [`FileChange`]s. Nothing here writes.
//!
//! - containerd, config version 3 (containerd 2.x): a drop-in `usernsguard-<handler>.toml`
//!   with the root config's `version`, in a directory the root config already imports
//!   (`imports = ["conf.d/*.toml"]`), else in `<root dir>/conf.d/` with the drop-in's exact
//!   path added to `imports` (not a glob: that would start importing whatever else lies in
//!   that directory).
//! - containerd, config version 2 (containerd 1.x, also read by 2.x): the handler's tables
//!   added to the root config itself, because containerd 1.x lets an imported file's
//!   `plugins."io.containerd.grpc.v1.cri"` replace the root's whole CRI section
//!   ([`super::edit::add_runtime`]).
//! - k3s/rke2: the containerd template next to the rendered config (`config-v3.toml.tmpl`
//!   for a v3 rendered config, else `config.toml.tmpl`; an existing one of the names k3s
//!   reads is extended rather than shadowed), starting with `{{ template "base" . }}`.
//! - CRI-O: `crio.conf.d/50-usernsguard-<handler>.conf`.
//!
//! A handler that some file not written by usernsguard already declares is left alone:
//! with the same binary there is nothing to do, with another one it is a conflict.

use std::path::{Path, PathBuf};

use super::edit::{self, EditError, HandlerSpec, SchemaVersion};
use super::error::InstallError;
use super::files::{sha256_hex, FileChange, HostFs};
use super::manifest::{CriFlavor, Manifest, Undo};
use crate::cri_config::{self, CriConfigError};
use crate::host::HostRoot;

/// The CRI runtime setup a `--cri-config` file belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriTarget {
    pub flavor: CriFlavor,
    /// The config file as given (host path).
    pub config: PathBuf,
    /// The same with symlinks resolved: the file that would be written.
    pub resolved: PathBuf,
    /// containerd only.
    pub schema: Option<SchemaVersion>,
    /// The config files in the CRI runtime's merge order (host paths).
    pub files: Vec<PathBuf>,
    /// The CRI socket (host path).
    pub socket: PathBuf,
}

pub(crate) fn config_error(e: CriConfigError) -> InstallError {
    match e {
        CriConfigError::Parse { path, source } => InstallError::Edit(EditError::Parse {
            path,
            message: source.to_string().trim().replace('\n', " "),
        }),
        CriConfigError::Read { path, source } => InstallError::ConfigRead { path, source },
        CriConfigError::Unknown { path } => InstallError::UnknownConfig { path },
    }
}

/// A config file as text; `None` when it does not exist.
pub(crate) fn read_text(fs: &HostFs<'_>, path: &Path) -> Result<Option<String>, InstallError> {
    let bytes = fs.read(path).map_err(|source| InstallError::ConfigRead {
        path: path.to_owned(),
        source,
    })?;
    bytes
        .map(|b| {
            String::from_utf8(b).map_err(|_| {
                InstallError::Edit(EditError::Parse {
                    path: path.to_owned(),
                    message: "not UTF-8 text".into(),
                })
            })
        })
        .transpose()
}

/// Recognises the setup `config` (a host path) belongs to.
pub fn detect(fs: &HostFs<'_>, config: &Path, socket: Option<&Path>) -> Result<CriTarget, InstallError> {
    let host: &HostRoot = fs.host();
    let resolved = host.resolve(config).unwrap_or_else(|| config.to_path_buf());
    let text = read_text(fs, &resolved)?.ok_or_else(|| InstallError::ConfigRead {
        path: config.to_owned(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let doc_is_crio = text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| {
            InstallError::Edit(EditError::Parse {
                path: config.to_owned(),
                message: e.to_string().trim().replace('\n', " "),
            })
        })?
        .contains_key("crio");
    if doc_is_crio {
        let drop_ins = config.parent().unwrap_or(Path::new("/")).join("crio.conf.d");
        let cfg = cri_config::read_crio(host, config, &drop_ins).map_err(config_error)?;
        return Ok(CriTarget {
            flavor: CriFlavor::Crio,
            config: config.to_owned(),
            resolved,
            schema: None,
            files: cfg.files.clone(),
            socket: socket.map(Path::to_path_buf).unwrap_or_else(|| cfg.socket()),
        });
    }
    let schema = edit::containerd_schema(&text, config)?;
    let flavor = if config.starts_with("/var/lib/rancher/k3s/") {
        CriFlavor::K3s
    } else if config.starts_with("/var/lib/rancher/rke2/") {
        CriFlavor::Rke2
    } else {
        CriFlavor::Containerd
    };
    let cfg = cri_config::read_containerd(host, config).map_err(config_error)?;
    let default_socket = match flavor {
        CriFlavor::K3s | CriFlavor::Rke2 => PathBuf::from("/run/k3s/containerd/containerd.sock"),
        _ => cfg.socket(),
    };
    Ok(CriTarget {
        flavor,
        config: config.to_owned(),
        resolved,
        schema: Some(schema),
        files: cfg.files.clone(),
        socket: socket
            .map(Path::to_path_buf)
            .or(cfg.socket.clone())
            .unwrap_or(default_socket),
    })
}

/// The config-file part of an install: the changes, and a note when the handler is
/// registered already by a file usernsguard does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPlan {
    pub changes: Vec<FileChange>,
    pub note: Option<String>,
}

fn drop_in_name(flavor: CriFlavor, handler: &str) -> String {
    match flavor {
        CriFlavor::Crio => format!("50-usernsguard-{handler}.conf"),
        _ => format!("usernsguard-{handler}.toml"),
    }
}

fn change(
    fs: &HostFs<'_>,
    path: &Path,
    after: Option<String>,
    temp_in_parent: bool,
    undo: Undo,
) -> Result<FileChange, InstallError> {
    let before = fs.read(path).map_err(|source| InstallError::ConfigRead {
        path: path.to_owned(),
        source,
    })?;
    Ok(FileChange {
        path: path.to_owned(),
        before,
        after: after.map(String::into_bytes),
        temp_in_parent,
        undo,
    })
}

/// Whether some file other than `ours` declares the handler: `Ok(Some(file))` with the same
/// binary, an error with another.
fn declared_elsewhere(
    fs: &HostFs<'_>,
    target: &CriTarget,
    spec: &HandlerSpec,
    ours: &[&Path],
) -> Result<Option<PathBuf>, InstallError> {
    for file in &target.files {
        if ours.contains(&file.as_path()) {
            continue;
        }
        let Some(text) = read_text(fs, file)? else {
            continue;
        };
        let declared = match target.schema {
            Some(v) => edit::containerd_declared(&text, file, v, &spec.handler)?,
            None => edit::crio_declared(&text, file, &spec.handler)?,
        };
        if let Some(d) = declared {
            let binary = d.binary.unwrap_or_else(|| "(default)".into());
            if Path::new(&binary) == spec.binary {
                return Ok(Some(file.clone()));
            }
            return Err(InstallError::HandlerConflict {
                handler: spec.handler.clone(),
                file: file.clone(),
                binary,
            });
        }
    }
    Ok(None)
}

/// `SystemdCgroup` of the default runtime, over the files other than `ours`.
fn default_systemd_cgroup(
    fs: &HostFs<'_>,
    target: &CriTarget,
    ours: &Path,
) -> Result<Option<bool>, InstallError> {
    let Some(version) = target.schema else {
        return Ok(None);
    };
    let mut merged = edit::CgroupSettings::default();
    for file in target.files.iter().filter(|f| f.as_path() != ours) {
        if let Some(text) = read_text(fs, file)? {
            merged.merge(edit::containerd_cgroup_settings(&text, file, version)?);
        }
    }
    Ok(merged.for_default())
}

/// The changes that register `handler` running `binary`.
pub fn plan_install(
    fs: &HostFs<'_>,
    target: &CriTarget,
    handler: &str,
    binary: &Path,
    manifest: Option<&Manifest>,
) -> Result<ConfigPlan, InstallError> {
    let mut spec = HandlerSpec {
        handler: handler.to_owned(),
        binary: binary.to_owned(),
        systemd_cgroup: None,
    };
    let recorded = |undo: &dyn Fn(&Undo) -> bool| {
        manifest
            .into_iter()
            .flat_map(|m| m.files.iter())
            .find(|f| undo(&f.undo))
            .map(|f| f.path.clone())
    };
    match target.flavor {
        CriFlavor::Containerd if target.schema == Some(SchemaVersion::V2) => {
            // In the root config itself: a drop-in would replace the root's whole CRI
            // section under containerd 1.x (edit.rs says why).
            let root = &target.resolved;
            let recorded_undo = manifest
                .and_then(|m| m.file(root))
                .map(|r| r.undo.clone())
                .filter(|u| matches!(u, Undo::RemoveRuntime { .. }));
            let ours = recorded_undo.is_some();
            // The handler's tables in the root are ours when we put them there.
            let exclude: Vec<&Path> = if ours { vec![root.as_path()] } else { Vec::new() };
            if let Some(file) = declared_elsewhere(fs, target, &spec, &exclude)? {
                return Ok(ConfigPlan {
                    changes: Vec::new(),
                    note: Some(format!(
                        "{} already registers {handler} with this binary",
                        file.display()
                    )),
                });
            }
            spec.systemd_cgroup = default_systemd_cgroup(fs, target, Path::new(""))?;
            let root_text = read_text(fs, root)?.unwrap_or_default();
            // containerd 1.x's built-in `runc` goes away once any runtime is declared:
            // declare it too when it is the default and no file declares it (edit.rs).
            let mut merged = edit::CgroupSettings::default();
            let mut declared = Vec::new();
            for file in &target.files {
                if let Some(text) = read_text(fs, file)? {
                    merged.merge(edit::containerd_cgroup_settings(&text, file, SchemaVersion::V2)?);
                    declared.extend(edit::containerd_runtimes(&text, file, SchemaVersion::V2)?);
                }
            }
            let default = merged.default_runtime.as_deref().unwrap_or("runc");
            let declare_default =
                (default == "runc" && !declared.iter().any(|d| d == default)).then_some(default);
            let after = edit::add_runtime(
                &root_text,
                &target.config,
                SchemaVersion::V2,
                &spec,
                declare_default,
            )?;
            let undo = recorded_undo.unwrap_or_else(|| Undo::RemoveRuntime {
                also: declare_default.into_iter().map(str::to_owned).collect(),
            });
            // An imported file with a CRI section of its own takes the root's away under
            // containerd 1.x, ours included: say so (the CRI check after the restart tells).
            let mut note = None;
            for file in target.files.iter().filter(|f| f.as_path() != root.as_path()) {
                if let Some(text) = read_text(fs, file)? {
                    if edit::has_plugin_section(&text, file, SchemaVersion::V2.runtime_plugin())? {
                        note = Some(format!(
                            "{} has a plugins.\"{}\" section: containerd 1.x lets it replace the root \
                             config's whole CRI section, {handler} included (containerd 2.x merges it)",
                            file.display(),
                            SchemaVersion::V2.runtime_plugin()
                        ));
                    }
                }
            }
            Ok(ConfigPlan {
                changes: vec![change(fs, root, Some(after), false, undo)?],
                note,
            })
        }
        CriFlavor::Containerd => {
            let version = target.schema.expect("containerd has a schema");
            let root = &target.resolved;
            let root_dir = target.config.parent().unwrap_or(Path::new("/")).to_path_buf();
            let root_text = read_text(fs, root)?.unwrap_or_default();
            let imports = edit::containerd_imports(&root_text, &target.config)?;
            let name = drop_in_name(target.flavor, handler);
            let imported = |file: &Path| imports.iter().any(|p| edit::import_matches(p, &root_dir, file));
            let drop_in = recorded(&|u| *u == Undo::Remove).unwrap_or_else(|| {
                imports
                    .iter()
                    .filter(|p| {
                        Path::new(p)
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().contains(['*', '?']))
                    })
                    .map(|p| edit::clean(&root_dir.join(p)).with_file_name(&name))
                    .find(|cand| imported(cand))
                    .unwrap_or_else(|| root_dir.join("conf.d").join(&name))
            });
            if let Some(file) = declared_elsewhere(fs, target, &spec, &[&drop_in])? {
                return Ok(ConfigPlan {
                    changes: Vec::new(),
                    note: Some(format!(
                        "{} already registers {handler} with this binary",
                        file.display()
                    )),
                });
            }
            spec.systemd_cgroup = default_systemd_cgroup(fs, target, &drop_in)?;
            let mut changes = vec![change(
                fs,
                &drop_in,
                Some(edit::containerd_drop_in(version, &spec)),
                true,
                Undo::Remove,
            )?];
            if !imported(&drop_in) {
                let entry = drop_in.display().to_string();
                changes.push(change(
                    fs,
                    root,
                    Some(edit::add_import(&root_text, &target.config, &entry)?),
                    false,
                    Undo::RemoveImport { entry },
                )?);
            }
            Ok(ConfigPlan { changes, note: None })
        }
        CriFlavor::K3s | CriFlavor::Rke2 => {
            let version = target.schema.expect("containerd has a schema");
            let dir = target.config.parent().unwrap_or(Path::new("/"));
            let names: &[&str] = match version {
                SchemaVersion::V3 => &["config-v3.toml.tmpl", "config.toml.tmpl"],
                SchemaVersion::V2 => &["config.toml.tmpl"],
            };
            let template = recorded(&|u| matches!(u, Undo::RemoveTemplateBlock | Undo::Remove))
                .or_else(|| names.iter().map(|n| dir.join(n)).find(|p| fs.local(p).exists()))
                .unwrap_or_else(|| dir.join(names[0]));
            let existing = read_text(fs, &template)?;
            let ours = existing
                .as_deref()
                .is_some_and(|t| edit::has_template_block(t, handler));
            if !ours {
                if let Some(file) = declared_elsewhere(fs, target, &spec, &[])? {
                    return Ok(ConfigPlan {
                        changes: Vec::new(),
                        note: Some(format!(
                            "{} already registers {handler} with this binary",
                            file.display()
                        )),
                    });
                }
            }
            spec.systemd_cgroup = default_systemd_cgroup(fs, target, Path::new(""))?;
            // The rendered config carries our own handler once k3s ran with the template:
            // its SystemdCgroup is the one we copied, so it changes nothing.
            let undo = match manifest.and_then(|m| m.file(&template)) {
                Some(r) => r.undo.clone(),
                None if existing.is_none() => Undo::Remove,
                None => Undo::RemoveTemplateBlock,
            };
            let after = edit::k3s_template(existing.as_deref(), version, &spec);
            Ok(ConfigPlan {
                changes: vec![change(fs, &template, Some(after), false, undo)?],
                note: None,
            })
        }
        CriFlavor::Crio => {
            let dir = target
                .config
                .parent()
                .unwrap_or(Path::new("/"))
                .join("crio.conf.d");
            let drop_in = recorded(&|u| *u == Undo::Remove)
                .unwrap_or_else(|| dir.join(drop_in_name(target.flavor, handler)));
            if let Some(file) = declared_elsewhere(fs, target, &spec, &[&drop_in])? {
                return Ok(ConfigPlan {
                    changes: Vec::new(),
                    note: Some(format!(
                        "{} already registers {handler} with this binary",
                        file.display()
                    )),
                });
            }
            Ok(ConfigPlan {
                changes: vec![change(
                    fs,
                    &drop_in,
                    Some(edit::crio_drop_in(&spec)),
                    true,
                    Undo::Remove,
                )?],
                note: None,
            })
        }
    }
}

/// The changes that take usernsguard's files back out, newest first: a file unchanged since
/// usernsguard wrote it gets its original bytes back (or is removed); one that someone else
/// edited since keeps their edits and loses only usernsguard's part.
pub fn plan_uninstall(
    fs: &HostFs<'_>,
    manifest: &Manifest,
    backup: impl Fn(&str) -> Result<Vec<u8>, InstallError>,
) -> Result<(Vec<FileChange>, Vec<String>), InstallError> {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    for rec in manifest.files.iter().rev() {
        let current = fs.read(&rec.path).map_err(|source| InstallError::ConfigRead {
            path: rec.path.clone(),
            source,
        })?;
        let Some(current) = current else {
            notes.push(format!("{} is gone already; left as it is", rec.path.display()));
            continue;
        };
        // The saved original, when the file is still as the install left it and the copy is
        // intact (a damaged copy is never restored: the surgical undo below serves then).
        let whole = if sha256_hex(&current) == rec.written_sha256 {
            match &rec.original {
                super::manifest::Original::Absent => Some(None),
                super::manifest::Original::Saved { backup: name, sha256 } => {
                    let bytes = backup(name)?;
                    if sha256_hex(&bytes) == *sha256 {
                        Some(Some(bytes))
                    } else {
                        notes.push(format!(
                            "the saved original of {} is damaged; only usernsguard's part is taken out",
                            rec.path.display()
                        ));
                        None
                    }
                }
            }
        } else {
            notes.push(format!(
                "{} was changed after the install; only usernsguard's part is taken out",
                rec.path.display()
            ));
            None
        };
        let after = if let Some(whole) = whole {
            whole
        } else {
            let text = String::from_utf8(current.clone()).map_err(|_| {
                InstallError::Edit(EditError::Parse {
                    path: rec.path.clone(),
                    message: "not UTF-8 text".into(),
                })
            })?;
            match &rec.undo {
                Undo::Remove => None,
                Undo::RemoveImport { entry } => {
                    Some(edit::remove_import(&text, &rec.path, entry)?.into_bytes())
                }
                Undo::RemoveTemplateBlock => {
                    Some(edit::remove_template_block(&text, &manifest.handler).into_bytes())
                }
                Undo::RemoveRuntime { also } => Some(
                    edit::remove_runtime(
                        &text,
                        &rec.path,
                        manifest.schema.unwrap_or(SchemaVersion::V2),
                        &manifest.handler,
                        also,
                    )?
                    .into_bytes(),
                ),
            }
        };
        changes.push(FileChange {
            path: rec.path.clone(),
            before: Some(current),
            after,
            temp_in_parent: rec.temp_in_parent,
            undo: rec.undo.clone(),
        });
    }
    Ok((changes, notes))
}
