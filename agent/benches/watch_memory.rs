//! Memory benchmark of the agent's watch path: the real `watch::run` (kube-runtime watchers,
//! the counting state machine, the metrics registry) fed by the fake API server's scripts
//! with 250 pods of this node, each with a container failing to start, and 10,000 sandbox
//! failure events about them, listed in pages of 500 as the API server would (the first
//! lists: a baseline, counted by a previous agent), then 10,000 count updates over 20 watch
//! responses and a new failed container instance per pod, each pod status delivered three
//! times. Prints the process RSS (VmRSS) once everything is consumed, and the peak (VmHWM).
//! Target: steady RSS under 32 MiB.
//!
//! Run: `cargo bench -p usernsguard-agent --bench watch_memory`

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use usernsguard_agent::health::Health;
use usernsguard_agent::metrics::Metrics;
use usernsguard_agent::node::handlers::{HandlerSet, NodeHandlers};
use usernsguard_agent::node::watch::{self, WatchConfig};
use usernsguard_agent::testing::{
    modified, status_kib, ContainerFixture, PodFixture, Reply, Script, ScriptedApiServer, Watched,
    START_MQUEUE_MESSAGE,
};
use usernsguard_runtime::Reason;

const PODS: usize = 250;
const EVENTS: usize = 10_000;
const PAGE: usize = 500;
const UPDATE_ROUNDS: usize = 20;

/// Pod `i`, its container failing to start: instance `c{attempt}` left a `StartError`.
fn pod(i: usize, attempt: usize, rv: usize) -> Value {
    let app = ContainerFixture::new("app")
        .waiting("RunContainerError", START_MQUEUE_MESSAGE)
        .last_start_error(&format!("{i:05}-{attempt}"), START_MQUEUE_MESSAGE)
        .restarts(attempt as i32);
    let mut p = PodFixture::userns(&format!("pod-{i:05}"))
        .runtime_class(if i.is_multiple_of(2) {
            "crun-userns"
        } else {
            "runc-userns"
        })
        .container(app)
        .rv(&rv.to_string())
        .json();
    p["metadata"]["name"] = json!(format!("app-{i}"));
    p["metadata"]["namespace"] = json!("bench");
    p["metadata"]["labels"] = json!({"app": "bench", "pod-template-hash": "6d4cf56db6"});
    p["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"});
    p["spec"]["containers"] = json!([{"name": "app", "image": "registry.example/app:1.2.3",
                                      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]);
    p
}

fn event(i: usize, count: usize, rv: usize) -> Value {
    let pod = i % PODS;
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("app-{pod}.{i:016x}"), "namespace": "bench",
                     "uid": format!("{i:08x}-4c1e-4b7a-9d6e-{pod:012x}"), "resourceVersion": rv.to_string(),
                     "creationTimestamp": "2026-01-01T00:00:20Z"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "bench",
                           "name": format!("app-{pod}"), "uid": format!("pod-{pod:05}")},
        "reason": "FailedCreatePodSandBox", "type": "Warning", "count": count,
        "message": format!("Failed to create pod sandbox: rpc error: code = Unknown desc = failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: error mounting \"mqueue\" to rootfs at \"/dev/mqueue\": setxattr /proc/thread-self/fd/{}: operation not permitted: unknown", 7 + i % 5),
        "firstTimestamp": "2026-01-01T00:00:20Z", "lastTimestamp": "2026-01-01T00:05:00Z",
        "source": {"component": "kubelet", "host": "node-a"},
        "reportingComponent": "kubelet", "reportingInstance": "node-a"
    })
}

/// The scripts of every watched resource: RuntimeClasses listed once; pods listed, then each
/// pod's next failed instance delivered three times; the sandbox failure events listed in
/// pages of 500 and then updated over 20 watch responses. Built lazily: only the page being
/// served is in memory.
fn scripts() -> Vec<(Watched, Script)> {
    let classes = ["crun", "runc"]
        .iter()
        .map(|h| {
            json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                   "metadata": {"name": format!("{h}-userns"), "resourceVersion": "1"},
                   "handler": h})
        })
        .collect();
    let pages = (0..EVENTS.div_ceil(PAGE)).map(|p| {
        let (start, end) = (p * PAGE, ((p + 1) * PAGE).min(EVENTS));
        Reply::Page {
            rv: "100".into(),
            items: (start..end).map(|i| event(i, 1 + i % 4, 1)).collect(),
            continue_token: (end < EVENTS).then(|| end.to_string()),
        }
    });
    let per = EVENTS / UPDATE_ROUNDS;
    let rounds = (0..UPDATE_ROUNDS).map(move |r| {
        Reply::Watch(
            (r * per..(r + 1) * per)
                .map(|i| modified(event(i, 2 + i % 4, 101 + i)))
                .collect(),
        )
    });
    let pod_updates = (0..3).map(|round| {
        Reply::Watch(
            (0..PODS)
                .map(|i| modified(pod(i, 2, 10 + round * PODS + i)))
                .collect(),
        )
    });
    vec![
        (
            Watched::runtime_classes(),
            Box::new(std::iter::once(Reply::List {
                rv: "1",
                items: classes,
            })),
        ),
        (
            Watched::pods("node-a"),
            Box::new(
                std::iter::once(Reply::List {
                    rv: "1",
                    items: (0..PODS).map(|i| pod(i, 1, 1)).collect(),
                })
                .chain(pod_updates),
            ),
        ),
        (Watched::sandbox_events(), Box::new(pages.chain(rounds))),
    ]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let before = status_kib("VmRSS:");
        let (client, mut server) = ScriptedApiServer::start_lazy(scripts());
        let metrics = Metrics::new("node-a").unwrap();
        let health = Health::new();
        let cfg = WatchConfig::new(
            "node-a",
            Arc::new(usernsguard_runtime::classify::classify),
            NodeHandlers::known(HandlerSet::of(["runc", "crun"], "runc")),
        );
        let started = Instant::now();
        let task = tokio::spawn(watch::run(client, cfg, metrics.clone(), health.clone()));
        // One parked watch per resource: runtime classes, pods and sandbox failure events.
        server.wait_parked(3, Duration::from_secs(120)).await;
        let elapsed = started.elapsed();
        assert!(health.is_ready());
        let counted = metrics.pod_failures("crun", Reason::MqueueSetxattr)
            + metrics.pod_failures("runc", Reason::MqueueSetxattr);
        // Each event: listed with 1 + i % 4 occurrences (the baseline), then updated to
        // 2 + i % 4: one new occurrence each; each pod: one new container instance.
        let expected = (EVENTS + PODS) as u64;
        assert_eq!(counted, expected, "every new occurrence counted exactly once");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = status_kib("VmRSS:");
        let hwm = status_kib("VmHWM:");
        println!("watch_memory: {PODS} pods, {EVENTS} events ({UPDATE_ROUNDS} watch rounds of updates, 3 of pod statuses), {counted} new occurrences counted in {elapsed:.2?}");
        println!("watch_memory: RSS before start {:.1} MiB", before as f64 / 1024.0);
        println!("watch_memory: steady RSS {:.1} MiB (target < 32 MiB)", rss as f64 / 1024.0);
        println!("watch_memory: peak RSS (VmHWM) {:.1} MiB", hwm as f64 / 1024.0);
        task.abort();
        if rss > 32 * 1024 {
            eprintln!("watch_memory: steady RSS above the 32 MiB target");
            std::process::exit(1);
        }
    });
}
