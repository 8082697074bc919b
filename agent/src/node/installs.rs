//! The per-node RuntimeProfile reconciler: installs the runtime of every profile that
//! selects this node, uninstalls it when the profile stops selecting the node or is being
//! deleted, and reports how far it got: the NodeReport's `status.installs` (through the
//! node reconciler, which writes the whole status), the `usernsguard.io/runtime.<handler>`
//! label of this node, `usernsguard_runtime_install_state`,
//! `usernsguard_container_runtime_restarts_total`, and Events on the Node.
//!
//! What it decides, in order, for each profile on each sync:
//! - whether an attempt is due: a new generation at once; a failure that changed nothing
//!   (bad input) after a backoff of 1 to 30 minutes, since the node may be fixed meanwhile;
//!   a failure that restarted the CRI runtime and rolled back only after an hour, since each
//!   attempt costs two restarts; an installed handler every 10 minutes (a plan: reading a
//!   few config files, no write) to repair drift;
//! - the plan (`usernsguard_runtime::install`): when it changes nothing, nothing happens;
//!   when it restarts the CRI runtime, a slot of the profile's restart budget
//!   ([`super::restart_budget`]) is taken first, or the node stays `pending`;
//! - the install, then the self-test re-run for the handler (returned to the caller).
//!
//! Which profiles this node installed survives an agent restart in the NodeReport: the
//! first sync reads it back (until then the node reconciler writes no report, which would
//! erase it), so a profile that stopped selecting the node, or was deleted, while the agent
//! was down is still uninstalled. The finalizer the controller puts
//! on every profile keeps a deleted profile (and what it says about restarts) readable until
//! every node has uninstalled it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::time::Instant;
use usernsguard_runtime::install::{
    ErrorClass, Failure, InstallError, InstallRequest, Outcome, RestartMode, RestartReport, UninstallRequest,
};

use super::error::{bounded, AgentError};
use super::installer::{Installer, Planned};
use super::restart_budget::{Acquired, RestartBudget, Slot};
use crate::crd::names::{self, AGENT_FIELD_MANAGER, RUNTIME_LABEL_PREFIX};
use crate::crd::{
    BinarySourceKind, CriRuntime, CriTarget, InstallState, NodeReport, RestartPolicy, RuntimeInstallStatus,
    RuntimeProfile,
};
use crate::metrics::{Metrics, RestartResult};

/// How often an installed handler's configuration is re-planned to repair drift.
pub const RECHECK: Duration = Duration::from_secs(600);
/// How often a node waiting for a restart slot asks again.
pub const SLOT_RETRY: Duration = Duration::from_secs(15);
/// How often a node waiting for the operator's restart (restart mode `none`) looks.
pub const RESTART_PENDING_RETRY: Duration = Duration::from_secs(30);
/// First and last retry delay after a failure that changed nothing.
pub const BAD_INPUT_RETRY: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(1800));
/// The reason of a profile left out because another one registers its handler on the node:
/// it owns neither the handler's label nor its metric series, and has nothing to uninstall.
/// Not `handler_conflict`: that is the installer's reason for a handler registered by a
/// file it does not own, a real failure of this profile.
const PROFILE_CONFLICT: &str = "profile_conflict";
/// Retry delay after a failure that restarted the CRI runtime (twice, with the rollback).
pub const ROLLED_BACK_RETRY: Duration = Duration::from_secs(3600);

/// Static settings of the install reconciler.
#[derive(Debug, Clone)]
pub struct InstallsConfig {
    pub node_name: String,
    /// The agent's namespace, where the restart-budget Leases live.
    pub namespace: String,
    /// The CRI socket (host path), when not the one the CRI configuration implies.
    pub cri_socket: Option<PathBuf>,
    /// Limit of every API request (reads, Lease writes, labels, Events): a hung request
    /// must not stall the node's loop, self-tests included.
    pub write_timeout: Duration,
}

impl InstallsConfig {
    pub fn new(node_name: &str, namespace: &str) -> Self {
        InstallsConfig {
            node_name: node_name.to_owned(),
            namespace: namespace.to_owned(),
            cri_socket: None,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What one sync asks of the caller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InstallSync {
    /// How long until an attempt is due (None: nothing scheduled).
    pub due: Option<Duration>,
    /// Handlers installed or changed by this sync: the self-tests covering them run again.
    pub installed: Vec<String>,
}

/// One profile's install on this node.
#[derive(Debug, Clone)]
struct Entry {
    status: RuntimeInstallStatus,
    /// When to look again; None: only on a new generation.
    next_attempt: Option<Instant>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// Being uninstalled: `next_attempt` is the uninstall's retry.
    removing: bool,
}

/// The install reconciler and its in-memory state.
pub struct Installs {
    client: Client,
    cfg: InstallsConfig,
    installer: Arc<dyn Installer>,
    budget: RestartBudget,
    recorder: Recorder,
    metrics: Option<Metrics>,
    /// By profile name.
    entries: BTreeMap<String, Entry>,
    /// Whether the NodeReport's `status.installs` was read back after this process started.
    seeded: bool,
}

impl std::fmt::Debug for Installs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installs")
            .field("node", &self.cfg.node_name)
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The outcome of one attempt, before it is recorded.
struct Attempt {
    state: InstallState,
    reason: Option<&'static str>,
    message: String,
    version: Option<String>,
    cri_restarted: bool,
    retry: Option<Duration>,
    /// A failure (as opposed to a wait): counts for the backoff and is announced.
    failed: bool,
    /// The host changed (or the handler just went live): announced by a Normal Event.
    changed_host: bool,
}

impl Attempt {
    fn pending(reason: &'static str, message: String, retry: Duration) -> Self {
        Attempt {
            state: InstallState::Pending,
            reason: Some(reason),
            message,
            version: None,
            cri_restarted: false,
            retry: Some(retry),
            failed: false,
            changed_host: false,
        }
    }

    fn failed(reason: &'static str, message: String, retry: Option<Duration>) -> Self {
        Attempt {
            state: InstallState::Failed,
            reason: Some(reason),
            message,
            version: None,
            cri_restarted: false,
            retry,
            failed: true,
            changed_host: false,
        }
    }
}

impl Installs {
    pub fn new(client: Client, cfg: InstallsConfig, installer: Arc<dyn Installer>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: AGENT_FIELD_MANAGER.into(),
                instance: Some(cfg.node_name.clone()),
            },
        );
        let budget = RestartBudget::new(client.clone(), &cfg.namespace, &cfg.node_name);
        Installs {
            client,
            cfg,
            installer,
            budget,
            recorder,
            metrics: None,
            entries: BTreeMap::new(),
            seeded: false,
        }
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The NodeReport's `status.installs`, sorted by profile; `None` until the record of
    /// earlier installs was read back, since publishing an empty list would erase it (the
    /// report is written with server-side apply) and with it every later uninstall.
    pub fn statuses(&self) -> Option<Vec<RuntimeInstallStatus>> {
        self.seeded
            .then(|| self.entries.values().map(|e| e.status.clone()).collect())
    }

    /// One reconcile of every profile against this node.
    pub async fn sync(
        &mut self,
        profiles: &[Arc<RuntimeProfile>],
        node: &PartialObjectMeta<Node>,
    ) -> Result<InstallSync, AgentError> {
        if !self.seeded {
            self.seed().await?;
        }
        let (wanted, conflicts) = wanted(profiles, node);
        let mut out = InstallSync::default();

        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|name| !wanted.contains_key(*name) && !conflicts.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            let profile = profiles.iter().find(|p| p.name_any() == name).cloned();
            let entry = &self.entries[&name];
            if entry.status.reason.as_deref() == Some(PROFILE_CONFLICT)
                || wanted.values().any(|p| p.spec.handler == entry.status.handler)
            {
                // It never installed (it lost its handler to another profile), or another
                // profile now registers the same handler and takes the install over.
                self.entries.remove(&name);
                continue;
            }
            let entry = &self.entries[&name];
            if !entry.removing || entry.next_attempt.is_some_and(|t| t <= Instant::now()) {
                self.entries.get_mut(&name).expect("listed").removing = true;
                self.remove(&name, profile.as_deref(), node).await?;
            }
        }
        for (name, winner) in &conflicts {
            let p = profiles
                .iter()
                .find(|p| p.name_any() == *name)
                .expect("from profiles");
            let attempt = Attempt::failed(
                PROFILE_CONFLICT,
                format!(
                    "RuntimeProfile {winner} registers the handler {} on this node as well; only {winner} is installed",
                    p.spec.handler
                ),
                None,
            );
            if self.is_due(name, p) {
                self.record(p, attempt, None, node).await?;
            }
        }
        for (name, p) in &wanted {
            if self.is_due(name, p) {
                if let Some(handler) = self.ensure(p, node).await? {
                    out.installed.push(handler);
                }
            }
        }

        self.publish_labels(node).await?;
        let now = Instant::now();
        out.due = self
            .entries
            .values()
            .filter_map(|e| e.next_attempt)
            .map(|t| t.saturating_duration_since(now))
            .min();
        Ok(out)
    }

    /// Reads back which profiles this node had installed, from its own NodeReport.
    async fn seed(&mut self) -> Result<(), AgentError> {
        let api: Api<NodeReport> = Api::all(self.client.clone());
        let report = bounded(
            self.cfg.write_timeout,
            "NodeReport read",
            api.get_opt(&self.cfg.node_name),
        )
        .await?;
        for status in report
            .and_then(|r| r.status)
            .map(|s| s.installs)
            .unwrap_or_default()
        {
            self.entries
                .entry(status.runtime_profile.clone())
                .or_insert(Entry {
                    status,
                    next_attempt: Some(Instant::now()),
                    failures: 0,
                    removing: false,
                });
        }
        self.seeded = true;
        Ok(())
    }

    /// Whether an install attempt for the profile is due now.
    fn is_due(&self, name: &str, p: &RuntimeProfile) -> bool {
        let Some(e) = self.entries.get(name) else {
            return true;
        };
        e.removing
            || e.status.generation != p.meta().generation.unwrap_or(0)
            || e.next_attempt.is_some_and(|t| t <= Instant::now())
    }

    /// Brings the profile's install to its spec. Returns the handler when it was (re)installed.
    async fn ensure(
        &mut self,
        p: &RuntimeProfile,
        node: &PartialObjectMeta<Node>,
    ) -> Result<Option<String>, AgentError> {
        let installer = self.installer.clone();
        let cri_socket = self.cfg.cri_socket.clone();
        let profile = p.clone();
        let already = self
            .entries
            .get(&p.name_any())
            .is_some_and(|e| e.status.state == InstallState::Installed);
        let prepared = blocking(move || {
            let req = request(installer.as_ref(), &profile, cri_socket)?;
            let planned = installer.plan_install(&req);
            let live = match (&planned, &req.restart) {
                (Ok(pl), RestartMode::None) if pl.noop && !already => Some(installer.live(&req)),
                _ => None,
            };
            Ok::<_, Attempt>((req, planned, live))
        })
        .await?;
        let (req, planned, live) = match prepared {
            Ok(prepared) => prepared,
            Err(mut attempt) => {
                // Bad input (a missing bundle, a failed download, no CRI config): backed off
                // like any failure that changed nothing, so a broken URL is not fetched by
                // every node every minute.
                attempt.retry = Some(self.backoff(p));
                self.record(p, attempt, None, node).await?;
                return Ok(None);
            }
        };
        let cri_config = Some(req.cri_config.display().to_string());
        let planned = match planned {
            Ok(pl) => pl,
            Err(e) => {
                let attempt = Attempt::failed(e.label(), e.to_string(), Some(self.backoff(p)));
                self.record(p, attempt, cri_config, node).await?;
                return Ok(None);
            }
        };
        if planned.noop {
            let installed = matches!(live, Some(Ok(true)));
            let attempt = match live {
                Some(Ok(false)) => Attempt::pending(
                    "restart_pending",
                    format!(
                        "{} is configured; restart the CRI runtime to activate it (cri.restart is none)",
                        p.spec.handler
                    ),
                    RESTART_PENDING_RETRY,
                ),
                Some(Err(e)) => Attempt::pending(
                    "restart_pending",
                    format!(
                        "{} is configured; the CRI runtime does not answer ({e})",
                        p.spec.handler
                    ),
                    RESTART_PENDING_RETRY,
                ),
                Some(Ok(true)) | None => Attempt {
                    state: InstallState::Installed,
                    reason: None,
                    message: self
                        .entries
                        .get(&p.name_any())
                        .filter(|e| e.status.state == InstallState::Installed)
                        .map(|e| e.status.message.clone())
                        .unwrap_or_else(|| format!("{} is registered; nothing to change", p.spec.handler)),
                    version: self
                        .entries
                        .get(&p.name_any())
                        .and_then(|e| e.status.version.clone()),
                    cri_restarted: false,
                    retry: Some(RECHECK),
                    failed: false,
                    changed_host: installed,
                },
            };
            self.record(p, attempt, cri_config, node).await?;
            return Ok(installed.then(|| p.spec.handler.clone()));
        }

        let slot = match self.slot(p, &planned).await? {
            Ok(slot) => slot,
            Err(waiting) => {
                self.record(p, waiting, cri_config, node).await?;
                return Ok(None);
            }
        };
        let installer = self.installer.clone();
        let result = blocking(move || installer.install(&req)).await;
        self.release(slot).await;
        let attempt = match result? {
            Ok(outcome) => {
                self.count_restart(p, &outcome.restart, None);
                installed_attempt(&outcome)
            }
            Err(e) => {
                self.count_restart(p, &RestartReport::NotNeeded, Some(&e));
                let retry = match e.class() {
                    ErrorClass::BadInput => self.backoff(p),
                    ErrorClass::RolledBack | ErrorClass::RollbackFailed => ROLLED_BACK_RETRY,
                };
                let reason = match e.class() {
                    ErrorClass::BadInput => e.label(),
                    ErrorClass::RolledBack => "rolled_back",
                    ErrorClass::RollbackFailed => "rollback_failed",
                };
                Attempt::failed(reason, e.to_string(), Some(retry))
            }
        };
        let installed = attempt.state == InstallState::Installed;
        self.record(p, attempt, cri_config, node).await?;
        Ok(installed.then(|| p.spec.handler.clone()))
    }

    /// Takes the profile's install off this node. The entry goes away once nothing is left.
    async fn remove(
        &mut self,
        name: &str,
        profile: Option<&RuntimeProfile>,
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let status = self.entries[name].status.clone();
        let installer = self.installer.clone();
        let cri = profile.map(|p| p.spec.cri.clone()).unwrap_or_default();
        let recorded = status.cri_config.clone();
        let cri_socket = self.cfg.cri_socket.clone();
        let handler = status.handler.clone();
        let prepared = blocking(move || {
            let cri_config = match cri.config_path.clone().or(recorded) {
                Some(path) => PathBuf::from(path),
                None => installer.find_cri_config(cri.runtime)?,
            };
            let req = UninstallRequest {
                handler,
                cri_config,
                restart: restart_mode(&cri),
                cri_socket,
            };
            let planned = installer.plan_uninstall(&req).map_err(|e| e.to_string())?;
            Ok::<_, String>((req, planned))
        })
        .await?;
        let (req, planned) = match prepared {
            Ok(x) => x,
            Err(message) => {
                return self
                    .uninstall_failed(name, "uninstall_failed", ErrorClass::BadInput, message, node)
                    .await
            }
        };
        if planned.noop {
            self.forget(name, None, node).await;
            return Ok(());
        }
        let restart_runtime = profile.map(|p| p.spec.cri.runtime).unwrap_or_default();
        let slot = match profile {
            Some(p) => match self.slot(p, &planned).await? {
                Ok(slot) => slot,
                Err(waiting) => {
                    let entry = self.entries.get_mut(name).expect("entry exists");
                    entry.status.reason = waiting.reason.map(str::to_owned);
                    entry.status.message = format!("uninstall: {}", waiting.message);
                    entry.next_attempt = waiting.retry.map(|d| Instant::now() + d);
                    return Ok(());
                }
            },
            // The profile is gone (its finalizer was removed by hand): no budget to respect.
            None => None,
        };
        let installer = self.installer.clone();
        let result = blocking(move || installer.uninstall(&req)).await;
        self.release(slot).await;
        match result? {
            Ok(outcome) => {
                self.count_restart_runtime(restart_runtime, &outcome.restart, None);
                self.forget(name, Some(&outcome), node).await;
                Ok(())
            }
            Err(e) => {
                self.count_restart_runtime(restart_runtime, &RestartReport::NotNeeded, Some(&e));
                let reason = match e.class() {
                    ErrorClass::BadInput => "uninstall_failed",
                    ErrorClass::RolledBack => "rolled_back",
                    ErrorClass::RollbackFailed => "rollback_failed",
                };
                self.uninstall_failed(name, reason, e.class(), e.to_string(), node)
                    .await
            }
        }
    }

    async fn uninstall_failed(
        &mut self,
        name: &str,
        reason: &'static str,
        class: ErrorClass,
        message: String,
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let entry = self.entries.get_mut(name).expect("entry exists");
        entry.failures += 1;
        // As for installs: an attempt that restarted the CRI runtime twice waits an hour.
        let retry = match class {
            ErrorClass::BadInput => backoff_for(entry.failures),
            ErrorClass::RolledBack | ErrorClass::RollbackFailed => ROLLED_BACK_RETRY,
        };
        entry.next_attempt = Some(Instant::now() + retry);
        let was_failed = entry.status.state == InstallState::Failed;
        entry.status.state = InstallState::Failed;
        entry.status.reason = Some(reason.to_owned());
        entry.status.message = format!("uninstall: {message}");
        if !was_failed {
            entry.status.last_transition_time = Some(Time(Timestamp::now()));
        }
        let (handler, note) = (
            entry.status.handler.clone(),
            format!(
                "runtime handler {} (RuntimeProfile {name}) could not be uninstalled: {message}",
                entry.status.handler
            ),
        );
        if let Some(m) = &self.metrics {
            m.set_install_state(&handler, InstallState::Failed);
        }
        if !was_failed {
            self.event(
                node,
                EventType::Warning,
                names::EVENT_INSTALL_FAILED,
                "Uninstall",
                note,
            )
            .await;
        }
        Ok(())
    }

    /// Drops an entry whose install is gone from the host.
    async fn forget(&mut self, name: &str, outcome: Option<&Outcome>, node: &PartialObjectMeta<Node>) {
        let Some(entry) = self.entries.remove(name) else {
            return;
        };
        let handler = entry.status.handler;
        if let Some(m) = &self.metrics {
            if !self.entries.values().any(|e| e.status.handler == handler) {
                m.remove_install_state(&handler);
            }
        }
        if let Some(o) = outcome.filter(|o| !o.unchanged()) {
            let note = format!(
                "runtime handler {handler} (RuntimeProfile {name}) uninstalled{}",
                restart_note(&o.restart)
            );
            self.event(
                node,
                EventType::Normal,
                names::EVENT_UNINSTALLED,
                "Uninstall",
                note,
            )
            .await;
        }
    }

    /// A restart-budget slot when the plan restarts the CRI runtime through systemd;
    /// `Ok(None)` when it needs none; `Err` (a pending attempt) when every slot is taken.
    async fn slot(
        &self,
        p: &RuntimeProfile,
        planned: &Planned,
    ) -> Result<Result<Option<Slot>, Attempt>, AgentError> {
        if !planned.restart_needed || p.spec.cri.restart == RestartPolicy::None {
            return Ok(Ok(None));
        }
        let max = p.spec.rollout.max_concurrent_restarts;
        let name = p.name_any();
        let acquire = self.budget.acquire(&name, max, Timestamp::now());
        match bounded(self.cfg.write_timeout, "restart slot", acquire).await? {
            Acquired::Slot(s) => Ok(Ok(Some(s))),
            Acquired::Busy { holders } => Ok(Err(Attempt::pending(
                "waiting_for_restart_slot",
                format!(
                    "waiting to restart the CRI runtime: all {max} restart slots are held (nodes: {})",
                    if holders.is_empty() {
                        "being taken".into()
                    } else {
                        holders.join(", ")
                    }
                ),
                SLOT_RETRY,
            ))),
        }
    }

    /// Gives a slot back; a failure only delays the next node until the Lease expires.
    async fn release(&self, slot: Option<Slot>) {
        if let Some(s) = slot {
            if let Err(e) = bounded(
                self.cfg.write_timeout,
                "restart slot release",
                self.budget.release(&s),
            )
            .await
            {
                tracing::warn!(lease = %s.name, error = %e, "could not release the restart slot; it frees itself when it expires");
            }
        }
    }

    fn backoff(&self, p: &RuntimeProfile) -> Duration {
        let failures = self
            .entries
            .get(&p.name_any())
            .filter(|e| e.status.generation == p.meta().generation.unwrap_or(0))
            .map_or(0, |e| e.failures);
        backoff_for(failures + 1)
    }

    /// Stores an attempt's result, with the metric and, on a transition, an Event.
    async fn record(
        &mut self,
        p: &RuntimeProfile,
        attempt: Attempt,
        cri_config: Option<String>,
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), AgentError> {
        let name = p.name_any();
        let generation = p.meta().generation.unwrap_or(0);
        let previous = self.entries.get(&name).cloned();
        let same_generation = previous
            .as_ref()
            .is_some_and(|e| e.status.generation == generation);
        let failures = match (&previous, attempt.failed) {
            (Some(e), true) if same_generation => e.failures + 1,
            (_, true) => 1,
            (_, false) => 0,
        };
        let changed = previous.as_ref().is_none_or(|e| e.status.state != attempt.state);
        let status = RuntimeInstallStatus {
            runtime_profile: name.clone(),
            generation,
            handler: p.spec.handler.clone(),
            state: attempt.state,
            reason: attempt.reason.map(str::to_owned),
            version: attempt
                .version
                .or_else(|| previous.as_ref().and_then(|e| e.status.version.clone())),
            cri_config: cri_config.or_else(|| previous.as_ref().and_then(|e| e.status.cri_config.clone())),
            message: attempt.message.clone(),
            cri_restarted: attempt.cri_restarted,
            last_transition_time: match (&previous, changed) {
                (Some(e), false) => e.status.last_transition_time.clone(),
                _ => Some(Time(Timestamp::now())),
            },
        };
        if let Some(m) = self
            .metrics
            .as_ref()
            .filter(|_| attempt.reason != Some(PROFILE_CONFLICT))
        {
            m.set_install_state(&p.spec.handler, attempt.state);
        }
        let announce = attempt.failed
            && (changed
                || !same_generation
                || previous.as_ref().and_then(|e| e.status.reason.as_deref()) != attempt.reason);
        self.entries.insert(
            name.clone(),
            Entry {
                status,
                next_attempt: attempt.retry.map(|d| Instant::now() + d),
                failures,
                removing: false,
            },
        );
        if announce {
            let note = format!(
                "runtime handler {} (RuntimeProfile {name}) failed to install: {}",
                p.spec.handler, attempt.message
            );
            self.event(
                node,
                EventType::Warning,
                names::EVENT_INSTALL_FAILED,
                "Install",
                note,
            )
            .await;
        } else if attempt.state == InstallState::Installed && attempt.changed_host {
            let note = format!(
                "runtime handler {} (RuntimeProfile {name}): {}",
                p.spec.handler, attempt.message
            );
            self.event(node, EventType::Normal, names::EVENT_INSTALLED, "Install", note)
                .await;
        }
        Ok(())
    }

    fn count_restart(&self, p: &RuntimeProfile, report: &RestartReport, error: Option<&InstallError>) {
        self.count_restart_runtime(p.spec.cri.runtime, report, error);
    }

    /// A restart the installer made: a success when the unit came back with the handler; a
    /// failure when it did not (the rollback's own restart is part of the same failure).
    fn count_restart_runtime(
        &self,
        runtime: CriRuntime,
        report: &RestartReport,
        error: Option<&InstallError>,
    ) {
        let Some(m) = &self.metrics else { return };
        let runtime = match runtime {
            CriRuntime::Containerd => "containerd",
            CriRuntime::Crio => "crio",
        };
        let restarted_and_failed = matches!(
            error,
            Some(InstallError::RolledBack { cause, .. } | InstallError::RollbackFailed { cause, .. })
                if matches!(
                    cause,
                    Failure::RestartFailed { .. }
                        | Failure::Restart { .. }
                        | Failure::CriDown { .. }
                        | Failure::HandlerMissing { .. }
                        | Failure::HandlerStillThere { .. }
                )
        );
        if restarted_and_failed {
            m.inc_runtime_restart(runtime, RestartResult::Failure);
        } else if matches!(report, RestartReport::Restarted(_)) {
            m.inc_runtime_restart(runtime, RestartResult::Success);
        }
    }

    /// Events are best effort: a lost one must not stop the install loop.
    async fn event(
        &self,
        node: &PartialObjectMeta<Node>,
        type_: EventType,
        reason: &str,
        action: &str,
        mut note: String,
    ) {
        truncate(&mut note, 1000);
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let mut reference = node.object_ref(&());
        reference.api_version = Some("v1".into());
        reference.kind = Some("Node".into());
        let publish = self.recorder.publish(&ev, &reference);
        if let Err(e) = bounded(self.cfg.write_timeout, "Event", publish).await {
            tracing::warn!(error = %e, reason, "could not record an Event");
        }
    }

    /// JSON merge patch of the node's `usernsguard.io/runtime.*` labels: one per handler,
    /// stale ones removed.
    async fn publish_labels(&self, node: &PartialObjectMeta<Node>) -> Result<(), AgentError> {
        let desired: BTreeMap<String, String> = self
            .entries
            .values()
            .filter(|e| e.status.reason.as_deref() != Some(PROFILE_CONFLICT))
            .map(|e| {
                (
                    names::runtime_label(&e.status.handler),
                    e.status.state.as_str().to_owned(),
                )
            })
            .collect();
        let Some(patch) = super::labels::merge_patch(node.labels(), RUNTIME_LABEL_PREFIX, &desired) else {
            return Ok(());
        };
        let api: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(AGENT_FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        bounded(
            self.cfg.write_timeout,
            "node labels",
            api.patch_metadata(&self.cfg.node_name, &pp, &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }
}

/// The profiles this node must have installed, by name, and those left out because an
/// earlier profile (by name) registers the same handler (name → the winner's name).
fn wanted<'a>(
    profiles: &'a [Arc<RuntimeProfile>],
    node: &PartialObjectMeta<Node>,
) -> (BTreeMap<String, &'a RuntimeProfile>, BTreeMap<String, String>) {
    let mut wanted = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    let mut by_handler: BTreeMap<&str, String> = BTreeMap::new();
    let mut selected: Vec<&RuntimeProfile> = profiles
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.meta().deletion_timestamp.is_none() && p.spec.selects(node.labels()))
        .collect();
    selected.sort_by_key(|p| p.name_any());
    for p in selected {
        match by_handler.get(p.spec.handler.as_str()) {
            Some(winner) => {
                conflicts.insert(p.name_any(), winner.clone());
            }
            None => {
                by_handler.insert(&p.spec.handler, p.name_any());
                wanted.insert(p.name_any(), p);
            }
        }
    }
    (wanted, conflicts)
}

/// The host installer's request for a profile (downloads a `Url` binary first).
fn request(
    installer: &dyn Installer,
    p: &RuntimeProfile,
    cri_socket: Option<PathBuf>,
) -> Result<InstallRequest, Attempt> {
    let binary = installer
        .source(p.spec.runtime, &p.spec.binary)
        .map_err(|e| Attempt::failed(e.reason, e.message, None))?;
    let cri_config = match &p.spec.cri.config_path {
        Some(path) => PathBuf::from(path),
        None => installer
            .find_cri_config(p.spec.cri.runtime)
            .map_err(|m| Attempt::failed("cri_config_not_found", m, None))?,
    };
    Ok(InstallRequest {
        handler: p.spec.handler.clone(),
        binary,
        install_path: (p.spec.binary.source != BinarySourceKind::Host)
            .then(|| PathBuf::from(&p.spec.binary.path)),
        sha256: p.spec.binary.sha256.clone(),
        cri_config,
        restart: restart_mode(&p.spec.cri),
        cri_socket,
    })
}

fn restart_mode(cri: &CriTarget) -> RestartMode {
    match cri.restart {
        RestartPolicy::Systemd => RestartMode::Systemd {
            unit: cri.unit.clone(),
        },
        RestartPolicy::None => RestartMode::None,
    }
}

/// The attempt a successful install makes.
fn installed_attempt(o: &Outcome) -> Attempt {
    let mut message = match &o.live {
        Some(live) => live.to_string(),
        None => format!("{} is registered", o.handler),
    };
    if let Some(b) = &o.binary {
        message.push_str(&format!("; {b}"));
    }
    message.push_str(&restart_note(&o.restart));
    if let RestartReport::Operator { units } = &o.restart {
        return Attempt::pending(
            "restart_pending",
            format!(
                "{} is configured; restart {} to activate it (cri.restart is none)",
                o.handler,
                units.join(" or ")
            ),
            RESTART_PENDING_RETRY,
        );
    }
    Attempt {
        state: InstallState::Installed,
        reason: None,
        message,
        version: o.binary_version.clone(),
        cri_restarted: matches!(o.restart, RestartReport::Restarted(_)),
        retry: Some(RECHECK),
        failed: false,
        changed_host: !o.unchanged(),
    }
}

fn restart_note(r: &RestartReport) -> String {
    match r {
        RestartReport::NotNeeded => String::new(),
        RestartReport::Operator { units } => format!("; restart {} to activate it", units.join(" or ")),
        RestartReport::Restarted(o) => format!("; restarted the CRI runtime ({o})"),
    }
}

/// 1, 2, 4, ... minutes up to 30.
fn backoff_for(failures: u32) -> Duration {
    let (min, max) = BAD_INPUT_RETRY;
    min.saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(max)
}

fn truncate(note: &mut String, max: usize) {
    if note.len() > max {
        let mut cut = max - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Installer(e.to_string()))
}

#[cfg(test)]
mod tests;
