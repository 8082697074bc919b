//! Node facts that decide how probes run and how their results read: kernel release,
//! SELinux mode and mount label, LSMs, the user-namespace limit, the cgroup layout and
//! idmapped-mount support of the filesystems the kubelet and containerd use.
//!
//! Gathering reads files under injectable roots ([`HostPaths`]); deriving a fact from what
//! was read is a pure function, so the SELinux-enforcing path is tested on a machine whose
//! kernel cannot enable SELinux.

use std::fs;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::host::{HostDir, HostRoot};

/// Where the host's pseudo-filesystems and configuration live, as this process opens them.
/// Tests point these at a tempdir.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub proc: PathBuf,
    /// The host's mount table: the cgroup layout is read from it.
    pub mountinfo: PathBuf,
    pub sys: PathBuf,
    pub etc: PathBuf,
    pub dev: PathBuf,
    /// Directories whose filesystem's idmapped-mount support is reported when they exist.
    pub idmap_dirs: Vec<HostDir>,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths::of(&HostRoot::own())
    }
}

impl HostPaths {
    /// The host seen at `host`. Its mount table is its PID 1's: through a host root mount,
    /// `/proc/self` would be this process's (a container's) own.
    pub fn of(host: &HostRoot) -> HostPaths {
        HostPaths {
            proc: host.path("/proc"),
            mountinfo: if host.is_own() {
                "/proc/self/mountinfo".into()
            } else {
                host.path("/proc/1/mountinfo")
            },
            sys: host.path("/sys"),
            etc: host.path("/etc"),
            dev: host.path("/dev"),
            idmap_dirs: ["/var/lib/kubelet", "/var/lib/containerd"]
                .iter()
                .map(|d| host.dir(d))
                .collect(),
        }
    }
}

/// SELinux state as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SelinuxMode {
    Disabled,
    Permissive,
    Enforcing,
}

impl SelinuxMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            SelinuxMode::Disabled => "disabled",
            SelinuxMode::Permissive => "permissive",
            SelinuxMode::Enforcing => "enforcing",
        }
    }

    /// Whether a policy is loaded: runc's mqueue relabel fails whenever SELinux is enabled
    /// with a policy, permissive included (measured: the owner check is not an AVC).
    pub const fn enabled(self) -> bool {
        !matches!(self, SelinuxMode::Disabled)
    }
}

/// SELinux facts the `userns-joined` probe depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelinuxFacts {
    pub mode: SelinuxMode,
    /// `SELINUXTYPE` from `/etc/selinux/config`, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The label a container runtime would put on the container's mounts
    /// (`linux.mountLabel`), derived from the node's policy configuration or, failing that,
    /// from the label the loaded policy gives the host's own mqueue/tmpfs mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_label: Option<String>,
    /// Where `mount_label` came from, for the operator reading the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_label_source: Option<String>,
}

impl SelinuxFacts {
    pub fn disabled() -> Self {
        SelinuxFacts {
            mode: SelinuxMode::Disabled,
            policy: None,
            mount_label: None,
            mount_label_source: None,
        }
    }

    /// Enforcing with a given mount label: what tests and `--selinux-mount-label` inject.
    pub fn enforcing(mount_label: impl Into<String>) -> Self {
        SelinuxFacts {
            mode: SelinuxMode::Enforcing,
            policy: None,
            mount_label: Some(mount_label.into()),
            mount_label_source: Some("injected".into()),
        }
    }
}

/// How cgroups are mounted; crun refuses hybrid and v1 layouts unless given its own cgroup2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    V1,
    Hybrid,
    V2,
    Unknown,
}

impl CgroupMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            CgroupMode::V1 => "v1",
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::V2 => "v2",
            CgroupMode::Unknown => "unknown",
        }
    }
}

/// Idmapped-mount support of one directory's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilesystemIdmap {
    pub path: String,
    pub fs_type: String,
    /// `None` when the filesystem is not one whose support we know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idmap_supported: Option<bool>,
    pub note: String,
}

/// Everything about the node that a self-test result should be read against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    pub kernel: String,
    pub selinux: SelinuxFacts,
    /// Active LSMs in order (`/sys/kernel/security/lsm`); empty when securityfs is absent.
    #[serde(default)]
    pub lsms: Vec<String>,
    /// `user.max_user_namespaces`; 0 disables user namespaces outright.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Kubernetes knows no `uint64` format and warns about it when the CRD is applied.
    #[schemars(extend("format" = "int64"))]
    pub max_user_namespaces: Option<u64>,
    pub cgroup: CgroupMode,
    #[serde(default)]
    pub idmap_filesystems: Vec<FilesystemIdmap>,
}

impl NodeFacts {
    /// Reads the facts of the host described by `paths`. Missing files give "unknown"
    /// values, never an error: a fact we cannot read must not stop the probes.
    pub fn gather(paths: &HostPaths) -> NodeFacts {
        let kernel = read_trimmed(&paths.proc.join("sys/kernel/osrelease")).unwrap_or_default();
        let selinux = gather_selinux(paths);
        let lsms = read_trimmed(&paths.sys.join("kernel/security/lsm"))
            .map(|s| {
                s.split(',')
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let max_user_namespaces =
            read_trimmed(&paths.proc.join("sys/user/max_user_namespaces")).and_then(|s| s.parse().ok());
        let cgroup = read_trimmed(&paths.mountinfo)
            .map(|m| cgroup_mode(&m, &paths.sys.join("fs/cgroup")))
            .unwrap_or(CgroupMode::Unknown);
        let idmap_filesystems = paths
            .idmap_dirs
            .iter()
            .filter(|d| d.local.exists())
            .map(|d| filesystem_idmap(d, &kernel))
            .collect();
        NodeFacts {
            kernel,
            selinux,
            lsms,
            max_user_namespaces,
            cgroup,
            idmap_filesystems,
        }
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn gather_selinux(paths: &HostPaths) -> SelinuxFacts {
    let enforce = read_trimmed(&paths.sys.join("fs/selinux/enforce"));
    let config = fs::read_to_string(paths.etc.join("selinux/config")).ok();
    let policy = config.as_deref().and_then(selinux_policy_type);
    let lxc_contexts = policy.as_deref().and_then(|p| {
        fs::read_to_string(paths.etc.join("selinux").join(p).join("contexts/lxc_contexts")).ok()
    });
    let host_labels = ["mqueue", "shm"]
        .iter()
        .map(|d| paths.dev.join(d))
        .find_map(|p| selinux_xattr(&p).map(|l| (l, p)));
    let context_file = paths.sys.join("fs/selinux/context");
    let valid = |label: &str| selinux_context_valid(&context_file, label);
    derive_selinux(
        enforce.as_deref(),
        policy,
        lxc_contexts.as_deref(),
        host_labels,
        valid,
    )
}

/// Asks the loaded policy whether `label` is a valid context: writing it to selinuxfs's
/// `context` file fails with EINVAL when the policy does not define its type.
///
/// Needed because a distribution's `lxc_contexts` can name a type its policy lacks (Debian
/// 12's refpolicy says `container_file_t`, which it does not define); a mount with that label
/// fails for every runtime with EINVAL, which would hide the failure we look for.
fn selinux_context_valid(context_file: &Path, label: &str) -> bool {
    use std::io::Write;
    let mut bytes = label.as_bytes().to_vec();
    bytes.push(0);
    // Never create the file: outside selinuxfs there is no policy to ask.
    fs::OpenOptions::new()
        .write(true)
        .open(context_file)
        .and_then(|mut f| f.write_all(&bytes))
        .is_ok()
}

/// The SELinux facts implied by what the host files say; pure so every mode is testable.
pub fn derive_selinux(
    enforce: Option<&str>,
    policy: Option<String>,
    lxc_contexts: Option<&str>,
    host_mount_label: Option<(String, PathBuf)>,
    policy_accepts: impl Fn(&str) -> bool,
) -> SelinuxFacts {
    let mode = match enforce {
        None => return SelinuxFacts::disabled(),
        Some("1") => SelinuxMode::Enforcing,
        Some(_) => SelinuxMode::Permissive,
    };
    let configured = lxc_contexts
        .and_then(lxc_file_context)
        .filter(|l| policy_accepts(l));
    let (mount_label, mount_label_source) = if let Some(label) = configured {
        let src = format!(
            "/etc/selinux/{}/contexts/lxc_contexts",
            policy.as_deref().unwrap_or("?")
        );
        (Some(label), Some(src))
    } else if let Some((label, path)) = host_mount_label {
        (
            Some(label),
            Some(format!("security.selinux of {}", path.display())),
        )
    } else {
        (None, None)
    };
    SelinuxFacts {
        mode,
        policy,
        mount_label,
        mount_label_source,
    }
}

/// `SELINUXTYPE=` from `/etc/selinux/config`.
fn selinux_policy_type(config: &str) -> Option<String> {
    config.lines().find_map(|l| {
        let v = l.trim().strip_prefix("SELINUXTYPE=")?.trim().trim_matches('"');
        (!v.is_empty()).then(|| v.to_owned())
    })
}

/// The `file = "..."` entry of lxc_contexts: the label container-selinux gives container
/// files, and the one containerd and CRI-O pass as `linux.mountLabel`.
fn lxc_file_context(contents: &str) -> Option<String> {
    contents.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "file")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
    })
}

fn selinux_xattr(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = c"security.selinux";
    let mut buf = [0u8; 512];
    // SAFETY: both strings are NUL-terminated and live across the call; `buf` is a valid
    // writable buffer of the length passed.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    let label = String::from_utf8_lossy(&buf[..n as usize])
        .trim_end_matches('\0')
        .to_owned();
    (!label.is_empty()).then_some(label)
}

/// Classifies the cgroup layout from `/proc/self/mountinfo`.
pub fn cgroup_mode(mountinfo: &str, cgroup_root: &Path) -> CgroupMode {
    let root = cgroup_root.to_string_lossy();
    let mut v1 = false;
    let mut v2_at_root = false;
    let mut v2_elsewhere = false;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = pre.split(' ').nth(4).unwrap_or("");
        let fstype = post.split(' ').next().unwrap_or("");
        if !mount_point.starts_with(root.as_ref()) {
            continue;
        }
        match fstype {
            "cgroup2" if mount_point == root => v2_at_root = true,
            "cgroup2" => v2_elsewhere = true,
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    match (v1, v2_at_root, v2_elsewhere) {
        (false, true, _) => CgroupMode::V2,
        (true, _, true) => CgroupMode::Hybrid,
        (true, _, false) => CgroupMode::V1,
        _ => CgroupMode::Unknown,
    }
}

/// The filesystem magic number (`statfs(2)` `f_type`) of the filesystem holding `path`.
///
/// `f_type` is a signed `__fsword_t` in glibc and an unsigned long in musl; every magic
/// number fits 32 bits, so both read the same as `u64`.
pub fn fs_magic(path: &Path) -> nix::Result<u64> {
    let raw = nix::sys::statfs::statfs(path)?.filesystem_type().0;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)] // a no-op on musl only
    Ok(raw as u64)
}

/// The name of the filesystem holding `path` (`ext4`, `tmpfs`, ...), `unknown` when it
/// cannot be read.
pub fn fs_type(path: &Path) -> String {
    fs_magic(path)
        .map(|magic| fs_name(magic).to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn filesystem_idmap(dir: &HostDir, kernel: &str) -> FilesystemIdmap {
    let fs_type = fs_type(&dir.local);
    let (idmap_supported, note) = idmap_support(&fs_type, kernel);
    FilesystemIdmap {
        path: dir.host.display().to_string(),
        fs_type,
        idmap_supported,
        note,
    }
}

fn fs_name(magic: u64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0x4d44 => "vfat",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x5346_544e => "ntfs",
        _ => "other",
    }
}

/// Kernel version in which a filesystem gained idmapped-mount support (mainline).
pub fn idmap_support(fs_type: &str, kernel: &str) -> (Option<bool>, String) {
    let since = match fs_type {
        "ext4" | "xfs" | "vfat" => (5, 12),
        "btrfs" => (5, 15),
        "overlayfs" => (5, 19),
        "tmpfs" => (6, 3),
        "nfs" | "fuse" => return (Some(false), format!("{fs_type} has no idmapped-mount support")),
        _ => {
            return (
                None,
                format!("idmapped-mount support of {fs_type} is not known to usernsguard"),
            )
        }
    };
    match kernel_version(kernel) {
        Some(v) if v >= since => (
            Some(true),
            format!(
                "{fs_type} supports idmapped mounts since Linux {}.{}",
                since.0, since.1
            ),
        ),
        Some(_) => (
            Some(false),
            format!(
                "{fs_type} needs Linux {}.{}+ for idmapped mounts (kernel {kernel})",
                since.0, since.1
            ),
        ),
        None => (None, format!("cannot parse kernel release {kernel:?}")),
    }
}

/// `(major, minor)` of a kernel release such as `6.1.0-28-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selinux_disabled_when_selinuxfs_has_no_enforce_file() {
        let f = derive_selinux(None, Some("targeted".into()), Some("file = \"x\""), None, |_| {
            true
        });
        assert_eq!(f, SelinuxFacts::disabled());
    }

    #[test]
    fn selinux_enforcing_takes_mount_label_from_lxc_contexts_first() {
        let lxc = "process = \"system_u:system_r:container_t:s0\"\nfile = \"system_u:object_r:container_file_t:s0\"\n";
        let f = derive_selinux(
            Some("1"),
            Some("targeted".into()),
            Some(lxc),
            Some(("system_u:object_r:tmpfs_t:s0".into(), "/dev/mqueue".into())),
            |_| true,
        );
        assert_eq!(f.mode, SelinuxMode::Enforcing);
        assert_eq!(
            f.mount_label.as_deref(),
            Some("system_u:object_r:container_file_t:s0")
        );
        assert_eq!(
            f.mount_label_source.as_deref(),
            Some("/etc/selinux/targeted/contexts/lxc_contexts")
        );
    }

    #[test]
    fn selinux_falls_back_to_the_label_the_policy_gives_host_mqueue() {
        let f = derive_selinux(
            Some("0"),
            Some("default".into()),
            None,
            Some(("system_u:object_r:tmpfs_t:s0".into(), "/dev/mqueue".into())),
            |_| true,
        );
        assert_eq!(f.mode, SelinuxMode::Permissive);
        assert!(f.mode.enabled());
        assert_eq!(f.mount_label.as_deref(), Some("system_u:object_r:tmpfs_t:s0"));
        assert_eq!(
            f.mount_label_source.as_deref(),
            Some("security.selinux of /dev/mqueue")
        );
    }

    /// Debian 12's refpolicy: lxc_contexts names `container_file_t`, which the policy lacks.
    #[test]
    fn a_configured_label_the_policy_rejects_falls_back_to_the_host_mqueue_label() {
        let lxc = "file = \"system_u:object_r:container_file_t:s0\"\n";
        let f = derive_selinux(
            Some("1"),
            Some("default".into()),
            Some(lxc),
            Some(("system_u:object_r:tmpfs_t:s0".into(), "/dev/mqueue".into())),
            |l| !l.contains("container_file_t"),
        );
        assert_eq!(f.mount_label.as_deref(), Some("system_u:object_r:tmpfs_t:s0"));
        assert_eq!(
            f.mount_label_source.as_deref(),
            Some("security.selinux of /dev/mqueue")
        );
    }

    #[test]
    fn selinux_config_parsing() {
        assert_eq!(
            selinux_policy_type("# c\nSELINUX=enforcing\nSELINUXTYPE=default\n").as_deref(),
            Some("default")
        );
        assert_eq!(selinux_policy_type("SELINUX=enforcing\n"), None);
        assert_eq!(lxc_file_context("file=\"\"\n"), None);
    }

    #[test]
    fn cgroup_layouts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                      32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup_mode(hybrid, Path::new("/sys/fs/cgroup")),
            CgroupMode::Hybrid
        );
        let v2 = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_mode(v2, Path::new("/sys/fs/cgroup")), CgroupMode::V2);
        let v1 = "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup_mode(v1, Path::new("/sys/fs/cgroup")), CgroupMode::V1);
        assert_eq!(cgroup_mode("", Path::new("/sys/fs/cgroup")), CgroupMode::Unknown);
    }

    #[test]
    fn idmap_support_by_kernel_and_filesystem() {
        assert_eq!(idmap_support("tmpfs", "6.1.0-28-amd64").0, Some(false));
        assert_eq!(idmap_support("tmpfs", "6.3.0").0, Some(true));
        assert_eq!(idmap_support("ext4", "5.10.0").0, Some(false));
        assert_eq!(idmap_support("ext4", "6.18.44-fc-v657").0, Some(true));
        assert_eq!(idmap_support("other", "6.1").0, None);
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn gather_reads_injected_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        fs::create_dir_all(root.join("proc/sys/user")).unwrap();
        fs::create_dir_all(root.join("proc/self")).unwrap();
        fs::create_dir_all(root.join("sys/fs/selinux")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/security")).unwrap();
        fs::create_dir_all(root.join("etc/selinux/targeted/contexts")).unwrap();
        fs::write(root.join("proc/sys/kernel/osrelease"), "6.1.0-28-amd64\n").unwrap();
        fs::write(root.join("proc/sys/user/max_user_namespaces"), "0\n").unwrap();
        fs::write(root.join("sys/fs/selinux/enforce"), "1").unwrap();
        // Stands in for selinuxfs's context file, which accepts every label here.
        fs::write(root.join("sys/fs/selinux/context"), "").unwrap();
        fs::write(
            root.join("sys/kernel/security/lsm"),
            "lockdown,capability,selinux",
        )
        .unwrap();
        fs::write(root.join("etc/selinux/config"), "SELINUXTYPE=targeted\n").unwrap();
        fs::write(
            root.join("etc/selinux/targeted/contexts/lxc_contexts"),
            "file = \"a:b:c:s0\"\n",
        )
        .unwrap();
        let paths = HostPaths {
            proc: root.join("proc"),
            mountinfo: root.join("proc/self/mountinfo"),
            sys: root.join("sys"),
            etc: root.join("etc"),
            dev: root.join("dev"),
            idmap_dirs: vec![
                HostDir {
                    local: root.to_path_buf(),
                    host: "/var/lib/kubelet".into(),
                },
                HostDir {
                    local: root.join("absent"),
                    host: "/var/lib/containerd".into(),
                },
            ],
        };
        let facts = NodeFacts::gather(&paths);
        assert_eq!(facts.kernel, "6.1.0-28-amd64");
        assert_eq!(facts.max_user_namespaces, Some(0));
        assert_eq!(facts.lsms, ["lockdown", "capability", "selinux"]);
        assert_eq!(facts.selinux.mode, SelinuxMode::Enforcing);
        assert_eq!(facts.selinux.mount_label.as_deref(), Some("a:b:c:s0"));
        assert_eq!(facts.cgroup, CgroupMode::Unknown);
        assert_eq!(facts.idmap_filesystems.len(), 1, "absent dirs are not reported");
        assert_eq!(
            facts.idmap_filesystems[0].path, "/var/lib/kubelet",
            "named as the host names it"
        );
    }
}
