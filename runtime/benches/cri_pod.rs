//! What the `cri-pod` check costs per handler, next to the floor: a bare user-namespace pod
//! through the same containerd 2.1 (RunPodSandbox, CreateContainer, StartContainer, wait for
//! the container to exit, StopPodSandbox, RemovePodSandbox) with the same image. Target:
//! the check at most 1.5x that floor. Prints figures; needs root:
//!
//!     cargo bench -p usernsguard-runtime --bench cri_pod

// The test harness's containerd wrapper; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/common/containerd.rs"]
mod containerd;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use containerd::{Containerd, Version};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, IdMapping as CriIdMapping, ImageSpec,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, UserNamespace,
};
use usernsguard_runtime::cri::checks::{self, PodOutcome, PodProbe};
use usernsguard_runtime::cri::client::CriClient;
use usernsguard_runtime::host::{HostDir, HostRoot};
use usernsguard_runtime::userns::IdMapping;

const ROUNDS: usize = 9;
const IMAGE: &str = "localhost/usernsguard-probe:bench";
const IN_IMAGE: &str = "/usr/local/bin/usernsguard-probe";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn namespaces(base: u32) -> NamespaceOption {
    let m = vec![CriIdMapping {
        host_id: base,
        container_id: 0,
        length: 65536,
    }];
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        target_id: String::new(),
        userns_options: Some(UserNamespace {
            mode: NamespaceMode::Pod as i32,
            uids: m.clone(),
            gids: m,
        }),
    }
}

/// The floor: one user-namespace pod through its whole life, nothing else.
fn bare_pod(client: &mut CriClient, handler: &str, round: usize, log_dir: &Path) -> Duration {
    let started = Instant::now();
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("bare-{round}"),
            uid: format!("bare-{}-{round}-{handler}", std::process::id()),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(0x7100_0000)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = client.run_pod_sandbox(&sandbox, handler).unwrap();
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec![IN_IMAGE.into()],
        log_path: "c.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(0x7100_0000)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = client.create_container(&pod, config, &sandbox).unwrap();
    client.start_container(&c).unwrap();
    while client.container_status(&c).unwrap().state != ContainerState::ContainerExited as i32 {
        std::thread::sleep(Duration::from_millis(10));
    }
    client.remove_pod(&pod).unwrap();
    started.elapsed()
}

fn main() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the CRI benchmark runs containerd: run it as root"
    );
    let handlers: Vec<_> = containerd::all_handlers()
        .into_iter()
        .filter(|(n, _)| n == "runc-1-4-3" || n == "runc-1-2-1")
        .collect();
    let image = containerd::probe_image(
        Path::new(env!("CARGO_BIN_EXE_usernsguard-probe")),
        IMAGE,
        IN_IMAGE,
    );
    let cd = Containerd::start(
        &format!("ub21-{}", std::process::id() % 100_000),
        Version::V21,
        &handlers,
        false,
        &[image],
    );
    let mut client = CriClient::connect(&cd.socket, Duration::from_secs(30)).unwrap();
    let logs = tempfile::Builder::new()
        .prefix("ug-bench-")
        .tempdir_in("/run")
        .unwrap();
    let host = HostRoot::own();
    println!("cri-pod benchmark: containerd {ROUNDS} rounds per figure, medians");
    for (handler, _) in &handlers {
        // Warm the page cache and containerd's snapshots for both paths.
        bare_pod(&mut client, handler, 99, logs.path());
        let probe = PodProbe {
            image: IMAGE.into(),
            command: vec![IN_IMAGE.into()],
            log_dir: HostDir {
                local: logs.path().join("probe"),
                host: logs.path().join("probe"),
            },
            uid: IdMapping::pod(0x7200_0000),
            gid: IdMapping::pod(0x7200_0000),
            timeout: Duration::from_secs(30),
        };
        let (mut bare, mut check) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            bare.push(bare_pod(&mut client, handler, round, logs.path()));
            let started = Instant::now();
            let outcome = checks::run_pod(&mut client, &host, handler, &probe);
            check.push(started.elapsed());
            assert!(
                matches!(outcome, PodOutcome::Observed(_)),
                "{handler}: {outcome:?}"
            );
        }
        let (bare, check) = (median(bare), median(check));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{handler}: bare userns pod (run, create, start, exit, remove) {:.0} ms; cri-pod check {:.0} ms = {:.2}x (target <= 1.5x)",
            ms(bare),
            ms(check),
            ms(check) / ms(bare)
        );
    }
    let left = client
        .list_pods(HashMap::from([(
            checks::PROBE_LABEL.to_owned(),
            "true".to_owned(),
        )]))
        .unwrap();
    assert!(left.is_empty(), "probe pods left: {left:?}");
}
