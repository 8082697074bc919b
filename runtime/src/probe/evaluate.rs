//! Judging what a probe container saw: pure functions from a recorded [`Outcome`] (or a
//! payload [`Observation`], or a runtime's `features` claims) to a [`CheckResult`], so every
//! verdict and reason is unit-tested, including the SELinux-enforcing ones this machine
//! cannot produce.
//!
//! Every judgement reads the uid only for ownership: the kernel's owner check that breaks
//! runc's SELinux relabel of `/dev/mqueue` is uid-based, and runc leaves the mqueue gid
//! unmapped even when it creates the user namespace itself, which is harmless.

use std::time::Duration;

use super::payload::{IdmapObservation, NamespaceIds, Observation};
use crate::classify::classify;
use crate::reason::Reason;
use crate::report::{Check, CheckOutcome, CheckResult, ClaimedFeatures};
use crate::userns::IdMapping;

/// The overflow uid the kernel shows for ids unmapped in a user namespace.
pub const OVERFLOW_UID: u32 = 65534;

/// What happened when a probe container ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payload ran and reported.
    Observed {
        observation: Box<Observation>,
        /// The namespaces the runtime was asked to join, when it was asked to join some.
        expected_ns: Option<NamespaceIds>,
        /// Per idmapped mount (in the order of `observation.idmaps`): what the host sees of
        /// the file the payload wrote there.
        written: Vec<Written>,
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

/// The host's view of the file the idmap probe wrote through an idmapped mount, read
/// without following symlinks: a container may replace it with one pointing anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// No file (the write failed, or the container removed it).
    Nothing,
    /// A regular file owned by this host uid.
    File { host_uid: u32 },
    /// Something else: a symlink, a directory, a device.
    NotAFile,
}

/// What a judgement needs to know besides the outcome.
#[derive(Debug, Clone, Copy)]
pub struct Judge<'a> {
    /// The uid mapping the probe asked for.
    pub uid: IdMapping,
    /// `runc 1.1.5`, for messages.
    pub runtime: &'a str,
    /// Whether the CRI runtime sets an SELinux mount label on this node (SELinux enabled
    /// and labels on in its config): there an unmapped `/dev/mqueue` owner fails the pod.
    pub selinux_labels: bool,
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

/// Judges a probe's outcome for `check` (`userns-created`, `userns-joined`).
pub fn evaluate(check: Check, outcome: &Outcome, judge: &Judge<'_>) -> CheckResult {
    match outcome {
        Outcome::Observed {
            observation,
            expected_ns,
            ..
        } => evaluate_observation(check, observation, *expected_ns, judge),
        other => evaluate_unobserved(check, other, judge),
    }
}

/// The outcomes that carry no observation, common to every probe.
fn evaluate_unobserved(check: Check, outcome: &Outcome, judge: &Judge<'_>) -> CheckResult {
    let runtime = judge.runtime;
    match outcome {
        Outcome::Observed { .. } => unreachable!("observations are judged by the check"),
        Outcome::RuntimeFailed { text, .. } => {
            let reason = classify(text);
            if reason.is_userns() {
                CheckResult::fail(check, reason, format!("{runtime} failed: {}", excerpt(text)))
            } else {
                CheckResult::error(
                    check,
                    None,
                    format!(
                        "{runtime} failed for a reason unrelated to user namespaces: {}",
                        excerpt(text)
                    ),
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

fn owner(o: &super::payload::MountObservation) -> String {
    match (o.uid, o.gid) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        _ => "unknown".into(),
    }
}

/// Judges what the payload saw from inside a pod-like container: its user namespace (the
/// requested mapping; the namespaces it was told to join), proc, sysfs and mqueue mounted,
/// and `/dev/mqueue` owned by the container's root. Shared by the direct probes and
/// `cri-pod`.
pub fn evaluate_observation(
    check: Check,
    obs: &Observation,
    expected_ns: Option<NamespaceIds>,
    judge: &Judge<'_>,
) -> CheckResult {
    let uid = judge.uid;
    if !uid.matches_proc_map(&obs.uid_map) {
        let host_identity = IdMapping {
            container_id: 0,
            host_id: 0,
            size: u32::MAX,
        };
        let why = if host_identity.matches_proc_map(&obs.uid_map) {
            // containerd before 2.0 accepts a pod's userns_options and ignores them.
            "; it ran in the host's user namespace: the runtime ignored the request"
        } else {
            ""
        };
        return CheckResult::fail(
            check,
            Reason::UsernsUnsupported,
            format!(
                "the container did not run in the requested user namespace: uid_map is {:?}, expected \"{uid}\"{why}",
                obs.uid_map.trim()
            ),
        );
    }
    if let Some(expected) = expected_ns {
        if obs.namespaces != Some(expected) {
            let seen = obs
                .namespaces
                .map_or("unknown".to_owned(), |n| format!("user {} net {}", n.user, n.net));
            return CheckResult::fail(
                check,
                Reason::UsernsUnsupported,
                format!(
                    "{} did not join the namespaces it was given: the container's are {seen}, the given ones user {} net {}",
                    judge.runtime, expected.user, expected.net
                ),
            );
        }
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
        let seen = format!(
            "/dev/mqueue is owned by {} inside the container, not by uid 0: the runtime created the IPC \
             namespace before becoming root in the pod's user namespace (runc issue 4466)",
            owner(&obs.mqueue)
        );
        return if judge.selinux_labels {
            CheckResult::fail(
                check,
                Reason::MqueueSetxattr,
                format!(
                    "{seen}; this node's CRI runtime sets an SELinux mount label, so labelling the mount fails \
                     with setxattr: operation not permitted and the pod never starts"
                ),
            )
        } else {
            CheckResult::warn(
                check,
                Reason::MqueueOwnerUnmapped,
                format!(
                    "{seen}; harmless here because no SELinux mount label is set, but pods fail once the CRI \
                     runtime labels mounts (SELinux enabled with containerd enable_selinux / CRI-O selinux)"
                ),
            )
        };
    }
    CheckResult::pass(
        check,
        format!(
            "uid_map \"{uid}\"{}; proc, sysfs and mqueue mounted; /dev/mqueue owned by {}",
            if expected_ns.is_some() {
                "; joined the given user and network namespaces"
            } else {
                ""
            },
            owner(&obs.mqueue)
        ),
    )
}

/// Judges the `idmap-mount` check from its sub-probes, one per place pods' volumes live
/// (`where`: e.g. `/var/lib/kubelet (ext4)`, `tmpfs`): it passes only if every one does.
pub fn evaluate_idmap(parts: &[(String, Outcome)], judge: &Judge<'_>) -> CheckResult {
    let check = Check::IdmapMount;
    if parts.is_empty() {
        return CheckResult::error(check, None, "no directory to probe idmapped mounts in");
    }
    let results: Vec<(&str, CheckResult)> = parts
        .iter()
        .map(|(place, outcome)| (place.as_str(), evaluate_idmap_part(place, outcome, judge)))
        .collect();
    let summary = results
        .iter()
        .map(|(place, r)| format!("{place}: {}", r.message))
        .collect::<Vec<_>>()
        .join("; ");
    let worst = [CheckOutcome::Fail, CheckOutcome::Error]
        .into_iter()
        .find_map(|o| results.iter().find(|(_, r)| r.result == o));
    match worst {
        Some((_, r)) => CheckResult::new(check, r.result, r.reason, summary),
        None => CheckResult::pass(check, summary),
    }
}

fn evaluate_idmap_part(place: &str, outcome: &Outcome, judge: &Judge<'_>) -> CheckResult {
    let check = Check::IdmapMount;
    let Outcome::Observed {
        observation, written, ..
    } = outcome
    else {
        return evaluate_unobserved(check, outcome, judge);
    };
    if !judge.uid.matches_proc_map(&observation.uid_map) {
        return CheckResult::fail(
            check,
            Reason::UsernsUnsupported,
            format!(
                "the container did not run in the requested user namespace: uid_map is {:?}",
                observation.uid_map.trim()
            ),
        );
    }
    let (Some(idmap), Some(written)) = (observation.idmaps.first(), written.first()) else {
        return CheckResult::error(check, None, format!("the probe reported nothing about {place}"));
    };
    judge_idmap(idmap, *written)
}

/// One idmapped bind mount of a host directory owned by host uid 0, mode 0755: mapped, the
/// container's root sees uid 0 and its write lands as host uid 0; ignored, it sees the
/// overflow uid and cannot write (the directory is not world-writable).
fn judge_idmap(idmap: &IdmapObservation, written: Written) -> CheckResult {
    let check = Check::IdmapMount;
    let inside = idmap.dir.uid;
    match (inside, idmap.write_error.as_deref(), written) {
        (Some(0), None, Written::File { host_uid: 0 }) => CheckResult::pass(
            check,
            "the directory (host uid 0) shows uid 0 inside and a write by the container's root landed as host uid 0",
        ),
        (_, _, Written::NotAFile) => CheckResult::fail(
            check,
            Reason::OtherUserns,
            "the file the probe wrote is not a regular file on the host (a symlink or another object): \
             the result cannot be trusted",
        ),
        (Some(OVERFLOW_UID), ..) => CheckResult::fail(
            check,
            Reason::IdmapIgnored,
            format!(
                "the runtime accepted the idmap mount but mounted without the idmap: the directory (host uid 0) \
                 shows uid {OVERFLOW_UID} inside{}",
                idmap
                    .write_error
                    .as_deref()
                    .map(|e| format!(" and the container's root cannot write there ({e})"))
                    .unwrap_or_default()
            ),
        ),
        (_, None, Written::File { host_uid }) if host_uid != 0 => CheckResult::fail(
            check,
            Reason::IdmapIgnored,
            format!(
                "a write by the container's root landed as host uid {host_uid}, not 0: the mount is not idmapped"
            ),
        ),
        _ => CheckResult::fail(
            check,
            Reason::OtherUserns,
            format!(
                "unexpected idmap result: directory uid inside {inside:?}, write error {:?}, host sees {written:?}",
                idmap.write_error
            ),
        ),
    }
}

/// The runtime's `features` answer: its claims, or why they could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum FeaturesAnswer {
    Claims(ClaimedFeatures),
    Failed { message: String, timed_out: bool },
}

/// Compares the runtime's `features` claims with the other checks' results. Judged on
/// evidence only: a claim is confirmed or contradicted by a probe that reached a verdict
/// about it, and with no such probe there is nothing to judge.
pub fn evaluate_features(answer: &FeaturesAnswer, results: &[CheckResult], runtime: &str) -> CheckResult {
    let check = Check::Features;
    let claims = match answer {
        FeaturesAnswer::Failed { message, timed_out } => {
            return CheckResult::error(
                check,
                timed_out.then_some(Reason::Timeout),
                format!("cannot read {runtime}'s features: {message}"),
            )
        }
        FeaturesAnswer::Claims(c) => c,
    };
    if !claims.available {
        return CheckResult::skip(
            check,
            format!("{runtime} has no `features` subcommand, so containerd cannot learn its user-namespace or idmap support from it"),
        );
    }
    let find = |c: Check| results.iter().find(|r| r.check == c);
    let observed_userns = find(Check::UsernsCreated).and_then(|r| match (r.result, r.reason) {
        (CheckOutcome::Pass | CheckOutcome::Warn, _) => Some(true),
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
    let mut compared = Vec::new();
    let mut mismatches = Vec::new();
    if let (Some(claimed), Some(seen)) = (claims.user_namespaces, observed_userns) {
        compared.push("user namespaces");
        if claimed != seen {
            mismatches.push(format!(
                "user namespaces {}",
                if seen { "work" } else { "do not work" }
            ));
        }
    }
    if let Some(seen) = observed_idmap {
        compared.push("idmap mounts");
        // Not claiming idmap is claiming no idmap: containerd reads it so.
        if claims.idmap_mounts.unwrap_or(false) != seen {
            mismatches.push(format!(
                "idmap mounts {}",
                if seen { "work" } else { "are ignored" }
            ));
        }
    }
    if compared.is_empty() {
        return CheckResult::skip(
            check,
            format!("{claims_text}; no probe reached a verdict to compare them with"),
        );
    }
    if mismatches.is_empty() {
        CheckResult::pass(
            check,
            format!(
                "{claims_text}; consistent with the probes ({})",
                compared.join(", ")
            ),
        )
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

#[cfg(test)]
mod tests;
