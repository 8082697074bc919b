//! OCI bundles for probe containers.
//!
//! A probe bundle looks like a Kubernetes user-namespace pod container as containerd would
//! hand it to the runtime: its own pid, ipc, uts and mount namespaces, a user namespace with a
//! 65536-id mapping (created by the runtime, or joined by path together with a netns owned
//! by it), proc, sysfs, mqueue and a tmpfs `/dev`, and `linux.mountLabel` on SELinux nodes.
//!
//! No image is pulled: the rootfs is an empty skeleton in which the host's library
//! directories are bind-mounted read-only, and the payload is this project's own binary.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxIdMapping, LinuxIdMappingBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::userns::IdMapping;

/// Where the payload binary appears inside the container.
pub const PAYLOAD_PATH: &str = "/.usernsguard/probe";
/// Under which directory the `idmap-mount` check mounts its host directories.
pub const IDMAP_TARGET: &str = "/mnt/idmap";

/// One host directory bind-mounted with the pod's id mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdmapMount {
    /// The directory, as a path on the host.
    pub source: PathBuf,
    /// Where it appears in the container (under [`IDMAP_TARGET`]).
    pub target: String,
}

/// The program run inside the probe container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The binary on the host; bind-mounted read-only at [`PAYLOAD_PATH`].
    pub host_path: PathBuf,
    /// Arguments after argv[0], e.g. `["__probe-payload"]` for the `usernsguard` binary.
    pub args: Vec<String>,
}

/// How the probe gets its user (and network) namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// The runtime creates both from the config's mappings.
    Create,
    /// The runtime joins namespaces created beforehand (containerd 2.x).
    Join { user: PathBuf, net: PathBuf },
}

/// One top-level host directory mirrored into the rootfs so the payload finds its libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorEntry {
    /// The host has a symlink here (merged /usr: `/lib -> usr/lib`); recreate it.
    Symlink { name: String, target: PathBuf },
    /// The host has a directory here; bind-mount it read-only.
    Bind { name: String },
}

/// Everything that varies between probe bundles.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    pub uid: IdMapping,
    pub gid: IdMapping,
    pub namespaces: Namespaces,
    pub mount_label: Option<String>,
    pub payload: Payload,
    /// Extra payload arguments for this probe.
    pub payload_extra_args: Vec<String>,
    /// Host directories to bind-mount with an idmap.
    pub idmap_mounts: Vec<IdmapMount>,
    pub mirror: Vec<MirrorEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("building the OCI spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Save {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Decides how the host's top-level library directories appear in the probe rootfs;
/// `host_root` is where this process sees the host's `/`.
pub fn host_mirror(host_root: &Path) -> Vec<MirrorEntry> {
    ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"]
        .into_iter()
        .filter_map(|name| {
            let path = host_root.join(name);
            let meta = fs::symlink_metadata(&path).ok()?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).ok()?;
                Some(MirrorEntry::Symlink {
                    name: name.to_owned(),
                    target,
                })
            } else if meta.is_dir() {
                Some(MirrorEntry::Bind {
                    name: name.to_owned(),
                })
            } else {
                None
            }
        })
        .collect()
}

fn id_mapping(m: IdMapping) -> Result<LinuxIdMapping, oci_spec::OciSpecError> {
    LinuxIdMappingBuilder::default()
        .container_id(m.container_id)
        .host_id(m.host_id)
        .size(m.size)
        .build()
}

fn mount(
    dest: &str,
    typ: &str,
    source: impl Into<PathBuf>,
    options: &[&str],
) -> Result<Mount, oci_spec::OciSpecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source.into())
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
}

fn namespace(typ: LinuxNamespaceType, path: Option<&Path>) -> Result<LinuxNamespace, oci_spec::OciSpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p);
    }
    b.build()
}

/// The probe's OCI spec. Pure: everything host-specific comes in through `opts`.
pub fn spec(opts: &BundleOptions) -> Result<Spec, BundleError> {
    let mut args = vec![PAYLOAD_PATH.to_owned()];
    args.extend(opts.payload.args.iter().cloned());
    args.extend(opts.payload_extra_args.iter().cloned());
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args)
        .env(vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned()])
        .cwd("/")
        .no_new_privileges(true)
        .build()?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"])?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", "size=1m"],
        )?,
    ];
    for entry in &opts.mirror {
        if let MirrorEntry::Bind { name } = entry {
            let dest = format!("/{name}");
            mounts.push(mount(
                &dest,
                "bind",
                format!("/{name}"),
                &["rbind", "ro", "nosuid", "nodev"],
            )?);
        }
    }
    mounts.push(mount(
        PAYLOAD_PATH,
        "bind",
        &opts.payload.host_path,
        &["bind", "ro", "nosuid", "nodev"],
    )?);
    for idmap in &opts.idmap_mounts {
        let mut m = mount(
            &idmap.target,
            "bind",
            &idmap.source,
            &["rbind", "idmap", "nosuid", "nodev"],
        )?;
        m.set_uid_mappings(Some(vec![id_mapping(opts.uid)?]));
        m.set_gid_mappings(Some(vec![id_mapping(opts.gid)?]));
        mounts.push(m);
    }

    let (user_path, net_path) = match &opts.namespaces {
        Namespaces::Create => (None, None),
        Namespaces::Join { user, net } => (Some(user.as_path()), Some(net.as_path())),
    };
    let namespaces = vec![
        namespace(LinuxNamespaceType::Pid, None)?,
        namespace(LinuxNamespaceType::Ipc, None)?,
        namespace(LinuxNamespaceType::Uts, None)?,
        namespace(LinuxNamespaceType::Mount, None)?,
        namespace(LinuxNamespaceType::Network, net_path)?,
        namespace(LinuxNamespaceType::User, user_path)?,
    ];
    let mut linux = LinuxBuilder::default()
        .uid_mappings(vec![id_mapping(opts.uid)?])
        .gid_mappings(vec![id_mapping(opts.gid)?])
        .namespaces(namespaces)
        .masked_paths(oci_spec::runtime::get_default_maskedpaths())
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .build()?;
    if let Some(label) = &opts.mount_label {
        linux.set_mount_label(Some(label.clone()));
    }

    Ok(SpecBuilder::default()
        .version("1.0.2-dev")
        .root(RootBuilder::default().path("rootfs").readonly(true).build()?)
        .hostname("usernsguard-probe")
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()?)
}

/// Writes `config.json` and the rootfs skeleton into `dir`.
///
/// Every mount point exists beforehand and every directory is world-searchable: inside a
/// user namespace the container's root is an unprivileged host uid that can neither
/// create mount points in a root-owned rootfs nor traverse a 0700 temp directory.
pub fn write(dir: &Path, opts: &BundleOptions) -> Result<(), BundleError> {
    let rootfs = dir.join("rootfs");
    let mut dirs: Vec<PathBuf> = ["proc", "sys", "dev", "tmp", ".usernsguard"]
        .iter()
        .map(|d| rootfs.join(d))
        .collect();
    dirs.extend(
        opts.idmap_mounts
            .iter()
            .map(|m| rootfs.join(m.target.trim_start_matches('/'))),
    );
    for entry in &opts.mirror {
        match entry {
            MirrorEntry::Bind { name } => dirs.push(rootfs.join(name)),
            MirrorEntry::Symlink { name, target } => {
                fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
                let link = rootfs.join(name);
                symlink(target, &link).map_err(io_err(&link))?;
            }
        }
    }
    for d in &dirs {
        fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let payload = rootfs.join(PAYLOAD_PATH.trim_start_matches('/'));
    fs::write(&payload, b"").map_err(io_err(&payload))?;
    for d in [dir, rootfs.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_err(d))?;
    }
    let config = dir.join("config.json");
    spec(opts)?
        .save(&config)
        .map_err(|source| BundleError::Save { path: config, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(namespaces: Namespaces) -> BundleOptions {
        BundleOptions {
            uid: IdMapping::pod(100_000),
            gid: IdMapping::pod(100_000),
            namespaces,
            mount_label: None,
            payload: Payload {
                host_path: "/usr/bin/usernsguard".into(),
                args: vec!["__probe-payload".into()],
            },
            payload_extra_args: vec![],
            idmap_mounts: vec![],
            mirror: vec![
                MirrorEntry::Bind { name: "usr".into() },
                MirrorEntry::Symlink {
                    name: "lib".into(),
                    target: "usr/lib".into(),
                },
            ],
        }
    }

    fn json(o: &BundleOptions) -> serde_json::Value {
        serde_json::to_value(spec(o).unwrap()).unwrap()
    }

    #[test]
    fn created_userns_has_mappings_and_fresh_namespaces() {
        let v = json(&opts(Namespaces::Create));
        assert_eq!(v["linux"]["uidMappings"][0]["hostID"], 100_000);
        assert_eq!(v["linux"]["uidMappings"][0]["size"], 65536);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().all(|n| n.get("path").is_none()));
        assert!(ns.iter().any(|n| n["type"] == "user"));
        assert!(ns.iter().any(|n| n["type"] == "network"));
        assert!(v["linux"].get("mountLabel").is_none());
        assert_eq!(
            v["process"]["args"],
            serde_json::json!([PAYLOAD_PATH, "__probe-payload"])
        );
        let dests: Vec<_> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].clone())
            .collect();
        for d in ["/proc", "/sys", "/dev/mqueue", "/usr", PAYLOAD_PATH] {
            assert!(dests.contains(&serde_json::json!(d)), "missing {d}");
        }
        assert!(
            !dests.contains(&serde_json::json!("/lib")),
            "symlinked dirs are not mounted"
        );
    }

    #[test]
    fn joined_namespaces_are_passed_by_path_with_matching_maps_and_label() {
        let mut o = opts(Namespaces::Join {
            user: "/proc/42/ns/user".into(),
            net: "/proc/42/ns/net".into(),
        });
        o.mount_label = Some("system_u:object_r:container_file_t:s0".into());
        let v = json(&o);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let path_of = |t: &str| ns.iter().find(|n| n["type"] == t).unwrap().get("path").cloned();
        assert_eq!(path_of("user"), Some(serde_json::json!("/proc/42/ns/user")));
        assert_eq!(path_of("network"), Some(serde_json::json!("/proc/42/ns/net")));
        assert_eq!(
            path_of("ipc"),
            None,
            "ipc must be new: that is where mqueue's owner is decided"
        );
        assert_eq!(v["linux"]["uidMappings"][0]["hostID"], 100_000);
        assert_eq!(v["linux"]["mountLabel"], "system_u:object_r:container_file_t:s0");
    }

    #[test]
    fn idmap_mount_carries_the_pod_mapping() {
        let mut o = opts(Namespaces::Create);
        o.idmap_mounts = vec![IdmapMount {
            source: "/run/x/idmap".into(),
            target: format!("{IDMAP_TARGET}/disk"),
        }];
        o.payload_extra_args = vec!["--idmap-dir".into(), format!("{IDMAP_TARGET}/disk")];
        let v = json(&o);
        let m = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/mnt/idmap/disk")
            .unwrap();
        assert_eq!(m["source"], "/run/x/idmap");
        assert!(m["options"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("idmap")));
        assert_eq!(m["uidMappings"][0]["hostID"], 100_000);
        assert_eq!(m["gidMappings"][0]["containerID"], 0);
        assert_eq!(v["process"]["args"][3], "/mnt/idmap/disk");
    }

    #[test]
    fn write_creates_mount_points_and_searchable_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(Namespaces::Create);
        o.idmap_mounts = vec![IdmapMount {
            source: "/x".into(),
            target: "/mnt/idmap/tmpfs".into(),
        }];
        write(dir.path(), &o).unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["proc", "sys", "dev", "usr", "mnt/idmap/tmpfs"] {
            assert!(rootfs.join(d).is_dir(), "{d}");
        }
        assert_eq!(
            fs::read_link(rootfs.join("lib")).unwrap(),
            PathBuf::from("usr/lib")
        );
        assert!(rootfs.join(PAYLOAD_PATH.trim_start_matches('/')).is_file());
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let spec = Spec::load(dir.path().join("config.json")).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("usernsguard-probe"));
    }

    #[test]
    fn host_mirror_reflects_symlinks_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("usr")).unwrap();
        symlink("usr/lib", dir.path().join("lib")).unwrap();
        let m = host_mirror(dir.path());
        assert_eq!(
            m,
            vec![
                MirrorEntry::Bind { name: "usr".into() },
                MirrorEntry::Symlink {
                    name: "lib".into(),
                    target: "usr/lib".into()
                }
            ]
        );
    }
}
