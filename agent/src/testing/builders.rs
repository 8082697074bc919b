//! Object builders for tests: the CRD kinds (`SelfTest::test().with_handlers(["crun"])`),
//! nodes, pods, events, RuntimeClasses, self-test reports, and a reader for the metrics
//! text, so each test states only what differs from a typical object.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{json, Value};
use usernsguard_runtime::report::{Check, CheckOutcome, CheckResult, HandlerReport, SelfTestReport, Verdict};
use usernsguard_runtime::{NodeFacts, Reason, SelinuxFacts, SelinuxMode};

use super::api_server::{mock_client, ApiServerVerifier};
use crate::controller::context::Context;
use crate::crd::{
    InstallState, NodeReport, NodeReportSpec, NodeReportStatus, RuntimeInstallStatus, RuntimeProfile,
    RuntimeProfileSpec, SelfTest, SelfTestResult, SelfTestSpec,
};

impl SelfTest {
    /// `default`, generation 1, all nodes, handlers runc and crun, labels published.
    pub fn test() -> Self {
        let spec: SelfTestSpec = serde_json::from_value(serde_json::json!({
            "runtimeHandlers": ["runc", "crun"],
        }))
        .unwrap();
        let mut st = SelfTest::new("default", spec);
        st.metadata.generation = Some(1);
        st.metadata.uid = Some("st-uid-1".into());
        st
    }

    #[allow(dead_code)]
    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self
    }

    pub fn with_handlers<const N: usize>(mut self, handlers: [&str; N]) -> Self {
        self.spec.runtime_handlers = handlers.iter().map(|h| h.to_string()).collect();
        self
    }

    pub fn generation(mut self, g: i64) -> Self {
        self.metadata.generation = Some(g);
        self
    }

    pub fn selecting(mut self, key: &str, value: &str) -> Self {
        self.spec.node_selector.insert(key.into(), value.into());
        self
    }

    pub fn interval(mut self, interval: &str) -> Self {
        self.spec.interval = Some(interval.into());
        self
    }
}

/// Metadata of Node `name` (what the agent's node watch delivers).
pub fn node_meta<const N: usize>(name: &str, labels: [(&str, &str); N]) -> PartialObjectMeta<Node> {
    let mut m: PartialObjectMeta<Node> = PartialObjectMeta {
        types: Some(kube::api::TypeMeta {
            api_version: "meta.k8s.io/v1".into(),
            kind: "PartialObjectMetadata".into(),
        }),
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("{name}-uid")),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        _phantom: std::marker::PhantomData,
    };
    m.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    m
}

pub fn facts() -> NodeFacts {
    serde_json::from_value(serde_json::json!({
        "kernel": "6.1.0-test", "selinux": {"mode": "disabled"}, "cgroup": "v2",
    }))
    .unwrap()
}

/// A handler report with the given verdict: a failing one fails `userns-joined` with
/// `mqueue_owner_unmapped`.
pub fn handler_report(handler: &str, verdict: Verdict) -> HandlerReport {
    let checks = match verdict {
        Verdict::Pass => vec![CheckResult::pass(Check::UsernsJoined, "/dev/mqueue owned by 0")],
        Verdict::Fail => vec![CheckResult::fail(
            Check::UsernsJoined,
            Reason::MqueueOwnerUnmapped,
            "/dev/mqueue owned by 65534",
        )],
        Verdict::Unknown => vec![CheckResult::error(
            Check::UsernsJoined,
            Some(Reason::Timeout),
            "timed out",
        )],
    };
    HandlerReport {
        handler: handler.into(),
        binary: format!("/usr/bin/{handler}"),
        runtime: handler.into(),
        version: "1.0".into(),
        features: Default::default(),
        verdict,
        checks,
    }
}

impl NodeReport {
    /// The report of `node` with one result per (SelfTest, handler, generation, verdict).
    pub fn test(node: &str, results: &[(&str, &str, i64, Verdict)]) -> Self {
        let mut nr = NodeReport::new(
            node,
            NodeReportSpec {
                node_name: node.into(),
            },
        );
        nr.status = Some(NodeReportStatus {
            results: results
                .iter()
                .map(|(st, h, g, v)| SelfTestResult {
                    self_test: st.to_string(),
                    generation: *g,
                    started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        format!("2026-11-29T03:0{g}:00Z").parse().unwrap(),
                    ),
                    report: handler_report(h, *v),
                })
                .collect(),
            ..NodeReportStatus::default()
        });
        nr
    }

    /// Adds an install entry: `profile`'s handler `crun` at `generation` in `state`
    /// (`reason` for pending and failed ones).
    pub fn with_install(
        mut self,
        profile: &str,
        generation: i64,
        state: InstallState,
        reason: Option<&str>,
    ) -> Self {
        let status = self.status.get_or_insert_with(NodeReportStatus::default);
        status.installs.push(RuntimeInstallStatus {
            runtime_profile: profile.into(),
            generation,
            handler: "crun".into(),
            state,
            reason: reason.map(str::to_owned),
            version: None,
            cri_config: Some("/etc/containerd/config.toml".into()),
            message: String::new(),
            cri_restarted: false,
            last_transition_time: None,
        });
        self
    }
}

impl RuntimeProfile {
    /// `crun` profile: bundled crun, handler `crun`, default RuntimeClass options.
    pub fn test() -> Self {
        let spec: RuntimeProfileSpec = serde_json::from_value(serde_json::json!({
            "runtime": "crun", "handler": "crun",
            "binary": {"source": "Bundled", "path": "/usr/local/bin/crun"},
        }))
        .unwrap();
        let mut p = RuntimeProfile::new("crun", spec);
        p.metadata.uid = Some("rtp-uid".into());
        p.metadata.generation = Some(1);
        p
    }

    /// Profile `name` registering `handler`.
    pub fn named(mut self, name: &str, handler: &str) -> Self {
        self.metadata.name = Some(name.into());
        self.metadata.uid = Some(format!("{name}-uid"));
        self.spec.handler = handler.into();
        self
    }

    pub fn generation(mut self, g: i64) -> Self {
        self.metadata.generation = Some(g);
        self
    }

    pub fn selecting(mut self, key: &str, value: &str) -> Self {
        self.spec.node_selector.insert(key.into(), value.into());
        self
    }

    /// `cri.restart: none`: the operator restarts the CRI runtime.
    pub fn restart_none(mut self) -> Self {
        self.spec.cri.restart = crate::crd::RestartPolicy::None;
        self
    }

    pub fn max_concurrent_restarts(mut self, n: i32) -> Self {
        self.spec.rollout.max_concurrent_restarts = n;
        self
    }

    /// Deleted, held by the uninstall finalizer.
    pub fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-30T12:00:00Z".parse().unwrap(),
        ));
        self.metadata.finalizers = Some(vec![crate::crd::names::UNINSTALL_FINALIZER.into()]);
        self
    }
}

/// A ready reflector store holding `objects`.
pub fn store<K>(objects: Vec<K>) -> reflector::Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut writer = reflector::store::Writer::<K>::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let reader = writer.as_reader();
    // The writer must outlive the test or the store reports "writer dropped".
    std::mem::forget(writer);
    reader
}

impl Context {
    /// A context whose client is the fake API server, with these NodeReports known and no
    /// Node.
    pub fn test(reports: Vec<NodeReport>) -> (Arc<Self>, ApiServerVerifier) {
        Self::test_with_nodes(reports, vec![])
    }

    /// Like [`Context::test`], with these Nodes known too.
    pub fn test_with_nodes(
        reports: Vec<NodeReport>,
        nodes: Vec<PartialObjectMeta<Node>>,
    ) -> (Arc<Self>, ApiServerVerifier) {
        let (client, server) = mock_client();
        let ctx = Context {
            client,
            reports: store(reports),
            nodes: store(nodes),
            runtime_classes: store(vec![]),
        };
        (Arc::new(ctx), server)
    }
}

pub const MQUEUE_MESSAGE: &str = r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted: unknown"#;
pub const CNI_MESSAGE: &str = r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox "265b1cc1621af991c09f5e372e0e5bdcfb47c9b53523178c8d0288ce489dad5f": plugin type="calico" failed (add): error getting ClusterInformation: connection is unauthorized: Unauthorized"#;

/// containerd's `StartError` message when runc cannot label `/dev/mqueue` (a container's
/// task, not the sandbox).
pub const START_MQUEUE_MESSAGE: &str = r#"failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted: unknown"#;
/// containerd's `CreateContainerError` when the snapshotter cannot idmap the rootfs.
pub const IDMAP_MESSAGE: &str = r#"failed to create containerd container: snapshotter "overlayfs" doesn't support idmap mounts on this host, configure `slow_chown` to allow a slower and expensive fallback"#;
/// A `CreateContainerConfigError` that has nothing to do with user namespaces.
pub const CONFIG_MESSAGE: &str = r#"secret "db-credentials" not found"#;

/// One entry of a pod's `status.containerStatuses`.
#[derive(Clone, Debug)]
pub struct ContainerFixture {
    pub name: String,
    pub restart_count: i32,
    pub state: Value,
    pub last_state: Value,
}

impl ContainerFixture {
    /// Container `name`, waiting in `ContainerCreating`.
    pub fn new(name: &str) -> ContainerFixture {
        ContainerFixture {
            name: name.into(),
            restart_count: 0,
            state: json!({"waiting": {"reason": "ContainerCreating"}}),
            last_state: json!({}),
        }
    }
    /// `state.waiting` with `reason` and `message`.
    pub fn waiting(mut self, reason: &str, message: &str) -> Self {
        self.state = json!({"waiting": {"reason": reason, "message": message}});
        self
    }
    pub fn running(mut self) -> Self {
        self.state = json!({"running": {"startedAt": "2026-01-01T00:01:00Z"}});
        self
    }
    /// `state.terminated`: instance `id` could not start (containerd's `StartError`).
    pub fn start_error(mut self, id: &str, message: &str) -> Self {
        self.state = start_error(id, message);
        self
    }
    /// `lastState.terminated`: instance `id` could not start.
    pub fn last_start_error(mut self, id: &str, message: &str) -> Self {
        self.last_state = start_error(id, message);
        self
    }
    pub fn restarts(mut self, n: i32) -> Self {
        self.restart_count = n;
        self
    }
    pub fn json(&self) -> Value {
        json!({"name": self.name, "image": "busybox", "imageID": "", "ready": false,
               "restartCount": self.restart_count, "state": self.state, "lastState": self.last_state})
    }
}

fn start_error(id: &str, message: &str) -> Value {
    json!({"terminated": {"reason": "StartError", "message": message, "exitCode": 128,
                          "containerID": format!("containerd://{id}"),
                          "startedAt": "1970-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}})
}

/// A pod on `node`, in phase `phase`, acknowledged by the kubelet at `start_time`.
#[derive(Clone, Debug)]
pub struct PodFixture {
    pub uid: String,
    pub node: String,
    pub host_users: Option<bool>,
    pub runtime_class: Option<String>,
    pub phase: String,
    pub start_time: String,
    pub resource_version: String,
    pub containers: Vec<ContainerFixture>,
}

impl PodFixture {
    pub fn userns(uid: &str) -> PodFixture {
        PodFixture {
            uid: uid.into(),
            node: "node-a".into(),
            host_users: Some(false),
            runtime_class: None,
            phase: "Pending".into(),
            start_time: "2026-01-01T00:00:10Z".into(),
            resource_version: "1".into(),
            containers: Vec::new(),
        }
    }
    /// Sets the status of container `c.name` (added if new).
    pub fn container(mut self, c: ContainerFixture) -> Self {
        match self.containers.iter_mut().find(|o| o.name == c.name) {
            Some(o) => *o = c,
            None => self.containers.push(c),
        }
        self
    }
    pub fn host_users(mut self, v: Option<bool>) -> Self {
        self.host_users = v;
        self
    }
    pub fn runtime_class(mut self, c: &str) -> Self {
        self.runtime_class = Some(c.into());
        self
    }
    pub fn phase(mut self, p: &str) -> Self {
        self.phase = p.into();
        self
    }
    pub fn started(mut self, t: &str) -> Self {
        self.start_time = t.into();
        self
    }
    pub fn rv(mut self, rv: &str) -> Self {
        self.resource_version = rv.into();
        self
    }
    pub fn json(&self) -> Value {
        let mut spec = json!({
            "nodeName": self.node,
            "containers": [{"name": "c", "image": "busybox"}],
        });
        if let Some(h) = self.host_users {
            spec["hostUsers"] = json!(h);
        }
        if let Some(c) = &self.runtime_class {
            spec["runtimeClassName"] = json!(c);
        }
        let mut status = json!({"phase": self.phase, "startTime": self.start_time});
        if !self.containers.is_empty() {
            status["containerStatuses"] = self.containers.iter().map(ContainerFixture::json).collect();
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{}", self.uid), "namespace": "default",
                         "uid": self.uid, "resourceVersion": self.resource_version},
            "spec": spec,
            "status": status,
        })
    }
    pub fn build(&self) -> Pod {
        serde_json::from_value(self.json()).unwrap()
    }
}

/// A kubelet Warning event about pod `pod_uid`.
#[derive(Clone, Debug)]
pub struct EventFixture {
    pub uid: String,
    pub pod_uid: String,
    pub reason: String,
    pub message: String,
    pub count: Option<i32>,
    pub series_count: Option<i32>,
    pub created: String,
    pub host: String,
    pub component: String,
    pub resource_version: String,
}

impl EventFixture {
    pub fn sandbox(uid: &str, pod_uid: &str, message: &str) -> EventFixture {
        EventFixture {
            uid: uid.into(),
            pod_uid: pod_uid.into(),
            reason: "FailedCreatePodSandBox".into(),
            message: message.into(),
            count: Some(1),
            series_count: None,
            created: "2026-01-01T00:00:20Z".into(),
            host: "node-a".into(),
            component: "kubelet".into(),
            resource_version: "1".into(),
        }
    }
    pub fn count(mut self, c: i32) -> Self {
        self.count = Some(c);
        self
    }
    pub fn series(mut self, count: Option<i32>, series: i32) -> Self {
        self.count = count;
        self.series_count = Some(series);
        self
    }
    pub fn created(mut self, t: &str) -> Self {
        self.created = t.into();
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.host = h.into();
        self
    }
    pub fn reason(mut self, r: &str) -> Self {
        self.reason = r.into();
        self
    }
    /// `source.component` (the kubelet's is `kubelet`).
    pub fn component(mut self, c: &str) -> Self {
        self.component = c.into();
        self
    }
    pub fn rv(mut self, rv: &str) -> Self {
        self.resource_version = rv.into();
        self
    }
    pub fn json(&self) -> Value {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("pod.{}", self.uid), "namespace": "default",
                         "uid": self.uid, "resourceVersion": self.resource_version,
                         "creationTimestamp": self.created},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "default",
                               "name": format!("pod-{}", self.pod_uid), "uid": self.pod_uid},
            "reason": self.reason, "message": self.message, "type": "Warning",
            "firstTimestamp": self.created, "lastTimestamp": self.created,
            "source": {"component": self.component, "host": self.host},
        });
        if let Some(c) = self.count {
            v["count"] = json!(c);
        }
        if let Some(s) = self.series_count {
            v["series"] = json!({"count": s, "lastObservedTime": "2026-01-01T00:10:00.000000Z"});
        }
        v
    }
    pub fn build(&self) -> Event {
        serde_json::from_value(self.json()).unwrap()
    }
}

pub fn runtime_class_json(name: &str, handler: &str) -> Value {
    json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
           "metadata": {"name": name, "uid": format!("rc-{name}"), "resourceVersion": "1"},
           "handler": handler})
}

pub fn runtime_class(name: &str, handler: &str) -> RuntimeClass {
    serde_json::from_value(runtime_class_json(name, handler)).unwrap()
}

/// A two-handler report: crun passes everything, runc fails `userns-joined` with the
/// mqueue symptom and skips `idmap-mount`.
pub fn sample_report() -> SelfTestReport {
    fn check(check: Check, result: CheckOutcome, secs: f64) -> CheckResult {
        let mut c = match result {
            CheckOutcome::Fail => CheckResult::fail(check, Reason::MqueueOwnerUnmapped, "65534"),
            _ => CheckResult::new(check, result, None, "ok"),
        };
        c.duration_seconds = secs;
        c
    }
    SelfTestReport {
        started_at: "2026-11-29T03:00:00Z".into(),
        duration_seconds: 2.0,
        node: NodeFacts {
            kernel: "6.1.0-28-amd64".into(),
            selinux: SelinuxFacts {
                mode: SelinuxMode::Enforcing,
                policy: Some("targeted".into()),
                mount_label: None,
                mount_label_source: None,
            },
            lsms: vec![],
            max_user_namespaces: Some(63000),
            cgroup: usernsguard_runtime::facts::CgroupMode::Hybrid,
            idmap_filesystems: vec![],
        },
        cri: None,
        problem: None,
        handlers: vec![
            HandlerReport {
                handler: "crun".into(),
                binary: "/usr/bin/crun".into(),
                runtime: "crun".into(),
                version: "1.8.1".into(),
                features: Default::default(),
                verdict: Verdict::Pass,
                checks: vec![
                    check(Check::UsernsCreated, CheckOutcome::Pass, 0.25),
                    check(Check::UsernsJoined, CheckOutcome::Pass, 0.5),
                ],
            },
            HandlerReport {
                handler: "runc".into(),
                binary: "/usr/sbin/runc".into(),
                runtime: "runc".into(),
                version: "1.1.5".into(),
                features: Default::default(),
                verdict: Verdict::Fail,
                checks: vec![
                    check(Check::UsernsCreated, CheckOutcome::Pass, 0.5),
                    check(Check::UsernsJoined, CheckOutcome::Fail, 0.75),
                    check(Check::IdmapMount, CheckOutcome::Skip, 0.0),
                    check(Check::Features, CheckOutcome::Error, 0.0),
                ],
            },
        ],
    }
}

/// Value of the sample `name{labels}` in a text exposition, matching the label set
/// exactly and in any order.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let mut got: Vec<(String, String)> = rest
            .trim_end_matches('}')
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once("=\"").unwrap();
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        got.sort();
        (got == want).then(|| value.to_owned())
    })
}
