//! The node's CRI runtime configuration as the CRI runtime itself reads it: which runtime
//! handlers it registers, which binary each runs, whether it labels containers for
//! SELinux, and where its socket is.
//!
//! In a cluster the verdict must be about what the kubelet will actually get, so the probes
//! execute the binaries containerd (`runtimes.<handler>.options.BinaryName`, else `runc`
//! from its `PATH`) or CRI-O (`runtimes.<handler>.runtime_path`, else the handler's name
//! from its `PATH`) would execute, found on the host.
//!
//! Files: containerd's root config plus everything its `imports` name (globs, relative to
//! the importing file, recursively, each file once, later files overriding earlier ones, as
//! containerd merges them); the configs k3s and rke2 render for their embedded containerd;
//! CRI-O's `crio.conf` and every file in `crio.conf.d` in lexical order. Parsing is pure
//! over text; reading goes through a [`HostRoot`].

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table};

use crate::discover::{valid_handler_name, RuntimeHandler};
use crate::host::{HostRoot, SERVICE_PATH};

#[derive(Debug, thiserror::Error)]
pub enum CriConfigError {
    #[error("{path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml_edit::TomlError,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is neither a containerd configuration (no `version`/`plugins`) nor a CRI-O one (no `[crio]` table)")]
    Unknown { path: PathBuf },
}

/// Which CRI runtime a configuration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriKind {
    Containerd,
    Crio,
}

impl CriKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            CriKind::Containerd => "containerd",
            CriKind::Crio => "cri-o",
        }
    }

    /// The handler of pods without a RuntimeClass when the configuration names none:
    /// containerd's `default_runtime_name` defaults to `runc`; CRI-O's `default_runtime`
    /// defaults to `crun` since CRI-O 1.31 (`DefaultRuntime` in its `pkg/config/config_linux.go`,
    /// cri-o/cri-o PR 8549; `runc` before, though CRI-O's packages have shipped a
    /// `crio.conf.d/10-crio.conf` naming `crun` since 1.28, and that drop-in is read like any).
    pub const fn builtin_default_handler(self) -> &'static str {
        match self {
            CriKind::Containerd => "runc",
            CriKind::Crio => "crun",
        }
    }

    /// The socket the CRI runtime listens on when its configuration does not say.
    pub const fn default_socket(self) -> &'static str {
        match self {
            CriKind::Containerd => "/run/containerd/containerd.sock",
            CriKind::Crio => "/run/crio/crio.sock",
        }
    }
}

/// A handler as the CRI config declares it; `binary` is `None` when the config leaves it to
/// the CRI runtime's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredHandler {
    pub name: String,
    pub binary: Option<PathBuf>,
}

/// What the node's CRI runtime configuration says, merged over all its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriConfig {
    pub kind: CriKind,
    /// The files read, in merge order (host paths).
    pub files: Vec<PathBuf>,
    pub handlers: Vec<DeclaredHandler>,
    /// containerd `enable_selinux` / CRI-O `selinux`: whether containers get SELinux labels
    /// (when SELinux is enabled on the node).
    pub selinux: bool,
    /// The configured socket (containerd `grpc.address`, CRI-O `crio.api.listen`).
    pub socket: Option<PathBuf>,
    /// The handler the CRI runtime uses for a pod without a RuntimeClass: containerd
    /// `containerd.default_runtime_name`, CRI-O `crio.runtime.default_runtime`, else the
    /// runtime's built-in default ([`CriKind::builtin_default_handler`]).
    pub default_handler: String,
}

impl CriConfig {
    /// The socket to talk to, as a host path.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(self.kind.default_socket()))
    }

    /// The handlers with their binaries resolved on `host` the way the CRI runtime resolves
    /// them; a handler whose binary is not found keeps the path it would run (the probes
    /// then report that it cannot be executed).
    pub fn resolve(&self, host: &HostRoot) -> Vec<RuntimeHandler> {
        self.handlers
            .iter()
            .map(|h| {
                let wanted = match (&h.binary, self.kind) {
                    (Some(p), _) => p.display().to_string(),
                    (None, CriKind::Containerd) => "runc".to_owned(),
                    (None, CriKind::Crio) => h.name.clone(),
                };
                let binary = host
                    .find_on_path(&wanted, SERVICE_PATH)
                    .unwrap_or_else(|| PathBuf::from(&wanted));
                RuntimeHandler::new(h.name.clone(), binary)
            })
            .collect()
    }
}

/// The containerd CRI plugin tables that hold `containerd.runtimes` and `enable_selinux`:
/// config version 2 (containerd 1.x) and 3 (containerd 2.x).
const CONTAINERD_CRI_PLUGINS: [&str; 2] = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"];

/// Where containerd, k3s's and rke2's embedded containerd, and CRI-O keep their
/// configuration, with the socket each listens on by default, in the order they are tried.
pub const CONTAINERD_CONFIGS: [(&str, &str); 3] = [
    ("/etc/containerd/config.toml", "/run/containerd/containerd.sock"),
    (
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
        "/run/k3s/containerd/containerd.sock",
    ),
    (
        "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
        "/run/k3s/containerd/containerd.sock",
    ),
];
pub const CRIO_CONFIG: &str = "/etc/crio/crio.conf";
pub const CRIO_DROP_INS: &str = "/etc/crio/crio.conf.d";

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

fn string(item: Option<&Item>) -> Option<String> {
    item.and_then(Item::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// What one containerd config file contributes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ContainerdFile {
    handlers: Vec<DeclaredHandler>,
    selinux: Option<bool>,
    default_handler: Option<String>,
    socket: Option<PathBuf>,
    imports: Vec<String>,
}

/// Parses one containerd config file. Only runc-compatible (`io.containerd.runc.v2`)
/// handlers count: others (kata, gVisor shims) are not OCI runtimes the probes can drive.
fn containerd_file(text: &str, path: &Path) -> Result<ContainerdFile, CriConfigError> {
    let doc = parse(text, path)?;
    let mut out = ContainerdFile {
        socket: table(doc.get("grpc"))
            .and_then(|g| string(g.get("address")))
            .map(PathBuf::from),
        imports: doc
            .get("imports")
            .and_then(Item::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str()).map(str::to_owned).collect())
            .unwrap_or_default(),
        ..ContainerdFile::default()
    };
    let Some(plugins) = table(doc.get("plugins")) else {
        return Ok(out);
    };
    for plugin in CONTAINERD_CRI_PLUGINS
        .iter()
        .filter_map(|p| table(plugins.get(p)))
    {
        if let Some(b) = plugin.get("enable_selinux").and_then(Item::as_bool) {
            out.selinux = Some(b);
        }
        if let Some(name) =
            table(plugin.get("containerd")).and_then(|c| string(c.get("default_runtime_name")))
        {
            out.default_handler = Some(name);
        }
        let runtimes = table(plugin.get("containerd")).and_then(|c| table(c.get("runtimes")));
        for (name, rt) in runtimes.into_iter().flat_map(|r| r.iter()) {
            let Some(rt) = rt.as_table() else { continue };
            let runtime_type = rt
                .get("runtime_type")
                .and_then(Item::as_str)
                .unwrap_or("io.containerd.runc.v2");
            if runtime_type != "io.containerd.runc.v2" || !valid_handler_name(name) {
                continue;
            }
            let binary = table(rt.get("options"))
                .and_then(|o| string(o.get("BinaryName")))
                .map(PathBuf::from);
            merge_handler(
                &mut out.handlers,
                DeclaredHandler {
                    name: name.to_owned(),
                    binary,
                },
            );
        }
    }
    Ok(out)
}

/// What one CRI-O config file contributes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CrioFile {
    handlers: Vec<DeclaredHandler>,
    selinux: Option<bool>,
    default_handler: Option<String>,
    socket: Option<PathBuf>,
}

fn crio_file(text: &str, path: &Path) -> Result<CrioFile, CriConfigError> {
    let doc = parse(text, path)?;
    let crio = table(doc.get("crio"));
    let runtime = crio.and_then(|c| table(c.get("runtime")));
    let mut out = CrioFile {
        selinux: runtime.and_then(|r| r.get("selinux")).and_then(Item::as_bool),
        default_handler: runtime.and_then(|r| string(r.get("default_runtime"))),
        socket: crio
            .and_then(|c| table(c.get("api")))
            .and_then(|a| string(a.get("listen")))
            .map(PathBuf::from),
        ..CrioFile::default()
    };
    for (name, rt) in runtime
        .and_then(|r| table(r.get("runtimes")))
        .into_iter()
        .flat_map(|r| r.iter())
    {
        let Some(rt) = rt.as_table() else { continue };
        // VM runtimes are not probed: their "user namespace" is a guest's.
        if rt.get("runtime_type").and_then(Item::as_str) == Some("vm") || !valid_handler_name(name) {
            continue;
        }
        merge_handler(
            &mut out.handlers,
            DeclaredHandler {
                name: name.to_owned(),
                binary: string(rt.get("runtime_path")).map(PathBuf::from),
            },
        );
    }
    Ok(out)
}

/// A later declaration of a handler replaces the earlier one, as both runtimes merge.
fn merge_handler(list: &mut Vec<DeclaredHandler>, h: DeclaredHandler) {
    match list.iter_mut().find(|o| o.name == h.name) {
        Some(existing) => *existing = h,
        None => list.push(h),
    }
}

fn read_host(host: &HostRoot, path: &Path) -> Result<Option<String>, CriConfigError> {
    match std::fs::read_to_string(host.path(path)) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CriConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads containerd's config at `root` (a host path) with everything it imports.
pub fn read_containerd(host: &HostRoot, root: &Path) -> Result<CriConfig, CriConfigError> {
    let mut config = CriConfig {
        kind: CriKind::Containerd,
        files: Vec::new(),
        handlers: Vec::new(),
        selinux: false,
        socket: None,
        default_handler: CriKind::Containerd.builtin_default_handler().to_owned(),
    };
    let mut pending = vec![root.to_path_buf()];
    while !pending.is_empty() {
        let path = pending.remove(0);
        if config.files.contains(&path) {
            continue;
        }
        let Some(text) = read_host(host, &path)? else {
            if path == root {
                return Err(CriConfigError::Read {
                    path,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            continue;
        };
        let file = containerd_file(&text, &path)?;
        config.files.push(path.clone());
        for h in file.handlers {
            merge_handler(&mut config.handlers, h);
        }
        config.selinux = file.selinux.unwrap_or(config.selinux);
        config.socket = file.socket.or(config.socket);
        if let Some(name) = file.default_handler {
            config.default_handler = name;
        }
        let base = path.parent().unwrap_or(Path::new("/"));
        for pattern in &file.imports {
            pending.extend(glob(host, &base.join(pattern)));
        }
    }
    if config.handlers.is_empty() {
        // containerd's built-in default: a `runc` handler running `runc` from its PATH.
        config.handlers.push(DeclaredHandler {
            name: "runc".into(),
            binary: None,
        });
    }
    Ok(config)
}

/// Reads CRI-O's `crio.conf` (when present) and its drop-in directory.
pub fn read_crio(host: &HostRoot, main: &Path, drop_ins: &Path) -> Result<CriConfig, CriConfigError> {
    let mut files = vec![main.to_path_buf()];
    let mut extra: Vec<PathBuf> = std::fs::read_dir(host.path(drop_ins))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| drop_ins.join(e.file_name()))
                .collect()
        })
        .unwrap_or_default();
    extra.sort();
    files.extend(extra);
    let mut config = CriConfig {
        kind: CriKind::Crio,
        files: Vec::new(),
        handlers: Vec::new(),
        selinux: false,
        socket: None,
        default_handler: CriKind::Crio.builtin_default_handler().to_owned(),
    };
    for path in files {
        let Some(text) = read_host(host, &path)? else {
            continue;
        };
        let file = crio_file(&text, &path)?;
        config.files.push(path);
        for h in file.handlers {
            merge_handler(&mut config.handlers, h);
        }
        config.selinux = file.selinux.unwrap_or(config.selinux);
        config.socket = file.socket.or(config.socket);
        if let Some(name) = file.default_handler {
            config.default_handler = name;
        }
    }
    Ok(config)
}

/// Reads the configuration file named on the command line (a host path), telling
/// containerd's from CRI-O's by its content.
pub fn read_file(host: &HostRoot, path: &Path) -> Result<CriConfig, CriConfigError> {
    let text = read_host(host, path)?.ok_or_else(|| CriConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let doc = parse(&text, path)?;
    if doc.contains_key("crio") {
        let drop_ins = path.parent().unwrap_or(Path::new("/")).join("crio.conf.d");
        read_crio(host, path, &drop_ins)
    } else if doc.contains_key("version") || doc.contains_key("plugins") || doc.contains_key("imports") {
        read_containerd(host, path)
    } else {
        Err(CriConfigError::Unknown {
            path: path.to_owned(),
        })
    }
}

/// Finds the node's CRI runtime configuration on `host`: the first known location whose
/// socket exists, else the first whose configuration exists; `None` when there is neither
/// (a host without Kubernetes).
pub fn discover(host: &HostRoot) -> Result<Option<CriConfig>, CriConfigError> {
    type Reader<'a> = Box<dyn Fn() -> Result<CriConfig, CriConfigError> + 'a>;
    let mut candidates: Vec<(Reader<'_>, PathBuf, PathBuf)> = Vec::new();
    for (config, socket) in CONTAINERD_CONFIGS {
        let config = PathBuf::from(config);
        let c = config.clone();
        candidates.push((
            Box::new(move || read_containerd(host, &c)),
            config,
            PathBuf::from(socket),
        ));
    }
    let crio_present = host.path(CRIO_CONFIG).exists() || host.path(CRIO_DROP_INS).exists();
    candidates.push((
        Box::new(|| read_crio(host, Path::new(CRIO_CONFIG), Path::new(CRIO_DROP_INS))),
        if crio_present {
            PathBuf::from(CRIO_CONFIG)
        } else {
            PathBuf::from("/nonexistent")
        },
        PathBuf::from(CriKind::Crio.default_socket()),
    ));
    let exists = |p: &Path| host.path(p).exists();
    let with_socket = candidates
        .iter()
        .position(|(_, config, socket)| exists(config) && exists(socket));
    let any = candidates.iter().position(|(_, config, _)| exists(config));
    match with_socket.or(any) {
        Some(i) => {
            let mut config = (candidates[i].0)()?;
            // k3s and rke2 set no grpc.address in the rendered file; their socket is theirs.
            if config.socket.is_none() && config.kind == CriKind::Containerd {
                config.socket = Some(candidates[i].2.clone());
            }
            Ok(Some(config))
        }
        None => Ok(None),
    }
}

/// `path` with `.` and `..` resolved lexically, as Go's `filepath.Join` cleans import paths.
fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for comp in path.components() {
        match comp {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// containerd's `imports` glob (`*`, `?` in any component) over the host's files, sorted.
fn glob(host: &HostRoot, pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for comp in clean(pattern).components().skip(1) {
        let part = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for dir in &found {
            if part.contains(['*', '?']) {
                let mut names: Vec<String> = std::fs::read_dir(host.path(dir))
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| wildcard(&part, n))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                next.push(dir.join(part.as_ref()));
            }
        }
        found = next;
    }
    found.retain(|p| host.path(p).is_file());
    found
}

fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests;
