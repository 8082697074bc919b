//! The per-node reconciler (`usernsguard agent`). It watches the SelfTests and its own Node,
//! runs the self-test engine for the SelfTests that select the node (on a new generation
//! and every `interval`), and publishes the results: its own NodeReport (server-side apply),
//! the `usernsguard.io/userns.<handler>` labels of its own Node, and a Warning Event when a
//! handler starts failing.
//!
//! The API traffic is what makes an agent cheap at 5,000 nodes, so it is bounded on purpose:
//! two watches (SelfTests, and the metadata of this one Node), no periodic list or get, and a
//! write only when what would be written differs from what was last written. Timing fields
//! (`startedAt`, durations, `lastRunTime`) do not count as a difference: a re-run that finds
//! the same thing writes nothing (its freshness is the `usernsguard_selftest_last_run_*`
//! metric, not the API object).
//!
//! When the API server is unreachable the agent keeps its results in memory and retries with
//! backoff; nothing is re-run to re-publish, and nothing is lost.
//!
//! A deleted NodeReport (by hand, or by the garbage collector when the Node object was
//! re-registered with a new UID) is recreated at once: a third watch, on the metadata of this
//! one NodeReport, says when it is gone, and a status write answered `404 Not Found` re-applies
//! the object (spec, owner) and then the status in the same sync.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use usernsguard_runtime::report::{HandlerReport, SelfTestReport, Verdict};

use super::error::bounded;
pub use super::error::AgentError;
use super::installs::Installs;
use super::runner::{RunRequest, SelfTestRunner};
use crate::crd::names::{self, AGENT_FIELD_MANAGER, USERNS_LABEL_PREFIX};
use crate::crd::{
    parse_go_duration, CriRuntime, CriRuntimeInfo, NodeReport, NodeReportStatus, RuntimeHandlerInfo,
    RuntimeProfile, SelfTest, SelfTestProblem, SelfTestResult,
};
use crate::metrics::Metrics;

/// Static settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// Upper bound of one API write; a hung connection must not stall the loop.
    pub write_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl AgentConfig {
    pub fn new(node_name: &str) -> Self {
        AgentConfig {
            node_name: node_name.to_owned(),
            write_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// The latest run of one SelfTest on this node.
#[derive(Debug, Clone)]
struct Run {
    generation: i64,
    finished: Instant,
    report: SelfTestReport,
}

/// The agent's reconciler and its in-memory state.
pub struct Agent {
    client: Client,
    cfg: AgentConfig,
    runner: Arc<dyn SelfTestRunner>,
    recorder: Recorder,
    runs: BTreeMap<String, Run>,
    /// Normalized status of the last successful NodeReport write.
    published: Option<Value>,
    /// The owner (Node UID) with which this process last applied the NodeReport object
    /// (spec, owner); None: to be applied (first sync, or the report was deleted).
    report_owner: Option<String>,
    /// (SelfTest, handler) pairs whose failure has been announced by an Event.
    announced: BTreeSet<(String, String)>,
    /// Where each run's results go as `usernsguard_selftest_*` series.
    metrics: Option<Metrics>,
    /// The RuntimeProfile installs on this node (None: the agent installs nothing).
    installs: Option<Installs>,
    /// Handlers installed since the last self-test sync: the SelfTests covering them run again.
    rerun: BTreeSet<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node_name)
            .finish()
    }
}

impl Agent {
    pub fn new(client: Client, cfg: AgentConfig, runner: Arc<dyn SelfTestRunner>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: AGENT_FIELD_MANAGER.into(),
                instance: Some(cfg.node_name.clone()),
            },
        );
        Agent {
            client,
            cfg,
            runner,
            recorder,
            runs: BTreeMap::new(),
            published: None,
            report_owner: None,
            announced: BTreeSet::new(),
            metrics: None,
            installs: None,
            rerun: BTreeSet::new(),
        }
    }

    /// The API client the reconciler writes with (the failure watches share it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Also publish every run's results as metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also install the RuntimeProfiles that select this node ([`Installs`]).
    pub fn with_installs(mut self, installs: Installs) -> Self {
        self.installs = Some(installs);
        self
    }

    /// Whether this agent installs RuntimeProfiles (and so watches them).
    pub fn installs_runtimes(&self) -> bool {
        self.installs.is_some()
    }

    /// One reconcile of the RuntimeProfiles against this node: installs and uninstalls, the
    /// `usernsguard.io/runtime.*` labels; their NodeReport entries go out with the next
    /// [`Agent::sync`], which also re-runs the self-tests of every handler installed here.
    /// Returns how long until an install attempt is due.
    pub async fn sync_installs(
        &mut self,
        profiles: &[Arc<RuntimeProfile>],
        node: &PartialObjectMeta<Node>,
    ) -> Result<Option<Duration>, AgentError> {
        let Some(installs) = self.installs.as_mut() else {
            return Ok(None);
        };
        let done = installs.sync(profiles, node).await?;
        self.rerun.extend(done.installed);
        Ok(done.due)
    }

    /// One reconcile of the whole node: run what is due, then publish what changed.
    /// Returns how long until the next run is due (None: nothing scheduled).
    pub async fn sync(
        &mut self,
        selftests: &[Arc<SelfTest>],
        node: &PartialObjectMeta<Node>,
    ) -> Result<Option<Duration>, AgentError> {
        let selected: Vec<&SelfTest> = selftests
            .iter()
            .map(|s| s.as_ref())
            .filter(|s| s.meta().deletion_timestamp.is_none() && s.spec.selects(node.labels()))
            .collect();
        // Results of SelfTests that are gone or no longer select the node are dropped: their
        // labels and NodeReport entries disappear with the next publish.
        let names: BTreeSet<String> = selected.iter().map(|s| s.name_any()).collect();
        self.runs.retain(|name, _| names.contains(name));
        self.announced.retain(|(st, _)| names.contains(st));

        let rerun = std::mem::take(&mut self.rerun);
        for st in &selected {
            let covers_new_handler = rerun.iter().any(|h| st.spec.covers(h));
            if covers_new_handler || self.due_in(st).is_some_and(|d| d.is_zero()) {
                let report = self.run(st).await?;
                if let Some(m) = &self.metrics {
                    m.observe_selftest(&report);
                }
                self.runs.insert(
                    st.name_any(),
                    Run {
                        generation: st.meta().generation.unwrap_or(0),
                        finished: Instant::now(),
                        report,
                    },
                );
            }
        }

        self.publish_labels(&selected, node).await?;
        self.publish_report(&selected, node).await?;
        self.publish_events(&selected, node).await?;
        Ok(selected.iter().filter_map(|s| self.due_in(s)).min())
    }

    /// Zero when a run is due now; the remaining time when an interval is set; None when the
    /// current generation already ran and there is no interval.
    fn due_in(&self, st: &SelfTest) -> Option<Duration> {
        let Some(run) = self.runs.get(&st.name_any()) else {
            return Some(Duration::ZERO);
        };
        if run.generation != st.meta().generation.unwrap_or(0) {
            return Some(Duration::ZERO);
        }
        let interval = st.spec.interval.as_deref().and_then(parse_go_duration)?;
        Some((run.finished + interval).saturating_duration_since(Instant::now()))
    }

    async fn run(&self, st: &SelfTest) -> Result<SelfTestReport, AgentError> {
        let req = RunRequest {
            handlers: st.spec.runtime_handlers.clone(),
            checks: st.spec.checks.clone(),
            timeout: Duration::from_secs(st.spec.probe_timeout_seconds.max(1) as u64),
        };
        let runner = self.runner.clone();
        tracing::info!(selftest = %st.name_any(), ?req, "running self-test");
        tokio::task::spawn_blocking(move || runner.run(&req))
            .await
            .map_err(|e| AgentError::Runner(e.to_string()))
    }

    /// Verdict labels wanted on the node: per handler, over every SelfTest that selects the
    /// node and publishes labels, the worst verdict (fail > unknown > pass).
    fn desired_labels(&self, selected: &[&SelfTest]) -> BTreeMap<String, String> {
        let mut worst: BTreeMap<String, Verdict> = BTreeMap::new();
        // A SelfTest running only some checks is no verdict: it never sets labels.
        for st in selected.iter().filter(|s| s.spec.decides_labels()) {
            let Some(run) = self.runs.get(&st.name_any()) else {
                continue;
            };
            for h in &run.report.handlers {
                let e = worst.entry(h.handler.clone()).or_insert(Verdict::Pass);
                *e = worse(*e, h.verdict);
            }
        }
        worst
            .into_iter()
            .map(|(h, v)| (names::userns_label(&h), v.as_str().to_owned()))
            .collect()
    }

    /// JSON merge patch of the node's labels: set the wanted ones, null the stale ones. A
    /// merge patch (not apply) so labels set by an older agent or by hand are removed too.
    async fn publish_labels(
        &self,
        selected: &[&SelfTest],
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let desired = self.desired_labels(selected);
        let Some(patch) = super::labels::merge_patch(node.labels(), USERNS_LABEL_PREFIX, &desired) else {
            return Ok(());
        };
        let api: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(AGENT_FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        self.bounded(
            "node labels",
            api.patch_metadata(&self.cfg.node_name, &pp, &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    fn desired_status(&self, selected: &[&SelfTest]) -> NodeReportStatus {
        let mut results = Vec::new();
        let mut runtimes: BTreeMap<String, RuntimeHandlerInfo> = BTreeMap::new();
        let mut worst: BTreeMap<String, Verdict> = BTreeMap::new();
        let mut last: Option<(Timestamp, &SelfTestReport)> = None;
        let mut problems = Vec::new();
        for st in selected {
            let Some(run) = self.runs.get(&st.name_any()) else {
                continue;
            };
            if let Some(message) = &run.report.problem {
                problems.push(SelfTestProblem {
                    self_test: st.name_any(),
                    message: message.clone(),
                });
            }
            let started = run
                .report
                .started_at
                .parse::<Timestamp>()
                .unwrap_or(Timestamp::UNIX_EPOCH);
            if last.is_none_or(|(t, _)| started > t) {
                last = Some((started, &run.report));
            }
            for h in &run.report.handlers {
                results.push(SelfTestResult {
                    self_test: st.name_any(),
                    generation: run.generation,
                    started_at: Time(started),
                    report: h.clone(),
                });
                runtimes
                    .entry(h.handler.clone())
                    .or_insert_with(|| runtime_info(h));
                let e = worst.entry(h.handler.clone()).or_insert(Verdict::Pass);
                *e = worse(*e, h.verdict);
            }
        }
        results.sort_by(|a, b| (&a.self_test, &a.report.handler).cmp(&(&b.self_test, &b.report.handler)));
        let summary = (!worst.is_empty()).then(|| {
            worst
                .iter()
                .map(|(h, v)| format!("{h}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        });
        let cri = last.and_then(|(_, r)| r.cri.as_ref()).map(|c| CriRuntimeInfo {
            name: if c.runtime == "cri-o" {
                CriRuntime::Crio
            } else {
                CriRuntime::Containerd
            },
            version: c.version.clone(),
            config_path: c.config.clone(),
        });
        NodeReportStatus {
            node: last.map(|(_, r)| r.node.clone()),
            cri,
            runtimes: runtimes.into_values().collect(),
            results,
            problems,
            summary,
            last_run_time: last.map(|(t, _)| Time(t)),
            installs: self
                .installs
                .as_ref()
                .and_then(Installs::statuses)
                .unwrap_or_default(),
        }
    }

    /// Server-side apply of the NodeReport: the object (spec, owner = the Node) once per
    /// process and owner, the status whenever its content changed. A status write answered
    /// 404 (the report was deleted) re-applies the object, then the status.
    async fn publish_report(
        &mut self,
        selected: &[&SelfTest],
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        if self.installs.as_ref().is_some_and(|i| i.statuses().is_none()) {
            // The installs on record are not read back yet (the read failed): a report
            // without them would erase them. The next sync reads them and publishes.
            return Ok(());
        }
        let status = self.desired_status(selected);
        let normalized = normalize(&status);
        let owner = node.uid().unwrap_or_default();
        if self.published.as_ref() == Some(&normalized) && self.report_owner.as_ref() == Some(&owner) {
            return Ok(());
        }
        if self.report_owner.as_ref() != Some(&owner) {
            self.apply_report_object(&owner).await?;
        }
        let body = json!({
            "apiVersion": names::API_VERSION, "kind": "NodeReport",
            "metadata": {"name": self.cfg.node_name},
            "status": status,
        });
        match self.apply_report_status(&body).await {
            Err(AgentError::Kube(kube::Error::Api(e))) if e.code == 404 => {
                tracing::warn!(node = %self.cfg.node_name, "NodeReport not found: recreating it");
                self.report_owner = None;
                self.apply_report_object(&owner).await?;
                self.apply_report_status(&body).await?;
            }
            other => other?,
        }
        self.published = Some(normalized);
        Ok(())
    }

    async fn apply_report_object(&mut self, owner_uid: &str) -> Result<(), AgentError> {
        let api: Api<NodeReport> = Api::all(self.client.clone());
        let pp = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        let name = self.cfg.node_name.clone();
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.clone(),
            uid: owner_uid.to_owned(),
            ..OwnerReference::default()
        };
        let obj = json!({
            "apiVersion": names::API_VERSION, "kind": "NodeReport",
            "metadata": {"name": name, "ownerReferences": [owner]},
            "spec": {"nodeName": name},
        });
        self.bounded("NodeReport apply", api.patch(&name, &pp, &Patch::Apply(&obj)))
            .await?;
        self.report_owner = Some(owner_uid.to_owned());
        Ok(())
    }

    async fn apply_report_status(&self, body: &Value) -> Result<(), AgentError> {
        let api: Api<NodeReport> = Api::all(self.client.clone());
        let pp = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        self.bounded(
            "NodeReport status apply",
            api.patch_status(&self.cfg.node_name, &pp, &Patch::Apply(body)),
        )
        .await?;
        Ok(())
    }

    /// The NodeReport was deleted: the next sync writes the object and the whole status again.
    pub fn report_deleted(&mut self) {
        self.report_owner = None;
        self.published = None;
    }

    /// One Warning Event on the Node per (SelfTest, handler) that turned `fail`; announced
    /// again only after it passed (or went unknown) in between.
    async fn publish_events(
        &mut self,
        selected: &[&SelfTest],
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let mut failing = BTreeSet::new();
        for st in selected {
            let Some(run) = self.runs.get(&st.name_any()) else {
                continue;
            };
            for h in run.report.handlers.iter().filter(|h| h.verdict == Verdict::Fail) {
                failing.insert((st.name_any(), h.handler.clone()));
                if self.announced.contains(&(st.name_any(), h.handler.clone())) {
                    continue;
                }
                let ev = Event {
                    type_: EventType::Warning,
                    reason: names::EVENT_SELFTEST_FAILED.into(),
                    note: Some(failure_note(&st.name_any(), h)),
                    action: "SelfTest".into(),
                    secondary: None,
                };
                let mut reference = node.object_ref(&());
                reference.api_version = Some("v1".into());
                reference.kind = Some("Node".into());
                self.bounded("Event", self.recorder.publish(&ev, &reference))
                    .await?;
                self.announced.insert((st.name_any(), h.handler.clone()));
            }
        }
        self.announced.retain(|k| failing.contains(k));
        Ok(())
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, AgentError> {
        bounded(self.cfg.write_timeout, what, fut).await
    }
}

fn runtime_info(h: &HandlerReport) -> RuntimeHandlerInfo {
    RuntimeHandlerInfo {
        handler: h.handler.clone(),
        binary: h.binary.clone(),
        runtime: h.runtime.clone(),
        version: h.version.clone(),
        features: h.features.clone(),
    }
}

/// `handler runc (SelfTest default) failed: userns-joined: mqueue_owner_unmapped: <message>.
/// Fix: <remediation>`, within the 1 kB an Event note may have.
fn failure_note(selftest: &str, h: &HandlerReport) -> String {
    let mut note = format!("runtime handler {} failed SelfTest {selftest}:", h.handler);
    for c in h
        .checks
        .iter()
        .filter(|c| c.result == usernsguard_runtime::CheckOutcome::Fail)
    {
        let reason = c.reason.map(|r| r.as_str()).unwrap_or("unknown");
        note.push_str(&format!(" {}: {reason}: {}.", c.check, c.message));
        if let Some(fix) = &c.remediation {
            note.push_str(&format!(" Fix: {fix}."));
        }
    }
    if note.len() > 1000 {
        let mut cut = 997;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

fn worse(a: Verdict, b: Verdict) -> Verdict {
    let rank = |v| match v {
        Verdict::Pass => 0,
        Verdict::Unknown => 1,
        Verdict::Fail => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// The status without its timing fields: what decides whether a write is needed.
fn normalize(status: &NodeReportStatus) -> Value {
    let mut v = serde_json::to_value(status).expect("status serializes");
    if let Some(o) = v.as_object_mut() {
        o.remove("lastRunTime");
    }
    if let Some(results) = v.get_mut("results").and_then(Value::as_array_mut) {
        for r in results {
            if let Some(o) = r.as_object_mut() {
                o.remove("startedAt");
            }
            if let Some(checks) = r.get_mut("checks").and_then(Value::as_array_mut) {
                for c in checks.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("durationSeconds");
                }
            }
        }
    }
    v
}

/// The agent's main loop: watches, syncs on every change and when a run or an install
/// attempt is due, retries failed syncs with exponential backoff. Flips `ready` to true after
/// the first successful sync (and never back: the results stay valid while the API server is
/// away). Never returns.
///
/// Installs and self-tests share the loop on purpose: a probe must not run while the CRI
/// runtime restarts for an install, and a handler just installed is probed right after.
pub async fn run(mut agent: Agent, ready: watch::Sender<bool>) {
    let client = agent.client.clone();
    let node_name = agent.cfg.node_name.clone();
    let (st_store, st_writer) = reflector::store::<SelfTest>();
    let (node_store, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let (rtp_store, rtp_writer) = reflector::store::<RuntimeProfile>();
    let st_events = watcher(Api::<SelfTest>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(st_writer)
        .map(|_| false)
        .boxed();
    let node_events = watcher(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .reflect(node_writer)
    .map(|_| false)
    .boxed();
    let mut presence = ReportPresence::default();
    let report_events = watcher(
        Api::<PartialObjectMeta<NodeReport>>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .map(move |ev| ev.is_ok_and(|ev| presence.gone_after(&ev)))
    .boxed();
    let installs = agent.installs_runtimes();
    let rtp_events = if installs {
        watcher(Api::<RuntimeProfile>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(rtp_writer)
            .map(|_| false)
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let mut changes = futures::stream::select_all([st_events, node_events, report_events, rtp_events]);

    let mut next: Option<Instant> = None;
    let mut backoff = agent.cfg.backoff_min;
    loop {
        let deadline = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600));
        tokio::select! {
            c = changes.next() => match c {
                None => return,
                Some(true) => {
                    tracing::warn!(node = %node_name, "own NodeReport deleted: recreating it");
                    agent.report_deleted();
                }
                Some(false) => {}
            },
            _ = tokio::time::sleep_until(deadline) => {}
        }
        if !(is_ready(&st_store) && is_ready(&node_store) && (!installs || is_ready(&rtp_store))) {
            continue;
        }
        let Some(node) = node_store.get(&reflector::ObjectRef::new(&node_name)) else {
            tracing::warn!(node = %node_name, "own Node not found; is NODE_NAME right?");
            continue;
        };
        let installed = agent.sync_installs(&rtp_store.state(), &node).await;
        let tested = agent.sync(&st_store.state(), &node).await;
        match installed.and_then(|a| tested.map(|b| [a, b].into_iter().flatten().min())) {
            Ok(due) => {
                backoff = agent.cfg.backoff_min;
                next = due.map(|d| Instant::now() + d);
                ready.send_replace(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = e.metric_label(), retry_in = ?backoff, "agent sync failed");
                next = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(agent.cfg.backoff_max);
            }
        }
    }
}

/// Whether this agent's NodeReport exists, from its metadata watch: says when it went away
/// (deleted on the watch, or missing from a re-list after having been there).
#[derive(Debug, Default)]
struct ReportPresence {
    present: bool,
    listed: bool,
}

impl ReportPresence {
    fn gone_after(&mut self, ev: &watcher::Event<PartialObjectMeta<NodeReport>>) -> bool {
        match ev {
            watcher::Event::Init => {
                self.listed = false;
                false
            }
            watcher::Event::InitApply(_) => {
                self.listed = true;
                false
            }
            watcher::Event::InitDone => {
                let gone = self.present && !self.listed;
                self.present = self.listed;
                gone
            }
            watcher::Event::Apply(_) => {
                self.present = true;
                false
            }
            watcher::Event::Delete(_) => {
                self.present = false;
                true
            }
        }
    }
}

/// Whether a reflector store has seen its first complete list (non-blocking).
pub fn is_ready<K>(store: &reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::FutureExt;
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

#[cfg(test)]
mod tests;
