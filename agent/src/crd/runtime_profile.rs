//! `RuntimeProfile`: which OCI runtime to install on which nodes, under which handler name
//! and CRI runtime, and the RuntimeClass usernsguard creates for it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::names::HANDLER_MAX_LEN;

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

    /// How many nodes change at once.
    #[serde(default)]
    pub rollout: Rollout,
}

impl RuntimeProfileSpec {
    /// A profile selects a node when every `nodeSelector` label matches (the agent installs
    /// by it, the controller counts by it).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
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

/// Which CRI runtime gets the handler, where its configuration is, and how it is restarted.
///
/// How the handler is added follows from what is on the node (see `usernsguard install`):
/// containerd gets a drop-in with the root config's schema version, in a directory the root
/// config imports (or with an `imports` entry added); k3s and rke2 (a `configPath` under
/// `/var/lib/rancher/`) get their `config.toml.tmpl`; CRI-O a `crio.conf.d` drop-in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.restart == 'systemd' || !has(self.unit)")
        .message("unit names the systemd unit to restart: it needs restart systemd")
)]
#[serde(rename_all = "camelCase")]
pub struct CriTarget {
    #[serde(default)]
    pub runtime: CriRuntime,
    /// Main configuration file (a path on the node). Default: the one found on the node
    /// for `runtime` (`/etc/containerd/config.toml`, k3s/rke2's rendered
    /// `/var/lib/rancher/{k3s,rke2}/agent/etc/containerd/config.toml`, `/etc/crio/crio.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"), length(max = 4096))]
    pub config_path: Option<String>,
    /// How the CRI runtime picks up the changed configuration. `systemd`: the agent
    /// restarts its unit through systemd (never SIGHUP), one budgeted node at a time (see
    /// `rollout`), and checks that the handler is live; `none`: the operator restarts it, and
    /// the node stays `pending` until the CRI runtime lists the handler.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The systemd unit to restart, when not the CRI runtime's usual one (`containerd.service`,
    /// `k3s.service`/`k3s-agent.service`, `rke2-server.service`/`rke2-agent.service`,
    /// `crio.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9:_.@\\-]+$"))]
    pub unit: Option<String>,
}

/// A CRI runtime.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CriRuntime {
    #[default]
    Containerd,
    Crio,
}

/// How the CRI runtime is restarted after its configuration changed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    #[default]
    Systemd,
    None,
}

/// How an install is rolled out across the cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// How many nodes may restart their CRI runtime for this profile at the same time
    /// (each restart briefly stops pod starts on that node). Enforced with Leases
    /// `usernsguard-restart-<profile>-<i>` in the agent's namespace.
    #[serde(default = "default_max_concurrent_restarts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent_restarts: i32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_concurrent_restarts: default_max_concurrent_restarts(),
        }
    }
}

fn default_max_concurrent_restarts() -> i32 {
    1
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
    /// Selected nodes whose agent has not reported this profile yet (no NodeReport, or no
    /// entry for the current generation).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub not_reported: i32,
}

fn default_true() -> bool {
    true
}
