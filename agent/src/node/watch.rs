//! Counting the node's user-namespace pod failures into `usernsguard_pod_userns_failures_total`
//! and starts into `usernsguard_pod_userns_starts_total`, from two sources:
//!
//! * **Container failures from the node's own pods' status** (watch field-selected by
//!   `spec.nodeName`): a container the kubelet could not create or start shows as
//!   `state.waiting` with reason `CreateContainerError`, `CreateContainerConfigError`,
//!   `RunContainerError`, `PreCreateHookError` or `PreStartHookError` and the runtime's
//!   message, and a container instance the runtime created but could not start leaves a
//!   `state.terminated`/`lastState.terminated` record with reason `StartError` (containerd)
//!   or `ContainerCannotRun` (Docker).
//! * **Sandbox failures from events**: a failed `RunPodSandbox` (where runc's mqueue failure
//!   lands) never reaches the pod's status; the kubelet reports it only as a
//!   `FailedCreatePodSandBox` Warning event. One watch, narrowed by every field selector
//!   kube-apiserver supports for core/v1 Events that applies
//!   (`type=Warning,involvedObject.kind=Pod,reason=FailedCreatePodSandBox,source=kubelet`).
//!   There is no node field selector for events (`source.host` and `reportingInstance` are not
//!   selectable), so every agent receives every such event of the cluster and drops those
//!   whose `source.host` names another node before keeping any state. `--watch-events=false`
//!   turns this watch off; sandbox failures are then not counted at all.
//!
//! The counting is a pure state machine ([`FailureCounter`]) fed by the watch streams, so the
//! exactness rules are unit-tested without a cluster:
//!
//! * **One event occurrence**: Kubernetes aggregates repeats of an event into one object by
//!   bumping `count` (core/v1 recorder, the kubelet's) or `series.count` (events.k8s.io); the
//!   occurrences are the larger of the two (at least 1). Per event UID the last count is kept
//!   and only increases are added.
//! * **One container occurrence**: a terminated start-failure record is one occurrence per
//!   container instance (its `containerID`; without one, its reason, message and
//!   timestamps), however often it is re-delivered and whether it shows as `state` or
//!   `lastState`. A waiting failure is one occurrence per *transition* into it: the kubelet
//!   rewrites the same reason and message on every retry, which changes nothing in the API
//!   (the status is written only when it differs), so an unchanged waiting state is the same
//!   occurrence, and a new message (or a return to the reason after another state) is a new
//!   one. `RunContainerError` shown together with a start-failure record is that record's
//!   attempt, counted once through the record. Limits: retries whose status is identical are
//!   invisible in the API; attempts that leave no trace in the status while the pod watch is
//!   down (it keeps only the last two states) are not counted.
//! * **Baseline without clocks**: whatever a watch's *first* list delivers is a baseline
//!   (counted by a previous agent process, or before usernsguard ran): event counts, container
//!   states and running pods are recorded, not counted. Every object first seen after that
//!   list (on the watch, or in the re-list after a `410 Gone`, when it was created while the
//!   watch was down) is new in all its occurrences. Nothing compares the API server's
//!   timestamps with the node's clock.
//! * **Re-lists** re-deliver known objects with unchanged counts: a delta of 0. Objects absent
//!   from a re-list were deleted while the watch was down: events are forgotten, pods are
//!   remembered as deleted (below).
//! * **Late events**: an event may reach the agent after its pod's deletion (the two watches
//!   are not ordered, and the kubelet may still report a sandbox failure of a pod being
//!   deleted). Deleted pods are remembered (user namespace or not, RuntimeClass) for an hour,
//!   the API server's default event TTL, at most [`DELETED_PODS_MAX`] of them, so such an event
//!   is attributed and counted once. An event about a pod not seen at all waits
//!   [`PENDING_TTL`] for the pod watch to deliver it.
//! * **Handlers**: a pod's handler is its RuntimeClass's `handler` (the class name when the
//!   class is unknown), or the node's default handler without a RuntimeClass. Zero series exist
//!   for exactly the node's handlers ([`super::handlers`]), and those of a handler that goes
//!   away are removed. A pod whose RuntimeClass names a handler this node does not register
//!   is still counted (the failure is real), in a series created by that failure.
//! * Pod starts are counted once per pod UID when a user-namespace pod first reaches `Running`.
//!
//! Why core/v1 Events and not events.k8s.io/v1: the kubelet records through the core/v1
//! recorder (`count`, `source.host`), and core/v1 is where the field selectors live; both views
//! are the same stored objects, with `series` visible in core/v1 too.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Event, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::time::{Duration, Instant};
use usernsguard_runtime::Reason;

use super::handlers::{HandlerSet, NodeHandlers};
use crate::health::Health;
use crate::metrics::Metrics;

/// Maps a failure message to a reason code (`usernsguard_runtime::classify::classify`).
pub type Classifier = Arc<dyn Fn(&str) -> Reason + Send + Sync>;

/// The kubelet's event reason for a failed `RunPodSandbox` (`pkg/kubelet/events`).
pub const SANDBOX_FAILURE_REASON: &str = "FailedCreatePodSandBox";

/// The kubelet's event source component (`source.component`, selectable as `source`).
pub const KUBELET_SOURCE: &str = "kubelet";

/// `state.waiting` reasons of a container the kubelet could not create or start
/// (`pkg/kubelet/container/sync_result.go`).
pub const WAITING_FAILURE_REASONS: [&str; 5] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "PreCreateHookError",
    "PreStartHookError",
    "RunContainerError",
];

/// `state.terminated` reasons of a container instance the runtime created but could not
/// start: containerd's `StartError`, Docker's `ContainerCannotRun`.
pub const TERMINATED_FAILURE_REASONS: [&str; 2] = ["StartError", "ContainerCannotRun"];

/// How long an event about a pod not (yet) seen on the pod watch waits for it.
pub const PENDING_TTL: Duration = Duration::from_secs(600);

/// How long a deleted pod is remembered for late events: kube-apiserver's default
/// `--event-ttl`, after which its events are gone too.
pub const DELETED_POD_TTL: Duration = Duration::from_secs(3600);

/// At most this many deleted pods are remembered (the oldest are forgotten first).
pub const DELETED_PODS_MAX: usize = 4096;

/// New failure occurrences of a user-namespace pod, ready to add to the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub handler: String,
    pub reason: Reason,
    pub delta: u64,
}

/// What a pod update produced: at most one start, and failures (from its container statuses,
/// and events that had waited for the pod).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodOutcome {
    pub started: Option<String>,
    pub failures: Vec<Failure>,
}

/// What a pod is, as far as attribution goes.
#[derive(Debug, Clone)]
struct Identity {
    userns: bool,
    runtime_class: Option<Box<str>>,
}

/// What has been seen of one container of a user-namespace pod.
#[derive(Debug)]
struct ContainerTrack {
    name: Box<str>,
    /// The waiting failure (reason, message) last seen, hashed; 0 when not in one.
    waiting: u64,
    /// The last two start-failure records seen (state, lastState), hashed; 0 for none.
    records: [u64; 2],
}

#[derive(Debug)]
struct PodState {
    id: Identity,
    /// Counted as started, or a baseline that must never be counted.
    started: bool,
    /// User-namespace pods only.
    containers: Vec<ContainerTrack>,
}

#[derive(Debug)]
struct Pending {
    reason: Reason,
    delta: u64,
    at: Instant,
}

/// The list/watch phase of one watch, as far as baselines go.
#[derive(Debug, Default)]
struct Listing {
    /// The first complete list has been applied: anything first seen from now on is new.
    synced: bool,
    /// UIDs seen in the list in progress.
    seen: Option<HashSet<Box<str>>>,
}

impl Listing {
    fn note(&mut self, uid: &str) {
        if let Some(seen) = self.seen.as_mut() {
            seen.insert(uid.into());
        }
    }

    /// Whether an object first seen now is a baseline (the first list is still in progress).
    fn baseline(&self) -> bool {
        !self.synced
    }
}

/// The exact-counting state machine. See the module docs for the rules.
pub struct FailureCounter {
    node: String,
    default_handler: String,
    classify: Classifier,
    pods: HashMap<Box<str>, PodState>,
    runtime_classes: HashMap<Box<str>, Box<str>>,
    /// Occurrences of each of this node's events seen.
    events: HashMap<Box<str>, u64>,
    /// Failures of pods not seen yet, by pod UID.
    pending: HashMap<Box<str>, Vec<Pending>>,
    /// Deleted pods, for late events, and the order they were deleted in.
    deleted: HashMap<Box<str>, Identity>,
    deleted_order: VecDeque<(Box<str>, Instant)>,
    pod_listing: Listing,
    event_listing: Listing,
    class_listing: Listing,
}

impl std::fmt::Debug for FailureCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureCounter")
            .field("node", &self.node)
            .field("default_handler", &self.default_handler)
            .field("pods", &self.pods.len())
            .field("events", &self.events.len())
            .field("pending", &self.pending.len())
            .field("deleted", &self.deleted.len())
            .finish()
    }
}

/// Occurrences an event stands for: `max(count, series.count, 1)`.
pub fn occurrences(ev: &Event) -> u64 {
    let count = ev.count.unwrap_or(0);
    let series = ev.series.as_ref().and_then(|s| s.count).unwrap_or(0);
    u64::try_from(count.max(series).max(1)).unwrap_or(1)
}

fn digest(parts: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    // 0 means "none" in the tracks.
    h.finish().max(1)
}

/// A start-failure record in `state`: its identity and message.
fn failure_record(state: Option<&ContainerState>) -> Option<(u64, &str)> {
    let t = state?.terminated.as_ref()?;
    let reason = t.reason.as_deref()?;
    if !TERMINATED_FAILURE_REASONS.contains(&reason) {
        return None;
    }
    let message = t.message.as_deref().unwrap_or("");
    let key = match t.container_id.as_deref().filter(|id| !id.is_empty()) {
        Some(id) => digest(&["id", id]),
        None => {
            let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
                t.map(|t| t.0.to_string()).unwrap_or_default()
            };
            digest(&[
                reason,
                message,
                &time(t.started_at.as_ref()),
                &time(t.finished_at.as_ref()),
                &t.exit_code.to_string(),
            ])
        }
    };
    Some((key, message))
}

impl FailureCounter {
    pub fn new(
        node: impl Into<String>,
        default_handler: impl Into<String>,
        classify: Classifier,
    ) -> FailureCounter {
        FailureCounter {
            node: node.into(),
            default_handler: default_handler.into(),
            classify,
            pods: HashMap::new(),
            runtime_classes: HashMap::new(),
            events: HashMap::new(),
            pending: HashMap::new(),
            deleted: HashMap::new(),
            deleted_order: VecDeque::new(),
            pod_listing: Listing::default(),
            event_listing: Listing::default(),
            class_listing: Listing::default(),
        }
    }

    /// Number of events, pods and deleted pods tracked (benchmarks, diagnostics).
    pub fn tracked(&self) -> (usize, usize, usize) {
        (self.events.len(), self.pods.len(), self.deleted.len())
    }

    /// The handler of pods without a RuntimeClass (the node's CRI default).
    pub fn set_default_handler(&mut self, handler: &str) {
        if self.default_handler != handler {
            self.default_handler = handler.into();
        }
    }

    fn handler_of(&self, id: &Identity) -> String {
        match &id.runtime_class {
            None => self.default_handler.clone(),
            // A RuntimeClass we do not know (deleted, or not synced): its name is the best
            // bounded stand-in, and conventionally equals its handler.
            Some(class) => self.runtime_classes.get(class).unwrap_or(class).to_string(),
        }
    }

    fn failure(&self, id: &Identity, reason: Reason, delta: u64) -> Option<Failure> {
        (id.userns && reason.is_userns() && delta > 0).then(|| Failure {
            handler: self.handler_of(id),
            reason,
            delta,
        })
    }

    fn prune(&mut self, now: Instant) {
        if !self.pending.is_empty() {
            for list in self.pending.values_mut() {
                list.retain(|p| now.saturating_duration_since(p.at) < PENDING_TTL);
            }
            self.pending.retain(|_, l| !l.is_empty());
        }
        while let Some((uid, at)) = self.deleted_order.front() {
            let expired = now.saturating_duration_since(*at) >= DELETED_POD_TTL;
            if !expired && self.deleted_order.len() <= DELETED_PODS_MAX {
                break;
            }
            self.deleted.remove(uid);
            self.deleted_order.pop_front();
        }
    }

    /// Applies one `FailedCreatePodSandBox` Warning event. Returns the new occurrences to
    /// count, if any.
    pub fn apply_event(&mut self, ev: &Event, now: Instant) -> Option<Failure> {
        if ev.involved_object.kind.as_deref() != Some("Pod") {
            return None;
        }
        if let Some(host) = ev.source.as_ref().and_then(|s| s.host.as_deref()) {
            if !host.is_empty() && host != self.node {
                return None;
            }
        }
        let uid = ev.metadata.uid.as_deref()?;
        self.event_listing.note(uid);
        let occ = occurrences(ev);
        let delta = match self.events.get_mut(uid) {
            Some(last) => {
                let d = occ.saturating_sub(*last);
                *last = (*last).max(occ);
                d
            }
            None => {
                self.events.insert(uid.into(), occ);
                if self.event_listing.baseline() {
                    0
                } else {
                    occ
                }
            }
        };
        self.prune(now);
        if delta == 0 {
            return None;
        }
        let reason = (self.classify)(ev.message.as_deref().unwrap_or(""));
        if !reason.is_userns() {
            return None;
        }
        let pod_uid = ev.involved_object.uid.as_deref()?;
        if let Some(pod) = self.pods.get(pod_uid) {
            return self.failure(&pod.id, reason, delta);
        }
        if let Some(id) = self.deleted.get(pod_uid) {
            return self.failure(id, reason, delta);
        }
        // The event raced ahead of the pod watch: keep it until the pod shows up.
        self.pending.entry(pod_uid.into()).or_default().push(Pending {
            reason,
            delta,
            at: now,
        });
        None
    }

    /// Forgets a deleted event. Occurrences already counted or waiting for their pod stay.
    pub fn delete_event(&mut self, ev: &Event) {
        if let Some(uid) = ev.metadata.uid.as_deref() {
            self.events.remove(uid);
        }
    }

    /// Applies a pod of this node: counts its first transition to `Running` and the new
    /// failures in its container statuses (user-namespace pods only), and releases failures
    /// that were waiting for it.
    pub fn apply_pod(&mut self, pod: &Pod, now: Instant) -> PodOutcome {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return PodOutcome::default();
        };
        self.pod_listing.note(uid);
        self.prune(now);
        let baseline = self.pod_listing.baseline();
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let newly_started = match self.pods.get_mut(uid) {
            Some(state) => {
                let first = running && !state.started;
                state.started |= running;
                first
            }
            None => {
                let spec = pod.spec.as_ref();
                let id = Identity {
                    userns: spec.and_then(|s| s.host_users) == Some(false),
                    runtime_class: spec.and_then(|s| s.runtime_class_name.as_deref()).map(Into::into),
                };
                self.pods.insert(
                    uid.into(),
                    PodState {
                        id,
                        started: running,
                        containers: Vec::new(),
                    },
                );
                running && !baseline
            }
        };
        let state = self.pods.get_mut(uid).expect("inserted above");
        if !state.id.userns {
            self.pending.remove(uid);
            return PodOutcome::default();
        }
        // Container failures, decided against what was seen of each container before.
        let mut found: Vec<&str> = Vec::new();
        let statuses = status.into_iter().flat_map(|s| {
            [
                s.init_container_statuses.as_deref(),
                s.container_statuses.as_deref(),
                s.ephemeral_container_statuses.as_deref(),
            ]
            .into_iter()
            .flatten()
            .flatten()
        });
        for cs in statuses {
            let new = container_failures(&mut state.containers, cs);
            if !baseline {
                found.extend(new);
            }
        }
        let id = state.id.clone();
        let mut failures = Vec::new();
        for message in found {
            let reason = (self.classify)(message);
            if let Some(f) = self.failure(&id, reason, 1) {
                failures.push(f);
            }
        }
        for p in self.pending.remove(uid).unwrap_or_default() {
            failures.extend(self.failure(&id, p.reason, p.delta));
        }
        PodOutcome {
            started: newly_started.then(|| self.handler_of(&id)),
            failures,
        }
    }

    /// Forgets a deleted pod but remembers what it was, for events that arrive after it.
    /// Returns failures that had waited for it.
    pub fn delete_pod(&mut self, pod: &Pod, now: Instant) -> Vec<Failure> {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return Vec::new();
        };
        let id = match self.pods.remove(uid) {
            Some(state) => state.id,
            None => {
                let spec = pod.spec.as_ref();
                Identity {
                    userns: spec.and_then(|s| s.host_users) == Some(false),
                    runtime_class: spec.and_then(|s| s.runtime_class_name.as_deref()).map(Into::into),
                }
            }
        };
        let released = self
            .pending
            .remove(uid)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| self.failure(&id, p.reason, p.delta))
            .collect();
        self.remember_deleted(uid.into(), id, now);
        released
    }

    fn remember_deleted(&mut self, uid: Box<str>, id: Identity, now: Instant) {
        if self.deleted.insert(uid.clone(), id).is_none() {
            self.deleted_order.push_back((uid, now));
        }
        self.prune(now);
    }

    pub fn apply_runtime_class(&mut self, rc: &RuntimeClass) {
        if let Some(name) = rc.metadata.name.as_deref() {
            self.class_listing.note(name);
            self.runtime_classes
                .insert(name.into(), rc.handler.as_str().into());
        }
    }

    pub fn delete_runtime_class(&mut self, rc: &RuntimeClass) {
        if let Some(name) = rc.metadata.name.as_deref() {
            self.runtime_classes.remove(name);
        }
    }

    pub fn begin_list_pods(&mut self) {
        self.pod_listing.seen = Some(HashSet::new());
    }

    /// Ends a (re-)list of pods: pods not listed were deleted while the watch was down.
    pub fn end_list_pods(&mut self, now: Instant) {
        self.pod_listing.synced = true;
        let Some(seen) = self.pod_listing.seen.take() else {
            return;
        };
        let gone: Vec<Box<str>> = self
            .pods
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(state) = self.pods.remove(&uid) {
                self.remember_deleted(uid, state.id, now);
            }
        }
    }

    pub fn begin_list_events(&mut self) {
        self.event_listing.seen = Some(HashSet::new());
    }

    /// Ends a (re-)list of events: events not listed were deleted while the watch was down.
    pub fn end_list_events(&mut self) {
        self.event_listing.synced = true;
        if let Some(seen) = self.event_listing.seen.take() {
            self.events.retain(|uid, _| seen.contains(uid));
        }
    }

    pub fn begin_list_classes(&mut self) {
        self.class_listing.seen = Some(HashSet::new());
    }

    pub fn end_list_classes(&mut self) {
        self.class_listing.synced = true;
        if let Some(seen) = self.class_listing.seen.take() {
            self.runtime_classes.retain(|n, _| seen.contains(n));
        }
    }
}

/// The new failure occurrences in one container's status, updating its track: each new
/// start-failure record, and each transition into a waiting failure (unless a record in the
/// same status is that attempt).
fn container_failures<'a>(tracks: &mut Vec<ContainerTrack>, cs: &'a ContainerStatus) -> Vec<&'a str> {
    let index = match tracks.iter().position(|t| *t.name == *cs.name) {
        Some(i) => i,
        None => {
            tracks.push(ContainerTrack {
                name: cs.name.as_str().into(),
                waiting: 0,
                records: [0; 2],
            });
            tracks.len() - 1
        }
    };
    let track = &mut tracks[index];
    let mut out = Vec::new();
    // Older first, so the pair of remembered records stays in order.
    let records = [
        failure_record(cs.last_state.as_ref()),
        failure_record(cs.state.as_ref()),
    ];
    let has_record = records.iter().any(Option::is_some);
    for (key, message) in records.into_iter().flatten() {
        if !track.records.contains(&key) {
            track.records = [track.records[1], key];
            out.push(message);
        }
    }
    let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| {
        let reason = w.reason.as_deref()?;
        WAITING_FAILURE_REASONS
            .contains(&reason)
            .then(|| (reason, w.message.as_deref().unwrap_or("")))
    });
    match waiting {
        Some((reason, message)) => {
            let key = digest(&[reason, message]);
            if track.waiting != key {
                track.waiting = key;
                if !(reason == "RunContainerError" && has_record) {
                    out.push(message);
                }
            }
        }
        None => track.waiting = 0,
    }
    out
}

/// Configuration of the agent's failure watches.
#[derive(Clone)]
pub struct WatchConfig {
    /// This node's name (`NODE_NAME`).
    pub node_name: String,
    pub classify: Classifier,
    /// The node's runtime handlers (series, default handler), kept current by
    /// [`super::handlers::refresh`] and the self-test engine.
    pub handlers: NodeHandlers,
    /// Whether to watch `FailedCreatePodSandBox` events (`--watch-events`). Without it, only
    /// container failures from pod status and pod starts are counted: sandbox failures never
    /// reach a pod's status.
    pub watch_events: bool,
}

impl WatchConfig {
    /// Pods and sandbox-failure events of `node_name`.
    pub fn new(node_name: impl Into<String>, classify: Classifier, handlers: NodeHandlers) -> WatchConfig {
        WatchConfig {
            node_name: node_name.into(),
            classify,
            handlers,
            watch_events: true,
        }
    }
}

impl std::fmt::Debug for WatchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchConfig")
            .field("node_name", &self.node_name)
            .field("handlers", &self.handlers.current())
            .field("watch_events", &self.watch_events)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the RuntimeClass watch ended before its first sync")]
    RuntimeClassesNeverSynced,
    #[error("the pod and event watch streams ended")]
    StreamsEnded,
}

enum Input {
    Class(Box<watcher::Event<RuntimeClass>>),
    Pod(Box<watcher::Event<Pod>>),
    Event(Box<watcher::Event<Event>>),
}

/// Field selector of this node's pods.
pub fn pod_field_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}

/// Field selector of the kubelet's sandbox-failure Warning events about pods: every field
/// kube-apiserver can select core/v1 Events by that narrows them (no node among them).
pub fn event_field_selector() -> String {
    format!("type=Warning,involvedObject.kind=Pod,reason={SANDBOX_FAILURE_REASON},source={KUBELET_SOURCE}")
}

/// The `runtime_handler` values that have zero series: the node's handlers.
struct Series {
    registered: BTreeSet<String>,
}

impl Series {
    /// Creates the series of new handlers, removes those of handlers that went away, and
    /// points pods without a RuntimeClass at the default handler.
    fn follow(&mut self, set: &HandlerSet, counter: &mut FailureCounter, metrics: &Metrics) {
        for gone in self.registered.difference(&set.handlers) {
            tracing::info!(handler = %gone, "runtime handler no longer registered: removing its series");
            metrics.remove_handler(gone);
        }
        for new in set.handlers.difference(&self.registered) {
            metrics.register_handler(new);
        }
        self.registered = set.handlers.clone();
        counter.set_default_handler(&set.default);
    }
}

/// Runs the watches until they end (they normally do not: the watcher recovers from
/// errors with backoff). Waits for the node's handlers to be known first (a local read at
/// startup). Marks `health` ready once RuntimeClasses, pods and (if watched) events have
/// completed their first list.
pub async fn run(
    client: Client,
    cfg: WatchConfig,
    metrics: Metrics,
    health: Health,
) -> Result<(), WatchError> {
    let mut handlers_rx = cfg.handlers.subscribe();
    let first = handlers_rx
        .wait_for(Option::is_some)
        .await
        .expect("cfg holds the sender")
        .clone()
        .expect("waited for Some");
    let mut counter = FailureCounter::new(cfg.node_name.clone(), first.default.clone(), cfg.classify.clone());
    let mut series = Series {
        registered: BTreeSet::new(),
    };
    series.follow(&first, &mut counter, &metrics);

    // RuntimeClasses first, so the very first pod already resolves to its handler.
    let mut classes = watcher(
        Api::<RuntimeClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    loop {
        match classes.next().await {
            None => return Err(WatchError::RuntimeClassesNeverSynced),
            Some(Err(e)) => tracing::warn!(error = %e, "RuntimeClass watch"),
            Some(Ok(ev)) => {
                let done = matches!(ev, watcher::Event::InitDone);
                apply_class(&mut counter, ev);
                if done {
                    break;
                }
            }
        }
    }

    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&pod_field_selector(&cfg.node_name)),
    )
    .default_backoff()
    .map(|r| r.map(|e| Input::Pod(Box::new(e))))
    .boxed();
    let mut inputs: Vec<BoxStream<'static, Result<Input, watcher::Error>>> = vec![
        classes.map(|r| r.map(|e| Input::Class(Box::new(e)))).boxed(),
        pods,
    ];
    if cfg.watch_events {
        inputs.push(
            watcher(
                Api::<Event>::all(client.clone()),
                watcher::Config::default().fields(&event_field_selector()),
            )
            .default_backoff()
            .map(|r| r.map(|e| Input::Event(Box::new(e))))
            .boxed(),
        );
    } else {
        tracing::info!("event watch off (--watch-events=false): pod sandbox failures are not counted");
    }
    let mut merged = stream::select_all(inputs);
    let mut pods_synced = false;
    let mut events_synced = !cfg.watch_events;
    loop {
        let item = tokio::select! {
            item = merged.next() => item,
            changed = handlers_rx.changed() => {
                if changed.is_ok() {
                    if let Some(set) = handlers_rx.borrow_and_update().clone() {
                        series.follow(&set, &mut counter, &metrics);
                    }
                }
                continue;
            }
        };
        let Some(item) = item else { break };
        let input = match item {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; the watcher retries with backoff");
                continue;
            }
        };
        let now = Instant::now();
        match input {
            Input::Class(ev) => apply_class(&mut counter, *ev),
            Input::Pod(ev) => match *ev {
                watcher::Event::Init => counter.begin_list_pods(),
                watcher::Event::InitDone => {
                    counter.end_list_pods(now);
                    pods_synced = true;
                }
                watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                    let out = counter.apply_pod(&p, now);
                    if let Some(h) = out.started {
                        metrics.inc_pod_start(&h);
                    }
                    record(&metrics, &out.failures, &p.metadata.name, &p.metadata.namespace);
                }
                watcher::Event::Delete(p) => {
                    let released = counter.delete_pod(&p, now);
                    record(&metrics, &released, &p.metadata.name, &p.metadata.namespace);
                }
            },
            Input::Event(ev) => match *ev {
                watcher::Event::Init => counter.begin_list_events(),
                watcher::Event::InitDone => {
                    counter.end_list_events();
                    events_synced = true;
                }
                watcher::Event::InitApply(e) | watcher::Event::Apply(e) => {
                    if let Some(f) = counter.apply_event(&e, now) {
                        record(
                            &metrics,
                            &[f],
                            &e.involved_object.name,
                            &e.involved_object.namespace,
                        );
                    }
                }
                watcher::Event::Delete(e) => counter.delete_event(&e),
            },
        }
        if pods_synced && events_synced {
            health.mark_ready();
        }
    }
    Err(WatchError::StreamsEnded)
}

fn record(metrics: &Metrics, failures: &[Failure], pod: &Option<String>, namespace: &Option<String>) {
    for f in failures {
        tracing::info!(
            handler = %f.handler, reason = %f.reason, delta = f.delta, ?pod, ?namespace,
            "user-namespace pod failure"
        );
        metrics.add_pod_failures(&f.handler, f.reason, f.delta);
    }
}

fn apply_class(counter: &mut FailureCounter, ev: watcher::Event<RuntimeClass>) {
    match ev {
        watcher::Event::Init => counter.begin_list_classes(),
        watcher::Event::InitDone => counter.end_list_classes(),
        watcher::Event::InitApply(rc) | watcher::Event::Apply(rc) => counter.apply_runtime_class(&rc),
        watcher::Event::Delete(rc) => counter.delete_runtime_class(&rc),
    }
}

#[cfg(test)]
mod tests;
