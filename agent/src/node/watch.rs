//! Node-scoped watchers on the node's own pods, on RuntimeClasses and on the kubelet's
//! Warning events that carry sandbox/container creation failures, joined by pod UID into
//! `usernsguard_pod_userns_failures_total` and `usernsguard_pod_userns_starts_total`.
//!
//! The counting is a pure state machine ([`FailureCounter`]) fed by the watch streams, so the
//! exactness rules are unit-tested without a cluster:
//!
//! * Kubernetes aggregates repeats of an event into one object by bumping `count` (core/v1,
//!   the kubelet's recorder) or `series.count` (events.k8s.io recorder); the number of
//!   occurrences is the larger of the two (at least 1). Per event UID we keep the last
//!   occurrence count and add only the increase.
//! * A relist (watch restart, `Init`/`InitApply`/`InitDone`) re-delivers known events with
//!   unchanged counts: that is a delta of 0. Events absent from a relist were deleted while
//!   the watch was down and are forgotten.
//! * On first sight after the agent started, an event created before the agent started is a
//!   baseline (its occurrences were counted by the previous agent process, or happened
//!   before usernsguard ran at all); an event created after the agent started is new in all
//!   its occurrences.
//! * Pod starts are counted once per pod UID when a user-namespace pod first reaches
//!   `Running`; a pod already running when first seen is a baseline unless the kubelet
//!   acknowledged it (`status.startTime`) after the agent started.
//!
//! Why core/v1 Events and not events.k8s.io/v1: the kubelet still records through the
//! core/v1 recorder (`count`, `source.host`), core/v1 documents the field selectors we need
//! (`type`, `reason`, `involvedObject.kind`), and both views are the same stored objects,
//! with `series` visible in core/v1 too. The API server cannot filter events by node
//! (no `source.host` field selector) and field selectors cannot OR values, so there is one
//! watch per failure reason and events whose `source.host` names another node are dropped
//! before any state is kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use usernsguard_runtime::Reason;

use crate::health::Health;
use crate::metrics::Metrics;

/// Maps a failure message to a reason code (`usernsguard_runtime::classify::classify`).
pub type Classifier = Arc<dyn Fn(&str) -> Reason + Send + Sync>;

/// Kubelet event reasons (`pkg/kubelet/events`) under which sandbox and container creation
/// failures are reported: `FailedCreatePodSandBox` (RunPodSandbox failed: the runc mqueue
/// failure lands here), `Failed` (`FailedToCreateContainer`/`FailedToStartContainer`, also
/// image pulls, which the classifier sorts out as `unrelated`) and
/// `FailedCreatePodContainer` (pod cgroup creation).
pub const FAILURE_EVENT_REASONS: [&str; 3] = ["FailedCreatePodSandBox", "Failed", "FailedCreatePodContainer"];

/// containerd's default runtime handler name (`default_runtime_name = "runc"`).
pub const DEFAULT_HANDLER: &str = "runc";

/// How long an event about a pod not (yet) seen on the pod watch is kept waiting for it.
const PENDING_TTL_SECONDS: i64 = 600;

/// New failure occurrences of a user-namespace pod, ready to add to the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub handler: String,
    pub reason: Reason,
    pub delta: u64,
}

/// What a pod update produced: at most one start, plus failures that had waited for the pod.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodOutcome {
    pub started: Option<String>,
    pub failures: Vec<Failure>,
}

#[derive(Debug)]
struct PodInfo {
    userns: bool,
    runtime_class: Option<Box<str>>,
    /// Counted as started, or a baseline that must never be counted.
    started: bool,
}

#[derive(Debug)]
struct EventInfo {
    occurrences: u64,
    /// Index into [`WatchConfig::event_reasons`] of the watch that delivers it: relists sweep
    /// only their own events.
    source: u8,
}

#[derive(Debug)]
struct Pending {
    event_uid: Box<str>,
    reason: Reason,
    delta: u64,
    at: Timestamp,
}

/// The exact-counting state machine. See the module docs for the rules.
pub struct FailureCounter {
    node: String,
    agent_start: Timestamp,
    default_handler: String,
    classify: Classifier,
    pods: HashMap<Box<str>, PodInfo>,
    runtime_classes: HashMap<Box<str>, Box<str>>,
    events: HashMap<Box<str>, EventInfo>,
    /// Failures of pods not seen yet, by pod UID.
    pending: HashMap<Box<str>, Vec<Pending>>,
    relist_pods: Option<HashSet<Box<str>>>,
    relist_classes: Option<HashSet<Box<str>>>,
    relist_events: HashMap<u8, HashSet<Box<str>>>,
}

impl std::fmt::Debug for FailureCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureCounter")
            .field("node", &self.node)
            .field("agent_start", &self.agent_start)
            .field("pods", &self.pods.len())
            .field("events", &self.events.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Occurrences an event stands for: `max(count, series.count, 1)`.
pub fn occurrences(ev: &Event) -> u64 {
    let count = ev.count.unwrap_or(0);
    let series = ev.series.as_ref().and_then(|s| s.count).unwrap_or(0);
    u64::try_from(count.max(series).max(1)).unwrap_or(1)
}

/// When the event was first recorded: the API server's `creationTimestamp`, else the
/// reporter's `firstTimestamp`/`eventTime`.
fn event_created(ev: &Event) -> Option<Timestamp> {
    ev.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| ev.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| ev.event_time.as_ref().map(|t| t.0))
}

impl FailureCounter {
    pub fn new(
        node: impl Into<String>,
        agent_start: Timestamp,
        default_handler: impl Into<String>,
        classify: Classifier,
    ) -> FailureCounter {
        FailureCounter {
            node: node.into(),
            agent_start,
            default_handler: default_handler.into(),
            classify,
            pods: HashMap::new(),
            runtime_classes: HashMap::new(),
            events: HashMap::new(),
            pending: HashMap::new(),
            relist_pods: None,
            relist_classes: None,
            relist_events: HashMap::new(),
        }
    }

    /// Number of events and pods tracked (benchmarks, diagnostics).
    pub fn tracked(&self) -> (usize, usize) {
        (self.events.len(), self.pods.len())
    }

    fn handler_of(&self, pod: &PodInfo) -> String {
        match &pod.runtime_class {
            None => self.default_handler.clone(),
            // A RuntimeClass we do not know (deleted, or not synced): its name is the best
            // bounded stand-in, and conventionally equals its handler.
            Some(class) => self.runtime_classes.get(class).unwrap_or(class).to_string(),
        }
    }

    /// Applies one Warning event from the watch of failure reason `source`
    /// (index into [`WatchConfig::event_reasons`]). Returns the new occurrences to count, if any.
    pub fn apply_from(&mut self, source: u8, ev: &Event, now: Timestamp) -> Option<Failure> {
        if ev.involved_object.kind.as_deref() != Some("Pod") {
            return None;
        }
        if let Some(host) = ev.source.as_ref().and_then(|s| s.host.as_deref()) {
            if !host.is_empty() && host != self.node {
                return None;
            }
        }
        let uid: Box<str> = ev.metadata.uid.as_deref()?.into();
        if let Some(seen) = self.relist_events.get_mut(&source) {
            seen.insert(uid.clone());
        }
        let occ = occurrences(ev);
        let delta = match self.events.get_mut(&uid) {
            Some(info) => {
                let d = occ.saturating_sub(info.occurrences);
                info.occurrences = info.occurrences.max(occ);
                d
            }
            None => {
                let new = event_created(ev).is_some_and(|t| t > self.agent_start);
                self.events.insert(
                    uid.clone(),
                    EventInfo {
                        occurrences: occ,
                        source,
                    },
                );
                if new {
                    occ
                } else {
                    0
                }
            }
        };
        self.prune_pending(now);
        if delta == 0 {
            return None;
        }
        let reason = (self.classify)(ev.message.as_deref().unwrap_or(""));
        if !reason.is_userns() {
            return None;
        }
        let pod_uid = ev.involved_object.uid.as_deref()?;
        match self.pods.get(pod_uid) {
            Some(pod) if pod.userns => Some(Failure {
                handler: self.handler_of(pod),
                reason,
                delta,
            }),
            Some(_) => None,
            None => {
                // The event raced ahead of the pod watch: keep it until the pod shows up.
                self.pending.entry(pod_uid.into()).or_default().push(Pending {
                    event_uid: uid,
                    reason,
                    delta,
                    at: now,
                });
                None
            }
        }
    }

    /// [`FailureCounter::apply_from`] for an event from the first (or only) event watch.
    pub fn apply(&mut self, ev: &Event, now: Timestamp) -> Option<Failure> {
        self.apply_from(0, ev, now)
    }

    /// Forgets a deleted event (and anything parked for it).
    pub fn delete_event(&mut self, ev: &Event) {
        if let Some(uid) = ev.metadata.uid.as_deref() {
            self.events.remove(uid);
            for list in self.pending.values_mut() {
                list.retain(|p| &*p.event_uid != uid);
            }
            self.pending.retain(|_, l| !l.is_empty());
        }
    }

    fn prune_pending(&mut self, now: Timestamp) {
        if self.pending.is_empty() {
            return;
        }
        let cutoff = now.as_second() - PENDING_TTL_SECONDS;
        for list in self.pending.values_mut() {
            list.retain(|p| p.at.as_second() >= cutoff);
        }
        self.pending.retain(|_, l| !l.is_empty());
    }

    /// Applies a pod of this node: counts its first transition to `Running` (user-namespace
    /// pods only) and releases failures that were waiting for it.
    pub fn apply_pod(&mut self, pod: &Pod) -> PodOutcome {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return PodOutcome::default();
        };
        if let Some(seen) = self.relist_pods.as_mut() {
            seen.insert(uid.into());
        }
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let newly_started = match self.pods.get_mut(uid) {
            Some(info) => {
                let first = running && !info.started;
                info.started |= running;
                first
            }
            None => {
                let spec = pod.spec.as_ref();
                let acknowledged_after_us = status
                    .and_then(|s| s.start_time.as_ref())
                    .is_some_and(|t| t.0 > self.agent_start);
                self.pods.insert(
                    uid.into(),
                    PodInfo {
                        userns: spec.and_then(|s| s.host_users) == Some(false),
                        runtime_class: spec.and_then(|s| s.runtime_class_name.as_deref()).map(Into::into),
                        started: running,
                    },
                );
                running && acknowledged_after_us
            }
        };
        let info = &self.pods[uid];
        if !info.userns {
            self.pending.remove(uid);
            return PodOutcome::default();
        }
        let handler = self.handler_of(info);
        let failures = self
            .pending
            .remove(uid)
            .unwrap_or_default()
            .into_iter()
            .map(|p| Failure {
                handler: handler.clone(),
                reason: p.reason,
                delta: p.delta,
            })
            .collect();
        PodOutcome {
            started: newly_started.then_some(handler),
            failures,
        }
    }

    pub fn delete_pod(&mut self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.pods.remove(uid);
            self.pending.remove(uid);
        }
    }

    pub fn apply_runtime_class(&mut self, rc: &RuntimeClass) {
        if let Some(name) = rc.metadata.name.as_deref() {
            if let Some(seen) = self.relist_classes.as_mut() {
                seen.insert(name.into());
            }
            self.runtime_classes
                .insert(name.into(), rc.handler.as_str().into());
        }
    }

    pub fn delete_runtime_class(&mut self, rc: &RuntimeClass) {
        if let Some(name) = rc.metadata.name.as_deref() {
            self.runtime_classes.remove(name);
        }
    }

    /// Handlers known from RuntimeClasses plus the default one.
    pub fn handlers(&self) -> Vec<String> {
        let mut h: Vec<String> = self
            .runtime_classes
            .values()
            .map(|s| s.to_string())
            .chain([self.default_handler.clone()])
            .collect();
        h.sort();
        h.dedup();
        h
    }

    pub fn begin_relist_pods(&mut self) {
        self.relist_pods = Some(HashSet::new());
    }

    /// Drops pods that vanished while the watch was down.
    pub fn end_relist_pods(&mut self) {
        if let Some(seen) = self.relist_pods.take() {
            self.pods.retain(|uid, _| seen.contains(uid));
        }
    }

    pub fn begin_relist_classes(&mut self) {
        self.relist_classes = Some(HashSet::new());
    }

    pub fn end_relist_classes(&mut self) {
        if let Some(seen) = self.relist_classes.take() {
            self.runtime_classes.retain(|n, _| seen.contains(n));
        }
    }

    pub fn begin_relist_events(&mut self, source: u8) {
        self.relist_events.insert(source, HashSet::new());
    }

    /// Forgets events of this watch that were deleted while the watch was down. Events that
    /// were re-listed keep their last count, so the relist itself adds nothing.
    pub fn end_relist_events(&mut self, source: u8) {
        if let Some(seen) = self.relist_events.remove(&source) {
            self.events
                .retain(|uid, e| e.source != source || seen.contains(uid));
        }
    }
}

/// Configuration of the agent's watches.
#[derive(Clone)]
pub struct WatchConfig {
    /// This node's name (`NODE_NAME`).
    pub node_name: String,
    /// Handler of pods without `runtimeClassName` (containerd: `default_runtime_name`).
    pub default_handler: String,
    pub classify: Classifier,
    /// When this agent process started: the baseline boundary.
    pub agent_start: Timestamp,
    /// Event reasons to watch, one watch each; normally [`FAILURE_EVENT_REASONS`]. Every
    /// agent receives these events for the whole cluster (there is no node field selector
    /// for events), so very large clusters may drop the busy `Failed` reason and keep
    /// `FailedCreatePodSandBox`, where the runc mqueue failure lands.
    pub event_reasons: Vec<String>,
}

impl WatchConfig {
    /// The defaults for a node: containerd's default handler, every failure reason.
    pub fn new(node_name: impl Into<String>, classify: Classifier) -> WatchConfig {
        WatchConfig {
            node_name: node_name.into(),
            default_handler: DEFAULT_HANDLER.into(),
            classify,
            agent_start: Timestamp::now(),
            event_reasons: FAILURE_EVENT_REASONS.map(String::from).to_vec(),
        }
    }
}

impl std::fmt::Debug for WatchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchConfig")
            .field("node_name", &self.node_name)
            .field("default_handler", &self.default_handler)
            .field("agent_start", &self.agent_start)
            .field("event_reasons", &self.event_reasons)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the RuntimeClass watch ended before its first sync")]
    RuntimeClassesNeverSynced,
    #[error("no event reason to watch: expected at least one of {FAILURE_EVENT_REASONS:?}")]
    NoEventReasons,
    #[error("the pod and event watch streams ended")]
    StreamsEnded,
}

enum Input {
    Class(Box<watcher::Event<RuntimeClass>>),
    Pod(Box<watcher::Event<Pod>>),
    Event(u8, Box<watcher::Event<Event>>),
}

/// Field selector of this node's pods.
pub fn pod_field_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}

/// Field selector of one failure reason's Warning events about pods.
pub fn event_field_selector(reason: &str) -> String {
    format!("type=Warning,involvedObject.kind=Pod,reason={reason}")
}

/// Runs the watches until they end (they normally do not: the watcher recovers from
/// errors with backoff). Marks `health` ready once RuntimeClasses, pods and every event
/// watch have completed their first list.
pub async fn run(
    client: Client,
    cfg: WatchConfig,
    metrics: Metrics,
    health: Health,
) -> Result<(), WatchError> {
    if cfg.event_reasons.is_empty() {
        return Err(WatchError::NoEventReasons);
    }
    let mut counter = FailureCounter::new(
        cfg.node_name.clone(),
        cfg.agent_start,
        cfg.default_handler.clone(),
        cfg.classify.clone(),
    );
    metrics.register_handler(&cfg.default_handler);

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
    for h in counter.handlers() {
        metrics.register_handler(&h);
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
    for (i, reason) in cfg.event_reasons.iter().take(usize::from(u8::MAX)).enumerate() {
        let source = i as u8;
        inputs.push(
            watcher(
                Api::<Event>::all(client.clone()),
                watcher::Config::default().fields(&event_field_selector(reason)),
            )
            .default_backoff()
            .map(move |r| r.map(|e| Input::Event(source, Box::new(e))))
            .boxed(),
        );
    }
    let mut merged = stream::select_all(inputs);
    let mut pods_synced = false;
    let mut events_synced = HashSet::new();
    while let Some(item) = merged.next().await {
        let input = match item {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; the watcher retries with backoff");
                continue;
            }
        };
        let now = Timestamp::now();
        match input {
            Input::Class(ev) => {
                apply_class(&mut counter, *ev);
                for h in counter.handlers() {
                    metrics.register_handler(&h);
                }
            }
            Input::Pod(ev) => match *ev {
                watcher::Event::Init => counter.begin_relist_pods(),
                watcher::Event::InitDone => {
                    counter.end_relist_pods();
                    pods_synced = true;
                }
                watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                    let out = counter.apply_pod(&p);
                    if let Some(h) = out.started {
                        metrics.inc_pod_start(&h);
                    }
                    for f in out.failures {
                        metrics.add_pod_failures(&f.handler, f.reason, f.delta);
                    }
                }
                watcher::Event::Delete(p) => counter.delete_pod(&p),
            },
            Input::Event(source, ev) => match *ev {
                watcher::Event::Init => counter.begin_relist_events(source),
                watcher::Event::InitDone => {
                    counter.end_relist_events(source);
                    events_synced.insert(source);
                }
                watcher::Event::InitApply(e) | watcher::Event::Apply(e) => {
                    if let Some(f) = counter.apply_from(source, &e, now) {
                        tracing::info!(
                            handler = %f.handler, reason = %f.reason, delta = f.delta,
                            pod = ?e.involved_object.name, namespace = ?e.involved_object.namespace,
                            "user-namespace pod failure"
                        );
                        metrics.add_pod_failures(&f.handler, f.reason, f.delta);
                    }
                }
                watcher::Event::Delete(e) => counter.delete_event(&e),
            },
        }
        if pods_synced && events_synced.len() == cfg.event_reasons.len() {
            health.mark_ready();
        }
    }
    Err(WatchError::StreamsEnded)
}

fn apply_class(counter: &mut FailureCounter, ev: watcher::Event<RuntimeClass>) {
    match ev {
        watcher::Event::Init => counter.begin_relist_classes(),
        watcher::Event::InitDone => counter.end_relist_classes(),
        watcher::Event::InitApply(rc) | watcher::Event::Apply(rc) => counter.apply_runtime_class(&rc),
        watcher::Event::Delete(rc) => counter.delete_runtime_class(&rc),
    }
}

#[cfg(test)]
mod tests;
