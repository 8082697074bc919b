//! The fake API server, in the style of kube-rs's controller-rs: a `kube::Client` whose
//! transport is a `tower_test` mock, and an [`ApiServerVerifier`] on the other end.
//!
//! Two ways to drive it, one transport:
//! - ordered scenarios: [`ApiServerVerifier::next`] hands over each request as a [`Seen`]
//!   (method, path, content type and body, already read) to assert and answer, in order;
//!   [`ApiServerVerifier::answer_all`] does the same for every request of a long-running loop;
//! - per-resource watch scripts ([`super::scripted`]), for the concurrent watches of the
//!   failure counter, which arrive in no fixed order across resources.
//!
//! Exists so the reconcilers' API traffic (which requests, how many, with what payload)
//! is pinned by tests without a real kube-apiserver, which this machine does not have.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
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
    pub fn hang(mut self) -> SendResponse<Response<RespBody>> {
        self.send.take().expect("answered once")
    }

    /// Answers a watch request with a stream of `events` (JSON lines) that ends after
    /// `open_for` (what the API server does at the watch's `timeoutSeconds`).
    pub fn watch_stream(self, events: Vec<Value>, open_for: Duration) {
        self.watch_stream_at(
            events.into_iter().map(|e| (Duration::ZERO, e)).collect(),
            open_for,
        );
    }

    /// Like [`Seen::watch_stream`], each event sent after its delay (from the previous one).
    pub fn watch_stream_at(mut self, events: Vec<(Duration, Value)>, open_for: Duration) {
        let send = self.send.take().expect("answered once");
        let lines = futures::stream::iter(events).then(|(delay, e)| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut v = serde_json::to_vec(&e).unwrap();
            v.push(b'\n');
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(v)))
        });
        let stream = lines.chain(futures::stream::once(async move {
            tokio::time::sleep(open_for).await;
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::new()))
        }));
        let body = StreamBody::new(stream)
            .map_err(|e: Infallible| match e {})
            .boxed_unsync();
        send.send_response(Response::builder().status(200).body(body).unwrap());
    }
}

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
#[allow(missing_debug_implementations)] // tower-test's handle has no Debug
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

impl Seen {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }

    /// The raw value of query parameter `key`.
    pub fn query(&self, key: &str) -> Option<&str> {
        query_param(&self.uri, key)
    }

    /// Whether this is a watch (`?watch=true`) rather than a list or get.
    pub fn is_watch(&self) -> bool {
        self.query("watch") == Some("true")
    }

    /// Answers a watch with no events, open for the `timeoutSeconds` the client asked for:
    /// what an idle API server does.
    pub fn watch_idle(self) {
        let secs: u64 = self
            .query("timeoutSeconds")
            .expect("watches carry timeoutSeconds")
            .parse()
            .unwrap();
        self.watch_stream(vec![], Duration::from_secs(secs));
    }
}

/// The raw value of query parameter `key` of a request URI.
pub fn query_param<'a>(uri: &'a str, key: &str) -> Option<&'a str> {
    uri.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Every request a long-running scenario received: arrival time (tokio's clock), method, URI.
pub type RequestLog = Arc<Mutex<Vec<(tokio::time::Instant, Method, String)>>>;

impl ApiServerVerifier {
    /// Hands every request to `answer`, however long the client runs (a simulated hour of a
    /// reconcile loop), after recording it in `log`. Returns when the client is gone.
    pub async fn answer_all(mut self, log: RequestLog, mut answer: impl FnMut(Seen)) {
        while let Some(seen) = self.next_unbounded().await {
            log.lock()
                .unwrap()
                .push((tokio::time::Instant::now(), seen.method.clone(), seen.uri.clone()));
            answer(seen);
        }
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

/// What [`serve_agent_api`] serves: one SelfTest, the Node, its pods, and how the NodeReport
/// behaves.
#[derive(Debug, Clone)]
pub struct AgentApi {
    pub st: crate::crd::SelfTest,
    pub node: kube::api::PartialObjectMeta<k8s_openapi::api::core::v1::Node>,
    pub pods: Vec<Value>,
    /// Status codes the first NodeReport writes get.
    pub write_failures: Vec<StatusCode>,
    /// When (after the server starts) the NodeReport is deleted: its watch then delivers
    /// `DELETED`, and a status write 404s until the object is applied again.
    pub report_deleted_after: Option<Duration>,
    /// The RuntimeProfiles (for an agent that installs them).
    pub profiles: Vec<crate::crd::RuntimeProfile>,
}

impl AgentApi {
    pub fn new(
        st: crate::crd::SelfTest,
        node: kube::api::PartialObjectMeta<k8s_openapi::api::core::v1::Node>,
    ) -> AgentApi {
        AgentApi {
            st,
            node,
            pods: Vec::new(),
            write_failures: Vec::new(),
            report_deleted_after: None,
            profiles: Vec::new(),
        }
    }
}

/// The agent's side of the API for whole-loop tests: answers lists and watches (kept open
/// for their `timeoutSeconds`, no events) of SelfTests, RuntimeProfiles, the Node `n1`, its
/// NodeReport, its pods, failure events and RuntimeClasses, and NodeReport reads and
/// applies and Events, as [`AgentApi`] says. Any other request fails the test.
pub async fn serve_agent_api(server: ApiServerVerifier, log: RequestLog, api: AgentApi) {
    use serde_json::json;
    let AgentApi {
        st,
        node,
        pods,
        mut write_failures,
        report_deleted_after,
        profiles,
    } = api;
    write_failures.reverse();
    let start = tokio::time::Instant::now();
    let deleted_at = report_deleted_after.map(|d| start + d);
    let mut last_object_apply: Option<tokio::time::Instant> = None;
    let mut report_watches = 0;
    server
        .answer_all(log, |seen| {
            let path = seen.path().to_owned();
            let now = tokio::time::Instant::now();
            let exists =
                last_object_apply.is_some_and(|applied| deleted_at.is_none_or(|d| now < d || applied >= d));
            match (seen.method.clone(), path.as_str(), seen.is_watch()) {
                (Method::GET, "/apis/usernsguard.io/v1alpha1/nodereports", true) => {
                    report_watches += 1;
                    let secs: u64 = seen.query("timeoutSeconds").unwrap().parse().unwrap();
                    let pending = deleted_at.filter(|d| *d > now && report_watches == 1);
                    match pending {
                        Some(d) => seen.watch_stream_at(
                            vec![(
                                d - now,
                                json!({"type": "DELETED", "object": {
                                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                    "metadata": {"name": "n1", "resourceVersion": "200"}}}),
                            )],
                            Duration::from_secs(secs),
                        ),
                        None => seen.watch_idle(),
                    }
                }
                (Method::GET, _, true) => seen.watch_idle(),
                (Method::GET, "/apis/usernsguard.io/v1alpha1/selftests", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "usernsguard.io/v1alpha1", "kind": "SelfTestList",
                            "metadata": {"resourceVersion": "100"}, "items": [st]}),
                ),
                (Method::GET, "/apis/usernsguard.io/v1alpha1/nodereports", false) => {
                    let items: Vec<Value> = if exists {
                        vec![
                            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                    "metadata": {"name": "n1", "resourceVersion": "150"}}),
                        ]
                    } else {
                        vec![]
                    };
                    seen.reply(
                        StatusCode::OK,
                        &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                                "metadata": {"resourceVersion": "100"}, "items": items}),
                    )
                }
                (Method::GET, "/apis/usernsguard.io/v1alpha1/runtimeprofiles", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "usernsguard.io/v1alpha1", "kind": "RuntimeProfileList",
                            "metadata": {"resourceVersion": "100"}, "items": profiles}),
                ),
                // The install reconciler reads back what it installed before (once).
                (Method::GET, "/apis/usernsguard.io/v1alpha1/nodereports/n1", false) => {
                    seen.fail(StatusCode::NOT_FOUND, "NotFound")
                }
                (Method::GET, "/api/v1/nodes", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                            "metadata": {"resourceVersion": "100"}, "items": [node]}),
                ),
                (Method::GET, "/api/v1/events", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "EventList",
                            "metadata": {"resourceVersion": "100"}, "items": []}),
                ),
                (Method::GET, "/apis/node.k8s.io/v1/runtimeclasses", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClassList",
                            "metadata": {"resourceVersion": "100"}, "items": []}),
                ),
                (Method::GET, "/api/v1/pods", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": "100"}, "items": pods}),
                ),
                (Method::PATCH, "/apis/usernsguard.io/v1alpha1/nodereports/n1", _)
                | (Method::PATCH, "/apis/usernsguard.io/v1alpha1/nodereports/n1/status", _) => {
                    if let Some(code) = write_failures.pop() {
                        seen.fail(code, "Injected");
                        return;
                    }
                    let is_status = path.ends_with("/status");
                    if is_status && !exists {
                        seen.fail(StatusCode::NOT_FOUND, "NotFound");
                        return;
                    }
                    if !is_status {
                        last_object_apply = Some(now);
                    }
                    let mut stored = seen.body.clone();
                    stored["spec"] = json!({"nodeName": "n1"});
                    seen.reply(StatusCode::OK, &stored);
                }
                (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events", _) => seen.echo(),
                (m, p, _) => panic!("unexpected request {m} {p}"),
            }
        })
        .await;
}
