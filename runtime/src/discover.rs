//! Finding OCI runtimes and asking them what they are (`--version`) and what they claim to
//! support (`features`, OCI runtime-spec features document).
//!
//! containerd decides whether a handler supports user namespaces from the `features`
//! document alone; the `features` check compares that claim with what the probes saw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::host::HostRoot;
use crate::process::{self, ProcessError};
use crate::report::ClaimedFeatures;

/// One runtime handler to test: a name (as containerd/CRI-O call it) and a binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeHandler {
    pub name: String,
    pub binary: PathBuf,
}

impl RuntimeHandler {
    pub fn new(name: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        RuntimeHandler {
            name: name.into(),
            binary: binary.into(),
        }
    }

    /// `NAME=PATH`, as given to `usernsguard selftest --runtime`.
    pub fn parse(spec: &str) -> Result<Self, DiscoverError> {
        let bad = || DiscoverError::BadHandlerSpec(spec.to_owned());
        let (name, path) = spec.split_once('=').ok_or_else(bad)?;
        if !valid_handler_name(name) || path.is_empty() {
            return Err(bad());
        }
        Ok(RuntimeHandler::new(name, path))
    }
}

/// Handler names end up in label keys (`usernsguard.io/runtime.<handler>`), whose name part
/// is at most 63 characters; `runtime.` takes 8 of them.
pub const MAX_HANDLER_NAME: usize = 55;

/// Whether `name` can be a handler name: a valid label-name suffix of at most
/// [`MAX_HANDLER_NAME`] characters (the CRDs enforce the same rule).
pub fn valid_handler_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_HANDLER_NAME
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("invalid runtime {0:?}: expected NAME=PATH with NAME a label-safe handler name (letters, digits, '-', '_', '.'; at most 55 characters)")]
    BadHandlerSpec(String),
    #[error("no {0} binary found on PATH")]
    NotFound(String),
    #[error("{binary} is not an OCI runtime: `{binary} --version` printed {output:?}")]
    NotARuntime { binary: PathBuf, output: String },
    #[error("{binary} printed a features document that is not valid JSON: {source}")]
    BadFeatures {
        binary: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl DiscoverError {
    /// The runtime did not answer in time: reported as the `timeout` reason.
    pub fn is_timeout(&self) -> bool {
        matches!(self, DiscoverError::Process(ProcessError::Timeout { .. }))
    }
}

/// The runtime family, which decides how it has to be invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Runc,
    /// Needs `--cgroup-manager=disabled` and a cgroup2 mount (see `probe::runner`).
    Crun,
    /// Invoked like runc (youki, runsc and others accept runc's CLI).
    Other,
}

/// What `--version` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    pub kind: RuntimeKind,
    /// `runc`, `crun`, `youki`, ...
    pub name: String,
    pub version: String,
}

/// Parses the first line of `<runtime> --version`: `runc version 1.1.5+ds1`, `crun version
/// 1.8.1`, `youki version 0.3.3`. Anything else is not a runtime we know how to drive.
pub fn parse_version(output: &str) -> Option<RuntimeVersion> {
    let line = output.lines().find(|l| l.contains(" version "))?;
    let mut words = line.split_whitespace();
    let name = words.next()?.to_owned();
    if words.next()? != "version" {
        return None;
    }
    let version = words.next()?.to_owned();
    let kind = match name.as_str() {
        "runc" => RuntimeKind::Runc,
        "crun" => RuntimeKind::Crun,
        _ => RuntimeKind::Other,
    };
    Some(RuntimeVersion { kind, name, version })
}

/// Runs `<binary> --version` on `host` (`binary` is a host path).
pub fn version(host: &HostRoot, binary: &Path, timeout: Duration) -> Result<RuntimeVersion, DiscoverError> {
    let mut cmd = host.command(binary);
    cmd.arg("--version");
    let out = process::run(cmd, timeout)?;
    let text = out.stdout_lossy();
    parse_version(&text).ok_or_else(|| DiscoverError::NotARuntime {
        binary: binary.to_owned(),
        output: text.trim().to_owned(),
    })
}

/// Runs `<binary> features` on `host`. A runtime without the subcommand (crun < 1.9) is not
/// an error: it claims nothing, which is also what containerd concludes. Any other failure
/// of the subcommand is one: claims we could not read are not "no claims".
pub fn features(host: &HostRoot, binary: &Path, timeout: Duration) -> Result<ClaimedFeatures, DiscoverError> {
    let mut cmd = host.command(binary);
    cmd.arg("features");
    match process::run(cmd, timeout) {
        Ok(out) => parse_features(&out.stdout).map_err(|source| DiscoverError::BadFeatures {
            binary: binary.to_owned(),
            source,
        }),
        Err(ProcessError::Failed { stdout, stderr, .. }) if says_unknown_command(&stdout, &stderr) => {
            Ok(ClaimedFeatures::default())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a runtime's output says it has no such subcommand: crun 1.8 prints `unknown
/// command features`, runc before 1.1 `No help topic for 'features'` (urfave/cli), others
/// `unknown command`/`invalid command`.
pub fn says_unknown_command(stdout: &[u8], stderr: &[u8]) -> bool {
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    )
    .to_ascii_lowercase();
    [
        "unknown command",
        "no help topic",
        "invalid command",
        "unrecognized command",
    ]
    .iter()
    .any(|p| text.contains(p))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct FeaturesDoc {
    #[serde(default)]
    oci_version_max: Option<String>,
    #[serde(default)]
    mount_options: Vec<String>,
    #[serde(default)]
    linux: Option<LinuxFeatures>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LinuxFeatures {
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    mount_extensions: Option<MountExtensions>,
}

#[derive(Deserialize, Default)]
struct MountExtensions {
    #[serde(default)]
    idmap: Option<Enabled>,
}

#[derive(Deserialize, Default)]
struct Enabled {
    #[serde(default)]
    enabled: Option<bool>,
}

/// Reduces a features document to the claims that matter for user namespaces.
pub fn parse_features(json: &[u8]) -> Result<ClaimedFeatures, serde_json::Error> {
    let doc: FeaturesDoc = serde_json::from_slice(json)?;
    let linux = doc.linux.unwrap_or_default();
    let user_namespaces = linux.namespaces.map(|ns| ns.iter().any(|n| n == "user"));
    let idmap_ext = linux
        .mount_extensions
        .and_then(|m| m.idmap)
        .and_then(|i| i.enabled);
    let idmap_opt = doc.mount_options.iter().any(|o| o == "idmap" || o == "ridmap");
    let idmap_mounts = match idmap_ext {
        Some(enabled) => Some(enabled || idmap_opt),
        None if idmap_opt => Some(true),
        None if doc.mount_options.is_empty() => None,
        None => Some(false),
    };
    Ok(ClaimedFeatures {
        available: true,
        user_namespaces,
        idmap_mounts,
        oci_version_max: doc.oci_version_max,
    })
}

/// Finds `name` on `PATH` (as the default `runc` and `crun` handlers of `selftest`).
pub fn find_on_path(name: &str, path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_version_banners() {
        let runc = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n";
        let v = parse_version(runc).unwrap();
        assert_eq!(
            (v.kind, v.name.as_str(), v.version.as_str()),
            (RuntimeKind::Runc, "runc", "1.1.5+ds1")
        );
        let crun = "crun version 1.8.1\ncommit: f8a096be\nrundir: /run/crun\n";
        assert_eq!(parse_version(crun).unwrap().kind, RuntimeKind::Crun);
        assert_eq!(
            parse_version("youki version 0.3.3\n").unwrap().kind,
            RuntimeKind::Other
        );
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("true: a version of nothing"), None);
    }

    #[test]
    fn features_of_runc_1_1_claims_userns_but_not_idmap() {
        let doc =
            br#"{"ociVersionMin":"1.0.0","ociVersionMax":"1.0.2-dev","mountOptions":["bind","rbind","ro"],
            "linux":{"namespaces":["cgroup","ipc","mount","network","pid","user","uts"]}}"#;
        let f = parse_features(doc).unwrap();
        assert!(f.available);
        assert_eq!(f.user_namespaces, Some(true));
        assert_eq!(f.idmap_mounts, Some(false));
        assert_eq!(f.oci_version_max.as_deref(), Some("1.0.2-dev"));
    }

    #[test]
    fn features_of_runc_1_2_claims_idmap_through_mount_extensions() {
        let doc = br#"{"mountOptions":["bind"],"linux":{"namespaces":["user"],"mountExtensions":{"idmap":{"enabled":true}}}}"#;
        assert_eq!(parse_features(doc).unwrap().idmap_mounts, Some(true));
        let doc = br#"{"linux":{"namespaces":["pid"]}}"#;
        let f = parse_features(doc).unwrap();
        assert_eq!((f.user_namespaces, f.idmap_mounts), (Some(false), None));
        assert!(parse_features(b"unknown command features").is_err());
    }

    #[test]
    fn handler_specs() {
        assert_eq!(
            RuntimeHandler::parse("crun=/usr/bin/crun").unwrap(),
            RuntimeHandler::new("crun", "/usr/bin/crun")
        );
        for bad in [
            "crun",
            "=/usr/bin/crun",
            "crun=",
            "Bad Name=/x",
            "-x=/y",
            "a/b=/x",
        ] {
            let err = RuntimeHandler::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn unknown_subcommand_is_told_from_other_failures() {
        assert!(says_unknown_command(b"", b"unknown command features\n"));
        assert!(says_unknown_command(b"No help topic for 'features'\n", b""));
        assert!(!says_unknown_command(b"", b"features: permission denied\n"));
        assert!(!says_unknown_command(b"", b""));
    }

    #[test]
    fn version_of_a_non_runtime_is_a_clear_error() {
        let err = version(&HostRoot::own(), Path::new("/bin/true"), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, DiscoverError::NotARuntime { .. }), "{err}");
        assert!(
            err.to_string().contains("/bin/true is not an OCI runtime"),
            "{err}"
        );
    }
}
