//! The failure watches in a simulated 5,000-node cluster: the real `watch::run` (kube-runtime
//! watchers, the counting state machine, the metrics registry) against the fake API server,
//! which applies the agent's field selectors the way kube-apiserver does.
//!
//! The cluster: 100 Warning-event occurrences per second for ten minutes of simulated time
//! (60,000), spread over 5,000 nodes (a share of 1/5,000 for the agent's node, plus one of its
//! own sandbox failures every 20 s), with a realistic mix of reasons (probe failures,
//! back-offs, image pulls, mounts, scheduling, sandbox failures; a quarter of the occurrences
//! bump the count of an existing event), on top of 2,000 events that exist before the agent
//! starts. The agent's node runs 30 pods, half of them in a user namespace; five have
//! containers failing to start (each failed instance delivered three times).
//!
//! The events are fed as fast as the agent takes them, in watch responses of 10 simulated
//! seconds; the fake server runs on its own thread, so the CPU time measured on the agent's
//! thread (getrusage `RUSAGE_THREAD`) is the agent's alone: decoding what is delivered,
//! counting, the metrics. Prints generated vs delivered events, the agent's CPU seconds per
//! simulated second, and the process's peak RSS (VmHWM, fake server included). Asserts the
//! agent counts exactly its node's user-namespace failures. Targets: under 1% of a core
//! (< 6 s CPU for the 600 s), under 32 MiB.
//!
//! Run: `cargo bench -p usernsguard-agent --bench watch_cluster`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{getrusage, UsageWho};
use serde_json::{json, Value};
use usernsguard_agent::health::Health;
use usernsguard_agent::metrics::Metrics;
use usernsguard_agent::node::handlers::{HandlerSet, NodeHandlers};
use usernsguard_agent::node::watch::{self, WatchConfig};
use usernsguard_agent::testing::{
    added, modified, status_kib, ContainerFixture, PodFixture, Reply, Script, ScriptedApiServer, Watched,
    CNI_MESSAGE, MQUEUE_MESSAGE, START_MQUEUE_MESSAGE,
};
use usernsguard_runtime::Reason;

const NODES: u64 = 5_000;
const RATE: u64 = 100;
const SECONDS: u64 = 600;
const CHUNK_SECONDS: u64 = 10;
const PREEXISTING: u64 = 2_000;
const OWN_PODS: u64 = 30;
const OWN_EVERY: u64 = 20;
const ME: &str = "node-a";

/// Warning reasons by share (percent) of a cluster's occurrences, with the component that
/// reports them and the kind they are about.
const MIX: [(&str, u64, &str, &str); 9] = [
    ("BackOff", 32, "kubelet", "Pod"),
    ("Unhealthy", 26, "kubelet", "Pod"),
    ("Failed", 12, "kubelet", "Pod"),
    ("FailedMount", 8, "kubelet", "Pod"),
    ("FailedScheduling", 6, "default-scheduler", "Pod"),
    ("FailedCreatePodSandBox", 5, "kubelet", "Pod"),
    ("FailedAttachVolume", 4, "attachdetach-controller", "Pod"),
    ("NodeNotReady", 4, "node-controller", "Pod"),
    ("FreeDiskSpaceFailed", 3, "kubelet", "Node"),
];

fn node_name(n: u64) -> String {
    if n == 0 {
        ME.into()
    } else {
        format!("node-{n:05}")
    }
}

/// The agent's own pods: even ones in a user namespace (crun or the default runc), odd ones
/// with host users.
fn own_pod_uid(k: u64) -> String {
    format!("own-{k:02}")
}

/// One Warning-event object of the simulated cluster.
#[derive(Clone, Debug)]
struct Ev {
    id: u64,
    reason: &'static str,
    component: &'static str,
    kind: &'static str,
    node: u64,
    pod_uid: String,
    mqueue: bool,
    count: u64,
}

impl Ev {
    fn json(&self, rv: u64) -> Value {
        let message = match (self.reason, self.mqueue) {
            ("FailedCreatePodSandBox", true) => MQUEUE_MESSAGE.to_owned(),
            ("FailedCreatePodSandBox", false) => CNI_MESSAGE.to_owned(),
            ("Unhealthy", _) => "Readiness probe failed: HTTP probe failed with statuscode: 503".into(),
            ("BackOff", _) => "Back-off restarting failed container app in pod app-7d9f".into(),
            ("Failed", _) => r#"Failed to pull image "registry.example/userns-demo:1.0": not found"#.into(),
            (r, _) => format!("{r}: something went wrong"),
        };
        json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("app.{:016x}", self.id), "namespace": "apps",
                         "uid": format!("ev-{:08}", self.id), "resourceVersion": rv.to_string(),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "involvedObject": {"apiVersion": "v1", "kind": self.kind, "namespace": "apps",
                               "name": format!("app-{}", self.pod_uid), "uid": self.pod_uid},
            "reason": self.reason, "type": "Warning", "count": self.count, "message": message,
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
            "source": {"component": self.component, "host": node_name(self.node)},
            "reportingComponent": self.component, "reportingInstance": node_name(self.node),
        })
    }

    /// Whether an occurrence of this event is one of the agent's to count.
    fn counts_for_me(&self) -> bool {
        self.node == 0
            && self.reason == "FailedCreatePodSandBox"
            && self.mqueue
            && own_pod_userns(&self.pod_uid)
    }
}

fn own_pod_userns(uid: &str) -> bool {
    uid.strip_prefix("own-")
        .and_then(|k| k.parse::<u64>().ok())
        .is_some_and(|k| k % 2 == 0)
}

/// A deterministic cluster: occurrence `i` creates an event or bumps an existing one.
struct Cluster {
    events: HashMap<u64, Ev>,
    next_id: u64,
    rng: u64,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            events: HashMap::new(),
            next_id: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn new_event(&mut self, node: u64, own: Option<u64>) -> Ev {
        let pick = self.rand() % 100;
        let (reason, _, component, kind) = match own {
            Some(_) => MIX[5],
            None => {
                let mut acc = 0;
                *MIX.iter()
                    .find(|m| {
                        acc += m.1;
                        pick < acc
                    })
                    .unwrap()
            }
        };
        let pod_uid = match own {
            Some(k) => own_pod_uid(k),
            None if node == 0 => own_pod_uid(self.rand() % OWN_PODS),
            None => format!("{node:05}-{:04}", self.rand() % 100),
        };
        let ev = Ev {
            id: self.next_id,
            reason,
            component,
            kind,
            node,
            pod_uid,
            mqueue: own.is_some() || self.rand().is_multiple_of(3),
            count: 1,
        };
        self.next_id += 1;
        self.events.insert(ev.id, ev.clone());
        // Only the last 100 events get bumped (and the agent's own): keep no more, so the
        // generator's memory does not pass for the agent's.
        if let Some(old) = self.next_id.checked_sub(101) {
            if self.events.get(&old).is_some_and(|e| e.node != 0) {
                self.events.remove(&old);
            }
        }
        ev
    }

    /// Occurrence `i`: (the event as it is now, whether it was just created).
    fn occurrence(&mut self, i: u64) -> (Ev, bool) {
        // The agent's own extra failure every OWN_EVERY seconds: new, or a bump of the last.
        if i % (RATE * OWN_EVERY) == RATE * OWN_EVERY - 1 {
            let k = 2 * ((i / (RATE * OWN_EVERY)) % 3);
            if (i / (RATE * OWN_EVERY)) % 2 == 1 {
                if let Some(ev) = self
                    .events
                    .values_mut()
                    .filter(|e| e.pod_uid == own_pod_uid(k) && e.node == 0 && e.mqueue)
                    .max_by_key(|e| e.id)
                {
                    ev.count += 1;
                    return (ev.clone(), false);
                }
            }
            return (self.new_event(0, Some(k)), true);
        }
        if self.rand().is_multiple_of(4) && self.next_id > 100 {
            let id = self.next_id - 1 - self.rand() % 100;
            if let Some(ev) = self.events.get_mut(&id) {
                ev.count += 1;
                return (ev.clone(), false);
            }
        }
        let node = self.rand() % NODES;
        (self.new_event(node, None), true)
    }
}

/// The exact number of the agent's node's user-namespace failure occurrences after its first
/// list, and the total number of occurrences generated after it.
fn expected() -> (u64, u64) {
    let mut c = Cluster::new();
    for _ in 0..PREEXISTING {
        let node = c.rand() % NODES;
        c.new_event(node, None);
    }
    // Two of the agent's own failures exist before it starts (its baseline).
    c.new_event(0, Some(0));
    c.new_event(0, Some(2));
    let mut mine = 0;
    for i in 0..RATE * SECONDS {
        let (ev, _) = c.occurrence(i);
        mine += u64::from(ev.counts_for_me());
    }
    (mine, RATE * SECONDS)
}

fn own_pods() -> Vec<PodFixture> {
    (0..OWN_PODS)
        .map(|k| {
            let p = PodFixture::userns(&own_pod_uid(k))
                .host_users(Some(k % 2 == 1))
                .phase("Running");
            let p = if k % 4 == 0 {
                p.runtime_class("crun-userns")
            } else {
                p
            };
            p.container(ContainerFixture::new("app").running())
        })
        .collect()
}

fn scripts() -> Vec<(Watched, Script)> {
    let mut cluster = Cluster::new();
    let mut rv = 1_000u64;
    let mut preexisting: Vec<Value> = (0..PREEXISTING)
        .map(|_| {
            let node = cluster.rand() % NODES;
            cluster.new_event(node, None).json(1)
        })
        .collect();
    preexisting.push(cluster.new_event(0, Some(0)).json(1));
    preexisting.push(cluster.new_event(0, Some(2)).json(1));
    let chunk = RATE * CHUNK_SECONDS;
    let chunks = (0..SECONDS / CHUNK_SECONDS).map(move |c| {
        let events = (c * chunk..(c + 1) * chunk)
            .map(|i| {
                let (ev, new) = cluster.occurrence(i);
                rv += 1;
                if new {
                    added(ev.json(rv))
                } else {
                    modified(ev.json(rv))
                }
            })
            .collect();
        Reply::Watch(events)
    });
    let events: Script = Box::new(
        std::iter::once(Reply::List {
            rv: "1000",
            items: preexisting,
        })
        .chain(chunks),
    );

    // Pods: five user-namespace pods' containers fail to start twice each (instances
    // c1, c2), every status delivered three times.
    let pods = own_pods();
    let mut updates = Vec::new();
    for (n, k) in [0u64, 2, 4, 6, 8].into_iter().enumerate() {
        let base = pods[k as usize].clone().phase("Pending");
        for attempt in 1..=2 {
            let id = format!("{k}-{attempt}");
            let c = ContainerFixture::new("app")
                .waiting("RunContainerError", START_MQUEUE_MESSAGE)
                .last_start_error(&id, START_MQUEUE_MESSAGE)
                .restarts(attempt);
            for copy in 0..3 {
                let rv = 100 + n * 10 + attempt as usize * 3 + copy;
                updates.push(modified(
                    base.clone().container(c.clone()).rv(&rv.to_string()).json(),
                ));
            }
        }
    }
    let pod_script: Script = Box::new(
        [
            Reply::List {
                rv: "50",
                items: pods.iter().map(PodFixture::json).collect(),
            },
            Reply::Watch(updates),
        ]
        .into_iter(),
    );
    let classes = vec![json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                              "metadata": {"name": "crun-userns", "resourceVersion": "1"},
                              "handler": "crun"})];
    vec![
        (
            Watched::runtime_classes(),
            Box::new(std::iter::once(Reply::List {
                rv: "1",
                items: classes,
            })),
        ),
        (Watched::filtered("/api/v1/pods"), pod_script),
        (Watched::filtered("/api/v1/events"), events),
    ]
}

fn thread_cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
    t(u.user_time()) + t(u.system_time())
}

fn process_cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
    t(u.user_time()) + t(u.system_time())
}

fn main() {
    let (mine, generated_live) = expected();
    // The fake API server on its own thread and runtime.
    let server_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server_handle = server_rt.handle().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_thread = std::thread::spawn(move || {
        server_rt.block_on(async {
            let _ = stop_rx.await;
        })
    });

    // The agent on this thread alone.
    let agent_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    agent_rt.block_on(async {
        let rss_before = status_kib("VmRSS:");
        let (client, mut server) = ScriptedApiServer::start_lazy_on(&server_handle, scripts());
        let metrics = Metrics::new(ME).unwrap();
        let health = Health::new();
        let cfg = WatchConfig::new(
            ME,
            Arc::new(usernsguard_runtime::classify::classify),
            NodeHandlers::known(HandlerSet::of(["runc", "crun"], "runc")),
        );
        let wall = std::time::Instant::now();
        let cpu_before = thread_cpu();
        let process_before = process_cpu();
        let task = tokio::spawn(watch::run(client, cfg, metrics.clone(), health.clone()));
        server.wait_parked(3, Duration::from_secs(600)).await;
        let cpu = thread_cpu() - cpu_before;
        let process = process_cpu() - process_before;
        let elapsed = wall.elapsed();
        assert!(health.is_ready());

        let total: u64 = ["runc", "crun"]
            .into_iter()
            .flat_map(|h| Reason::ALL.map(|r| metrics.pod_failures(h, r)))
            .sum();
        // Sandbox failures from events, plus 5 pods x 2 failed container instances.
        let want = mine + 10;
        let delivery = server.delivery();
        let (ev_generated, ev_delivered) = delivery
            .iter()
            .find(|(p, ..)| p == "/api/v1/events")
            .map(|(_, g, d)| (*g, *d))
            .unwrap();
        let hwm = status_kib("VmHWM:");
        let rss = status_kib("VmRSS:");
        println!(
            "watch_cluster: {NODES} nodes, {RATE} Warning events/s for {SECONDS} s simulated: {generated_live} occurrences + {PREEXISTING} pre-existing events"
        );
        println!(
            "watch_cluster: events generated {ev_generated}, delivered to the agent {ev_delivered} ({:.1}%) by its field selector",
            ev_delivered as f64 * 100.0 / ev_generated as f64
        );
        println!(
            "watch_cluster: counted {total} user-namespace failure occurrences of node {ME}, expected {want} ({mine} sandbox failures from events, 10 failed container instances from pod status)"
        );
        println!(
            "watch_cluster: agent CPU {:.3} s for {SECONDS} s simulated = {:.3} ms per simulated second = {:.4}% of a core at that rate (target < 1%); whole process incl. fake server {:.3} s; wall {elapsed:.2?}",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1000.0 / SECONDS as f64,
            cpu.as_secs_f64() * 100.0 / SECONDS as f64,
            process.as_secs_f64(),
        );
        println!(
            "watch_cluster: RSS before {:.1} MiB, after {:.1} MiB, peak (VmHWM, fake server included) {:.1} MiB (target < 32 MiB)",
            rss_before as f64 / 1024.0,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        task.abort();
        assert_eq!(total, want, "exactly the node's user-namespace failures");
        let mut failed = false;
        if cpu.as_secs_f64() >= SECONDS as f64 * 0.01 {
            eprintln!("watch_cluster: agent CPU above 1% of a core");
            failed = true;
        }
        if hwm > 32 * 1024 {
            eprintln!("watch_cluster: peak RSS above 32 MiB");
            failed = true;
        }
        if failed {
            std::process::exit(1);
        }
    });
    let _ = stop_tx.send(());
    server_thread.join().unwrap();
}
