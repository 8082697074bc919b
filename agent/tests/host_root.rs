//! The agent's probe path judges the host's runtime, not its own: a host root whose
//! containerd config registers `runc` without a `BinaryName`, and whose PATH finds runc
//! 1.4.3, while the agent's own PATH finds Debian's runc 1.1.5. The engine must read the
//! host's config, resolve `runc` the way containerd would on the host, run that binary on
//! the host root, and report its verdict. Needs root (mounts, probes).
//!
//! The "host" is a directory: the machine's /usr, /lib*, /bin, /sbin bind-mounted (private,
//! so nothing propagates back), a tmpfs over its /usr/local/sbin holding runc 1.4.3, its
//! own /etc with the containerd config, and the machine's /proc, /sys and /dev.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use usernsguard_agent::node::engine::EngineRunner;
use usernsguard_agent::node::runner::{RunRequest, SelfTestRunner};
use usernsguard_runtime::bundle::Payload;
use usernsguard_runtime::discover;
use usernsguard_runtime::host::{HostRoot, SERVICE_PATH};
use usernsguard_runtime::{Check, CheckOutcome, Verdict};

/// A host root built from mounts, unmounted (deepest first) when dropped.
struct FakeHost {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl FakeHost {
    fn build(runc: &Path) -> FakeHost {
        let dir = tempfile::Builder::new()
            .prefix("ug-host-")
            .tempdir_in("/run")
            .unwrap();
        let mut host = FakeHost { dir, mounts: vec![] };
        let root = host.dir.path().to_path_buf();
        for name in [
            "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "sys", "dev",
        ] {
            let real = Path::new("/").join(name);
            let Ok(meta) = std::fs::symlink_metadata(&real) else {
                continue;
            };
            let target = root.join(name);
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&real).unwrap(), &target).unwrap();
                continue;
            }
            std::fs::create_dir(&target).unwrap();
            host.mount(&["--rbind", real.to_str().unwrap(), target.to_str().unwrap()]);
            sh(&["mount", "--make-rprivate", target.to_str().unwrap()]);
        }
        let sbin = root.join("usr/local/sbin");
        host.mount(&["-t", "tmpfs", "tmpfs", sbin.to_str().unwrap()]);
        std::fs::copy(runc, sbin.join("runc")).unwrap();
        std::fs::create_dir_all(root.join("run")).unwrap();
        host.mount(&["-t", "tmpfs", "tmpfs", root.join("run").to_str().unwrap()]);
        std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
        std::fs::write(
            root.join("etc/containerd/config.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
        )
        .unwrap();
        host
    }

    fn mount(&mut self, args: &[&str]) {
        let mut full = vec!["mount"];
        full.extend_from_slice(args);
        sh(&full);
        self.mounts.push(PathBuf::from(args[args.len() - 1]));
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

#[test]
fn the_engine_probes_the_hosts_runc_not_its_own() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test mounts and probes: run it as root"
    );
    let own = discover::find_on_path("runc", std::env::var_os("PATH").as_deref()).expect("runc on PATH");
    let own_version = discover::version(&HostRoot::own(), &own, Duration::from_secs(5)).unwrap();
    assert!(
        own_version.version.starts_with("1.1."),
        "this machine's runc: {own_version:?}"
    );

    // ../shared/runtimes, or $RUNTIMES_DIR as tests/containerd/lib.sh takes it (a worktree).
    let runc_143 = std::env::var_os("RUNTIMES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/runtimes"))
        .join("runc-1.4.3");
    assert!(
        runc_143.exists(),
        "{} is missing (set RUNTIMES_DIR)",
        runc_143.display()
    );
    let fake = FakeHost::build(&runc_143);
    let host = HostRoot::at(fake.root()).unwrap();
    assert_eq!(
        host.find_on_path("runc", SERVICE_PATH).as_deref(),
        Some(Path::new("/usr/local/sbin/runc")),
        "the host's PATH finds its own runc first"
    );
    let engine = EngineRunner {
        payload: Payload {
            host_path: PathBuf::from(env!("CARGO_BIN_EXE_usernsguard")),
            args: vec!["__probe-payload".into()],
        },
        work_dir: PathBuf::from("/run/usernsguard"),
        host,
        cri_socket: None,
        probe_image: None,
        node_handlers: None,
    };
    let report = engine.run(&RunRequest {
        handlers: vec![],
        checks: vec![],
        timeout: Duration::from_secs(20),
    });

    assert_eq!(report.handlers.len(), 1, "{report:#?}");
    let runc = &report.handlers[0];
    assert_eq!(runc.handler, "runc");
    assert_eq!(runc.binary, "/usr/local/sbin/runc", "named as the host names it");
    assert_eq!((runc.runtime.as_str(), runc.version.as_str()), ("runc", "1.4.3"));
    for check in Check::PROBES {
        let r = runc.check(check).unwrap();
        assert_eq!(r.result, CheckOutcome::Pass, "{check}: {}", r.message);
    }
    for check in [Check::CriAdvertised, Check::CriPod] {
        let r = runc.check(check).unwrap();
        assert_eq!(r.result, CheckOutcome::Skip, "{check}: {}", r.message);
        assert!(
            r.message.contains("/run/containerd/containerd.sock"),
            "{}",
            r.message
        );
    }
    assert_eq!(
        runc.verdict,
        Verdict::Pass,
        "runc 1.4.3's verdict; the agent's own 1.1.5 would fail"
    );
    assert_eq!(
        report.node.kernel,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );

    // The payload was copied onto the host (it is not in the host's filesystem otherwise);
    // the run's directory is gone.
    let work = fake.root().join("run/usernsguard");
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        ["payload"],
        "only the cached payload stays in the host's work dir"
    );
}
