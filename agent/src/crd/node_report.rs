//! `NodeReport`: one per node, written only by that node's agent: its facts, its runtimes,
//! the latest self-test results and the runtime installs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use usernsguard_runtime::report::{ClaimedFeatures, HandlerReport};
use usernsguard_runtime::NodeFacts;

use super::names::InstallState;
use super::runtime_profile::CriRuntime;

/// Identifies the node. A NodeReport (what usernsguard knows about one node: its facts, its
/// runtimes, the latest self-test results and the runtime installs) is named after the node
/// and has an owner reference to it, so it is garbage-collected with the Node. Written only
/// by that node's agent.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "usernsguard.io",
    version = "v1alpha1",
    kind = "NodeReport",
    plural = "nodereports",
    shortname = "nr",
    category = "usernsguard",
    status = "NodeReportStatus",
    derive = "PartialEq",
    doc = "Per-node user-namespace facts, runtimes, self-test results and runtime install state.",
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a NodeReport is named after its node: metadata.name must equal spec.nodeName"),
    printcolumn(name = "Kernel", type_ = "string", json_path = ".status.node.kernel"),
    printcolumn(name = "SELinux", type_ = "string", json_path = ".status.node.selinux.mode"),
    printcolumn(
        name = "Verdicts",
        type_ = "string",
        json_path = ".status.summary",
        description = "handler=verdict for each handler's latest result"
    ),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastRunTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NodeReportSpec {
    /// The node this report describes; always equal to `metadata.name`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,
}

/// Everything the node's agent observed. Replaced as a whole by each agent write.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReportStatus {
    /// Kernel, SELinux, idmapped-mount support and the other facts results are read against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeFacts>,

    /// The CRI runtime the kubelet talks to on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri: Option<CriRuntimeInfo>,

    /// The runtime handlers the CRI runtime registers, with what each runtime claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["handler"]))]
    pub runtimes: Vec<RuntimeHandlerInfo>,

    /// The latest result per SelfTest and runtime handler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["selfTest", "handler"]))]
    pub results: Vec<SelfTestResult>,

    /// Install state per RuntimeProfile that selects this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["runtimeProfile"]))]
    pub installs: Vec<RuntimeInstallStatus>,

    /// Why a SelfTest that selects this node has no results here (no CRI configuration found,
    /// no handler the probes can drive), so a silent node is told from a healthy one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["selfTest"]))]
    pub problems: Vec<SelfTestProblem>,

    /// `handler=verdict` pairs of the latest results, space separated and sorted by handler
    /// (for `kubectl get nr`; the same verdicts are the node's `usernsguard.io/userns.*` labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,

    /// Start of the most recent self-test run on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_time: Option<Time>,
}

/// Which CRI runtime serves the kubelet, and its version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CriRuntimeInfo {
    pub name: CriRuntime,
    /// As reported by the CRI `Version` call (`containerd://1.7.20` without the scheme).
    #[serde(default)]
    pub version: String,
    /// The configuration file the handlers were read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<String>,
}

/// One runtime handler registered on the node, as discovered (not as probed).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeHandlerInfo {
    /// The handler name (containerd `runtimes.<handler>`, CRI-O `runtimes.<handler>`).
    pub handler: String,
    /// The OCI runtime binary the handler executes.
    pub binary: String,
    /// `runc`, `crun`, ... as the binary names itself in `--version`; empty when unknown.
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub version: String,
    /// What the runtime's `features` subcommand claims; containerd trusts exactly this.
    #[serde(default)]
    pub features: ClaimedFeatures,
}

/// The latest result of one SelfTest for one runtime handler on this node: the self-test's
/// own handler report plus which SelfTest generation asked for it and when it ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestResult {
    /// Name of the SelfTest that asked for this run.
    pub self_test: String,
    /// The SelfTest's `metadata.generation` the run was made for.
    pub generation: i64,
    /// When the run started.
    pub started_at: Time,
    /// Handler, binary, runtime version, claimed features, verdict and one entry per check
    /// with result, reason, message, remediation and duration.
    #[serde(flatten)]
    pub report: HandlerReport,
}

/// Why one SelfTest produced no result on this node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestProblem {
    /// Name of the SelfTest.
    pub self_test: String,
    /// What is wrong, for the operator.
    pub message: String,
}

/// How far installing one RuntimeProfile's runtime on this node got.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInstallStatus {
    /// Name of the RuntimeProfile.
    pub runtime_profile: String,
    /// The profile's `metadata.generation` this state is for.
    pub generation: i64,
    /// The handler the profile registers.
    pub handler: String,
    /// Also the value of the `usernsguard.io/runtime.<handler>` node label.
    pub state: InstallState,
    /// Why it is pending or failed, as a short code (`waiting_for_restart_slot`,
    /// `restart_pending`, `sha256_mismatch`, `rolled_back`, ...): what alerts and dashboards
    /// group by; `message` has the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Version of the installed runtime binary, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The CRI runtime configuration file the handler is registered through (a path on the
    /// node); an uninstall after the profile is gone uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri_config: Option<String>,
    /// What happened, including the error text on failure.
    #[serde(default)]
    pub message: String,
    /// Whether the CRI runtime had to be restarted for this install.
    #[serde(default)]
    pub cri_restarted: bool,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl NodeReport {
    /// This node's entry for the RuntimeProfile `profile`, if its agent holds an install of it.
    pub fn install_of(&self, profile: &str) -> Option<&RuntimeInstallStatus> {
        self.status
            .as_ref()?
            .installs
            .iter()
            .find(|i| i.runtime_profile == profile)
    }
}
