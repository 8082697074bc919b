//! Private containerd instances for tests: Debian 12's containerd 1.6 (config v2) and
//! Debian unstable's 2.1 (config v3), each with its own root, state, socket, config, CNI
//! network namespace and runtime state roots, started and stopped by the scripts in
//! `tests/containerd/` (see its README). Dropping a [`Containerd`] stops it and removes
//! everything it left.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Which containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Debian 12's containerd 1.6 (config version 2, no per-handler features).
    V16,
    /// Debian unstable's containerd 2.1 (config version 3).
    V21,
}

impl Version {
    fn arg(self) -> &'static str {
        match self {
            Version::V16 => "16",
            Version::V21 => "21",
        }
    }
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/containerd")
}

/// The real runc releases in `../shared/runtimes` (outside the repository, as on CI), or in
/// `$RUNTIMES_DIR` as `tests/containerd/lib.sh` takes it (a git worktree elsewhere).
pub fn shared_runtime(name: &str) -> PathBuf {
    let dir = std::env::var_os("RUNTIMES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/runtimes"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: the real runc releases live in ../shared/runtimes (set RUNTIMES_DIR when \
         the repository is not beside ../shared)",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// Every runtime handler this machine has: Debian's runc 1.1.5 and crun 1.8.1 and the four
/// runc releases, under DNS-label handler names.
pub fn all_handlers() -> Vec<(String, PathBuf)> {
    let mut h = vec![
        ("runc".to_owned(), PathBuf::from("/usr/sbin/runc")),
        ("crun".to_owned(), PathBuf::from("/usr/bin/crun")),
    ];
    for v in ["1.2.0", "1.2.1", "1.3.6", "1.4.3"] {
        h.push((
            format!("runc-{}", v.replace('.', "-")),
            shared_runtime(&format!("runc-{v}")),
        ));
    }
    h
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Builds (cached) a probe image holding `binary` at `in_image`, tagged `reference`; returns
/// its archive, to give to [`Containerd::start`].
pub fn probe_image(binary: &Path, reference: &str, in_image: &str) -> PathBuf {
    let out = run(Command::new(scripts().join("build-images.sh"))
        .arg(binary)
        .arg(reference)
        .arg(in_image));
    PathBuf::from(out.lines().last().expect("build-images prints the archive"))
}

/// One running private containerd.
#[derive(Debug)]
pub struct Containerd {
    pub name: String,
    pub version: Version,
    /// The gRPC (CRI) socket.
    pub socket: PathBuf,
    /// The generated config file (config.toml in the state dir).
    pub config: PathBuf,
}

impl Containerd {
    /// Starts instance `name` with these handlers (and `ENABLE_SELINUX` as given), and
    /// imports the pause image and `images`.
    pub fn start(
        name: &str,
        version: Version,
        handlers: &[(String, PathBuf)],
        enable_selinux: bool,
        images: &[PathBuf],
    ) -> Containerd {
        let handlers = handlers
            .iter()
            .map(|(n, b)| format!("{n}={}", b.display()))
            .collect::<Vec<_>>()
            .join(" ");
        let socket = run(Command::new(scripts().join("start.sh"))
            .arg(name)
            .arg(version.arg())
            .args(images)
            .env("UG_HANDLERS", handlers)
            .env("ENABLE_SELINUX", enable_selinux.to_string()));
        Containerd {
            name: name.to_owned(),
            version,
            socket: PathBuf::from(socket.lines().last().unwrap()),
            config: PathBuf::from(format!("/run/usernsguard-test/{name}/config.toml")),
        }
    }

    /// Stops and starts containerd with its config file as it is now (what `systemctl
    /// restart containerd` does after an installer changed the config); shims and pods
    /// survive, as they do under systemd.
    pub fn restart(&self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// [`Containerd::restart`], with a containerd that does not come back (a config it
    /// refuses) as an error: the scripts' output and containerd's log.
    pub fn try_restart(&self) -> Result<(), String> {
        for (script, env) in [("stop.sh", "KEEP_STATE"), ("start.sh", "UG_KEEP_CONFIG")] {
            let out = Command::new(scripts().join(script))
                .args([&self.name, self.version.arg()])
                .env(env, "1")
                .output()
                .map_err(|e| format!("running {script}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{script} {} failed ({}):\n{}",
                    self.name,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    }

    /// The running containerd's PID (`None` when it is not running).
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(format!("/run/usernsguard-test/{}/containerd.pid", self.name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // Alive and not a zombie (PID 1 here reaps late), as tests/containerd/lib.sh checks.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (state != "Z").then_some(pid)
    }

    /// containerd's own log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("/run/usernsguard-test/{}/containerd.log", self.name))
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let out = Command::new(scripts().join("stop.sh"))
            .args([&self.name, self.version.arg()])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "stopping containerd {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("stopping containerd {}: {e}", self.name),
        }
    }
}
