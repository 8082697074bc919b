//! SelfTest status: the NodeReports (each written by its node's agent) are aggregated into
//! node counts, overall and per handler, with `Ready`/`Degraded` conditions. Everything is
//! driven by watches (see [`super::run`]); status is written only when it differs from what
//! the object already carries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use usernsguard_runtime::report::Verdict;

use super::context::{condition, Context, ControllerError};
use crate::crd::names::{self, CONDITION_DEGRADED, CONDITION_READY, CONTROLLER_FIELD_MANAGER};
use crate::crd::{HandlerNodeCounts, NodeCounts, NodeReport, SelfTest, SelfTestStatus};

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

/// The status the SelfTest should have, from the NodeReports and the cluster's nodes. A node
/// counts when the SelfTest selects it or its agent reported for it; it is pending while its
/// results are for an older generation, and not reported while it has none (so a node whose
/// agent is down, or found nothing to probe, shows as such instead of vanishing). `now`
/// stamps conditions whose status changed (existing ones keep their time).
pub fn desired_status(
    st: &SelfTest,
    reports: &[Arc<NodeReport>],
    nodes: &[Arc<PartialObjectMeta<Node>>],
    now: Timestamp,
) -> SelfTestStatus {
    let name = st.name_any();
    let generation = st.meta().generation.unwrap_or(0);
    let mut overall: Vec<NodeState> = Vec::new();
    let mut per_handler: BTreeMap<String, Vec<NodeState>> = BTreeMap::new();
    let mut last_run: Option<Timestamp> = None;
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut explained = 0;
    for nr in reports {
        let Some(status) = &nr.status else { continue };
        let mine: Vec<_> = status.results.iter().filter(|r| r.self_test == name).collect();
        if mine.is_empty() {
            explained += i32::from(status.problems.iter().any(|p| p.self_test == name));
            continue;
        }
        reported.insert(nr.name_any());
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
    let not_reported = nodes
        .iter()
        .filter(|n| st.spec.selects(n.labels()) && !reported.contains(&n.name_any()))
        .count() as i32;
    let mut nodes = count(overall.into_iter());
    nodes.total += not_reported;
    nodes.not_reported = not_reported;
    let handlers = per_handler
        .into_iter()
        .map(|(handler, states)| HandlerNodeCounts {
            handler,
            counts: count(states.into_iter()),
        })
        .collect();
    let unknown = nodes.total - nodes.passed - nodes.failed - nodes.pending - nodes.not_reported;
    let old = st.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let ready = if nodes.total == 0 {
        (
            "False",
            "NoReports",
            "no node has reported for this SelfTest yet".to_owned(),
        )
    } else if nodes.not_reported > 0 {
        (
            "False",
            "NodesNotReporting",
            format!(
                "{not_reported} of {} selected nodes have no result: no agent there, or it found nothing to probe \
                 ({} of them say why in their NodeReport's problems)",
                nodes.total,
                explained.min(not_reported)
            ),
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
            condition(old, CONDITION_READY, ready, generation, now),
            condition(old, CONDITION_DEGRADED, degraded, generation, now),
        ],
        nodes: Some(nodes),
        handlers,
        last_run_time: last_run.map(Time),
    }
}

/// Writes the aggregated status when it differs from the current one. Waits for the next
/// change afterwards: every input arrives by watch.
pub async fn reconcile_selftest(st: Arc<SelfTest>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    // Counting before the first complete list of NodeReports would publish zeros.
    if ctx.reports.wait_until_ready().await.is_err() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if ctx.nodes.wait_until_ready().await.is_err() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let desired = desired_status(&st, &ctx.reports.state(), &ctx.nodes.state(), Timestamp::now());
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
        "apiVersion": names::API_VERSION, "kind": "SelfTest",
        "metadata": {"name": name},
        "status": desired,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(CONTROLLER_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::context::error_policy;

    use http::{Method, StatusCode};
    use serde_json::Value;

    const ST_STATUS: &str =
        "/apis/usernsguard.io/v1alpha1/selftests/default/status?&force=true&fieldManager=usernsguard-controller";
    const APPLY: Option<&str> = Some("application/apply-patch+yaml");

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
        crate::testing::finish(scenario, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn unchanged_selftest_status_is_not_written() {
        let (ctx, mut server) = Context::test(reports());
        let mut st = SelfTest::test().generation(2);
        st.status = Some(desired_status(
            &st,
            &ctx.reports.state(),
            &ctx.nodes.state(),
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
        let s = desired_status(&SelfTest::test(), &reports, &[], Timestamp::UNIX_EPOCH);
        assert_eq!(
            s.nodes.unwrap(),
            NodeCounts {
                total: 1,
                passed: 1,
                failed: 0,
                pending: 0,
                not_reported: 0,
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
        let none = desired_status(&SelfTest::test(), &[], &[], Timestamp::UNIX_EPOCH);
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

    /// Selected nodes that never reported count, and say why when their agent could: a
    /// SelfTest whose nodes are silent is not `AllReported`.
    #[tokio::test]
    async fn selected_nodes_without_results_are_counted_as_not_reported() {
        use crate::crd::SelfTestProblem;
        use crate::testing::node_meta;
        let mut silent = NodeReport::test("n3", &[]);
        silent.status.as_mut().unwrap().problems = vec![SelfTestProblem {
            self_test: "default".into(),
            message: "no containerd or CRI-O configuration on this node".into(),
        }];
        let reports: Vec<Arc<NodeReport>> = vec![
            Arc::new(NodeReport::test("n1", &[("default", "runc", 1, Verdict::Pass)])),
            Arc::new(silent),
        ];
        let nodes: Vec<Arc<PartialObjectMeta<Node>>> = vec![
            Arc::new(node_meta("n1", [("pool", "userns")])),
            Arc::new(node_meta("n2", [("pool", "userns")])),
            Arc::new(node_meta("n3", [("pool", "userns")])),
            Arc::new(node_meta("n4", [("pool", "other")])),
        ];
        let st = SelfTest::test().selecting("pool", "userns");
        let s = desired_status(&st, &reports, &nodes, Timestamp::UNIX_EPOCH);
        let counts = s.nodes.unwrap();
        assert_eq!(
            (counts.total, counts.passed, counts.not_reported),
            (3, 1, 2),
            "n2 (no agent) and n3 (nothing to probe) are selected and silent; n4 is not selected"
        );
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NodesNotReporting")
        );
        assert!(
            ready.message.contains("2 of 3 selected nodes have no result"),
            "{}",
            ready.message
        );
        assert!(ready.message.contains("(1 of them say why"), "{}", ready.message);
        assert_eq!(s.conditions[1].status, "False", "silence is not a failure");
    }
}
