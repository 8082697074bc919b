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
    /// The next request; panics if none arrives within 1 s of (possibly paused) time.
    pub async fn next(&mut self) -> Seen {
        let fut = self.0.next_request();
        let (req, send) = tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .expect("no request within 1s")
            .expect("client dropped");
        read(req, send).await
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
