//! `usernsguard controller`: the cluster-wide reconcilers, run by the one replica that holds
//! the leader Lease ([`crate::leader`]).
//!
//! - SelfTest status: the NodeReports (each written by its node's agent) are aggregated into
//!   node counts, overall and per handler, with `Ready`/`Degraded` conditions. Everything is
//!   driven by watches: a reflector keeps the NodeReports in memory, and any NodeReport
//!   change re-queues the SelfTests (the controller's queue folds a burst of 5,000 reports
//!   into one reconcile per SelfTest). No periodic list, no periodic requeue. Status is
//!   written only when it differs from what the object already carries.
//! - RuntimeClasses: one per RuntimeProfile (unless `runtimeClass.create` is false), owned
//!   through an ownerReference, so deleting the profile garbage-collects its RuntimeClass
//!   without a finalizer.
//!
//! What needs no finalizer and why: a deleted SelfTest's node labels and NodeReport entries
//! are removed by each node's agent, which sees the deletion through its own watch; the
//! NodeReport itself is owned by its Node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::node::v1::{Overhead, RuntimeClass, Scheduling};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use usernsguard_runtime::report::Verdict;

use crate::leader::{run_elected, LeaseLock, LeaseTiming};

use crate::crd::{HandlerNodeCounts, NodeCounts, NodeReport, RuntimeProfile, SelfTest, SelfTestStatus};

/// Field manager of every controller write.
pub const FIELD_MANAGER: &str = "usernsguard-controller";

/// Quiet period before a SelfTest is re-aggregated after a NodeReport change.
pub const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no name")]
    Unnamed(&'static str),
}

impl ControllerError {
    /// Bounded label for a reconcile-failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::Kube(_) => "kube",
            ControllerError::Unnamed(_) => "invalid",
        }
    }
}

/// What the reconcilers share.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    /// Every NodeReport, kept current by a watch.
    pub reports: Store<NodeReport>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("reports", &self.reports.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// SelfTest status
// ---------------------------------------------------------------------------------------------

/// Node state for one SelfTest (or one of its handlers) on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Pending,
    Done(Verdict),
}

fn count(states: impl Iterator<Item = NodeState>) -> NodeCounts {
    let mut c = NodeCounts::default();
    for s in states {
        c.total += 1;
        match s {
            NodeState::Pending => c.pending += 1,
            NodeState::Done(Verdict::Pass) => c.passed += 1,
            NodeState::Done(Verdict::Fail) => c.failed += 1,
            NodeState::Done(Verdict::Unknown) => {}
        }
    }
    c
}

fn combine(a: Verdict, b: Verdict) -> Verdict {
    match (a, b) {
        (Verdict::Fail, _) | (_, Verdict::Fail) => Verdict::Fail,
        (Verdict::Unknown, _) | (_, Verdict::Unknown) => Verdict::Unknown,
        _ => Verdict::Pass,
    }
}

/// The status the SelfTest should have, from the NodeReports. A node counts when its agent
/// reported for this SelfTest; it is pending while its results are for an older generation.
/// `now` stamps conditions whose status changed (existing ones keep their time).
pub fn desired_status(st: &SelfTest, reports: &[Arc<NodeReport>], now: Timestamp) -> SelfTestStatus {
    let name = st.name_any();
    let generation = st.meta().generation.unwrap_or(0);
    let mut overall: Vec<NodeState> = Vec::new();
    let mut per_handler: BTreeMap<String, Vec<NodeState>> = BTreeMap::new();
    let mut last_run: Option<Timestamp> = None;
    for nr in reports {
        let Some(status) = &nr.status else { continue };
        let mine: Vec<_> = status.results.iter().filter(|r| r.self_test == name).collect();
        if mine.is_empty() {
            continue;
        }
        let current = mine.iter().all(|r| r.generation >= generation);
        let mut node_verdict = Verdict::Pass;
        for r in &mine {
            last_run = last_run.max(Some(r.started_at.0));
            let state = if r.generation >= generation {
                NodeState::Done(r.report.verdict)
            } else {
                NodeState::Pending
            };
            per_handler
                .entry(r.report.handler.clone())
                .or_default()
                .push(state);
            node_verdict = combine(node_verdict, r.report.verdict);
        }
        overall.push(if current {
            NodeState::Done(node_verdict)
        } else {
            NodeState::Pending
        });
    }
    let nodes = count(overall.into_iter());
    let handlers = per_handler
        .into_iter()
        .map(|(handler, states)| HandlerNodeCounts {
            handler,
            counts: count(states.into_iter()),
        })
        .collect();
    let unknown = nodes.total - nodes.passed - nodes.failed - nodes.pending;
    let old = st.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let ready = if nodes.total == 0 {
        (
            "False",
            "NoReports",
            "no node has reported for this SelfTest yet".to_owned(),
        )
    } else if nodes.pending > 0 {
        (
            "False",
            "Pending",
            format!(
                "{} of {} nodes have not reported generation {generation}",
                nodes.pending, nodes.total
            ),
        )
    } else {
        (
            "True",
            "AllReported",
            format!("{} nodes reported generation {generation}", nodes.total),
        )
    };
    let degraded = if nodes.failed > 0 || unknown > 0 {
        (
            "True",
            "NodesFailing",
            format!(
                "{} nodes failed, {unknown} could not run the probes",
                nodes.failed
            ),
        )
    } else {
        ("False", "NoFailures", "no node failed".to_owned())
    };
    SelfTestStatus {
        observed_generation: Some(generation),
        conditions: vec![
            condition(old, "Ready", ready, generation, now),
            condition(old, "Degraded", degraded, generation, now),
        ],
        nodes: Some(nodes),
        handlers,
        last_run_time: last_run.map(Time),
    }
}

fn condition(
    old: &[Condition],
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: i64,
    now: Timestamp,
) -> Condition {
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}

/// Writes the aggregated status when it differs from the current one. Waits for the next
/// change afterwards: every input arrives by watch.
pub async fn reconcile_selftest(st: Arc<SelfTest>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    // Counting before the first complete list of NodeReports would publish zeros.
    if ctx.reports.wait_until_ready().await.is_err() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let desired = desired_status(&st, &ctx.reports.state(), Timestamp::now());
    if st.status.as_ref() == Some(&desired) {
        return Ok(Action::await_change());
    }
    let name = st
        .meta()
        .name
        .clone()
        .ok_or(ControllerError::Unnamed("SelfTest"))?;
    let api: Api<SelfTest> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": "usernsguard.io/v1alpha1", "kind": "SelfTest",
        "metadata": {"name": name},
        "status": desired,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------------
// RuntimeClass per RuntimeProfile
// ---------------------------------------------------------------------------------------------

/// The RuntimeClass a profile owns, or None when the profile opts out.
pub fn desired_runtime_class(p: &RuntimeProfile) -> Option<RuntimeClass> {
    let opts = &p.spec.runtime_class;
    if !opts.create {
        return None;
    }
    let handler = &p.spec.handler;
    let mut selector = p.spec.node_selector.clone();
    selector.insert(format!("usernsguard.io/runtime.{handler}"), "installed".into());
    if opts.require_self_test_pass {
        selector.insert(
            format!("{}{handler}", crate::agent::USERNS_LABEL_PREFIX),
            "pass".into(),
        );
    }
    let overhead = (!opts.overhead.is_empty()).then(|| Overhead {
        pod_fixed: Some(
            opts.overhead
                .iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect(),
        ),
    });
    let mut rc = RuntimeClass {
        handler: handler.clone(),
        overhead,
        scheduling: Some(Scheduling {
            node_selector: Some(selector),
            tolerations: None,
        }),
        ..RuntimeClass::default()
    };
    rc.metadata.name = Some(opts.name.clone().unwrap_or_else(|| handler.clone()));
    rc.metadata.owner_references = p.controller_owner_ref(&()).map(|o| vec![o]);
    Some(rc)
}

/// Applies the profile's RuntimeClass (server-side apply: idempotent, and only triggered by
/// a change of the profile or of the RuntimeClass itself), then records its name in the
/// profile's status if it is not there yet.
pub async fn reconcile_profile(p: Arc<RuntimeProfile>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let Some(rc) = desired_runtime_class(&p) else {
        return Ok(Action::await_change());
    };
    let rc_name = rc.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(&rc).expect("RuntimeClass serializes");
    body["apiVersion"] = json!("node.k8s.io/v1");
    body["kind"] = json!("RuntimeClass");
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Api::<RuntimeClass>::all(ctx.client.clone())
        .patch(&rc_name, &pp, &Patch::Apply(&body))
        .await?;
    let recorded = p.status.as_ref().and_then(|s| s.runtime_class_name.as_deref());
    if recorded != Some(rc_name.as_str()) {
        let name = p
            .meta()
            .name
            .clone()
            .ok_or(ControllerError::Unnamed("RuntimeProfile"))?;
        let status = json!({
            "apiVersion": "usernsguard.io/v1alpha1", "kind": "RuntimeProfile",
            "metadata": {"name": name},
            "status": {"runtimeClassName": rc_name},
        });
        Api::<RuntimeProfile>::all(ctx.client.clone())
            .patch_status(&name, &pp, &Patch::Apply(&status))
            .await?;
    }
    Ok(Action::await_change())
}

fn error_policy<K>(_obj: Arc<K>, err: &ControllerError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, kind = err.metric_label(), "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs both controllers until the future is dropped (the leader elector drops it when the
/// Lease is lost).
pub async fn run(client: Client) {
    let (reports, writer) = reflector::store::<NodeReport>();
    let report_events = watcher(Api::<NodeReport>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        reports,
    });
    let selftests = Controller::new(Api::<SelfTest>::all(client.clone()), watcher::Config::default());
    let st_store = selftests.store();
    let selftests = selftests
        // A new generation makes every node report within the same minute; debouncing folds
        // that burst into a few status writes per SelfTest instead of one per NodeReport.
        .with_config(kube::runtime::controller::Config::default().debounce(STATUS_DEBOUNCE))
        // Any NodeReport change may move any SelfTest's counts (a node that stopped being
        // selected disappears from the report, so the new object alone cannot say which
        // SelfTests it left): re-queue all of them; the queue de-duplicates.
        .watches_stream(report_events, move |_nr: NodeReport| {
            st_store
                .state()
                .iter()
                .map(|st| ObjectRef::from_obj(st.as_ref()))
                .collect::<Vec<_>>()
        })
        .run(reconcile_selftest, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let profiles = Controller::new(
        Api::<RuntimeProfile>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<RuntimeClass>::all(client), watcher::Config::default())
    .run(reconcile_profile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()));
    futures::join!(selftests, profiles);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_fixtures::{mock_client, ApiServerVerifier};
    use http::{Method, StatusCode};
    use kube::runtime::watcher::Event;
    use serde_json::Value;

    const ST_STATUS: &str =
        "/apis/usernsguard.io/v1alpha1/selftests/default/status?&force=true&fieldManager=usernsguard-controller";
    const APPLY: Option<&str> = Some("application/apply-patch+yaml");

    impl Context {
        /// A context whose client is the fake API server, with these NodeReports known.
        pub fn test(reports: Vec<NodeReport>) -> (Arc<Self>, ApiServerVerifier) {
            let (client, server) = mock_client();
            let mut writer = reflector::store::Writer::<NodeReport>::default();
            writer.apply_watcher_event(&Event::Init);
            for r in reports {
                writer.apply_watcher_event(&Event::InitApply(r));
            }
            writer.apply_watcher_event(&Event::InitDone);
            let ctx = Context {
                client,
                reports: writer.as_reader(),
            };
            // The writer must outlive the test or the store reports "writer dropped".
            std::mem::forget(writer);
            (Arc::new(ctx), server)
        }
    }

    fn reports() -> Vec<NodeReport> {
        vec![
            NodeReport::test(
                "n1",
                &[
                    ("default", "runc", 2, Verdict::Pass),
                    ("default", "crun", 2, Verdict::Pass),
                ],
            ),
            NodeReport::test(
                "n2",
                &[
                    ("default", "runc", 2, Verdict::Fail),
                    ("default", "crun", 2, Verdict::Pass),
                ],
            ),
            NodeReport::test(
                "n3",
                &[
                    ("default", "runc", 1, Verdict::Pass),
                    ("default", "crun", 1, Verdict::Pass),
                ],
            ),
            NodeReport::test("n4", &[("default", "runc", 2, Verdict::Unknown)]),
            // Results of another SelfTest, and a report without any: not counted.
            NodeReport::test("n5", &[("other", "runc", 2, Verdict::Fail)]),
            NodeReport::test("n6", &[]),
        ]
    }

    fn counts(v: &Value) -> (u64, u64, u64, u64) {
        let n = |k: &str| v[k].as_u64().unwrap();
        (n("total"), n("passed"), n("failed"), n("pending"))
    }

    #[tokio::test]
    async fn new_selftest_gets_aggregated_status_by_apply() {
        let (ctx, mut server) = Context::test(reports());
        let st = Arc::new(SelfTest::test().generation(2));
        let scenario = tokio::spawn(async move {
            let seen = server.next().await;
            seen.expect(Method::PATCH, ST_STATUS, APPLY);
            let s = &seen.body["status"];
            assert_eq!(seen.body["kind"], "SelfTest");
            assert_eq!(s["observedGeneration"], 2);
            assert_eq!(counts(&s["nodes"]), (4, 1, 1, 1), "n4 is unknown: total only");
            assert_eq!(s["handlers"][0]["handler"], "crun");
            assert_eq!(counts(&s["handlers"][0]), (3, 2, 0, 1));
            assert_eq!(s["handlers"][1]["handler"], "runc");
            assert_eq!(counts(&s["handlers"][1]), (4, 1, 1, 1));
            assert_eq!(s["conditions"][0]["type"], "Ready");
            assert_eq!(s["conditions"][0]["status"], "False");
            assert_eq!(s["conditions"][0]["reason"], "Pending");
            assert_eq!(s["conditions"][1]["type"], "Degraded");
            assert_eq!(s["conditions"][1]["status"], "True");
            assert_eq!(s["lastRunTime"], "2026-11-29T03:02:00Z");
            let mut stored = serde_json::to_value(SelfTest::test().generation(2)).unwrap();
            stored["status"] = s.clone();
            seen.reply(StatusCode::OK, &stored);
        });
        let action = reconcile_selftest(st, ctx).await.unwrap();
        assert_eq!(action, Action::await_change(), "no periodic requeue");
        crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn unchanged_selftest_status_is_not_written() {
        let (ctx, mut server) = Context::test(reports());
        let mut st = SelfTest::test().generation(2);
        st.status = Some(desired_status(
            &st,
            &ctx.reports.state(),
            "2026-11-29T03:00:00Z".parse().unwrap(),
        ));
        // Later, nothing changed: the same status (condition times kept), no request.
        let quiet = async { server.assert_quiet(Duration::from_millis(100)).await };
        let (r, ()) = tokio::join!(reconcile_selftest(Arc::new(st), ctx), quiet);
        assert_eq!(r.unwrap(), Action::await_change());
    }

    #[tokio::test]
    async fn all_passed_is_ready_and_not_degraded() {
        let reports: Vec<Arc<NodeReport>> = vec![Arc::new(NodeReport::test(
            "n1",
            &[("default", "runc", 1, Verdict::Pass)],
        ))];
        let s = desired_status(&SelfTest::test(), &reports, Timestamp::UNIX_EPOCH);
        assert_eq!(
            s.nodes.unwrap(),
            NodeCounts {
                total: 1,
                passed: 1,
                failed: 0,
                pending: 0
            }
        );
        assert_eq!(
            (s.conditions[0].type_.as_str(), s.conditions[0].status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(
            (s.conditions[1].type_.as_str(), s.conditions[1].status.as_str()),
            ("Degraded", "False")
        );
        let none = desired_status(&SelfTest::test(), &[], Timestamp::UNIX_EPOCH);
        assert_eq!(none.nodes.unwrap().total, 0);
        assert_eq!(none.conditions[0].reason, "NoReports");
    }

    #[tokio::test]
    async fn status_write_failure_is_an_error_for_the_retry_policy() {
        let (ctx, mut server) = Context::test(reports());
        let scenario = async {
            let seen = server.next().await;
            seen.expect(Method::PATCH, ST_STATUS, APPLY);
            seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        };
        let (r, ()) = tokio::join!(
            reconcile_selftest(Arc::new(SelfTest::test()), ctx.clone()),
            scenario
        );
        let err = r.unwrap_err();
        assert_eq!(err.metric_label(), "kube");
        assert_eq!(
            error_policy(Arc::new(SelfTest::test()), &err, ctx),
            Action::requeue(Duration::from_secs(15))
        );
    }

    #[tokio::test]
    async fn profile_gets_owned_runtime_class_with_selector_and_overhead() {
        let (ctx, mut server) = Context::test(vec![]);
        let mut p = RuntimeProfile::test();
        p.spec.node_selector.insert("pool".into(), "userns".into());
        p.spec
            .runtime_class
            .overhead
            .insert("memory".into(), "20Mi".into());
        let scenario = tokio::spawn(async move {
            let seen = server.next().await;
            seen.expect(
                Method::PATCH,
                "/apis/node.k8s.io/v1/runtimeclasses/crun?&force=true&fieldManager=usernsguard-controller",
                APPLY,
            );
            assert_eq!(
                seen.body,
                json!({
                    "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                    "metadata": {"name": "crun", "ownerReferences": [{
                        "apiVersion": "usernsguard.io/v1alpha1", "kind": "RuntimeProfile",
                        "name": "crun", "uid": "rtp-uid", "controller": true}]},
                    "handler": "crun",
                    "overhead": {"podFixed": {"memory": "20Mi"}},
                    "scheduling": {"nodeSelector": {
                        "pool": "userns",
                        "usernsguard.io/runtime.crun": "installed",
                        "usernsguard.io/userns.crun": "pass"}},
                })
            );
            seen.echo();
            let seen = server.next().await;
            seen.expect(
                Method::PATCH,
                "/apis/usernsguard.io/v1alpha1/runtimeprofiles/crun/status?&force=true&fieldManager=usernsguard-controller",
                APPLY,
            );
            assert_eq!(seen.body["status"], json!({"runtimeClassName": "crun"}));
            let mut stored = serde_json::to_value(RuntimeProfile::test()).unwrap();
            stored["status"] = json!({"runtimeClassName": "crun"});
            seen.reply(StatusCode::OK, &stored);
        });
        reconcile_profile(Arc::new(p), ctx).await.unwrap();
        crate::api_fixtures::finish(scenario, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn survives_an_unreachable_api_server_serving_healthz_but_not_readyz() {
        let args = ControllerArgs {
            lease_namespace: "usernsguard-system".into(),
            lease_name: "usernsguard-controller".into(),
            identity: Some("replica-a".into()),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(main_loop(crate::api_fixtures::unreachable_client(), args, tx));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !task.is_finished(),
            "the controller loop ended (crashed or returned)"
        );
        assert!(!*rx.borrow(), "ready without ever reaching the API server");
        task.abort();
    }

    fn query_param<'a>(uri: &'a str, key: &str) -> Option<&'a str> {
        uri.split_once('?')?
            .1
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    fn with_types(mut v: Value, kind: &str) -> Value {
        v["apiVersion"] = json!("usernsguard.io/v1alpha1");
        v["kind"] = json!(kind);
        v["metadata"]["resourceVersion"] = json!("101");
        v
    }

    /// The controllers as `run` wires them, for a simulated hour: a NodeReport arriving by
    /// watch re-aggregates the SelfTest; nothing is listed again and nothing requeues.
    #[tokio::test(start_paused = true)]
    async fn node_report_watch_event_updates_selftest_status_without_relisting() {
        let (client, mut server) = mock_client();
        let st = with_types(serde_json::to_value(SelfTest::test()).unwrap(), "SelfTest");
        let n1 = with_types(
            serde_json::to_value(NodeReport::test("n1", &[("default", "runc", 1, Verdict::Pass)])).unwrap(),
            "NodeReport",
        );
        let n2 = with_types(
            serde_json::to_value(NodeReport::test("n2", &[("default", "runc", 1, Verdict::Fail)])).unwrap(),
            "NodeReport",
        );
        let log: Arc<std::sync::Mutex<Vec<(Method, String)>>> = Arc::default();
        let statuses: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
        let (log2, statuses2) = (log.clone(), statuses.clone());
        let fake = tokio::spawn(async move {
            let mut report_watches = 0;
            while let Some(seen) = server.next_unbounded().await {
                log2.lock().unwrap().push((seen.method.clone(), seen.uri.clone()));
                let path = seen.uri.split('?').next().unwrap().to_owned();
                let watch = query_param(&seen.uri, "watch") == Some("true");
                let list = |kind: &str, items: Vec<Value>| json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items});
                let open = Duration::from_secs(290);
                match (seen.method.clone(), path.as_str(), watch) {
                    (Method::GET, "/apis/usernsguard.io/v1alpha1/nodereports", true) => {
                        report_watches += 1;
                        // The second watch (after the first closes at 290 s) brings n2.
                        let events = if report_watches == 2 {
                            vec![json!({"type": "ADDED", "object": n2})]
                        } else {
                            vec![]
                        };
                        seen.watch_stream(events, open);
                    }
                    (Method::GET, _, true) => seen.watch_stream(vec![], open),
                    (Method::GET, "/apis/usernsguard.io/v1alpha1/selftests", false) => {
                        seen.reply(StatusCode::OK, &list("SelfTestList", vec![st.clone()]))
                    }
                    (Method::GET, "/apis/usernsguard.io/v1alpha1/nodereports", false) => {
                        seen.reply(StatusCode::OK, &list("NodeReportList", vec![n1.clone()]))
                    }
                    (Method::GET, "/apis/usernsguard.io/v1alpha1/runtimeprofiles", false) => {
                        seen.reply(StatusCode::OK, &list("RuntimeProfileList", vec![]))
                    }
                    (Method::GET, "/apis/node.k8s.io/v1/runtimeclasses", false) => {
                        seen.reply(StatusCode::OK, &list("RuntimeClassList", vec![]))
                    }
                    (Method::PATCH, "/apis/usernsguard.io/v1alpha1/selftests/default/status", _) => {
                        assert_eq!(seen.content_type.as_deref(), APPLY);
                        statuses2.lock().unwrap().push(seen.body["status"].clone());
                        let mut stored = st.clone();
                        stored["status"] = seen.body["status"].clone();
                        seen.reply(StatusCode::OK, &stored);
                    }
                    (m, p, _) => panic!("unexpected request {m} {p}"),
                }
            }
        });
        let controllers = tokio::spawn(run(client));
        tokio::time::sleep(Duration::from_secs(3600)).await;

        let statuses = statuses.lock().unwrap().clone();
        assert_eq!(statuses.len(), 2, "{statuses:?}");
        assert_eq!(counts(&statuses[0]["nodes"]), (1, 1, 0, 0));
        assert_eq!(counts(&statuses[1]["nodes"]), (2, 1, 1, 0), "n2 arrived by watch");
        let log = log.lock().unwrap();
        let lists: Vec<_> = log
            .iter()
            .filter(|(m, u)| *m == Method::GET && query_param(u, "watch") != Some("true"))
            .collect();
        assert_eq!(
            lists.len(),
            4,
            "one initial list per watched kind, never again: {lists:?}"
        );
        assert!(!controllers.is_finished());
        controllers.abort();
        fake.abort();
    }

    #[test]
    fn runtime_class_follows_profile_options() {
        let mut p = RuntimeProfile::test();
        p.spec.runtime_class.require_self_test_pass = false;
        p.spec.runtime_class.name = Some("crun-userns".into());
        let rc = desired_runtime_class(&p).unwrap();
        assert_eq!(rc.metadata.name.as_deref(), Some("crun-userns"));
        let sel = rc.scheduling.unwrap().node_selector.unwrap();
        assert_eq!(sel.len(), 1, "{sel:?}");
        assert_eq!(sel["usernsguard.io/runtime.crun"], "installed");
        assert!(rc.overhead.is_none());
        p.spec.runtime_class.create = false;
        assert!(desired_runtime_class(&p).is_none());
    }
}

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
    #[arg(long, default_value = usernsguard_agent::server::DEFAULT_ADDR)]
    pub listen: std::net::SocketAddr,
}

/// `usernsguard controller`: in-cluster config or KUBECONFIG, then [`main_loop`] forever.
pub async fn main(args: ControllerArgs) -> anyhow::Result<()> {
    use usernsguard_agent::{metrics::Metrics, server};
    crate::init_tracing();
    // The `node` label of the controller's own series (build info) is its identity.
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let metrics = Metrics::new(&identity)?;
    let listener = server::bind(args.listen).await?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration: expected the in-cluster service account or KUBECONFIG")?;
    let (ready, ready_rx) = watch::channel(false);
    let args = ControllerArgs {
        identity: Some(identity),
        ..args
    };
    let work = main_loop(client, args, ready);
    crate::agent::serve_while(listener, metrics, ready_rx, work, server::shutdown_signal()).await
}

/// The controller process: leader election around [`run`]. `ready` latches once the Lease
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
    run_elected(lock, leading, ready, move || run(client.clone())).await;
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
