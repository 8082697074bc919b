//! The installer against real containerd: Debian 12's 1.6 (config v2) and Debian
//! unstable's 2.1 (config v3), each a private instance started by the test
//! (tests/containerd: its own root, state, socket, config and network namespace). Needs
//! root.
//!
//! For each version: install the handler `runc-1-4-3` for the runc 1.4.3 release of
//! `../shared/runtimes` (a copy placed at the default install path on this host); containerd
//! is restarted exactly once, really (its process stopped and started again with the same
//! arguments, so it reads the changed config); the handler shows in CRI `Status` (2.1: listed,
//! advertising user namespaces; 1.6: in the effective config), and a pod sandbox with a
//! container runs through it over CRI, executing the placed binary. Installing again changes
//! nothing and restarts nothing; uninstalling restarts once more and leaves the config
//! byte-identical to the copy taken before, the drop-in, the binary and the install records
//! gone, and the handler gone from `Status`.
//!
//! A private containerd has no unit, so the restart goes through [`PrivateUnit`], a
//! [`ServiceManager`] that restarts that daemon the way `systemctl restart` would (stop, start
//! with the same command line, wait until it serves) and counts the restarts. The systemd
//! path itself is tested against a real systemd in `systemd_nspawn.rs`.
//!
//! The installer's records (`/var/lib/usernsguard/install`) and the default install path are
//! this host's, as in production; a host-wide lock keeps two runs apart, and a guard removes
//! whatever a failed run left (containerd itself is stopped by [`Containerd`]'s drop).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::containerd::{self, Containerd, Version};
use usernsguard_runtime::cri::checks::{self as cri_checks, PodOutcome, PodProbe, PROBE_LABEL};
use usernsguard_runtime::cri::client::CriClient;
use usernsguard_runtime::host::{HostDir, HostRoot};
use usernsguard_runtime::install::systemd::{
    ActiveState, JobResult, RestartOutcome, ServiceManager, SystemdError, UnitState,
};
use usernsguard_runtime::install::{
    BinarySource, InstallRequest, Installer, Outcome, RestartMode, RestartReport, Timeouts, UninstallRequest,
};
use usernsguard_runtime::probe::evaluate::Judge;
use usernsguard_runtime::userns::IdMapping;
use usernsguard_runtime::{CheckOutcome, Reason};

const HANDLER: &str = "runc-1-4-3";
const UNIT: &str = "usernsguard-test-containerd.service";
const IMAGE: &str = "localhost/usernsguard-probe:test";
const IN_IMAGE: &str = "/usr/local/bin/usernsguard-probe";
/// Where the installer puts the binary by default, and keeps its records (this host's).
const INSTALL_DIR: &str = "/usr/local/lib/usernsguard/runc-1-4-3";
const INSTALLED: &str = "/usr/local/lib/usernsguard/runc-1-4-3/runc-1.4.3";
const RECORDS: &str = "/var/lib/usernsguard/install";
/// Held for the whole test: the records and the install path are host-wide.
const LOCK: &str = "/run/usernsguard-test-install-containerd.lock";

fn image() -> PathBuf {
    containerd::probe_image(
        Path::new(env!("CARGO_BIN_EXE_usernsguard-probe")),
        IMAGE,
        IN_IMAGE,
    )
}

/// Microseconds on a clock that only moves forward, for `ActiveEnterTimestampMonotonic`.
fn monotonic_us(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64 + 1
}

fn realtime_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// systemd's part for a private containerd, which has no unit: `restart` stops the daemon
/// and starts it again with the same command line (tests/containerd's stop.sh with
/// `KEEP_STATE`, start.sh with `UG_KEEP_CONFIG`), waiting until it serves, as
/// `systemctl restart` of a `Type=notify` unit does. Counts restarts and reloads.
struct PrivateUnit<'a> {
    containerd: &'a Containerd,
    base: Instant,
    active_enter_us: u64,
    active_enter_monotonic_us: u64,
    last_result: String,
    restarts: u32,
    reloads: u32,
}

impl<'a> PrivateUnit<'a> {
    fn new(containerd: &'a Containerd) -> Self {
        let base = Instant::now();
        PrivateUnit {
            containerd,
            base,
            active_enter_us: realtime_us(),
            active_enter_monotonic_us: monotonic_us(base),
            last_result: "success".into(),
            restarts: 0,
            reloads: 0,
        }
    }

    fn state(&self) -> UnitState {
        let pid = self.containerd.pid();
        UnitState {
            unit: UNIT.into(),
            load_state: "loaded".into(),
            active_state: if pid.is_some() {
                ActiveState::Active
            } else {
                ActiveState::Failed
            },
            sub_state: if pid.is_some() { "running" } else { "failed" }.into(),
            active_enter_timestamp_us: self.active_enter_us,
            active_enter_timestamp_monotonic_us: self.active_enter_monotonic_us,
            invocation_id: format!("{:032x}", self.restarts),
            main_pid: pid.unwrap_or(0),
            result: self.last_result.clone(),
            n_restarts: 0,
            timeout_start_us: 90_000_000,
            timeout_stop_us: 90_000_000,
        }
    }

    fn check_unit(unit: &str) -> Result<(), SystemdError> {
        if unit == UNIT {
            Ok(())
        } else {
            Err(SystemdError::NoSuchUnit { unit: unit.into() })
        }
    }
}

impl ServiceManager for PrivateUnit<'_> {
    fn daemon_reload(&mut self) -> Result<(), SystemdError> {
        self.reloads += 1;
        Ok(())
    }

    fn unit_state(&mut self, unit: &str) -> Result<UnitState, SystemdError> {
        Self::check_unit(unit)?;
        Ok(self.state())
    }

    fn restart(&mut self, unit: &str, _timeout: Duration) -> Result<RestartOutcome, SystemdError> {
        Self::check_unit(unit)?;
        let before = self.state();
        let started = Instant::now();
        self.restarts += 1;
        let job_result = match self.containerd.try_restart() {
            Ok(()) => {
                self.active_enter_us = realtime_us();
                self.active_enter_monotonic_us = monotonic_us(self.base);
                self.last_result = "success".into();
                JobResult::Done
            }
            Err(e) => {
                eprintln!("restart of {} failed: {e}", self.containerd.name);
                self.last_result = "exit-code".into();
                JobResult::Failed
            }
        };
        Ok(RestartOutcome {
            job: format!("/org/usernsguard/test/job/{}", self.restarts),
            job_result,
            before,
            after: self.state(),
            job_duration: started.elapsed(),
            reconnects: 0,
        })
    }
}

/// Counts how often a file is opened (an `execve` of it included): inotify `IN_OPEN`.
struct Opens {
    fd: OwnedFd,
}

impl Opens {
    fn watch(path: &Path) -> Opens {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: plain syscalls; the descriptor is owned by the OwnedFd right away.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `c` is NUL-terminated and outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_OPEN) };
        assert!(
            wd >= 0,
            "inotify_add_watch {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Opens { fd }
    }

    fn count(&self) -> usize {
        use std::io::Read;
        let mut file = File::from(self.fd.try_clone().unwrap());
        let (mut n, mut buf) = (0, [0u8; 4096]);
        // Events carry no name for a watched file: 16 bytes each.
        while let Ok(len) = file.read(&mut buf) {
            if len == 0 {
                break;
            }
            n += len / std::mem::size_of::<libc::inotify_event>();
        }
        n
    }
}

/// The host-wide part of a run: the lock, and on a failed run the removal of whatever the
/// installer left on this host (records, the placed binary).
struct HostState {
    _lock: File,
}

impl HostState {
    fn claim() -> HostState {
        let lock = File::create(LOCK).unwrap();
        lock.lock().unwrap();
        // A run killed outright (SIGKILL, no unwinding) may have left its records; they
        // name a config of a private instance. Anything else is not ours to remove.
        let manifest = Path::new(RECORDS).join(format!("{HANDLER}.json"));
        if let Ok(text) = std::fs::read_to_string(&manifest) {
            assert!(
                text.contains("\"/run/usernsguard-test/"),
                "{} exists and is not from this test; remove it (or uninstall {HANDLER}) first:\n{text}",
                manifest.display()
            );
            eprintln!("removing the records of a killed earlier run");
            Self::remove_leftovers();
        }
        assert!(
            !Path::new(INSTALL_DIR).exists(),
            "{INSTALL_DIR} exists and no usernsguard record owns it; remove it first"
        );
        HostState { _lock: lock }
    }

    fn remove_leftovers() {
        let records = Path::new(RECORDS);
        let _ = std::fs::remove_file(records.join(format!("{HANDLER}.json")));
        let _ = std::fs::remove_dir_all(records.join(HANDLER));
        let _ = std::fs::remove_dir_all(INSTALL_DIR);
        for d in [RECORDS, "/var/lib/usernsguard", "/usr/local/lib/usernsguard"] {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        if std::thread::panicking() {
            Self::remove_leftovers();
        }
    }
}

fn install_req(config: &Path) -> InstallRequest {
    InstallRequest {
        handler: HANDLER.into(),
        binary: BinarySource::Local(containerd::shared_runtime("runc-1.4.3")),
        install_path: None,
        sha256: None,
        cri_config: config.to_owned(),
        restart: RestartMode::Systemd {
            unit: Some(UNIT.into()),
        },
        cri_socket: None,
    }
}

fn uninstall_req(config: &Path) -> UninstallRequest {
    UninstallRequest {
        handler: HANDLER.into(),
        cri_config: config.to_owned(),
        restart: RestartMode::Systemd {
            unit: Some(UNIT.into()),
        },
        cri_socket: None,
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        cri: Duration::from_secs(30),
        ..Timeouts::default()
    }
}

fn restarted(o: &Outcome) -> &RestartOutcome {
    match &o.restart {
        RestartReport::Restarted(r) => r,
        other => panic!("expected a restart, got {other:?}"),
    }
}

/// What containerd's CRI `Status` says about the handler: listed (with its user-namespace
/// feature), and its `BinaryName` in the effective config.
#[derive(Debug, PartialEq)]
struct Seen {
    listed: Option<Option<bool>>,
    binary_name: Option<String>,
}

fn status(socket: &Path) -> Seen {
    let mut client = CriClient::connect(socket, Duration::from_secs(10)).unwrap();
    let (handlers, config) = client.status_verbose().unwrap();
    let config = config.expect("Status(verbose) carries the effective config");
    Seen {
        listed: handlers
            .iter()
            .find(|h| h.name == HANDLER)
            .map(|h| h.user_namespaces),
        binary_name: config["containerd"]["runtimes"][HANDLER]["options"]["BinaryName"]
            .as_str()
            .map(str::to_owned),
    }
}

/// Identity and times of a file: equal before and after means it was not written.
fn stat(path: &Path) -> (u64, i64, i64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.ino(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec())
}

/// One pod sandbox with a user namespace and one container, the payload printing what it
/// sees, run through `HANDLER` and removed.
fn run_pod(cd: &Containerd, log_dir: &Path) -> PodOutcome {
    let mut client = CriClient::connect(&cd.socket, Duration::from_secs(30)).unwrap();
    let probe = PodProbe {
        image: IMAGE.into(),
        command: vec![IN_IMAGE.into()],
        log_dir: HostDir {
            local: log_dir.to_owned(),
            host: log_dir.to_owned(),
        },
        uid: IdMapping::pod(0x7300_0000),
        gid: IdMapping::pod(0x7300_0000),
        timeout: Duration::from_secs(30),
    };
    let outcome = cri_checks::run_pod(&mut client, &HostRoot::own(), HANDLER, &probe);
    let left = client
        .list_pods(HashMap::from([(PROBE_LABEL.to_owned(), "true".to_owned())]))
        .unwrap();
    assert!(left.is_empty(), "the pod was not removed: {left:?}");
    outcome
}

fn install_run_reinstall_uninstall(version: Version) {
    common::require_root();
    let t0 = Instant::now();
    let ms = || t0.elapsed().as_millis();
    let _host = HostState::claim();
    let name = match version {
        Version::V16 => "ug-install16",
        Version::V21 => "ug-install21",
    };
    let runc = ("runc".to_owned(), PathBuf::from("/usr/sbin/runc"));
    let cd = Containerd::start(name, version, &[runc], false, &[image()]);
    eprintln!("[{} ms] {name} started", ms());
    let config = cd.config.clone();
    let state_dir = config.parent().unwrap().to_owned();
    let drop_in = state_dir.join(format!("conf.d/usernsguard-{HANDLER}.toml"));
    let original = std::fs::read(&config).unwrap();
    assert!(!state_dir.join("conf.d").exists());
    let before = status(&cd.socket);
    assert_eq!(
        before,
        Seen {
            listed: None,
            binary_name: None
        },
        "not registered yet"
    );
    let pid_before = cd.pid().expect("containerd runs");
    let mut unit = PrivateUnit::new(&cd);

    // 1. Install: binary placed, config changed (2.1: a drop-in and its `imports` entry;
    //    1.6: the handler in the root config, since 1.6 would let a drop-in's CRI section
    //    replace the root's), one real restart, the handler live.
    let out = Installer::new(HostRoot::own())
        .with_service_manager(&mut unit)
        .with_timeouts(timeouts())
        .install(&install_req(&config))
        .unwrap_or_else(|e| panic!("install: {e}\ncontainerd log:\n{}", cd.log()));
    eprintln!("[{} ms] installed: {out:?}", ms());
    let mut changed = out.changed.clone();
    changed.sort();
    let text = std::fs::read_to_string(&config).unwrap();
    match version {
        Version::V21 => {
            assert_eq!(changed, vec![drop_in.clone(), config.clone()], "{out:?}");
            assert!(
                text.contains(&format!("imports = [\"{}\"]", drop_in.display())),
                "{text}"
            );
        }
        Version::V16 => {
            assert_eq!(changed, vec![config.clone()], "{out:?}");
            assert!(!drop_in.exists());
            assert!(
                text.starts_with(std::str::from_utf8(&original).unwrap())
                    && text
                        .contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc-1-4-3]"),
                "appended to the root config:\n{text}"
            );
        }
    }
    assert_eq!(out.binary.as_deref(), Some(&*format!("placed {INSTALLED}")));
    assert!(
        out.binary_version
            .as_deref()
            .unwrap_or_default()
            .starts_with("runc version 1.4.3"),
        "{:?}",
        out.binary_version
    );
    let r = restarted(&out);
    assert!(r.succeeded(), "{r}");
    assert!(
        r.after.active_enter_timestamp_us >= r.before.active_enter_timestamp_us,
        "{r}"
    );
    assert_eq!(
        (unit.restarts, unit.reloads),
        (1, 0),
        "exactly one restart, no daemon-reload"
    );
    let pid_after = cd.pid().expect("containerd runs after the restart");
    assert_ne!(pid_after, pid_before, "a new containerd process");
    assert_eq!(r.after.main_pid, pid_after);
    let live = out.live.clone().expect("the handler was checked over CRI");
    let seen = status(&cd.socket);
    assert_eq!(seen.binary_name.as_deref(), Some(INSTALLED), "{seen:?}");
    match version {
        Version::V21 => {
            assert!(
                live.runtime.starts_with("containerd v2.1") || live.runtime.contains(" 2.1"),
                "{live}"
            );
            assert!(live.listed && live.user_namespaces == Some(true), "{live}");
            assert_eq!(seen.listed, Some(Some(true)), "listed, with user namespaces");
        }
        Version::V16 => {
            assert!(live.runtime.contains("1.6"), "{live}");
            assert!(
                live.configured && !live.listed && live.user_namespaces.is_none(),
                "{live}"
            );
            assert_eq!(seen.listed, None, "containerd 1.6 lists no handlers");
        }
    }

    // 2. A pod through the handler, over CRI: the sandbox and its container run with the
    //    binary the installer placed.
    let logs = tempfile::tempdir().unwrap();
    let opens = Opens::watch(Path::new(INSTALLED));
    let pod = run_pod(&cd, &logs.path().join("pod"));
    let execs = opens.count();
    drop(opens);
    eprintln!(
        "[{} ms] pod through {HANDLER}: {pod:?}; {INSTALLED} opened {execs} times",
        ms()
    );
    assert!(execs > 0, "the pod did not run {INSTALLED}");
    let PodOutcome::Observed(obs) = &pod else {
        panic!(
            "the pod did not run through {HANDLER}: {pod:?}\ncontainerd log:\n{}",
            cd.log()
        );
    };
    let judged = cri_checks::judge_pod(
        &pod,
        &Judge {
            uid: IdMapping::pod(0x7300_0000),
            runtime: "containerd with runc 1.4.3",
            selinux_labels: false,
        },
    );
    match version {
        // A user-namespaced pod, /dev/mqueue owned by its root: runc 1.4.3, not Debian's
        // 1.1.5 (whose pods fail here with idmap_unsupported).
        Version::V21 => {
            assert_eq!(judged.result, CheckOutcome::Pass, "{}", judged.message);
            assert!(obs.uid_map.contains(&0x7300_0000u32.to_string()), "{obs:?}");
        }
        // containerd 1.6 ignores the user-namespace request: the pod runs, as the host.
        Version::V16 => {
            assert_eq!(
                (judged.result, judged.reason),
                (CheckOutcome::Fail, Some(Reason::UsernsUnsupported)),
                "{}",
                judged.message
            );
            assert!(obs.uid_map.contains("4294967295"), "{obs:?}");
        }
    }

    // 3. Install again: nothing to do, no file touched, no restart.
    let mut files = vec![config.clone(), PathBuf::from(INSTALLED)];
    if version == Version::V21 {
        files.push(drop_in.clone());
    }
    let stats: Vec<_> = files.iter().map(|f| stat(f)).collect();
    let again = Installer::new(HostRoot::own())
        .with_service_manager(&mut unit)
        .with_timeouts(timeouts())
        .install(&install_req(&config))
        .unwrap();
    eprintln!("[{} ms] installed again: {again:?}", ms());
    assert!(again.unchanged(), "{again:?}");
    assert_eq!(again.restart, RestartReport::NotNeeded);
    assert_eq!(unit.restarts, 1, "no second restart");
    assert_eq!(cd.pid(), Some(pid_after), "the same containerd process");
    assert_eq!(
        files.iter().map(|f| stat(f)).collect::<Vec<_>>(),
        stats,
        "no file written"
    );

    // 4. Uninstall: one more restart; the config byte-identical to before, everything the
    //    install added gone, and containerd no longer has the handler.
    let gone = Installer::new(HostRoot::own())
        .with_service_manager(&mut unit)
        .with_timeouts(timeouts())
        .uninstall(&uninstall_req(&config))
        .unwrap_or_else(|e| panic!("uninstall: {e}\ncontainerd log:\n{}", cd.log()));
    eprintln!("[{} ms] uninstalled: {gone:?}", ms());
    assert!(restarted(&gone).succeeded(), "{}", restarted(&gone));
    assert_eq!(unit.restarts, 2);
    assert_ne!(
        cd.pid(),
        Some(pid_after),
        "containerd was restarted for the uninstall"
    );
    assert_eq!(gone.binary.as_deref(), Some(&*format!("removed {INSTALLED}")));
    let live = gone
        .live
        .clone()
        .expect("the handler's absence was checked over CRI");
    assert!(!live.listed && !live.configured, "{live}");
    assert!(
        std::fs::read(&config).unwrap() == original,
        "the config is not byte-identical to before:\n{}",
        std::fs::read_to_string(&config).unwrap()
    );
    assert!(
        !drop_in.exists() && !state_dir.join("conf.d").exists(),
        "the drop-in is gone"
    );
    assert!(!Path::new(INSTALL_DIR).exists(), "{INSTALL_DIR} is gone");
    assert!(!Path::new(RECORDS).join(format!("{HANDLER}.json")).exists());
    assert!(!Path::new(RECORDS).join(HANDLER).exists());
    assert_eq!(status(&cd.socket), before, "containerd no longer has the handler");
    drop(unit);
    drop(cd);
    eprintln!("[{} ms] {name} stopped", ms());
}

// The two share this host's install records and path (and the lock): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn containerd_1_6_install_registers_runs_and_uninstall_restores() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_run_reinstall_uninstall(Version::V16);
}

#[test]
fn containerd_2_1_install_registers_runs_and_uninstall_restores() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_run_reinstall_uninstall(Version::V21);
}
