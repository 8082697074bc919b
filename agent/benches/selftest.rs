//! Cost of a full self-test per handler against one bare container run, and peak RSS of
//! the `usernsguard selftest` process. Prints figures; run as root:
//!
//!     cargo bench -p usernsguard-agent --bench selftest
//!
//! Three figures per runtime: a bare run, the four-check matrix in-process (what the agent
//! pays per self-test) and the whole `usernsguard selftest` process (what an operator waits
//! for, including its own start and `--version`). "Bare run" is `<runtime> run` of
//! `/usr/bin/true` in a runtime-created user namespace with the same mounts as a probe: the
//! cost of one container start, which is the unit the self-test's budget (at most 4x for all
//! four checks) is expressed in.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use usernsguard_runtime::bundle::{self, BundleOptions, Namespaces, Payload};
use usernsguard_runtime::discover::{self, find_on_path, RuntimeHandler};
use usernsguard_runtime::facts::{HostPaths, NodeFacts};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::probe::runner::RuntimeCommand;
use usernsguard_runtime::report::Check;
use usernsguard_runtime::selftest::{self, SelfTestConfig};
use usernsguard_runtime::userns::IdMapping;

/// The four checks that run through the OCI runtime directly (the CRI checks have their own
/// figure against a bare CRI pod).
const DIRECT_CHECKS: [Check; 4] = [
    Check::UsernsCreated,
    Check::UsernsJoined,
    Check::IdmapMount,
    Check::Features,
];

const ROUNDS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bare_run(runtime: &RuntimeCommand, dir: &Path, i: usize) -> Duration {
    let run_dir = dir.join(format!("bare-{i}"));
    let (bundle_dir, state) = (run_dir.join("bundle"), run_dir.join("state"));
    std::fs::create_dir_all(&bundle_dir).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let opts = BundleOptions {
        uid: IdMapping::pod(0x7000_0000),
        gid: IdMapping::pod(0x7000_0000),
        namespaces: Namespaces::Create,
        mount_label: None,
        payload: Payload {
            host_path: PathBuf::from("/usr/bin/true"),
            args: vec![],
        },
        payload_extra_args: vec![],
        idmap_mounts: vec![],
        mirror: bundle::host_mirror(Path::new("/")),
    };
    bundle::write(&bundle_dir, &opts).unwrap();
    let started = Instant::now();
    let out = runtime
        .run(
            &state,
            &bundle_dir,
            &format!("usernsguard-bench-{}-{i}", std::process::id()),
            Duration::from_secs(20),
        )
        .unwrap();
    let elapsed = started.elapsed();
    assert!(out.status.success(), "bare run failed: {}", out.stderr_lossy());
    std::fs::remove_dir_all(&run_dir).unwrap();
    elapsed
}

/// The four-check matrix alone, in this process: what one self-test costs the agent, which
/// runs the engine in-process, without `usernsguard`'s own process start.
fn matrix_run(handler: &str, binary: &Path) -> Duration {
    let payload = Payload {
        host_path: PathBuf::from(env!("CARGO_BIN_EXE_usernsguard")),
        args: vec!["__probe-payload".into()],
    };
    let mut config = SelfTestConfig::new(vec![RuntimeHandler::new(handler, binary)], payload);
    config.checks = DIRECT_CHECKS.to_vec();
    config.work_dir = PathBuf::from("/run/usernsguard-bench");
    let started = Instant::now();
    let report = selftest::run(&config).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.handlers[0].checks.len(), 4);
    elapsed
}

/// Runs `usernsguard selftest` for one handler; returns wall time and the process's peak
/// RSS in KiB, read from its VmHWM (a high-water mark) until it exits.
fn selftest_run(handler: &str, binary: &Path) -> (Duration, u64, i32) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_usernsguard"))
        .args([
            "selftest",
            "--output",
            "json",
            "--check",
            "userns-created",
            "--check",
            "userns-joined",
            "--check",
            "idmap-mount",
            "--check",
            "features",
            "--runtime",
        ])
        .arg(format!("{handler}={}", binary.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut hwm = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                hwm = hwm.max(kb.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (started.elapsed(), hwm, status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the self-test benchmark runs containers: run it as root"
    );
    let node = NodeFacts::gather(&HostPaths::default());
    let dir = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in("/run")
        .unwrap();
    let path = std::env::var_os("PATH");
    println!(
        "usernsguard selftest benchmark: {ROUNDS} rounds per figure, medians; kernel {}",
        node.kernel
    );
    for name in ["runc", "crun"] {
        let Some(binary) = find_on_path(name, path.as_deref()) else {
            println!("{name}: not installed, skipped");
            continue;
        };
        let version = discover::version(&HostRoot::own(), &binary, Duration::from_secs(5)).unwrap();
        let runtime = RuntimeCommand {
            binary: binary.clone(),
            kind: version.kind,
            cgroup: node.cgroup,
            host: HostRoot::own(),
        };
        // Warm the page cache for both paths before measuring.
        bare_run(&runtime, dir.path(), 999);
        selftest_run(name, &binary);
        matrix_run(name, &binary);
        let mut bare = Vec::new();
        let mut matrix = Vec::new();
        let mut full = Vec::new();
        let mut peak_rss = 0;
        for i in 0..ROUNDS {
            bare.push(bare_run(&runtime, dir.path(), i));
            matrix.push(matrix_run(name, &binary));
            let (t, rss, _code) = selftest_run(name, &binary);
            full.push(t);
            peak_rss = peak_rss.max(rss);
        }
        let (bare, matrix, full) = (median(bare), median(matrix), median(full));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name} {}: bare run of true {:.1} ms; four-check matrix {:.1} ms = {:.2}x (target <= 4x); whole `usernsguard selftest` process {:.1} ms = {:.2}x; peak RSS of usernsguard selftest {:.1} MiB (target < 20 MiB)",
            version.version,
            ms(bare),
            ms(matrix),
            ms(matrix) / ms(bare),
            ms(full),
            ms(full) / ms(bare),
            peak_rss as f64 / 1024.0,
        );
    }
}
