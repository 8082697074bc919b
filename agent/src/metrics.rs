//! The Prometheus registry and every metric of DESIGN.md's table, owned in one place so the
//! names, types and label sets cannot drift between the agent, `selftest --serve`, the
//! chart's dashboard and its alert rules.
//!
//! The `node` label is a registry-wide constant label: every series carries it without any
//! call site having to remember it. Label values are bounded by construction: reasons and
//! checks come from closed enums, handlers from the node's runtime configuration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use usernsguard_runtime::{CheckOutcome, Reason, SelfTestReport};

use crate::crd::InstallState;

/// Outcome of a container runtime restart/reload; the `result` label of
/// `usernsguard_container_runtime_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartResult {
    Success,
    Failure,
}

impl RestartResult {
    pub const fn as_str(self) -> &'static str {
        match self {
            RestartResult::Success => "success",
            RestartResult::Failure => "failure",
        }
    }
}

/// Every metric of DESIGN.md's table, as registered below.
pub const METRIC_NAMES: [&str; 11] = [
    "usernsguard_pod_userns_failures_total",
    "usernsguard_pod_userns_starts_total",
    "usernsguard_selftest_check_passed",
    "usernsguard_selftest_check_warning",
    "usernsguard_selftest_duration_seconds",
    "usernsguard_selftest_last_run_timestamp_seconds",
    "usernsguard_runtime_info",
    "usernsguard_runtime_install_state",
    "usernsguard_container_runtime_restarts_total",
    "usernsguard_node_info",
    "usernsguard_build_info",
];

/// Self-test durations range from a few hundred milliseconds (crun, warm cache) to the probe
/// timeout; buckets cover 0.1 s .. ~100 s.
const SELFTEST_DURATION_BUCKETS: [f64; 11] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// All usernsguard metrics behind one registry. Cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pod_userns_failures: IntCounterVec,
    pod_userns_starts: IntCounterVec,
    selftest_check_passed: IntGaugeVec,
    selftest_check_warning: IntGaugeVec,
    selftest_duration: HistogramVec,
    selftest_last_run: GaugeVec,
    runtime_info: IntGaugeVec,
    runtime_install_state: IntGaugeVec,
    container_runtime_restarts: IntCounterVec,
    node_info: IntGaugeVec,
    /// `(runtime, version)` last published per handler, so an upgrade replaces the old
    /// `runtime_info` series instead of leaving both at 1.
    runtime_info_seen: Arc<Mutex<HashMap<String, (String, String)>>>,
}

/// Failure to build the registry: only possible through a programming error (duplicate or
/// invalid metric definition), reported with the metric's name.
#[derive(Debug, thiserror::Error)]
#[error("cannot register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// A registry whose every series carries `node=<node>`.
    pub fn new(node: &str) -> Result<Metrics, MetricsError> {
        let labels = HashMap::from([("node".to_owned(), node.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels))?;

        let pod_userns_failures = IntCounterVec::new(
            opts(
                "usernsguard_pod_userns_failures_total",
                "Occurrences of user-namespace pod sandbox/container creation failures on this node, by classified reason.",
            ),
            &["runtime_handler", "reason"],
        )?;
        let pod_userns_starts = IntCounterVec::new(
            opts(
                "usernsguard_pod_userns_starts_total",
                "User-namespace pods (hostUsers: false) on this node that reached Running.",
            ),
            &["runtime_handler"],
        )?;
        let selftest_check_passed = IntGaugeVec::new(
            opts(
                "usernsguard_selftest_check_passed",
                "1 if the last self-test check passed (warnings included: the pod works as the node is configured), 0 if it failed or errored; absent when skipped.",
            ),
            &["runtime_handler", "check"],
        )?;
        let selftest_check_warning = IntGaugeVec::new(
            opts(
                "usernsguard_selftest_check_warning",
                "1 if the last self-test check passed with a warning (a latent defect that breaks pods once the node's configuration changes, e.g. SELinux labels turned on), 0 otherwise; absent when skipped.",
            ),
            &["runtime_handler", "check"],
        )?;
        let selftest_duration = HistogramVec::new(
            HistogramOpts::new(
                "usernsguard_selftest_duration_seconds",
                "Time spent running the self-test checks of one runtime handler.",
            )
            .buckets(SELFTEST_DURATION_BUCKETS.to_vec()),
            &["runtime_handler"],
        )?;
        let selftest_last_run = GaugeVec::new(
            opts(
                "usernsguard_selftest_last_run_timestamp_seconds",
                "Unix time at which the last self-test run of the handler finished.",
            ),
            &["runtime_handler"],
        )?;
        let runtime_info = IntGaugeVec::new(
            opts(
                "usernsguard_runtime_info",
                "The OCI runtime behind a handler and its version (always 1).",
            ),
            &["runtime_handler", "runtime", "version"],
        )?;
        let runtime_install_state = IntGaugeVec::new(
            opts(
                "usernsguard_runtime_install_state",
                "Install state of a runtime handler: one series per state, 1 for the current state and 0 for the others.",
            ),
            &["runtime_handler", "state"],
        )?;
        let container_runtime_restarts = IntCounterVec::new(
            opts(
                "usernsguard_container_runtime_restarts_total",
                "Restarts or reloads of the container runtime (containerd, CRI-O) done by usernsguard.",
            ),
            &["runtime", "result"],
        )?;
        let node_info = IntGaugeVec::new(
            opts(
                "usernsguard_node_info",
                "Kernel release and SELinux mode of the node (always 1).",
            ),
            &["kernel", "selinux_mode"],
        )?;
        let build_info = IntGaugeVec::new(
            opts("usernsguard_build_info", "usernsguard build (always 1)."),
            &["version"],
        )?;

        registry.register(Box::new(pod_userns_failures.clone()))?;
        registry.register(Box::new(pod_userns_starts.clone()))?;
        registry.register(Box::new(selftest_check_passed.clone()))?;
        registry.register(Box::new(selftest_check_warning.clone()))?;
        registry.register(Box::new(selftest_duration.clone()))?;
        registry.register(Box::new(selftest_last_run.clone()))?;
        registry.register(Box::new(runtime_info.clone()))?;
        registry.register(Box::new(runtime_install_state.clone()))?;
        registry.register(Box::new(container_runtime_restarts.clone()))?;
        registry.register(Box::new(node_info.clone()))?;
        registry.register(Box::new(build_info.clone()))?;

        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Ok(Metrics {
            registry,
            pod_userns_failures,
            pod_userns_starts,
            selftest_check_passed,
            selftest_check_warning,
            selftest_duration,
            selftest_last_run,
            runtime_info,
            runtime_install_state,
            container_runtime_restarts,
            node_info,
            runtime_info_seen: Arc::default(),
        })
    }

    /// The registry, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates the zero-valued failure and start series of a handler, so `rate()` and
    /// `increase()` see the first failure as an increase from 0 rather than a new series.
    /// Called for the handlers the node's CRI runtime registers, and only those: label values
    /// stay bounded by the node's configuration, not by the cluster's RuntimeClasses.
    pub fn register_handler(&self, handler: &str) {
        for reason in Reason::ALL.into_iter().filter(|r| r.is_userns()) {
            self.pod_userns_failures
                .with_label_values(&[handler, reason.as_str()]);
        }
        self.pod_userns_starts.with_label_values(&[handler]);
    }

    /// Removes every failure and start series of a handler the node no longer registers
    /// (zero or not: Prometheus reads a vanished counter as ended, and a later failure of a
    /// pod still using that handler starts it again from 0).
    pub fn remove_handler(&self, handler: &str) {
        for reason in Reason::ALL {
            let _ = self
                .pod_userns_failures
                .remove_label_values(&[handler, reason.as_str()]);
        }
        let _ = self.pod_userns_starts.remove_label_values(&[handler]);
    }

    /// Adds `delta` new occurrences of a user-namespace pod failure. `Unrelated` is never
    /// counted: it is not a user-namespace failure, and counting it would break the label domain.
    pub fn add_pod_failures(&self, handler: &str, reason: Reason, delta: u64) {
        if !reason.is_userns() || delta == 0 {
            return;
        }
        self.pod_userns_failures
            .with_label_values(&[handler, reason.as_str()])
            .inc_by(delta);
    }

    /// Counts one user-namespace pod that reached Running.
    pub fn inc_pod_start(&self, handler: &str) {
        self.pod_userns_starts.with_label_values(&[handler]).inc();
    }

    /// Publishes one self-test run. Per check: passed 1 for `Pass` and `Warn`, 0 for `Fail`
    /// and `Error` (the handler cannot be trusted either way); warning 1 for `Warn`, else 0;
    /// no series for `Skip` (a check that does not apply must not read as a failure). A handler's duration is the sum of its checks'
    /// durations; the last-run timestamp is the run's end (`started_at + duration_seconds`,
    /// or now when `started_at` does not parse).
    pub fn observe_selftest(&self, report: &SelfTestReport) {
        let finished = report
            .started_at
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond() as f64 / 1000.0 + report.duration_seconds)
            .unwrap_or_else(|_| jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);

        self.node_info.reset();
        self.node_info
            .with_label_values(&[report.node.kernel.as_str(), report.node.selinux.mode.as_str()])
            .set(1);

        let mut seen = self.runtime_info_seen.lock().unwrap_or_else(|e| e.into_inner());
        for h in &report.handlers {
            let handler = h.handler.as_str();
            for c in &h.checks {
                let labels = [handler, c.check.as_str()];
                let value = match c.result {
                    CheckOutcome::Pass | CheckOutcome::Warn => Some(1),
                    CheckOutcome::Fail | CheckOutcome::Error => Some(0),
                    CheckOutcome::Skip => None,
                };
                match value {
                    Some(v) => {
                        self.selftest_check_passed.with_label_values(&labels).set(v);
                        self.selftest_check_warning
                            .with_label_values(&labels)
                            .set(i64::from(c.result == CheckOutcome::Warn));
                    }
                    None => {
                        let _ = self.selftest_check_passed.remove_label_values(&labels);
                        let _ = self.selftest_check_warning.remove_label_values(&labels);
                    }
                }
            }
            let duration: f64 = h.checks.iter().map(|c| c.duration_seconds).sum();
            self.selftest_duration
                .with_label_values(&[handler])
                .observe(duration);
            self.selftest_last_run.with_label_values(&[handler]).set(finished);

            let info = (h.runtime.clone(), h.version.clone());
            if let Some(old) = seen.get(handler).filter(|old| **old != info) {
                let _ = self
                    .runtime_info
                    .remove_label_values(&[handler, old.0.as_str(), old.1.as_str()]);
            }
            self.runtime_info
                .with_label_values(&[handler, info.0.as_str(), info.1.as_str()])
                .set(1);
            seen.insert(handler.to_owned(), info);
        }
    }

    /// Sets the install state of a handler. Every state is exported, 1 for the current one and
    /// 0 for the others (the OpenMetrics "stateset" shape), so an alert on
    /// `{state="failed"} == 1` resolves as soon as the state changes instead of waiting for
    /// the old series to go stale.
    pub fn set_install_state(&self, handler: &str, state: InstallState) {
        for s in InstallState::ALL {
            self.runtime_install_state
                .with_label_values(&[handler, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Drops a handler's install-state series once nothing is installed for it, so a
    /// dashboard does not keep showing a runtime that is gone.
    pub fn remove_install_state(&self, handler: &str) {
        for s in InstallState::ALL {
            let _ = self
                .runtime_install_state
                .remove_label_values(&[handler, s.as_str()]);
        }
    }

    /// Counts one restart/reload of the container runtime (`containerd`, `crio`).
    pub fn inc_runtime_restart(&self, runtime: &str, result: RestartResult) {
        self.container_runtime_restarts
            .with_label_values(&[runtime, result.as_str()])
            .inc();
    }

    /// Current value of a failure counter, 0 when the series does not exist (tests and
    /// diagnostics; reading never creates a series).
    pub fn pod_failures(&self, handler: &str, reason: Reason) -> u64 {
        counter_value(&self.pod_userns_failures, &[handler, reason.as_str()])
    }

    /// Current value of a start counter, 0 when the series does not exist.
    pub fn pod_starts(&self, handler: &str) -> u64 {
        counter_value(&self.pod_userns_starts, &[handler])
    }

    /// The `runtime_handler` values of the existing pod failure and start series, sorted.
    pub fn pod_series_handlers(&self) -> Vec<String> {
        let mut out: Vec<String> = [&self.pod_userns_failures, &self.pod_userns_starts]
            .into_iter()
            .flat_map(|v| series_labels(v, "runtime_handler"))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The classic Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families, and our families are
        // built only through this module.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Label values of every existing series of `vec`, in the vector's label order.
fn series(vec: &IntCounterVec) -> Vec<(Vec<(String, String)>, u64)> {
    use prometheus::core::Collector;
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            (labels, m.get_counter().get_value() as u64)
        })
        .collect()
}

fn series_labels(vec: &IntCounterVec, name: &str) -> Vec<String> {
    series(vec)
        .into_iter()
        .filter_map(|(labels, _)| labels.into_iter().find(|(n, _)| n == name).map(|(_, v)| v))
        .collect()
}

/// The value of the series whose label values are `values` (in the vector's label order),
/// without creating it.
fn counter_value(vec: &IntCounterVec, values: &[&str]) -> u64 {
    use prometheus::core::Collector;
    let names: Vec<String> = vec.desc()[0].variable_labels.clone();
    series(vec)
        .into_iter()
        .find(|(labels, _)| {
            names
                .iter()
                .zip(values)
                .all(|(n, v)| labels.iter().any(|(ln, lv)| ln == n && lv == v))
        })
        .map_or(0, |(_, v)| v)
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample, sample_report};

    #[test]
    fn selftest_report_feeds_check_duration_timestamp_runtime_and_node_info() {
        let m = Metrics::new("node-a").unwrap();
        m.observe_selftest(&sample_report());
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_check_passed",
                &[
                    ("check", "userns-joined"),
                    ("node", "node-a"),
                    ("runtime_handler", "runc")
                ]
            )
            .as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_check_passed",
                &[
                    ("check", "userns-joined"),
                    ("node", "node-a"),
                    ("runtime_handler", "crun")
                ]
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_check_passed",
                &[
                    ("check", "features"),
                    ("node", "node-a"),
                    ("runtime_handler", "runc")
                ]
            )
            .as_deref(),
            Some("0"),
            "Error reads as not passed"
        );
        assert!(
            !text.contains(r#"check="idmap-mount""#),
            "skipped checks export no series:\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_duration_seconds_sum",
                &[("node", "node-a"), ("runtime_handler", "runc")]
            )
            .as_deref(),
            Some("1.25")
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_last_run_timestamp_seconds",
                &[("node", "node-a"), ("runtime_handler", "crun")]
            ),
            Some("1795921202".into()),
            "2026-11-29T03:00:00Z + 2 s"
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_node_info",
                &[
                    ("kernel", "6.1.0-28-amd64"),
                    ("node", "node-a"),
                    ("selinux_mode", "enforcing")
                ]
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_runtime_info",
                &[
                    ("node", "node-a"),
                    ("runtime", "runc"),
                    ("runtime_handler", "runc"),
                    ("version", "1.1.5")
                ]
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_build_info",
                &[("node", "node-a"), ("version", env!("CARGO_PKG_VERSION"))]
            )
            .as_deref(),
            Some("1")
        );
        // Pod failure series are the failure watches' (for the node's CRI handlers), not the
        // self-test's: a SelfTest may name a handler the node does not have.
        assert!(!text.contains("usernsguard_pod_userns_failures_total{"), "{text}");
        assert!(m.pod_series_handlers().is_empty());
    }

    #[test]
    fn registered_handlers_get_zero_series_of_userns_reasons_and_removal_drops_them_all() {
        let m = Metrics::new("n").unwrap();
        m.register_handler("runc");
        m.register_handler("crun");
        m.add_pod_failures("crun", Reason::MqueueSetxattr, 2);
        m.inc_pod_start("crun");
        let text = m.render();
        let labels = [
            ("node", "n"),
            ("reason", "idmap_unsupported"),
            ("runtime_handler", "runc"),
        ];
        let got = sample(&text, "usernsguard_pod_userns_failures_total", &labels);
        assert_eq!(got.as_deref(), Some("0"));
        assert!(!text.contains(r#"reason="unrelated""#));
        let zero_series = text
            .lines()
            .filter(|l| l.starts_with("usernsguard_pod_userns_failures_total{") && l.contains("\"runc\""))
            .count();
        let userns_reasons = Reason::ALL.iter().filter(|r| r.is_userns()).count();
        assert_eq!(zero_series, userns_reasons);
        assert_eq!(m.pod_series_handlers(), ["crun", "runc"]);

        m.remove_handler("crun");
        assert_eq!(m.pod_series_handlers(), ["runc"]);
        assert_eq!(m.pod_failures("crun", Reason::MqueueSetxattr), 0);
        assert_eq!(m.pod_series_handlers(), ["runc"], "reading creates no series");
        assert!(!m.render().contains(r#"runtime_handler="crun""#));
    }

    #[test]
    fn runtime_upgrade_replaces_the_info_series_and_skip_removes_a_stale_check() {
        let m = Metrics::new("n").unwrap();
        let mut r = sample_report();
        m.observe_selftest(&r);
        r.handlers[1].version = "1.2.1".into();
        r.handlers[0].checks[1].result = CheckOutcome::Skip;
        r.node.kernel = "6.12.0".into();
        m.observe_selftest(&r);
        let text = m.render();
        assert!(!text.contains(r#"version="1.1.5""#), "{text}");
        assert!(text.contains(r#"version="1.2.1""#));
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_check_passed",
                &[
                    ("check", "userns-joined"),
                    ("node", "n"),
                    ("runtime_handler", "crun")
                ]
            ),
            None
        );
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_check_passed",
                &[
                    ("check", "userns-created"),
                    ("node", "n"),
                    ("runtime_handler", "crun")
                ]
            )
            .as_deref(),
            Some("1")
        );
        assert!(!text.contains("6.1.0-28-amd64"), "old node_info series removed");
        assert_eq!(
            sample(
                &text,
                "usernsguard_selftest_duration_seconds_count",
                &[("node", "n"), ("runtime_handler", "runc")]
            )
            .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn install_state_exports_every_state_with_exactly_one_set() {
        let m = Metrics::new("n").unwrap();
        m.set_install_state("crun", InstallState::Pending);
        m.set_install_state("crun", InstallState::Installed);
        let text = m.render();
        for (state, want) in [("installed", "1"), ("pending", "0"), ("failed", "0")] {
            let labels = [("node", "n"), ("runtime_handler", "crun"), ("state", state)];
            let got = sample(&text, "usernsguard_runtime_install_state", &labels);
            assert_eq!(got.as_deref(), Some(want), "{state}");
        }
        m.set_install_state("runc", InstallState::Failed);
        m.remove_install_state("crun");
        let text = m.render();
        let crun = [("node", "n"), ("runtime_handler", "crun"), ("state", "installed")];
        assert_eq!(sample(&text, "usernsguard_runtime_install_state", &crun), None);
        let runc = [("node", "n"), ("runtime_handler", "runc"), ("state", "failed")];
        assert_eq!(
            sample(&text, "usernsguard_runtime_install_state", &runc).as_deref(),
            Some("1")
        );
    }

    #[test]
    fn failures_ignore_unrelated_and_zero_deltas_restarts_count_by_result() {
        let m = Metrics::new("n").unwrap();
        m.add_pod_failures("runc", Reason::Unrelated, 3);
        m.add_pod_failures("runc", Reason::MqueueSetxattr, 0);
        m.add_pod_failures("runc", Reason::MqueueSetxattr, 4);
        m.inc_runtime_restart("containerd", RestartResult::Success);
        m.inc_runtime_restart("containerd", RestartResult::Failure);
        m.inc_runtime_restart("containerd", RestartResult::Success);
        assert_eq!(m.pod_failures("runc", Reason::MqueueSetxattr), 4);
        let text = m.render();
        assert!(!text.contains("unrelated"));
        let labels = [("node", "n"), ("result", "success"), ("runtime", "containerd")];
        let got = sample(&text, "usernsguard_container_runtime_restarts_total", &labels);
        assert_eq!(got.as_deref(), Some("2"));
    }

    #[test]
    fn every_metric_of_the_design_is_exported_once_it_has_a_series() {
        let m = Metrics::new("n").unwrap();
        m.observe_selftest(&sample_report());
        m.set_install_state("crun", InstallState::Installed);
        m.inc_runtime_restart("containerd", RestartResult::Success);
        m.inc_pod_start("crun");
        m.register_handler("runc");
        let text = m.render();
        let mut exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        exported.sort();
        let mut names = METRIC_NAMES.to_vec();
        names.sort();
        assert_eq!(exported, names);
    }
}
