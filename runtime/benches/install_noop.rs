//! The no-change reconcile: `Installer::install` on a host where the handler is installed
//! as asked (containerd 1.6's default config, a 12 MB runc recorded by fingerprint). Prints
//! median, p99 and max over 200 runs and checks that no file was touched. Needs root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::{BinarySource, InstallRequest, Installer, RestartMode};

fn main() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/install/containerd-1.6-default/input");
    let host = tempfile::tempdir().unwrap();
    std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", fixture.display()))
        .arg(host.path())
        .status()
        .unwrap();
    std::fs::create_dir_all(host.path().join("proc")).unwrap();
    let req = InstallRequest {
        handler: "runc-1-4-3".into(),
        binary: BinarySource::Local(PathBuf::from("/work/shared/runtimes/runc-1.4.3")),
        install_path: None,
        sha256: None,
        cri_config: PathBuf::from("/etc/containerd/config.toml"),
        restart: RestartMode::None,
        cri_socket: None,
    };
    let mut installer = Installer::new(HostRoot::at(host.path()).unwrap());
    installer.install(&req).expect("first install");
    let mtimes = || {
        let out = std::process::Command::new("find")
            .arg(host.path())
            .args(["-printf", "%p %i %T@ %C@\n"])
            .output()
            .unwrap();
        out.stdout
    };
    let before = mtimes();
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let o = installer.install(&req).unwrap();
            let e = t.elapsed();
            assert!(o.unchanged());
            e
        })
        .collect();
    assert_eq!(before, mtimes(), "the no-change path touched a file");
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "install_noop: no-change reconcile (plan + nothing applied), 200 runs: median {:.2} ms, p99 {:.2} ms, max {:.2} ms; no file touched (budget 20 ms)",
        ms(times[100]),
        ms(times[198]),
        ms(times[199])
    );
    assert!(times[100] < Duration::from_millis(20));
}
