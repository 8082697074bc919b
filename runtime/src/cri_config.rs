//! Which runtime handlers the node's CRI runtime registers, and which binary each runs.
//!
//! In a cluster the verdict must be about what the kubelet will actually get, so the probes
//! execute the binaries containerd (`runtimes.<handler>.options.BinaryName`) or CRI-O
//! (`runtimes.<handler>.runtime_path`) would execute, not whatever is first on PATH.
//! Parsing is pure over the config text; reading files (drop-ins, imports) is the caller's.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table};

use crate::discover::{valid_handler_name, RuntimeHandler};

#[derive(Debug, thiserror::Error)]
pub enum CriConfigError {
    #[error("{path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml_edit::TomlError,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// A handler as the CRI config declares it; `binary` is `None` when the config leaves it to
/// the default (the handler's runtime name looked up on the CRI runtime's PATH).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredHandler {
    pub name: String,
    pub binary: Option<PathBuf>,
}

impl DeclaredHandler {
    /// Resolves the binary: the declared path, or `default_name` found through `find`.
    pub fn resolve(&self, find: impl Fn(&str) -> Option<PathBuf>) -> Option<RuntimeHandler> {
        let binary = match &self.binary {
            Some(p) => p.clone(),
            None => find(&self.name).or_else(|| find("runc"))?,
        };
        Some(RuntimeHandler::new(self.name.clone(), binary))
    }
}

/// The containerd CRI plugin tables that hold `containerd.runtimes`: config version 2
/// (containerd 1.x) and 3 (containerd 2.x).
const CONTAINERD_CRI_PLUGINS: [&str; 2] = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"];

fn parse(text: &str, path: &Path) -> Result<DocumentMut, CriConfigError> {
    text.parse::<DocumentMut>()
        .map_err(|source| CriConfigError::Parse {
            path: path.to_owned(),
            source,
        })
}

fn table(item: Option<&Item>) -> Option<&Table> {
    item.and_then(Item::as_table)
}

/// Runtime handlers of a containerd config. Only runc-compatible (`io.containerd.runc.v2`)
/// handlers are returned: others (kata, gVisor shims) are not OCI runtimes we can probe.
pub fn containerd_handlers(text: &str, path: &Path) -> Result<Vec<DeclaredHandler>, CriConfigError> {
    let doc = parse(text, path)?;
    let mut out = Vec::new();
    let Some(plugins) = table(doc.get("plugins")) else {
        return Ok(out);
    };
    for plugin in CONTAINERD_CRI_PLUGINS {
        let runtimes = table(plugins.get(plugin))
            .and_then(|p| table(p.get("containerd")))
            .and_then(|c| table(c.get("runtimes")));
        let Some(runtimes) = runtimes else { continue };
        for (name, rt) in runtimes.iter() {
            let Some(rt) = rt.as_table() else { continue };
            let runtime_type = rt
                .get("runtime_type")
                .and_then(Item::as_str)
                .unwrap_or("io.containerd.runc.v2");
            if runtime_type != "io.containerd.runc.v2" || !valid_handler_name(name) {
                continue;
            }
            let binary = table(rt.get("options"))
                .and_then(|o| o.get("BinaryName"))
                .and_then(Item::as_str)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
            if !out.iter().any(|h: &DeclaredHandler| h.name == name) {
                out.push(DeclaredHandler {
                    name: name.to_owned(),
                    binary,
                });
            }
        }
    }
    Ok(out)
}

/// Runtime handlers of one CRI-O config file (`crio.conf` or a `crio.conf.d` drop-in).
/// Later files override earlier ones per handler, as CRI-O merges them; pass them in order
/// to [`merge`].
pub fn crio_handlers(text: &str, path: &Path) -> Result<Vec<DeclaredHandler>, CriConfigError> {
    let doc = parse(text, path)?;
    let runtimes = table(doc.get("crio"))
        .and_then(|c| table(c.get("runtime")))
        .and_then(|r| table(r.get("runtimes")));
    let Some(runtimes) = runtimes else {
        return Ok(Vec::new());
    };
    Ok(runtimes
        .iter()
        .filter(|(name, _)| valid_handler_name(name))
        .filter_map(|(name, rt)| {
            let rt = rt.as_table()?;
            // VM runtimes are not probed: their "user namespace" is a guest's.
            let vm = rt.get("runtime_type").and_then(Item::as_str) == Some("vm");
            (!vm).then(|| DeclaredHandler {
                name: name.to_owned(),
                binary: rt
                    .get("runtime_path")
                    .and_then(Item::as_str)
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
            })
        })
        .collect())
}

/// Merges handler lists from files read in order; a later declaration of a handler wins.
pub fn merge(lists: impl IntoIterator<Item = Vec<DeclaredHandler>>) -> Vec<DeclaredHandler> {
    let mut out: Vec<DeclaredHandler> = Vec::new();
    for h in lists.into_iter().flatten() {
        match out.iter_mut().find(|o| o.name == h.name) {
            Some(existing) => *existing = h,
            None => out.push(h),
        }
    }
    out
}

/// The handlers the node's CRI runtime registers, read from its config files under `etc`
/// (containerd's `config.toml`, else CRI-O's `crio.conf` and `crio.conf.d/*.conf` in name
/// order), with binaries resolved through `find`. Empty when neither config exists.
pub fn node_handlers(
    etc: &Path,
    find: impl Fn(&str) -> Option<PathBuf>,
) -> Result<Vec<RuntimeHandler>, CriConfigError> {
    let read = |path: PathBuf| -> Result<Option<(String, PathBuf)>, CriConfigError> {
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some((text, path))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CriConfigError::Read { path, source }),
        }
    };
    let declared = if let Some((text, path)) = read(etc.join("containerd/config.toml"))? {
        let declared = containerd_handlers(&text, &path)?;
        if declared.is_empty() {
            // containerd's built-in default: a `runc` handler running `runc` from PATH.
            vec![DeclaredHandler {
                name: "runc".into(),
                binary: None,
            }]
        } else {
            declared
        }
    } else {
        let mut files = vec![etc.join("crio/crio.conf")];
        let drop_ins = etc.join("crio/crio.conf.d");
        let mut extra: Vec<PathBuf> = std::fs::read_dir(&drop_ins)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                    .collect()
            })
            .unwrap_or_default();
        extra.sort();
        files.extend(extra);
        let mut lists = Vec::new();
        for f in files {
            if let Some((text, path)) = read(f)? {
                lists.push(crio_handlers(&text, &path)?);
            }
        }
        merge(lists)
    };
    Ok(declared.iter().filter_map(|h| h.resolve(&find)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD_V2: &str = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
  BinaryName = "/usr/local/bin/crun"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
"#;

    const CONTAINERD_V3: &str = r#"
version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = '/usr/bin/runc'
"#;

    #[test]
    fn containerd_v2_lists_runc_compatible_handlers_with_binaries() {
        let h = containerd_handlers(CONTAINERD_V2, Path::new("config.toml")).unwrap();
        assert_eq!(
            h,
            vec![
                DeclaredHandler {
                    name: "runc".into(),
                    binary: None
                },
                DeclaredHandler {
                    name: "crun".into(),
                    binary: Some("/usr/local/bin/crun".into())
                },
            ]
        );
    }

    #[test]
    fn containerd_v3_uses_the_cri_runtime_plugin() {
        let h = containerd_handlers(CONTAINERD_V3, Path::new("config.toml")).unwrap();
        assert_eq!(
            h,
            vec![DeclaredHandler {
                name: "runc".into(),
                binary: Some("/usr/bin/runc".into())
            }]
        );
        assert!(containerd_handlers("version = 2\n", Path::new("c"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn node_handlers_read_containerd_first_then_crio_drop_ins() {
        let etc = tempfile::tempdir().unwrap();
        let find = |n: &str| Some(PathBuf::from(format!("/usr/bin/{n}")));
        assert!(node_handlers(etc.path(), find).unwrap().is_empty());
        std::fs::create_dir_all(etc.path().join("crio/crio.conf.d")).unwrap();
        std::fs::write(
            etc.path().join("crio/crio.conf.d/20-crun.conf"),
            "[crio.runtime.runtimes.crun]\n",
        )
        .unwrap();
        std::fs::write(etc.path().join("crio/crio.conf.d/README"), "not a config").unwrap();
        assert_eq!(
            node_handlers(etc.path(), find).unwrap(),
            vec![RuntimeHandler::new("crun", "/usr/bin/crun")]
        );
        std::fs::create_dir_all(etc.path().join("containerd")).unwrap();
        std::fs::write(etc.path().join("containerd/config.toml"), "version = 2\n").unwrap();
        let builtin = node_handlers(etc.path(), |n: &str| Some(PathBuf::from(format!("/sbin/{n}")))).unwrap();
        assert_eq!(
            builtin,
            vec![RuntimeHandler::new("runc", "/sbin/runc")],
            "containerd's implicit runc handler"
        );
        std::fs::write(etc.path().join("containerd/config.toml"), CONTAINERD_V3).unwrap();
        assert_eq!(
            node_handlers(etc.path(), find).unwrap(),
            vec![RuntimeHandler::new("runc", "/usr/bin/runc")]
        );
    }

    #[test]
    fn broken_config_names_the_file() {
        let err = containerd_handlers("[plugins\n", Path::new("/etc/containerd/config.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/etc/containerd/config.toml is not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn crio_drop_ins_override_in_order_and_vm_runtimes_are_skipped() {
        let base = r#"
[crio.runtime]
default_runtime = "crun"
[crio.runtime.runtimes.crun]
runtime_path = ""
[crio.runtime.runtimes.runc]
runtime_path = "/usr/libexec/crio/runc"
[crio.runtime.runtimes.kata]
runtime_path = "/usr/bin/kata-runtime"
runtime_type = "vm"
"#;
        let drop_in = "[crio.runtime.runtimes.runc]\nruntime_path = \"/opt/runc/bin/runc\"\n";
        let merged = merge([
            crio_handlers(base, Path::new("crio.conf")).unwrap(),
            crio_handlers(drop_in, Path::new("10-runc.conf")).unwrap(),
        ]);
        assert_eq!(
            merged,
            vec![
                DeclaredHandler {
                    name: "crun".into(),
                    binary: None
                },
                DeclaredHandler {
                    name: "runc".into(),
                    binary: Some("/opt/runc/bin/runc".into())
                },
            ]
        );
        let resolved = merged[0]
            .resolve(|n| (n == "crun").then(|| PathBuf::from("/usr/bin/crun")))
            .unwrap();
        assert_eq!(resolved, RuntimeHandler::new("crun", "/usr/bin/crun"));
    }
}
