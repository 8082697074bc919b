//! User-namespace id mappings and the namespace holder.
//!
//! containerd 2.x does not let the OCI runtime create a pod's user namespace: it creates a
//! user namespace, writes its maps, creates the network namespace inside it, and passes both
//! to the runtime as `/proc/<pid>/ns/*` paths. That joined path is where runc 1.1/1.2.0 leaves
//! `/dev/mqueue` owned by an unmapped uid (runc issue 4466), so the `userns-joined` probe must
//! reproduce it exactly; [`NamespaceHolder`] is that reproduction.
//!
//! `unshare(CLONE_NEWUSER)` is refused in a multithreaded process, and both the test harness
//! and the agent are multithreaded, so the holder is a freshly forked child that only makes
//! raw syscalls until it exits.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, ForkResult, Pid};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One line of `/proc/<pid>/uid_map`: `container_id host_id size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

impl IdMapping {
    /// Pods get 65536 ids (Kubernetes' user-namespace block size).
    pub const POD_SIZE: u32 = 65536;

    pub fn pod(host_id: u32) -> Self {
        IdMapping {
            container_id: 0,
            host_id,
            size: Self::POD_SIZE,
        }
    }

    /// The host id that container id `id` maps to, if mapped.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.container_id)
            .filter(|off| *off < self.size)
            .map(|off| self.host_id + off)
    }

    /// Whether a `/proc/self/uid_map` as seen inside the namespace carries exactly this mapping.
    pub fn matches_proc_map(&self, map: &str) -> bool {
        let mut lines = map.lines().filter(|l| !l.trim().is_empty());
        let Some(line) = lines.next() else { return false };
        let nums: Vec<u64> = line.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        lines.next().is_none()
            && nums
                == [
                    u64::from(self.container_id),
                    u64::from(self.host_id),
                    u64::from(self.size),
                ]
    }
}

impl fmt::Display for IdMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.container_id, self.host_id, self.size)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("creating the namespace holder: {0}")]
    Fork(#[source] nix::Error),
    #[error("namespace holder failed to unshare({what}): {errno}")]
    Unshare { what: &'static str, errno: nix::Error },
    #[error("writing {path}: {source}")]
    WriteMap { path: PathBuf, source: io::Error },
    #[error("namespace holder did not answer within {0:?}")]
    Timeout(Duration),
    #[error("namespace holder exited before its namespaces were ready")]
    Exited,
    #[error("talking to the namespace holder: {0}")]
    Pipe(#[source] nix::Error),
}

/// A child process that owns a user namespace (with maps written) and a network namespace
/// created inside it, alive until dropped.
#[derive(Debug)]
pub struct NamespaceHolder {
    pid: Pid,
    /// Closing it tells the holder to exit.
    release: Option<OwnedFd>,
}

const STEP_TIMEOUT: Duration = Duration::from_secs(5);

impl NamespaceHolder {
    /// Forks the holder, writes `uid`/`gid` maps for its user namespace from here (the parent,
    /// privileged in the initial namespace, as containerd does), then has it unshare the
    /// network namespace so that the netns is owned by the new user namespace.
    pub fn spawn(uid: IdMapping, gid: IdMapping) -> Result<Self, NamespaceError> {
        let (to_child_r, to_child_w) = pipe().map_err(NamespaceError::Pipe)?;
        let (to_parent_r, to_parent_w) = pipe().map_err(NamespaceError::Pipe)?;
        // SAFETY: the child runs only `holder_main`, which makes async-signal-safe raw
        // syscalls on already-open fds and never returns (it ends in `_exit`).
        match unsafe { fork() }.map_err(NamespaceError::Fork)? {
            ForkResult::Child => holder_main(to_child_r.as_raw_fd(), to_parent_w.as_raw_fd()),
            ForkResult::Parent { child } => {
                drop(to_child_r);
                drop(to_parent_w);
                let mut holder = NamespaceHolder {
                    pid: child,
                    release: Some(to_child_w),
                };
                holder.wait_for_step(&to_parent_r, b'U', "user")?;
                for (file, map) in [("uid_map", uid), ("gid_map", gid)] {
                    let path = PathBuf::from(format!("/proc/{}/{file}", holder.pid));
                    fs::write(&path, format!("{map}\n"))
                        .map_err(|source| NamespaceError::WriteMap { path, source })?;
                }
                let w = holder.release.as_ref().expect("release fd present until drop");
                nix::unistd::write(w, b"G").map_err(NamespaceError::Pipe)?;
                holder.wait_for_step(&to_parent_r, b'N', "net")?;
                Ok(holder)
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn user_ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/user", self.pid))
    }

    pub fn net_ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// Waits for the holder's one-byte report of a step.
    fn wait_for_step(&mut self, from: &OwnedFd, ok: u8, what: &'static str) -> Result<(), NamespaceError> {
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(from), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(STEP_TIMEOUT).expect("5 s fits a poll timeout");
        if poll(&mut fds, timeout).map_err(NamespaceError::Pipe)? == 0 {
            return Err(NamespaceError::Timeout(STEP_TIMEOUT));
        }
        let mut buf = [0u8; 2];
        let n = nix::unistd::read(from, &mut buf).map_err(NamespaceError::Pipe)?;
        match (n, buf[0]) {
            (0, _) => Err(NamespaceError::Exited),
            (_, b) if b == ok => Ok(()),
            (2, b'E') => Err(NamespaceError::Unshare {
                what,
                errno: nix::Error::from_raw(i32::from(buf[1])),
            }),
            _ => Err(NamespaceError::Exited),
        }
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        drop(self.release.take());
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// The holder's whole life. Only raw syscalls: we are a fork of a multithreaded process.
fn holder_main(from_parent: i32, to_parent: i32) -> ! {
    // SAFETY: every call below is an async-signal-safe syscall wrapper operating on fds and
    // stack buffers owned by this (single-threaded) child; `_exit` skips atexit handlers
    // that belong to the parent.
    unsafe {
        let report = |ok: u8, failed: bool| {
            let errno = *libc::__errno_location();
            let msg = if failed {
                [b'E', errno.clamp(0, 255) as u8]
            } else {
                [ok, 0]
            };
            libc::write(to_parent, msg.as_ptr().cast(), if failed { 2 } else { 1 });
        };
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        close_other_fds(from_parent, to_parent);
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            report(b'U', true);
            libc::_exit(1);
        }
        report(b'U', false);
        let mut byte = [0u8; 1];
        if libc::read(from_parent, byte.as_mut_ptr().cast(), 1) != 1 {
            libc::_exit(1);
        }
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            report(b'N', true);
            libc::_exit(1);
        }
        report(b'N', false);
        // Hold the namespaces until the parent closes the pipe (or dies).
        while libc::read(from_parent, byte.as_mut_ptr().cast(), 1) > 0 {}
        libc::_exit(0);
    }
}

/// Closes every fd but stdio and the two pipes. A fork (unlike an exec) keeps fds opened
/// without `O_CLOEXEC` semantics mattering, so without this the holder would keep copies of
/// pipes other threads are creating for concurrent probes, and delay their EOF for as long
/// as it lives.
///
/// # Safety
/// Only to be called in the freshly forked holder: it closes fds the parent's threads own.
unsafe fn close_other_fds(a: i32, b: i32) {
    let (lo, hi) = (a.min(b) as u32, a.max(b) as u32);
    let ranges = [
        (3, lo.saturating_sub(1)),
        (lo + 1, hi.saturating_sub(1)),
        (hi + 1, u32::MAX),
    ];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range is a raw syscall on fd numbers; no memory is touched.
        if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } != 0 {
            // Kernels before 5.9: close one by one, up to a generous bound.
            for fd in first..=last.min(4096) {
                // SAFETY: as above.
                unsafe { libc::close(fd as i32) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes run concurrently: a holder forked while another thread has a pipe open must not
    /// keep that pipe's write end, or the other probe's reader waits for the holder to die.
    #[test]
    fn holder_keeps_no_copy_of_other_threads_fds() {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "creating user namespaces with maps needs root"
        );
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let holder =
            NamespaceHolder::spawn(IdMapping::pod(0x7000_0000), IdMapping::pod(0x7000_0000)).unwrap();
        let own_user_ns = fs::read_link("/proc/self/ns/user").unwrap();
        assert_ne!(fs::read_link(holder.user_ns_path()).unwrap(), own_user_ns);
        let uid_map = fs::read_to_string(format!("/proc/{}/uid_map", holder.pid())).unwrap();
        assert!(
            IdMapping::pod(0x7000_0000).matches_proc_map(&uid_map),
            "{uid_map}"
        );
        drop(w);
        let mut buf = [0u8; 1];
        // EOF now (not EAGAIN), while the holder still lives: it closed its copy of `w`.
        assert_eq!(nix::unistd::read(&r, &mut buf), Ok(0));
        drop(holder);
    }

    #[test]
    fn mapping_translation_and_proc_format() {
        let m = IdMapping::pod(100_000);
        assert_eq!(m.to_host(0), Some(100_000));
        assert_eq!(m.to_host(65535), Some(165_535));
        assert_eq!(m.to_host(65536), None);
        assert!(m.matches_proc_map("         0     100000      65536\n"));
        assert!(!m.matches_proc_map("0 0 4294967295\n"));
        assert!(!m.matches_proc_map("0 100000 65536\n1 2 3\n"));
        assert!(!m.matches_proc_map(""));
        assert_eq!(m.to_string(), "0 100000 65536");
    }
}
