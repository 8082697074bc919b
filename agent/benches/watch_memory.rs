//! Memory benchmark of the agent's watch path: the real `watch::run` (kube-runtime watchers,
//! the counting state machine, the metrics registry) fed by an in-process fake API server
//! with 250 pods of this node and 10,000 failure events about them, listed in pages of 500
//! as the API server would, then 10,000 count updates over 20 watch responses. Prints the
//! process RSS (VmRSS) once everything is consumed, and the peak (VmHWM). Target: steady RSS
//! under 32 MiB.
//!
//! Run: `cargo bench -p usernsguard-agent --bench watch_memory`

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use usernsguard_agent::health::Health;
use usernsguard_agent::metrics::Metrics;
use usernsguard_agent::watch::{self, WatchConfig, FAILURE_EVENT_REASONS};
use usernsguard_runtime::Reason;

const PODS: usize = 250;
const EVENTS: usize = 10_000;
const PAGE: usize = 500;
const UPDATE_ROUNDS: usize = 20;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("app-{i}"), "namespace": "bench", "uid": format!("pod-{i:05}"),
                     "resourceVersion": "1", "labels": {"app": "bench", "pod-template-hash": "6d4cf56db6"},
                     "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}},
        "spec": {"nodeName": "node-a", "hostUsers": false,
                 "runtimeClassName": if i.is_multiple_of(2) { "crun-userns" } else { "runc-userns" },
                 "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
        "status": {"phase": "Pending", "startTime": "2026-01-01T00:00:10Z"}
    })
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

fn list(kind: &str, rv: &str, items: Vec<Value>, cont: Option<String>) -> Response<Body> {
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    let body = json!({"apiVersion": "v1", "kind": kind, "metadata": meta, "items": items});
    Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Serves lists (paged) and watch updates; parks every request once its data is served.
async fn fake_api_server(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    // One message per parked watch: a Notify would merge two parks that happen before the
    // waiter looks, and the count would never complete.
    parked: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let mut held = Vec::new();
    let mut rounds_served = 0;
    while let Some((req, send)) = handle.next_request().await {
        let uri = req.uri().clone();
        let watching = query(&uri, "watch").as_deref() == Some("true");
        let sandbox = query(&uri, "fieldSelector").is_some_and(|f| f.contains("FailedCreatePodSandBox"));
        match (uri.path(), watching) {
            ("/apis/node.k8s.io/v1/runtimeclasses", false) => send.send_response(list(
                "RuntimeClassList",
                "1",
                ["crun", "runc"]
                    .iter()
                    .map(|h| {
                        json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                     "metadata": {"name": format!("{h}-userns"), "resourceVersion": "1"},
                                     "handler": h})
                    })
                    .collect(),
                None,
            )),
            ("/api/v1/pods", false) => {
                send.send_response(list("PodList", "1", (0..PODS).map(pod).collect(), None))
            }
            ("/api/v1/events", false) if sandbox => {
                let start: usize = query(&uri, "continue").map_or(0, |c| c.parse().unwrap());
                let end = (start + PAGE).min(EVENTS);
                let cont = (end < EVENTS).then(|| end.to_string());
                let items = (start..end).map(|i| event(i, 1 + i % 4, 1)).collect();
                send.send_response(list("EventList", "100", items, cont));
            }
            ("/api/v1/events", true) if sandbox && rounds_served < UPDATE_ROUNDS => {
                let per = EVENTS / UPDATE_ROUNDS;
                let mut body = Vec::new();
                for i in rounds_served * per..(rounds_served + 1) * per {
                    let rv = 101 + i;
                    let ev = json!({"type": "MODIFIED", "object": event(i, 2 + i % 4, rv)});
                    serde_json::to_writer(&mut body, &ev).unwrap();
                    body.push(b'\n');
                }
                rounds_served += 1;
                send.send_response(Response::new(Body::from(body)));
            }
            ("/api/v1/events", false) => send.send_response(list("EventList", "1", vec![], None)),
            (_, true) => {
                held.push(send);
                let _ = parked.send(());
            }
            (p, w) => panic!("unexpected request {p} watch={w}"),
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let before = status_kib("VmRSS:");
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let (parked, mut parked_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(fake_api_server(handle, parked));
        let metrics = Metrics::new("node-a").unwrap();
        let health = Health::new();
        let cfg = WatchConfig {
            agent_start: "2026-01-01T00:00:00Z".parse().unwrap(),
            ..WatchConfig::new("node-a", Arc::new(usernsguard_runtime::classify::classify))
        };
        let started = Instant::now();
        let task = tokio::spawn(watch::run(client, cfg, metrics.clone(), health.clone()));
        // One parked watch per resource: runtime classes, pods and the three event reasons.
        for _ in 0..2 + FAILURE_EVENT_REASONS.len() {
            tokio::time::timeout(Duration::from_secs(120), parked_rx.recv())
                .await
                .expect("all watches consumed within 120 s");
        }
        let elapsed = started.elapsed();
        assert!(health.is_ready());
        let counted = metrics.pod_failures("crun", Reason::MqueueSetxattr)
            + metrics.pod_failures("runc", Reason::MqueueSetxattr);
        // Each event: created after the agent started, listed with 1 + i % 4 occurrences,
        // then updated to 2 + i % 4: exactly 2 + i % 4 occurrences in total.
        let expected: u64 = (0..EVENTS).map(|i| 2 + (i % 4) as u64).sum();
        assert_eq!(counted, expected, "every occurrence counted exactly once");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = status_kib("VmRSS:");
        let hwm = status_kib("VmHWM:");
        println!("watch_memory: {PODS} pods, {EVENTS} events ({UPDATE_ROUNDS} watch rounds of updates), {counted} occurrences counted in {elapsed:.2?}");
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
