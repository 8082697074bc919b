//! The direct checks of DESIGN.md (`userns-created`, `userns-joined`, `idmap-mount`):
//! writing each probe's bundle, preparing what it needs on the host, running it through the
//! OCI runtime binary and collecting what came back. [`evaluate`] judges the outcomes;
//! [`payload`] is what runs inside; [`runner`] drives the runtime binary.
//!
//! Probe container ids and directories are neutral (`ug-<pid>-<run>-<handler>-<n>`,
//! `c<n>/`): a runtime that echoes them in an error must not hand the classifier words.

pub mod evaluate;
pub mod payload;
pub mod runner;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::bundle::{self, BundleOptions, IdmapMount, MirrorEntry, Namespaces, Payload, IDMAP_TARGET};
use crate::host::HostDir;
use crate::process::ProcessError;
use crate::report::Check;
use crate::userns::{IdMapping, NamespaceHolder};
pub use evaluate::{
    evaluate, evaluate_features, evaluate_idmap, FeaturesAnswer, Judge, Outcome, Written, OVERFLOW_UID,
};
use payload::{NamespaceIds, Observation};
use runner::RuntimeCommand;

/// A place where pods' volumes live, probed by `idmap-mount`.
#[derive(Debug, Clone)]
pub struct IdmapPlace {
    /// For messages: `/var/lib/kubelet (ext4)`, `tmpfs`.
    pub description: String,
    /// The directory the probe's own directory is created in.
    pub parent: HostDir,
}

/// What one probe needs from its surroundings.
#[derive(Debug, Clone)]
pub struct ProbeEnv<'a> {
    pub runtime: &'a RuntimeCommand,
    /// The payload, its `host_path` a path on the host.
    pub payload: &'a Payload,
    pub mirror: &'a [MirrorEntry],
    pub uid: IdMapping,
    pub gid: IdMapping,
    /// `linux.mountLabel` to set, as the CRI runtime would on this node.
    pub mount_label: Option<&'a str>,
    pub timeout: Duration,
    /// A fresh directory for this handler's probes; removed by the caller.
    pub work: &'a HostDir,
    /// Container ids are `<id_prefix>-<n>`.
    pub id_prefix: &'a str,
}

/// Runs the probe container of `userns-created` or `userns-joined`.
pub fn run_probe(check: Check, env: &ProbeEnv<'_>) -> Outcome {
    let n = Check::PROBES.iter().position(|c| *c == check).unwrap_or(9);
    let dir = env.work.join(format!("c{n}"));
    let joined = check == Check::UsernsJoined;
    match run_container(env, &dir, &format!("{}-{n}", env.id_prefix), joined, &[]) {
        Ok(outcome) => outcome,
        Err(message) => Outcome::Setup(message),
    }
}

/// Runs the `idmap-mount` probe once per place, concurrently: one idmapped bind mount of a
/// fresh directory there each.
pub fn run_idmap(env: &ProbeEnv<'_>, places: &[IdmapPlace]) -> Vec<(String, Outcome)> {
    std::thread::scope(|s| {
        let runs: Vec<_> = places
            .iter()
            .enumerate()
            .map(|(i, place)| {
                s.spawn(move || {
                    let dir = env.work.join(format!("c2-{i}"));
                    let id = format!("{}-2-{i}", env.id_prefix);
                    let outcome = match probe_dir(&place.parent) {
                        Ok(probe) => {
                            let outcome = run_container(env, &dir, &id, false, std::slice::from_ref(&probe))
                                .unwrap_or_else(Outcome::Setup);
                            let _ = fs::remove_dir_all(&probe.local);
                            outcome
                        }
                        Err(message) => Outcome::Setup(message),
                    };
                    (place.description.clone(), outcome)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("probe threads do not panic"))
            .collect()
    })
}

/// A fresh directory owned by host root, mode 0755 (not world-writable: a runtime that
/// ignores the idmap leaves the container's root unable to write there).
fn probe_dir(parent: &HostDir) -> Result<HostDir, String> {
    fs::create_dir_all(&parent.local).map_err(|e| format!("creating {}: {e}", parent.host.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("ug-")
        .tempdir_in(&parent.local)
        .map_err(|e| format!("creating a directory in {}: {e}", parent.host.display()))?
        .keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let name = dir.file_name().expect("tempdir has a name");
    Ok(parent.join(name))
}

fn run_container(
    env: &ProbeEnv<'_>,
    dir: &HostDir,
    id: &str,
    join: bool,
    idmap_dirs: &[HostDir],
) -> Result<Outcome, String> {
    let bundle_dir = dir.join("bundle");
    let state_dir = dir.join("state");
    for d in [&dir.local, &bundle_dir.local, &state_dir.local] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    // Kept alive until the runtime has exited: its namespaces are what the probe joins.
    let holder = if join {
        Some(NamespaceHolder::spawn(env.uid, env.gid).map_err(|e| format!("pre-creating namespaces: {e}"))?)
    } else {
        None
    };
    let (namespaces, expected_ns) = match &holder {
        Some(h) => (
            Namespaces::Join {
                user: h.user_ns_path(),
                net: h.net_ns_path(),
            },
            Some(namespace_ids(h)?),
        ),
        None => (Namespaces::Create, None),
    };
    let idmap_mounts: Vec<IdmapMount> = idmap_dirs
        .iter()
        .enumerate()
        .map(|(i, d)| IdmapMount {
            source: d.host.clone(),
            target: format!("{IDMAP_TARGET}/{i}"),
        })
        .collect();
    let extra_args = idmap_mounts
        .iter()
        .flat_map(|m| ["--idmap-dir".to_owned(), m.target.clone()])
        .collect();
    let opts = BundleOptions {
        uid: env.uid,
        gid: env.gid,
        namespaces,
        mount_label: env.mount_label.map(str::to_owned),
        payload: env.payload.clone(),
        payload_extra_args: extra_args,
        idmap_mounts,
        mirror: env.mirror.to_vec(),
    };
    bundle::write(&bundle_dir.local, &opts).map_err(|e| e.to_string())?;

    let result = env
        .runtime
        .run(&state_dir.host, &bundle_dir.host, id, env.timeout);
    drop(holder);
    Ok(match result {
        Ok(out) if out.status.success() => {
            let stdout = out.stdout_lossy();
            match stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Observation>(l).ok())
            {
                Some(observation) => Outcome::Observed {
                    observation: Box::new(observation),
                    expected_ns,
                    written: idmap_dirs.iter().map(|d| written(&d.local)).collect(),
                },
                None => Outcome::NoObservation {
                    stdout,
                    stderr: out.stderr_lossy(),
                },
            }
        }
        Ok(out) => {
            let text = ProcessError::Failed {
                program: env.runtime.binary.clone(),
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            };
            Outcome::RuntimeFailed {
                status: format!("{:?}", out.status),
                text: text.output_text(),
            }
        }
        Err(e @ ProcessError::Timeout { .. }) => Outcome::Timeout {
            timeout: env.timeout,
            text: e.output_text(),
        },
        Err(e) => Outcome::Setup(e.to_string()),
    })
}

/// The identity of the holder's namespaces, as the payload will report its own.
fn namespace_ids(holder: &NamespaceHolder) -> Result<NamespaceIds, String> {
    let ino = |p: std::path::PathBuf| {
        fs::metadata(&p)
            .map(|m| m.ino())
            .map_err(|e| format!("stat {}: {e}", p.display()))
    };
    Ok(NamespaceIds {
        user: ino(holder.user_ns_path())?,
        net: ino(holder.net_ns_path())?,
    })
}

/// A small tmpfs mounted for the `idmap-mount` probe (projected volumes are tmpfs, and
/// tmpfs idmaps need Linux 6.3+); unmounted when dropped.
#[derive(Debug)]
pub struct TmpfsMount {
    dir: HostDir,
}

impl TmpfsMount {
    pub fn mount(dir: HostDir) -> Result<TmpfsMount, String> {
        use nix::mount::{mount, MsFlags};
        fs::create_dir_all(&dir.local).map_err(|e| format!("creating {}: {e}", dir.host.display()))?;
        mount(
            Some("tmpfs"),
            &dir.local,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=1m,mode=0755"),
        )
        .map_err(|e| format!("mounting a tmpfs at {}: {e}", dir.host.display()))?;
        Ok(TmpfsMount { dir })
    }

    pub fn dir(&self) -> &HostDir {
        &self.dir
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir.local, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.dir.local);
    }
}

/// What the host sees of the file the payload wrote in `dir`, never following a symlink.
fn written(dir: &Path) -> Written {
    match fs::symlink_metadata(dir.join(payload::IDMAP_WRITTEN_FILE)) {
        Err(_) => Written::Nothing,
        Ok(m) if m.file_type().is_file() => Written::File { host_uid: m.uid() },
        Ok(_) => Written::NotAFile,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_side_of_the_idmap_probe_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(written(dir.path()), Written::Nothing);
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(payload::IDMAP_WRITTEN_FILE)).unwrap();
        assert_eq!(
            written(dir.path()),
            Written::NotAFile,
            "/etc/passwd is owned by 0 too"
        );
        fs::remove_file(dir.path().join(payload::IDMAP_WRITTEN_FILE)).unwrap();
        fs::write(dir.path().join(payload::IDMAP_WRITTEN_FILE), "x").unwrap();
        assert_eq!(
            written(dir.path()),
            Written::File {
                host_uid: nix::unistd::geteuid().as_raw()
            }
        );
    }

    #[test]
    fn probe_dirs_are_not_world_writable() {
        let parent = tempfile::tempdir().unwrap();
        let host = HostDir {
            local: parent.path().to_owned(),
            host: "/var/lib/kubelet".into(),
        };
        let d = probe_dir(&host).unwrap();
        assert_eq!(
            fs::metadata(&d.local).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            d.host.to_string_lossy().starts_with("/var/lib/kubelet/ug-"),
            "{}",
            d.host.display()
        );
    }
}
