//! The one HTTP port of DESIGN.md: `/metrics` (classic Prometheus text format), `/healthz`
//! and `/readyz`, shared by the in-cluster agent and `usernsguard selftest --serve`.
//!
//! [`serve_while`] runs the agent's and the controller's work behind the port; the
//! `selftest --serve` loop lives here too, so a plain containerd host without Kubernetes is
//! monitored through exactly the same metrics as a node running the agent.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use usernsguard_runtime::SelfTestReport;

use crate::health::Health;
use crate::metrics::{Metrics, CONTENT_TYPE};

/// DESIGN.md's metrics port.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9464";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the self-test run panicked: {0}")]
    SelfTestPanicked(String),
}

#[derive(Clone, Debug)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render())
}

async fn readyz_handler(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds the metrics port; the error names the address (a port clash is the usual cause).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServerError::Serve { addr, source })
}

/// Serves `/metrics`, `/healthz` and `/readyz` while `work` runs, until `shutdown`. `/healthz`
/// answers as long as the process does; `/readyz` follows `ready` (a latch: set once).
pub async fn serve_while(
    listener: TcpListener,
    metrics: Metrics,
    mut ready: watch::Receiver<bool>,
    work: impl Future<Output = ()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let health = Health::new();
    let latch = health.clone();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            latch.mark_ready();
        }
    });
    let served = serve(listener, metrics, health, shutdown);
    tokio::select! {
        r = served => r?,
        () = work => anyhow::bail!("main loop ended"),
    }
    Ok(())
}

/// Resolves on SIGTERM (kubelet, systemd) or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `usernsguard selftest --serve ADDR --interval DURATION`: runs `run` now and then every
/// `interval`, publishes each report through [`Metrics::observe_selftest`] (and the probed
/// handlers' zero pod-failure series, [`Metrics::register_handler`]), and serves the
/// endpoint on `listener` until `shutdown` completes. `/readyz` turns ready after the first
/// successful run. A failed run is logged and leaves the previous values in place, so
/// `usernsguard_selftest_last_run_timestamp_seconds` going stale is what alerts on it. `run`
/// executes on a blocking thread: probes spawn processes and wait for them.
pub async fn serve_selftest_loop<F, E>(
    listener: TcpListener,
    metrics: Metrics,
    interval: Duration,
    mut run: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError>
where
    F: FnMut() -> Result<SelfTestReport, E> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let health = Health::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, metrics.clone(), health.clone(), async {
        let _ = stop_rx.await;
    }));
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let job = tokio::task::spawn_blocking(move || {
            let report = run();
            (run, report)
        });
        let (returned, report) = tokio::select! {
            joined = job => match joined {
                Ok(v) => v,
                Err(e) => break Err(ServerError::SelfTestPanicked(e.to_string())),
            },
            // A run in progress is abandoned: its process-tree timeouts clean it up.
            _ = &mut shutdown => break Ok(()),
        };
        run = returned;
        match report {
            Ok(report) => {
                metrics.observe_selftest(&report);
                // The handlers probed are this node's: they get the zero-valued pod failure
                // series the agent keeps for its node's handlers, so the same dashboards
                // and alerts read the same shapes from a standalone node.
                for h in &report.handlers {
                    metrics.register_handler(&h.handler);
                }
                health.mark_ready();
            }
            Err(e) => tracing::error!(error = %e, "self-test run failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut shutdown => break Ok(()),
        }
    };
    let _ = stop_tx.send(());
    match server.await {
        Ok(served) => result.and(served),
        Err(e) => result.and(Err(ServerError::SelfTestPanicked(e.to_string()))),
    }
}

/// Convenience for the `selftest --serve` command: binds `addr`, labels every series with
/// this host's name, and runs until SIGTERM or Ctrl-C.
pub async fn run_selftest_server<F, E>(addr: SocketAddr, interval: Duration, run: F) -> anyhow::Result<()>
where
    F: FnMut() -> Result<SelfTestReport, E> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let metrics = Metrics::new(&hostname())?;
    let listener = bind(addr).await?;
    tracing::info!(%addr, ?interval, "serving self-test metrics");
    serve_selftest_loop(listener, metrics, interval, run, shutdown_signal()).await?;
    Ok(())
}

/// The kernel's hostname: the `node` label off-cluster.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::http_status;

    #[tokio::test]
    async fn readyz_follows_the_loops_ready_signal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let work = async move {
            let _ = go_rx.await;
            tx.send_replace(true);
            std::future::pending::<()>().await
        };
        let metrics = Metrics::new("n1").unwrap();
        let process = tokio::spawn(serve_while(listener, metrics, rx, work, std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http_status(addr, "/readyz").await, 503);
        go_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http_status(addr, "/readyz").await, 200);
        assert_eq!(http_status(addr, "/healthz").await, 200);
        process.abort();
    }
}
