//! `usernsguard controller`: the cluster-wide reconcilers, run by the one replica that holds
//! the leader Lease ([`leader`]).
//!
//! - [`selftest_status`]: SelfTest status aggregated from the NodeReports. A reflector keeps
//!   the NodeReports in memory, and any NodeReport change re-queues the SelfTests (the
//!   controller's queue folds a burst of 5,000 reports into one reconcile per SelfTest). No
//!   periodic list, no periodic requeue.
//! - [`runtime_profile`]: per RuntimeProfile, the uninstall finalizer, its RuntimeClass
//!   ([`runtime_class`]) and its status from the NodeReports' installs, re-queued the same way.
//! - [`uninstall`]: `--uninstall-all`, the chart's pre-delete hook (not a reconciler).
//!
//! What needs no finalizer and why: a deleted SelfTest's node labels and NodeReport entries
//! are removed by each node's agent, which sees the deletion through its own watch; the
//! NodeReport itself is owned by its Node; a RuntimeClass is owned by its RuntimeProfile. A
//! RuntimeProfile does have one: its runtime must leave every node before it goes.

pub mod context;
pub mod leader;
pub mod runtime_class;
pub mod runtime_profile;
pub mod selftest_status;
pub mod uninstall;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::{predicates, PredicateConfig};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client};

use crate::crd::{NodeReport, RuntimeProfile, SelfTest};
use context::{error_policy, Context};
use runtime_profile::reconcile_profile;
use selftest_status::reconcile_selftest;

/// Quiet period before a SelfTest or RuntimeProfile is re-aggregated after a NodeReport change.
pub const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);

/// Runs both controllers until the future is dropped (the leader elector drops it when the
/// Lease is lost).
pub async fn run(client: Client) {
    // NodeReport and Node label changes re-queue every profile as well: a one-slot channel
    // per source, so a burst becomes one trigger (the controller de-duplicates the rest).
    let (mut report_tx, report_rx) = futures::channel::mpsc::channel::<()>(1);
    let (mut node_tx, node_rx) = futures::channel::mpsc::channel::<()>(1);
    let (reports, writer) = reflector::store::<NodeReport>();
    let report_events = watcher(Api::<NodeReport>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .inspect(move |_| {
            let _ = report_tx.try_send(());
        });
    let (nodes, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
    // Only label changes move a node in or out of a selection; the kubelet's status updates
    // reach the metadata watch too and are dropped here.
    let node_events = watcher(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(node_writer)
    .touched_objects()
    .predicate_filter(predicates::labels, PredicateConfig::default())
    .inspect(move |_| {
        let _ = node_tx.try_send(());
    });
    let (runtime_classes, rc_writer) = reflector::store::<RuntimeClass>();
    let rc_events = watcher(
        Api::<RuntimeClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(rc_writer)
    .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        reports,
        nodes,
        runtime_classes,
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
        .watches_stream(report_events, {
            let st_store = st_store.clone();
            move |_nr: NodeReport| all_of(&st_store)
        })
        .watches_stream(node_events, move |_node: PartialObjectMeta<Node>| {
            all_of(&st_store)
        })
        .run(reconcile_selftest, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let profiles = Controller::new(Api::<RuntimeProfile>::all(client), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().debounce(STATUS_DEBOUNCE))
        .owns_stream(rc_events)
        .reconcile_all_on(futures::stream::select(report_rx, node_rx))
        .run(reconcile_profile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    futures::join!(selftests, profiles);
}

/// Every SelfTest, to re-queue: the queue de-duplicates and debounces.
fn all_of(store: &reflector::Store<SelfTest>) -> Vec<ObjectRef<SelfTest>> {
    store
        .state()
        .iter()
        .map(|st| ObjectRef::from_obj(st.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mock_client;
    use http::{Method, StatusCode};
    use serde_json::{json, Value};
    use usernsguard_runtime::report::Verdict;

    const APPLY: Option<&str> = Some("application/apply-patch+yaml");

    fn counts(v: &Value) -> (u64, u64, u64, u64) {
        let n = |k: &str| v[k].as_u64().unwrap();
        (n("total"), n("passed"), n("failed"), n("pending"))
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
                    (Method::GET, "/api/v1/nodes", false) => {
                        seen.reply(StatusCode::OK, &list("PartialObjectMetadataList", vec![]))
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
            5,
            "one initial list per watched kind (SelfTests, NodeReports, Node metadata, \
             RuntimeProfiles, RuntimeClasses), never again: {lists:?}"
        );
        assert!(!controllers.is_finished());
        controllers.abort();
        fake.abort();
    }
}
