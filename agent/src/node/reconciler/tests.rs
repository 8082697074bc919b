use super::*;
use crate::testing::{
    mock_client, node_meta, serve_agent_api, AgentApi, ApiServerVerifier, FakeRunner, RequestLog, Seen,
};
use http::{Method, StatusCode};

const LABELS: &str = "/api/v1/nodes/n1?&fieldManager=usernsguard-agent";
const REPORT: &str =
    "/apis/usernsguard.io/v1alpha1/nodereports/n1?&force=true&fieldManager=usernsguard-agent";
const STATUS: &str =
    "/apis/usernsguard.io/v1alpha1/nodereports/n1/status?&force=true&fieldManager=usernsguard-agent";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events?";
const MERGE: Option<&str> = Some("application/merge-patch+json");
const APPLY: Option<&str> = Some("application/apply-patch+yaml");

fn agent(runner: Arc<FakeRunner>) -> (Agent, ApiServerVerifier) {
    let (client, server) = mock_client();
    let mut cfg = AgentConfig::new("n1");
    cfg.write_timeout = Duration::from_secs(5);
    (Agent::new(client, cfg, runner), server)
}

fn sts(list: &[SelfTest]) -> Vec<Arc<SelfTest>> {
    list.iter().cloned().map(Arc::new).collect()
}

/// The scenario of a first publish: labels, NodeReport object, NodeReport status.
/// Returns the status body for further assertions.
async fn expect_first_publish(server: &mut ApiServerVerifier, labels: Value) -> Value {
    let seen = server.next().await;
    seen.expect(Method::PATCH, LABELS, MERGE);
    assert_eq!(seen.body, json!({"metadata": {"labels": labels}}));
    seen.reply(StatusCode::OK, &node_reply());
    let seen = server.next().await;
    seen.expect(Method::PATCH, REPORT, APPLY);
    assert_eq!(
        seen.body,
        json!({
            "apiVersion": "usernsguard.io/v1alpha1", "kind": "NodeReport",
            "metadata": {"name": "n1", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n1-uid"}]},
            "spec": {"nodeName": "n1"},
        })
    );
    seen.echo();
    expect_status(server).await
}

async fn expect_status(server: &mut ApiServerVerifier) -> Value {
    let seen = server.next().await;
    seen.expect(Method::PATCH, STATUS, APPLY);
    assert_eq!(seen.body["apiVersion"], "usernsguard.io/v1alpha1");
    assert_eq!(seen.body["kind"], "NodeReport");
    let status = seen.body["status"].clone();
    let mut stored = seen.body.clone();
    stored["spec"] = json!({"nodeName": "n1"});
    seen.reply(StatusCode::OK, &stored);
    status
}

/// What the API server answers to a metadata patch of the node.
fn node_reply() -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1"}})
}

fn verdicts(status: &Value) -> Vec<(String, String, String)> {
    status["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["selfTest"].as_str().unwrap().to_owned(),
                r["handler"].as_str().unwrap().to_owned(),
                r["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn s(a: &str, b: &str, c: &str) -> (String, String, String) {
    (a.into(), b.into(), c.into())
}

#[tokio::test]
async fn new_selftest_runs_once_and_publishes_labels_and_report() {
    let runner = FakeRunner::with([
        ("runc", Verdict::Pass),
        ("crun", Verdict::Pass),
        ("kata", Verdict::Pass),
    ]);
    let (mut agent, mut server) = agent(runner.clone());
    let node = node_meta("n1", [("kubernetes.io/os", "linux")]);
    let list = sts(&[SelfTest::test()]);
    let scenario = tokio::spawn(async move {
        let status = expect_first_publish(
            &mut server,
            json!({"usernsguard.io/userns.crun": "pass", "usernsguard.io/userns.runc": "pass"}),
        )
        .await;
        assert_eq!(
            verdicts(&status),
            vec![s("default", "crun", "pass"), s("default", "runc", "pass")]
        );
        assert_eq!(status["results"][0]["generation"], 1);
        assert_eq!(status["results"][0]["checks"][0]["check"], "userns-joined");
        assert_eq!(status["summary"], "crun=pass runc=pass");
        assert_eq!(status["node"]["kernel"], "6.1.0-test");
        assert_eq!(status["runtimes"][0]["binary"], "/usr/bin/crun");
        server
    });
    let due = agent.sync(&list, &node).await.unwrap();
    assert_eq!(due, None, "no interval: nothing scheduled");
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;
    let calls = runner.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].handlers, vec!["runc", "crun"]);
    assert_eq!(calls[0].timeout, Duration::from_secs(30));
    server.assert_quiet(Duration::from_millis(50)).await;
}

#[tokio::test(start_paused = true)]
async fn unchanged_selftest_and_same_rerun_results_write_nothing() {
    let runner = FakeRunner::with([("runc", Verdict::Pass)]);
    let (mut agent, mut server) = agent(runner.clone());
    let list = sts(&[SelfTest::test().with_handlers(["runc"]).interval("10m")]);
    let node = node_meta("n1", []);
    let scenario = tokio::spawn(async move {
        expect_first_publish(&mut server, json!({"usernsguard.io/userns.runc": "pass"})).await;
        server
    });
    let due = agent.sync(&list, &node).await.unwrap();
    assert_eq!(due, Some(Duration::from_secs(600)));
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;

    // The node now carries the label (what the node watch delivers next).
    let node = node_meta("n1", [("usernsguard.io/userns.runc", "pass")]);
    let quiet = async {
        server.assert_quiet(Duration::from_millis(100)).await;
        server
    };
    let (r, mut server) = tokio::join!(agent.sync(&list, &node), quiet);
    assert_eq!(r.unwrap(), Some(Duration::from_secs(600)));
    assert_eq!(runner.calls(), 1, "same generation, interval not elapsed: no run");

    // Interval elapsed: the engine runs again, finds the same (new startedAt, durations).
    tokio::time::advance(Duration::from_secs(600)).await;
    let quiet = async {
        server.assert_quiet(Duration::from_millis(100)).await;
        server
    };
    let (r, mut server) = tokio::join!(agent.sync(&list, &node), quiet);
    assert_eq!(r.unwrap(), Some(Duration::from_secs(600)));
    assert_eq!(runner.calls(), 2, "interval elapsed: re-run");

    // New generation: re-run, and the report's generation changes (labels do not).
    let list = sts(&[SelfTest::test()
        .with_handlers(["runc"])
        .interval("10m")
        .generation(2)]);
    let scenario = tokio::spawn(async move {
        let status = expect_status(&mut server).await;
        assert_eq!(status["results"][0]["generation"], 2);
        server
    });
    agent.sync(&list, &node).await.unwrap();
    assert_eq!(runner.calls(), 3);
    crate::testing::finish(scenario, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn failed_handler_is_labelled_fail_and_announced_once() {
    let runner = FakeRunner::with([("runc", Verdict::Fail), ("crun", Verdict::Pass)]);
    let (mut agent, mut server) = agent(runner.clone());
    let list = sts(&[SelfTest::test()]);
    let node = node_meta("n1", []);
    let scenario = tokio::spawn(async move {
        let status = expect_first_publish(
            &mut server,
            json!({"usernsguard.io/userns.crun": "pass", "usernsguard.io/userns.runc": "fail"}),
        )
        .await;
        assert_eq!(status["summary"], "crun=pass runc=fail");
        let check = &status["results"][1]["checks"][0];
        assert_eq!(check["reason"], "mqueue_owner_unmapped");
        assert!(check["remediation"].as_str().unwrap().contains("runc to 1.2.1"));
        let seen = server.next().await;
        seen.expect(Method::POST, EVENTS, Some("application/json"));
        let ev = &seen.body;
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["reason"], "UsernsSelfTestFailed");
        assert_eq!(ev["reportingController"], "usernsguard-agent");
        assert_eq!(ev["reportingInstance"], "n1");
        assert_eq!(
            ev["regarding"],
            json!({"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n1-uid"})
        );
        let note = ev["note"].as_str().unwrap();
        assert!(
            note.contains("runtime handler runc failed SelfTest default"),
            "{note}"
        );
        assert!(note.contains("userns-joined: mqueue_owner_unmapped"), "{note}");
        assert!(note.contains("Fix: upgrade runc to 1.2.1"), "{note}");
        seen.echo();
        server
    });
    agent.sync(&list, &node).await.unwrap();
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;
    // Still failing on the next sync: no second Event, no write.
    let node = node_meta(
        "n1",
        [
            ("usernsguard.io/userns.runc", "fail"),
            ("usernsguard.io/userns.crun", "pass"),
        ],
    );
    let quiet = async { server.assert_quiet(Duration::from_millis(100)).await };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), quiet);
    r.unwrap();
}

#[tokio::test]
async fn node_no_longer_selected_loses_labels_and_results() {
    let runner = FakeRunner::with([("runc", Verdict::Pass)]);
    let (mut agent, mut server) = agent(runner.clone());
    let list = sts(&[SelfTest::test()
        .with_handlers(["runc"])
        .selecting("pool", "userns")]);
    let node = node_meta("n1", [("pool", "userns")]);
    let scenario = tokio::spawn(async move {
        expect_first_publish(&mut server, json!({"usernsguard.io/userns.runc": "pass"})).await;
        server
    });
    agent.sync(&list, &node).await.unwrap();
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;

    // Relabelled out of the pool; a stale label from an older run is removed as well.
    let node = node_meta(
        "n1",
        [
            ("pool", "other"),
            ("usernsguard.io/userns.runc", "pass"),
            ("usernsguard.io/userns.old", "fail"),
        ],
    );
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(Method::PATCH, LABELS, MERGE);
        assert_eq!(
            seen.body,
            json!({"metadata": {"labels": {"usernsguard.io/userns.runc": null, "usernsguard.io/userns.old": null}}})
        );
        seen.reply(StatusCode::OK, &node_reply());
        let status = expect_status(&mut server).await;
        assert_eq!(status, json!({}), "no results, no summary, no facts left");
    });
    agent.sync(&list, &node).await.unwrap();
    crate::testing::finish(scenario, Duration::from_secs(1)).await;
    assert_eq!(runner.calls(), 1, "not selected: not run");
}

#[tokio::test(start_paused = true)]
async fn api_errors_and_timeouts_are_retried_without_rerunning_or_losing_the_result() {
    let runner = FakeRunner::with([("runc", Verdict::Fail)]);
    let (mut agent, mut server) = agent(runner.clone());
    let list = sts(&[SelfTest::test().with_handlers(["runc"])]);
    let node = node_meta("n1", []);

    // 1: the label patch gets a 500.
    let scenario = async {
        let seen: Seen = server.next().await;
        seen.expect(Method::PATCH, LABELS, MERGE);
        seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
    assert!(matches!(r, Err(AgentError::Kube(_))), "{r:?}");

    // 2: the label patch hangs: the write timeout ends the sync.
    let scenario = async {
        let seen = server.next().await;
        seen.expect(Method::PATCH, LABELS, MERGE);
        let held = seen.hang();
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(held);
    };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
    assert!(matches!(r, Err(AgentError::Timeout(_, "node labels"))), "{r:?}");

    // 3: labels land; the NodeReport status apply conflicts (409).
    let scenario = async {
        let seen = server.next().await;
        seen.expect(Method::PATCH, LABELS, MERGE);
        assert_eq!(
            seen.body["metadata"]["labels"]["usernsguard.io/userns.runc"],
            "fail"
        );
        seen.reply(StatusCode::OK, &node_reply());
        let seen = server.next().await;
        seen.expect(Method::PATCH, REPORT, APPLY);
        seen.echo();
        let seen = server.next().await;
        seen.expect(Method::PATCH, STATUS, APPLY);
        seen.fail(StatusCode::CONFLICT, "Conflict");
    };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
    assert!(
        matches!(&r, Err(AgentError::Kube(kube::Error::Api(s))) if s.code == 409),
        "{r:?}"
    );

    // 4: the status lands (the object is not re-applied), then the Event fails with 500.
    let node = node_meta("n1", [("usernsguard.io/userns.runc", "fail")]);
    let scenario = async {
        let status = expect_status(&mut server).await;
        assert_eq!(verdicts(&status), vec![s("default", "runc", "fail")]);
        let seen = server.next().await;
        seen.expect(Method::POST, EVENTS, Some("application/json"));
        seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
    assert!(r.is_err());

    // 5: only the Event is left to deliver.
    let scenario = async {
        let seen = server.next().await;
        seen.expect(Method::POST, EVENTS, Some("application/json"));
        seen.echo();
    };
    let (r, ()) = tokio::join!(agent.sync(&list, &node), scenario);
    r.unwrap();
    assert_eq!(
        runner.calls(),
        1,
        "the result of the first run was published, never re-run"
    );
    server.assert_quiet(Duration::from_millis(100)).await;
}

#[test]
fn worst_verdict_wins_across_selftests() {
    assert_eq!(worse(Verdict::Pass, Verdict::Unknown), Verdict::Unknown);
    assert_eq!(worse(Verdict::Fail, Verdict::Unknown), Verdict::Fail);
    assert_eq!(worse(Verdict::Pass, Verdict::Pass), Verdict::Pass);
}

/// The API server answers the first NodeReport writes with 500, 409 and 500: the loop
/// retries with backoff, never re-runs the self-test, publishes the first run's result,
/// and turns ready only then.
#[tokio::test(start_paused = true)]
async fn loop_retries_failed_writes_with_backoff_and_publishes_the_kept_result() {
    let runner = FakeRunner::with([("runc", Verdict::Fail)]);
    let (client, server) = mock_client();
    let agent = Agent::new(client, AgentConfig::new("n1"), runner.clone());
    let st = SelfTest::test().with_handlers(["runc"]);
    // The label and the Event are already there (from before a restart): only the
    // NodeReport is to be written.
    let node = node_meta("n1", [("usernsguard.io/userns.runc", "fail")]);
    let log: RequestLog = Arc::default();
    let failures = vec![
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::CONFLICT,
        StatusCode::INTERNAL_SERVER_ERROR,
    ];
    let api = AgentApi {
        write_failures: failures,
        ..AgentApi::new(st, node)
    };
    let fake = tokio::spawn(serve_agent_api(server, log.clone(), api));
    let (tx, mut rx) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(run(agent, tx));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!*rx.borrow(), "not ready while the NodeReport write fails");
    tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|r| *r))
        .await
        .expect("ready within 10 simulated minutes")
        .unwrap();
    let writes: Vec<(Duration, String)> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m, _)| *m == Method::PATCH)
        .map(|(t, _, u)| (t.duration_since(started), u.split('?').next().unwrap().to_owned()))
        .collect();
    let report = "/apis/usernsguard.io/v1alpha1/nodereports/n1".to_owned();
    let status = format!("{report}/status");
    let paths: Vec<&str> = writes.iter().map(|(_, p)| p.as_str()).collect();
    // object 500, object 409, object 500, object ok, status ok
    assert_eq!(
        paths,
        vec![&report, &report, &report, &report, &status],
        "{writes:?}"
    );
    // Backoff 1 s, 2 s, 4 s between the attempts.
    let gaps: Vec<u64> = writes
        .windows(2)
        .take(3)
        .map(|w| (w[1].0 - w[0].0).as_secs())
        .collect();
    assert_eq!(gaps, vec![1, 2, 4], "{writes:?}");
    assert_eq!(runner.calls(), 1, "the result was kept, not re-run");
    assert!(!task.is_finished());
    task.abort();
    fake.abort();
}

/// The NodeReport is deleted between two syncs: the next status write gets 404, and the same
/// sync re-applies the object (spec, owner) and then the status.
#[tokio::test]
async fn a_status_write_answered_404_recreates_the_report_in_the_same_sync() {
    let runner = FakeRunner::with([("runc", Verdict::Pass)]);
    let (mut agent, mut server) = agent(runner.clone());
    let node = node_meta("n1", []);
    let list = sts(&[SelfTest::test().with_handlers(["runc"])]);
    let scenario = tokio::spawn(async move {
        expect_first_publish(&mut server, json!({"usernsguard.io/userns.runc": "pass"})).await;
        server
    });
    agent.sync(&list, &node).await.unwrap();
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;

    let node = node_meta("n1", [("usernsguard.io/userns.runc", "pass")]);
    let list = sts(&[SelfTest::test().with_handlers(["runc"]).generation(2)]);
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(Method::PATCH, STATUS, APPLY);
        seen.fail(StatusCode::NOT_FOUND, "NotFound");
        let seen = server.next().await;
        seen.expect(Method::PATCH, REPORT, APPLY);
        assert_eq!(seen.body["spec"], json!({"nodeName": "n1"}));
        assert_eq!(seen.body["metadata"]["ownerReferences"][0]["uid"], "n1-uid");
        seen.echo();
        let status = expect_status(&mut server).await;
        assert_eq!(status["results"][0]["generation"], 2);
        server
    });
    agent.sync(&list, &node).await.unwrap();
    let mut server = crate::testing::finish(scenario, Duration::from_secs(1)).await;
    server.assert_quiet(Duration::from_millis(50)).await;
    assert_eq!(runner.calls(), 2);
}

/// A deleted NodeReport whose results have not changed: its metadata watch says it is gone,
/// and the object and the status are written again at once, without re-running the
/// self-test, long before the next run is due.
#[tokio::test(start_paused = true)]
async fn a_deleted_report_is_recreated_within_one_interval() {
    let runner = FakeRunner::with([("runc", Verdict::Pass)]);
    let (client, server) = mock_client();
    let agent = Agent::new(client, AgentConfig::new("n1"), runner.clone());
    let st = SelfTest::test().with_handlers(["runc"]).interval("10m");
    let node = node_meta("n1", [("usernsguard.io/userns.runc", "pass")]);
    let log: RequestLog = Arc::default();
    let api = AgentApi {
        report_deleted_after: Some(Duration::from_secs(120)),
        ..AgentApi::new(st, node)
    };
    let fake = tokio::spawn(serve_agent_api(server, log.clone(), api));
    let (tx, mut rx) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(run(agent, tx));
    rx.wait_for(|r| *r).await.unwrap();
    tokio::time::sleep(Duration::from_secs(590)).await;
    let writes: Vec<(u64, String)> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m, _)| *m == Method::PATCH)
        .map(|(t, _, u)| {
            (
                t.duration_since(started).as_secs(),
                u.split('?').next().unwrap().to_owned(),
            )
        })
        .collect();
    let report = "/apis/usernsguard.io/v1alpha1/nodereports/n1".to_owned();
    let status = format!("{report}/status");
    assert_eq!(
        writes,
        vec![
            (0, report.clone()),
            (0, status.clone()),
            (120, report),
            (120, status)
        ],
        "first publish, then the recreation when the deletion is seen"
    );
    assert_eq!(runner.calls(), 1, "recreated from the kept result");
    task.abort();
    fake.abort();
}

#[test]
fn report_presence_sees_deletions_on_the_watch_and_in_relists() {
    let report: PartialObjectMeta<NodeReport> = serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "n1"}}))
    .unwrap();
    let mut p = ReportPresence::default();
    let events = [
        (watcher::Event::Init, false),
        (watcher::Event::InitDone, false),
        (watcher::Event::Apply(report.clone()), false),
        (watcher::Event::Apply(report.clone()), false),
        (watcher::Event::Delete(report.clone()), true),
        (watcher::Event::Apply(report.clone()), false),
        // Deleted while the watch was down: absent from the re-list.
        (watcher::Event::Init, false),
        (watcher::Event::InitDone, true),
        (watcher::Event::Init, false),
        (watcher::Event::InitApply(report.clone()), false),
        (watcher::Event::InitDone, false),
    ];
    for (i, (ev, gone)) in events.into_iter().enumerate() {
        assert_eq!(p.gone_after(&ev), gone, "event {i}");
    }
}
