//! Test fixtures: object builders for pods, events and RuntimeClasses, and a fake API
//! server behind `tower_test::mock::pair` that answers the agent's list and watch requests
//! from per-resource scripts while asserting method, path and field selectors.
//!
//! The watches run concurrently, so requests are matched by resource (path + field
//! selector), not by global order; within one resource the script is strictly ordered.
//! When a script is exhausted the next request is parked unanswered, which is how a test
//! knows that every scripted object has been consumed by the agent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;

pub const MQUEUE_MESSAGE: &str = r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted: unknown"#;
pub const CNI_MESSAGE: &str = r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox "265b1cc1621af991c09f5e372e0e5bdcfb47c9b53523178c8d0288ce489dad5f": plugin type="calico" failed (add): error getting ClusterInformation: connection is unauthorized: Unauthorized"#;

/// A pod on `node`, in phase `phase`, acknowledged by the kubelet at `start_time`.
#[derive(Clone, Debug)]
pub struct PodFixture {
    pub uid: String,
    pub node: String,
    pub host_users: Option<bool>,
    pub runtime_class: Option<String>,
    pub phase: String,
    pub start_time: String,
    pub resource_version: String,
}

impl PodFixture {
    pub fn userns(uid: &str) -> PodFixture {
        PodFixture {
            uid: uid.into(),
            node: "node-a".into(),
            host_users: Some(false),
            runtime_class: None,
            phase: "Pending".into(),
            start_time: "2026-01-01T00:00:10Z".into(),
            resource_version: "1".into(),
        }
    }
    pub fn host_users(mut self, v: Option<bool>) -> Self {
        self.host_users = v;
        self
    }
    pub fn runtime_class(mut self, c: &str) -> Self {
        self.runtime_class = Some(c.into());
        self
    }
    pub fn phase(mut self, p: &str) -> Self {
        self.phase = p.into();
        self
    }
    pub fn started(mut self, t: &str) -> Self {
        self.start_time = t.into();
        self
    }
    pub fn rv(mut self, rv: &str) -> Self {
        self.resource_version = rv.into();
        self
    }
    pub fn json(&self) -> Value {
        let mut spec = json!({
            "nodeName": self.node,
            "containers": [{"name": "c", "image": "busybox"}],
        });
        if let Some(h) = self.host_users {
            spec["hostUsers"] = json!(h);
        }
        if let Some(c) = &self.runtime_class {
            spec["runtimeClassName"] = json!(c);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{}", self.uid), "namespace": "default",
                         "uid": self.uid, "resourceVersion": self.resource_version},
            "spec": spec,
            "status": {"phase": self.phase, "startTime": self.start_time},
        })
    }
    pub fn build(&self) -> Pod {
        serde_json::from_value(self.json()).unwrap()
    }
}

/// A kubelet Warning event about pod `pod_uid`.
#[derive(Clone, Debug)]
pub struct EventFixture {
    pub uid: String,
    pub pod_uid: String,
    pub reason: String,
    pub message: String,
    pub count: Option<i32>,
    pub series_count: Option<i32>,
    pub created: String,
    pub host: String,
    pub resource_version: String,
}

impl EventFixture {
    pub fn sandbox(uid: &str, pod_uid: &str, message: &str) -> EventFixture {
        EventFixture {
            uid: uid.into(),
            pod_uid: pod_uid.into(),
            reason: "FailedCreatePodSandBox".into(),
            message: message.into(),
            count: Some(1),
            series_count: None,
            created: "2026-01-01T00:00:20Z".into(),
            host: "node-a".into(),
            resource_version: "1".into(),
        }
    }
    pub fn count(mut self, c: i32) -> Self {
        self.count = Some(c);
        self
    }
    pub fn series(mut self, count: Option<i32>, series: i32) -> Self {
        self.count = count;
        self.series_count = Some(series);
        self
    }
    pub fn created(mut self, t: &str) -> Self {
        self.created = t.into();
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.host = h.into();
        self
    }
    pub fn rv(mut self, rv: &str) -> Self {
        self.resource_version = rv.into();
        self
    }
    pub fn json(&self) -> Value {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("pod.{}", self.uid), "namespace": "default",
                         "uid": self.uid, "resourceVersion": self.resource_version,
                         "creationTimestamp": self.created},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "default",
                               "name": format!("pod-{}", self.pod_uid), "uid": self.pod_uid},
            "reason": self.reason, "message": self.message, "type": "Warning",
            "firstTimestamp": self.created, "lastTimestamp": self.created,
            "source": {"component": "kubelet", "host": self.host},
        });
        if let Some(c) = self.count {
            v["count"] = json!(c);
        }
        if let Some(s) = self.series_count {
            v["series"] = json!({"count": s, "lastObservedTime": "2026-01-01T00:10:00.000000Z"});
        }
        v
    }
    pub fn build(&self) -> Event {
        serde_json::from_value(self.json()).unwrap()
    }
}

pub fn runtime_class_json(name: &str, handler: &str) -> Value {
    json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
           "metadata": {"name": name, "uid": format!("rc-{name}"), "resourceVersion": "1"},
           "handler": handler})
}

pub fn runtime_class(name: &str, handler: &str) -> RuntimeClass {
    serde_json::from_value(runtime_class_json(name, handler)).unwrap()
}

/// One answer of the fake API server.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A list response (must answer a request without `watch=true`).
    List { rv: &'static str, items: Vec<Value> },
    /// A watch response whose body carries these watch events and then ends
    /// (must answer a request with `watch=true`).
    Watch(Vec<Value>),
}

pub fn added(obj: Value) -> Value {
    json!({"type": "ADDED", "object": obj})
}
pub fn modified(obj: Value) -> Value {
    json!({"type": "MODIFIED", "object": obj})
}
/// `410 Gone`: the resource version expired, the watcher must relist.
pub fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": "Failure", "message": "too old resource version", "reason": "Expired",
           "code": 410}})
}

/// A resource the agent watches: request path and exact field selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Watched {
    pub path: &'static str,
    pub field_selector: Option<String>,
}

impl Watched {
    pub fn runtime_classes() -> Watched {
        Watched {
            path: "/apis/node.k8s.io/v1/runtimeclasses",
            field_selector: None,
        }
    }
    pub fn pods(node: &str) -> Watched {
        Watched {
            path: "/api/v1/pods",
            field_selector: Some(format!("spec.nodeName={node}")),
        }
    }
    pub fn events(reason: &str) -> Watched {
        Watched {
            path: "/api/v1/events",
            field_selector: Some(format!("type=Warning,involvedObject.kind=Pod,reason={reason}")),
        }
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// The fake API server: per-resource scripts, every request checked.
pub struct ApiServerVerifier {
    parked_rx: watch::Receiver<usize>,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApiServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerVerifier").finish_non_exhaustive()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

impl ApiServerVerifier {
    /// A client wired to a fake server that plays `scripts`. Any request for a resource
    /// without a script, with a wrong method, or of the wrong kind (list vs watch) fails
    /// the test (the panic surfaces through [`ApiServerVerifier::finish`]).
    pub fn start(scripts: Vec<(Watched, Vec<Reply>)>) -> (Client, ApiServerVerifier) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let (parked_tx, parked_rx) = watch::channel(0usize);
        let log = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(Self::serve(handle, scripts, parked_tx, log.clone()));
        (client, ApiServerVerifier { parked_rx, log, task })
    }

    async fn serve(
        mut handle: Handle,
        scripts: Vec<(Watched, Vec<Reply>)>,
        parked_tx: watch::Sender<usize>,
        log: Arc<Mutex<Vec<String>>>,
    ) {
        let mut scripts: Vec<(Watched, VecDeque<Reply>)> = scripts
            .into_iter()
            .map(|(w, r)| (w, r.into_iter().collect()))
            .collect();
        let mut parked: Vec<Responder> = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            assert_eq!(req.method(), Method::GET, "{}", req.uri());
            let path = req.uri().path().to_owned();
            let q = query_params(req.uri().query().unwrap_or(""));
            let is_watch = q.get("watch").map(String::as_str) == Some("true");
            let selector = q.get("fieldSelector").cloned();
            let Some((_, script)) = scripts
                .iter_mut()
                .find(|(w, _)| w.path == path && w.field_selector == selector)
            else {
                panic!("unexpected request {} (fieldSelector {selector:?})", req.uri());
            };
            log.lock().unwrap().push(format!(
                "{} {path} {}",
                if is_watch { "WATCH" } else { "LIST" },
                selector.as_deref().unwrap_or("")
            ));
            match script.pop_front() {
                None => {
                    parked.push(send);
                    parked_tx.send_replace(parked.len());
                }
                Some(Reply::List { rv, items }) => {
                    assert!(!is_watch, "expected a list, got {}", req.uri());
                    let kind = match path.as_str() {
                        "/api/v1/pods" => "PodList",
                        "/api/v1/events" => "EventList",
                        _ => "RuntimeClassList",
                    };
                    let body = json!({"apiVersion": "v1", "kind": kind,
                                      "metadata": {"resourceVersion": rv}, "items": items});
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&body).unwrap()))
                            .unwrap(),
                    );
                }
                Some(Reply::Watch(events)) => {
                    assert!(is_watch, "expected a watch, got {}", req.uri());
                    assert!(q.contains_key("resourceVersion"), "{}", req.uri());
                    let mut body = Vec::new();
                    for e in events {
                        serde_json::to_writer(&mut body, &e).unwrap();
                        body.push(b'\n');
                    }
                    send.send_response(Response::builder().body(Body::from(body)).unwrap());
                }
            }
        }
    }

    /// Waits (bounded) until `n` requests are parked, i.e. every script has been played
    /// and consumed. Fails with the request log on timeout.
    pub async fn wait_parked(&mut self, n: usize, timeout: std::time::Duration) {
        let ok = matches!(
            tokio::time::timeout(timeout, self.parked_rx.wait_for(|p| *p >= n)).await,
            Ok(Ok(_))
        );
        if !ok || self.task.is_finished() {
            panic!(
                "fake API server: {} of {n} resources finished their script within {timeout:?}; requests: {:#?}",
                *self.parked_rx.borrow(),
                self.log.lock().unwrap()
            );
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}
