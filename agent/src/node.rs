//! Everything the agent does for its own node: the reconciler that runs the self-tests and
//! publishes their results ([`reconciler`]), the runner trait it calls ([`runner`]) and the
//! engine that implements it with real probes ([`engine`]); the RuntimeProfile installs
//! ([`installs`]) through the host installer ([`installer`]) within the cluster-wide restart
//! budget ([`restart_budget`]); the node labels both own ([`labels`]); and the watches that
//! count the node's user-namespace pod failures ([`watch`]). [`run`] runs them together.

pub mod engine;
pub mod error;
pub mod handlers;
pub mod installer;
pub mod installs;
pub mod labels;
pub mod reconciler;
pub mod restart_budget;
pub mod runner;
pub mod watch;

use std::time::Duration;

use kube::Client;
use tokio::sync::watch as channel;

use crate::health::Health;
use crate::metrics::Metrics;
use handlers::HandlerSource;
use reconciler::Agent;
use watch::WatchConfig;

/// The whole agent minus HTTP: the SelfTest reconciler ([`reconciler::run`]), the pod/event
/// failure watches (`watch::run`), and the refresh of the node's runtime handlers from
/// `handlers` into `watches.handlers` ([`handlers::refresh`]). `ready` latches once the
/// reconciler and the watches completed their first sync. Returns only if the failure watches
/// give up (the caller exits and the kubelet restarts the pod).
pub async fn run(
    agent: Agent,
    watches: WatchConfig,
    handlers: HandlerSource,
    metrics: Metrics,
    ready: channel::Sender<bool>,
) {
    let client: Client = agent.client().clone();
    let watch_health = Health::new();
    let (reconciler_ready, mut reconciler_ready_rx) = channel::channel(false);
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
    let refresh = handlers::refresh(handlers, watches.handlers.clone(), handlers::REFRESH_PERIOD);
    tokio::select! {
        () = reconciler::run(agent, reconciler_ready) => {}
        r = watch::run(client, watches, metrics, watch_health) => {
            tracing::error!(result = ?r, "pod/event failure watches ended");
        }
        () = latch => {}
        () = refresh => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RuntimeProfile, SelfTest};
    use crate::http::serve_while;
    use crate::testing::{
        http_status, mock_client, node_meta, query_param, serve_agent_api, unreachable_client, AgentApi,
        FakeInstaller, FakeRunner, RequestLog,
    };
    use http::Method;
    use installs::{Installs, InstallsConfig};
    use reconciler::AgentConfig;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tokio::time::Instant;
    use usernsguard_runtime::Verdict;

    fn watch_config() -> (WatchConfig, HandlerSource) {
        let classify = Arc::new(usernsguard_runtime::classify::classify);
        let watches = WatchConfig::new("n1", classify, handlers::NodeHandlers::new());
        (
            watches,
            handlers::fixed(handlers::HandlerSet::of(["runc", "crun"], "runc")),
        )
    }

    /// The agent's process as `main` runs it (loop + HTTP endpoint), API server down.
    #[tokio::test]
    async fn survives_an_unreachable_api_server_serving_healthz_but_not_readyz() {
        let runner = FakeRunner::with([("runc", Verdict::Pass)]);
        let metrics = Metrics::new("n1").unwrap();
        let agent = Agent::new(unreachable_client(), AgentConfig::new("n1"), runner.clone())
            .with_metrics(metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = channel::channel(false);
        let (watches, handlers) = watch_config();
        let process = tokio::spawn(serve_while(
            listener,
            metrics.clone(),
            rx.clone(),
            run(agent, watches, handlers, metrics, tx),
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

    /// The whole agent as `usernsguard agent` runs it (SelfTest reconciler, RuntimeProfile
    /// installs, pod/event failure watches): one SelfTest (runc and crun, every 10 minutes),
    /// one RuntimeProfile already installed on the node, 110 running pods, no change for an
    /// hour: counts every request the fake API server receives.
    #[tokio::test(start_paused = true)]
    async fn an_hour_of_steady_state_costs_only_watch_renewals() {
        let runner = FakeRunner::with([("runc", Verdict::Pass), ("crun", Verdict::Pass)]);
        let (client, server) = mock_client();
        let installer = FakeInstaller::new();
        let mut profile = RuntimeProfile::test();
        profile.metadata.resource_version = Some("80".into());
        installer.state.lock().unwrap().installed.insert(
            "crun".into(),
            usernsguard_runtime::install::InstallRequest {
                handler: "crun".into(),
                binary: usernsguard_runtime::install::BinarySource::Local(
                    "/usr/local/lib/usernsguard/runtimes/crun".into(),
                ),
                install_path: Some("/usr/local/bin/crun".into()),
                sha256: None,
                cri_config: "/etc/containerd/config.toml".into(),
                restart: usernsguard_runtime::install::RestartMode::Systemd { unit: None },
                cri_socket: None,
            },
        );
        let installs = Installs::new(
            client.clone(),
            InstallsConfig::new("n1", "usernsguard"),
            installer.clone(),
        );
        let agent = Agent::new(client, AgentConfig::new("n1"), runner.clone()).with_installs(installs);
        let mut st = SelfTest::test().interval("10m");
        st.metadata.resource_version = Some("90".into());
        let node = node_meta(
            "n1",
            [
                ("usernsguard.io/userns.runc", "pass"),
                ("usernsguard.io/userns.crun", "pass"),
                ("usernsguard.io/runtime.crun", "installed"),
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
        let log: RequestLog = Arc::default();
        let api = AgentApi {
            pods,
            profiles: vec![profile],
            ..AgentApi::new(st, node)
        };
        let fake = tokio::spawn(serve_agent_api(server, log.clone(), api));
        let (tx, mut rx) = channel::channel(false);
        let (watches, handlers) = watch_config();
        let task = tokio::spawn(run(agent, watches, handlers, Metrics::new("n1").unwrap(), tx));
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
        // Seven watches (SelfTests, RuntimeProfiles, own Node, own NodeReport; RuntimeClasses,
        // own pods, sandbox failure events), each renewed when the server closes it after
        // timeoutSeconds (290 s in kube's watcher): 12 or 13 each in an hour.
        assert!(watches <= 7 * 13, "{watches} watch requests");
        assert!(
            watches >= 7 * 12,
            "{watches}: the watches were not kept open the whole hour"
        );
        // First run, then one every 10 minutes: each re-run found the same and wrote nothing.
        assert!((6..=7).contains(&runner.calls()), "{} runs", runner.calls());
        // The install was re-planned every 10 minutes (drift repair) and never applied.
        let calls = installer.state.lock().unwrap().calls.clone();
        assert!(installer.changes().is_empty(), "{calls:?}");
        assert!((6..=7).contains(&calls.len()), "{calls:?}");
        assert!(!task.is_finished());
        task.abort();
        fake.abort();
    }
}
