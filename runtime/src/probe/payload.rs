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

/// What the idmap probe saw of its bind mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdmapObservation {
    pub dir: MountObservation,
    /// Why writing a file through the mount failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// Everything the payload reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub uid: u32,
    pub uid_map: String,
    pub gid_map: String,
    pub proc: MountObservation,
    pub sys: MountObservation,
    pub mqueue: MountObservation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idmap: Option<IdmapObservation>,
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

/// Observes the container from inside. `idmap_dir` is the idmapped bind mount, if any.
pub fn observe(idmap_dir: Option<&Path>) -> Observation {
    let idmap = idmap_dir.map(|dir| {
        let mut dir_obs = observe_mount(dir, 0);
        dir_obs.mounted = dir_obs.uid.is_some();
        let write_error = fs::write(dir.join(IDMAP_WRITTEN_FILE), b"usernsguard\n")
            .err()
            .map(|e| e.to_string());
        IdmapObservation {
            dir: dir_obs,
            write_error,
        }
    });
    Observation {
        uid: nix::unistd::getuid().as_raw(),
        uid_map: fs::read_to_string("/proc/self/uid_map").unwrap_or_default(),
        gid_map: fs::read_to_string("/proc/self/gid_map").unwrap_or_default(),
        proc: observe_mount(Path::new("/proc"), PROC_SUPER_MAGIC),
        sys: observe_mount(Path::new("/sys"), SYSFS_MAGIC),
        mqueue: observe_mount(Path::new("/dev/mqueue"), MQUEUE_MAGIC),
        idmap,
    }
}

/// Entry point of the hidden `__probe-payload` subcommand: `[--idmap-dir DIR]`.
/// Prints the observation as one JSON line; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let idmap_dir = match args {
        [] => None,
        [flag, dir] if flag == "--idmap-dir" => Some(Path::new(dir)),
        other => {
            eprintln!("usage: __probe-payload [--idmap-dir DIR] (got {other:?})");
            return 2;
        }
    };
    match serde_json::to_string(&observe(idmap_dir)) {
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
    fn observes_this_hosts_proc_and_sys() {
        let o = observe(None);
        assert!(o.proc.mounted, "{o:?}");
        assert!(o.sys.mounted, "{o:?}");
        assert!(o.uid_map.contains('0'));
        assert!(o.idmap.is_none());
    }

    #[test]
    fn idmap_probe_writes_through_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let o = observe(Some(dir.path()));
        let idmap = o.idmap.unwrap();
        assert!(idmap.dir.mounted);
        assert_eq!(idmap.write_error, None);
        assert!(dir.path().join(IDMAP_WRITTEN_FILE).exists());
        let o = observe(Some(&dir.path().join("absent")));
        assert!(o.idmap.unwrap().write_error.is_some());
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        assert_eq!(main(&["--bogus".into()]), 2);
    }
}
