//! `usernsguard agent`: the DaemonSet process. Wires the node reconciler and the failure
//! watches ([`crate::node::run`]) to an API client, the metrics registry and the HTTP port.

use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::watch;

use crate::http::{self, serve_while};
use crate::metrics::Metrics;
use crate::node::engine::EngineRunner;
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
    /// Directory for probe bundles and runtime state (a local filesystem; emptied after each run).
    #[arg(long, default_value = "/run/usernsguard", value_name = "DIR")]
    pub work_dir: std::path::PathBuf,
    /// The host's /etc, where the containerd or CRI-O configuration naming the runtime handlers is read.
    #[arg(long, default_value = "/etc", value_name = "DIR")]
    pub host_etc: std::path::PathBuf,
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
    let agent = Agent::new(
        client,
        AgentConfig::new(&args.node_name),
        Arc::new(EngineRunner::new(args.work_dir.clone(), args.host_etc.clone())?),
    )
    .with_metrics(metrics.clone());
    let watches = WatchConfig::new(&args.node_name, Arc::new(usernsguard_runtime::classify::classify));
    tracing::info!(node = %args.node_name, listen = %args.listen, "agent starting");
    let work = crate::node::run(agent, watches, metrics.clone(), ready);
    serve_while(listener, metrics, ready_rx, work, http::shutdown_signal()).await
}
