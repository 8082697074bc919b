//! `cri-advertised` and `cri-pod`: what the node's CRI runtime tells the kubelet about a
//! handler, and a real user-namespace pod through it.
//!
//! `cri-pod` does what the kubelet does for a `hostUsers: false` pod: `RunPodSandbox` with
//! `userns_options` mode POD, `CreateContainer`, `StartContainer`, then it reads the
//! container's log. The sandbox image is the CRI runtime's own; the container image must
//! already be on the node (the agent's own image, holding the probe payload), so nothing is
//! pulled. The pod is always removed, on failure and on timeout too; pods left by a killed
//! agent carry [`PROBE_LABEL`] and are removed by the next run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, IdMapping as CriIdMapping, ImageSpec, Int64Value,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, UserNamespace,
};

use super::client::{CriClient, CriError, HandlerFeatures};
use crate::classify::classify;
use crate::host::{HostDir, HostRoot};
use crate::probe::evaluate::{evaluate_observation, Judge};
use crate::probe::payload::Observation;
use crate::reason::Reason;
use crate::report::{Check, CheckResult};
use crate::userns::IdMapping;

/// Label on every probe pod, so leftovers are found by it.
pub const PROBE_LABEL: &str = "io.usernsguard/probe";
/// The Kubernetes-like namespace probe pods are created in.
pub const PROBE_NAMESPACE: &str = "usernsguard-probe";

/// Judges `cri-advertised` from the handlers `Status` reported. `cri` names the CRI runtime
/// and version for messages.
pub fn advertised(handlers: &[HandlerFeatures], handler: &str, cri: &str) -> CheckResult {
    let check = Check::CriAdvertised;
    if handlers.is_empty() {
        return CheckResult::fail(
            check,
            Reason::UsernsNotAdvertised,
            format!(
                "{cri} reports no runtime handlers with features (it predates per-handler features, which \
                 containerd 2.0 and CRI-O 1.30 added); the kubelet then treats every handler as lacking \
                 user-namespace support and rejects hostUsers: false pods"
            ),
        );
    }
    match handlers.iter().find(|h| h.name == handler) {
        None => CheckResult::fail(
            check,
            Reason::UsernsNotAdvertised,
            format!(
                "{cri} does not know the handler {handler:?} (it lists {}); the kubelet rejects pods that \
                 select it (a configuration change not yet loaded needs a restart of the CRI runtime)",
                handlers
                    .iter()
                    .map(|h| if h.name.is_empty() { "\"\" (default)".to_owned() } else { h.name.clone() })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Some(HandlerFeatures {
            user_namespaces: Some(true),
            ..
        }) => CheckResult::pass(
            check,
            format!("{cri} advertises user-namespace support for handler {handler:?}"),
        ),
        Some(HandlerFeatures {
            user_namespaces: Some(false),
            ..
        }) => CheckResult::fail(
            check,
            Reason::UsernsNotAdvertised,
            format!(
                "{cri} reports userNamespaces: false for handler {handler:?} (its runtime's `features` does not \
                 list both the user namespace and idmapped mounts), so the kubelet rejects hostUsers: false pods"
            ),
        ),
        Some(HandlerFeatures {
            user_namespaces: None,
            ..
        }) => CheckResult::fail(
            check,
            Reason::UsernsNotAdvertised,
            format!(
                "{cri} reports no features for handler {handler:?} (it could not introspect the runtime: no \
                 `features` subcommand?), so the kubelet rejects hostUsers: false pods"
            ),
        ),
    }
}

/// What a `cri-pod` probe needs.
#[derive(Debug, Clone)]
pub struct PodProbe {
    /// An image already on the node holding the payload.
    pub image: String,
    /// The payload's path in the image and its arguments.
    pub command: Vec<String>,
    /// Where the CRI runtime writes the container's log (created, and removed afterwards).
    pub log_dir: HostDir,
    pub uid: IdMapping,
    pub gid: IdMapping,
    /// Time for the container to run and exit (each CRI call has the client's own deadline).
    pub timeout: Duration,
}

/// What happened to a `cri-pod` probe.
#[derive(Debug, Clone, PartialEq)]
pub enum PodOutcome {
    Observed(Box<Observation>),
    /// A CRI call failed: the CRI runtime's error, as the kubelet would report it.
    Failed {
        call: &'static str,
        message: String,
    },
    /// The container exited without reporting.
    Exited {
        exit_code: i32,
        log: String,
    },
    Timeout {
        stage: &'static str,
        after: Duration,
    },
    /// The probe could not be attempted (e.g. the probe image is not on the node).
    NotRun(String),
}

fn mapping(m: IdMapping) -> CriIdMapping {
    CriIdMapping {
        host_id: m.host_id,
        container_id: m.container_id,
        length: m.size,
    }
}

fn namespace_options(probe: &PodProbe) -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        target_id: String::new(),
        userns_options: Some(UserNamespace {
            mode: NamespaceMode::Pod as i32,
            uids: vec![mapping(probe.uid)],
            gids: vec![mapping(probe.gid)],
        }),
    }
}

/// Runs one probe pod through `handler` and removes it.
pub fn run_pod(client: &mut CriClient, host: &HostRoot, handler: &str, probe: &PodProbe) -> PodOutcome {
    match client.image_present(&probe.image) {
        Ok(true) => {}
        Ok(false) => {
            return PodOutcome::NotRun(format!(
                "the probe image {} is not on the node (the check pulls nothing)",
                probe.image
            ))
        }
        Err(e) => return failed_call(e),
    }
    if let Err(e) = std::fs::create_dir_all(&probe.log_dir.local) {
        return PodOutcome::NotRun(format!("creating {}: {e}", probe.log_dir.host.display()));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let labels = HashMap::from([
        (PROBE_LABEL.to_owned(), "true".to_owned()),
        ("io.usernsguard/handler".to_owned(), handler.to_owned()),
    ]);
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("probe-{handler}"),
            uid: format!("ug-{}-{nanos:x}", std::process::id()),
            namespace: PROBE_NAMESPACE.into(),
            attempt: 0,
        }),
        hostname: "probe".into(),
        log_directory: probe.log_dir.host.display().to_string(),
        labels: labels.clone(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(probe)),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    };
    let pod = match client.run_pod_sandbox(&sandbox, handler) {
        Ok(id) => id,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&probe.log_dir.local);
            return failed_call(e);
        }
    };
    let outcome = run_container(client, host, probe, &pod, &sandbox, labels);
    if let Err(e) = client.remove_pod(&pod) {
        tracing::warn!(pod, error = %e, "removing the probe pod failed; the next run retries");
    }
    let _ = std::fs::remove_dir_all(&probe.log_dir.local);
    outcome
}

fn failed_call(e: CriError) -> PodOutcome {
    match e {
        CriError::Call { call, message } => PodOutcome::Failed { call, message },
        CriError::Timeout { call, after } => PodOutcome::Timeout { stage: call, after },
        other => PodOutcome::NotRun(other.to_string()),
    }
}

fn run_container(
    client: &mut CriClient,
    host: &HostRoot,
    probe: &PodProbe,
    pod: &str,
    sandbox: &PodSandboxConfig,
    labels: HashMap<String, String>,
) -> PodOutcome {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "probe".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: probe.image.clone(),
            ..ImageSpec::default()
        }),
        command: probe.command.clone(),
        log_path: "probe.log".into(),
        labels,
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespace_options(probe)),
                run_as_user: Some(Int64Value { value: 0 }),
                ..LinuxContainerSecurityContext::default()
            }),
            ..LinuxContainerConfig::default()
        }),
        ..ContainerConfig::default()
    };
    let container = match client.create_container(pod, config, sandbox) {
        Ok(id) => id,
        Err(e) => return failed_call(e),
    };
    if let Err(e) = client.start_container(&container) {
        return failed_call(e);
    }
    let deadline = Instant::now() + probe.timeout;
    let status = loop {
        match client.container_status(&container) {
            Ok(s) if s.state == ContainerState::ContainerExited as i32 => break s,
            Ok(_) if Instant::now() >= deadline => {
                return PodOutcome::Timeout {
                    stage: "waiting for the container to exit",
                    after: probe.timeout,
                }
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return failed_call(e),
        }
    };
    let log = std::fs::read_to_string(host.path(PathBuf::from(&status.log_path)))
        .map(|raw| cri_log_text(&raw))
        .unwrap_or_default();
    match log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Observation>(l).ok())
    {
        Some(obs) => PodOutcome::Observed(Box::new(obs)),
        None => PodOutcome::Exited {
            exit_code: status.exit_code,
            log: format!("{} {}", status.message, log).trim().to_owned(),
        },
    }
}

/// The text of a CRI log file (`<time> <stream> <P|F> <text>` lines; `P` continues on the
/// next line).
pub fn cri_log_text(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag), text) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        out.push_str(text.unwrap_or(""));
        if tag != "P" {
            out.push('\n');
        }
    }
    out
}

/// Judges a `cri-pod` outcome; `judge.runtime` names the CRI runtime and handler.
pub fn judge_pod(outcome: &PodOutcome, judge: &Judge<'_>) -> CheckResult {
    let check = Check::CriPod;
    let via = judge.runtime;
    match outcome {
        PodOutcome::Observed(obs) => evaluate_observation(check, obs, None, judge),
        PodOutcome::Failed { call, message } => {
            let reason = classify(message);
            let text = format!("{call} through {via} failed: {message}");
            if reason.is_userns() {
                CheckResult::fail(check, reason, text)
            } else {
                CheckResult::fail(check, Reason::PodStartFailed, text)
            }
        }
        PodOutcome::Exited { exit_code, log } => CheckResult::fail(
            check,
            Reason::PodStartFailed,
            format!("the probe container exited with {exit_code} through {via} without reporting: {log}"),
        ),
        PodOutcome::Timeout { stage, after } => CheckResult::error(
            check,
            Some(Reason::Timeout),
            format!("{stage} through {via} did not finish within {after:?}; the pod was removed"),
        ),
        PodOutcome::NotRun(message) => CheckResult::error(check, None, message.clone()),
    }
}

/// Removes probe pods a killed earlier run left behind: every pod with [`PROBE_LABEL`]
/// created more than `older_than` ago (younger ones may belong to a run in progress).
/// Returns how many were removed.
pub fn remove_leftovers(client: &mut CriClient, older_than: Duration) -> Result<usize, CriError> {
    let pods = client.list_pods(HashMap::from([(PROBE_LABEL.to_owned(), "true".to_owned())]))?;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut removed = 0;
    for pod in pods {
        if now_ns.saturating_sub(pod.created_at) < older_than.as_nanos() as i64 {
            continue;
        }
        client.remove_pod(&pod.id)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::payload::MountObservation;
    use crate::report::CheckOutcome;

    fn h(name: &str, userns: Option<bool>) -> HandlerFeatures {
        HandlerFeatures {
            name: name.into(),
            user_namespaces: userns,
        }
    }

    #[test]
    fn advertised_arms() {
        let list = [
            h("runc", Some(false)),
            h("", Some(false)),
            h("runc-1-4-3", Some(true)),
            h("crun", None),
        ];
        let r = advertised(&list, "runc-1-4-3", "containerd 2.1.9");
        assert_eq!(r.result, CheckOutcome::Pass, "{}", r.message);
        for (handler, needle) in [
            ("runc", "userNamespaces: false"),
            ("crun", "no features"),
            (
                "kata",
                "does not know the handler \"kata\" (it lists runc, \"\" (default), runc-1-4-3, crun)",
            ),
        ] {
            let r = advertised(&list, handler, "containerd 2.1.9");
            assert_eq!(
                (r.result, r.reason),
                (CheckOutcome::Fail, Some(Reason::UsernsNotAdvertised)),
                "{handler}"
            );
            assert!(r.message.contains(needle), "{handler}: {}", r.message);
        }
        let r = advertised(&[], "runc", "containerd 1.6.20");
        assert_eq!(r.reason, Some(Reason::UsernsNotAdvertised));
        assert!(
            r.message.contains("predates per-handler features"),
            "{}",
            r.message
        );
    }

    fn judge() -> Judge<'static> {
        Judge {
            uid: IdMapping::pod(0x7001_0000),
            runtime: "containerd 2.1.9 handler runc-1-2-0",
            selinux_labels: false,
        }
    }

    fn obs(uid_map: &str, mqueue_uid: u32) -> Observation {
        let m = |uid| MountObservation {
            mounted: true,
            uid: Some(uid),
            gid: Some(65534),
            error: None,
        };
        Observation {
            uid_map: uid_map.into(),
            proc: m(65534),
            sys: m(65534),
            mqueue: m(mqueue_uid),
            ..Observation::default()
        }
    }

    #[test]
    fn pod_observations_are_judged_like_the_direct_probes() {
        let pass = judge_pod(
            &PodOutcome::Observed(Box::new(obs("0 1879113728 65536", 0))),
            &judge(),
        );
        assert_eq!(pass.result, CheckOutcome::Pass, "{}", pass.message);
        let warn = judge_pod(
            &PodOutcome::Observed(Box::new(obs("0 1879113728 65536", 65534))),
            &judge(),
        );
        assert_eq!(
            (warn.result, warn.reason),
            (CheckOutcome::Warn, Some(Reason::MqueueOwnerUnmapped))
        );
        let ignored = judge_pod(
            &PodOutcome::Observed(Box::new(obs("0 0 4294967295", 0))),
            &judge(),
        );
        assert_eq!(
            (ignored.result, ignored.reason),
            (CheckOutcome::Fail, Some(Reason::UsernsUnsupported)),
            "containerd 1.x runs the pod in the host user namespace"
        );
    }

    #[test]
    fn cri_failures_keep_a_userns_reason_or_become_pod_start_failed() {
        let idmap = PodOutcome::Failed {
            call: "StartContainer",
            message: "Unknown: failed to create containerd task: failed to validate OCI runtime features: idmap mounts not supported: missing `mountExtensions.idmap` entry in `features` command".into(),
        };
        let r = judge_pod(&idmap, &judge());
        assert_eq!(
            (r.result, r.reason),
            (CheckOutcome::Fail, Some(Reason::IdmapUnsupported)),
            "{}",
            r.message
        );
        assert!(
            r.message.starts_with("StartContainer through containerd 2.1.9"),
            "{}",
            r.message
        );
        let version = PodOutcome::Failed {
            call: "RunPodSandbox",
            message: "Unknown: failed to start sandbox: failed to create containerd task: failed to create shim task: OCI runtime create failed: unknown version specified".into(),
        };
        let r = judge_pod(&version, &judge());
        assert_eq!(
            (r.result, r.reason),
            (CheckOutcome::Fail, Some(Reason::PodStartFailed)),
            "{}",
            r.message
        );
        let exited = judge_pod(
            &PodOutcome::Exited {
                exit_code: 127,
                log: "exec: not found".into(),
            },
            &judge(),
        );
        assert_eq!(exited.reason, Some(Reason::PodStartFailed));
        let slow = judge_pod(
            &PodOutcome::Timeout {
                stage: "RunPodSandbox",
                after: Duration::from_secs(30),
            },
            &judge(),
        );
        assert_eq!(
            (slow.result, slow.reason),
            (CheckOutcome::Error, Some(Reason::Timeout))
        );
        let missing = judge_pod(
            &PodOutcome::NotRun("the probe image x is not on the node".into()),
            &judge(),
        );
        assert_eq!((missing.result, missing.reason), (CheckOutcome::Error, None));
    }

    #[test]
    fn cri_log_lines_are_joined_and_stripped_of_their_prefix() {
        let raw = "2026-11-30T05:00:00.1Z stdout P {\"uid\":\n2026-11-30T05:00:00.2Z stdout F 0}\n2026-11-30T05:00:00.3Z stderr F done\nbroken\n";
        assert_eq!(cri_log_text(raw), "{\"uid\":0}\ndone\n");
    }
}
