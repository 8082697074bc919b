//! The host's filesystem as this process sees it, and running the host's programs.
//!
//! In a cluster the agent runs in a container and sees the node at `--host-root` (the chart
//! mounts `/` at `/host`). Every host-facing step must act on the node, not on the agent's
//! image: the CRI configuration, the runtime binaries the CRI runtime would execute (with
//! the node's libraries), node facts, and the probes themselves.
//!
//! Two ways were possible: enter the host's mount namespace (`setns` on PID 1's `ns/mnt`),
//! or run against the host root mount. We run against the mount, because:
//! - it needs no `hostPID`: the agent's PID namespace is a child of the host's, and a
//!   private procfs mounted for each host program keeps `/proc/<pid>/ns/*` paths (the
//!   namespace holder's) meaning the same to the runtime as to us;
//! - it is testable without a second machine: a test builds a directory that looks like a
//!   host with a different runc and points `--host-root` at it;
//! - the node's paths are read as files by this process and only programs are run inside
//!   the host view, so a bug cannot leave this process itself in the host's namespaces.
//!
//! Host programs run in a child that unshares its mount namespace and `pivot_root`s into
//! the host root before `exec` (not `chroot`: the kernel refuses `CLONE_NEWUSER` to a
//! chrooted process, and runtimes create user namespaces). Paths given to them are host
//! paths; [`HostRoot::path`] turns a host path into the one this process opens.
//!
//! A host root may also be `/proc/<pid>/root` of a process in another mount namespace
//! (a container's init, PID 1 seen with `hostPID`). Its files open fine through that
//! magic link, but two things differ: `readlink` (so `canonicalize`) reads it back as `/`,
//! which would silently make the host this process's own root; and its mounts are not in
//! this process's namespace, so the kernel refuses to bind-mount them (`EINVAL`) for the
//! `pivot_root`. Such a root is kept as given, and its programs run in a copy of that
//! process's mount namespace instead (`setns`, then `unshare`).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The `PATH` the CRI runtimes' service units run with on common distributions; used to
/// find a runtime the configuration names without a path, as the CRI runtime would.
pub const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where this process sees the host's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
    /// Set when `root` is `/proc/<pid>/root[/<inner>]` of a process in another mount
    /// namespace.
    foreign: Option<ForeignRoot>,
}

/// A host root in another mount namespace, entered by `setns` rather than bind-mounted.
/// The process's root is taken to be its namespace's root, as a container's init's is
/// (`setns` starts at the namespace's root, not at a `chroot` inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForeignRoot {
    /// `/proc/<pid>/ns/mnt`.
    mnt_ns: PathBuf,
    /// The host root inside that namespace (`/` for `/proc/<pid>/root` itself).
    inner: PathBuf,
}

/// A directory on the host: where this process opens it, and what the host (and the
/// programs run there) call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDir {
    /// The path this process uses.
    pub local: PathBuf,
    /// The same directory as a path on the host.
    pub host: PathBuf,
}

impl HostDir {
    pub fn join(&self, rel: impl AsRef<Path>) -> HostDir {
        HostDir {
            local: self.local.join(rel.as_ref()),
            host: self.host.join(rel.as_ref()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host root {path} is not a directory: {source}")]
    NotADirectory { path: PathBuf, source: io::Error },
    #[error("host root {0} must be an absolute path")]
    Relative(PathBuf),
}

impl Default for HostRoot {
    fn default() -> Self {
        HostRoot::own()
    }
}

impl HostRoot {
    /// This process's own root: the host is where we run.
    pub fn own() -> HostRoot {
        HostRoot {
            root: PathBuf::from("/"),
            foreign: None,
        }
    }

    /// The host mounted at `root` (e.g. `/host`), or the root of a process in another mount
    /// namespace (`/proc/<pid>/root`).
    pub fn at(root: impl Into<PathBuf>) -> Result<HostRoot, HostError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(HostError::Relative(root));
        }
        std::fs::read_dir(&root).map_err(|source| HostError::NotADirectory {
            path: root.clone(),
            source,
        })?;
        if let Some(foreign) = foreign_root(&root) {
            return Ok(HostRoot {
                root,
                foreign: Some(foreign),
            });
        }
        // Canonical names compare and print better, but only a name for the same
        // directory will do: a magic link into a place this process cannot name reads
        // back as something else (`/proc/<pid>/root` of a chrooted process, say).
        let root = match root.canonicalize() {
            Ok(c) if same_file(&c, &root) => c,
            _ => root,
        };
        Ok(HostRoot { root, foreign: None })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the host is this process's own root (no translation, no pivot).
    pub fn is_own(&self) -> bool {
        self.foreign.is_none() && self.root == Path::new("/")
    }

    /// The path this process opens for the host path `host_path` (absolute or not, taken
    /// from the host's `/`).
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let rel = host_path.as_ref().strip_prefix("/").unwrap_or(host_path.as_ref());
        if rel.as_os_str().is_empty() {
            return self.root.clone();
        }
        self.root.join(rel)
    }

    /// A host directory under both names.
    pub fn dir(&self, host_path: impl AsRef<Path>) -> HostDir {
        HostDir {
            local: self.path(host_path.as_ref()),
            host: host_path.as_ref().to_path_buf(),
        }
    }

    /// Resolves `host_path` as the host would (symlinks, absolute ones included, stay
    /// inside the host root) and returns the resolved host path, if it exists.
    pub fn resolve(&self, host_path: &Path) -> Option<PathBuf> {
        let mut resolved = PathBuf::from("/");
        let mut pending: Vec<PathBuf> = vec![host_path.to_path_buf()];
        let mut hops = 0;
        while let Some(path) = pending.pop() {
            let mut comps: Vec<Component> = path.components().collect();
            comps.reverse();
            while let Some(c) = comps.pop() {
                match c {
                    Component::RootDir => resolved = PathBuf::from("/"),
                    Component::CurDir | Component::Prefix(_) => {}
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => {
                        let candidate = resolved.join(name);
                        let local = self.path(&candidate);
                        let meta = std::fs::symlink_metadata(&local).ok()?;
                        if meta.file_type().is_symlink() {
                            hops += 1;
                            if hops > 40 {
                                return None;
                            }
                            let target = std::fs::read_link(&local).ok()?;
                            let rest: PathBuf = comps.iter().rev().collect();
                            comps.clear();
                            pending.push(rest);
                            pending.push(target);
                        } else {
                            resolved = candidate;
                        }
                    }
                }
            }
        }
        Some(resolved)
    }

    /// Finds the executable `name` on a `PATH`-like list of host directories, as a program
    /// on the host would; returns its host path.
    pub fn find_on_path(&self, name: &str, path: &str) -> Option<PathBuf> {
        if name.contains('/') {
            let p = Path::new(name);
            return self.is_executable(p).then(|| p.to_path_buf());
        }
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .find(|p| self.is_executable(p))
    }

    /// Whether `host_path` is an executable regular file on the host.
    pub fn is_executable(&self, host_path: &Path) -> bool {
        self.resolve(host_path)
            .and_then(|p| std::fs::metadata(self.path(p)).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }

    /// A command that runs `program` (a host path) with the host's root as `/` and a procfs
    /// of this process's PID namespace at `/proc`.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if self.is_own() {
            return cmd;
        }
        let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL");
        let (mnt_ns, root) = match &self.foreign {
            Some(f) => (Some(cstr(&f.mnt_ns)), cstr(&f.inner)),
            None => (None, cstr(&self.root)),
        };
        // SAFETY: `enter_root` makes raw syscalls only, with strings allocated before
        // the fork; it is async-signal-safe.
        unsafe { cmd.pre_exec(move || enter_root(mnt_ns.as_deref(), &root)) };
        cmd
    }
}

/// `/proc/<pid>/root[/<inner>]` of a process in another mount namespace than ours.
fn foreign_root(root: &Path) -> Option<ForeignRoot> {
    let mut comps = root.components();
    if comps.next() != Some(Component::RootDir) || comps.next() != Some(Component::Normal("proc".as_ref())) {
        return None;
    }
    let pid = comps.next()?.as_os_str().to_str()?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if comps.next() != Some(Component::Normal("root".as_ref())) {
        return None;
    }
    let mut inner = PathBuf::from("/");
    for c in comps {
        match c {
            Component::Normal(n) => inner.push(n),
            Component::CurDir => {}
            // `..` under a magic link means what the link's target says: not ours to guess.
            _ => return None,
        }
    }
    let mnt_ns = Path::new("/proc").join(pid).join("ns/mnt");
    if same_file(&mnt_ns, Path::new("/proc/self/ns/mnt")) {
        return None;
    }
    Some(ForeignRoot { mnt_ns, inner })
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Runs in the forked child before exec: a private mount namespace whose root is the host
/// root, with a fresh procfs so that PIDs read the same as in this process. With `mnt_ns`
/// the private namespace is a copy of that one (whose root `setns` makes ours), and `root`
/// is a path in it.
fn enter_root(mnt_ns: Option<&CStr>, root: &CStr) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: raw syscalls on NUL-terminated strings that live across the calls.
    unsafe {
        if let Some(ns) = mnt_ns {
            let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let joined = check(libc::setns(fd, libc::CLONE_NEWNS));
            libc::close(fd);
            joined?;
        }
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        // In a joined namespace whose root is the host root, `setns` made it ours already
        // (and `pivot_root` refuses the current root as the new one).
        if mnt_ns.is_none() || root.to_bytes() != b"/" {
            check(libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::chdir(root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        }
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_host() -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["usr/bin", "usr/local/sbin", "opt/rt", "etc"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let exe = dir.path().join("opt/rt/runc");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("usr/bin/not-exec"), "").unwrap();
        // An absolute symlink: on the host it points into the host, not into our root.
        symlink("/opt/rt/runc", dir.path().join("usr/local/sbin/runc")).unwrap();
        symlink("/opt/rt/missing", dir.path().join("usr/bin/dangling")).unwrap();
        symlink("bin", dir.path().join("usr/sbin")).unwrap();
        let host = HostRoot::at(dir.path()).unwrap();
        (dir, host)
    }

    #[test]
    fn host_paths_translate_and_symlinks_resolve_inside_the_host() {
        let (dir, host) = fake_host();
        assert!(!host.is_own());
        let root = dir.path().canonicalize().unwrap();
        assert_eq!(host.path("/etc/crio"), root.join("etc/crio"));
        assert_eq!(host.path("/"), root);
        assert_eq!(
            host.resolve(Path::new("/usr/local/sbin/runc")),
            Some(PathBuf::from("/opt/rt/runc"))
        );
        assert_eq!(
            host.resolve(Path::new("/usr/sbin/not-exec")),
            Some(PathBuf::from("/usr/bin/not-exec"))
        );
        assert_eq!(host.resolve(Path::new("/usr/bin/dangling")), None);
        assert_eq!(
            host.find_on_path("runc", SERVICE_PATH),
            Some(PathBuf::from("/usr/local/sbin/runc")),
            "found where the host's PATH finds it, named by the host's path"
        );
        assert_eq!(host.find_on_path("not-exec", SERVICE_PATH), None);
        assert_eq!(host.find_on_path("crun", SERVICE_PATH), None);
        let d = host.dir("/run/usernsguard").join("h0");
        assert_eq!(d.host, PathBuf::from("/run/usernsguard/h0"));
        assert_eq!(d.local, root.join("run/usernsguard/h0"));
    }

    /// A process in a mount namespace of its own (and a user namespace, so that no root
    /// is needed) with a tmpfs over `dir` that only it sees, holding `dir/marker`.
    struct OtherMountNs(std::process::Child);

    impl OtherMountNs {
        fn start(dir: &Path) -> OtherMountNs {
            use std::io::BufRead;
            let mut child = Command::new("unshare")
                .args(["--user", "--map-root-user", "--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount -t tmpfs ug-test "$0" && echo inside > "$0/marker" && echo ready && exec sleep 60"#)
                .arg(dir)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run unshare (util-linux)");
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready", "unshare --user --mount failed");
            OtherMountNs(child)
        }
    }

    impl Drop for OtherMountNs {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_root_in_another_mount_namespace_is_kept_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let other = OtherMountNs::start(dir.path());
        let proc_root = PathBuf::from(format!("/proc/{}/root", other.0.id()));
        let marker = dir.path().join("marker");
        assert!(!marker.exists(), "the tmpfs is not in our mount namespace");

        // `/proc/<pid>/root` reads back as "/" here: canonicalizing it would make the host
        // this process's own root.
        let host = HostRoot::at(&proc_root).unwrap();
        assert!(!host.is_own());
        assert_eq!(host.root(), proc_root);
        assert_eq!(
            host.path(&marker),
            proc_root.join(marker.strip_prefix("/").unwrap())
        );
        assert_eq!(std::fs::read_to_string(host.path(&marker)).unwrap(), "inside\n");
        assert_eq!(
            host.foreign,
            Some(ForeignRoot {
                mnt_ns: PathBuf::from(format!("/proc/{}/ns/mnt", other.0.id())),
                inner: PathBuf::from("/"),
            })
        );

        // A directory below it: the same namespace, entered at that directory.
        let below = HostRoot::at(proc_root.join(dir.path().strip_prefix("/").unwrap())).unwrap();
        assert_eq!(
            std::fs::read_to_string(below.path("/marker")).unwrap(),
            "inside\n"
        );
        assert_eq!(below.foreign.as_ref().unwrap().inner, dir.path());

        // Our own root through /proc is our own root.
        let me = HostRoot::at(format!("/proc/{}/root", std::process::id())).unwrap();
        assert!(me.is_own(), "{me:?}");
        assert!(HostRoot::at("/proc/self/root").unwrap().is_own());
    }

    #[test]
    fn own_root_is_identity_and_bad_roots_are_named() {
        let own = HostRoot::own();
        assert!(own.is_own());
        assert_eq!(own.path("/usr/sbin/runc"), PathBuf::from("/usr/sbin/runc"));
        let err = HostRoot::at("/nonexistent/host").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/host"), "{err}");
        assert!(HostRoot::at("host").unwrap_err().to_string().contains("absolute"));
    }
}
