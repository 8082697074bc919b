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

use std::ffi::CString;
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
        }
    }

    /// The host mounted at `root` (e.g. `/host`).
    pub fn at(root: impl Into<PathBuf>) -> Result<HostRoot, HostError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(HostError::Relative(root));
        }
        std::fs::read_dir(&root).map_err(|source| HostError::NotADirectory {
            path: root.clone(),
            source,
        })?;
        let root = root.canonicalize().unwrap_or(root);
        Ok(HostRoot { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the host is this process's own root (no translation, no pivot).
    pub fn is_own(&self) -> bool {
        self.root == Path::new("/")
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
        if !self.is_own() {
            let root = CString::new(self.root.as_os_str().as_bytes()).expect("paths have no NUL");
            // SAFETY: `enter_root` makes raw syscalls only, with strings allocated before
            // the fork; it is async-signal-safe.
            unsafe { cmd.pre_exec(move || enter_root(&root)) };
        }
        cmd
    }
}

/// Runs in the forked child before exec: a private mount namespace whose root is the host
/// root, with a fresh procfs so that PIDs read the same as in this process.
fn enter_root(root: &CString) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: raw syscalls on NUL-terminated strings that live across the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
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
