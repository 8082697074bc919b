//! `usernsguard agent`: the DaemonSet process. Wires the node reconciler and the failure
//! watches ([`crate::node::run`]) to an API client, the metrics registry and the HTTP port.

use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::watch;
use usernsguard_runtime::host::HostRoot;

use crate::http::{self, serve_while};
use crate::metrics::Metrics;
use crate::node::engine::EngineRunner;
use crate::node::handlers::{discover_on, NodeHandlers};
use crate::node::installer::{self, HostInstaller};
use crate::node::installs::{Installs, InstallsConfig};
use crate::node::reconciler::{Agent, AgentConfig};
use crate::node::watch::WatchConfig;

/// `usernsguard agent` options.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = http::DEFAULT_ADDR)]
    pub listen: std::net::SocketAddr,
    /// Where this container sees the host's root filesystem (the chart mounts / at /host).
    /// The CRI configuration, runtime binaries, node facts, probe state, sockets and
    /// installs are all the host's, under it.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub host_root: std::path::PathBuf,
    /// Directory for probe bundles and runtime state, a path on the host (a local
    /// filesystem; emptied after each run).
    #[arg(long, default_value = "/run/usernsguard", value_name = "DIR")]
    pub work_dir: std::path::PathBuf,
    /// The CRI runtime's socket, a path on the host. Default: the one the node's containerd
    /// or CRI-O configuration implies.
    #[arg(long, value_name = "SOCK")]
    pub cri_socket: Option<std::path::PathBuf>,
    /// This agent's own image reference (it is on the node, since the agent runs from it):
    /// the cri-pod check runs the probe payload from it. Without it cri-pod is skipped.
    #[arg(long, env = "USERNSGUARD_PROBE_IMAGE", value_name = "REF")]
    pub probe_image: Option<String>,
    /// Watch the kubelet's FailedCreatePodSandBox events (cluster-wide: the API server cannot
    /// select events by node) to count pod sandbox failures. With false only container
    /// failures from the node's pods' status and pod starts are counted: sandbox failures
    /// (runc's mqueue failure among them) never reach a pod's status and go uncounted.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub watch_events: bool,
    /// The agent's namespace (downward API `metadata.namespace`): where the RuntimeProfiles'
    /// restart-budget Leases live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "usernsguard-system")]
    pub namespace: String,
    /// Where this image keeps the runtimes a `Bundled` RuntimeProfile installs, one file per
    /// runtime (`runc`, `crun`).
    #[arg(long, default_value = installer::BUNDLED_DIR, value_name = "DIR")]
    pub bundled_runtimes: std::path::PathBuf,
}

/// `usernsguard agent`: in-cluster config or KUBECONFIG, then [`crate::node::run`] and the HTTP
/// endpoint until SIGTERM.
pub async fn main(args: AgentArgs) -> anyhow::Result<()> {
    crate::telemetry::init_tracing();
    let metrics = Metrics::new(&args.node_name)?;
    let listener = http::bind(args.listen).await?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration: expected the in-cluster service account or KUBECONFIG")?;
    let (ready, ready_rx) = watch::channel(false);
    let host = host_root(&args)?;
    let node_handlers = NodeHandlers::new();
    let mut engine = engine(&args, host.clone())?;
    engine.node_handlers = Some(node_handlers.clone());
    let mut installer = HostInstaller::new(host.clone());
    installer.bundled_dir = args.bundled_runtimes.clone();
    let installs = Installs::new(
        client.clone(),
        InstallsConfig {
            cri_socket: args.cri_socket.clone(),
            ..InstallsConfig::new(&args.node_name, &args.namespace)
        },
        Arc::new(installer),
    )
    .with_metrics(metrics.clone());
    let agent = Agent::new(client, AgentConfig::new(&args.node_name), Arc::new(engine))
        .with_metrics(metrics.clone())
        .with_installs(installs);
    let mut watches = WatchConfig::new(
        &args.node_name,
        Arc::new(usernsguard_runtime::classify::classify),
        node_handlers,
    );
    watches.watch_events = args.watch_events;
    tracing::info!(node = %args.node_name, listen = %args.listen, "agent starting");
    let work = crate::node::run(agent, watches, discover_on(host), metrics.clone(), ready);
    serve_while(listener, metrics, ready_rx, work, http::shutdown_signal()).await
}

/// The host at `--host-root`.
fn host_root(args: &AgentArgs) -> anyhow::Result<HostRoot> {
    Ok(if args.host_root == std::path::Path::new("/") {
        HostRoot::own()
    } else {
        HostRoot::at(&args.host_root)?
    })
}

/// The self-test engine acting on `host`.
fn engine(args: &AgentArgs, host: HostRoot) -> anyhow::Result<EngineRunner> {
    let mut engine = EngineRunner::new(args.work_dir.clone(), host)?;
    engine.cri_socket = args.cri_socket.clone();
    engine.probe_image = args.probe_image.clone();
    Ok(engine)
}
