//! The four checks of DESIGN.md: running each probe container and judging what came back.
//!
//! [`run_probe`] does the side effects (bundle, namespace holder, runtime); [`evaluate`] and
//! [`evaluate_features`] are pure, so every verdict and reason is unit-tested from recorded
//! outcomes, including the SELinux-enforcing failure this machine cannot produce.

pub mod payload;
pub mod runner;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::bundle::{self, BundleOptions, MirrorEntry, Namespaces, Payload, IDMAP_TARGET};
use crate::classify::classify;
use crate::process::ProcessError;
use crate::reason::Reason;
use crate::report::{Check, CheckOutcome, CheckResult, ClaimedFeatures};
use crate::userns::{IdMapping, NamespaceHolder};
use payload::Observation;
use runner::RuntimeCommand;

/// The overflow uid the kernel shows for ids unmapped in a user namespace.
pub const OVERFLOW_UID: u32 = 65534;

/// What one probe needs from its surroundings.
#[derive(Debug, Clone)]
pub struct ProbeEnv<'a> {
    pub runtime: &'a RuntimeCommand,
    pub payload: &'a Payload,
    pub mirror: &'a [MirrorEntry],
    pub uid: IdMapping,
    pub gid: IdMapping,
    /// `linux.mountLabel` to set, as containerd and CRI-O do on SELinux nodes.
    pub mount_label: Option<&'a str>,
    pub timeout: Duration,
    /// A fresh directory for this handler's probes; removed by the caller.
    pub work_dir: &'a Path,
    /// Container ids are `<id_prefix>-<check>`.
    pub id_prefix: &'a str,
}

/// What happened when a probe container ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payload ran and reported. `written_host_uid` is the host owner of the file the
    /// idmap probe wrote, when it wrote one.
    Observed {
        observation: Box<Observation>,
        written_host_uid: Option<u32>,
    },
    /// The runtime exited non-zero; `text` is its stderr (and stdout).
    RuntimeFailed { status: String, text: String },
    /// The runtime did not finish in time and was killed.
    Timeout { timeout: Duration, text: String },
    /// The runtime exited 0 but no observation came back (not an OCI runtime?).
    NoObservation { stdout: String, stderr: String },
    /// The probe could not be set up or the runtime not started.
    Setup(String),
}

/// Runs the probe container of `check` (not `Features`, which runs no container).
pub fn run_probe(check: Check, env: &ProbeEnv<'_>) -> Outcome {
    let dir = env.work_dir.join(check.as_str());
    match prepare_and_run(check, env, &dir) {
        Ok(outcome) => outcome,
        Err(message) => Outcome::Setup(message),
    }
}

fn prepare_and_run(check: Check, env: &ProbeEnv<'_>, dir: &Path) -> Result<Outcome, String> {
    let bundle_dir = dir.join("bundle");
    let state_dir = dir.join("state");
    for d in [dir, &bundle_dir, &state_dir] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    // Kept alive until the runtime has exited: its namespaces are what the probe joins.
    let holder = match check {
        Check::UsernsJoined => Some(
            NamespaceHolder::spawn(env.uid, env.gid).map_err(|e| format!("pre-creating namespaces: {e}"))?,
        ),
        _ => None,
    };
    let namespaces = match &holder {
        Some(h) => Namespaces::Join {
            user: h.user_ns_path(),
            net: h.net_ns_path(),
        },
        None => Namespaces::Create,
    };
    let idmap_dir = dir.join("idmap");
    let (idmap_source, extra_args) = if check == Check::IdmapMount {
        fs::create_dir_all(&idmap_dir).map_err(|e| format!("creating {}: {e}", idmap_dir.display()))?;
        // World-writable so that a runtime ignoring the idmap still lets the write happen,
        // and the host owner of the written file shows what the runtime really did.
        fs::set_permissions(&idmap_dir, fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", idmap_dir.display()))?;
        (
            Some(idmap_dir.clone()),
            vec!["--idmap-dir".to_owned(), IDMAP_TARGET.to_owned()],
        )
    } else {
        (None, vec![])
    };
    let opts = BundleOptions {
        uid: env.uid,
        gid: env.gid,
        namespaces,
        mount_label: env.mount_label.map(str::to_owned),
        payload: env.payload.clone(),
        payload_extra_args: extra_args,
        idmap_source,
        mirror: env.mirror.to_vec(),
    };
    bundle::write(&bundle_dir, &opts).map_err(|e| e.to_string())?;

    let id = format!("{}-{}", env.id_prefix, check.as_str());
    let result = env.runtime.run(&state_dir, &bundle_dir, &id, env.timeout);
    drop(holder);
    Ok(match result {
        Ok(out) if out.status.success() => {
            let stdout = out.stdout_lossy();
            match stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Observation>(l).ok())
            {
                Some(observation) => {
                    let written = idmap_dir.join(payload::IDMAP_WRITTEN_FILE);
                    let written_host_uid = fs::metadata(&written).ok().map(|m| m.uid());
                    Outcome::Observed {
                        observation: Box::new(observation),
                        written_host_uid,
                    }
                }
                None => Outcome::NoObservation {
                    stdout,
                    stderr: out.stderr_lossy(),
                },
            }
        }
        Ok(out) => {
            let text = ProcessError::Failed {
                program: env.runtime.binary.clone(),
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            };
            Outcome::RuntimeFailed {
                status: format!("{:?}", out.status),
                text: text.output_text(),
            }
        }
        Err(e @ ProcessError::Timeout { .. }) => Outcome::Timeout {
            timeout: env.timeout,
            text: e.output_text(),
        },
        Err(e) => Outcome::Setup(e.to_string()),
    })
}

fn excerpt(text: &str) -> String {
    const MAX: usize = 2000;
    let t = text.trim();
    if t.len() <= MAX {
        return t.to_owned();
    }
    let mut end = MAX;
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &t[..end])
}

/// Judges a probe's outcome. `uid` is the mapping the probe asked for.
pub fn evaluate(check: Check, outcome: &Outcome, uid: IdMapping, runtime: &str) -> CheckResult {
    match outcome {
        Outcome::Observed { observation, written_host_uid } => {
            evaluate_observation(check, observation, *written_host_uid, uid)
        }
        Outcome::RuntimeFailed { text, .. } => {
            let reason = classify(text);
            if reason.is_userns() {
                CheckResult::fail(check, reason, format!("{runtime} failed: {}", excerpt(text)))
            } else {
                CheckResult::error(
                    check,
                    None,
                    format!("{runtime} failed for a reason unrelated to user namespaces: {}", excerpt(text)),
                )
            }
        }
        Outcome::Timeout { timeout, text } => {
            let mut msg = format!(
                "{runtime} did not finish within {}s; it and its process group were killed",
                timeout.as_secs_f64()
            );
            if !text.trim().is_empty() {
                msg.push_str(&format!(": {}", excerpt(text)));
            }
            CheckResult::error(check, Some(Reason::Timeout), msg)
        }
        Outcome::NoObservation { stdout, stderr } => CheckResult::error(
            check,
            None,
            format!(
                "{runtime} exited successfully but the probe container reported nothing (is it an OCI runtime?); stdout: {:?}, stderr: {:?}",
                excerpt(stdout),
                excerpt(stderr)
            ),
        ),
        Outcome::Setup(message) => CheckResult::error(check, None, message.clone()),
    }
}

fn owner(o: &payload::MountObservation) -> String {
    match (o.uid, o.gid) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        _ => "unknown".into(),
    }
}

fn evaluate_observation(
    check: Check,
    obs: &Observation,
    written_host_uid: Option<u32>,
    uid: IdMapping,
) -> CheckResult {
    if !uid.matches_proc_map(&obs.uid_map) {
        return CheckResult::fail(
            check,
            Reason::UsernsUnsupported,
            format!(
                "the container did not run in the requested user namespace: uid_map is {:?}, expected \"{uid}\"",
                obs.uid_map.trim()
            ),
        );
    }
    let mounts = [
        (&obs.proc, "/proc", "not procfs", Reason::ProcMountEperm),
        (&obs.sys, "/sys", "not sysfs", Reason::SysfsMountEperm),
        (
            &obs.mqueue,
            "/dev/mqueue",
            "not an mqueue mount",
            Reason::OtherUserns,
        ),
    ];
    for (mount, path, not_it, reason) in mounts {
        if !mount.mounted {
            let why = mount.error.as_deref().unwrap_or(not_it);
            return CheckResult::fail(check, reason, format!("{path} inside the container: {why}"));
        }
    }
    if obs.mqueue.uid != Some(0) {
        return CheckResult::fail(
            check,
            Reason::MqueueOwnerUnmapped,
            format!(
                "/dev/mqueue is owned by {} inside the container, not by uid 0: the runtime created the IPC \
                 namespace before becoming root in the pod's user namespace, so on an SELinux node labelling \
                 the mount fails with setxattr: operation not permitted (runc issue 4466)",
                owner(&obs.mqueue)
            ),
        );
    }
    let base = format!(
        "uid_map \"{uid}\"; proc, sysfs and mqueue mounted; /dev/mqueue owned by {}",
        owner(&obs.mqueue)
    );
    if check != Check::IdmapMount {
        return CheckResult::pass(check, base);
    }
    let Some(idmap) = &obs.idmap else {
        return CheckResult::error(check, None, "the probe reported no idmap observation");
    };
    let inside = idmap.dir.uid;
    let mapped_write = written_host_uid == Some(0);
    match (inside, idmap.write_error.as_deref(), written_host_uid) {
        (Some(0), None, Some(0)) => CheckResult::pass(
            check,
            "the idmapped directory (host uid 0) shows uid 0 inside and a write by the container's root landed as host uid 0",
        ),
        (Some(OVERFLOW_UID), ..) | (_, _, Some(_)) if !mapped_write => CheckResult::fail(
            check,
            Reason::IdmapIgnored,
            format!(
                "the runtime accepted the idmap mount but mounted without the idmap: the directory (host uid 0) \
                 shows uid {} inside{}",
                inside.map_or("unknown".into(), |u| u.to_string()),
                match written_host_uid {
                    Some(h) => format!(" and a write by the container's root landed as host uid {h}"),
                    None => String::new(),
                }
            ),
        ),
        _ => CheckResult::fail(
            check,
            Reason::OtherUserns,
            format!(
                "unexpected idmap result: directory uid inside {inside:?}, write error {:?}, written file's host uid {written_host_uid:?}",
                idmap.write_error
            ),
        ),
    }
}

/// Compares the runtime's `features` claims with the other checks' results.
pub fn evaluate_features(claims: &ClaimedFeatures, results: &[CheckResult], runtime: &str) -> CheckResult {
    let check = Check::Features;
    if !claims.available {
        return CheckResult::skip(
            check,
            format!("{runtime} has no `features` subcommand, so containerd cannot learn its user-namespace or idmap support from it"),
        );
    }
    let find = |c: Check| results.iter().find(|r| r.check == c);
    let observed_userns = find(Check::UsernsCreated).and_then(|r| match (r.result, r.reason) {
        (CheckOutcome::Pass, _) => Some(true),
        (CheckOutcome::Fail, Some(Reason::UsernsUnsupported)) => Some(false),
        _ => None,
    });
    // Only a runtime-level outcome says something about the runtime's claim: an idmap the
    // kernel refuses (`idmap_unsupported`) is not the runtime's fault.
    let observed_idmap = find(Check::IdmapMount).and_then(|r| match (r.result, r.reason) {
        (CheckOutcome::Pass, _) => Some(true),
        (CheckOutcome::Fail, Some(Reason::IdmapIgnored)) => Some(false),
        _ => None,
    });
    let yes_no = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "not stated",
    };
    let claims_text = format!(
        "{runtime} claims user namespaces: {}, idmap mounts: {}",
        yes_no(claims.user_namespaces),
        yes_no(claims.idmap_mounts)
    );
    let mut mismatches = Vec::new();
    if let (Some(claimed), Some(seen)) = (claims.user_namespaces, observed_userns) {
        if claimed != seen {
            mismatches.push(format!(
                "user namespaces {}",
                if seen { "work" } else { "do not work" }
            ));
        }
    }
    if let Some(seen) = observed_idmap {
        let claimed = claims.idmap_mounts.unwrap_or(false);
        if claimed != seen {
            mismatches.push(format!(
                "idmap mounts {}",
                if seen { "work" } else { "are ignored" }
            ));
        }
    }
    if mismatches.is_empty() {
        CheckResult::pass(check, format!("{claims_text}; consistent with the probes"))
    } else {
        CheckResult::fail(
            check,
            Reason::FeaturesMismatch,
            format!(
                "{claims_text}; but the probes observed: {}",
                mismatches.join(", ")
            ),
        )
    }
}
