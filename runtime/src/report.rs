//! The self-test result document: what `usernsguard selftest --output json` prints, what the
//! agent writes into `NodeReport.status`, and what feeds the self-test metrics.
//!
//! Field names are camelCase because the same structs are embedded in the CRD status; a
//! change here is a change of the published API.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::facts::NodeFacts;
use crate::reason::Reason;

/// One row of DESIGN.md's check table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The runtime creates the user namespace from the config's mappings.
    UsernsCreated,
    /// The runtime joins a user + network namespace created beforehand, as containerd 2.x does.
    UsernsJoined,
    /// A host directory bind-mounted with an idmap.
    IdmapMount,
    /// The runtime's `features` claims against what the probes observed.
    Features,
    /// Whether the node's CRI runtime reports user-namespace support for the handler: the
    /// field the kubelet copies to `node.status.runtimeHandlers` and checks before admitting
    /// a `hostUsers: false` pod.
    CriAdvertised,
    /// A real pod sandbox with a user namespace and one container, run through the node's
    /// CRI runtime and this handler the way the kubelet does.
    CriPod,
}

impl Check {
    /// Every check, in report order (features after the probes it compares).
    pub const ALL: [Check; 6] = [
        Check::UsernsCreated,
        Check::UsernsJoined,
        Check::IdmapMount,
        Check::Features,
        Check::CriAdvertised,
        Check::CriPod,
    ];

    /// The checks that run a probe container directly through the OCI runtime binary.
    pub const PROBES: [Check; 3] = [Check::UsernsCreated, Check::UsernsJoined, Check::IdmapMount];

    /// The wire name (CLI `--check`, JSON, `check` metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            Check::UsernsCreated => "userns-created",
            Check::UsernsJoined => "userns-joined",
            Check::IdmapMount => "idmap-mount",
            Check::Features => "features",
            Check::CriAdvertised => "cri-advertised",
            Check::CriPod => "cri-pod",
        }
    }

    /// Whether the check talks to the node's CRI runtime (and is skipped without one).
    pub const fn is_cri(self) -> bool {
        matches!(self, Check::CriAdvertised | Check::CriPod)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returned when a string is not one of the four check names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown check {0:?}: expected one of userns-created, userns-joined, idmap-mount, features, cri-advertised, cri-pod")]
pub struct UnknownCheck(pub String);

impl FromStr for Check {
    type Err = UnknownCheck;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Check::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCheck(s.to_owned()))
    }
}

/// Outcome of one check.
///
/// `Fail` means the node is known to break user-namespace pods; `Warn` means such pods work
/// on this node as it is configured but a known latent defect is present (today: an
/// unmapped `/dev/mqueue` owner where the CRI runtime sets no SELinux mount label); `Error`
/// means the probe itself could not reach a verdict (runtime missing, hung without a userns
/// symptom, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum CheckOutcome {
    Pass,
    Warn,
    Fail,
    Skip,
    Error,
}

impl CheckOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            CheckOutcome::Pass => "Pass",
            CheckOutcome::Warn => "Warn",
            CheckOutcome::Fail => "Fail",
            CheckOutcome::Skip => "Skip",
            CheckOutcome::Error => "Error",
        }
    }

    /// Pass and Warn: a `hostUsers: false` pod works as the node is configured.
    pub const fn works(self) -> bool {
        matches!(self, CheckOutcome::Pass | CheckOutcome::Warn)
    }
}

/// The result of one check for one runtime handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub check: Check,
    pub result: CheckOutcome,
    /// Set for `Fail` and `Warn`, and for `Error` when the cause is known (e.g. `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What was observed, including the runtime's own error text on failure.
    pub message: String,
    /// The reason's one-line fix, repeated here so every consumer shows the same text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<String>,
    pub duration_seconds: f64,
}

impl CheckResult {
    pub fn new(
        check: Check,
        result: CheckOutcome,
        reason: Option<Reason>,
        message: impl Into<String>,
    ) -> Self {
        CheckResult {
            check,
            result,
            reason,
            message: message.into(),
            remediation: reason.map(|r| r.remediation().to_owned()),
            duration_seconds: 0.0,
        }
    }

    pub fn pass(check: Check, message: impl Into<String>) -> Self {
        Self::new(check, CheckOutcome::Pass, None, message)
    }

    pub fn fail(check: Check, reason: Reason, message: impl Into<String>) -> Self {
        Self::new(check, CheckOutcome::Fail, Some(reason), message)
    }

    pub fn warn(check: Check, reason: Reason, message: impl Into<String>) -> Self {
        Self::new(check, CheckOutcome::Warn, Some(reason), message)
    }

    pub fn skip(check: Check, message: impl Into<String>) -> Self {
        Self::new(check, CheckOutcome::Skip, None, message)
    }

    pub fn error(check: Check, reason: Option<Reason>, message: impl Into<String>) -> Self {
        Self::new(check, CheckOutcome::Error, reason, message)
    }
}

/// A handler's overall verdict; the value of the `usernsguard.io/userns.<handler>` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Unknown,
}

impl Verdict {
    /// `pass` only if every applicable check passed or warned; any `Fail` makes it `fail`;
    /// otherwise (errors, or nothing applicable ran) we do not know, and say so.
    pub fn of(checks: &[CheckResult]) -> Verdict {
        if checks.iter().any(|c| c.result == CheckOutcome::Fail) {
            return Verdict::Fail;
        }
        let applicable: Vec<_> = checks.iter().filter(|c| c.result != CheckOutcome::Skip).collect();
        if !applicable.is_empty() && applicable.iter().all(|c| c.result.works()) {
            Verdict::Pass
        } else {
            Verdict::Unknown
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a runtime says about itself in `<runtime> features` (OCI runtime-spec features
/// document), reduced to what matters for user namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedFeatures {
    /// False when the runtime has no `features` subcommand (crun before 1.9, runc before 1.1):
    /// then containerd cannot learn anything from it either.
    pub available: bool,
    /// `linux.namespaces` lists `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespaces: Option<bool>,
    /// `linux.mountExtensions.idmap.enabled`, or `idmap` among `mountOptions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idmap_mounts: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_version_max: Option<String>,
}

/// Everything the self-test learned about one runtime handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerReport {
    /// The runtime handler name (containerd `runtimes.<handler>`, or `--runtime NAME=`).
    pub handler: String,
    /// The runtime binary that was executed.
    pub binary: String,
    /// `runc`, `crun`, ... as the binary names itself in `--version`; empty when unknown.
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub features: ClaimedFeatures,
    pub verdict: Verdict,
    pub checks: Vec<CheckResult>,
}

impl HandlerReport {
    /// A handler that could not be probed at all: every requested check is an `Error` with
    /// `message`, so its label reads `unknown` rather than disappearing.
    pub fn unprobed(handler: &str, binary: &str, checks: &[Check], message: &str) -> Self {
        let checks: Vec<_> = checks
            .iter()
            .map(|c| CheckResult::error(*c, None, message))
            .collect();
        HandlerReport {
            handler: handler.to_owned(),
            binary: binary.to_owned(),
            runtime: String::new(),
            version: String::new(),
            features: ClaimedFeatures::default(),
            verdict: Verdict::of(&checks),
            checks,
        }
    }

    pub fn check(&self, check: Check) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == check)
    }
}

/// The node's CRI runtime as the CRI checks found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CriSummary {
    /// `containerd` or `cri-o`.
    pub runtime: String,
    /// As the CRI `Version` call reports it; empty when the socket did not answer.
    #[serde(default)]
    pub version: String,
    /// The CRI socket, as a path on the host.
    pub socket: String,
    /// The configuration the handlers were read from (host path), when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Whether the CRI runtime puts SELinux labels on containers (containerd
    /// `enable_selinux`, CRI-O `selinux`) and SELinux is enabled: where it does, an unmapped
    /// `/dev/mqueue` owner makes runc's relabel fail and the pod never starts.
    #[serde(default)]
    pub selinux_labels: bool,
}

/// One complete self-test run on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestReport {
    /// RFC 3339 time the run started.
    pub started_at: String,
    pub duration_seconds: f64,
    pub node: NodeFacts,
    /// The CRI runtime the CRI checks used; absent when none was reachable or asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri: Option<CriSummary>,
    pub handlers: Vec<HandlerReport>,
    /// Why the report has no handler, or why some checks could not run, in words for the
    /// operator (e.g. no CRI configuration found on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl SelfTestReport {
    pub fn handler(&self, name: &str) -> Option<&HandlerReport> {
        self.handlers.iter().find(|h| h.handler == name)
    }

    /// True when every handler's verdict is `pass` (and there was at least one).
    pub fn all_pass(&self) -> bool {
        !self.handlers.is_empty() && self.handlers.iter().all(|h| h.verdict == Verdict::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(result: CheckOutcome) -> CheckResult {
        CheckResult::new(Check::UsernsCreated, result, None, "")
    }

    #[test]
    fn verdict_needs_every_applicable_check_to_pass() {
        use CheckOutcome::*;
        assert_eq!(Verdict::of(&[r(Pass), r(Pass), r(Skip)]), Verdict::Pass);
        assert_eq!(
            Verdict::of(&[r(Pass), r(Warn)]),
            Verdict::Pass,
            "a warning still works"
        );
        assert_eq!(Verdict::of(&[r(Warn), r(Fail)]), Verdict::Fail);
        assert_eq!(Verdict::of(&[r(Warn), r(Error)]), Verdict::Unknown);
        assert_eq!(Verdict::of(&[r(Pass), r(Error)]), Verdict::Unknown);
        assert_eq!(Verdict::of(&[r(Error), r(Fail)]), Verdict::Fail);
        assert_eq!(Verdict::of(&[r(Skip)]), Verdict::Unknown);
        assert_eq!(Verdict::of(&[]), Verdict::Unknown);
    }

    #[test]
    fn check_names_parse_and_reject_unknown() {
        for c in Check::ALL {
            assert_eq!(c.as_str().parse::<Check>().unwrap(), c);
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert!("userns"
            .parse::<Check>()
            .unwrap_err()
            .to_string()
            .contains("\"userns\""));
    }

    #[test]
    fn check_result_json_is_camel_case_with_remediation() {
        let mut c = CheckResult::fail(Check::UsernsJoined, Reason::MqueueOwnerUnmapped, "owned by 65534");
        c.duration_seconds = 0.25;
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["check"], "userns-joined");
        assert_eq!(v["result"], "Fail");
        assert_eq!(v["reason"], "mqueue_owner_unmapped");
        assert_eq!(v["durationSeconds"], 0.25);
        assert!(v["remediation"].as_str().unwrap().contains("runc to 1.2.1"));
    }
}
