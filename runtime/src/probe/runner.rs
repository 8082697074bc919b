//! Executing one probe bundle through an OCI runtime and cleaning up after it.
//!
//! Probes get their own runtime state root (`--root`), so they never touch the state of
//! containers the CRI runtime manages, and everything is removed afterwards, including when
//! the runtime hung and had to be killed.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::discover::RuntimeKind;
use crate::facts::CgroupMode;
use crate::host::HostRoot;
use crate::process::{self, Output, ProcessError};

/// A runtime binary and how to drive it.
#[derive(Debug, Clone)]
pub struct RuntimeCommand {
    /// The binary, as a path on the host.
    pub binary: PathBuf,
    pub kind: RuntimeKind,
    /// crun refuses cgroup v1 and hybrid layouts even with cgroup management off; on such
    /// hosts it runs in a private mount namespace with its own cgroup2 mount.
    pub cgroup: CgroupMode,
    /// The host the runtime runs on; every path given to it is a host path.
    pub host: HostRoot,
}

/// How long `delete --force` may take after a probe; a runtime that hangs there too is
/// killed like any other.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

impl RuntimeCommand {
    fn command(&self, state_root: &Path, args: &[&str]) -> Command {
        let mut cmd = self.host.command(&self.binary);
        cmd.arg("--root").arg(state_root);
        if self.kind == RuntimeKind::Crun {
            cmd.arg("--cgroup-manager=disabled");
            if self.cgroup != CgroupMode::V2 {
                // SAFETY: only async-signal-safe syscalls with pointers to static strings.
                unsafe { cmd.pre_exec(private_cgroup2_mount) };
            }
        }
        cmd.args(args);
        cmd
    }

    /// `<runtime> run --bundle <bundle> <id>`: creates, starts, waits for and removes the
    /// container. Returns the output whatever the exit status. `state_root` and `bundle`
    /// are host paths.
    pub fn run(
        &self,
        state_root: &Path,
        bundle: &Path,
        id: &str,
        timeout: Duration,
    ) -> Result<Output, ProcessError> {
        let bundle = bundle.to_string_lossy();
        let cmd = self.command(state_root, &["run", "--bundle", &bundle, id]);
        let result = process::run_unchecked(cmd, timeout);
        self.delete_if_left(state_root, id);
        result
    }

    /// Removes a container the runtime left behind (it was killed, or crashed): its processes,
    /// cgroups and state. A no-op when `run` cleaned up after itself, as it normally does.
    fn delete_if_left(&self, state_root: &Path, id: &str) {
        if !self.host.path(state_root.join(id)).exists() {
            return;
        }
        let cmd = self.command(state_root, &["delete", "--force", id]);
        if let Err(e) = process::run(cmd, DELETE_TIMEOUT) {
            tracing::warn!(runtime = %self.binary.display(), id, error = %e, "probe container cleanup failed");
        }
    }
}

/// Runs in the forked child before exec: a private mount namespace with cgroup2 at
/// /sys/fs/cgroup, which crun needs and which disappears with the process.
fn private_cgroup2_mount() -> io::Result<()> {
    // SAFETY: unshare and mount are raw syscalls; the string arguments are NUL-terminated
    // literals with static lifetime.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            c"cgroup2".as_ptr(),
            c"/sys/fs/cgroup".as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
