use std::time::Duration;

use super::*;
use crate::node::handlers::{HandlerSet, NodeHandlers};
use crate::testing::*;
use serde_json::{json, Value};

fn real_classifier() -> Classifier {
    Arc::new(usernsguard_runtime::classify::classify)
}

/// A counter of node-a (default handler runc, RuntimeClass crun-userns -> crun) whose first
/// lists, empty, are done: everything applied is live.
fn counter() -> FailureCounter {
    let mut c = fresh();
    let now = Instant::now();
    c.begin_list_pods();
    c.end_list_pods(now);
    c.begin_list_events();
    c.end_list_events();
    c
}

/// Like [`counter`], before any list.
fn fresh() -> FailureCounter {
    let mut c = FailureCounter::new("node-a", "runc", real_classifier());
    c.begin_list_classes();
    c.apply_runtime_class(&runtime_class("crun-userns", "crun"));
    c.end_list_classes();
    c
}

fn mq(count: i32) -> Event {
    EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE)
        .count(count)
        .build()
}

fn failure(handler: &str, delta: u64) -> Option<Failure> {
    Some(Failure {
        handler: handler.into(),
        reason: Reason::MqueueSetxattr,
        delta,
    })
}

fn failures(handler: &str, reason: Reason, delta: u64) -> Vec<Failure> {
    vec![Failure {
        handler: handler.into(),
        reason,
        delta,
    }]
}

#[test]
fn new_event_counts_all_occurrences_then_only_increases() {
    let mut c = counter();
    let now = Instant::now();
    c.apply_pod(
        &PodFixture::userns("pod-1").runtime_class("crun-userns").build(),
        now,
    );
    assert_eq!(c.apply_event(&mq(1), now), failure("crun", 1));
    assert_eq!(
        c.apply_event(&mq(1), now),
        None,
        "a repeated delivery is not an occurrence"
    );
    assert_eq!(c.apply_event(&mq(5), now), failure("crun", 4));
    assert_eq!(c.apply_event(&mq(3), now), None, "a count never goes back");
    assert_eq!(c.apply_event(&mq(6), now), failure("crun", 1));
}

/// The baseline is what the first list delivers, whatever the timestamps say: an event in
/// it created a second ago is not counted, one first seen after it is counted in full even
/// if its creationTimestamp is a day old, and so is one first seen in a re-list.
#[test]
fn the_first_list_is_the_baseline_and_everything_first_seen_later_is_new() {
    let mut c = fresh();
    let now = Instant::now();
    let just_now = jiff::Timestamp::now().to_string();
    c.begin_list_pods();
    c.apply_pod(&PodFixture::userns("pod-1").build(), now);
    c.end_list_pods(now);
    c.begin_list_events();
    let listed = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE)
        .count(5)
        .created(&just_now);
    assert_eq!(c.apply_event(&listed.build(), now), None);
    c.end_list_events();
    assert_eq!(
        c.apply_event(&listed.clone().count(6).build(), now),
        failure("runc", 1),
        "default handler"
    );
    let old = EventFixture::sandbox("ev-2", "pod-1", MQUEUE_MESSAGE)
        .count(3)
        .created("2020-01-01T00:00:00Z");
    assert_eq!(c.apply_event(&old.build(), now), failure("runc", 3));

    // A re-list (after 410 Gone): known events add their increase, an event created while
    // the watch was down is new in all its occurrences, and one not re-listed is forgotten.
    c.begin_list_events();
    assert_eq!(
        c.apply_event(&listed.clone().count(7).build(), now),
        failure("runc", 1)
    );
    let during_outage = EventFixture::sandbox("ev-3", "pod-1", MQUEUE_MESSAGE).count(2);
    assert_eq!(c.apply_event(&during_outage.build(), now), failure("runc", 2));
    c.end_list_events();
    assert_eq!(c.tracked().0, 2, "ev-2 was deleted during the outage");
    c.delete_event(&listed.build());
    assert_eq!(c.tracked().0, 1);
}

#[test]
fn series_count_is_used_when_larger_than_count() {
    let mut c = counter();
    let now = Instant::now();
    c.apply_pod(&PodFixture::userns("pod-1").build(), now);
    let ev = |series| {
        EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE)
            .series(None, series)
            .build()
    };
    assert_eq!(occurrences(&ev(2)), 2);
    assert_eq!(c.apply_event(&ev(2), now), failure("runc", 2));
    assert_eq!(c.apply_event(&ev(7), now), failure("runc", 5));
    let both = EventFixture::sandbox("x", "p", "").series(Some(9), 4).build();
    assert_eq!(occurrences(&both), 9);
    let neither = EventFixture::sandbox("x", "p", "").series(None, 0).build();
    assert_eq!(occurrences(&neither), 1);
}

#[test]
fn unrelated_other_nodes_and_host_users_pods_are_not_counted() {
    let mut c = counter();
    let now = Instant::now();
    c.apply_pod(&PodFixture::userns("pod-1").build(), now);
    c.apply_pod(&PodFixture::userns("pod-2").host_users(None).build(), now);
    let cni = EventFixture::sandbox("ev-cni", "pod-1", CNI_MESSAGE).count(3);
    assert_eq!(c.apply_event(&cni.build(), now), None);
    let host_pod = EventFixture::sandbox("ev-2", "pod-2", MQUEUE_MESSAGE).count(2);
    assert_eq!(c.apply_event(&host_pod.build(), now), None);
    let elsewhere = EventFixture::sandbox("ev-3", "pod-1", MQUEUE_MESSAGE).host("node-b");
    assert_eq!(c.apply_event(&elsewhere.build(), now), None);
    assert_eq!(c.tracked().0, 2, "other nodes' events keep no state");
}

#[test]
fn event_before_its_pod_waits_for_the_pod_and_expires() {
    let mut c = counter();
    let now = Instant::now();
    assert_eq!(c.apply_event(&mq(2), now), None);
    let out = c.apply_pod(
        &PodFixture::userns("pod-1").runtime_class("crun-userns").build(),
        now,
    );
    assert_eq!(out.failures, vec![failure("crun", 2).unwrap()]);
    assert_eq!(out.started, None);

    let late = EventFixture::sandbox("ev-9", "pod-9", MQUEUE_MESSAGE).build();
    assert_eq!(c.apply_event(&late, now), None);
    // Ten minutes later, with no pod-9 ever seen, the parked failure is dropped.
    c.apply_event(&mq(2), now + PENDING_TTL);
    let out = c.apply_pod(&PodFixture::userns("pod-9").build(), now + PENDING_TTL);
    assert_eq!(out.failures, vec![]);
}

/// The pod watch delivers the deletion before the event watch delivers the pod's last
/// sandbox failures: they are attributed to what the pod was and counted once.
#[test]
fn events_after_the_pods_deletion_are_counted_once() {
    let mut c = counter();
    let now = Instant::now();
    let pod = PodFixture::userns("pod-1").runtime_class("crun-userns");
    c.apply_pod(&pod.build(), now);
    assert_eq!(c.delete_pod(&pod.build(), now), vec![]);
    assert_eq!(c.tracked().1, 0);
    assert_eq!(c.apply_event(&mq(2), now), failure("crun", 2));
    assert_eq!(c.apply_event(&mq(2), now), None, "re-delivered");
    c.begin_list_events();
    assert_eq!(c.apply_event(&mq(2), now), None, "re-listed");
    c.end_list_events();
    assert_eq!(c.apply_event(&mq(3), now), failure("crun", 1));

    // A pod that vanished while the pod watch was down is remembered the same way.
    let pod2 = PodFixture::userns("pod-2");
    c.apply_pod(&pod2.build(), now);
    c.begin_list_pods();
    c.end_list_pods(now);
    let ev = EventFixture::sandbox("ev-2", "pod-2", MQUEUE_MESSAGE);
    assert_eq!(c.apply_event(&ev.build(), now), failure("runc", 1));
    // A deleted pod with host users stays uncounted.
    let host = PodFixture::userns("pod-3").host_users(Some(true));
    c.apply_pod(&host.build(), now);
    c.delete_pod(&host.build(), now);
    let ev = EventFixture::sandbox("ev-3", "pod-3", MQUEUE_MESSAGE);
    assert_eq!(c.apply_event(&ev.build(), now), None);
    assert!(c.pending.is_empty(), "known, not parked");

    // Bounded in time: after an hour (the events' own TTL) the pod is forgotten.
    let later = now + DELETED_POD_TTL;
    let ev = EventFixture::sandbox("ev-4", "pod-1", MQUEUE_MESSAGE);
    assert_eq!(c.apply_event(&ev.build(), later), None);
    assert_eq!(c.tracked().2, 0);
}

#[test]
fn deleted_pods_are_remembered_up_to_a_bound() {
    let mut c = counter();
    let now = Instant::now();
    for i in 0..=DELETED_PODS_MAX {
        let p = PodFixture::userns(&format!("p{i}")).build();
        c.apply_pod(&p, now);
        c.delete_pod(&p, now);
    }
    assert_eq!(c.tracked().2, DELETED_PODS_MAX);
    let first = EventFixture::sandbox("ev-a", "p0", MQUEUE_MESSAGE);
    assert_eq!(
        c.apply_event(&first.build(), now),
        None,
        "the oldest was forgotten"
    );
    let last = EventFixture::sandbox("ev-b", &format!("p{DELETED_PODS_MAX}"), MQUEUE_MESSAGE);
    assert_eq!(c.apply_event(&last.build(), now), failure("runc", 1));
}

#[test]
fn pod_starts_count_once_and_running_pods_of_the_first_list_are_a_baseline() {
    let mut c = fresh();
    let now = Instant::now();
    c.begin_list_pods();
    let before = PodFixture::userns("old")
        .phase("Running")
        .started(&jiff::Timestamp::now().to_string());
    assert_eq!(c.apply_pod(&before.build(), now).started, None);
    let pending = PodFixture::userns("pending").runtime_class("crun-userns");
    assert_eq!(c.apply_pod(&pending.build(), now).started, None);
    c.end_list_pods(now);
    assert_eq!(c.apply_pod(&before.rv("2").build(), now).started, None);

    let running = pending.phase("Running");
    assert_eq!(c.apply_pod(&running.build(), now).started, Some("crun".into()));
    assert_eq!(
        c.apply_pod(&running.build(), now).started,
        None,
        "counted once per UID"
    );
    // First seen after the first list, running: a start, however old its startTime.
    let late = PodFixture::userns("late")
        .phase("Running")
        .started("2020-01-01T00:00:00Z");
    assert_eq!(c.apply_pod(&late.build(), now).started, Some("runc".into()));
    let host = PodFixture::userns("host").host_users(Some(true)).phase("Running");
    assert_eq!(c.apply_pod(&host.build(), now).started, None);

    // A pod created while the watch was down shows up running in the re-list: a start.
    c.begin_list_pods();
    c.apply_pod(&running.build(), now);
    let outage = PodFixture::userns("outage").phase("Running");
    assert_eq!(c.apply_pod(&outage.build(), now).started, Some("runc".into()));
    c.end_list_pods(now);
    assert_eq!(c.tracked().1, 2);
}

#[test]
fn unknown_runtime_class_falls_back_to_its_name_and_no_class_to_the_default() {
    let mut c = counter();
    let now = Instant::now();
    let pod = PodFixture::userns("pod-1").runtime_class("kata").phase("Running");
    assert_eq!(c.apply_pod(&pod.build(), now).started, Some("kata".into()));
    c.set_default_handler("crun");
    let pod = PodFixture::userns("pod-2").phase("Running");
    assert_eq!(c.apply_pod(&pod.build(), now).started, Some("crun".into()));
}

/// The kubelet rewrites a waiting failure on every retry; the API only changes when the
/// message does. One occurrence per transition into the state, per new message.
#[test]
fn a_waiting_failure_counts_once_per_transition_or_new_message() {
    let mut c = counter();
    let now = Instant::now();
    let pod = PodFixture::userns("pod-1").container(ContainerFixture::new("app"));
    assert_eq!(c.apply_pod(&pod.build(), now).failures, vec![]);
    let idmap = pod
        .clone()
        .container(ContainerFixture::new("app").waiting("CreateContainerError", IDMAP_MESSAGE));
    let out = c.apply_pod(&idmap.build(), now);
    assert_eq!(out.failures, failures("runc", Reason::IdmapUnsupported, 1));
    for _ in 0..3 {
        let out = c.apply_pod(&idmap.clone().rv("7").build(), now);
        assert_eq!(out.failures, vec![], "an identical update is the same occurrence");
    }
    let other = format!("{IDMAP_MESSAGE} (attempt 2)");
    let out = c.apply_pod(
        &pod.clone()
            .container(ContainerFixture::new("app").waiting("CreateContainerError", &other))
            .build(),
        now,
    );
    assert_eq!(
        out.failures,
        failures("runc", Reason::IdmapUnsupported, 1),
        "new message"
    );
    c.apply_pod(&pod.build(), now);
    let out = c.apply_pod(&idmap.build(), now);
    assert_eq!(
        out.failures,
        failures("runc", Reason::IdmapUnsupported, 1),
        "back into the state after another one"
    );
    // Unrelated configuration errors and pods with host users count nothing.
    let config = pod
        .clone()
        .container(ContainerFixture::new("app").waiting("CreateContainerConfigError", CONFIG_MESSAGE));
    assert_eq!(c.apply_pod(&config.build(), now).failures, vec![]);
    let host = PodFixture::userns("pod-2")
        .host_users(None)
        .container(ContainerFixture::new("app").waiting("CreateContainerError", IDMAP_MESSAGE));
    assert_eq!(c.apply_pod(&host.build(), now).failures, vec![]);
}

/// containerd: a task that cannot start leaves a `StartError` record (new container ID per
/// attempt), shown as `state`, then as `lastState` under `RunContainerError` or
/// `CrashLoopBackOff`: one occurrence per container instance.
#[test]
fn a_start_failure_counts_once_per_container_instance() {
    let mut c = counter();
    let now = Instant::now();
    let pod = PodFixture::userns("pod-1").runtime_class("crun-userns");
    let app = ContainerFixture::new("app");
    let mut counted = 0;
    let steps = [
        app.clone().start_error("c1", START_MQUEUE_MESSAGE),
        app.clone()
            .waiting("RunContainerError", START_MQUEUE_MESSAGE)
            .last_start_error("c1", START_MQUEUE_MESSAGE)
            .restarts(1),
        app.clone()
            .waiting("CrashLoopBackOff", "back-off 10s restarting failed container=app")
            .last_start_error("c1", START_MQUEUE_MESSAGE)
            .restarts(1),
        app.clone()
            .start_error("c2", START_MQUEUE_MESSAGE)
            .last_start_error("c1", START_MQUEUE_MESSAGE)
            .restarts(1),
        app.clone()
            .waiting("RunContainerError", START_MQUEUE_MESSAGE)
            .last_start_error("c2", START_MQUEUE_MESSAGE)
            .restarts(2),
        app.clone()
            .waiting("RunContainerError", START_MQUEUE_MESSAGE)
            .last_start_error("c2", START_MQUEUE_MESSAGE)
            .restarts(2),
    ];
    for (i, step) in steps.into_iter().enumerate() {
        let out = c.apply_pod(&pod.clone().container(step).build(), now);
        for f in &out.failures {
            assert_eq!(
                (f.handler.as_str(), f.reason),
                ("crun", Reason::MqueueSetxattr),
                "step {i}"
            );
            counted += f.delta;
        }
    }
    assert_eq!(counted, 2, "two container instances, c1 and c2");

    // Without a record (a runtime that keeps none), the waiting state is the occurrence.
    let bare = app.waiting("RunContainerError", START_MQUEUE_MESSAGE);
    let out = c.apply_pod(&PodFixture::userns("pod-2").container(bare).build(), now);
    assert_eq!(out.failures, failures("runc", Reason::MqueueSetxattr, 1));
}

#[test]
fn container_failures_of_the_first_list_are_a_baseline_and_later_pods_count_in_full() {
    let mut c = fresh();
    let now = Instant::now();
    let failing = ContainerFixture::new("app")
        .waiting("RunContainerError", START_MQUEUE_MESSAGE)
        .last_start_error("c1", START_MQUEUE_MESSAGE);
    let old = PodFixture::userns("old").container(failing.clone());
    c.begin_list_pods();
    assert_eq!(c.apply_pod(&old.build(), now).failures, vec![]);
    c.end_list_pods(now);
    assert_eq!(c.apply_pod(&old.build(), now).failures, vec![]);
    let next = failing.clone().start_error("c2", START_MQUEUE_MESSAGE);
    let out = c.apply_pod(&old.clone().container(next).build(), now);
    assert_eq!(out.failures, failures("runc", Reason::MqueueSetxattr, 1));

    let new = PodFixture::userns("new").container(failing);
    let out = c.apply_pod(&new.build(), now);
    assert_eq!(out.failures, failures("runc", Reason::MqueueSetxattr, 1));
    c.begin_list_pods();
    assert_eq!(
        c.apply_pod(&new.build(), now).failures,
        vec![],
        "re-listed unchanged"
    );
    c.end_list_pods(now);
}

// ---------------------------------------------------------------------------------------------
// Scenarios through the fake API server and real kube-runtime watchers
// ---------------------------------------------------------------------------------------------

fn watch_config(handlers: HandlerSet) -> WatchConfig {
    WatchConfig::new("node-a", real_classifier(), NodeHandlers::known(handlers))
}

struct Scenario {
    metrics: Metrics,
    health: Health,
    server: ScriptedApiServer,
    task: tokio::task::JoinHandle<Result<(), WatchError>>,
}

/// Starts the watches against `scripts` and waits until `parked` scripts are consumed.
async fn start(cfg: WatchConfig, scripts: Vec<(Watched, Vec<Reply>)>, parked: usize) -> Scenario {
    let (client, mut server) = ScriptedApiServer::start(scripts);
    let metrics = Metrics::new("node-a").unwrap();
    let health = Health::new();
    let task = tokio::spawn(run(client, cfg, metrics.clone(), health.clone()));
    server.wait_parked(parked, Duration::from_secs(10)).await;
    Scenario {
        metrics,
        health,
        server,
        task,
    }
}

async fn run_scenario(scripts: Vec<(Watched, Vec<Reply>)>) -> Scenario {
    let n = scripts.len();
    let s = start(watch_config(HandlerSet::of(["runc", "crun"], "runc")), scripts, n).await;
    s.task.abort();
    s
}

fn list(rv: &'static str, items: Vec<Value>) -> Reply {
    Reply::List { rv, items }
}

fn no_events() -> (Watched, Vec<Reply>) {
    (Watched::sandbox_events(), vec![list("1", vec![])])
}

/// Every failure counted, over every handler and reason.
fn total_failures(m: &Metrics) -> u64 {
    ["runc", "crun", "kata"]
        .into_iter()
        .flat_map(|h| Reason::ALL.map(|r| m.pod_failures(h, r)))
        .sum()
}

/// The issue's scenario, through real kube-runtime watchers: an event seen on watch,
/// re-listed after a watch restart (410 Gone), then updated 1 -> 5 yields exactly 5; an
/// unrelated failure and a failure of a pod with host users add 0; the userns pod that
/// reaches Running counts one start.
#[tokio::test]
async fn watch_relist_and_count_update_yield_exactly_the_occurrences() {
    let pod1 = PodFixture::userns("pod-1").runtime_class("crun-userns");
    let pod2 = PodFixture::userns("pod-2").host_users(None).rv("2");
    let ev1 = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE);
    let scripts = vec![
        runtime_classes(&[("crun-userns", "crun")]),
        (
            Watched::pods("node-a"),
            vec![
                list("5", vec![pod1.json(), pod2.json()]),
                Reply::Watch(vec![modified(pod1.clone().phase("Running").rv("6").json())]),
            ],
        ),
        (
            Watched::sandbox_events(),
            vec![
                list("10", vec![]),
                Reply::Watch(vec![added(ev1.clone().rv("11").json()), gone()]),
                list("12", vec![ev1.clone().rv("11").json()]),
                Reply::Watch(vec![
                    modified(ev1.clone().count(5).rv("13").json()),
                    added(
                        EventFixture::sandbox("ev-cni", "pod-1", CNI_MESSAGE)
                            .count(4)
                            .rv("14")
                            .json(),
                    ),
                    added(
                        EventFixture::sandbox("ev-host", "pod-2", MQUEUE_MESSAGE)
                            .count(2)
                            .rv("15")
                            .json(),
                    ),
                ]),
            ],
        ),
    ];
    let Scenario {
        metrics,
        health,
        server,
        ..
    } = run_scenario(scripts).await;

    assert_eq!(metrics.pod_failures("crun", Reason::MqueueSetxattr), 5);
    assert_eq!(total_failures(&metrics), 5);
    assert_eq!(metrics.pod_starts("crun"), 1);
    assert!(health.is_ready());
    let event_requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("/api/v1/events"))
        .collect();
    assert_eq!(
        event_requests.iter().map(|r| &r[..5]).collect::<Vec<_>>(),
        ["LIST ", "WATCH", "LIST ", "WATCH", "WATCH"],
        "one event watch; relisted after 410 Gone, re-watched after the stream ended"
    );
    let text = metrics.render();
    let labels = [
        ("node", "node-a"),
        ("reason", "mqueue_setxattr"),
        ("runtime_handler", "crun"),
    ];
    let got = crate::testing::sample(&text, "usernsguard_pod_userns_failures_total", &labels);
    assert_eq!(got.as_deref(), Some("5"), "{text}");
}

/// An agent restart while the node's clock is 30 s ahead of the API server's, and again 30 s
/// behind: the first process counts what it sees; the second's first lists (the same events
/// and pods, creationTimestamps and startTimes within seconds of the restart) add nothing,
/// and everything after them is counted. Together: every occurrence exactly once.
#[tokio::test]
async fn agent_restart_with_a_skewed_node_clock_adds_nothing_twice_and_misses_nothing() {
    for skew in [30i64, -30] {
        // The API server's clock, as the node (the agent) would see it skewed.
        let server_now = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(skew);
        let at = |secs: i64| (server_now + jiff::SignedDuration::from_secs(secs)).to_string();
        let pod1 = PodFixture::userns("pod-1")
            .runtime_class("crun-userns")
            .started(&at(-20));
        let ev1 = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE).created(&at(-5));
        let classes = runtime_classes(&[("crun-userns", "crun")]);

        // Before the restart: ev-1 happens 3 times, pod-1 starts.
        let first = vec![
            classes.clone(),
            (
                Watched::pods("node-a"),
                vec![
                    list("5", vec![pod1.json()]),
                    Reply::Watch(vec![modified(pod1.clone().phase("Running").rv("6").json())]),
                ],
            ),
            (
                Watched::sandbox_events(),
                vec![
                    list("10", vec![]),
                    Reply::Watch(vec![
                        added(ev1.clone().rv("11").json()),
                        modified(ev1.clone().count(3).rv("12").json()),
                    ]),
                ],
            ),
        ];
        let before = run_scenario(first).await.metrics;
        assert_eq!(
            before.pod_failures("crun", Reason::MqueueSetxattr),
            3,
            "skew {skew}"
        );
        assert_eq!(before.pod_starts("crun"), 1, "skew {skew}");

        // After the restart: the lists hold ev-1 (count 3) and pod-1 (running); then ev-1
        // happens once more, ev-2 twice (created a second after the restart), and pod-2
        // starts with a startTime a second after the restart.
        let ev2 = EventFixture::sandbox("ev-2", "pod-2", MQUEUE_MESSAGE).created(&at(1));
        let pod2 = PodFixture::userns("pod-2").phase("Running").started(&at(1));
        let second = vec![
            classes,
            (
                Watched::pods("node-a"),
                vec![
                    list("20", vec![pod1.clone().phase("Running").rv("6").json()]),
                    Reply::Watch(vec![added(pod2.clone().rv("21").json())]),
                ],
            ),
            (
                Watched::sandbox_events(),
                vec![
                    list("20", vec![ev1.clone().count(3).rv("12").json()]),
                    Reply::Watch(vec![
                        modified(ev1.clone().count(4).rv("22").json()),
                        added(ev2.clone().count(2).rv("23").json()),
                    ]),
                ],
            ),
        ];
        let after = run_scenario(second).await.metrics;
        assert_eq!(
            after.pod_failures("crun", Reason::MqueueSetxattr),
            1,
            "skew {skew}: ev-1's 4th"
        );
        assert_eq!(
            after.pod_failures("runc", Reason::MqueueSetxattr),
            2,
            "skew {skew}: ev-2"
        );
        assert_eq!(after.pod_starts("crun"), 0, "skew {skew}: pod-1 started before");
        assert_eq!(after.pod_starts("runc"), 1, "skew {skew}: pod-2");
        assert_eq!(
            total_failures(&before) + total_failures(&after),
            4 + 2,
            "skew {skew}: every occurrence once across the restart"
        );
    }
}

/// The pod watch delivers pod-1's deletion, and a re-list shows pod-2 gone, before the event
/// watch delivers their sandbox failures (held back until then); a later 410 Gone re-lists
/// the same event. Each occurrence is counted once, under the deleted pod's handler.
#[tokio::test]
async fn occurrences_after_the_pods_deletion_are_counted_once() {
    let pod1 = PodFixture::userns("pod-1").runtime_class("crun-userns");
    let pod2 = PodFixture::userns("pod-2").rv("2");
    let ev1 = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE).count(2);
    let ev2 = EventFixture::sandbox("ev-2", "pod-2", MQUEUE_MESSAGE);
    let (open, gate) = tokio::sync::watch::channel(false);
    let scripts = vec![
        runtime_classes(&[("crun-userns", "crun")]),
        (
            Watched::pods("node-a"),
            vec![
                list("5", vec![pod1.json(), pod2.json()]),
                Reply::Watch(vec![deleted(pod1.clone().rv("6").json()), gone()]),
                list("7", vec![]),
            ],
        ),
        (
            Watched::sandbox_events(),
            vec![
                list("10", vec![]),
                Reply::WatchWhen(
                    gate,
                    vec![
                        added(ev1.clone().rv("11").json()),
                        added(ev2.clone().rv("12").json()),
                        gone(),
                    ],
                ),
                list(
                    "13",
                    vec![ev1.clone().rv("11").json(), ev2.clone().rv("12").json()],
                ),
                Reply::Watch(vec![modified(ev1.clone().count(3).rv("14").json())]),
            ],
        ),
    ];
    let cfg = watch_config(HandlerSet::of(["runc", "crun"], "runc"));
    // RuntimeClasses and pods consumed (deletion and re-list applied), events held back.
    let mut s = start(cfg, scripts, 2).await;
    assert_eq!(total_failures(&s.metrics), 0);
    open.send_replace(true);
    s.server.wait_parked(3, Duration::from_secs(10)).await;
    s.task.abort();
    assert_eq!(s.metrics.pod_failures("crun", Reason::MqueueSetxattr), 3);
    assert_eq!(s.metrics.pod_failures("runc", Reason::MqueueSetxattr), 1);
    assert_eq!(total_failures(&s.metrics), 4);
}

/// One container failing to start twice (two container instances), its status re-delivered
/// identically and re-listed after 410 Gone, and a second pod whose container cannot be
/// created, updated identically three times and re-listed: three occurrences, no more.
#[tokio::test]
async fn container_status_failures_count_once_across_identical_updates_and_relists() {
    let pod1 = PodFixture::userns("pod-1").runtime_class("crun-userns");
    let app = ContainerFixture::new("app");
    let failing = |id: &str, restarts| {
        app.clone()
            .waiting("RunContainerError", START_MQUEUE_MESSAGE)
            .last_start_error(id, START_MQUEUE_MESSAGE)
            .restarts(restarts)
    };
    let backoff = app
        .clone()
        .waiting("CrashLoopBackOff", "back-off 10s restarting failed container=app")
        .last_start_error("c1", START_MQUEUE_MESSAGE)
        .restarts(1);
    let pod2 = PodFixture::userns("pod-2")
        .container(ContainerFixture::new("app").waiting("CreateContainerError", IDMAP_MESSAGE));
    let p1 = |c: ContainerFixture, rv: &str| pod1.clone().container(c).rv(rv).json();
    let scripts = vec![
        runtime_classes(&[("crun-userns", "crun")]),
        (
            Watched::pods("node-a"),
            vec![
                list("5", vec![p1(app.clone(), "5")]),
                Reply::Watch(vec![
                    modified(p1(app.clone().start_error("c1", START_MQUEUE_MESSAGE), "6")),
                    modified(p1(failing("c1", 1), "7")),
                    modified(p1(failing("c1", 1), "8")),
                    modified(p1(backoff.clone(), "9")),
                    gone(),
                ]),
                list("10", vec![p1(backoff.clone(), "9")]),
                Reply::Watch(vec![
                    modified(p1(failing("c2", 2), "11")),
                    added(pod2.clone().rv("12").json()),
                    modified(pod2.clone().rv("13").json()),
                    modified(pod2.clone().rv("14").json()),
                    gone(),
                ]),
                list(
                    "15",
                    vec![p1(failing("c2", 2), "11"), pod2.clone().rv("14").json()],
                ),
            ],
        ),
        no_events(),
    ];
    let s = run_scenario(scripts).await;
    assert_eq!(s.metrics.pod_failures("crun", Reason::MqueueSetxattr), 2);
    assert_eq!(s.metrics.pod_failures("runc", Reason::IdmapUnsupported), 1);
    assert_eq!(total_failures(&s.metrics), 3);
}

/// Zero series exist for the node's handlers only (not for every RuntimeClass of the
/// cluster); when the node's configuration drops a handler its series disappear, a new one
/// gets its own, and a failure of a pod whose class names a handler the node does not have
/// is still counted.
#[tokio::test]
async fn series_follow_the_nodes_handlers_and_a_removed_handlers_disappear() {
    let kata = PodFixture::userns("pod-k").runtime_class("kata");
    let ev = EventFixture::sandbox("ev-k", "pod-k", MQUEUE_MESSAGE);
    let scripts = vec![
        runtime_classes(&[("crun-userns", "crun"), ("kata", "kata"), ("gvisor", "runsc")]),
        (Watched::pods("node-a"), vec![list("5", vec![kata.json()])]),
        (
            Watched::sandbox_events(),
            vec![list("10", vec![]), Reply::Watch(vec![added(ev.rv("11").json())])],
        ),
    ];
    let handlers = NodeHandlers::known(HandlerSet::of(["runc", "crun"], "runc"));
    let cfg = WatchConfig::new("node-a", real_classifier(), handlers.clone());
    let s = start(cfg, scripts, 3).await;
    assert_eq!(s.metrics.pod_failures("kata", Reason::MqueueSetxattr), 1);
    assert_eq!(s.metrics.pod_series_handlers(), ["crun", "kata", "runc"]);
    let text = s.metrics.render();
    assert!(
        !text.contains("runsc"),
        "no series for a RuntimeClass of other nodes"
    );
    let zero = [
        ("node", "node-a"),
        ("reason", "idmap_unsupported"),
        ("runtime_handler", "crun"),
    ];
    assert_eq!(
        sample(&text, "usernsguard_pod_userns_failures_total", &zero).as_deref(),
        Some("0")
    );

    handlers.publish(HandlerSet::of(["runc", "youki"], "runc"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.metrics.pod_series_handlers().contains(&"crun".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "crun's series never removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.metrics.pod_series_handlers(), ["kata", "runc", "youki"]);
    assert!(!s.metrics.render().contains(r#"runtime_handler="crun""#));
    s.task.abort();
}

/// `--watch-events=false`: no event request at all (the fake server fails on any request
/// without a script), readiness on pods alone, container failures still counted.
#[tokio::test]
async fn without_the_event_watch_only_pods_are_watched() {
    let pod = PodFixture::userns("pod-1")
        .container(ContainerFixture::new("app").waiting("CreateContainerError", IDMAP_MESSAGE));
    let scripts = vec![
        runtime_classes(&[]),
        (
            Watched::pods("node-a"),
            vec![list("5", vec![]), Reply::Watch(vec![added(pod.json())])],
        ),
    ];
    let mut cfg = watch_config(HandlerSet::of(["runc"], "runc"));
    cfg.watch_events = false;
    let s = start(cfg, scripts, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.task.abort();
    assert!(s.health.is_ready());
    assert_eq!(s.metrics.pod_failures("runc", Reason::IdmapUnsupported), 1);
    assert!(s.server.requests().iter().all(|r| !r.contains("events")));
}

/// Against a server that applies field selectors as kube-apiserver does (and rejects fields
/// it does not support): of a cluster's Warning and Normal events, the agent receives only
/// the kubelet's FailedCreatePodSandBox Warnings about pods, of every node, and counts its
/// own node's.
#[tokio::test]
async fn the_event_watch_receives_only_what_its_selector_narrows_to() {
    let pod = PodFixture::userns("pod-1");
    let base = EventFixture::sandbox("x", "pod-1", MQUEUE_MESSAGE);
    let events = vec![
        base.clone().reason("Failed").json(),
        base.clone().reason("BackOff").json(),
        base.clone().component("some-operator").json(),
        {
            let mut normal = base.clone().json();
            normal["type"] = json!("Normal");
            normal
        },
        {
            let mut node = base.clone().json();
            node["involvedObject"]["kind"] = json!("Node");
            node
        },
        EventFixture::sandbox("elsewhere", "pod-9", MQUEUE_MESSAGE)
            .host("node-b")
            .json(),
        EventFixture::sandbox("mine", "pod-1", MQUEUE_MESSAGE)
            .count(2)
            .json(),
    ];
    let watch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e["metadata"]["uid"] = json!(format!("{}-{i}", e["metadata"]["uid"].as_str().unwrap()));
            added(e)
        })
        .collect();
    let scripts = vec![
        runtime_classes(&[]),
        (Watched::pods("node-a"), vec![list("5", vec![pod.json()])]),
        (
            Watched::filtered("/api/v1/events"),
            vec![list("10", events.clone()), Reply::Watch(watch)],
        ),
    ];
    let s = run_scenario(scripts).await;
    assert_eq!(
        s.server.delivery(),
        [("/api/v1/events".to_owned(), 14, 4)],
        "2 x 7 events generated; the other node's and our own sandbox failures delivered"
    );
    assert_eq!(
        s.metrics.pod_failures("runc", Reason::MqueueSetxattr),
        2,
        "the listed copy is the baseline"
    );
    assert_eq!(total_failures(&s.metrics), 2);
}

#[test]
fn the_fake_server_selects_like_kube_apiserver() {
    let e = EventFixture::sandbox("x", "p", "m").json();
    let sel = FieldSelector::parse("/api/v1/events", &event_field_selector()).unwrap();
    assert!(sel.matches(&e));
    assert!(!sel.matches(&EventFixture::sandbox("x", "p", "m").reason("Failed").json()));
    let mut reporting = e.clone();
    reporting["source"] = json!({});
    reporting["reportingComponent"] = json!("kubelet");
    assert!(
        sel.matches(&reporting),
        "source falls back to the reporting controller"
    );
    assert!(FieldSelector::parse("/api/v1/events", "source.host=node-a")
        .unwrap_err()
        .contains("not supported"));
    assert!(FieldSelector::parse("/api/v1/events", "reportingInstance=node-a").is_err());
    let pods = FieldSelector::parse("/api/v1/pods", &pod_field_selector("node-a")).unwrap();
    assert!(pods.matches(&PodFixture::userns("p").json()));
    let not = FieldSelector::parse("/api/v1/pods", "spec.nodeName!=node-a").unwrap();
    assert!(!not.matches(&PodFixture::userns("p").json()));
}
