//! Restarting the CRI runtime's unit through systemd's own D-Bus API, on PID 1's private
//! socket (`/run/systemd/private`), and judging from systemd's answers whether it came back.
//!
//! The installer restarts containerd or CRI-O only when their effective config changed, and
//! only this way: `daemon-reload` when it wrote a unit drop-in, `RestartUnit`, waiting for
//! that job's `JobRemoved`, then reading the unit's state. Never a signal: containerd exits
//! on SIGHUP (systemd counts it as a clean exit, so under `Restart=on-failure` it stays
//! down) and CRI-O's SIGHUP reload registers handlers that then fail to run pods. Nothing in
//! this module can send a signal to a process.
//!
//! Why the private socket: it needs neither dbus-daemon nor polkit, and works while the
//! system bus is down or restarting. systemd accepts a peer there only if it is uid 0 and
//! its PID is visible from systemd's PID namespace: the agent's pod (hostUsers: true, uid 0,
//! with or without hostPID) qualifies, because its PID namespace is a child of the host's.
//! The client is our own (`dbus.rs`, a few hundred lines) because on private connections
//! systemd stamps every message with `Sender=org.freedesktop.systemd1`, which zbus rejects.
//!
//! When the restart worked, as measured against systemd 252 and containerd 1.6
//! (`Type=notify`, `Restart=always`, `RestartSec=5`): the job result is `done`, the unit is
//! `active` and its `ActiveEnterTimestamp` advanced (compared on CLOCK_MONOTONIC). With a config containerd cannot load,
//! the job result is `failed` about 60 ms after `RestartUnit`, and the unit then sits in
//! `activating`/`auto-restart` for good (it never reaches `failed` at `RestartSec=5`), so
//! the verdict is taken from the job result, not by waiting for `failed`.
//!
//! Before each restart the unit's start rate limit is reset (`Unit.ResetFailed`): with
//! systemd's default of 5 starts in 10 s, a fifth restart of containerd within 10 s of boot
//! was refused with `start-limit-hit` (measured), after which the unit stays `failed` and is
//! not restarted automatically. The installer restarts only when a config changed, plus at
//! most one rollback, so this does not defeat crash-loop protection.
//!
//! Connections: every [`ServiceManager`] call opens its own connection and closes it, so a
//! `daemon-reexec` (or PID 1 restarting) between calls costs nothing. A reexec during a
//! call closes the connection: a call that was not waiting for a job fails with
//! [`SystemdError::Disconnected`] (callers read the state again); [`SystemdBus::restart`],
//! which spends nearly all its time waiting for its job, reconnects (retrying until its
//! deadline, since the socket is busy while the new PID 1 starts), subscribes again and
//! asks whether the job still exists (systemd carries jobs across a reexec). If it does, it
//! goes on waiting; if not, the job ended unseen and the outcome says
//! [`JobResult::Unobserved`], judged on the unit's state alone.

mod dbus;
#[cfg(any(test, feature = "testing"))]
mod fake;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dbus::{Connection, DbusError, Value};
#[cfg(any(test, feature = "testing"))]
pub use fake::{FakeServiceManager, RestartScript, ServiceCall};

/// systemd's private socket, relative to the host root.
pub const PRIVATE_SOCKET: &str = "run/systemd/private";

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const SERVICE: &str = "org.freedesktop.systemd1.Service";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// Waiting for a restart job: the unit's stop and start timeouts plus this.
const JOB_MARGIN: Duration = Duration::from_secs(5);
/// The longest any single method call may take (sd-bus's default is 25 s).
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// `daemon-reload` answers only once the reload finished; systemctl waits up to 6 minutes.
const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(360);
/// Reconnects per restart after the connection dropped (a reexec needs one).
const MAX_RECONNECTS: u32 = 5;

/// What the installer needs from the host's service manager.
///
/// Implemented by [`SystemdBus`] (the real thing) and, for tests, by `FakeServiceManager`
/// (feature `testing`), which records calls and plays scripted outcomes. Calls block.
pub trait ServiceManager {
    /// `systemctl daemon-reload`: returns once systemd has reloaded its unit files. Needed
    /// only after unit files or drop-ins changed, not after a runtime's own config did.
    fn daemon_reload(&mut self) -> Result<(), SystemdError>;

    /// A consistent snapshot of `unit`'s state.
    fn unit_state(&mut self, unit: &str) -> Result<UnitState, SystemdError>;

    /// Restarts `unit` (its start rate limit reset first, then `RestartUnit` in mode
    /// `replace`, which also takes over a pending automatic restart) and waits for the
    /// restart job to end, for at most `timeout` and at most the unit's own stop and start
    /// timeouts plus a margin. Whether the unit came back is [`RestartOutcome::succeeded`].
    /// An `Err` means the outcome is unknown (read [`ServiceManager::unit_state`] to learn
    /// more); after [`SystemdError::Timeout`] the job may still be queued or running.
    fn restart(&mut self, unit: &str, timeout: Duration) -> Result<RestartOutcome, SystemdError>;
}

/// A unit's `ActiveState`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActiveState {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    Maintenance,
    Refreshing,
    /// A state this code does not know (a newer systemd).
    Other(String),
}

impl ActiveState {
    /// Parses systemd's spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "active" => ActiveState::Active,
            "reloading" => ActiveState::Reloading,
            "inactive" => ActiveState::Inactive,
            "failed" => ActiveState::Failed,
            "activating" => ActiveState::Activating,
            "deactivating" => ActiveState::Deactivating,
            "maintenance" => ActiveState::Maintenance,
            "refreshing" => ActiveState::Refreshing,
            other => ActiveState::Other(other.to_owned()),
        }
    }

    /// systemd's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ActiveState::Active => "active",
            ActiveState::Reloading => "reloading",
            ActiveState::Inactive => "inactive",
            ActiveState::Failed => "failed",
            ActiveState::Activating => "activating",
            ActiveState::Deactivating => "deactivating",
            ActiveState::Maintenance => "maintenance",
            ActiveState::Refreshing => "refreshing",
            ActiveState::Other(s) => s,
        }
    }
}

impl fmt::Display for ActiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One snapshot of a unit, read with one `GetAll` per interface: separate `Get`s are not
/// atomic (they were seen mixing `SubState=auto-restart` with the old `MainPID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// The unit's name, as asked for.
    pub unit: String,
    /// `LoadState`: `loaded`, `not-found`, `masked`, ...
    pub load_state: String,
    pub active_state: ActiveState,
    /// `SubState`: `running`, `auto-restart`, `start-pre`, ...
    pub sub_state: String,
    /// `ActiveEnterTimestamp`: when the unit last became active, µs since the epoch
    /// (CLOCK_REALTIME), 0 if never.
    pub active_enter_timestamp_us: u64,
    /// The same moment on CLOCK_MONOTONIC, which clock steps cannot move; what
    /// [`RestartOutcome::succeeded`] compares.
    pub active_enter_timestamp_monotonic_us: u64,
    /// `InvocationID` in hex; it changes on every start attempt, failed ones included.
    pub invocation_id: String,
    /// Service `MainPID` as systemd sees it (its PID namespace), 0 if none.
    pub main_pid: u32,
    /// Service `Result`: `success`, `exit-code`, `signal`, `timeout`, ... (empty for
    /// units that are not services).
    pub result: String,
    /// Service `NRestarts`: automatic restarts only; a manual restart does not reset it.
    pub n_restarts: u32,
    /// Service `TimeoutStartUSec` (`u64::MAX` = infinity; 0 for units that are not services).
    pub timeout_start_us: u64,
    /// Service `TimeoutStopUSec`.
    pub timeout_stop_us: u64,
}

impl fmt::Display for UnitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.unit, self.active_state, self.sub_state)?;
        if !self.result.is_empty() {
            write!(f, " result={}", self.result)?;
        }
        write!(
            f,
            " main-pid={} active-since={}",
            self.main_pid, self.active_enter_timestamp_us
        )
    }
}

/// How systemd ended a job (`JobRemoved`'s result).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobResult {
    /// The job did what it was asked to (for `Type=notify` services: the service sent READY).
    Done,
    Failed,
    Canceled,
    Timeout,
    Dependency,
    Skipped,
    /// The job ended while our connection was down (daemon-reexec); only the unit's state
    /// tells what happened.
    Unobserved,
    /// A result this code does not know.
    Other(String),
}

impl JobResult {
    /// Parses systemd's spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "done" => JobResult::Done,
            "failed" => JobResult::Failed,
            "canceled" => JobResult::Canceled,
            "timeout" => JobResult::Timeout,
            "dependency" => JobResult::Dependency,
            "skipped" => JobResult::Skipped,
            other => JobResult::Other(other.to_owned()),
        }
    }

    /// systemd's spelling (`unobserved` is ours).
    pub fn as_str(&self) -> &str {
        match self {
            JobResult::Done => "done",
            JobResult::Failed => "failed",
            JobResult::Canceled => "canceled",
            JobResult::Timeout => "timeout",
            JobResult::Dependency => "dependency",
            JobResult::Skipped => "skipped",
            JobResult::Unobserved => "unobserved",
            JobResult::Other(s) => s,
        }
    }
}

impl fmt::Display for JobResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a restart did: the job's result and the unit before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartOutcome {
    /// The restart job's object path (`/org/freedesktop/systemd1/job/<id>`).
    pub job: String,
    pub job_result: JobResult,
    /// Read after subscribing, just before `RestartUnit`.
    pub before: UnitState,
    /// Read right after the job ended.
    pub after: UnitState,
    /// From `RestartUnit` to `JobRemoved` (or to the reconnect that found the job gone).
    pub job_duration: Duration,
    /// How often the connection was re-established while waiting (daemon-reexec).
    pub reconnects: u32,
}

impl RestartOutcome {
    /// The unit was restarted and is up: the job is `done` (or ended unseen), the unit is
    /// `active`, and it became active after the snapshot taken before the restart.
    /// `InvocationID` alone proves nothing: it changes on failed start attempts too.
    pub fn succeeded(&self) -> bool {
        matches!(self.job_result, JobResult::Done | JobResult::Unobserved)
            && self.after.active_state == ActiveState::Active
            && self.timestamp_advanced()
    }

    /// Whether the unit entered `active` after the `before` snapshot.
    pub fn timestamp_advanced(&self) -> bool {
        self.after.active_enter_timestamp_monotonic_us > self.before.active_enter_timestamp_monotonic_us
    }
}

impl fmt::Display for RestartOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restart of {}: job {} after {} ms; now {}/{}",
            self.after.unit,
            self.job_result,
            self.job_duration.as_millis(),
            self.after.active_state,
            self.after.sub_state
        )?;
        if !self.after.result.is_empty() {
            write!(f, " (result {})", self.after.result)?;
        }
        if self.timestamp_advanced() {
            write!(f, ", active since {}", self.after.active_enter_timestamp_us)
        } else {
            write!(f, ", ActiveEnterTimestamp unchanged")
        }
    }
}

/// Why talking to systemd failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The socket could not be connected to: missing (no systemd, wrong `--host-root`),
    /// refused, or a path longer than a Unix socket address holds (107 bytes).
    #[error("cannot connect to systemd's private socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// systemd closed the connection or rejected us during authentication.
    #[error(
        "systemd at {} refused the connection during authentication ({detail}); it accepts only uid 0 \
         in a PID namespace it can see (the host's or a child of it: a pod with hostUsers: true \
         running as root qualifies)",
        path.display()
    )]
    Auth { path: PathBuf, detail: String },
    /// systemd answered a call with a D-Bus error.
    #[error("systemd answered {method} with {name}: {message}")]
    Remote {
        method: String,
        name: String,
        message: String,
    },
    /// systemd does not know the unit (`NoSuchUnit`, or `LoadState=not-found`).
    #[error("unit {unit} does not exist")]
    NoSuchUnit { unit: String },
    /// No answer in time.
    #[error("no answer from systemd for {what} within {} ms", after.as_millis())]
    Timeout { what: String, after: Duration },
    /// systemd closed the connection (daemon-reexec, PID 1 exiting) in the middle of a call.
    #[error("systemd at {} closed the connection during {what}", path.display())]
    Disconnected { path: PathBuf, what: String },
    /// Any other socket error.
    #[error("talking to systemd at {} during {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    /// Bytes that are not D-Bus, or a reply that does not have the shape the call returns.
    #[error("unexpected answer from systemd to {what}: {detail}")]
    Protocol { what: String, detail: String },
}

/// The real [`ServiceManager`]: systemd on its private socket.
#[derive(Debug, Clone)]
pub struct SystemdBus {
    socket: PathBuf,
    call_timeout: Duration,
    reload_timeout: Duration,
}

impl SystemdBus {
    /// Talks to systemd on `socket` (e.g. `/run/systemd/private`).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        SystemdBus {
            socket: socket.into(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            reload_timeout: DEFAULT_RELOAD_TIMEOUT,
        }
    }

    /// The host's systemd as seen through `host_root` (`<host_root>/run/systemd/private`).
    pub fn for_host_root(host_root: &Path) -> Self {
        Self::new(host_root.join(PRIVATE_SOCKET))
    }

    /// The longest a single method call may take (default 25 s).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The longest `daemon-reload` may take (default 6 minutes, as systemctl).
    pub fn with_reload_timeout(mut self, timeout: Duration) -> Self {
        self.reload_timeout = timeout;
        self
    }

    /// The socket this talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn open(&self, deadline: Instant) -> Result<Session<'_>, SystemdError> {
        let started = Instant::now();
        let deadline = deadline.min(deadline_after(self.call_timeout));
        let conn = Connection::connect(&self.socket, deadline).map_err(|e| match e {
            DbusError::Connect(source) => SystemdError::Connect {
                path: self.socket.clone(),
                source,
            },
            DbusError::Closed => SystemdError::Auth {
                path: self.socket.clone(),
                detail: "connection closed".into(),
            },
            DbusError::AuthRejected(line) => SystemdError::Auth {
                path: self.socket.clone(),
                detail: format!("server answered {line:?}"),
            },
            e => self.error(e, "authentication", started),
        })?;
        tracing::debug!(socket = %self.socket.display(), guid = conn.server_guid(), "connected to systemd");
        Ok(Session { bus: self, conn })
    }

    /// Like [`SystemdBus::open`], retrying while systemd is not accepting (the new PID 1
    /// of a reexec takes a moment to serve the socket it inherited).
    fn reopen(&self, deadline: Instant) -> Result<Session<'_>, SystemdError> {
        let mut pause = Duration::from_millis(20);
        loop {
            match self.open(deadline) {
                Ok(s) => return Ok(s),
                Err(
                    e @ (SystemdError::Connect { .. } | SystemdError::Auth { .. } | SystemdError::Io { .. }),
                ) => {
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "systemd not accepting yet, retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn error(&self, e: DbusError, what: &str, started: Instant) -> SystemdError {
        let what = what.to_owned();
        match e {
            DbusError::Connect(source) => SystemdError::Connect {
                path: self.socket.clone(),
                source,
            },
            DbusError::AuthRejected(line) => SystemdError::Auth {
                path: self.socket.clone(),
                detail: line,
            },
            DbusError::Closed => SystemdError::Disconnected {
                path: self.socket.clone(),
                what,
            },
            DbusError::Io(source) => SystemdError::Io {
                path: self.socket.clone(),
                what,
                source,
            },
            DbusError::Timeout => SystemdError::Timeout {
                what,
                after: started.elapsed(),
            },
            DbusError::Remote { name, message } => SystemdError::Remote {
                method: what,
                name,
                message,
            },
            DbusError::Protocol(detail) => SystemdError::Protocol { what, detail },
        }
    }
}

fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn is_no_such_unit(name: &str) -> bool {
    name == "org.freedesktop.systemd1.NoSuchUnit"
}

/// One connection, and the operations built on it.
struct Session<'a> {
    bus: &'a SystemdBus,
    conn: Connection,
}

impl Session<'_> {
    /// One method call, bounded by both the call timeout and `deadline`.
    fn call(
        &mut self,
        path: &str,
        interface: &str,
        member: &str,
        args: Vec<Value>,
        deadline: Instant,
    ) -> Result<Vec<Value>, SystemdError> {
        let started = Instant::now();
        let deadline = deadline.min(deadline_after(self.bus.call_timeout));
        self.conn
            .call(DESTINATION, path, interface, member, args, deadline)
            .map_err(|e| self.bus.error(e, member, started))
    }

    fn manager(
        &mut self,
        member: &str,
        args: Vec<Value>,
        deadline: Instant,
    ) -> Result<Vec<Value>, SystemdError> {
        self.call(MANAGER_PATH, MANAGER, member, args, deadline)
    }

    fn subscribe(&mut self, deadline: Instant) -> Result<(), SystemdError> {
        self.conn.keep_signals(MANAGER, "JobRemoved");
        self.manager("Subscribe", vec![], deadline).map(drop)
    }

    /// The unit's object path: `GetUnit` for a loaded unit, else `LoadUnit`.
    fn unit_path(&mut self, unit: &str, deadline: Instant) -> Result<String, SystemdError> {
        let arg = || vec![Value::Str(unit.to_owned())];
        let reply = match self.manager("GetUnit", arg(), deadline) {
            Err(SystemdError::Remote { name, .. }) if is_no_such_unit(&name) => {
                self.manager("LoadUnit", arg(), deadline)
            }
            other => other,
        }
        .map_err(|e| match e {
            SystemdError::Remote { name, .. } if is_no_such_unit(&name) => SystemdError::NoSuchUnit {
                unit: unit.to_owned(),
            },
            e => e,
        })?;
        object_path(&reply, "GetUnit")
    }

    fn get_all(&mut self, path: &str, interface: &str, deadline: Instant) -> Result<Props, SystemdError> {
        let reply = self.call(
            path,
            PROPERTIES,
            "GetAll",
            vec![Value::Str(interface.to_owned())],
            deadline,
        )?;
        match reply.into_iter().next() {
            Some(Value::Array { items, .. }) => Ok(Props(items)),
            other => Err(SystemdError::Protocol {
                what: format!("GetAll({interface})"),
                detail: format!("expected a{{sv}}, got {other:?}"),
            }),
        }
    }

    fn state(&mut self, unit: &str, path: &str, deadline: Instant) -> Result<UnitState, SystemdError> {
        let u = self.get_all(path, UNIT, deadline)?;
        let mut state = UnitState {
            unit: unit.to_owned(),
            load_state: u.str("LoadState"),
            active_state: ActiveState::parse(&u.str("ActiveState")),
            sub_state: u.str("SubState"),
            active_enter_timestamp_us: u.u64("ActiveEnterTimestamp"),
            active_enter_timestamp_monotonic_us: u.u64("ActiveEnterTimestampMonotonic"),
            invocation_id: u
                .get("InvocationID")
                .and_then(Value::as_bytes)
                .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
                .unwrap_or_default(),
            main_pid: 0,
            result: String::new(),
            n_restarts: 0,
            timeout_start_us: 0,
            timeout_stop_us: 0,
        };
        if state.load_state == "not-found" {
            return Err(SystemdError::NoSuchUnit {
                unit: unit.to_owned(),
            });
        }
        if unit.ends_with(".service") {
            let s = self.get_all(path, SERVICE, deadline)?;
            state.main_pid = s.u64("MainPID") as u32;
            state.result = s.str("Result");
            state.n_restarts = s.u64("NRestarts") as u32;
            state.timeout_start_us = s.u64("TimeoutStartUSec");
            state.timeout_stop_us = s.u64("TimeoutStopUSec");
        }
        Ok(state)
    }

    /// Whether job `id` is still queued or running.
    fn job_exists(&mut self, id: u32, deadline: Instant) -> Result<bool, SystemdError> {
        match self.manager("GetJob", vec![Value::U32(id)], deadline) {
            Ok(_) => Ok(true),
            Err(SystemdError::Remote { name, .. }) if name == "org.freedesktop.systemd1.NoSuchJob" => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for `JobRemoved` of `job` (subscribe first) and returns its result.
    fn wait_job(&mut self, job: &str, deadline: Instant) -> Result<JobResult, SystemdError> {
        let started = Instant::now();
        let m = self
            .conn
            .wait_signal(deadline, |m| {
                m.is_signal(MANAGER, "JobRemoved") && m.body.get(1).and_then(Value::as_str) == Some(job)
            })
            .map_err(|e| self.bus.error(e, &format!("JobRemoved of {job}"), started))?;
        match m.body.get(3).and_then(Value::as_str) {
            Some(result) => Ok(JobResult::parse(result)),
            None => Err(SystemdError::Protocol {
                what: "JobRemoved".into(),
                detail: format!("body {:?}", m.body),
            }),
        }
    }
}

fn object_path(reply: &[Value], what: &str) -> Result<String, SystemdError> {
    match reply.first() {
        Some(Value::ObjectPath(p)) => Ok(p.clone()),
        other => Err(SystemdError::Protocol {
            what: what.to_owned(),
            detail: format!("expected an object path, got {other:?}"),
        }),
    }
}

/// The `a{sv}` of a `GetAll`. A property missing or of another type reads as empty or 0:
/// systemd versions differ in what they have, and none of these is worth failing over.
struct Props(Vec<Value>);

impl Props {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find_map(|e| match e {
            Value::DictEntry(k, v) if k.as_str() == Some(name) => Some(v.as_ref()),
            _ => None,
        })
    }

    fn str(&self, name: &str) -> String {
        self.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    fn u64(&self, name: &str) -> u64 {
        self.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
}

impl ServiceManager for SystemdBus {
    fn daemon_reload(&mut self) -> Result<(), SystemdError> {
        let deadline = deadline_after(self.reload_timeout);
        let mut s = self.open(deadline)?;
        // Reload's reply is sent once the reload is done, which can outlast the call timeout.
        let started = Instant::now();
        s.conn
            .call(DESTINATION, MANAGER_PATH, MANAGER, "Reload", vec![], deadline)
            .map_err(|e| self.error(e, "Reload", started))?;
        Ok(())
    }

    fn unit_state(&mut self, unit: &str) -> Result<UnitState, SystemdError> {
        let deadline = deadline_after(self.call_timeout);
        let mut s = self.open(deadline)?;
        let path = s.unit_path(unit, deadline)?;
        s.state(unit, &path, deadline)
    }

    fn restart(&mut self, unit: &str, timeout: Duration) -> Result<RestartOutcome, SystemdError> {
        let deadline = deadline_after(timeout);
        let mut s = self.open(deadline)?;
        // Subscribe before queueing the job, or its JobRemoved may come unannounced.
        s.subscribe(deadline)?;
        let path = s.unit_path(unit, deadline)?;
        let before = s.state(unit, &path, deadline)?;
        // Clear the unit's start rate limit (StartLimitBurst=5 starts in 10 s by default).
        // Otherwise a rollback right after a failed restart, or an install shortly after
        // boot, can be refused with `start-limit-hit`, which leaves the unit failed and,
        // unlike a crash, not restarted automatically: the CRI runtime would stay down.
        // On the unit's object (which systemd loads on access), not Manager.ResetFailedUnit,
        // which answers NoSuchUnit for an inactive unit that is not loaded right now.
        s.call(&path, UNIT, "ResetFailed", vec![], deadline)?;
        let reply = s
            .manager(
                "RestartUnit",
                vec![Value::Str(unit.to_owned()), Value::Str("replace".into())],
                deadline,
            )
            .map_err(|e| match e {
                SystemdError::Remote { name, .. } if is_no_such_unit(&name) => SystemdError::NoSuchUnit {
                    unit: unit.to_owned(),
                },
                e => e,
            })?;
        let queued = Instant::now();
        let job = object_path(&reply, "RestartUnit")?;
        let job_id: u32 = job
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| SystemdError::Protocol {
                what: "RestartUnit".into(),
                detail: format!("job path {job:?} does not end in a job id"),
            })?;
        tracing::debug!(unit, job, "restart queued");
        // systemd ends the job itself after the unit's stop and start timeouts; past that
        // (plus a margin) something is wrong with systemd, not with the unit.
        let budget = Duration::from_micros(before.timeout_stop_us.saturating_add(before.timeout_start_us));
        let wait_until = match budget.checked_add(JOB_MARGIN).and_then(|b| queued.checked_add(b)) {
            Some(t) if before.timeout_start_us > 0 => t.min(deadline),
            _ => deadline,
        };
        let mut reconnects = 0;
        let job_result = loop {
            match s.wait_job(&job, wait_until) {
                Ok(result) => break result,
                Err(SystemdError::Disconnected { .. }) if reconnects < MAX_RECONNECTS => {
                    reconnects += 1;
                    tracing::info!(
                        unit,
                        job,
                        "systemd closed the connection (daemon-reexec?); reconnecting"
                    );
                    s = self.reopen(wait_until)?;
                    s.subscribe(wait_until)?;
                    if !s.job_exists(job_id, wait_until)? {
                        break JobResult::Unobserved;
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let job_duration = queued.elapsed();
        // The state right after the job, even if the caller's deadline just passed.
        let after = s.state(unit, &path, deadline_after(self.call_timeout))?;
        if let Err(e) = s.manager("Unsubscribe", vec![], deadline_after(self.call_timeout)) {
            // Closing the connection unsubscribes as well.
            tracing::debug!(error = %e, "Unsubscribe failed");
        }
        Ok(RestartOutcome {
            job,
            job_result,
            before,
            after,
            job_duration,
            reconnects,
        })
    }
}

#[cfg(test)]
mod tests;
