//! The program that runs inside a probe container and reports what it sees.
//!
//! It only observes; every judgement is made on the host by [`super::evaluate`], so that a
//! payload from an older agent version cannot change a verdict. Output is one JSON line.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Kernel magic numbers of the filesystems the probe expects (linux/magic.h).
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
const SYSFS_MAGIC: u64 = 0x6265_6572;
const MQUEUE_MAGIC: u64 = 0x1980_0202;

/// Name of the file the `idmap-mount` probe writes through the idmapped mount.
pub const IDMAP_WRITTEN_FILE: &str = "written-by-probe";

/// One mount point as seen from inside the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountObservation {
    /// The expected filesystem is mounted there.
    pub mounted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the idmap probe saw of one idmapped bind mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdmapObservation {
    /// The mount point inside the container.
    #[serde(default)]
    pub path: String,
    pub dir: MountObservation,
    /// Why writing a file through the mount failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// Inode numbers of the container's own namespaces (`/proc/self/ns/*`): the identity the
/// host compares with the namespaces it asked the runtime to join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceIds {
    pub user: u64,
    pub net: u64,
}

/// Everything the payload reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub uid: u32,
    pub uid_map: String,
    pub gid_map: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceIds>,
    pub proc: MountObservation,
    pub sys: MountObservation,
    pub mqueue: MountObservation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idmaps: Vec<IdmapObservation>,
}

fn observe_mount(path: &Path, magic: u64) -> MountObservation {
    let mut obs = MountObservation::default();
    match crate::facts::fs_magic(path) {
        Ok(m) => obs.mounted = m == magic,
        Err(e) => obs.error = Some(format!("statfs {}: {e}", path.display())),
    }
    match fs::metadata(path) {
        Ok(m) => {
            obs.uid = Some(m.uid());
            obs.gid = Some(m.gid());
        }
        Err(e) => obs.error = Some(format!("stat {}: {e}", path.display())),
    }
    obs
}

fn namespace_inode(path: &str) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Observes the container from inside. `idmap_dirs` are the idmapped bind mounts.
pub fn observe(idmap_dirs: &[&Path]) -> Observation {
    let idmaps = idmap_dirs
        .iter()
        .map(|dir| {
            let mut dir_obs = observe_mount(dir, 0);
            dir_obs.mounted = dir_obs.uid.is_some();
            let write_error = fs::write(dir.join(IDMAP_WRITTEN_FILE), b"usernsguard\n")
                .err()
                .map(|e| e.to_string());
            IdmapObservation {
                path: dir.display().to_string(),
                dir: dir_obs,
                write_error,
            }
        })
        .collect();
    let namespaces = match (
        namespace_inode("/proc/self/ns/user"),
        namespace_inode("/proc/self/ns/net"),
    ) {
        (Some(user), Some(net)) => Some(NamespaceIds { user, net }),
        _ => None,
    };
    Observation {
        uid: nix::unistd::getuid().as_raw(),
        uid_map: fs::read_to_string("/proc/self/uid_map").unwrap_or_default(),
        gid_map: fs::read_to_string("/proc/self/gid_map").unwrap_or_default(),
        namespaces,
        proc: observe_mount(Path::new("/proc"), PROC_SUPER_MAGIC),
        sys: observe_mount(Path::new("/sys"), SYSFS_MAGIC),
        mqueue: observe_mount(Path::new("/dev/mqueue"), MQUEUE_MAGIC),
        idmaps,
    }
}

/// Entry point of the hidden `__probe-payload` subcommand: `[--idmap-dir DIR]...`.
/// Prints the observation as one JSON line; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let mut idmap_dirs = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (arg.as_str(), rest.next()) {
            ("--idmap-dir", Some(dir)) => idmap_dirs.push(Path::new(dir.as_str())),
            _ => {
                eprintln!("usage: __probe-payload [--idmap-dir DIR]... (got {args:?})");
                return 2;
            }
        }
    }
    match serde_json::to_string(&observe(&idmap_dirs)) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("cannot encode observation: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observes_this_hosts_proc_sys_and_namespaces() {
        let o = observe(&[]);
        assert!(o.proc.mounted, "{o:?}");
        assert!(o.sys.mounted, "{o:?}");
        assert!(o.uid_map.contains('0'));
        assert!(o.idmaps.is_empty());
        let own_user_ns = fs::metadata("/proc/self/ns/user").unwrap().ino();
        assert_eq!(o.namespaces.unwrap().user, own_user_ns);
    }

    #[test]
    fn idmap_probe_writes_through_each_directory() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent");
        let o = observe(&[dir.path(), &absent]);
        assert_eq!(o.idmaps.len(), 2);
        assert!(o.idmaps[0].dir.mounted);
        assert_eq!(o.idmaps[0].write_error, None);
        assert_eq!(o.idmaps[0].path, dir.path().display().to_string());
        assert!(dir.path().join(IDMAP_WRITTEN_FILE).exists());
        assert!(o.idmaps[1].write_error.is_some());
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        assert_eq!(main(&["--bogus".into()]), 2);
        assert_eq!(main(&["--idmap-dir".into()]), 2, "a flag without its value");
    }
}
