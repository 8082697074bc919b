use super::*;
use crate::testing::{finish, node_meta, store, ApiServerVerifier};
use http::{Method, StatusCode};
use serde_json::Value;

const PROFILE: &str = "/apis/usernsguard.io/v1alpha1/runtimeprofiles/crun?";
const STATUS: &str =
    "/apis/usernsguard.io/v1alpha1/runtimeprofiles/crun/status?&force=true&fieldManager=usernsguard-controller";
const RC_APPLY: &str =
    "/apis/node.k8s.io/v1/runtimeclasses/crun?&force=true&fieldManager=usernsguard-controller";
const APPLY: Option<&str> = Some("application/apply-patch+yaml");
const JSON_PATCH: Option<&str> = Some("application/json-patch+json");

fn arcs<K>(v: Vec<K>) -> Vec<Arc<K>> {
    v.into_iter().map(Arc::new).collect()
}

fn counts(s: &RuntimeProfileStatus) -> (i32, i32, i32, i32, i32) {
    let c = s.nodes.unwrap();
    (c.total, c.installed, c.pending, c.failed, c.not_reported)
}

fn cond<'a>(
    s: &'a RuntimeProfileStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

/// Five selected nodes in every state, one node not selected that still holds the install
/// (being uninstalled) and one never selected.
#[test]
fn status_counts_selected_nodes_by_install_state_of_the_current_generation() {
    let p = RuntimeProfile::test().generation(2).selecting("pool", "userns");
    let reports = arcs(vec![
        NodeReport::test("n1", &[]).with_install("crun", 2, InstallState::Installed, None),
        NodeReport::test("n2", &[]).with_install(
            "crun",
            2,
            InstallState::Pending,
            Some("waiting_for_restart_slot"),
        ),
        NodeReport::test("n3", &[]).with_install("crun", 2, InstallState::Failed, Some("sha256_mismatch")),
        NodeReport::test("n4", &[]).with_install("crun", 1, InstallState::Installed, None),
        NodeReport::test("n6", &[]).with_install("crun", 2, InstallState::Installed, None),
        NodeReport::test("n7", &[]).with_install("other", 2, InstallState::Failed, None),
    ]);
    let pool = ("pool", "userns");
    let nodes = arcs(vec![
        node_meta("n1", [pool]),
        node_meta("n2", [pool]),
        node_meta("n3", [pool]),
        node_meta("n4", [pool]),
        node_meta("n5", [pool]),
        node_meta("n6", []),
        node_meta("n7", []),
    ]);
    let s = desired_status(&p, &reports, &nodes, Some("crun".into()), Timestamp::UNIX_EPOCH);
    assert_eq!(counts(&s), (5, 1, 1, 1, 2));
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(s.runtime_class_name.as_deref(), Some("crun"));
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Installing")
    );
    assert!(ready.message.contains("waiting: n2, n4, n5"), "{}", ready.message);
    let degraded = cond(&s, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InstallFailed")
    );
    assert!(
        degraded.message.contains("n3 (sha256_mismatch)"),
        "{}",
        degraded.message
    );

    // All installed: Ready, and the transition time of an unchanged condition is kept.
    let reports = arcs(
        (1..=3)
            .map(|i| {
                NodeReport::test(&format!("n{i}"), &[]).with_install("crun", 2, InstallState::Installed, None)
            })
            .collect(),
    );
    let nodes = arcs((1..=3).map(|i| node_meta(&format!("n{i}"), [pool])).collect());
    let mut p = p;
    let first = desired_status(&p, &reports, &nodes, None, Timestamp::UNIX_EPOCH);
    assert_eq!(counts(&first), (3, 3, 0, 0, 0));
    assert_eq!(cond(&first, "Ready").status, "True");
    p.status = Some(first.clone());
    let later = desired_status(
        &p,
        &reports,
        &nodes,
        None,
        "2026-11-30T00:00:00Z".parse().unwrap(),
    );
    assert_eq!(
        later, first,
        "nothing changed: the same status, so nothing is written"
    );
}

#[test]
fn a_deleted_profile_counts_the_nodes_still_holding_it() {
    let p = RuntimeProfile::test().deleting();
    let reports = arcs(vec![
        NodeReport::test("n1", &[]).with_install("crun", 1, InstallState::Installed, None),
        NodeReport::test("n2", &[]).with_install("crun", 1, InstallState::Failed, Some("uninstall_failed")),
        NodeReport::test("n3", &[]),
    ]);
    let nodes = arcs(vec![
        node_meta("n1", []),
        node_meta("n2", []),
        node_meta("n3", []),
    ]);
    let s = desired_status(&p, &reports, &nodes, None, Timestamp::UNIX_EPOCH);
    assert_eq!(counts(&s), (2, 1, 0, 1, 0));
    let ready = cond(&s, "Ready");
    assert_eq!(ready.reason, "Uninstalling");
    assert!(ready.message.contains("n1, n2"), "{}", ready.message);
    assert_eq!(holders(&p, &reports), ["n1", "n2"]);
}

fn context(
    reports: Vec<NodeReport>,
    nodes: Vec<PartialObjectMeta<Node>>,
) -> (Arc<Context>, ApiServerVerifier) {
    Context::test_with_nodes(reports, nodes)
}

fn echo_profile(seen: crate::testing::Seen, p: &RuntimeProfile) {
    let stored = serde_json::to_value(p).unwrap();
    seen.reply(StatusCode::OK, &stored);
}

/// A new profile: the finalizer is added first (a JSON patch testing that there was none),
/// then its RuntimeClass applied, then its status written.
#[tokio::test]
async fn a_new_profile_gets_the_finalizer_its_runtime_class_and_a_status() {
    let (ctx, mut server) = context(vec![], vec![node_meta("n1", [("pool", "userns")])]);
    let mut p = RuntimeProfile::test().selecting("pool", "userns");
    p.spec
        .runtime_class
        .overhead
        .insert("memory".into(), "20Mi".into());
    let p2 = p.clone();
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(
            Method::PATCH,
            &format!("{PROFILE}&fieldManager=usernsguard-controller"),
            JSON_PATCH,
        );
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["usernsguard.io/uninstall"]},
            ])
        );
        echo_profile(seen, &p2);
        let seen = server.next().await;
        seen.expect(Method::PATCH, RC_APPLY, APPLY);
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
        seen.expect(Method::PATCH, STATUS, APPLY);
        let status = seen.body["status"].clone();
        assert_eq!(status["runtimeClassName"], "crun");
        assert_eq!(
            status["nodes"],
            json!({"total": 1, "installed": 0, "pending": 0, "failed": 0, "notReported": 1})
        );
        assert_eq!(status["conditions"][0]["reason"], "Installing");
        echo_profile(seen, &p2);
    });
    reconcile_profile(Arc::new(p), ctx).await.unwrap();
    finish(scenario, Duration::from_secs(1)).await;
}

/// Finalizer present, RuntimeClass as wanted (labels added by someone else do not count),
/// status current: a reconcile triggered by some NodeReport change sends nothing.
#[tokio::test]
async fn a_profile_in_place_sends_nothing() {
    let reports = vec![NodeReport::test("n1", &[]).with_install("crun", 1, InstallState::Installed, None)];
    let nodes = vec![node_meta("n1", [])];
    let (ctx, mut server) = context(reports.clone(), nodes.clone());
    let mut rc = runtime_class::desired_runtime_class(&RuntimeProfile::test()).unwrap();
    rc.metadata.labels = Some([("team".to_owned(), "platform".to_owned())].into());
    let ctx = Arc::new(Context {
        runtime_classes: store(vec![rc]),
        ..(*ctx).clone()
    });
    let mut p = RuntimeProfile::test();
    p.metadata.finalizers = Some(vec![UNINSTALL_FINALIZER.into()]);
    p.status = Some(desired_status(
        &p,
        &arcs(reports),
        &arcs(nodes),
        Some("crun".into()),
        Timestamp::UNIX_EPOCH,
    ));
    reconcile_profile(Arc::new(p), ctx).await.unwrap();
    server.assert_quiet(Duration::from_millis(50)).await;
}

/// Deleted while n1 still holds the install: the finalizer stays and the status says who is
/// left; once n1's entry is gone, exactly our finalizer entry is removed (test + remove at
/// its index, another controller's finalizer kept).
#[tokio::test]
async fn the_finalizer_is_released_only_when_no_node_holds_the_install() {
    let holding = vec![NodeReport::test("n1", &[]).with_install("crun", 1, InstallState::Installed, None)];
    let (ctx, mut server) = context(holding, vec![node_meta("n1", [])]);
    let mut p = RuntimeProfile::test().deleting();
    p.metadata.finalizers = Some(vec!["example.com/other".into(), UNINSTALL_FINALIZER.into()]);
    let p2 = p.clone();
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(Method::PATCH, STATUS, APPLY);
        assert_eq!(seen.body["status"]["conditions"][0]["reason"], "Uninstalling");
        assert_eq!(seen.body["status"]["nodes"]["total"], 1);
        echo_profile(seen, &p2);
        server
    });
    reconcile_profile(Arc::new(p.clone()), ctx).await.unwrap();
    let mut server = finish(scenario, Duration::from_secs(1)).await;

    let (ctx, mut server2) = context(vec![NodeReport::test("n1", &[])], vec![node_meta("n1", [])]);
    std::mem::swap(&mut server, &mut server2);
    let p2 = p.clone();
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(
            Method::PATCH,
            &format!("{PROFILE}&fieldManager=usernsguard-controller"),
            JSON_PATCH,
        );
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": "usernsguard.io/uninstall"},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
        echo_profile(seen, &p2);
        server.assert_quiet(Duration::from_millis(50)).await;
    });
    reconcile_profile(Arc::new(p), ctx).await.unwrap();
    finish(scenario, Duration::from_secs(1)).await;
}

/// `runtimeClass.create` switched off: the RuntimeClass this profile created is deleted,
/// and the status no longer names it. One with that name owned by someone else is kept.
#[tokio::test]
async fn switching_create_off_deletes_only_the_runtime_class_the_profile_owns() {
    let owned = runtime_class::desired_runtime_class(&RuntimeProfile::test()).unwrap();
    for (rc, deleted) in [
        (owned.clone(), true),
        (
            {
                let mut other = owned.clone();
                other.metadata.owner_references = None;
                other
            },
            false,
        ),
    ] {
        let (ctx, mut server) = context(vec![], vec![]);
        let ctx = Arc::new(Context {
            runtime_classes: store(vec![rc]),
            ..(*ctx).clone()
        });
        let mut p = RuntimeProfile::test();
        p.metadata.finalizers = Some(vec![UNINSTALL_FINALIZER.into()]);
        p.spec.runtime_class.create = false;
        p.status = Some(RuntimeProfileStatus {
            runtime_class_name: Some("crun".into()),
            ..RuntimeProfileStatus::default()
        });
        let p2 = p.clone();
        let scenario = tokio::spawn(async move {
            if deleted {
                let seen = server.next().await;
                seen.expect(
                    Method::DELETE,
                    "/apis/node.k8s.io/v1/runtimeclasses/crun?",
                    Some("application/json"),
                );
                seen.reply(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                );
            }
            let seen = server.next().await;
            seen.expect(Method::PATCH, STATUS, APPLY);
            assert_eq!(seen.body["status"].get("runtimeClassName"), None::<&Value>);
            echo_profile(seen, &p2);
        });
        reconcile_profile(Arc::new(p), ctx).await.unwrap();
        finish(scenario, Duration::from_secs(1)).await;
    }
}

/// Another profile (or an operator) already has a RuntimeClass of the name this profile
/// wants: it is not taken over (no apply), the status names no RuntimeClass and Degraded
/// says whose it is.
#[tokio::test]
async fn a_runtime_class_owned_by_someone_else_is_left_alone_and_reported() {
    let (ctx, mut server) = context(vec![], vec![]);
    let mut theirs =
        runtime_class::desired_runtime_class(&RuntimeProfile::test().named("crun-b", "crun")).unwrap();
    theirs.metadata.name = Some("crun".into());
    let ctx = Arc::new(Context {
        runtime_classes: store(vec![theirs]),
        ..(*ctx).clone()
    });
    let mut p = RuntimeProfile::test();
    p.metadata.finalizers = Some(vec![UNINSTALL_FINALIZER.into()]);
    let p2 = p.clone();
    let scenario = tokio::spawn(async move {
        let seen = server.next().await;
        seen.expect(Method::PATCH, STATUS, APPLY);
        assert_eq!(seen.body["status"].get("runtimeClassName"), None::<&Value>);
        let degraded = &seen.body["status"]["conditions"][1];
        assert_eq!(degraded["type"], "Degraded");
        assert_eq!(degraded["status"], "True");
        assert_eq!(degraded["reason"], "RuntimeClassConflict");
        assert_eq!(
            degraded["message"],
            "RuntimeClass crun exists and belongs to RuntimeProfile crun-b; set runtimeClass.name"
        );
        echo_profile(seen, &p2);
    });
    reconcile_profile(Arc::new(p), ctx).await.unwrap();
    finish(scenario, Duration::from_secs(1)).await;
}
