//! The metrics endpoint against real consumers: Debian's `promtool check metrics` reads the
//! actual scrape output, and a real Prometheus server scrapes the endpoint and returns the
//! self-test series through its query API. Both tools are required: a missing binary is a
//! test failure naming the package, never a skip. Traffic stays on 127.0.0.1.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use usernsguard_agent::crd::InstallState;
use usernsguard_agent::http as server;
use usernsguard_agent::metrics::{Metrics, RestartResult};
use usernsguard_runtime::{Reason, SelfTestReport};

/// A self-test report as the engine would produce it: crun passes, runc fails the joined
/// check with the mqueue symptom, skips idmap-mount.
fn report() -> SelfTestReport {
    serde_json::from_value(serde_json::json!({
        "startedAt": "2026-11-29T03:00:00Z",
        "durationSeconds": 1.5,
        "node": {
            "kernel": "6.1.0-28-amd64",
            "selinux": {"mode": "disabled"},
            "cgroup": "hybrid"
        },
        "handlers": [
            {"handler": "crun", "binary": "/usr/bin/crun", "runtime": "crun", "version": "1.8.1",
             "verdict": "pass", "checks": [
                {"check": "userns-created", "result": "Pass", "message": "ok", "durationSeconds": 0.2},
                {"check": "userns-joined", "result": "Pass", "message": "ok", "durationSeconds": 0.3}
             ]},
            {"handler": "runc", "binary": "/usr/sbin/runc", "runtime": "runc", "version": "1.1.5",
             "verdict": "fail", "checks": [
                {"check": "userns-created", "result": "Pass", "message": "ok", "durationSeconds": 0.2},
                {"check": "userns-joined", "result": "Fail", "reason": "mqueue_owner_unmapped",
                 "message": "/dev/mqueue owned by 65534", "durationSeconds": 0.4},
                {"check": "idmap-mount", "result": "Skip", "message": "n/a", "durationSeconds": 0.0}
             ]}
        ]
    }))
    .expect("fixture report matches the report schema")
}

struct Http {
    status: u16,
    content_type: String,
    body: String,
}

/// One HTTP/1.1 GET over a raw loopback connection (no client dependency needed).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Http> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    // axum answers small bodies with Content-Length; chunked only matters for big ones.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(Http {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Polls `f` every 100 ms until it returns `Some`, failing the test after `timeout`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `selftest --serve` on an ephemeral loopback port with `metrics`; the first
/// self-test run is held until `release` is sent, so readiness can be observed before it.
async fn start_selftest_server(
    metrics: Metrics,
    interval: Duration,
) -> (
    SocketAddr,
    std::sync::mpsc::Sender<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut first = true;
    let run = move || {
        if first {
            first = false;
            let _ = release_rx.recv_timeout(Duration::from_secs(30));
        }
        Ok::<_, std::convert::Infallible>(report())
    };
    tokio::spawn(server::serve_selftest_loop(
        listener,
        metrics,
        interval,
        run,
        async {
            let _ = stop_rx.await;
        },
    ));
    (addr, release_tx, stop_tx)
}

const ALL_METRICS: [&str; 10] = [
    "usernsguard_pod_userns_failures_total",
    "usernsguard_pod_userns_starts_total",
    "usernsguard_selftest_check_passed",
    "usernsguard_selftest_duration_seconds",
    "usernsguard_selftest_last_run_timestamp_seconds",
    "usernsguard_runtime_info",
    "usernsguard_runtime_install_state",
    "usernsguard_container_runtime_restarts_total",
    "usernsguard_node_info",
    "usernsguard_build_info",
];

#[tokio::test]
async fn scrape_output_serves_every_metric_and_passes_promtool() {
    let metrics = Metrics::new("node-a").unwrap();
    metrics.add_pod_failures("runc", Reason::MqueueSetxattr, 3);
    metrics.inc_pod_start("crun");
    metrics.set_install_state("crun", InstallState::Installed);
    metrics.inc_runtime_restart("containerd", RestartResult::Success);
    let (addr, release, stop) = start_selftest_server(metrics, Duration::from_secs(3600)).await;

    let health = get(addr, "/healthz").await.unwrap();
    assert_eq!(health.status, 200);
    let before = get(addr, "/readyz").await.unwrap();
    assert_eq!(before.status, 503, "not ready before the first self-test run");

    release.send(()).unwrap();
    poll("/readyz to turn 200", Duration::from_secs(10), || async {
        (get(addr, "/readyz").await.ok()?.status == 200).then_some(())
    })
    .await;

    let scrape = get(addr, "/metrics").await.unwrap();
    assert_eq!(scrape.status, 200);
    assert_eq!(scrape.content_type, "text/plain; version=0.0.4; charset=utf-8");
    for name in ALL_METRICS {
        assert!(
            scrape.body.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{}",
            scrape.body
        );
    }
    assert!(scrape
        .body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.contains(r#"node="node-a""#)));

    let mut promtool = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool not runnable ({e}): install Debian package `prometheus`"),
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- scrape ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        scrape.body
    );
    let _ = stop.send(());
}

/// Kills the Prometheus child even when an assertion fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn real_prometheus_scrapes_the_selftest_series() {
    let metrics = Metrics::new("node-a").unwrap();
    let (target, release, stop) = start_selftest_server(metrics, Duration::from_secs(1)).await;
    release.send(()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: usernsguard\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let child = match Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("prometheus not runnable ({e}): install Debian package `prometheus`"),
    };
    let mut prom = KillOnDrop(child);

    let series: Vec<serde_json::Value> = poll(
        "Prometheus to return 4 usernsguard_selftest_check_passed series",
        Duration::from_secs(60),
        || {
            if let Ok(Some(status)) = prom.0.try_wait() {
                panic!("prometheus exited early: {status}");
            }
            async move {
                let r = get(web, "/api/v1/query?query=usernsguard_selftest_check_passed")
                    .await
                    .ok()?;
                let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
                let result = v["data"]["result"].as_array()?.clone();
                (result.len() == 4).then_some(result)
            }
        },
    )
    .await;

    let value = |handler: &str, check: &str| -> String {
        let s = series
            .iter()
            .find(|s| s["metric"]["runtime_handler"] == handler && s["metric"]["check"] == check)
            .unwrap_or_else(|| panic!("no series for {handler}/{check}: {series:#?}"));
        assert_eq!(s["metric"]["node"], "node-a");
        assert_eq!(s["metric"]["job"], "usernsguard");
        s["value"][1].as_str().unwrap().to_owned()
    };
    assert_eq!(value("crun", "userns-created"), "1");
    assert_eq!(value("crun", "userns-joined"), "1");
    assert_eq!(value("runc", "userns-created"), "1");
    assert_eq!(value("runc", "userns-joined"), "0");
    drop(prom);
    let _ = stop.send(());
}

#[tokio::test]
async fn failed_selftest_run_keeps_readyz_unready_until_a_run_succeeds() {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (called_tx, called_rx) = std::sync::mpsc::channel::<usize>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut calls = 0;
    let run = move || {
        calls += 1;
        let _ = called_tx.send(calls);
        if calls == 1 {
            return Err("no runtime to test: neither runc nor crun is on PATH".to_owned());
        }
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        Ok(report())
    };
    let metrics = Metrics::new("node-a").unwrap();
    tokio::spawn(server::serve_selftest_loop(
        listener,
        metrics,
        Duration::from_millis(50),
        run,
        async {
            let _ = stop_rx.await;
        },
    ));
    let second = tokio::task::spawn_blocking(move || {
        let first = called_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let second = called_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (first, second)
    })
    .await
    .unwrap();
    assert_eq!(second, (1, 2), "the loop goes on after a failed run");
    assert_eq!(get(addr, "/readyz").await.unwrap().status, 503);
    let scrape = get(addr, "/metrics").await.unwrap();
    assert!(
        !scrape.body.contains("usernsguard_selftest_check_passed{"),
        "{}",
        scrape.body
    );
    release_tx.send(()).unwrap();
    poll("/readyz to turn 200", Duration::from_secs(10), || async {
        (get(addr, "/readyz").await.ok()?.status == 200).then_some(())
    })
    .await;
    let _ = stop_tx.send(());
}
