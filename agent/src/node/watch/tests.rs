use std::time::Duration;

use super::*;
use crate::testing::*;

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T01:00:00Z";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn real_classifier() -> Classifier {
    Arc::new(usernsguard_runtime::classify::classify)
}

fn counter(start: &str) -> FailureCounter {
    let mut c = FailureCounter::new("node-a", ts(start), DEFAULT_HANDLER, real_classifier());
    c.apply_runtime_class(&runtime_class("crun-userns", "crun"));
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

#[test]
fn new_event_counts_all_occurrences_then_only_increases() {
    let mut c = counter(T0);
    let now = ts("2026-01-01T00:01:00Z");
    c.apply_pod(&PodFixture::userns("pod-1").runtime_class("crun-userns").build());
    assert_eq!(c.apply(&mq(1), now), failure("crun", 1));
    assert_eq!(
        c.apply(&mq(1), now),
        None,
        "a repeated delivery is not an occurrence"
    );
    assert_eq!(c.apply(&mq(5), now), failure("crun", 4));
    assert_eq!(c.apply(&mq(3), now), None, "a count never goes back");
    assert_eq!(c.apply(&mq(6), now), failure("crun", 1));
}

#[test]
fn event_older_than_the_agent_is_a_baseline() {
    let mut c = counter(T1);
    let now = ts("2026-01-01T01:00:05Z");
    c.apply_pod(&PodFixture::userns("pod-1").build());
    assert_eq!(c.apply(&mq(5), now), None);
    assert_eq!(c.apply(&mq(6), now), failure("runc", 1), "default handler");
}

#[test]
fn series_count_is_used_when_larger_than_count() {
    let mut c = counter(T0);
    let now = ts("2026-01-01T00:01:00Z");
    c.apply_pod(&PodFixture::userns("pod-1").build());
    let ev = |series| {
        EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE)
            .series(None, series)
            .build()
    };
    assert_eq!(occurrences(&ev(2)), 2);
    assert_eq!(c.apply(&ev(2), now), failure("runc", 2));
    assert_eq!(c.apply(&ev(7), now), failure("runc", 5));
    let both = EventFixture::sandbox("x", "p", "").series(Some(9), 4).build();
    assert_eq!(occurrences(&both), 9);
    let neither = EventFixture::sandbox("x", "p", "").series(None, 0).build();
    assert_eq!(occurrences(&neither), 1);
}

#[test]
fn unrelated_other_nodes_and_host_users_pods_are_not_counted() {
    let mut c = counter(T0);
    let now = ts("2026-01-01T00:01:00Z");
    c.apply_pod(&PodFixture::userns("pod-1").build());
    c.apply_pod(&PodFixture::userns("pod-2").host_users(None).build());
    let cni = EventFixture::sandbox("ev-cni", "pod-1", CNI_MESSAGE).count(3);
    assert_eq!(c.apply(&cni.build(), now), None);
    let host_pod = EventFixture::sandbox("ev-2", "pod-2", MQUEUE_MESSAGE).count(2);
    assert_eq!(c.apply(&host_pod.build(), now), None);
    let elsewhere = EventFixture::sandbox("ev-3", "pod-1", MQUEUE_MESSAGE).host("node-b");
    assert_eq!(c.apply(&elsewhere.build(), now), None);
    assert_eq!(c.tracked().0, 2, "other nodes' events keep no state");
}

#[test]
fn event_before_its_pod_waits_for_the_pod_and_expires() {
    let mut c = counter(T0);
    let now = ts("2026-01-01T00:01:00Z");
    assert_eq!(c.apply(&mq(2), now), None);
    let out = c.apply_pod(&PodFixture::userns("pod-1").runtime_class("crun-userns").build());
    assert_eq!(out.failures, vec![failure("crun", 2).unwrap()]);
    assert_eq!(out.started, None);

    let late = EventFixture::sandbox("ev-9", "pod-9", MQUEUE_MESSAGE).build();
    assert_eq!(c.apply(&late, now), None);
    // Ten minutes later, with no pod-9 ever seen, the parked failure is dropped.
    c.apply(&mq(2), ts("2026-01-01T00:11:01Z"));
    assert_eq!(c.apply_pod(&PodFixture::userns("pod-9").build()).failures, vec![]);
}

#[test]
fn relist_sweeps_deleted_events_and_keeps_counts_of_listed_ones() {
    let mut c = counter(T0);
    let now = ts("2026-01-01T00:01:00Z");
    c.apply_pod(&PodFixture::userns("pod-1").build());
    let other = EventFixture::sandbox("ev-2", "pod-1", MQUEUE_MESSAGE).count(2);
    c.apply(&mq(3), now);
    c.apply(&other.build(), now);
    c.begin_relist_events(0);
    assert_eq!(c.apply(&mq(3), now), None);
    c.end_relist_events(0);
    assert_eq!(c.tracked().0, 1, "ev-2 vanished during the outage");
    assert_eq!(c.apply(&mq(4), now), failure("runc", 1));
    // A relist of another reason's watch leaves this one's events alone.
    c.begin_relist_events(1);
    c.end_relist_events(1);
    assert_eq!(c.tracked().0, 1);
    c.delete_event(&mq(4));
    assert_eq!(c.tracked().0, 0);
}

#[test]
fn pod_starts_count_once_and_running_pods_at_startup_are_a_baseline() {
    let mut c = counter(T1);
    let before = PodFixture::userns("old")
        .phase("Running")
        .started("2026-01-01T00:30:00Z");
    assert_eq!(c.apply_pod(&before.build()).started, None);
    assert_eq!(c.apply_pod(&before.rv("2").build()).started, None);

    let new = PodFixture::userns("new").runtime_class("crun-userns");
    assert_eq!(c.apply_pod(&new.build()).started, None);
    let running = new.phase("Running");
    assert_eq!(c.apply_pod(&running.build()).started, Some("crun".into()));
    assert_eq!(
        c.apply_pod(&running.build()).started,
        None,
        "counted once per UID"
    );

    let late = PodFixture::userns("late")
        .phase("Running")
        .started("2026-01-01T01:00:03Z");
    assert_eq!(c.apply_pod(&late.build()).started, Some("runc".into()));

    let host = PodFixture::userns("host").host_users(Some(true)).phase("Running");
    assert_eq!(
        c.apply_pod(&host.started("2026-01-01T02:00:00Z").build()).started,
        None
    );

    c.begin_relist_pods();
    c.apply_pod(&running.build());
    c.end_relist_pods();
    assert_eq!(c.tracked().1, 1);
}

#[test]
fn unknown_runtime_class_falls_back_to_its_name() {
    let mut c = counter(T0);
    let pod = PodFixture::userns("pod-1").runtime_class("kata").phase("Running");
    let out = c.apply_pod(&pod.started("2026-01-01T00:00:05Z").build());
    assert_eq!(out.started, Some("kata".into()));
    assert_eq!(c.handlers(), vec!["crun".to_owned(), "runc".to_owned()]);
}

fn watch_config(start: &str) -> WatchConfig {
    WatchConfig {
        agent_start: ts(start),
        ..WatchConfig::new("node-a", real_classifier())
    }
}

/// Scripts for the two event reasons that stay quiet in these scenarios.
fn quiet_event_watches() -> Vec<(Watched, Vec<Reply>)> {
    FAILURE_EVENT_REASONS[1..]
        .iter()
        .map(|r| {
            (
                Watched::events(r),
                vec![Reply::List {
                    rv: "1",
                    items: vec![],
                }],
            )
        })
        .collect()
}

async fn run_scenario(
    start: &str,
    scripts: Vec<(Watched, Vec<Reply>)>,
) -> (Metrics, Health, ScriptedApiServer) {
    let n = scripts.len();
    let (client, mut verifier) = ScriptedApiServer::start(scripts);
    let metrics = Metrics::new("node-a").unwrap();
    let health = Health::new();
    let task = tokio::spawn(run(client, watch_config(start), metrics.clone(), health.clone()));
    verifier.wait_parked(n, Duration::from_secs(10)).await;
    task.abort();
    (metrics, health, verifier)
}

/// The scenario, through real kube-runtime watchers: an event seen on watch,
/// re-listed after a watch restart (410 Gone), then updated 1 -> 5 yields exactly 5; an
/// unrelated failure and a failure of a pod with host users add 0; the userns pod that
/// reaches Running counts one start.
#[tokio::test]
async fn watch_relist_and_count_update_yield_exactly_the_occurrences() {
    let pod1 = PodFixture::userns("pod-1").runtime_class("crun-userns");
    let pod2 = PodFixture::userns("pod-2").host_users(None).rv("2");
    let ev1 = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE);
    let mut scripts = vec![
        runtime_classes(&[("crun-userns", "crun")]),
        (
            Watched::pods("node-a"),
            vec![
                Reply::List {
                    rv: "5",
                    items: vec![pod1.json(), pod2.json()],
                },
                Reply::Watch(vec![modified(pod1.clone().phase("Running").rv("6").json())]),
            ],
        ),
        (
            Watched::events("FailedCreatePodSandBox"),
            vec![
                Reply::List {
                    rv: "10",
                    items: vec![],
                },
                Reply::Watch(vec![added(ev1.clone().rv("11").json()), gone()]),
                Reply::List {
                    rv: "12",
                    items: vec![ev1.clone().rv("11").json()],
                },
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
    scripts.extend(quiet_event_watches());
    let (metrics, health, verifier) = run_scenario(T0, scripts).await;

    assert_eq!(metrics.pod_failures("crun", Reason::MqueueSetxattr), 5);
    for reason in Reason::ALL.into_iter().filter(|r| *r != Reason::MqueueSetxattr) {
        assert_eq!(metrics.pod_failures("crun", reason), 0, "{reason}");
        assert_eq!(metrics.pod_failures("runc", reason), 0, "{reason}");
    }
    assert_eq!(metrics.pod_failures("runc", Reason::MqueueSetxattr), 0);
    assert_eq!(metrics.pod_starts("crun"), 1);
    assert!(health.is_ready());
    let sandbox_requests: Vec<_> = verifier
        .requests()
        .into_iter()
        .filter(|r| r.contains("reason=FailedCreatePodSandBox"))
        .collect();
    assert_eq!(
        sandbox_requests.iter().map(|r| &r[..5]).collect::<Vec<_>>(),
        ["LIST ", "WATCH", "LIST ", "WATCH", "WATCH"],
        "relisted after 410 Gone, re-watched after the stream ended"
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

/// After an agent restart the same event listed again with count 5 adds nothing; 5 -> 6
/// adds exactly 1; a pod running since before the restart is no new start.
#[tokio::test]
async fn agent_restart_treats_listed_events_as_baseline() {
    let pod1 = PodFixture::userns("pod-1")
        .runtime_class("crun-userns")
        .phase("Running");
    let ev1 = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE)
        .count(5)
        .rv("13");
    let mut scripts = vec![
        runtime_classes(&[("crun-userns", "crun")]),
        (
            Watched::pods("node-a"),
            vec![Reply::List {
                rv: "20",
                items: vec![pod1.json()],
            }],
        ),
        (
            Watched::events("FailedCreatePodSandBox"),
            vec![
                Reply::List {
                    rv: "20",
                    items: vec![ev1.json()],
                },
                Reply::Watch(vec![
                    modified(ev1.clone().count(6).rv("21").json()),
                    added(
                        EventFixture::sandbox("ev-cni", "pod-1", CNI_MESSAGE)
                            .created("2026-01-01T01:00:07Z")
                            .rv("22")
                            .json(),
                    ),
                ]),
            ],
        ),
    ];
    scripts.extend(quiet_event_watches());
    let (metrics, _health, _) = run_scenario(T1, scripts).await;
    assert_eq!(metrics.pod_failures("crun", Reason::MqueueSetxattr), 1);
    let total: u64 = Reason::ALL
        .into_iter()
        .map(|r| metrics.pod_failures("crun", r) + metrics.pod_failures("runc", r))
        .sum();
    assert_eq!(total, 1, "the unrelated CNI failure adds 0");
    assert_eq!(metrics.pod_starts("crun"), 0);
}

/// A reduced reason list opens only those watches (any other request fails the fake
/// server) and readiness waits for exactly them.
#[tokio::test]
async fn configured_event_reasons_bound_the_event_watches() {
    let pod = PodFixture::userns("pod-1");
    let ev = EventFixture::sandbox("ev-1", "pod-1", MQUEUE_MESSAGE).count(2);
    let scripts = vec![
        runtime_classes(&[]),
        (
            Watched::pods("node-a"),
            vec![Reply::List {
                rv: "1",
                items: vec![pod.json()],
            }],
        ),
        (
            Watched::events("FailedCreatePodSandBox"),
            vec![Reply::List {
                rv: "1",
                items: vec![ev.json()],
            }],
        ),
    ];
    let (client, mut verifier) = ScriptedApiServer::start(scripts);
    let metrics = Metrics::new("node-a").unwrap();
    let health = Health::new();
    let cfg = WatchConfig {
        agent_start: ts(T0),
        event_reasons: vec!["FailedCreatePodSandBox".into()],
        ..WatchConfig::new("node-a", real_classifier())
    };
    let task = tokio::spawn(run(client, cfg, metrics.clone(), health.clone()));
    verifier.wait_parked(3, Duration::from_secs(10)).await;
    task.abort();
    assert_eq!(metrics.pod_failures("runc", Reason::MqueueSetxattr), 2);
    assert!(health.is_ready());

    let (client, _verifier) = ScriptedApiServer::start(vec![]);
    let cfg = WatchConfig {
        event_reasons: vec![],
        ..WatchConfig::new("node-a", real_classifier())
    };
    let err = run(client, cfg, metrics, Health::new()).await.unwrap_err();
    assert!(err.to_string().contains("FailedCreatePodSandBox"), "{err}");
}
