//! Test-only fake API server, in the style of kube-rs's controller-rs: a `kube::Client`
//! whose transport is a `tower_test` mock, and an [`ApiServerVerifier`] that asserts each
//! request's method, path, content type and body, in order, and answers it.
//!
//! Exists so the reconcilers' API traffic (which requests, how many, with what payload)
//! is pinned by tests without a real kube-apiserver, which this machine does not have.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use kube::client::Body;
use kube::Client;
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};

/// Response body of the fake server: either a complete JSON document or a watch stream.
pub type RespBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A client for an API server that is not there (a closed port): every request fails to
/// connect, as when the control plane is down.
pub fn unreachable_client() -> Client {
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    Client::try_from(config).expect("client from static config")
}

/// A client talking to the fake server, and the server's handle.
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<RespBody>>();
    (Client::new(svc, "default"), ApiServerVerifier(handle))
}

/// One request the code under test sent, already read.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query, e.g. `/api/v1/nodes/n1?fieldManager=x`.
    pub uri: String,
    pub content_type: Option<String>,
    pub body: Value,
    send: Option<SendResponse<Response<RespBody>>>,
}

impl Seen {
    /// Asserts method, path+query and content type (None: no body expected).
    #[track_caller]
    pub fn expect(&self, method: Method, uri: &str, content_type: Option<&str>) -> &Self {
        assert_eq!(self.method, method, "method of {}", self.uri);
        assert_eq!(self.uri, uri, "uri");
        assert_eq!(
            self.content_type.as_deref(),
            content_type,
            "content type of {}",
            self.uri
        );
        self
    }

    /// Answers with a JSON document.
    pub fn reply(mut self, status: StatusCode, body: &Value) {
        let send = self.send.take().expect("answered once");
        send.send_response(json_response(status, body));
    }

    /// Answers 200 with the request's own body (what an API server echoes for create/apply).
    pub fn echo(self) {
        let body = self.body.clone();
        self.reply(StatusCode::OK, &body);
    }

    /// Answers with a `Status` failure of the given code.
    pub fn fail(self, status: StatusCode, reason: &str) {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("fake {reason}"), "reason": reason, "code": status.as_u16(),
        });
        self.reply(status, &body);
    }

    /// Never answers: the caller sees a hung connection until its own timeout fires.
    #[allow(dead_code)] // used by the agent/controller scenarios
    pub fn hang(mut self) -> SendResponse<Response<RespBody>> {
        self.send.take().expect("answered once")
    }

    /// Answers a watch request with a stream of `events` (JSON lines) that ends after
    /// `open_for` (what the API server does at the watch's `timeoutSeconds`).
    #[allow(dead_code)]
    pub fn watch_stream(mut self, events: Vec<Value>, open_for: Duration) {
        let send = self.send.take().expect("answered once");
        let lines: Vec<Bytes> = events
            .into_iter()
            .map(|e| {
                let mut v = serde_json::to_vec(&e).unwrap();
                v.push(b'\n');
                Bytes::from(v)
            })
            .collect();
        let stream = futures::stream::iter(lines)
            .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)))
            .chain(futures::stream::once(async move {
                tokio::time::sleep(open_for).await;
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::new()))
            }));
        let body = StreamBody::new(stream)
            .map_err(|e: Infallible| match e {})
            .boxed_unsync();
        send.send_response(Response::builder().status(200).body(body).unwrap());
    }
}

use futures::StreamExt;

pub fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(bytes)
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

/// The fake API server's side of the mock transport.
pub struct ApiServerVerifier(pub Handle<Request<Body>, Response<RespBody>>);

impl ApiServerVerifier {
    /// The next request; panics if none arrives within 1 s of real time. Real time, not
    /// tokio time: under `start_paused` the code under test may be waiting on a blocking
    /// thread (the self-test runner), and tokio would otherwise auto-advance the clock past
    /// the deadline while it runs. Polling keeps the runtime busy, so paused time stands still.
    pub async fn next(&mut self) -> Seen {
        let start = std::time::Instant::now();
        let mut fut = std::pin::pin!(self.0.next_request());
        loop {
            if let std::task::Poll::Ready(r) = futures::poll!(&mut fut) {
                let (req, send) = r.expect("client dropped");
                return read(req, send).await;
            }
            assert!(start.elapsed() < Duration::from_secs(1), "no request within 1s");
            tokio::task::yield_now().await;
        }
    }

    /// The next request, however long it takes (None once the client is gone): for fake
    /// servers that run for a whole simulated hour.
    pub async fn next_unbounded(&mut self) -> Option<Seen> {
        let (req, send) = self.0.next_request().await?;
        Some(read(req, send).await)
    }

    /// The next request if one arrives within `wait`, else None.
    pub async fn maybe_next(&mut self, wait: Duration) -> Option<Seen> {
        match tokio::time::timeout(wait, self.0.next_request()).await {
            Ok(Some((req, send))) => Some(read(req, send).await),
            _ => None,
        }
    }

    /// Asserts that no request arrives within `wait`.
    #[allow(dead_code)]
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Some(seen) = self.maybe_next(wait).await {
            panic!("unexpected request {} {} {}", seen.method, seen.uri, seen.body);
        }
    }
}

async fn read(req: Request<Body>, send: SendResponse<Response<RespBody>>) -> Seen {
    let method = req.method().clone();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = req.into_body().collect_bytes().await.expect("readable body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Seen {
        method,
        uri,
        content_type,
        body,
        send: Some(send),
    }
}

/// Runs `scenario` against the verifier and fails the test if it does not finish within
/// `limit` (1 s for single-reconcile scenarios, as in controller-rs).
pub async fn finish<T>(handle: tokio::task::JoinHandle<T>, limit: Duration) -> T {
    tokio::time::timeout(limit, handle)
        .await
        .expect("scenario timed out")
        .expect("scenario panicked")
}

// ---------------------------------------------------------------------------------------------
// Object builders and a fake self-test engine
// ---------------------------------------------------------------------------------------------

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::api::{ObjectMeta, PartialObjectMeta};
use usernsguard_runtime::report::{Check, CheckResult, HandlerReport, SelfTestReport, Verdict};
use usernsguard_runtime::{NodeFacts, Reason};

use crate::agent::{RunRequest, SelfTestRunner};
use crate::crd::{SelfTest, SelfTestSpec};

impl SelfTest {
    /// `default`, generation 1, all nodes, handlers runc and crun, labels published.
    pub fn test() -> Self {
        let spec: SelfTestSpec = serde_json::from_value(serde_json::json!({
            "runtimeHandlers": ["runc", "crun"],
        }))
        .unwrap();
        let mut st = SelfTest::new("default", spec);
        st.metadata.generation = Some(1);
        st.metadata.uid = Some("st-uid-1".into());
        st
    }

    #[allow(dead_code)]
    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self
    }

    pub fn with_handlers<const N: usize>(mut self, handlers: [&str; N]) -> Self {
        self.spec.runtime_handlers = handlers.iter().map(|h| h.to_string()).collect();
        self
    }

    pub fn generation(mut self, g: i64) -> Self {
        self.metadata.generation = Some(g);
        self
    }

    pub fn selecting(mut self, key: &str, value: &str) -> Self {
        self.spec.node_selector.insert(key.into(), value.into());
        self
    }

    pub fn interval(mut self, interval: &str) -> Self {
        self.spec.interval = Some(interval.into());
        self
    }
}

/// Metadata of Node `name` (what the agent's node watch delivers).
pub fn node_meta<const N: usize>(name: &str, labels: [(&str, &str); N]) -> PartialObjectMeta<Node> {
    let mut m: PartialObjectMeta<Node> = PartialObjectMeta {
        types: Some(kube::api::TypeMeta {
            api_version: "meta.k8s.io/v1".into(),
            kind: "PartialObjectMetadata".into(),
        }),
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("{name}-uid")),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        _phantom: std::marker::PhantomData,
    };
    m.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    m
}

pub fn facts() -> NodeFacts {
    serde_json::from_value(serde_json::json!({
        "kernel": "6.1.0-test", "selinux": {"mode": "disabled"}, "cgroup": "v2",
    }))
    .unwrap()
}

/// A handler report with the given verdict: a failing one fails `userns-joined` with
/// `mqueue_owner_unmapped`.
pub fn handler_report(handler: &str, verdict: Verdict) -> HandlerReport {
    let checks = match verdict {
        Verdict::Pass => vec![CheckResult::pass(Check::UsernsJoined, "/dev/mqueue owned by 0")],
        Verdict::Fail => vec![CheckResult::fail(
            Check::UsernsJoined,
            Reason::MqueueOwnerUnmapped,
            "/dev/mqueue owned by 65534",
        )],
        Verdict::Unknown => vec![CheckResult::error(
            Check::UsernsJoined,
            Some(Reason::Timeout),
            "timed out",
        )],
    };
    HandlerReport {
        handler: handler.into(),
        binary: format!("/usr/bin/{handler}"),
        runtime: handler.into(),
        version: "1.0".into(),
        features: Default::default(),
        verdict,
        checks,
    }
}

/// A self-test engine that answers from a table and records what it was asked. Each run
/// gets a new `startedAt` and durations, as the real engine's would.
#[derive(Debug, Default)]
pub struct FakeRunner {
    pub verdicts: Mutex<BTreeMap<String, Verdict>>,
    pub calls: Mutex<Vec<RunRequest>>,
}

impl FakeRunner {
    pub fn with<const N: usize>(verdicts: [(&str, Verdict); N]) -> Arc<Self> {
        let r = FakeRunner::default();
        r.set(verdicts);
        Arc::new(r)
    }

    pub fn set<const N: usize>(&self, verdicts: [(&str, Verdict); N]) {
        *self.verdicts.lock().unwrap() = verdicts.iter().map(|(h, v)| (h.to_string(), *v)).collect();
    }

    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl SelfTestRunner for FakeRunner {
    fn run(&self, req: &RunRequest) -> SelfTestReport {
        let mut calls = self.calls.lock().unwrap();
        calls.push(req.clone());
        let n = calls.len();
        let verdicts = self.verdicts.lock().unwrap();
        let handlers = verdicts
            .iter()
            .filter(|(h, _)| req.handlers.is_empty() || req.handlers.contains(h))
            .map(|(h, v)| {
                let mut r = handler_report(h, *v);
                for c in &mut r.checks {
                    c.duration_seconds = 0.1 * n as f64;
                }
                r
            })
            .collect();
        SelfTestReport {
            started_at: format!("2026-11-29T04:{:02}:00Z", n % 60),
            duration_seconds: 0.5 * n as f64,
            node: facts(),
            handlers,
        }
    }
}

use crate::crd::{
    NodeReport, NodeReportSpec, NodeReportStatus, RuntimeProfile, RuntimeProfileSpec, SelfTestResult,
};

impl NodeReport {
    /// The report of `node` with one result per (SelfTest, handler, generation, verdict).
    pub fn test(node: &str, results: &[(&str, &str, i64, Verdict)]) -> Self {
        let mut nr = NodeReport::new(
            node,
            NodeReportSpec {
                node_name: node.into(),
            },
        );
        nr.status = Some(NodeReportStatus {
            results: results
                .iter()
                .map(|(st, h, g, v)| SelfTestResult {
                    self_test: st.to_string(),
                    generation: *g,
                    started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        format!("2026-11-29T03:0{g}:00Z").parse().unwrap(),
                    ),
                    report: handler_report(h, *v),
                })
                .collect(),
            ..NodeReportStatus::default()
        });
        nr
    }
}

impl RuntimeProfile {
    /// `crun` profile: bundled crun, handler `crun`, default RuntimeClass options.
    pub fn test() -> Self {
        let spec: RuntimeProfileSpec = serde_json::from_value(serde_json::json!({
            "runtime": "crun", "handler": "crun",
            "binary": {"source": "Bundled", "path": "/usr/local/bin/crun"},
        }))
        .unwrap();
        let mut p = RuntimeProfile::new("crun", spec);
        p.metadata.uid = Some("rtp-uid".into());
        p.metadata.generation = Some(1);
        p
    }
}

/// Status code of `GET path` on a local HTTP server (HTTP/1.1, connection closed after).
pub async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("server listening");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"))
}
