//! `SystemdBus` against a real systemd: Debian 12 booted with `systemd-nspawn -b`
//! (tests/nspawn/), systemd 252 as its PID 1 and Debian's containerd 1.6 as a unit.
//! Needs root, debootstrap and systemd-container (scripts/install-deps.sh); builds the
//! cached root the first time (network, about a minute). Fails, never skips, when the rig
//! cannot come up.
//!
//! The client runs inside the container's PID namespace: systemd drops a private-socket
//! peer whose PID it cannot see, and from the container's systemd this test's PID is
//! invisible (a pod's agent is in a child of the host's PID namespace, which the host's
//! systemd sees). So each step re-executes this test binary through
//! `nsenter -t <init> -p` (this binary has its own `main`: see [`child`]), which reaches the socket as
//! `/proc/<init>/root/run/systemd/private` (host mount namespace, host /proc) and prints
//! its result as JSON.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use usernsguard_runtime::install::systemd::{ServiceManager, SystemdBus, SystemdError, UnitState};
use usernsguard_runtime::process;

/// Set (to the operation) only in the re-executed child.
const CHILD_OP: &str = "USERNSGUARD_NSPAWN_CHILD_OP";
const CHILD_SOCKET: &str = "USERNSGUARD_NSPAWN_CHILD_SOCKET";
const RESULT_PREFIX: &str = "NSPAWN-CHILD-RESULT ";
const CONTAINERD: &str = "containerd.service";
/// Debian's unit restarts containerd 5 s after a failed start; a failure must be known
/// well before that.
const FAILURE_KNOWN_WITHIN: Duration = Duration::from_secs(3);

fn rig() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nspawn")
}

/// A booted container; powered off and cleaned up on drop, panicking or not.
struct Container {
    name: String,
    init: u32,
}

impl Container {
    fn boot(name: &str) -> Container {
        let mut up = Command::new(rig().join("up.sh"));
        up.arg(name);
        // 10 minutes covers a cold root build (debootstrap downloads and unpacks).
        let out = match process::run(up, Duration::from_secs(600)) {
            Ok(out) => out,
            Err(e) => panic!(
                "the nspawn rig did not come up (tests/nspawn/up.sh {name}); this test needs root, \
                 debootstrap, systemd-container and, the first time, network access to deb.debian.org:\n{e}\n{}",
                e.output_text()
            ),
        };
        let init = out
            .stdout_lossy()
            .lines()
            .find_map(|l| l.strip_prefix("INIT_PID="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("up.sh printed no INIT_PID:\n{}", out.stdout_lossy()));
        eprintln!("{}", out.stderr_lossy().trim());
        Container {
            name: name.to_owned(),
            init,
        }
    }

    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init))
    }

    fn socket(&self) -> PathBuf {
        self.root().join("run/systemd/private")
    }

    /// Runs `op` in the `child` test inside the container's PID namespace.
    fn child(&self, op: &str) -> Json {
        let out = self.child_command(op).output().expect("run nsenter");
        parse_child(op, out.status.success(), &out.stdout, &out.stderr)
    }

    fn child_command(&self, op: &str) -> Command {
        let me = std::env::current_exe().expect("test binary path");
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.init.to_string(), "-p", "--"])
            .arg(me)
            .env(CHILD_OP, op)
            .env(CHILD_SOCKET, self.socket());
        cmd
    }

    /// systemctl of the container itself, run in all its namespaces.
    fn systemctl(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "systemctl"])
            .args(args)
            .output()
            .expect("run nsenter systemctl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let out = Command::new(rig().join("down.sh"))
            .arg(&self.name)
            .output()
            .expect("run down.sh");
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        if !std::thread::panicking() {
            assert!(
                out.status.success(),
                "down.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn parse_child(op: &str, success: bool, stdout: &[u8], stderr: &[u8]) -> Json {
    let stdout = String::from_utf8_lossy(stdout);
    // The harness prints "test child ... " on the same line first.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(RESULT_PREFIX).map(|(_, json)| json));
    match (success, line) {
        (true, Some(json)) => serde_json::from_str(json).expect("child JSON"),
        _ => panic!(
            "child {op:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(stderr)
        ),
    }
}

fn state_json(s: &UnitState) -> Json {
    json!({
        "active_state": s.active_state.as_str(),
        "sub_state": s.sub_state,
        "result": s.result,
        "main_pid": s.main_pid,
        "active_enter_timestamp_us": s.active_enter_timestamp_us,
        "active_enter_timestamp_monotonic_us": s.active_enter_timestamp_monotonic_us,
        "invocation_id": s.invocation_id,
        "timeout_start_us": s.timeout_start_us,
    })
}

fn error_json(e: &SystemdError) -> Json {
    let kind = match e {
        SystemdError::NoSuchUnit { .. } => "no_such_unit",
        SystemdError::Auth { .. } => "auth",
        _ => "other",
    };
    json!({ "error": kind, "message": e.to_string() })
}

/// A custom harness (`harness = false`): the binary is either the test, or, re-executed
/// inside the container's PID namespace with [`CHILD_OP`] set, one step of it.
fn main() {
    match std::env::var(CHILD_OP) {
        Ok(op) => child(&op),
        Err(_) => {
            restart_containerd_through_the_private_socket();
            println!("test restart_containerd_through_the_private_socket ... ok");
        }
    }
}

/// The half of each step that runs inside the container's PID namespace (see the module
/// docs).
fn child(op: &str) {
    let socket = std::env::var(CHILD_SOCKET).expect("socket path");
    let mut bus = SystemdBus::new(socket);
    let started = Instant::now();
    let (verb, unit) = op.split_once(' ').unwrap_or((op, ""));
    let result = match verb {
        "reload" => bus.daemon_reload().map(|()| json!({})),
        "state" => bus.unit_state(unit).map(|s| json!({ "state": state_json(&s) })),
        "restart" => bus.restart(unit, Duration::from_secs(120)).map(|o| {
            json!({
                "job": o.job,
                "job_result": o.job_result.as_str(),
                "job_ms": o.job_duration.as_millis() as u64,
                "succeeded": o.succeeded(),
                "reconnects": o.reconnects,
                "before": state_json(&o.before),
                "after": state_json(&o.after),
                "summary": o.to_string(),
            })
        }),
        other => panic!("unknown child op {other}"),
    };
    let mut out = result.unwrap_or_else(|e| error_json(&e));
    out["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    out["my_pid"] = json!(std::process::id());
    println!("{RESULT_PREFIX}{out}");
}

fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

fn restart_containerd_through_the_private_socket() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test needs root: it boots a container with systemd-nspawn"
    );
    let t0 = Instant::now();
    let ct = Container::boot(&format!("ung-test-{}", std::process::id()));
    eprintln!("[{} ms] booted, container init is host pid {}", ms(t0), ct.init);

    // From the host's PID namespace systemd cannot see us and drops the connection.
    match SystemdBus::new(ct.socket()).unit_state(CONTAINERD) {
        Err(e @ SystemdError::Auth { .. }) => eprintln!("from the host PID namespace, as expected: {e}"),
        other => panic!("expected systemd to refuse a peer it cannot see, got {other:?}"),
    }

    let state = ct.child(&format!("state {CONTAINERD}"));
    assert_eq!(state["state"]["active_state"], "active", "{state}");
    assert!(
        state["my_pid"].as_u64().unwrap() < 1000,
        "the child runs in the container's PID namespace"
    );
    let missing = ct.child("state usernsguard-no-such.service");
    assert_eq!(missing["error"], "no_such_unit", "{missing}");

    // 1. A plain restart: job done, active, ActiveEnterTimestamp advanced, new main PID.
    let t = Instant::now();
    let ok = ct.child(&format!("restart {CONTAINERD}"));
    eprintln!(
        "[{} ms] restart: {} ({} ms in the child)",
        ms(t0),
        ok["summary"],
        ms(t)
    );
    assert_eq!(ok["job_result"], "done", "{ok}");
    assert_eq!(ok["after"]["active_state"], "active", "{ok}");
    assert!(ok["succeeded"].as_bool().unwrap(), "{ok}");
    let ts = |o: &Json, when: &str| o[when]["active_enter_timestamp_us"].as_u64().unwrap();
    assert!(ts(&ok, "after") > ts(&ok, "before"), "{ok}");
    assert_ne!(ok["after"]["main_pid"], ok["before"]["main_pid"], "{ok}");
    assert_eq!(ok["before"]["timeout_start_us"], 90_000_000);

    // 2. A config containerd cannot parse: the job fails, the unit is not active, and the
    //    client knows within a few seconds, not after containerd's 5 s restart loop.
    let config = ct.root().join("etc/containerd/config.toml");
    let good = std::fs::read(&config).expect("read the container's containerd config");
    std::fs::write(&config, "version = 2\n[plugins\nbroken = = \n").unwrap();
    let bad = ct.child(&format!("restart {CONTAINERD}"));
    eprintln!("[{} ms] restart with a broken config: {}", ms(t0), bad["summary"]);
    assert_eq!(bad["job_result"], "failed", "{bad}");
    assert_ne!(bad["after"]["active_state"], "active", "{bad}");
    assert!(!bad["succeeded"].as_bool().unwrap(), "{bad}");
    assert_eq!(ts(&bad, "after"), ts(&bad, "before"), "{bad}");
    let took = Duration::from_millis(bad["elapsed_ms"].as_u64().unwrap());
    assert!(
        took < FAILURE_KNOWN_WITHIN,
        "failure reported after {took:?}: {bad}"
    );

    // 3. Config restored: the next restart (from auto-restart) succeeds.
    std::fs::write(&config, &good).unwrap();
    let back = ct.child(&format!("restart {CONTAINERD}"));
    eprintln!(
        "[{} ms] restart after restoring the config: {}",
        ms(t0),
        back["summary"]
    );
    assert_eq!(back["before"]["active_state"], "activating", "{back}");
    assert!(back["succeeded"].as_bool().unwrap(), "{back}");
    assert!(ts(&back, "after") > ts(&ok, "after"), "{back}");

    // 4. More restarts in a row than systemd's start limit (5 in 10 s, counting the ones
    //    above and the boot) would allow: the client resets it, so none is refused.
    for i in 0..4 {
        let again = ct.child(&format!("restart {CONTAINERD}"));
        assert!(
            again["succeeded"].as_bool().unwrap(),
            "restart {} in a row: {again}",
            i + 5
        );
    }
    eprintln!("[{} ms] 4 more restarts in a row succeeded", ms(t0));

    // 5. daemon-reload, with a new unit file that the reload makes known.
    let unit_file = ct.root().join("etc/systemd/system/usernsguard-slow.service");
    std::fs::write(
        &unit_file,
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sleep 2\n",
    )
    .unwrap();
    let reload = ct.child("reload");
    assert!(reload.get("error").is_none(), "{reload}");
    eprintln!("[{} ms] daemon-reload took {} ms", ms(t0), reload["elapsed_ms"]);
    let slow = ct.child("state usernsguard-slow.service");
    assert_eq!(slow["state"]["active_state"], "inactive", "{slow}");

    // 6. daemon-reexec while the client waits for a (2 s) job: it reconnects and still
    //    gets the job's result.
    let mut waiting = ct.child_command("restart usernsguard-slow.service");
    waiting.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut waiting = waiting.spawn().unwrap();
    let seen = Instant::now();
    while ct.systemctl(&["is-active", "usernsguard-slow.service"]) != "activating" {
        assert!(
            seen.elapsed() < Duration::from_secs(10),
            "the slow unit never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ct.systemctl(&["daemon-reexec"]);
    eprintln!("[{} ms] daemon-reexec done while the job runs", ms(t0));
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    waiting.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    waiting.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    let status = waiting.wait().unwrap();
    let reexec = parse_child("restart across daemon-reexec", status.success(), &stdout, &stderr);
    eprintln!(
        "[{} ms] restart across daemon-reexec: {} (job result {}, {} reconnect(s))",
        ms(t0),
        reexec["summary"],
        reexec["job_result"],
        reexec["reconnects"]
    );
    assert!(reexec["reconnects"].as_u64().unwrap() >= 1, "{reexec}");
    assert!(reexec["succeeded"].as_bool().unwrap(), "{reexec}");

    // containerd is still fine after all of it.
    let end = ct.child(&format!("state {CONTAINERD}"));
    assert_eq!(end["state"]["active_state"], "active", "{end}");

    let name = ct.name.clone();
    drop(ct);
    eprintln!("[{} ms] container stopped", ms(t0));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&name), "mounts left behind:\n{mounts}");
    assert!(
        !Path::new("/run/usernsguard-nspawn").join(&name).exists(),
        "state dir left behind"
    );
    for hierarchy in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
    ] {
        let cgroup = Path::new(hierarchy).join(format!("usernsguard-nspawn-{name}"));
        assert!(!cgroup.exists(), "cgroup left behind: {}", cgroup.display());
    }
    let procs = Command::new("pgrep").args(["-f", &name]).output().unwrap();
    assert!(
        procs.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}
