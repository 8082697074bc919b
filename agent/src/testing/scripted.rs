//! The fake API server's second mode: per-resource scripts for list and watch requests.
//!
//! The agent's failure watches run concurrently, so requests are matched by resource (path +
//! field selector), not by global order; within one resource the script is strictly ordered
//! and every request is checked (method, list vs watch, a watch's `resourceVersion`, a
//! page's `continue` token). When a script is exhausted the next request is parked
//! unanswered, which is how a test knows that every scripted object has been consumed.
//! Scripts are iterators, so a benchmark can stream tens of thousands of objects without
//! building them all up front.
//!
//! A script for [`Watched::filtered`] plays the API server's part for field selectors too:
//! it accepts whatever selector the request carries, as long as kube-apiserver supports every
//! field in it ([`selectable_fields`]; any other fails the test, as the API server answers
//! `400 field label not supported`), and delivers only the scripted objects the selector
//! matches, counting generated and delivered objects ([`ScriptedApiServer::delivery`]).

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
    /// Like [`Reply::Watch`], sent only once the receiver reads `true`: the test decides
    /// when these events happen relative to other resources'.
    WatchWhen(watch::Receiver<bool>, Vec<Value>),
}

pub fn added(obj: Value) -> Value {
    json!({"type": "ADDED", "object": obj})
}
pub fn modified(obj: Value) -> Value {
    json!({"type": "MODIFIED", "object": obj})
}
pub fn deleted(obj: Value) -> Value {
    json!({"type": "DELETED", "object": obj})
}
/// `410 Gone`: the resource version expired, the watcher must relist.
pub fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": "Failure", "message": "too old resource version", "reason": "Expired",
           "code": 410}})
}

/// A resource the agent watches: request path and exact field selector, or any selector the
/// fake server then applies itself (`filtered`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Watched {
    pub path: &'static str,
    pub field_selector: Option<String>,
    pub filtered: bool,
}

impl Watched {
    pub fn runtime_classes() -> Watched {
        Watched {
            path: "/apis/node.k8s.io/v1/runtimeclasses",
            field_selector: None,
            filtered: false,
        }
    }
    pub fn pods(node: &str) -> Watched {
        Watched {
            path: "/api/v1/pods",
            field_selector: Some(format!("spec.nodeName={node}")),
            filtered: false,
        }
    }
    /// The kubelet's sandbox-failure Warning events, the one event watch of the agent.
    pub fn sandbox_events() -> Watched {
        Watched {
            path: "/api/v1/events",
            field_selector: Some(
                "type=Warning,involvedObject.kind=Pod,reason=FailedCreatePodSandBox,source=kubelet".into(),
            ),
            filtered: false,
        }
    }
    /// Every object of `path` (`/api/v1/events`, `/api/v1/pods`): the request's field
    /// selector decides what is delivered, as in kube-apiserver.
    pub fn filtered(path: &'static str) -> Watched {
        Watched {
            path,
            field_selector: None,
            filtered: true,
        }
    }

    fn list_kind(&self) -> &'static str {
        match self.path {
            "/api/v1/pods" => "PodList",
            "/api/v1/events" => "EventList",
            _ => "RuntimeClassList",
        }
    }

    fn matches(&self, path: &str, selector: &Option<String>) -> bool {
        self.path == path && (self.filtered || self.field_selector == *selector)
    }
}

/// The fields kube-apiserver lets a client select `path`'s objects by: core/v1 Events
/// (`pkg/registry/core/event/strategy.go`, `ToSelectableFields`, with the v1 field label
/// conversion) and Pods (`pkg/registry/core/pod/strategy.go`); every kind has
/// `metadata.name` and `metadata.namespace`. There is no `source.host` or
/// `reportingInstance`: events cannot be selected by node.
pub fn selectable_fields(path: &str) -> &'static [&'static str] {
    match path {
        "/api/v1/events" => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "/api/v1/pods" => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        _ => &["metadata.name", "metadata.namespace"],
    }
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma-separated,
/// all of which must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSelector {
    path: String,
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses `selector` for objects of `path`; an unsupported field is an error, as from
    /// the API server.
    pub fn parse(path: &str, selector: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in selector.split(',').filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if !selectable_fields(path).contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.to_owned()));
        }
        Ok(FieldSelector {
            path: path.to_owned(),
            terms,
        })
    }

    /// Whether `obj` matches: an absent field reads as the empty string, as in the API server.
    pub fn matches(&self, obj: &Value) -> bool {
        self.terms
            .iter()
            .all(|(field, equal, value)| (field_value(&self.path, obj, field) == *value) == *equal)
    }
}

fn field_value(path: &str, obj: &Value, field: &str) -> String {
    let at = |pointer: &str| match obj.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    };
    if path == "/api/v1/events" && field == "source" {
        // `source` is `source.component`, else the reporting controller.
        let component = at("/source/component");
        return if component.is_empty() {
            at("/reportingComponent")
        } else {
            component
        };
    }
    at(&format!("/{}", field.replace('.', "/")))
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
    delivery: Delivery,
    task: tokio::task::JoinHandle<()>,
}

/// Per script: objects generated (in its replies) and delivered (after the field selector).
type Delivery = Arc<Mutex<BTreeMap<usize, (String, u64, u64)>>>;

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

/// A watch response body: one JSON line per event the filter lets through (errors and
/// bookmarks always pass).
fn watch_body(events: Vec<Value>, pass: impl Fn(&Value) -> bool) -> Vec<u8> {
    let mut body = Vec::new();
    for e in events
        .into_iter()
        .filter(|e| e["type"] == "ERROR" || e["type"] == "BOOKMARK" || pass(&e["object"]))
    {
        serde_json::to_writer(&mut body, &e).unwrap();
        body.push(b'\n');
    }
    body
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
        Self::start_lazy_on(&tokio::runtime::Handle::current(), scripts)
    }

    /// Like [`ScriptedApiServer::start_lazy`], the server running on `runtime` (a benchmark
    /// keeps the fake server's work off the threads whose CPU time it measures).
    pub fn start_lazy_on(
        runtime: &tokio::runtime::Handle,
        scripts: Vec<(Watched, Script)>,
    ) -> (Client, ScriptedApiServer) {
        let (client, verifier) = mock_client();
        let (parked_tx, parked_rx) = watch::channel(0usize);
        let log = Arc::new(Mutex::new(Vec::new()));
        let delivery = Delivery::default();
        let task = runtime.spawn(Self::serve(
            verifier,
            scripts,
            parked_tx,
            log.clone(),
            delivery.clone(),
        ));
        (
            client,
            ScriptedApiServer {
                parked_rx,
                log,
                delivery,
                task,
            },
        )
    }

    async fn serve(
        verifier: ApiServerVerifier,
        mut scripts: Vec<(Watched, Script)>,
        parked_tx: watch::Sender<usize>,
        log: Arc<Mutex<Vec<String>>>,
        delivery: Delivery,
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
            let Some(index) = scripts.iter().position(|(w, _)| w.matches(&path, &selector)) else {
                panic!("unexpected request {} (fieldSelector {selector:?})", req.uri());
            };
            let (watched, script) = &mut scripts[index];
            let filter = watched.filtered.then(|| {
                FieldSelector::parse(&path, selector.as_deref().unwrap_or(""))
                    .unwrap_or_else(|e| panic!("{} -> 400 Bad Request: {e}", req.uri()))
            });
            let pass = |obj: &Value| -> bool {
                let Some(f) = &filter else { return true };
                let ok = f.matches(obj);
                let mut d = delivery.lock().unwrap();
                let e = d.entry(index).or_insert_with(|| (path.clone(), 0, 0));
                e.1 += 1;
                e.2 += u64::from(ok);
                ok
            };
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
                let items: Vec<Value> = items.into_iter().filter(|o| pass(o)).collect();
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
                    send.send_response(body_response(watch_body(events, pass)));
                }
                Some(Reply::WatchWhen(mut gate, events)) => {
                    assert!(is_watch, "expected a watch, got {}", req.uri());
                    let body = watch_body(events, pass);
                    tokio::spawn(async move {
                        let _ = gate.wait_for(|open| *open).await;
                        send.send_response(body_response(body));
                    });
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

    /// For every filtered script: its path, the objects its replies held, and how many of
    /// them the requests' field selectors let through.
    pub fn delivery(&self) -> Vec<(String, u64, u64)> {
        self.delivery.lock().unwrap().values().cloned().collect()
    }
}
