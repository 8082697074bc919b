//! `usernsguard controller`: the cluster-wide reconcilers, run by the one replica that holds
//! the leader Lease ([`leader`]).
//!
//! - [`selftest_status`]: SelfTest status aggregated from the NodeReports. A reflector keeps
//!   the NodeReports in memory, and any NodeReport change re-queues the SelfTests, at most
//!   once per [`STATUS_DEBOUNCE`] (a burst of 5,000 reports becomes a few reconciles per
//!   SelfTest). No periodic list, no periodic requeue.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector;
use kube::runtime::utils::{predicates, PredicateConfig};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client};

use crate::crd::{NodeReport, RuntimeProfile, SelfTest};
use context::{error_policy, Context};
use runtime_profile::reconcile_profile;
use selftest_status::reconcile_selftest;

/// At most one re-aggregation of every SelfTest and RuntimeProfile per this period while
/// NodeReports or node labels change.
pub const STATUS_DEBOUNCE: Duration = Duration::from_secs(2);

/// Runs both controllers until the future is dropped (the leader elector drops it when the
/// Lease is lost).
pub async fn run(client: Client) {
    // Any NodeReport or Node label change may move any SelfTest's or profile's counts (a node
    // that stopped being selected disappears from the report, so the new object alone cannot
    // say which ones it left): each re-queues all of them, through a one-slot channel per
    // controller, so a burst becomes one trigger, throttled (see `throttled`). The first
    // complete list of each kind triggers nothing: both controllers reconcile everything at
    // start, once the stores are ready.
    let (st_tx, st_rx) = futures::channel::mpsc::channel::<()>(1);
    let (rp_tx, rp_rx) = futures::channel::mpsc::channel::<()>(1);
    let trigger = move |listed: Arc<AtomicBool>| {
        let (mut st_tx, mut rp_tx) = (st_tx.clone(), rp_tx.clone());
        move || {
            if listed.load(Ordering::Relaxed) {
                let _ = st_tx.try_send(());
                let _ = rp_tx.try_send(());
            }
        }
    };
    let (reports_listed, nodes_listed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (mut report_changed, mut node_changed) =
        (trigger(reports_listed.clone()), trigger(nodes_listed.clone()));
    let (reports, writer) = reflector::store::<NodeReport>();
    let report_events = watcher(Api::<NodeReport>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |ev| mark_listed(ev, &reports_listed))
        .touched_objects()
        .inspect(move |_| report_changed());
    let (nodes, node_writer) = reflector::store::<PartialObjectMeta<Node>>();
    // Only label changes move a node in or out of a selection; the kubelet's status updates
    // reach the metadata watch too and are dropped here.
    let node_events = watcher(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(node_writer)
    .inspect(move |ev| mark_listed(ev, &nodes_listed))
    .touched_objects()
    .predicate_filter(predicates::labels, PredicateConfig::default())
    .inspect(move |_| node_changed());
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
    let selftests = Controller::new(Api::<SelfTest>::all(client.clone()), watcher::Config::default())
        .reconcile_all_on(throttled(st_rx))
        .run(reconcile_selftest, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let profiles = Controller::new(Api::<RuntimeProfile>::all(client), watcher::Config::default())
        .owns_stream(rc_events)
        .reconcile_all_on(throttled(rp_rx))
        .run(reconcile_profile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let reflectors = futures::future::join(
        report_events.for_each(|_| futures::future::ready(())),
        node_events.for_each(|_| futures::future::ready(())),
    );
    futures::join!(selftests, profiles, reflectors);
}

/// Latches once the first complete list has gone by.
fn mark_listed<K>(ev: &Result<watcher::Event<K>, watcher::Error>, listed: &AtomicBool) {
    if matches!(ev, Ok(watcher::Event::InitDone)) {
        listed.store(true, Ordering::Relaxed);
    }
}

/// At most one trigger per [`STATUS_DEBOUNCE`]: the first of a burst waits out the period
/// while the rest fold into the one queued slot. A new SelfTest generation makes every node
/// report within the same minute; this turns that into a few status writes instead of one
/// per NodeReport. Not the controller's `debounce`, which restarts its window on every
/// trigger: under the steady stream of a large cluster (5,000 nodes, several NodeReport
/// writes per second) it would never fire.
fn throttled(rx: futures::channel::mpsc::Receiver<()>) -> impl futures::Stream<Item = ()> {
    rx.then(|()| tokio::time::sleep(STATUS_DEBOUNCE))
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

    /// NodeReports changing every half second for 10 s (a large cluster's steady state)
    /// still re-aggregate every STATUS_DEBOUNCE, not never, and not on every change.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_changes_still_reaggregates_every_period() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<()>(1);
        let feeder = tokio::spawn(async move {
            loop {
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let fired = throttled(rx)
            .take_until(tokio::time::sleep(Duration::from_secs(10)))
            .count()
            .await;
        feeder.abort();
        assert!((4..=5).contains(&fired), "{fired} re-aggregations in 10 s");
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
