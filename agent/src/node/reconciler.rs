//! `usernsguard agent`: the per-node reconciler. It watches the SelfTests and its own Node,
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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
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
use usernsguard_runtime::report::{Check, HandlerReport, SelfTestReport, Verdict};

use usernsguard_agent::health::Health;
use usernsguard_agent::metrics::Metrics;
use usernsguard_agent::server;
use usernsguard_agent::watch::WatchConfig;

use crate::crd::{NodeReport, NodeReportStatus, RuntimeHandlerInfo, SelfTest, SelfTestResult};
use crate::engine::EngineRunner;

/// Field manager of every agent write.
pub const FIELD_MANAGER: &str = "usernsguard-agent";
/// Prefix of the verdict labels the agent owns on its node.
pub const USERNS_LABEL_PREFIX: &str = "usernsguard.io/userns.";

/// What one self-test run is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    /// Runtime handlers to probe; empty: every handler the node's CRI runtime registers.
    pub handlers: Vec<String>,
    /// Checks to run; empty: all of them.
    pub checks: Vec<Check>,
    /// Per-probe time limit.
    pub timeout: Duration,
}

/// The self-test engine as the agent sees it. Implementations block (they run probe
/// containers); the agent calls them through `spawn_blocking`.
pub trait SelfTestRunner: Send + Sync + 'static {
    fn run(&self, req: &RunRequest) -> SelfTestReport;
}

/// Why one sync did not finish; the loop retries with backoff and keeps its results.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("API request timed out after {0:?}: {1}")]
    Timeout(Duration, &'static str),
    #[error("self-test runner panicked: {0}")]
    Runner(String),
}

impl AgentError {
    /// Bounded label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Kube(_) => "kube",
            AgentError::Timeout(..) => "timeout",
            AgentError::Runner(_) => "runner",
        }
    }
}

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
    /// Whether this process already applied the NodeReport object (spec, owner).
    report_applied: bool,
    /// (SelfTest, handler) pairs whose failure has been announced by an Event.
    announced: BTreeSet<(String, String)>,
    /// Where each run's results go as `usernsguard_selftest_*` series.
    metrics: Option<Metrics>,
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
                controller: FIELD_MANAGER.into(),
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
            report_applied: false,
            announced: BTreeSet::new(),
            metrics: None,
        }
    }

    /// Also publish every run's results as metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
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
            .filter(|s| s.meta().deletion_timestamp.is_none() && selects(s, node))
            .collect();
        // Results of SelfTests that are gone or no longer select the node are dropped: their
        // labels and NodeReport entries disappear with the next publish.
        let names: BTreeSet<String> = selected.iter().map(|s| s.name_any()).collect();
        self.runs.retain(|name, _| names.contains(name));
        self.announced.retain(|(st, _)| names.contains(st));

        for st in &selected {
            if self.due_in(st).is_some_and(|d| d.is_zero()) {
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
        for st in selected.iter().filter(|s| s.spec.publish_node_labels) {
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
            .map(|(h, v)| (format!("{USERNS_LABEL_PREFIX}{h}"), v.as_str().to_owned()))
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
        let current: BTreeMap<String, String> = node
            .labels()
            .iter()
            .filter(|(k, _)| k.starts_with(USERNS_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if desired == current {
            return Ok(());
        }
        let mut labels = serde_json::Map::new();
        for k in current.keys().filter(|k| !desired.contains_key(*k)) {
            labels.insert(k.clone(), Value::Null);
        }
        for (k, v) in &desired {
            if current.get(k) != Some(v) {
                labels.insert(k.clone(), Value::String(v.clone()));
            }
        }
        let patch = json!({"metadata": {"labels": labels}});
        let api: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
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
        for st in selected {
            let Some(run) = self.runs.get(&st.name_any()) else {
                continue;
            };
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
        NodeReportStatus {
            node: last.map(|(_, r)| r.node.clone()),
            runtimes: runtimes.into_values().collect(),
            results,
            summary,
            last_run_time: last.map(|(t, _)| Time(t)),
            ..NodeReportStatus::default()
        }
    }

    /// Server-side apply of the NodeReport: the object (spec, owner = the Node) once per
    /// process, the status whenever its content changed.
    async fn publish_report(
        &mut self,
        selected: &[&SelfTest],
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let status = self.desired_status(selected);
        let normalized = normalize(&status);
        if self.published.as_ref() == Some(&normalized) {
            return Ok(());
        }
        let api: Api<NodeReport> = Api::all(self.client.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let name = self.cfg.node_name.clone();
        if !self.report_applied {
            let owner = OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.clone(),
                uid: node.uid().unwrap_or_default(),
                ..OwnerReference::default()
            };
            let obj = json!({
                "apiVersion": "usernsguard.io/v1alpha1", "kind": "NodeReport",
                "metadata": {"name": name, "ownerReferences": [owner]},
                "spec": {"nodeName": name},
            });
            self.bounded("NodeReport apply", api.patch(&name, &pp, &Patch::Apply(&obj)))
                .await?;
            self.report_applied = true;
        }
        let body = json!({
            "apiVersion": "usernsguard.io/v1alpha1", "kind": "NodeReport",
            "metadata": {"name": name},
            "status": status,
        });
        self.bounded(
            "NodeReport status apply",
            api.patch_status(&name, &pp, &Patch::Apply(&body)),
        )
        .await?;
        self.published = Some(normalized);
        Ok(())
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
                    reason: "UsernsSelfTestFailed".into(),
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
        match tokio::time::timeout(self.cfg.write_timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(AgentError::Timeout(self.cfg.write_timeout, what)),
        }
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

/// A SelfTest selects the node when every `nodeSelector` label matches.
pub fn selects(st: &SelfTest, node: &PartialObjectMeta<Node>) -> bool {
    let labels = node.labels();
    st.spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
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

/// Go `time.ParseDuration` for the subset the CRD allows: `([0-9]+(s|m|h))+`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    for ch in s.chars() {
        match ch {
            '0'..='9' => num.push(ch),
            's' | 'm' | 'h' => {
                let n: u64 = num.parse().ok()?;
                num.clear();
                total = total.checked_add(n.checked_mul(match ch {
                    's' => 1,
                    'm' => 60,
                    _ => 3600,
                })?)?;
            }
            _ => return None,
        }
    }
    (num.is_empty() && !s.is_empty()).then(|| Duration::from_secs(total))
}

/// The agent's main loop: watches, syncs on every change and when a run is due, retries
/// failed syncs with exponential backoff. Flips `ready` to true after the first successful
/// sync (and never back: the results stay valid while the API server is away). Never returns.
pub async fn run(mut agent: Agent, ready: watch::Sender<bool>) {
    let client = agent.client.clone();
    let node_name = agent.cfg.node_name.clone();
    let (st_store, st_writer) = reflector::store::<SelfTest>();
    let (node_store, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let st_events = watcher(Api::<SelfTest>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(st_writer)
        .map(|_| ());
    let node_events = watcher(
        Api::<PartialObjectMeta<Node>>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .reflect(node_writer)
    .map(|_| ());
    let mut changes = std::pin::pin!(futures::stream::select(st_events, node_events));

    let mut next: Option<Instant> = None;
    let mut backoff = agent.cfg.backoff_min;
    loop {
        let deadline = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600));
        tokio::select! {
            c = changes.next() => if c.is_none() { return },
            _ = tokio::time::sleep_until(deadline) => {}
        }
        if !(is_ready(&st_store) && is_ready(&node_store)) {
            continue;
        }
        let Some(node) = node_store.get(&reflector::ObjectRef::new(&node_name)) else {
            tracing::warn!(node = %node_name, "own Node not found; is NODE_NAME right?");
            continue;
        };
        let selftests = st_store.state();
        match agent.sync(&selftests, &node).await {
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

/// `usernsguard agent` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = server::DEFAULT_ADDR)]
    pub listen: std::net::SocketAddr,
    /// Directory for probe bundles and runtime state (a local filesystem; emptied after each run).
    #[arg(long, default_value = "/run/usernsguard", value_name = "DIR")]
    pub work_dir: std::path::PathBuf,
    /// The host's /etc, where the containerd or CRI-O configuration naming the runtime handlers is read.
    #[arg(long, default_value = "/etc", value_name = "DIR")]
    pub host_etc: std::path::PathBuf,
}

/// `usernsguard agent`: in-cluster config or KUBECONFIG, then [`run_all`] and the HTTP
/// endpoint until SIGTERM.
pub async fn main(args: AgentArgs) -> anyhow::Result<()> {
    crate::init_tracing();
    let metrics = Metrics::new(&args.node_name)?;
    let listener = server::bind(args.listen).await?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration: expected the in-cluster service account or KUBECONFIG")?;
    let (ready, ready_rx) = watch::channel(false);
    let agent = Agent::new(
        client,
        AgentConfig::new(&args.node_name),
        Arc::new(EngineRunner::new(args.work_dir.clone(), args.host_etc.clone())?),
    )
    .with_metrics(metrics.clone());
    let watches = WatchConfig::new(&args.node_name, Arc::new(usernsguard_runtime::classify::classify));
    tracing::info!(node = %args.node_name, listen = %args.listen, "agent starting");
    let work = run_all(agent, watches, metrics.clone(), ready);
    serve_while(listener, metrics, ready_rx, work, server::shutdown_signal()).await
}

/// The whole agent minus HTTP: the SelfTest reconciler ([`run`]) and the pod/event failure
/// watches (`watch::run`). `ready` latches once both completed their first sync. Returns
/// only if the failure watches give up (the caller exits and the kubelet restarts the pod).
pub async fn run_all(agent: Agent, watches: WatchConfig, metrics: Metrics, ready: watch::Sender<bool>) {
    let client = agent.client.clone();
    let watch_health = Health::new();
    let (reconciler_ready, mut reconciler_ready_rx) = watch::channel(false);
    let latch = {
        let watch_health = watch_health.clone();
        async move {
            let _ = reconciler_ready_rx.wait_for(|r| *r).await;
            // `Health` has no notification; its latch flips once, so polling ends quickly.
            while !watch_health.is_ready() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ready.send_replace(true);
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = run(agent, reconciler_ready) => {}
        r = usernsguard_agent::watch::run(client, watches, metrics, watch_health) => {
            tracing::error!(result = ?r, "pod/event failure watches ended");
        }
        () = latch => {}
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` while `work` runs, until `shutdown`. `/healthz`
/// answers as long as the process does; `/readyz` follows `ready` (a latch: set once).
pub async fn serve_while(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    mut ready: watch::Receiver<bool>,
    work: impl std::future::Future<Output = ()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let health = Health::new();
    let latch = health.clone();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            latch.mark_ready();
        }
    });
    let served = server::serve(listener, metrics, health, shutdown);
    tokio::select! {
        r = served => r?,
        () = work => anyhow::bail!("main loop ended"),
    }
    Ok(())
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
mod tests {
    use super::*;
    use crate::api_fixtures::{mock_client, node_meta, ApiServerVerifier, FakeRunner, Seen};
    use http::{Method, StatusCode};

    const LABELS: &str = "/api/v1/nodes/n1?&fieldManager=usernsguard-agent";
    const REPORT: &str =
        "/apis/usernsguard.io/v1alpha1/nodereports/n1?&force=true&fieldManager=usernsguard-agent";
    const STATUS: &str =
        "/apis/usernsguard.io/v1alpha1/nodereports/n1/status?&force=true&fieldManager=usernsguard-agent";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events?";
    const MERGE: Option<&str> = Some("application/merge-patch+json");
    const APPLY: Option<&str> = Some("application/apply-patch+yaml");

    fn agent(runner: Arc<FakeRunner>) -> (Agent, ApiServerVerifier) {
        let (client, server) = mock_client();
        let mut cfg = AgentConfig::new("n1");
        cfg.write_timeout = Duration::from_secs(5);
        (Agent::new(client, cfg, runner), server)
    }

    fn sts(list: &[SelfTest]) -> Vec<Arc<SelfTest>> {
        list.iter().cloned().map(Arc::new).collect()
    }

    /// The scenario of a first publish: labels, NodeReport object, NodeReport status.
    /// Returns the status body for further assertions.
    async fn expect_first_publish(server: &mut ApiServerVerifier, labels: Value) -> Value {
        let seen = server.next().await;
        seen.expect(Method::PATCH, LABELS, MERGE);
        assert_eq!(seen.body, json!({"metadata": {"labels": labels}}));
        seen.reply(StatusCode::OK, &node_reply());
        let seen = server.next().await;
        seen.expect(Method::PATCH, REPORT, APPLY);
        assert_eq!(
            seen.body,
            json!({
                "apiVersion": "usernsguard.io/v1alpha1", "kind": "NodeReport",
                "metadata": {"name": "n1", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n1-uid"}]},
                "spec": {"nodeName": "n1"},
            })
        );
        seen.echo();
        expect_status(server).await
    }

    async fn expect_status(server: &mut ApiServerVerifier) -> Value {
        let seen = server.next().await;
        seen.expect(Method::PATCH, STATUS, APPLY);
        assert_eq!(seen.body["apiVersion"], "usernsguard.io/v1alpha1");
        assert_eq!(seen.body["kind"], "NodeReport");
        let status = seen.body["status"].clone();
        let mut stored = seen.body.clone();
        stored["spec"] = json!({"nodeName": "n1"});
        seen.reply(StatusCode::OK, &stored);
        status
    }

    /// What the API server answers to a metadata patch of the node.
    fn node_reply() -> Value {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1"}})
    }

    fn verdicts(status: &Value) -> Vec<(String, String, String)> {
        status["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["selfTest"].as_str().unwrap().to_owned(),
                    r["handler"].as_str().unwrap().to_owned(),
                    r["verdict"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn s(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    #[tokio::test]
    async fn new_selftest_runs_once_and_publishes_labels_and_report() {
        let runner = FakeRunner::with([
            ("runc", Verdict::Pass),
            ("crun", Verdict::Pass),
            ("kata", Verdict::Pass),
        ]);
        let (mut agent, mut server) = agent(runner.clone());
        let node = node_meta("n1", [("kubernetes.io/os", "linux")]);
        let list = sts(&[SelfTest::test()]);
        let scenario = tokio::spawn(async move {
            let status = expect_first_publish(
                &mut server,
                json!({"usernsguard.io/userns.crun": "pass", "usernsguard.io/userns.runc": "pass"}),
            )
            .await;
            assert_eq!(
                verdicts(&status),
                vec![s("default", "crun", "pass"), s("default", "runc", "pass")]
            );
            assert_eq!(status["results"][0]["generation"], 1);
            assert_eq!(status["results"][0]["checks"][0]["check"], "userns-joined");
            assert_eq!(status["summary"], "crun=pass runc=pass");
            assert_eq!(status["node"]["kernel"], "6.1.0-test");
            assert_eq!(status["runtimes"][0]["binary"], "/usr/bin/crun");
            server
        });
        let due = agent.sync(&list, &node).await.unwrap();
        assert_eq!(due, None, "no interval: nothing scheduled");
        let mut server = crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
        let calls = runner.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].handlers, vec!["runc", "crun"]);
        assert_eq!(calls[0].timeout, Duration::from_secs(30));
        server.assert_quiet(Duration::from_millis(50)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_selftest_and_same_rerun_results_write_nothing() {
        let runner = FakeRunner::with([("runc", Verdict::Pass)]);
        let (mut agent, mut server) = agent(runner.clone());
        let list = sts(&[SelfTest::test().with_handlers(["runc"]).interval("10m")]);
        let node = node_meta("n1", []);
        let scenario = tokio::spawn(async move {
            expect_first_publish(&mut server, json!({"usernsguard.io/userns.runc": "pass"})).await;
            server
        });
        let due = agent.sync(&list, &node).await.unwrap();
        assert_eq!(due, Some(Duration::from_secs(600)));
        let mut server = crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;

        // The node now carries the label (what the node watch delivers next).
        let node = node_meta("n1", [("usernsguard.io/userns.runc", "pass")]);
        let quiet = async {
            server.assert_quiet(Duration::from_millis(100)).await;
            server
        };
        let (r, mut server) = tokio::join!(agent.sync(&list, &node), quiet);
        assert_eq!(r.unwrap(), Some(Duration::from_secs(600)));
        assert_eq!(runner.calls(), 1, "same generation, interval not elapsed: no run");

        // Interval elapsed: the engine runs again, finds the same (new startedAt, durations).
        tokio::time::advance(Duration::from_secs(600)).await;
        let quiet = async {
            server.assert_quiet(Duration::from_millis(100)).await;
            server
        };
        let (r, mut server) = tokio::join!(agent.sync(&list, &node), quiet);
        assert_eq!(r.unwrap(), Some(Duration::from_secs(600)));
        assert_eq!(runner.calls(), 2, "interval elapsed: re-run");

        // New generation: re-run, and the report's generation changes (labels do not).
        let list = sts(&[SelfTest::test()
            .with_handlers(["runc"])
            .interval("10m")
            .generation(2)]);
        let scenario = tokio::spawn(async move {
            let status = expect_status(&mut server).await;
            assert_eq!(status["results"][0]["generation"], 2);
            server
        });
        agent.sync(&list, &node).await.unwrap();
        assert_eq!(runner.calls(), 3);
        crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn failed_handler_is_labelled_fail_and_announced_once() {
        let runner = FakeRunner::with([("runc", Verdict::Fail), ("crun", Verdict::Pass)]);
        let (mut agent, mut server) = agent(runner.clone());
        let list = sts(&[SelfTest::test()]);
        let node = node_meta("n1", []);
        let scenario = tokio::spawn(async move {
            let status = expect_first_publish(
                &mut server,
                json!({"usernsguard.io/userns.crun": "pass", "usernsguard.io/userns.runc": "fail"}),
            )
            .await;
            assert_eq!(status["summary"], "crun=pass runc=fail");
            let check = &status["results"][1]["checks"][0];
            assert_eq!(check["reason"], "mqueue_owner_unmapped");
            assert!(check["remediation"].as_str().unwrap().contains("runc to 1.2.1"));
            let seen = server.next().await;
            seen.expect(Method::POST, EVENTS, Some("application/json"));
            let ev = &seen.body;
            assert_eq!(ev["type"], "Warning");
            assert_eq!(ev["reason"], "UsernsSelfTestFailed");
            assert_eq!(ev["reportingController"], "usernsguard-agent");
            assert_eq!(ev["reportingInstance"], "n1");
            assert_eq!(
                ev["regarding"],
                json!({"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n1-uid"})
            );
            let note = ev["note"].as_str().unwrap();
            assert!(
                note.contains("runtime handler runc failed SelfTest default"),
                "{note}"
            );
            assert!(note.contains("userns-joined: mqueue_owner_unmapped"), "{note}");
            assert!(note.contains("Fix: upgrade runc to 1.2.1"), "{note}");
            seen.echo();
            server
        });
        agent.sync(&list, &node).await.unwrap();
        let mut server = crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
        // Still failing on the next sync: no second Event, no write.
        let node = node_meta(
            "n1",
            [
                ("usernsguard.io/userns.runc", "fail"),
                ("usernsguard.io/userns.crun", "pass"),
            ],
        );
        let quiet = async { server.assert_quiet(Duration::from_millis(100)).await };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), quiet);
        r.unwrap();
    }

    #[tokio::test]
    async fn node_no_longer_selected_loses_labels_and_results() {
        let runner = FakeRunner::with([("runc", Verdict::Pass)]);
        let (mut agent, mut server) = agent(runner.clone());
        let list = sts(&[SelfTest::test()
            .with_handlers(["runc"])
            .selecting("pool", "userns")]);
        let node = node_meta("n1", [("pool", "userns")]);
        let scenario = tokio::spawn(async move {
            expect_first_publish(&mut server, json!({"usernsguard.io/userns.runc": "pass"})).await;
            server
        });
        agent.sync(&list, &node).await.unwrap();
        let mut server = crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;

        // Relabelled out of the pool; a stale label from an older run is removed as well.
        let node = node_meta(
            "n1",
            [
                ("pool", "other"),
                ("usernsguard.io/userns.runc", "pass"),
                ("usernsguard.io/userns.old", "fail"),
            ],
        );
        let scenario = tokio::spawn(async move {
            let seen = server.next().await;
            seen.expect(Method::PATCH, LABELS, MERGE);
            assert_eq!(
                seen.body,
                json!({"metadata": {"labels": {"usernsguard.io/userns.runc": null, "usernsguard.io/userns.old": null}}})
            );
            seen.reply(StatusCode::OK, &node_reply());
            let status = expect_status(&mut server).await;
            assert_eq!(status, json!({}), "no results, no summary, no facts left");
        });
        agent.sync(&list, &node).await.unwrap();
        crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
        assert_eq!(runner.calls(), 1, "not selected: not run");
    }

    #[tokio::test(start_paused = true)]
    async fn api_errors_and_timeouts_are_retried_without_rerunning_or_losing_the_result() {
        let runner = FakeRunner::with([("runc", Verdict::Fail)]);
        let (mut agent, mut server) = agent(runner.clone());
        let list = sts(&[SelfTest::test().with_handlers(["runc"])]);
        let node = node_meta("n1", []);

        // 1: the label patch gets a 500.
        let scenario = async {
            let seen: Seen = server.next().await;
            seen.expect(Method::PATCH, LABELS, MERGE);
            seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
        assert!(matches!(r, Err(AgentError::Kube(_))), "{r:?}");

        // 2: the label patch hangs: the write timeout ends the sync.
        let scenario = async {
            let seen = server.next().await;
            seen.expect(Method::PATCH, LABELS, MERGE);
            let held = seen.hang();
            tokio::time::sleep(Duration::from_secs(6)).await;
            drop(held);
        };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
        assert!(matches!(r, Err(AgentError::Timeout(_, "node labels"))), "{r:?}");

        // 3: labels land; the NodeReport status apply conflicts (409).
        let scenario = async {
            let seen = server.next().await;
            seen.expect(Method::PATCH, LABELS, MERGE);
            assert_eq!(
                seen.body["metadata"]["labels"]["usernsguard.io/userns.runc"],
                "fail"
            );
            seen.reply(StatusCode::OK, &node_reply());
            let seen = server.next().await;
            seen.expect(Method::PATCH, REPORT, APPLY);
            seen.echo();
            let seen = server.next().await;
            seen.expect(Method::PATCH, STATUS, APPLY);
            seen.fail(StatusCode::CONFLICT, "Conflict");
        };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
        assert!(
            matches!(&r, Err(AgentError::Kube(kube::Error::Api(s))) if s.code == 409),
            "{r:?}"
        );

        // 4: the status lands (the object is not re-applied), then the Event fails with 500.
        let node = node_meta("n1", [("usernsguard.io/userns.runc", "fail")]);
        let scenario = async {
            let status = expect_status(&mut server).await;
            assert_eq!(verdicts(&status), vec![s("default", "runc", "fail")]);
            let seen = server.next().await;
            seen.expect(Method::POST, EVENTS, Some("application/json"));
            seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
        assert!(r.is_err());

        // 5: only the Event is left to deliver.
        let scenario = async {
            let seen = server.next().await;
            seen.expect(Method::POST, EVENTS, Some("application/json"));
            seen.echo();
        };
        let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
        r.unwrap();
        assert_eq!(
            runner.calls(),
            1,
            "the result of the first run was published, never re-run"
        );
        server.assert_quiet(Duration::from_millis(100)).await;
    }

    #[test]
    fn go_durations_parse_and_reject_garbage() {
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("1d"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn worst_verdict_wins_across_selftests() {
        assert_eq!(worse(Verdict::Pass, Verdict::Unknown), Verdict::Unknown);
        assert_eq!(worse(Verdict::Fail, Verdict::Unknown), Verdict::Fail);
        assert_eq!(worse(Verdict::Pass, Verdict::Pass), Verdict::Pass);
    }
}

/// The loop as a whole: against an unreachable API server, and an hour of steady state.
#[cfg(test)]
mod loop_tests {
    use super::*;
    use crate::api_fixtures::{http_status, mock_client, node_meta, unreachable_client, FakeRunner};
    use http::{Method, StatusCode};
    use std::sync::Mutex;

    /// The agent's process as `main` runs it (loop + HTTP endpoint), API server down.
    #[tokio::test]
    async fn survives_an_unreachable_api_server_serving_healthz_but_not_readyz() {
        let runner = FakeRunner::with([("runc", Verdict::Pass)]);
        let metrics = Metrics::new("n1").unwrap();
        let agent = Agent::new(unreachable_client(), AgentConfig::new("n1"), runner.clone())
            .with_metrics(metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let watches = WatchConfig::new("n1", Arc::new(usernsguard_runtime::classify::classify));
        let process = tokio::spawn(serve_while(
            listener,
            metrics.clone(),
            rx.clone(),
            run_all(agent, watches, metrics, tx),
            std::future::pending(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !process.is_finished(),
            "the agent process ended (crashed or returned)"
        );
        assert!(!*rx.borrow(), "ready without ever reaching the API server");
        assert_eq!(http_status(addr, "/healthz").await, 200);
        assert_eq!(http_status(addr, "/readyz").await, 503);
        assert_eq!(runner.calls(), 0, "no SelfTest known yet: nothing to run");
        process.abort();
    }

    #[tokio::test]
    async fn readyz_follows_the_loops_ready_signal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let work = async move {
            let _ = go_rx.await;
            tx.send_replace(true);
            std::future::pending::<()>().await
        };
        let metrics = Metrics::new("n1").unwrap();
        let process = tokio::spawn(serve_while(listener, metrics, rx, work, std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http_status(addr, "/readyz").await, 503);
        go_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http_status(addr, "/readyz").await, 200);
        assert_eq!(http_status(addr, "/healthz").await, 200);
        process.abort();
    }

    fn query_param<'a>(uri: &'a str, key: &str) -> Option<&'a str> {
        uri.split_once('?')?
            .1
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// A fake API server for whole-loop tests: answers lists and watches (kept open for
    /// their `timeoutSeconds`, no events) of SelfTests, the Node and pods, and NodeReport
    /// applies; `write_failures` are the status codes the first NodeReport writes get.
    async fn fake_api_server(
        mut server: crate::api_fixtures::ApiServerVerifier,
        log: Arc<Mutex<Vec<(Instant, Method, String)>>>,
        st: SelfTest,
        node: PartialObjectMeta<Node>,
        pods: Vec<Value>,
        mut write_failures: Vec<StatusCode>,
    ) {
        write_failures.reverse();
        while let Some(seen) = server.next_unbounded().await {
            log.lock()
                .unwrap()
                .push((Instant::now(), seen.method.clone(), seen.uri.clone()));
            let path = seen.uri.split('?').next().unwrap().to_owned();
            let watch = query_param(&seen.uri, "watch") == Some("true");
            match (seen.method.clone(), path.as_str(), watch) {
                (Method::GET, _, true) => {
                    let secs: u64 = query_param(&seen.uri, "timeoutSeconds").unwrap().parse().unwrap();
                    seen.watch_stream(vec![], Duration::from_secs(secs));
                }
                (Method::GET, "/apis/usernsguard.io/v1alpha1/selftests", false) => seen.reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "usernsguard.io/v1alpha1", "kind": "SelfTestList",
                            "metadata": {"resourceVersion": "100"}, "items": [st]}),
                ),
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
                        continue;
                    }
                    let mut stored = seen.body.clone();
                    stored["spec"] = json!({"nodeName": "n1"});
                    seen.reply(StatusCode::OK, &stored);
                }
                (Method::POST, "/apis/events.k8s.io/v1/namespaces/default/events", _) => seen.echo(),
                (m, p, _) => panic!("unexpected request {m} {p}"),
            }
        }
    }

    /// The API server answers the first NodeReport writes with 500, 409 and 500: the loop
    /// retries with backoff, never re-runs the self-test, publishes the first run's result,
    /// and turns ready only then.
    #[tokio::test(start_paused = true)]
    async fn loop_retries_failed_writes_with_backoff_and_publishes_the_kept_result() {
        let runner = FakeRunner::with([("runc", Verdict::Fail)]);
        let (client, server) = mock_client();
        let agent = Agent::new(client, AgentConfig::new("n1"), runner.clone());
        let st = SelfTest::test().with_handlers(["runc"]);
        // The label and the Event are already there (from before a restart): only the
        // NodeReport is to be written.
        let node = node_meta("n1", [("usernsguard.io/userns.runc", "fail")]);
        let log: Arc<Mutex<Vec<(Instant, Method, String)>>> = Arc::default();
        let failures = vec![
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::CONFLICT,
            StatusCode::INTERNAL_SERVER_ERROR,
        ];
        let fake = tokio::spawn(fake_api_server(server, log.clone(), st, node, vec![], failures));
        let (tx, mut rx) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(run(agent, tx));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!*rx.borrow(), "not ready while the NodeReport write fails");
        tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|r| *r))
            .await
            .expect("ready within 10 simulated minutes")
            .unwrap();
        let writes: Vec<(Duration, String)> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m, _)| *m == Method::PATCH)
            .map(|(t, _, u)| (t.duration_since(started), u.split('?').next().unwrap().to_owned()))
            .collect();
        let report = "/apis/usernsguard.io/v1alpha1/nodereports/n1".to_owned();
        let status = format!("{report}/status");
        let paths: Vec<&str> = writes.iter().map(|(_, p)| p.as_str()).collect();
        // object 500, object 409, object 500, object ok, status ok
        assert_eq!(
            paths,
            vec![&report, &report, &report, &report, &status],
            "{writes:?}"
        );
        // Backoff 1 s, 2 s, 4 s between the attempts.
        let gaps: Vec<u64> = writes
            .windows(2)
            .take(3)
            .map(|w| (w[1].0 - w[0].0).as_secs())
            .collect();
        assert_eq!(gaps, vec![1, 2, 4], "{writes:?}");
        assert_eq!(runner.calls(), 1, "the result was kept, not re-run");
        assert!(!task.is_finished());
        task.abort();
        fake.abort();
    }

    /// The whole agent (SelfTest reconciler and pod/event failure watches), one SelfTest
    /// (runc and crun, every 10 minutes), 110 running pods on the node, no change for an
    /// hour: counts every request the fake API server receives.
    #[tokio::test(start_paused = true)]
    async fn an_hour_of_steady_state_costs_only_watch_renewals() {
        let runner = FakeRunner::with([("runc", Verdict::Pass), ("crun", Verdict::Pass)]);
        let (client, server) = mock_client();
        let agent = Agent::new(client, AgentConfig::new("n1"), runner.clone());
        let mut st = SelfTest::test().interval("10m");
        st.metadata.resource_version = Some("90".into());
        let node = node_meta(
            "n1",
            [
                ("usernsguard.io/userns.runc", "pass"),
                ("usernsguard.io/userns.crun", "pass"),
            ],
        );
        let pods: Vec<Value> = (0..110)
            .map(|i| {
                json!({"metadata": {"name": format!("pod-{i}"), "namespace": "default",
                                    "uid": format!("uid-{i}"), "resourceVersion": "50"},
                       "spec": {"nodeName": "n1", "hostUsers": i % 2 == 0,
                                "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
                       "status": {"phase": "Running", "startTime": "2026-11-29T00:00:00Z"}})
            })
            .collect();
        let log: Arc<Mutex<Vec<(Instant, Method, String)>>> = Arc::default();
        let fake = tokio::spawn(fake_api_server(server, log.clone(), st, node, pods, vec![]));
        let (tx, mut rx) = watch::channel(false);
        let watches = WatchConfig::new("n1", Arc::new(usernsguard_runtime::classify::classify));
        let task = tokio::spawn(run_all(agent, watches, Metrics::new("n1").unwrap(), tx));
        tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|r| *r))
            .await
            .expect("ready within 10 simulated minutes")
            .unwrap();
        let startup = log.lock().unwrap().len();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let end = start + Duration::from_secs(3600);

        let log = log.lock().unwrap();
        // Everything after the startup requests (initial lists and watches, first publish)
        // that arrived within the hour.
        let hour: Vec<_> = log[startup..].iter().filter(|(t, ..)| *t < end).collect();
        let watches = hour
            .iter()
            .filter(|(_, m, u)| *m == Method::GET && query_param(u, "watch") == Some("true"))
            .count();
        let others: Vec<_> = hour
            .iter()
            .filter(|(_, m, u)| !(*m == Method::GET && query_param(u, "watch") == Some("true")))
            .map(|(_, m, u)| format!("{m} {u}"))
            .collect();
        eprintln!(
            "steady-state hour: {} requests ({watches} watch renewals, {} other); startup: {startup} \
             requests; self-test runs in the hour: {}",
            hour.len(),
            others.len(),
            runner.calls() - 1
        );
        assert!(
            others.is_empty(),
            "lists, gets or writes in steady state: {others:?}"
        );
        // Seven watches (SelfTests, own Node; RuntimeClasses, own pods, three failure event
        // reasons), each renewed when the server closes it after timeoutSeconds (290 s in
        // kube's watcher): 12 or 13 each in an hour.
        assert!(watches <= 7 * 13, "{watches} watch requests");
        assert!(
            watches >= 7 * 12,
            "{watches}: the watches were not kept open the whole hour"
        );
        // First run, then one every 10 minutes: each re-run found the same and wrote nothing.
        assert!((6..=7).contains(&runner.calls()), "{} runs", runner.calls());
        assert!(!task.is_finished());
        task.abort();
        fake.abort();
    }
}
