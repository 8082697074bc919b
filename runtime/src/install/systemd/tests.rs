//! [`SystemdBus`] against a scripted D-Bus peer on a Unix socket in a temp dir: the call
//! sequence, job matching, failures, reconnecting after the peer closed, deadlines. The
//! real systemd is exercised by `runtime/tests/systemd_nspawn.rs`.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dbus::{decode, encode, read_frame, Message, MessageType, Value};
use super::*;

const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit/containerd_2eservice";
const JOB: &str = "/org/freedesktop/systemd1/job/77";

/// What the scripted peer sends in answer to one call.
enum Out {
    Reply(Vec<Value>),
    Error(&'static str, &'static str),
    Signal(&'static str, Vec<Value>),
    /// Close the connection (what a daemon-reexec does to private connections).
    Close,
}

type Script = Box<dyn FnMut(usize, &Message) -> Vec<Out> + Send>;

struct Peer {
    socket: PathBuf,
    /// "conn#member(args)" for every call received.
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// Serves `connections` connections in turn, answering calls with `script` (given the
    /// connection's index), in the byte order `big_endian`.
    fn start(connections: usize, big_endian: bool, mut script: Script) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("private");
        let listener = UnixListener::bind(&socket).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread_log = log.clone();
        let thread = std::thread::spawn(move || {
            let mut serial = 1000;
            for conn in 0..connections {
                let (mut s, _) = listener.accept().unwrap();
                if !auth(&mut s) {
                    continue;
                }
                'messages: while let Ok(Ok(frame)) = read_frame(&mut s) {
                    let call = decode(&frame).unwrap();
                    thread_log.lock().unwrap().push(format!(
                        "{conn}#{}({})",
                        call.member.as_deref().unwrap_or_default(),
                        call.body
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    ));
                    for out in script(conn, &call) {
                        serial += 1;
                        let mut m = Message {
                            kind: MessageType::MethodReturn,
                            flags: 0,
                            serial,
                            reply_serial: Some(call.serial),
                            path: None,
                            interface: None,
                            member: None,
                            error_name: None,
                            destination: None,
                            sender: Some("org.freedesktop.systemd1".into()),
                            body: vec![],
                        };
                        match out {
                            Out::Reply(body) => m.body = body,
                            Out::Error(name, text) => {
                                m.kind = MessageType::Error;
                                m.error_name = Some(name.into());
                                m.body = vec![Value::Str(text.into())];
                            }
                            Out::Signal(member, body) => {
                                m.kind = MessageType::Signal;
                                m.reply_serial = None;
                                m.path = Some(MANAGER_PATH.into());
                                m.interface = Some(MANAGER.into());
                                m.member = Some(member.into());
                                m.body = body;
                            }
                            Out::Close => break 'messages,
                        }
                        s.write_all(&encode(&m, big_endian).unwrap()).unwrap();
                    }
                }
            }
        });
        Peer {
            socket,
            log,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Waits for the peer to have served all its connections and returns its log.
    fn finish(mut self) -> Vec<String> {
        self.thread.take().unwrap().join().unwrap();
        self.log.lock().unwrap().clone()
    }
}

/// Reads `\0AUTH EXTERNAL <hex uid>\r\nBEGIN\r\n` and answers OK; false if the client left.
fn auth(s: &mut UnixStream) -> bool {
    use std::io::Read;
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"BEGIN\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            return false;
        }
        got.push(b[0]);
    }
    assert!(got.starts_with(b"\0AUTH EXTERNAL "), "{got:?}");
    s.write_all(b"OK 6f1e0c1d2b3a49588776655443322110\r\n").unwrap();
    true
}

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

fn dict(props: Vec<(&str, Value)>) -> Vec<Value> {
    vec![Value::Array {
        elem: "{sv}".into(),
        items: props
            .into_iter()
            .map(|(k, v)| Value::DictEntry(Box::new(s(k)), Box::new(Value::Variant(Box::new(v)))))
            .collect(),
    }]
}

fn unit_props(active: &str, sub: &str, since_s: u64) -> Vec<Value> {
    dict(vec![
        ("Id", s("containerd.service")),
        ("LoadState", s("loaded")),
        ("ActiveState", s(active)),
        ("SubState", s(sub)),
        (
            "ActiveEnterTimestamp",
            Value::U64(1_796_000_000_000_000 + since_s * 1_000_000),
        ),
        ("ActiveEnterTimestampMonotonic", Value::U64(since_s * 1_000_000)),
        (
            "InvocationID",
            Value::Array {
                elem: "y".into(),
                items: vec![Value::Byte(0xab), Value::Byte(0x01)],
            },
        ),
    ])
}

fn service_props(pid: u32, result: &str) -> Vec<Value> {
    dict(vec![
        ("MainPID", Value::U32(pid)),
        ("Result", s(result)),
        ("NRestarts", Value::U32(0)),
        ("TimeoutStartUSec", Value::U64(90_000_000)),
        ("TimeoutStopUSec", Value::U64(90_000_000)),
    ])
}

fn job_removed(id: u32, job: &str, result: &str) -> Out {
    Out::Signal(
        "JobRemoved",
        vec![
            Value::U32(id),
            Value::ObjectPath(job.into()),
            s("containerd.service"),
            s(result),
        ],
    )
}

/// Answers the calls every restart makes; `after` is the unit's state once the job ended,
/// `on_restart` what follows the job path in answer to RestartUnit.
fn systemd(
    conn: usize,
    call: &Message,
    gets: &mut usize,
    after: (&str, &str, u32),
    on_restart: fn() -> Vec<Out>,
) -> Vec<Out> {
    let _ = conn;
    let member = call.member.as_deref().unwrap_or_default();
    match member {
        "Subscribe" | "Unsubscribe" | "Reload" | "ResetFailed" => vec![Out::Reply(vec![])],
        "GetUnit" => vec![Out::Reply(vec![Value::ObjectPath(UNIT_PATH.into())])],
        "GetAll" => {
            let unit = call.body[0].as_str() == Some(UNIT);
            if unit {
                *gets += 1;
            }
            let reply = match (*gets, unit) {
                (1, true) => unit_props("active", "running", 10),
                (1, false) => service_props(33, "success"),
                (_, true) if after.0 == "active" => unit_props(after.0, after.1, 20),
                (_, true) => unit_props(after.0, after.1, 10),
                (_, false) => service_props(after.2, if after.2 == 0 { "exit-code" } else { "success" }),
            };
            vec![Out::Reply(reply)]
        }
        "RestartUnit" => {
            let mut out = vec![Out::Reply(vec![Value::ObjectPath(JOB.into())])];
            out.extend(on_restart());
            out
        }
        other => panic!("unexpected call {other}"),
    }
}

fn bus(peer: &Peer) -> SystemdBus {
    SystemdBus::new(&peer.socket).with_call_timeout(Duration::from_secs(5))
}

#[test]
fn restart_subscribes_first_and_waits_for_its_own_job() {
    for big_endian in [false, true] {
        let mut gets = 0;
        let peer = Peer::start(
            1,
            big_endian,
            Box::new(move |conn, call| {
                systemd(conn, call, &mut gets, ("active", "running", 61), || {
                    vec![
                        // Another job (an auto-restart, say) ends first: not ours.
                        job_removed(76, "/org/freedesktop/systemd1/job/76", "failed"),
                        Out::Signal("UnitNew", vec![s("x.service"), Value::ObjectPath("/x".into())]),
                        job_removed(77, JOB, "done"),
                    ]
                })
            }),
        );
        let outcome = bus(&peer)
            .restart("containerd.service", Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            peer.finish(),
            [
                "0#Subscribe()",
                "0#GetUnit(containerd.service)",
                "0#GetAll(org.freedesktop.systemd1.Unit)",
                "0#GetAll(org.freedesktop.systemd1.Service)",
                "0#ResetFailed()",
                "0#RestartUnit(containerd.service,replace)",
                "0#GetAll(org.freedesktop.systemd1.Unit)",
                "0#GetAll(org.freedesktop.systemd1.Service)",
                "0#Unsubscribe()",
            ]
        );
        assert_eq!(outcome.job, JOB);
        assert_eq!(outcome.job_result, JobResult::Done);
        assert_eq!(outcome.before.main_pid, 33);
        assert_eq!(outcome.before.invocation_id, "ab01");
        assert_eq!(outcome.before.timeout_start_us, 90_000_000);
        assert_eq!(outcome.after.main_pid, 61);
        assert_eq!(outcome.after.active_state, ActiveState::Active);
        assert!(outcome.after.active_enter_timestamp_us > outcome.before.active_enter_timestamp_us);
        assert!(outcome.succeeded(), "{outcome}");
        assert_eq!(outcome.reconnects, 0);
    }
}

#[test]
fn a_failed_start_is_reported_from_the_job_result() {
    let mut gets = 0;
    let peer = Peer::start(
        1,
        false,
        Box::new(move |conn, call| {
            // JobRemoved before the job path reply: it must be kept for the wait.
            let mut out = systemd(conn, call, &mut gets, ("activating", "auto-restart", 0), Vec::new);
            if call.member.as_deref() == Some("RestartUnit") {
                out.insert(0, job_removed(77, JOB, "failed"));
            }
            out
        }),
    );
    let started = Instant::now();
    let outcome = bus(&peer)
        .restart("containerd.service", Duration::from_secs(10))
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(outcome.job_result, JobResult::Failed);
    assert_eq!(outcome.after.active_state, ActiveState::Activating);
    assert_eq!(outcome.after.sub_state, "auto-restart");
    assert_eq!(outcome.after.result, "exit-code");
    assert!(!outcome.timestamp_advanced());
    assert!(!outcome.succeeded());
    let text = outcome.to_string();
    assert!(
        text.contains("job failed") && text.contains("unchanged"),
        "{text}"
    );
    peer.finish();
}

#[test]
fn after_the_peer_closes_mid_wait_the_job_is_looked_up_again() {
    // Connection 0 closes right after queueing the job, as a daemon-reexec would. On
    // connection 1 the job still exists, and its JobRemoved follows.
    let mut gets = 0;
    let peer = Peer::start(
        2,
        false,
        Box::new(
            move |conn, call| match (conn, call.member.as_deref().unwrap_or_default()) {
                (0, "RestartUnit") => vec![Out::Reply(vec![Value::ObjectPath(JOB.into())]), Out::Close],
                (1, "GetJob") => {
                    assert_eq!(call.body, vec![Value::U32(77)]);
                    vec![
                        Out::Reply(vec![Value::ObjectPath(JOB.into())]),
                        job_removed(77, JOB, "done"),
                    ]
                }
                _ => systemd(conn, call, &mut gets, ("active", "running", 90), Vec::new),
            },
        ),
    );
    let outcome = bus(&peer)
        .restart("containerd.service", Duration::from_secs(10))
        .unwrap();
    let log = peer.finish();
    assert_eq!(
        &log[5..],
        [
            "0#RestartUnit(containerd.service,replace)",
            "1#Subscribe()",
            "1#GetJob()",
            "1#GetAll(org.freedesktop.systemd1.Unit)",
            "1#GetAll(org.freedesktop.systemd1.Service)",
            "1#Unsubscribe()",
        ]
    );
    assert_eq!((&outcome.job_result, outcome.reconnects), (&JobResult::Done, 1));
    assert!(outcome.succeeded());
}

#[test]
fn a_job_that_ended_unseen_is_judged_by_the_unit_state() {
    for (after, succeeded) in [
        (("active", "running", 90), true),
        (("activating", "auto-restart", 0), false),
    ] {
        let mut gets = 0;
        let peer = Peer::start(
            2,
            false,
            Box::new(
                move |conn, call| match (conn, call.member.as_deref().unwrap_or_default()) {
                    (0, "RestartUnit") => vec![Out::Reply(vec![Value::ObjectPath(JOB.into())]), Out::Close],
                    (1, "GetJob") => vec![Out::Error(
                        "org.freedesktop.systemd1.NoSuchJob",
                        "Job 77 does not exist.",
                    )],
                    _ => systemd(conn, call, &mut gets, after, Vec::new),
                },
            ),
        );
        let outcome = bus(&peer)
            .restart("containerd.service", Duration::from_secs(10))
            .unwrap();
        peer.finish();
        assert_eq!(outcome.job_result, JobResult::Unobserved);
        assert_eq!(outcome.succeeded(), succeeded, "{outcome}");
    }
}

#[test]
fn no_such_unit() {
    let peer = Peer::start(
        2,
        false,
        Box::new(|_, call| match call.member.as_deref().unwrap_or_default() {
            "Subscribe" => vec![Out::Reply(vec![])],
            // GetUnit knows only loaded units; LoadUnit makes a not-found one.
            "GetUnit" => vec![Out::Error(
                "org.freedesktop.systemd1.NoSuchUnit",
                "Unit nope.service not loaded.",
            )],
            "LoadUnit" => vec![Out::Reply(vec![Value::ObjectPath("/u/nope".into())])],
            "GetAll" => vec![Out::Reply(dict(vec![
                ("LoadState", s("not-found")),
                ("ActiveState", s("inactive")),
            ]))],
            other => panic!("{other}"),
        }),
    );
    let mut bus = bus(&peer);
    for r in [
        bus.unit_state("nope.service").map(drop),
        bus.restart("nope.service", Duration::from_secs(5)).map(drop),
    ] {
        match r {
            Err(SystemdError::NoSuchUnit { unit }) => assert_eq!(unit, "nope.service"),
            other => panic!("{other:?}"),
        }
    }
    assert!(!peer.finish().iter().any(|c| c.contains("RestartUnit")));
}

#[test]
fn the_callers_deadline_bounds_the_wait_for_the_job() {
    let mut gets = 0;
    let peer = Peer::start(
        1,
        false,
        Box::new(move |conn, call| systemd(conn, call, &mut gets, ("active", "running", 1), Vec::new)),
    );
    let started = Instant::now();
    let r = bus(&peer).restart("containerd.service", Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    match r {
        Err(SystemdError::Timeout { what, .. }) => assert!(what.contains(JOB), "{what}"),
        other => panic!("{other:?}"),
    }
    peer.finish();
}

#[test]
fn reload_and_remote_errors() {
    let peer = Peer::start(
        2,
        true,
        Box::new(|conn, _| match conn {
            0 => vec![Out::Reply(vec![])],
            _ => vec![Out::Error(
                "org.freedesktop.DBus.Error.AccessDenied",
                "Access denied",
            )],
        }),
    );
    let mut bus = bus(&peer);
    bus.daemon_reload().unwrap();
    match bus.daemon_reload() {
        Err(SystemdError::Remote {
            method,
            name,
            message,
        }) => {
            assert_eq!(
                (method.as_str(), name.as_str(), message.as_str()),
                (
                    "Reload",
                    "org.freedesktop.DBus.Error.AccessDenied",
                    "Access denied"
                )
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(peer.finish(), ["0#Reload()", "1#Reload()"]);
}

#[test]
fn connect_and_auth_failures_name_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("run/systemd/private");
    match SystemdBus::new(&missing).daemon_reload() {
        Err(e @ SystemdError::Connect { .. }) => {
            assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // A peer that closes right after accept: what systemd does to a client it cannot see.
    let path = dir.path().join("dropping");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
    match SystemdBus::new(&path).unit_state("containerd.service") {
        Err(e @ SystemdError::Auth { .. }) => assert!(e.to_string().contains("PID namespace"), "{e}"),
        other => panic!("{other:?}"),
    }
    t.join().unwrap();
    assert_eq!(
        SystemdBus::for_host_root(std::path::Path::new("/host")).socket(),
        std::path::Path::new("/host/run/systemd/private")
    );
}
