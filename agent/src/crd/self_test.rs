//! `SelfTest`: which nodes and runtime handlers to probe, with which checks, how often; and
//! the status the controller aggregates from the nodes' reports.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use usernsguard_runtime::report::Check;

use super::names::{HANDLER_MAX_LEN, HANDLER_PATTERN};

/// Default per-probe timeout; a probe container normally finishes in well under a second,
/// the margin is for loaded nodes and cold page caches.
pub const DEFAULT_PROBE_TIMEOUT_SECONDS: i32 = 30;

fn default_probe_timeout_seconds() -> i32 {
    DEFAULT_PROBE_TIMEOUT_SECONDS
}

/// Which nodes and runtime handlers to probe, with which checks, how often. Each selected
/// node's agent runs the probes and writes the results into its NodeReport; the controller
/// aggregates those into this SelfTest's status.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "usernsguard.io",
    version = "v1alpha1",
    kind = "SelfTest",
    plural = "selftests",
    shortname = "st",
    category = "usernsguard",
    status = "SelfTestStatus",
    derive = "PartialEq",
    doc = "Runs the usernsguard user-namespace probes on the selected nodes and runtime handlers.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes.total",
        description = "Nodes selected"
    ),
    printcolumn(
        name = "Passed",
        type_ = "integer",
        json_path = ".status.nodes.passed",
        description = "Nodes where every selected handler passed"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.nodes.failed",
        description = "Nodes where at least one selected handler failed"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.nodes.pending",
        description = "Nodes without a result for the current generation yet"
    ),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRunTime"),
    printcolumn(
        name = "Handlers",
        type_ = "string",
        json_path = ".spec.runtimeHandlers",
        priority = 1,
        description = "Selected runtime handlers (empty: all the node registers)"
    ),
    printcolumn(
        name = "Interval",
        type_ = "string",
        json_path = ".spec.interval",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!has(self.interval) || duration(self.interval) > duration(string(self.probeTimeoutSeconds) + 's')")
        .message("interval must be longer than probeTimeoutSeconds")
        .field_path(".interval"),
    validation = Rule::new("!self.publishNodeLabels || !has(self.checks) || size(self.checks) == 0 || size(self.checks) == 6")
        .message("node labels are verdicts, and a verdict needs every check: leave checks empty or set publishNodeLabels: false")
        .field_path(".checks")
)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestSpec {
    /// Labels a node must carry to be tested (like a Pod's `nodeSelector`). Empty selects
    /// every node that runs the agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Runtime handlers to probe, by the name the CRI runtime registers them under
    /// (containerd `runtimes.<handler>`, CRI-O `runtimes.<handler>`). Empty: every handler
    /// the node's containerd or CRI-O configuration registers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = HANDLER_MAX_LEN), regex(pattern = HANDLER_PATTERN)))]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "set"))]
    pub runtime_handlers: Vec<String>,

    /// Checks to run. Empty: all of them. `features` compares the runtime's claims with the
    /// probes' observations, so it is only meaningful together with at least one probe
    /// (`userns-created`, `userns-joined`, `idmap-mount`). A subset of the checks is no
    /// verdict, so it needs `publishNodeLabels: false`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(
        validation = Rule::new("!('features' in self) || self.exists(c, c in ['userns-created', 'userns-joined', 'idmap-mount'])")
            .message("the features check compares the probes' observations: select at least one of userns-created, userns-joined, idmap-mount with it")
    )]
    pub checks: Vec<Check>,

    /// How often to re-run, as a Go duration (`30m`, `6h`, `1h30m`); at least one minute.
    /// Unset: once per spec generation and whenever the agent starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"), length(max = 32))]
    #[x_kube(
        validation = Rule::new("duration(self) >= duration('1m')")
            .message("interval must be at least 1m")
    )]
    pub interval: Option<String>,

    /// Time limit for one probe container, after which its whole process tree is killed and
    /// the check ends as `Error` with reason `timeout`.
    #[serde(default = "default_probe_timeout_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub probe_timeout_seconds: i32,

    /// Whether the agent sets the `usernsguard.io/userns.<handler>` = `pass` | `fail` |
    /// `unknown` node labels from this SelfTest's results (what a RuntimeClass schedules on).
    /// Only a SelfTest that runs every check can publish them.
    #[serde(default = "default_true")]
    pub publish_node_labels: bool,
}

/// The same values an empty `spec: {}` gets from the schema defaults.
impl Default for SelfTestSpec {
    fn default() -> Self {
        SelfTestSpec {
            node_selector: BTreeMap::new(),
            runtime_handlers: Vec::new(),
            checks: Vec::new(),
            interval: None,
            probe_timeout_seconds: DEFAULT_PROBE_TIMEOUT_SECONDS,
            publish_node_labels: true,
        }
    }
}

/// Aggregate of the NodeReports of the nodes this SelfTest selects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestStatus {
    /// The `metadata.generation` the counts below were computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: every selected node reported a result for the observed generation.
    /// `Degraded`: at least one node failed or could not run the probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Node counts over all selected handlers: a node passes when every handler passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,

    /// Node counts per runtime handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["handler"]))]
    pub handlers: Vec<HandlerNodeCounts>,

    /// Start of the most recent run on any selected node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_time: Option<Time>,
}

/// How many selected nodes are in which state. `passed + failed + pending + notReported <=
/// total`; the remainder has a result whose verdict is `unknown` (probe errors).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    #[schemars(range(min = 0))]
    pub total: i32,
    #[schemars(range(min = 0))]
    pub passed: i32,
    #[schemars(range(min = 0))]
    pub failed: i32,
    /// Selected nodes without a result for the observed generation yet.
    #[schemars(range(min = 0))]
    pub pending: i32,
    /// Selected nodes with no result at all for this SelfTest: no agent runs there, or it
    /// found nothing it can probe (the node's NodeReport `problems` say why).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub not_reported: i32,
}

/// Node counts for one runtime handler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerNodeCounts {
    pub handler: String,
    #[serde(flatten)]
    pub counts: NodeCounts,
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

impl SelfTestSpec {
    /// A SelfTest selects a node when every `nodeSelector` label matches.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether this SelfTest probes `handler` (no list: every handler the node registers).
    pub fn covers(&self, handler: &str) -> bool {
        self.runtime_handlers.is_empty() || self.runtime_handlers.iter().any(|h| h == handler)
    }

    /// Whether this SelfTest's results may set the node's verdict labels: it asks for them
    /// and runs every check (a verdict from some of the checks could pass a broken runc).
    pub fn decides_labels(&self) -> bool {
        self.publish_node_labels
            && (self.checks.is_empty() || Check::ALL.iter().all(|c| self.checks.contains(c)))
    }
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_and_reject_garbage() {
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("1d"), None);
        assert_eq!(parse_go_duration(""), None);
    }
}
