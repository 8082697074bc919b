//! The fake API server's second mode: per-resource scripts for list and watch requests.
//!
//! The agent's failure watches run concurrently, so requests are matched by resource (path +
//! field selector), not by global order; within one resource the script is strictly ordered
//! and every request is checked (method, list vs watch, a watch's `resourceVersion`, a
//! page's `continue` token). When a script is exhausted the next request is parked
//! unanswered, which is how a test knows that every scripted object has been consumed.
//! Scripts are iterators, so a benchmark can stream tens of thousands of objects without
//! building them all up front.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower_test::mock::SendResponse;

use super::api_server::{json_response, mock_client, ApiServerVerifier, RespBody};

/// One answer of the fake API server.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete list response (must answer a request without `watch=true`).
    List { rv: &'static str, items: Vec<Value> },
    /// One page of a paged list; `continue_token` set means another page follows, and the
    /// next request of this resource must ask for it.
    Page {
        rv: String,
        items: Vec<Value>,
        continue_token: Option<String>,
    },
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

    fn list_kind(&self) -> &'static str {
        match self.path {
            "/api/v1/pods" => "PodList",
            "/api/v1/events" => "EventList",
            _ => "RuntimeClassList",
        }
    }
}

/// The RuntimeClasses' script: one list of `(name, handler)` classes.
pub fn runtime_classes(classes: &[(&str, &str)]) -> (Watched, Vec<Reply>) {
    let items = classes
        .iter()
        .map(|(name, handler)| super::builders::runtime_class_json(name, handler))
        .collect();
    (Watched::runtime_classes(), vec![Reply::List { rv: "1", items }])
}

/// A resource's script: its replies in order, produced on demand.
pub type Script = Box<dyn Iterator<Item = Reply> + Send>;

/// The fake API server playing per-resource scripts.
pub struct ScriptedApiServer {
    parked_rx: watch::Receiver<usize>,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ScriptedApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedApiServer").finish_non_exhaustive()
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

fn body_response(bytes: Vec<u8>) -> Response<RespBody> {
    Response::builder()
        .status(StatusCode::OK)
        .body(
            Full::new(bytes::Bytes::from(bytes))
                .map_err(|e: std::convert::Infallible| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

impl ScriptedApiServer {
    /// A client wired to a fake server that plays `scripts`. Any request for a resource
    /// without a script, with a wrong method, or of the wrong kind (list vs watch) fails
    /// the test (the panic surfaces through [`ScriptedApiServer::wait_parked`]).
    pub fn start(scripts: Vec<(Watched, Vec<Reply>)>) -> (Client, ScriptedApiServer) {
        Self::start_lazy(
            scripts
                .into_iter()
                .map(|(w, r)| (w, Box::new(r.into_iter()) as Script))
                .collect(),
        )
    }

    /// Like [`ScriptedApiServer::start`], with replies produced only when requested.
    pub fn start_lazy(scripts: Vec<(Watched, Script)>) -> (Client, ScriptedApiServer) {
        let (client, verifier) = mock_client();
        let (parked_tx, parked_rx) = watch::channel(0usize);
        let log = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(Self::serve(verifier, scripts, parked_tx, log.clone()));
        (client, ScriptedApiServer { parked_rx, log, task })
    }

    async fn serve(
        verifier: ApiServerVerifier,
        mut scripts: Vec<(Watched, Script)>,
        parked_tx: watch::Sender<usize>,
        log: Arc<Mutex<Vec<String>>>,
    ) {
        let mut handle = verifier.0;
        let mut parked: Vec<SendResponse<Response<RespBody>>> = Vec::new();
        // The continue token each resource's next request must carry.
        let mut expected_continue: BTreeMap<usize, String> = BTreeMap::new();
        while let Some((req, send)) = handle.next_request().await {
            assert_eq!(req.method(), Method::GET, "{}", req.uri());
            let path = req.uri().path().to_owned();
            let q = query_params(req.uri().query().unwrap_or(""));
            let is_watch = q.get("watch").map(String::as_str) == Some("true");
            let selector = q.get("fieldSelector").cloned();
            let Some(index) = scripts
                .iter()
                .position(|(w, _)| w.path == path && w.field_selector == selector)
            else {
                panic!("unexpected request {} (fieldSelector {selector:?})", req.uri());
            };
            let (watched, script) = &mut scripts[index];
            log.lock().unwrap().push(format!(
                "{} {path} {}",
                if is_watch { "WATCH" } else { "LIST" },
                selector.as_deref().unwrap_or("")
            ));
            if let Some(token) = expected_continue.remove(&index) {
                assert_eq!(q.get("continue"), Some(&token), "next page of {}", req.uri());
            }
            let list = |rv: &str, items: Vec<Value>, cont: Option<&String>| {
                assert!(!is_watch, "expected a list, got {}", req.uri());
                let mut meta = json!({"resourceVersion": rv});
                if let Some(c) = cont {
                    meta["continue"] = json!(c);
                }
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": watched.list_kind(), "metadata": meta, "items": items}),
                )
            };
            match script.next() {
                None => {
                    parked.push(send);
                    parked_tx.send_replace(parked.len());
                }
                Some(Reply::List { rv, items }) => send.send_response(list(rv, items, None)),
                Some(Reply::Page {
                    rv,
                    items,
                    continue_token,
                }) => {
                    send.send_response(list(&rv, items, continue_token.as_ref()));
                    if let Some(token) = continue_token {
                        expected_continue.insert(index, token);
                    }
                }
                Some(Reply::Watch(events)) => {
                    assert!(is_watch, "expected a watch, got {}", req.uri());
                    assert!(q.contains_key("resourceVersion"), "{}", req.uri());
                    let mut body = Vec::new();
                    for e in events {
                        serde_json::to_writer(&mut body, &e).unwrap();
                        body.push(b'\n');
                    }
                    send.send_response(body_response(body));
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
