//! The chart's agent really works on a node: render the chart, take the agent container as
//! the DaemonSet defines it (image, arguments, environment, security context, volumes and
//! mounts), run the image built by scripts/image.sh with exactly those through a real
//! containerd's CRI (2.1, in a pod as the kubelet would create it, with the service-account
//! token and API server environment the kubelet injects, pointing at an API server that is
//! not there), and execute `usernsguard selftest --host-root /host --output json` in it: its
//! verdicts must equal those `selftest` gives on the host. Needs root, buildah, helm (the
//! chart tests' cached one) and the musl target (scripts/install-deps.sh all).

#[allow(dead_code)]
#[path = "../../runtime/tests/common/containerd.rs"]
mod containerd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd::{Containerd, Version};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
};
use serde_json::Value;
use usernsguard_runtime::cri::client::CriClient;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The chart's agent container and pod volumes, as helm 3 renders them by default.
fn rendered_agent() -> (Value, Value) {
    let helm = run(Command::new("bash")
        .arg("-c")
        .arg("source tests/chart/lib/tools.sh >/dev/null && ensure_helm 3.18.0")
        .current_dir(repo()));
    let yaml = run(Command::new(helm.trim())
        .args([
            "template",
            "ug",
            "charts/usernsguard",
            "--namespace",
            "usernsguard-system",
            "--kube-version",
            "1.33.0",
        ])
        .current_dir(repo()));
    let ds = yaml
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the chart renders a DaemonSet");
    let pod = ds["spec"]["template"]["spec"].clone();
    let agent = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .cloned()
        .expect("an agent container");
    (agent, pod["volumes"].clone())
}

/// The kubelet's service-account mount and API server environment, for an API server that
/// is not there (the agent then stays up, not ready).
fn fake_service_account(dir: &Path) -> Vec<KeyValue> {
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=test-ca",
        "-days",
        "1",
        "-keyout",
        dir.join("ca.key").to_str().unwrap(),
        "-out",
        dir.join("ca.crt").to_str().unwrap(),
    ]));
    std::fs::write(dir.join("token"), "not-a-real-token").unwrap();
    std::fs::write(dir.join("namespace"), "usernsguard-system").unwrap();
    [
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", "1"),
    ]
    .into_iter()
    .map(|(k, v)| KeyValue {
        key: k.into(),
        value: v.into(),
    })
    .collect()
}

/// Per handler: its name, verdict, and (check, result) pairs.
type Verdicts = Vec<(String, String, Vec<(String, String)>)>;

fn verdicts(json: &[u8]) -> Verdicts {
    let doc: Value = serde_json::from_slice(json)
        .unwrap_or_else(|e| panic!("not a selftest report ({e}): {}", String::from_utf8_lossy(json)));
    let mut v: Vec<_> = doc["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let checks = h["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["check"].as_str().unwrap().to_owned(),
                        c["result"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (
                h["handler"].as_str().unwrap().to_owned(),
                h["verdict"].as_str().unwrap().to_owned(),
                checks,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_rendered_agent_container_runs_selftest_on_the_host_through_containerd() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test runs containerd: run it as root"
    );
    let (agent, volumes) = rendered_agent();
    let built = run(&mut Command::new(repo().join("scripts/image.sh")));
    let archive = repo().join(built.lines().last().unwrap());
    let image = agent["image"].as_str().unwrap().to_owned();
    assert!(
        String::from_utf8_lossy(&std::fs::read(&archive).unwrap()).contains(&image),
        "the chart's image {image} is what scripts/image.sh builds"
    );

    // HostToContainer needs / to be a shared mount, as systemd makes it on every node.
    let root_shared = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/") && l.contains("shared:"));
    if !root_shared {
        run(Command::new("mount").args(["--make-rshared", "/"]));
    }

    let runc = containerd::all_handlers()
        .into_iter()
        .filter(|(n, _)| n == "runc")
        .collect::<Vec<_>>();
    let cd = Containerd::start(
        &format!("uds-{}", std::process::id() % 100_000),
        Version::V21,
        &runc,
        false,
        &[archive],
    );
    let mut cri = CriClient::connect(&cd.socket, Duration::from_secs(60)).unwrap();

    let work = tempfile::Builder::new()
        .prefix("ug-ds-")
        .tempdir_in("/run")
        .unwrap();
    let mut env = fake_service_account(&work.path().join("sa"));
    for e in agent["env"].as_array().unwrap() {
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("spec.nodeName")) => "test-node".to_owned(),
            (None, Some("metadata.namespace")) => "usernsguard-system".to_owned(),
            other => panic!(
                "env {} from {other:?}: teach this test the downward API field",
                e["name"]
            ),
        };
        env.push(KeyValue {
            key: e["name"].as_str().unwrap().into(),
            value,
        });
    }
    let mut mounts = vec![Mount {
        container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
        host_path: work.path().join("sa").display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    for m in agent["volumeMounts"].as_array().unwrap() {
        let volume = volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]));
        let propagation = match m["mountPropagation"].as_str() {
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            _ => MountPropagation::PropagationPrivate,
        };
        mounts.push(Mount {
            container_path: m["mountPath"].as_str().unwrap().into(),
            host_path: volume["hostPath"]["path"]
                .as_str()
                .expect("hostPath volumes only")
                .into(),
            readonly: m["readOnly"].as_bool().unwrap_or(false),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    let sc = &agent["securityContext"];
    let privileged = sc["privileged"].as_bool().unwrap_or(false);
    let namespaces = NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "usernsguard-agent-test".into(),
            uid: format!("ds-{}", std::process::id()),
            namespace: "usernsguard-system".into(),
            attempt: 0,
        }),
        log_directory: work.path().join("logs").display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::create_dir_all(work.path().join("logs")).unwrap();
    let pod = cri.run_pod_sandbox(&sandbox, "runc").unwrap();
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "agent".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        command: agent["command"]
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default(),
        args: agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect(),
        envs: env,
        mounts,
        log_path: "agent.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                privileged,
                namespace_options: Some(namespaces),
                run_as_user: sc["runAsUser"]
                    .as_i64()
                    .map(|v| k8s_cri::v1::Int64Value { value: v }),
                run_as_group: sc["runAsGroup"]
                    .as_i64()
                    .map(|v| k8s_cri::v1::Int64Value { value: v }),
                readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container = cri.create_container(&pod, config, &sandbox).unwrap();
    cri.start_container(&container).unwrap();

    // The agent stays up without an API server (not ready); a crash ends the test here.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let st = cri.container_status(&container).unwrap();
        assert_eq!(
            st.state,
            ContainerState::ContainerRunning as i32,
            "the agent container stopped: {} {}\n{}",
            st.reason,
            st.message,
            std::fs::read_to_string(work.path().join("logs/agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (code, stdout, stderr) = cri
        .exec_sync(
            &container,
            &[
                "/usr/local/bin/usernsguard",
                "selftest",
                "--host-root",
                "/host",
                "--output",
                "json",
            ],
            Duration::from_secs(120),
        )
        .unwrap();
    assert!(
        code == 0 || code == 1,
        "selftest in the agent container exited {code}: {}",
        String::from_utf8_lossy(&stderr)
    );
    cri.remove_pod(&pod).unwrap();

    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let host = Command::new(target.join("x86_64-unknown-linux-musl/release/usernsguard"))
        .args([
            "selftest",
            "--output",
            "json",
            "--work-dir",
            "/run/usernsguard-ds-host",
        ])
        .output()
        .unwrap();
    let (inside, outside) = (verdicts(&stdout), verdicts(&host.stdout));
    assert!(!inside.is_empty());
    assert_eq!(inside, outside, "the agent container's verdicts are the host's");
    let inside_doc: Value = serde_json::from_slice(&stdout).unwrap();
    let runc = inside_doc["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["handler"] == "runc")
        .unwrap();
    assert_eq!(
        runc["binary"], "/usr/sbin/runc",
        "the host's runc, named as the host names it"
    );
    drop(cd);
}
