//! The `usernsguard.io/v1alpha1` API: `RuntimeProfile`, `SelfTest` and `NodeReport`.
//!
//! Types only. The `///` docs become the CRD descriptions that `kubectl explain` shows, and
//! the `schemars`/`x_kube` attributes become the OpenAPI and CEL validation the apiserver
//! enforces, so a bad spec is refused at `kubectl apply` instead of surfacing later as a
//! reconcile error on some node. `crds/*.yaml` is generated from here (`usernsguard crds`).
//!
//! Self-test results are not re-declared: `NodeReport.status` embeds the report types of
//! `usernsguard-runtime`, so `usernsguard selftest --output json` and the NodeReport show the
//! same shapes.

// `printcolumn(type_ = "integer", ...)` repeated for several columns is what kube's derive
// expects; clippy reads the repeated `key = value` pairs as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use usernsguard_runtime::report::{Check, ClaimedFeatures, HandlerReport};
use usernsguard_runtime::NodeFacts;

/// Handler names end up in node label keys (`usernsguard.io/runtime.<handler>` is the longer
/// one): a label name is at most 63 characters, `runtime.` takes 8 of them.
pub const HANDLER_MAX_LEN: usize = 55;
/// A label-name suffix: what a handler may be called so that its node labels are valid.
pub const HANDLER_PATTERN: &str = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$";

/// Default per-probe timeout; a probe container normally finishes in well under a second,
/// the margin is for loaded nodes and cold page caches.
pub const DEFAULT_PROBE_TIMEOUT_SECONDS: i32 = 30;

fn default_probe_timeout_seconds() -> i32 {
    DEFAULT_PROBE_TIMEOUT_SECONDS
}

fn default_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// SelfTest
// ---------------------------------------------------------------------------------------------

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
        .field_path(".interval")
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
    /// other checks' observations, so it is only meaningful together with at least one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(
        validation = Rule::new("self.size() == 0 || self.exists(c, c != 'features')")
            .message("the features check compares the other checks' observations: select at least one of userns-created, userns-joined, idmap-mount with it")
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

/// How many selected nodes are in which state. `passed + failed + pending <= total`; the
/// remainder has a result whose verdict is `unknown` (probe errors).
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
}

/// Node counts for one runtime handler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerNodeCounts {
    pub handler: String,
    #[serde(flatten)]
    pub counts: NodeCounts,
}

// ---------------------------------------------------------------------------------------------
// NodeReport
// ---------------------------------------------------------------------------------------------

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
    /// Version of the installed runtime binary, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What happened, including the error text on failure.
    #[serde(default)]
    pub message: String,
    /// Whether the CRI runtime had to be restarted or reloaded for this install.
    #[serde(default)]
    pub cri_restarted: bool,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Install state of a runtime handler on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstallState {
    Installed,
    Pending,
    Failed,
}

// ---------------------------------------------------------------------------------------------
// RuntimeProfile
// ---------------------------------------------------------------------------------------------

/// Which OCI runtime to install on which nodes, under which handler name and CRI runtime, and
/// the RuntimeClass usernsguard creates for it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "usernsguard.io",
    version = "v1alpha1",
    kind = "RuntimeProfile",
    plural = "runtimeprofiles",
    shortname = "rtp",
    category = "usernsguard",
    status = "RuntimeProfileStatus",
    derive = "PartialEq",
    doc = "An OCI runtime to install and register as a runtime handler, with its RuntimeClass.",
    printcolumn(name = "Runtime", type_ = "string", json_path = ".spec.runtime"),
    printcolumn(name = "Handler", type_ = "string", json_path = ".spec.handler"),
    printcolumn(name = "CRI", type_ = "string", json_path = ".spec.cri.runtime"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes.total"),
    printcolumn(name = "Installed", type_ = "integer", json_path = ".status.nodes.installed"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.nodes.failed"),
    printcolumn(
        name = "RuntimeClass",
        type_ = "string",
        json_path = ".status.runtimeClassName",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeProfileSpec {
    /// The OCI runtime implementation the binary is.
    pub runtime: OciRuntime,

    /// The runtime handler name registered with the CRI runtime, and the RuntimeClass
    /// `handler`: a DNS label, at most 55 characters so the node labels stay valid.
    #[schemars(length(min = 1, max = HANDLER_MAX_LEN), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("handler is immutable: create a new RuntimeProfile instead"))]
    pub handler: String,

    /// Where the runtime binary comes from and where it is placed on the node.
    pub binary: BinarySource,

    /// The CRI runtime to register the handler with, and how its configuration is edited.
    #[serde(default)]
    pub cri: CriTarget,

    /// Labels a node must carry to get this runtime (like a Pod's `nodeSelector`). Empty
    /// selects every node that runs the agent. Also copied into the RuntimeClass's
    /// `scheduling.nodeSelector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// The RuntimeClass usernsguard creates for the handler.
    #[serde(default)]
    pub runtime_class: RuntimeClassOptions,
}

/// The OCI runtimes usernsguard knows how to install and probe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OciRuntime {
    Runc,
    Crun,
}

/// Where the runtime binary comes from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BinarySourceKind {
    /// Copied from the agent's own image, which ships tested runc and crun builds.
    #[default]
    Bundled,
    /// Downloaded from `url` and verified against `sha256`.
    Url,
    /// Already present at `path` on the node (installed by the OS image or another tool);
    /// usernsguard only registers it.
    Host,
}

/// The runtime binary's origin and its place on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.source == 'Url' ? (has(self.url) && has(self.sha256)) : (!has(self.url) && !has(self.sha256))")
        .message("url and sha256 are required with source Url and not allowed otherwise")
)]
#[serde(rename_all = "camelCase")]
pub struct BinarySource {
    #[serde(default)]
    pub source: BinarySourceKind,
    /// HTTPS download location (source `Url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https://"), length(max = 2048))]
    pub url: Option<String>,
    /// Lower-case hex SHA-256 of the downloaded file (source `Url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Absolute path of the binary on the node's root filesystem: where it is placed
    /// (`Bundled`, `Url`) or found (`Host`). This is what the CRI handler's `BinaryName` /
    /// `runtime_path` points at.
    #[schemars(regex(pattern = r"^/[^\x00]*$"), length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..') && !self.endsWith('/')").message("path must be a clean absolute file path"))]
    pub path: String,
}

/// Which CRI runtime gets the handler and how its configuration is changed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.runtime == 'crio' ? self.configStyle in ['auto', 'drop-in'] : true")
        .message("CRI-O is only configured through a crio.conf.d drop-in: configStyle must be auto or drop-in")
)]
#[serde(rename_all = "camelCase")]
pub struct CriTarget {
    #[serde(default)]
    pub runtime: CriRuntime,
    #[serde(default)]
    pub config_style: ConfigStyle,
    /// Main configuration file, when not at the CRI runtime's default location
    /// (`/etc/containerd/config.toml`, `/etc/crio/crio.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"), length(max = 4096))]
    pub config_path: Option<String>,
}

/// A CRI runtime.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CriRuntime {
    #[default]
    Containerd,
    Crio,
}

/// How the handler is added to the CRI runtime's configuration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigStyle {
    /// Detected on the node: k3s/rke2 templates when present, otherwise a drop-in if the main
    /// config imports its directory, otherwise an `imports` entry is added.
    #[default]
    Auto,
    /// A file in the directory the main config already imports (containerd `conf.d`,
    /// CRI-O `crio.conf.d`); the main config is not touched.
    DropIn,
    /// containerd: write a drop-in and add it to the main config's `imports` list.
    Imports,
    /// k3s: extend `config.toml.tmpl` (or `config-v3.toml.tmpl`) next to the generated config.
    K3sTemplate,
    /// rke2: like k3s, under rke2's agent directory.
    Rke2Template,
}

/// The RuntimeClass owned by a RuntimeProfile.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeClassOptions {
    /// Whether to create the RuntimeClass at all.
    #[serde(default = "default_true")]
    pub create: bool,
    /// RuntimeClass name; defaults to the handler name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: Option<String>,
    /// Add `usernsguard.io/userns.<handler>: pass` to the RuntimeClass's
    /// `scheduling.nodeSelector`, so pods using it land only on nodes whose self-test passed
    /// for this handler. `usernsguard.io/runtime.<handler>: installed` is always added.
    #[serde(default = "default_true")]
    pub require_self_test_pass: bool,
    /// RuntimeClass `overhead.podFixed`: resources a pod using this runtime costs on top of
    /// its containers' requests, as quantities (`cpu: 10m`, `memory: 20Mi`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(inner(regex(pattern = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")), extend("maxProperties" = 3))]
    #[x_kube(validation = Rule::new("self.all(k, k in ['cpu', 'memory', 'ephemeral-storage'])").message("overhead keys must be cpu, memory or ephemeral-storage"))]
    pub overhead: BTreeMap<String, String>,
}

impl Default for RuntimeClassOptions {
    fn default() -> Self {
        RuntimeClassOptions {
            create: true,
            name: None,
            require_self_test_pass: true,
            overhead: BTreeMap::new(),
        }
    }
}

/// Roll-up of the install states in the selected nodes' NodeReports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeProfileStatus {
    /// The `metadata.generation` the counts below were computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: installed on every selected node. `Degraded`: failed on at least one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<InstallCounts>,
    /// Name of the RuntimeClass created for the handler, once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

/// How many selected nodes are in which install state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallCounts {
    #[schemars(range(min = 0))]
    pub total: i32,
    #[schemars(range(min = 0))]
    pub installed: i32,
    #[schemars(range(min = 0))]
    pub pending: i32,
    #[schemars(range(min = 0))]
    pub failed: i32,
}
