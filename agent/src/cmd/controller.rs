//! `usernsguard controller`: the Deployment process. Wires leader election around
//! [`crate::controller::run`] to an API client, the metrics registry and the HTTP port.
//! With `--uninstall-all` it is the chart's pre-delete hook instead
//! ([`crate::controller::uninstall`]).

use anyhow::Context as _;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::controller::leader::{run_elected, LeaseLock, LeaseTiming};
use crate::http::{self, serve_while};
use crate::metrics::Metrics;

/// `usernsguard controller` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Namespace of the leader-election Lease: the controller's own (downward API
    /// `metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "usernsguard-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "usernsguard-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (downward API `metadata.name`); default: the
    /// host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = http::DEFAULT_ADDR)]
    pub listen: std::net::SocketAddr,
    /// Instead of running the controllers: delete every RuntimeProfile, wait until every
    /// node's agent has uninstalled its runtime, and exit (0: all gone; 1: the time ran out,
    /// the nodes still holding an install are printed). The chart's pre-delete hook.
    #[arg(long)]
    pub uninstall_all: bool,
    /// How long `--uninstall-all` waits for the nodes.
    #[arg(long, default_value = "10m", value_parser = crate::cmd::selftest::parse_duration, value_name = "DURATION", requires = "uninstall_all")]
    pub timeout: std::time::Duration,
}

/// `usernsguard controller`: in-cluster config or KUBECONFIG, then [`main_loop`] forever.
pub async fn main(args: ControllerArgs) -> anyhow::Result<()> {
    crate::telemetry::init_tracing();
    if args.uninstall_all {
        return uninstall_all(args.timeout).await;
    }
    // The `node` label of the controller's own series (build info) is its identity.
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let metrics = Metrics::new(&identity)?;
    let listener = http::bind(args.listen).await?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration: expected the in-cluster service account or KUBECONFIG")?;
    let (ready, ready_rx) = watch::channel(false);
    let args = ControllerArgs {
        identity: Some(identity),
        ..args
    };
    let work = main_loop(client, args, ready);
    serve_while(listener, metrics, ready_rx, work, http::shutdown_signal()).await
}

/// The controller process: leader election around [`crate::controller::run`]. `ready` latches once the Lease
/// could be read. Never returns.
pub async fn main_loop(client: Client, args: ControllerArgs, ready: watch::Sender<bool>) {
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let lock = LeaseLock::new(
        Api::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        LeaseTiming::default(),
    );
    let (leading, _) = watch::channel(false);
    run_elected(lock, leading, ready, move || {
        crate::controller::run(client.clone())
    })
    .await;
}

/// `--uninstall-all`: what is left when the time runs out is the error, node by node.
async fn uninstall_all(timeout: std::time::Duration) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration: expected the in-cluster service account or KUBECONFIG")?;
    let remaining =
        crate::controller::uninstall::uninstall_all(&client, timeout, std::time::Duration::from_secs(5))
            .await?;
    if remaining.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "after {}, RuntimeProfiles are still installed on some nodes:",
        humantime::format_duration(timeout)
    );
    for r in &remaining {
        msg.push_str(&format!("\n  {}:", r.profile));
        for n in &r.nodes {
            msg.push_str(&format!("\n    {n}"));
        }
    }
    msg.push_str(
        "\nfix those nodes (their NodeReport's status.installs and Events say why) and run `helm uninstall` \
         again, or leave the runtimes in place: `kubectl patch rtp NAME --type=json \
         -p '[{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}]'` then `helm uninstall --no-hooks`",
    );
    anyhow::bail!(msg)
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn survives_an_unreachable_api_server_serving_healthz_but_not_readyz() {
        let args = ControllerArgs {
            lease_namespace: "usernsguard-system".into(),
            lease_name: "usernsguard-controller".into(),
            identity: Some("replica-a".into()),
            listen: "127.0.0.1:0".parse().unwrap(),
            uninstall_all: false,
            timeout: Duration::from_secs(600),
        };
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(main_loop(crate::testing::unreachable_client(), args, tx));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !task.is_finished(),
            "the controller loop ended (crashed or returned)"
        );
        assert!(!*rx.borrow(), "ready without ever reaching the API server");
        task.abort();
    }
}
