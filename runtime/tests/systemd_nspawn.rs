//! `SystemdBus` and the installer's systemd path against a real systemd: Debian 12 booted
//! with `systemd-nspawn -b` (tests/nspawn/), systemd 252 as its PID 1 and Debian's
//! containerd 1.6 as a unit. Needs root, debootstrap and systemd-container
//! (scripts/install-deps.sh); builds the cached root the first time (network, about a
//! minute). Fails, never skips, when the rig cannot come up.
//!
//! Two tests, each in a container of its own: restarts through the private socket
//! ([`restart_containerd_through_the_private_socket`]), and `Installer` with the container
//! as its host root (`/proc/<init>/root`) installing runc 1.4.3 for that containerd,
//! again, uninstalling, and rolled back when the unit does not start with its change
//! ([`install_through_the_containers_systemd`]).
//!
//! The client runs inside the container's PID namespace: systemd drops a private-socket
//! peer whose PID it cannot see, and from the container's systemd this test's PID is
//! invisible (a pod's agent is in a child of the host's PID namespace, which the host's
//! systemd sees). So each step re-executes this test binary through
//! `nsenter -t <init> -p` (this binary has its own `main`: see [`child`]), which reaches the socket as
//! `/proc/<init>/root/run/systemd/private` (host mount namespace, host /proc) and prints
//! its result as JSON.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use usernsguard_runtime::cri::client::CriClient;
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::binary::check_runnable;
use usernsguard_runtime::install::systemd::{
    RestartOutcome, ServiceManager, SystemdBus, SystemdError, UnitState,
};
use usernsguard_runtime::install::{
    BinarySource, InstallError, InstallRequest, Installer, Outcome, RestartMode, RestartReport, Timeouts,
    UninstallRequest,
};
use usernsguard_runtime::process;

/// Set (to the operation) only in the re-executed child.
const CHILD_OP: &str = "USERNSGUARD_NSPAWN_CHILD_OP";
const CHILD_SOCKET: &str = "USERNSGUARD_NSPAWN_CHILD_SOCKET";
/// The container's root as this process sees it (`/proc/<init>/root`): the installer's host.
const CHILD_ROOT: &str = "USERNSGUARD_NSPAWN_CHILD_ROOT";
/// The runtime binary the installing child places.
const CHILD_BINARY: &str = "USERNSGUARD_NSPAWN_CHILD_BINARY";
const HANDLER: &str = "runc-1-4-3";
/// Where the installer puts the binary by default, relative to the container's root.
const INSTALLED: &str = "usr/local/lib/usernsguard/runc-1-4-3/runc-1.4.3";
const CONFIG: &str = "/etc/containerd/config.toml";
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
            .env(CHILD_SOCKET, self.socket())
            .env(CHILD_ROOT, self.root());
        cmd
    }

    /// A file of the container, by its path there.
    fn file(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// The container's containerd over CRI (its socket, reached through its root).
    fn cri(&self) -> CriClient {
        CriClient::connect(
            &self.file("/run/containerd/containerd.sock"),
            Duration::from_secs(10),
        )
        .expect("the container's containerd answers over CRI")
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
            install_through_the_containers_systemd();
            println!("test install_through_the_containers_systemd ... ok");
            println!("test result: ok. 2 passed; 0 failed");
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
    if matches!(verb, "install" | "uninstall") {
        let mut out = install_child(verb);
        out["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
        println!("{RESULT_PREFIX}{out}");
        return;
    }
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

fn restart_json(o: &RestartOutcome) -> Json {
    json!({
        "job": o.job,
        "job_result": o.job_result.as_str(),
        "succeeded": o.succeeded(),
        "before": state_json(&o.before),
        "after": state_json(&o.after),
        "summary": o.to_string(),
    })
}

fn outcome_json(o: &Outcome) -> Json {
    json!({
        "unchanged": o.unchanged(),
        "changed": o.changed,
        "binary": o.binary,
        "binary_version": o.binary_version,
        "restart": match &o.restart {
            RestartReport::NotNeeded => json!("not_needed"),
            RestartReport::Operator { units } => json!({ "operator": units }),
            RestartReport::Restarted(r) => restart_json(r),
        },
        "live": o.live.as_ref().map(|l| json!({
            "listed": l.listed,
            "configured": l.configured,
            "runtime": l.runtime,
            "summary": l.to_string(),
        })),
        "notes": o.notes,
    })
}

fn install_error_json(e: &InstallError) -> Json {
    let rollback_restart = match e {
        InstallError::RolledBack { restart: Some(r), .. } => restart_json(r),
        _ => Json::Null,
    };
    json!({
        "install_error": {
            "class": format!("{:?}", e.class()),
            "label": e.label(),
            "message": e.to_string(),
            "rollback_restart": rollback_restart,
        }
    })
}

/// The installing child: `Installer` on the container's root, restarting its containerd
/// through its systemd, as `usernsguard install --host-root /proc/<init>/root` would.
fn install_child(verb: &str) -> Json {
    let root = std::env::var(CHILD_ROOT).expect("root path");
    let host = HostRoot::at(&root).expect("the container's root as host root");
    assert!(!host.is_own(), "{root} taken for this process's own root");
    let mut bus = SystemdBus::for_host_root(host.root());
    let restart = RestartMode::Systemd { unit: None };
    let mut installer = Installer::new(host)
        .with_service_manager(&mut bus)
        .with_timeouts(Timeouts {
            restart: Duration::from_secs(120),
            cri: Duration::from_secs(30),
            version: Duration::from_secs(10),
            ..Timeouts::default()
        });
    let result = match verb {
        "install" => installer.install(&InstallRequest {
            handler: HANDLER.into(),
            binary: BinarySource::Local(PathBuf::from(std::env::var(CHILD_BINARY).expect("binary"))),
            install_path: None,
            sha256: None,
            cri_config: PathBuf::from(CONFIG),
            restart,
            cri_socket: None,
        }),
        _ => installer.uninstall(&UninstallRequest {
            handler: HANDLER.into(),
            cri_config: PathBuf::from(CONFIG),
            restart,
            cri_socket: None,
        }),
    };
    match result {
        Ok(o) => json!({ "outcome": outcome_json(&o) }),
        Err(e) => install_error_json(&e),
    }
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

/// Every file under the container's `dir`, with its bytes (empty when `dir` is missing).
fn tree(ct: &Container, dir: &str) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(d: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                out.insert(p.clone(), Vec::new());
                walk(&p, out);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(&ct.file(dir), &mut out);
    out
}

/// What the installer may touch in the container: containerd's config, the install path,
/// its records.
fn installer_files(ct: &Container) -> Vec<std::collections::BTreeMap<PathBuf, Vec<u8>>> {
    [
        "/etc/containerd",
        "/usr/local/lib/usernsguard",
        "/var/lib/usernsguard",
    ]
    .iter()
    .map(|d| tree(ct, d))
    .collect()
}

/// `ActiveEnterTimestampMonotonic` of containerd as the container's own systemctl shows it.
fn active_since(ct: &Container) -> u64 {
    ct.systemctl(&["show", "-P", "ActiveEnterTimestampMonotonic", CONTAINERD])
        .parse()
        .expect("a timestamp")
}

/// The handler's `BinaryName` in the container's containerd's effective config (1.6 lists
/// no handlers in `Status`).
fn registered_binary(ct: &Container) -> Option<String> {
    let (_, config) = ct.cri().status_verbose().unwrap();
    config.expect("Status(verbose) carries the config")["containerd"]["runtimes"][HANDLER]["options"]
        ["BinaryName"]
        .as_str()
        .map(str::to_owned)
}

impl Container {
    fn install_op(&self, verb: &str) -> Json {
        let mut cmd = self.child_command(verb);
        cmd.env(CHILD_BINARY, common::containerd::shared_runtime("runc-1.4.3"));
        let out = cmd.output().expect("run nsenter");
        parse_child(verb, out.status.success(), &out.stdout, &out.stderr)
    }
}

/// The installer with the container as its host (`HostRoot::at("/proc/<init>/root")`, in
/// another mount namespace) and the container's systemd as its service manager, run in the
/// container's PID namespace: install, install again, uninstall, and an install whose
/// change the unit refuses to start with, rolled back.
fn install_through_the_containers_systemd() {
    let t0 = Instant::now();
    let ct = Container::boot(&format!("ung-inst-{}", std::process::id()));
    eprintln!("[{} ms] booted, container init is host pid {}", ms(t0), ct.init);

    // Host programs run inside the container's root, though its mounts are in another
    // mount namespace: a program only the container has, and its view of /etc.
    let host = HostRoot::at(ct.root()).unwrap();
    assert!(
        !host.is_own(),
        "/proc/<init>/root is not this process's root: {host:?}"
    );
    assert_eq!(host.root(), ct.root());
    let probe = ct.file("/usr/local/bin/ug-where");
    std::fs::write(
        &probe,
        "#!/bin/sh\necho \"$(cat /etc/hostname) $(readlink /proc/self/ns/mnt)\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&probe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let seen = check_runnable(
        &host,
        Path::new("/usr/local/bin/ug-where"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("--version inside the container's root: {e}"));
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert!(
        seen.starts_with("usernsguard-ct "),
        "not run in the container's root: {seen}"
    );
    assert_ne!(
        seen.split(' ').nth(1),
        ours.to_str(),
        "a private mount namespace, not ours"
    );
    std::fs::remove_file(&probe).unwrap();

    let pristine = installer_files(&ct);
    let config = std::fs::read(ct.file(CONFIG)).unwrap();
    assert_eq!(registered_binary(&ct), None);
    let since0 = active_since(&ct);

    // 1. Install: one restart through the container's systemd, its job waited for; the new
    //    ActiveEnterTimestamp reported (as systemctl shows it); the handler live.
    let t = Instant::now();
    let first = ct.install_op("install");
    eprintln!("[{} ms] install ({} ms): {first}", ms(t0), ms(t));
    let o = &first["outcome"];
    assert!(o.is_object(), "install failed: {first}");
    assert_eq!(o["changed"], json!([CONFIG]), "{o}");
    assert_eq!(o["binary"], json!(format!("placed /{INSTALLED}")), "{o}");
    assert!(
        o["binary_version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("runc version 1.4.3"),
        "the binary ran inside the container's root: {o}"
    );
    let r = &o["restart"];
    assert_eq!(r["job_result"], "done", "{r}");
    assert_eq!(r["succeeded"], true, "{r}");
    let mono = |r: &Json, when: &str| r[when]["active_enter_timestamp_monotonic_us"].as_u64().unwrap();
    let real = |r: &Json, when: &str| r[when]["active_enter_timestamp_us"].as_u64().unwrap();
    assert_eq!(mono(r, "before"), since0, "{r}");
    assert!(
        mono(r, "after") > mono(r, "before") && real(r, "after") > real(r, "before"),
        "{r}"
    );
    assert_eq!(
        mono(r, "after"),
        active_since(&ct),
        "the reported timestamp is the unit's"
    );
    assert_ne!(r["after"]["main_pid"], r["before"]["main_pid"], "{r}");
    assert_eq!(o["live"]["configured"], true, "{o}");
    assert!(
        o["live"]["runtime"]
            .as_str()
            .unwrap()
            .starts_with("containerd 1.6"),
        "{o}"
    );
    assert!(ct.file(INSTALLED).exists());
    assert_eq!(registered_binary(&ct).as_deref(), Some(&*format!("/{INSTALLED}")));

    // 2. Again: nothing to do, no restart.
    let since1 = active_since(&ct);
    let installed = installer_files(&ct);
    let again = ct.install_op("install");
    eprintln!("[{} ms] install again: {again}", ms(t0));
    assert_eq!(again["outcome"]["unchanged"], true, "{again}");
    assert_eq!(again["outcome"]["restart"], "not_needed", "{again}");
    assert_eq!(active_since(&ct), since1, "containerd was not restarted");
    assert!(installer_files(&ct) == installed, "a file changed");

    // 3. Uninstall: one more restart, every file as it was before the install.
    let gone = ct.install_op("uninstall");
    eprintln!("[{} ms] uninstall: {gone}", ms(t0));
    let r = &gone["outcome"]["restart"];
    assert_eq!(r["succeeded"], true, "{gone}");
    assert!(mono(r, "after") > since1, "{r}");
    assert_eq!(gone["outcome"]["live"]["configured"], false, "{gone}");
    assert!(
        std::fs::read(ct.file(CONFIG)).unwrap() == config,
        "config not byte-identical"
    );
    assert!(installer_files(&ct) == pristine, "not every file restored");
    assert_eq!(registered_binary(&ct), None);

    // 4. A unit that does not start with the installer's change: a site policy run before
    //    containerd starts refuses a config that registers usernsguard's handler. The
    //    install's restart fails, the installer restores every file and restarts again.
    let policy = ct.file("/etc/systemd/system/containerd.service.d/50-config-policy.conf");
    std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
    std::fs::write(
        &policy,
        "[Service]\nExecStartPre=/bin/sh -c '! grep -q usernsguard /etc/containerd/config.toml || \
         { echo \"site policy: no usernsguard handlers\" >&2; exit 1; }'\n",
    )
    .unwrap();
    ct.systemctl(&["daemon-reload"]);
    assert_eq!(ct.systemctl(&["is-active", CONTAINERD]), "active");
    let since2 = active_since(&ct);
    let t = Instant::now();
    let refused = ct.install_op("install");
    eprintln!(
        "[{} ms] install under the policy ({} ms): {refused}",
        ms(t0),
        ms(t)
    );
    let e = &refused["install_error"];
    assert_eq!(e["class"], "RolledBack", "{refused}");
    assert_eq!(e["label"], "restart_failed", "{refused}");
    assert!(
        e["message"].as_str().unwrap().contains("job failed"),
        "the failed start job is named: {e}"
    );
    let back = &e["rollback_restart"];
    assert_eq!(back["succeeded"], true, "restarted on the restored config: {e}");
    assert!(mono(back, "after") > since2, "{back}");
    assert!(
        std::fs::read(ct.file(CONFIG)).unwrap() == config,
        "config not byte-identical"
    );
    assert!(installer_files(&ct) == pristine, "not every file restored");
    assert_eq!(ct.systemctl(&["is-active", CONTAINERD]), "active");
    assert_eq!(registered_binary(&ct), None, "containerd serves the old config");
    let journal = Command::new("nsenter")
        .args([
            "-t",
            &ct.init.to_string(),
            "-a",
            "journalctl",
            "-u",
            CONTAINERD,
            "--no-pager",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&journal.stdout).contains("site policy: no usernsguard handlers"),
        "the policy refused the start:\n{}",
        String::from_utf8_lossy(&journal.stdout)
    );
    eprintln!("[{} ms] rolled back, containerd active on the old config", ms(t0));
}
