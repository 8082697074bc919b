//! Running a helper process (an OCI runtime, mostly) with a hard deadline.
//!
//! Everything the self-test executes goes through [`run`], so the guarantees live in one
//! place: the child gets its own process group and dies with us (`PR_SET_PDEATHSIG`), its
//! output is captured up to a cap, and on timeout the whole group is SIGKILLed and reaped.
//! The captured stderr is kept in the error because it is what the classifier reads.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Output beyond this is dropped: a runtime error fits easily, a runaway child does not
/// get to grow our memory.
pub const MAX_CAPTURE: usize = 256 * 1024;

/// A finished child.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot execute {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("{program} did not finish within {}s; its process group was killed", timeout.as_secs_f64())]
    Timeout {
        program: PathBuf,
        timeout: Duration,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    #[error("{program} exited with {}: {}", describe(*status), String::from_utf8_lossy(stderr).trim())]
    Failed {
        program: PathBuf,
        status: ExitStatus,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    #[error("waiting for {program}: {source}")]
    Wait { program: PathBuf, source: io::Error },
}

impl ProcessError {
    /// What the child wrote to stderr (and stdout, for runtimes that log there).
    pub fn output_text(&self) -> String {
        match self {
            ProcessError::Timeout { stdout, stderr, .. } | ProcessError::Failed { stdout, stderr, .. } => {
                let mut s = String::from_utf8_lossy(stderr).trim().to_owned();
                let out = String::from_utf8_lossy(stdout);
                if !out.trim().is_empty() {
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str(out.trim());
                }
                s
            }
            other => other.to_string(),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `cmd` to completion or until `timeout`, whichever comes first.
///
/// A non-zero exit is `ProcessError::Failed`; use [`run_unchecked`] to look at it yourself.
pub fn run(cmd: Command, timeout: Duration) -> Result<Output, ProcessError> {
    let program = PathBuf::from(cmd.get_program());
    let out = run_unchecked(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(ProcessError::Failed {
            program,
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// Like [`run`] but returns any exit status as `Ok`.
pub fn run_unchecked(mut cmd: Command, timeout: Duration) -> Result<Output, ProcessError> {
    let program = PathBuf::from(cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let deadline = started + timeout;
    let (stdout, stderr, finished) = capture(&mut child, deadline).map_err(|source| ProcessError::Wait {
        program: program.clone(),
        source,
    })?;
    if !finished {
        kill_group(&mut child);
        return Err(ProcessError::Timeout {
            program,
            timeout,
            stdout,
            stderr,
        });
    }
    let status = child
        .wait()
        .map_err(|source| ProcessError::Wait { program, source })?;
    Ok(Output {
        status,
        stdout,
        stderr,
        elapsed: started.elapsed(),
    })
}

/// Reads stdout and stderr until the child exits and both pipes are drained, or until the
/// deadline. Returns `finished = false` on deadline.
///
/// A grandchild may keep a pipe open after the child exited (a container process that
/// escaped); we stop reading shortly after the child itself is gone instead of waiting for
/// an EOF that may never come.
fn capture(child: &mut Child, deadline: Instant) -> io::Result<(Vec<u8>, Vec<u8>, bool)> {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut exited_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok((stdout, stderr, false));
        }
        if exited_at.is_none() && child.try_wait()?.is_some() {
            exited_at = Some(now);
        }
        let open = out_pipe.is_some() || err_pipe.is_some();
        match exited_at {
            Some(_) if !open => return Ok((stdout, stderr, true)),
            Some(t) if now.duration_since(t) > Duration::from_millis(250) => {
                return Ok((stdout, stderr, true));
            }
            _ => {}
        }
        let slice = (deadline - now).min(Duration::from_millis(50));
        let wait = PollTimeout::try_from(slice).unwrap_or(PollTimeout::ZERO);
        if !open {
            std::thread::sleep(slice);
            continue;
        }
        let (out_ready, err_ready) = {
            let mut fds = Vec::with_capacity(2);
            if let Some(p) = &out_pipe {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(p) = &err_pipe {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, wait) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let o = out_pipe.is_some() && it.next().is_some_and(ready);
            let e = err_pipe.is_some() && it.next().is_some_and(ready);
            (o, e)
        };
        if out_ready {
            drain(&mut out_pipe, &mut stdout)?;
        }
        if err_ready {
            drain(&mut err_pipe, &mut stderr)?;
        }
    }
}

/// Reads what one readiness notification offers; closes the pipe on EOF.
fn drain<R: Read>(pipe: &mut Option<R>, buf: &mut Vec<u8>) -> io::Result<()> {
    let Some(p) = pipe else { return Ok(()) };
    let mut chunk = [0u8; 8192];
    match p.read(&mut chunk) {
        Ok(0) => *pipe = None,
        Ok(n) => {
            let room = MAX_CAPTURE.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..n.min(room)]);
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// SIGKILLs the child's whole process group and reaps the child.
fn kill_group(child: &mut Child) {
    let pgid = Pid::from_raw(child.id() as i32);
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn captures_both_streams_and_status() {
        let out = run_unchecked(sh("echo out; echo err >&2; exit 3"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout_lossy(), "out\n");
        assert_eq!(out.stderr_lossy(), "err\n");
    }

    #[test]
    fn failure_keeps_stderr_for_the_classifier() {
        let err = run(
            sh("echo 'setxattr /dev/mqueue: operation not permitted' >&2; exit 1"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, ProcessError::Failed { .. }));
        assert!(err.output_text().contains("operation not permitted"));
        assert!(err.to_string().contains("status 1"), "{err}");
    }

    #[test]
    fn missing_binary_is_a_spawn_error_naming_it() {
        let err = run(Command::new("/nonexistent/runc"), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }));
        assert!(err.to_string().contains("/nonexistent/runc"), "{err}");
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        // A sleep duration unique to this test run marks the processes to look for.
        let marker = format!("30.{}", std::process::id());
        let started = Instant::now();
        // The grandchild `sleep` inherits the pipes and the process group.
        let err = run(
            sh(&format!("sleep {marker} & sleep {marker}; true")),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(100));
        let leftovers: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .collect();
        assert!(leftovers.is_empty(), "process survived the timeout");
    }

    #[test]
    fn output_is_capped() {
        let out = run_unchecked(sh("head -c 1000000 /dev/zero"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.stdout.len(), MAX_CAPTURE);
    }
}
