use super::*;
use crate::node::reconciler::{Agent, AgentConfig};
use crate::testing::{mock_client, node_meta, sample, ApiServerVerifier, FakeInstaller, FakeRunner};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use usernsguard_runtime::install::Failure;
use usernsguard_runtime::Verdict;

const REPORT: &str = "/apis/usernsguard.io/v1alpha1/nodereports/n1";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/usernsguard/leases";
const LABELS: &str = "/api/v1/nodes/n1?&fieldManager=usernsguard-agent";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events?";

fn installs(fake: Arc<FakeInstaller>) -> (Installs, ApiServerVerifier, Metrics) {
    let (client, server) = mock_client();
    let metrics = Metrics::new("n1").unwrap();
    let cfg = InstallsConfig::new("n1", "usernsguard");
    let i = Installs::new(client, cfg, fake).with_metrics(metrics.clone());
    (i, server, metrics)
}

fn profiles(list: &[RuntimeProfile]) -> Vec<Arc<RuntimeProfile>> {
    list.iter().cloned().map(Arc::new).collect()
}

/// Runs one sync in the background; the test plays the API server meanwhile.
fn sync(
    mut i: Installs,
    ps: Vec<Arc<RuntimeProfile>>,
    node: PartialObjectMeta<Node>,
) -> tokio::task::JoinHandle<(Installs, InstallSync)> {
    tokio::spawn(async move {
        let out = i.sync(&ps, &node).await.expect("sync");
        (i, out)
    })
}

async fn no_report(server: &mut ApiServerVerifier) {
    let seen = server.next().await;
    seen.expect(Method::GET, REPORT, None);
    seen.fail(StatusCode::NOT_FOUND, "NotFound");
}

fn lease(name: &str, holder: Option<&str>, renewed: Timestamp) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "usernsguard", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 900,
                 "renewTime": MicroTime(renewed), "leaseTransitions": 1},
    })
}

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

/// The slot is free (never created): GET 404, POST.
async fn grant_new_slot(server: &mut ApiServerVerifier, name: &str) {
    let seen = server.next().await;
    seen.expect(Method::GET, &format!("{LEASES}/{name}"), None);
    seen.fail(StatusCode::NOT_FOUND, "NotFound");
    let seen = server.next().await;
    seen.expect(Method::POST, &format!("{LEASES}?"), Some("application/json"));
    assert_eq!(seen.body["spec"]["holderIdentity"], "n1");
    seen.echo();
}

/// The release after the restart: GET (held by n1), PUT without a holder.
async fn expect_release(server: &mut ApiServerVerifier, name: &str) {
    let seen = server.next().await;
    seen.expect(Method::GET, &format!("{LEASES}/{name}"), None);
    seen.reply(StatusCode::OK, &lease(name, Some("n1"), Timestamp::now()));
    let seen = server.next().await;
    seen.expect(
        Method::PUT,
        &format!("{LEASES}/{name}?"),
        Some("application/json"),
    );
    assert_eq!(seen.body["spec"].get("holderIdentity"), None);
    seen.echo();
}

/// An Event on the Node; returns its note.
async fn expect_event(server: &mut ApiServerVerifier, type_: &str, reason: &str) -> String {
    let seen = server.next().await;
    seen.expect(Method::POST, EVENTS, Some("application/json"));
    assert_eq!(seen.body["type"], type_, "{}", seen.body);
    assert_eq!(seen.body["reason"], reason, "{}", seen.body);
    assert_eq!(seen.body["regarding"]["kind"], "Node");
    assert_eq!(seen.body["regarding"]["name"], "n1");
    let note = seen.body["note"].as_str().unwrap().to_owned();
    seen.echo();
    note
}

async fn expect_labels(server: &mut ApiServerVerifier, labels: Value) {
    let seen = server.next().await;
    seen.expect(Method::PATCH, LABELS, Some("application/merge-patch+json"));
    assert_eq!(seen.body, json!({"metadata": {"labels": labels}}));
    seen.reply(
        StatusCode::OK,
        &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1"}}),
    );
}

fn state_metric(m: &Metrics, handler: &str, state: &str) -> Option<String> {
    sample(
        &m.render(),
        "usernsguard_runtime_install_state",
        &[("node", "n1"), ("runtime_handler", handler), ("state", state)],
    )
}

fn restarts_metric(m: &Metrics, result: &str) -> Option<String> {
    sample(
        &m.render(),
        "usernsguard_container_runtime_restarts_total",
        &[("node", "n1"), ("runtime", "containerd"), ("result", result)],
    )
}

fn near(d: Option<Duration>, want: Duration) -> bool {
    d.is_some_and(|d| d <= want && d + Duration::from_secs(2) >= want)
}

/// A new profile: the restart slot is taken before and given back after the install, which
/// restarts containerd once; the node gets `runtime.crun=installed` and a Normal Event, the
/// NodeReport entry says what happened, and the self-tests of `crun` are asked to re-run.
/// A second sync with everything in place sends nothing and changes nothing.
#[tokio::test]
async fn installs_a_selected_profile_within_the_restart_budget() {
    let fake = FakeInstaller::new();
    let (i, mut server, metrics) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test()]);
    let task = sync(i, ps.clone(), node_meta("n1", []));
    no_report(&mut server).await;
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    let note = expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    assert!(note.contains("restarted the CRI runtime"), "{note}");
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, out) = task.await.unwrap();

    assert_eq!(out.installed, ["crun"]);
    assert!(near(out.due, RECHECK), "{:?}", out.due);
    assert_eq!(fake.changes(), ["install crun"]);
    assert_eq!(fake.restarts(), 1);
    let req = fake.state.lock().unwrap().installed["crun"].clone();
    assert_eq!(
        req.binary,
        usernsguard_runtime::install::BinarySource::Local("/usr/local/lib/usernsguard/runtimes/crun".into())
    );
    assert_eq!(
        req.install_path.as_deref(),
        Some(Path::new("/usr/local/bin/crun"))
    );
    assert_eq!(req.restart, RestartMode::Systemd { unit: None });
    let st = &i.statuses().unwrap()[0];
    assert_eq!(
        (
            st.runtime_profile.as_str(),
            st.handler.as_str(),
            st.state,
            st.generation
        ),
        ("crun", "crun", InstallState::Installed, 1)
    );
    assert!(st.cri_restarted);
    assert_eq!(st.reason, None);
    assert_eq!(st.version.as_deref(), Some("runc version 1.4.3"));
    assert_eq!(st.cri_config.as_deref(), Some("/etc/containerd/config.toml"));
    assert!(
        st.message.contains("advertises user namespaces"),
        "{}",
        st.message
    );
    assert_eq!(state_metric(&metrics, "crun", "installed").as_deref(), Some("1"));
    assert_eq!(restarts_metric(&metrics, "success").as_deref(), Some("1"));

    let node = node_meta("n1", [("usernsguard.io/runtime.crun", "installed")]);
    let mut i = i;
    // Not due: nothing is planned, nothing sent.
    let out = i.sync(&ps, &node).await.unwrap();
    assert!(out.installed.is_empty());
    server.assert_quiet(Duration::from_millis(50)).await;
    assert_eq!(
        fake.state.lock().unwrap().calls,
        ["plan_install crun", "install crun"]
    );
}

/// Every slot is held by a live node: the install waits as `pending` (label and status),
/// asks again after 15 s, and proceeds once a slot is free.
#[tokio::test(start_paused = true)]
async fn waits_pending_while_the_restart_budget_is_used_up() {
    let fake = FakeInstaller::new();
    let (i, mut server, metrics) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test().max_concurrent_restarts(1)]);
    let task = sync(i, ps.clone(), node_meta("n1", []));
    no_report(&mut server).await;
    let seen = server.next().await;
    seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-0"), None);
    seen.reply(
        StatusCode::OK,
        &lease("usernsguard-restart-crun-0", Some("n7"), Timestamp::now()),
    );
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "pending"})).await;
    let (i, out) = task.await.unwrap();
    assert!(fake.changes().is_empty(), "installed without a slot");
    let st = &i.statuses().unwrap()[0];
    assert_eq!(st.state, InstallState::Pending);
    assert_eq!(st.reason.as_deref(), Some("waiting_for_restart_slot"));
    assert!(st.message.contains("n7"), "{}", st.message);
    assert_eq!(out.due, Some(SLOT_RETRY));
    assert_eq!(state_metric(&metrics, "crun", "pending").as_deref(), Some("1"));

    tokio::time::advance(SLOT_RETRY).await;
    let task = sync(
        i,
        ps,
        node_meta("n1", [("usernsguard.io/runtime.crun", "pending")]),
    );
    let seen = server.next().await;
    seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-0"), None);
    seen.reply(
        StatusCode::OK,
        &lease("usernsguard-restart-crun-0", None, Timestamp::now()),
    );
    let seen = server.next().await;
    seen.expect(
        Method::PUT,
        &format!("{LEASES}/usernsguard-restart-crun-0?"),
        Some("application/json"),
    );
    seen.echo();
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, out) = task.await.unwrap();
    assert_eq!(out.installed, ["crun"]);
    assert_eq!(i.statuses().unwrap()[0].state, InstallState::Installed);
    assert_eq!(fake.changes(), ["install crun"]);
}

/// A plan refused for bad input changed nothing: failed (status reason, label, metric), one
/// Warning Event, retried after a minute, then after two, without a second Event.
#[tokio::test(start_paused = true)]
async fn bad_input_fails_once_loudly_and_retries_with_backoff() {
    let fake = FakeInstaller::new();
    let mismatch = || InstallError::Sha256Mismatch {
        path: "/var/lib/usernsguard/downloads/x".into(),
        expected: "a".repeat(64),
        actual: "b".repeat(64),
    };
    fake.fail_next_plan(mismatch);
    fake.fail_next_plan(mismatch);
    let (i, mut server, metrics) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test()]);
    let task = sync(i, ps.clone(), node_meta("n1", []));
    no_report(&mut server).await;
    let note = expect_event(&mut server, "Warning", "RuntimeInstallFailed").await;
    assert!(note.contains("does not have the sha256 given"), "{note}");
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "failed"})).await;
    let (i, out) = task.await.unwrap();
    let st = &i.statuses().unwrap()[0];
    assert_eq!(
        (st.state, st.reason.as_deref()),
        (InstallState::Failed, Some("sha256_mismatch"))
    );
    assert_eq!(out.due, Some(Duration::from_secs(60)));
    assert_eq!(state_metric(&metrics, "crun", "failed").as_deref(), Some("1"));
    assert!(fake.changes().is_empty());

    tokio::time::advance(Duration::from_secs(60)).await;
    let failed = node_meta("n1", [("usernsguard.io/runtime.crun", "failed")]);
    let task = sync(i, ps.clone(), failed.clone());
    let (i, out) = task.await.unwrap();
    assert_eq!(out.due, Some(Duration::from_secs(120)), "backoff doubles");
    server.assert_quiet(Duration::from_millis(50)).await;

    // The node was fixed: the third attempt installs.
    tokio::time::advance(Duration::from_secs(120)).await;
    let task = sync(i, ps, failed);
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, _) = task.await.unwrap();
    assert_eq!(i.statuses().unwrap()[0].reason, None);
}

/// The CRI runtime did not come back: the installer rolled back (restarting it again). That
/// is a failed restart in the metric, and the next attempt waits an hour, since each costs
/// two restarts.
#[tokio::test(start_paused = true)]
async fn a_rolled_back_install_is_not_retried_for_an_hour() {
    let fake = FakeInstaller::new();
    fake.fail_next_install(|| InstallError::RolledBack {
        cause: Failure::CriDown {
            socket: "/run/containerd/containerd.sock".into(),
            detail: "connection refused (waited 60 s)".into(),
        },
        restart: None,
    });
    let (i, mut server, metrics) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test()]);
    let task = sync(i, ps.clone(), node_meta("n1", []));
    no_report(&mut server).await;
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    let note = expect_event(&mut server, "Warning", "RuntimeInstallFailed").await;
    assert!(
        note.contains("did not answer") && note.contains("rolled back"),
        "{note}"
    );
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "failed"})).await;
    let (i, out) = task.await.unwrap();
    assert_eq!(i.statuses().unwrap()[0].reason.as_deref(), Some("rolled_back"));
    assert_eq!(out.due, Some(ROLLED_BACK_RETRY));
    assert_eq!(restarts_metric(&metrics, "failure").as_deref(), Some("1"));
    assert_eq!(restarts_metric(&metrics, "success"), None);

    // A new generation (the operator changed the profile) is tried at once.
    let ps = profiles(&[RuntimeProfile::test().generation(2)]);
    let task = sync(
        i,
        ps,
        node_meta("n1", [("usernsguard.io/runtime.crun", "failed")]),
    );
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, _) = task.await.unwrap();
    assert_eq!(i.statuses().unwrap()[0].generation, 2);
}

/// What the API server answers to a status apply: the stored object.
fn echo_status(seen: crate::testing::Seen) {
    let mut stored = seen.body.clone();
    stored["spec"] = json!({"nodeName": "n1"});
    seen.reply(StatusCode::OK, &stored);
}

fn report_with(entries: Value) -> Value {
    json!({
        "apiVersion": "usernsguard.io/v1alpha1", "kind": "NodeReport",
        "metadata": {"name": "n1"}, "spec": {"nodeName": "n1"},
        "status": {"installs": entries},
    })
}

fn installed_entry(profile: &str, handler: &str) -> Value {
    json!({"runtimeProfile": profile, "generation": 1, "handler": handler, "state": "installed",
           "criConfig": "/etc/containerd/config.toml", "message": "ok", "criRestarted": true})
}

/// The agent restarted while the profile stopped selecting this node: the NodeReport says it
/// was installed here, so it is uninstalled (within the budget), its label and entry go away.
#[tokio::test]
async fn a_profile_that_no_longer_selects_the_node_is_uninstalled_after_an_agent_restart() {
    let fake = FakeInstaller::new();
    let (i, mut server, metrics) = installs(fake.clone());
    // What the previous agent process installed.
    let previous = RuntimeProfile::test();
    fake.install(&request(fake.as_ref(), &previous, None).ok().unwrap())
        .unwrap();
    fake.state.lock().unwrap().calls.clear();
    metrics.set_install_state("crun", InstallState::Installed);

    let ps = profiles(&[RuntimeProfile::test().selecting("pool", "userns")]);
    let node = node_meta("n1", [("usernsguard.io/runtime.crun", "installed")]);
    let task = sync(i, ps, node);
    let seen = server.next().await;
    seen.expect(Method::GET, REPORT, None);
    seen.reply(
        StatusCode::OK,
        &report_with(json!([installed_entry("crun", "crun")])),
    );
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    let note = expect_event(&mut server, "Normal", "RuntimeUninstalled").await;
    assert!(note.contains("crun"), "{note}");
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": null})).await;
    let (i, out) = task.await.unwrap();
    assert_eq!(fake.changes(), ["uninstall crun"]);
    assert!(i.statuses().unwrap().is_empty());
    assert_eq!(out.due, None);
    assert_eq!(
        state_metric(&metrics, "crun", "installed"),
        None,
        "series removed"
    );
}

/// A deleted profile (held by the finalizer) is uninstalled; an uninstall that fails keeps
/// the entry (so the finalizer keeps holding) as failed, with a Warning Event.
#[tokio::test]
async fn a_deleted_profile_is_uninstalled_and_a_failed_uninstall_keeps_its_entry() {
    let fake = FakeInstaller::new();
    let (mut i, mut server, _) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test()]);
    let task = sync(i, ps, node_meta("n1", []));
    no_report(&mut server).await;
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    (i, _) = task.await.unwrap();

    fake.fail_next_uninstall(|| InstallError::NotWritable {
        path: "/etc/containerd/conf.d".into(),
        source: std::io::Error::from_raw_os_error(30),
    });
    let ps = profiles(&[RuntimeProfile::test().deleting()]);
    let node = node_meta("n1", [("usernsguard.io/runtime.crun", "installed")]);
    let task = sync(i, ps.clone(), node.clone());
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    let note = expect_event(&mut server, "Warning", "RuntimeInstallFailed").await;
    assert!(
        note.contains("could not be uninstalled") && note.contains("not writable"),
        "{note}"
    );
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "failed"})).await;
    (i, _) = task.await.unwrap();
    let st = &i.statuses().unwrap()[0];
    assert_eq!(
        (st.state, st.reason.as_deref()),
        (InstallState::Failed, Some("uninstall_failed"))
    );

    // Retried after the backoff: this time it works.
    i.entries.get_mut("crun").unwrap().next_attempt = Some(Instant::now());
    let node = node_meta("n1", [("usernsguard.io/runtime.crun", "failed")]);
    let task = sync(i, ps, node);
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeUninstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": null})).await;
    (i, _) = task.await.unwrap();
    assert!(i.statuses().unwrap().is_empty());
    assert_eq!(
        fake.changes(),
        ["install crun", "uninstall crun", "uninstall crun"]
    );
}

/// Restart mode none: configured, then `pending` until the operator's restart makes the
/// CRI runtime serve the handler; no restart slot is ever taken.
#[tokio::test(start_paused = true)]
async fn restart_mode_none_stays_pending_until_the_cri_runtime_serves_the_handler() {
    let fake = FakeInstaller::new();
    let (i, mut server, metrics) = installs(fake.clone());
    let ps = profiles(&[RuntimeProfile::test().restart_none()]);
    let task = sync(i, ps.clone(), node_meta("n1", []));
    no_report(&mut server).await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "pending"})).await;
    let (i, out) = task.await.unwrap();
    let st = &i.statuses().unwrap()[0];
    assert_eq!(
        (st.state, st.reason.as_deref()),
        (InstallState::Pending, Some("restart_pending"))
    );
    assert!(
        st.message.contains("restart containerd.service"),
        "{}",
        st.message
    );
    assert_eq!(out.due, Some(RESTART_PENDING_RETRY));
    assert!(out.installed.is_empty());
    assert_eq!(fake.restarts(), 0);

    // Not restarted yet: still pending, nothing sent.
    tokio::time::advance(RESTART_PENDING_RETRY).await;
    let pending = node_meta("n1", [("usernsguard.io/runtime.crun", "pending")]);
    let (i, _) = sync(i, ps.clone(), pending.clone()).await.unwrap();
    assert_eq!(i.statuses().unwrap()[0].state, InstallState::Pending);
    server.assert_quiet(Duration::from_millis(50)).await;

    fake.state.lock().unwrap().live = true;
    tokio::time::advance(RESTART_PENDING_RETRY).await;
    let task = sync(i, ps, pending);
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, out) = task.await.unwrap();
    assert_eq!(out.installed, ["crun"], "the self-tests re-run once it is live");
    assert_eq!(i.statuses().unwrap()[0].state, InstallState::Installed);
    assert_eq!(state_metric(&metrics, "crun", "installed").as_deref(), Some("1"));
    let calls = fake.state.lock().unwrap().calls.clone();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("live")).count(),
        2,
        "{calls:?}"
    );
}

/// Two profiles register the same handler on this node: the first by name is installed, the
/// other reported failed (profile_conflict) without touching the host.
#[tokio::test]
async fn two_profiles_with_one_handler_install_only_the_first() {
    let fake = FakeInstaller::new();
    let (i, mut server, _) = installs(fake.clone());
    let ps = profiles(&[
        RuntimeProfile::test().named("b-crun", "crun"),
        RuntimeProfile::test().named("a-crun", "crun"),
    ]);
    let task = sync(i, ps, node_meta("n1", []));
    no_report(&mut server).await;
    let note = expect_event(&mut server, "Warning", "RuntimeInstallFailed").await;
    assert!(
        note.contains("RuntimeProfile a-crun registers the handler crun"),
        "{note}"
    );
    grant_new_slot(&mut server, "usernsguard-restart-a-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-a-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let (i, _) = task.await.unwrap();
    assert_eq!(fake.changes(), ["install crun"]);
    let states: Vec<_> = i
        .statuses()
        .unwrap()
        .iter()
        .map(|s| (s.runtime_profile.clone(), s.state, s.reason.clone()))
        .collect();
    assert_eq!(
        states,
        [
            ("a-crun".to_owned(), InstallState::Installed, None),
            (
                "b-crun".to_owned(),
                InstallState::Failed,
                Some("profile_conflict".to_owned())
            ),
        ]
    );
}

/// A profile already in place on this node (the plan is a no-op): recorded as installed
/// with no restart slot, no install, no Event.
#[tokio::test]
async fn a_profile_already_in_place_needs_no_slot_and_no_install() {
    let fake = FakeInstaller::new();
    let p = RuntimeProfile::test();
    fake.install(&request(fake.as_ref(), &p, None).ok().unwrap())
        .unwrap();
    fake.state.lock().unwrap().calls.clear();
    let (i, mut server, _) = installs(fake.clone());
    let task = sync(
        i,
        profiles(&[p]),
        node_meta("n1", [("usernsguard.io/runtime.crun", "installed")]),
    );
    no_report(&mut server).await;
    let (i, out) = task.await.unwrap();
    server.assert_quiet(Duration::from_millis(50)).await;
    assert_eq!(fake.state.lock().unwrap().calls, ["plan_install crun"]);
    assert_eq!(i.statuses().unwrap()[0].state, InstallState::Installed);
    assert!(out.installed.is_empty(), "nothing changed: no self-test re-run");
}

/// The whole node agent: an install makes the SelfTest covering the handler run again at
/// once (although its interval is not up), and the NodeReport status carries the install.
#[tokio::test]
async fn the_node_reconciler_reruns_self_tests_after_an_install_and_reports_it() {
    let fake = FakeInstaller::new();
    let runner = FakeRunner::with([("crun", Verdict::Pass)]);
    let (client, mut server) = mock_client();
    let cfg = InstallsConfig::new("n1", "usernsguard");
    let mut agent = Agent::new(client.clone(), AgentConfig::new("n1"), runner.clone())
        .with_installs(Installs::new(client, cfg, fake.clone()));
    let st = Arc::new(
        crate::crd::SelfTest::test()
            .with_handlers(["crun"])
            .interval("6h"),
    );
    let node = node_meta("n1", [("usernsguard.io/userns.crun", "pass")]);
    // The SelfTest ran once already, before the profile existed. The first read of the
    // installs on record fails: the report is not written (it would erase them) until a
    // later read succeeds.
    let task = tokio::spawn(async move {
        assert!(agent.sync_installs(&[], &node).await.is_err());
        agent.sync(std::slice::from_ref(&st), &node).await.unwrap();
        agent.sync_installs(&[], &node).await.unwrap();
        agent.sync(std::slice::from_ref(&st), &node).await.unwrap();
        (agent, st, node)
    });
    let seen = server.next().await;
    seen.expect(Method::GET, REPORT, None);
    seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    no_report(&mut server).await;
    let seen = server.next().await; // NodeReport object
    seen.echo();
    let seen = server.next().await; // NodeReport status
    assert!(seen.body["status"].get("installs").is_none());
    echo_status(seen);
    let (mut agent, st, node) = task.await.unwrap();
    assert_eq!(runner.calls(), 1);

    let ps = profiles(&[RuntimeProfile::test()]);
    let task = tokio::spawn(async move {
        agent.sync_installs(&ps, &node).await.unwrap();
        let node = node_meta(
            "n1",
            [
                ("usernsguard.io/userns.crun", "pass"),
                ("usernsguard.io/runtime.crun", "installed"),
            ],
        );
        agent.sync(std::slice::from_ref(&st), &node).await.unwrap();
        agent
    });
    grant_new_slot(&mut server, "usernsguard-restart-crun-0").await;
    expect_release(&mut server, "usernsguard-restart-crun-0").await;
    expect_event(&mut server, "Normal", "RuntimeInstalled").await;
    expect_labels(&mut server, json!({"usernsguard.io/runtime.crun": "installed"})).await;
    let seen = server.next().await;
    seen.expect(
        Method::PATCH,
        "/apis/usernsguard.io/v1alpha1/nodereports/n1/status?&force=true&fieldManager=usernsguard-agent",
        Some("application/apply-patch+yaml"),
    );
    let installs = &seen.body["status"]["installs"];
    assert_eq!(installs[0]["runtimeProfile"], "crun");
    assert_eq!(installs[0]["state"], "installed");
    assert_eq!(installs[0]["criRestarted"], true);
    echo_status(seen);
    task.await.unwrap();
    assert_eq!(
        runner.calls(),
        2,
        "the SelfTest covering crun ran again after the install"
    );
}
