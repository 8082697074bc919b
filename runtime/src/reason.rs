//! The one vocabulary of failure reasons shared by the probes, the pod-failure classifier,
//! the NodeReport, Events and the `reason` metric label.
//!
//! Keeping a single closed enum is what bounds the label cardinality of
//! `usernsguard_pod_userns_failures_total` and lets a self-test verdict and a real pod
//! failure be compared on the same dashboard row.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why a user-namespace pod (or a probe standing in for one) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// runc labelled an mqueue superblock owned by an unmapped uid (runc issue 4466).
    MqueueSetxattr,
    /// `/dev/mqueue` inside the container is owned by the overflow uid: the precondition
    /// of `MqueueSetxattr`, visible without SELinux.
    MqueueOwnerUnmapped,
    /// The kernel or filesystem refused an idmapped mount.
    IdmapUnsupported,
    /// The runtime accepted an idmapped mount and silently mounted it without the idmap.
    IdmapIgnored,
    /// The runtime or CRI runtime cannot run user-namespace containers at all.
    UsernsUnsupported,
    /// Mounting sysfs failed with EPERM (netns not owned by the pod's user namespace).
    SysfsMountEperm,
    /// Mounting procfs failed with EPERM (masked/locked /proc or foreign pidns).
    ProcMountEperm,
    /// No subordinate uid/gid range left for the pod.
    SubidUnavailable,
    /// An SELinux denial (AVC) tied to the user namespace.
    SelinuxDenied,
    /// The runtime's `features` document disagrees with what the probes observed.
    FeaturesMismatch,
    /// The CRI runtime does not report user-namespace support for the handler, so the
    /// kubelet (1.30+) refuses every `hostUsers: false` pod that selects it.
    UsernsNotAdvertised,
    /// A pod sandbox or container did not start through the CRI for a reason that is not a
    /// user-namespace one (the pod fails anyway).
    PodStartFailed,
    /// The runtime did not finish within the probe timeout.
    Timeout,
    /// A user-namespace failure that matches none of the specific reasons.
    OtherUserns,
    /// Not a user-namespace failure (image pull, CNI, OOM, ...): classifier only, never counted.
    Unrelated,
}

impl Reason {
    /// Every reason, in declaration order: the domain of the `reason` metric label.
    pub const ALL: [Reason; 15] = [
        Reason::MqueueSetxattr,
        Reason::MqueueOwnerUnmapped,
        Reason::IdmapUnsupported,
        Reason::IdmapIgnored,
        Reason::UsernsUnsupported,
        Reason::SysfsMountEperm,
        Reason::ProcMountEperm,
        Reason::SubidUnavailable,
        Reason::SelinuxDenied,
        Reason::FeaturesMismatch,
        Reason::UsernsNotAdvertised,
        Reason::PodStartFailed,
        Reason::Timeout,
        Reason::OtherUserns,
        Reason::Unrelated,
    ];

    /// The wire name (metric label value, JSON value, `classify` output).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MqueueSetxattr => "mqueue_setxattr",
            Reason::MqueueOwnerUnmapped => "mqueue_owner_unmapped",
            Reason::IdmapUnsupported => "idmap_unsupported",
            Reason::IdmapIgnored => "idmap_ignored",
            Reason::UsernsUnsupported => "userns_unsupported",
            Reason::SysfsMountEperm => "sysfs_mount_eperm",
            Reason::ProcMountEperm => "proc_mount_eperm",
            Reason::SubidUnavailable => "subid_unavailable",
            Reason::SelinuxDenied => "selinux_denied",
            Reason::FeaturesMismatch => "features_mismatch",
            Reason::UsernsNotAdvertised => "userns_not_advertised",
            Reason::PodStartFailed => "pod_start_failed",
            Reason::Timeout => "timeout",
            Reason::OtherUserns => "other_userns",
            Reason::Unrelated => "unrelated",
        }
    }

    /// Whether a pod failure with this reason counts as a user-namespace failure.
    pub const fn is_userns(self) -> bool {
        !matches!(self, Reason::Unrelated)
    }

    /// The one-line fix an operator sees next to the reason (selftest table, NodeReport,
    /// Events), so a failed verdict is actionable without reading this code.
    pub const fn remediation(self) -> &'static str {
        match self {
            Reason::MqueueSetxattr | Reason::MqueueOwnerUnmapped => {
                "upgrade runc to 1.2.1 or later, or select crun 1.9 or later through a RuntimeClass (older crun has no `features`, so containerd 2.x does not advertise user namespaces for it)"
            }
            Reason::IdmapUnsupported => {
                "use kernel 6.3+ for tmpfs, a filesystem with idmapped-mount support under the kubelet and containerd directories, and a runtime whose `features` reports idmapped mounts (runc 1.2+, crun 1.9+)"
            }
            Reason::IdmapIgnored => {
                "use a runtime that implements idmapped mounts (runc 1.2+, crun 1.9+)"
            }
            Reason::UsernsUnsupported => {
                "use containerd 2.0+ or CRI-O 1.25+ with a runtime that supports user namespaces"
            }
            Reason::SysfsMountEperm => {
                "let the runtime create the network namespace inside the pod's user namespace (containerd 2.0+, runc 1.2+ or crun)"
            }
            Reason::ProcMountEperm => {
                "make sure /proc is not over-mounted or masked on the host and the pod gets its own PID namespace"
            }
            Reason::SubidUnavailable => {
                "give the kubelet user enough subordinate ids in /etc/subuid and /etc/subgid (65536 per pod)"
            }
            Reason::SelinuxDenied => {
                "install a container-selinux policy that allows user-namespace containers, or run the pod with a permitted SELinux type"
            }
            Reason::FeaturesMismatch => {
                "do not trust the runtime's `features` claims on this node; schedule user-namespace pods by the usernsguard.io/userns label"
            }
            Reason::UsernsNotAdvertised => {
                "use containerd 2.0+ or CRI-O 1.30+ and a runtime whose `features` reports idmapped mounts (runc 1.2+, crun 1.9+), since that is what the CRI runtime advertises to the kubelet"
            }
            Reason::PodStartFailed => {
                "read the CRI error in the message: the pod does not start through this handler, for a reason unrelated to user namespaces"
            }
            Reason::Timeout => {
                "check the runtime and node load; raise the probe timeout if the node is merely slow"
            }
            Reason::OtherUserns => {
                "read the full message; report it to usernsguard if it recurs so it gets its own reason"
            }
            Reason::Unrelated => "not a user-namespace failure",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returned when a string is not one of DESIGN.md's reason codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason code {0:?}: expected one of mqueue_setxattr, mqueue_owner_unmapped, idmap_unsupported, idmap_ignored, userns_unsupported, sysfs_mount_eperm, proc_mount_eperm, subid_unavailable, selinux_denied, features_mismatch, userns_not_advertised, pod_start_failed, timeout, other_userns, unrelated")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_serde_and_from_str() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), reason);
            assert_eq!(reason.as_str().parse::<Reason>().unwrap(), reason);
        }
    }

    #[test]
    fn unknown_code_is_rejected_with_the_input_named() {
        let err = "mqueue".parse::<Reason>().unwrap_err();
        assert!(err.to_string().contains("\"mqueue\""), "{err}");
    }

    #[test]
    fn every_userns_reason_has_a_distinct_actionable_remediation_except_shared_mqueue() {
        for reason in Reason::ALL {
            assert!(!reason.remediation().is_empty());
        }
        assert_eq!(
            Reason::MqueueSetxattr.remediation(),
            Reason::MqueueOwnerUnmapped.remediation()
        );
        assert!(Reason::IdmapIgnored.remediation().contains("crun 1.9+"));
        assert!(!Reason::Unrelated.is_userns());
        assert_eq!(Reason::ALL.iter().filter(|r| r.is_userns()).count(), 14);
        assert!(Reason::MqueueSetxattr.remediation().contains("crun 1.9"));
        assert!(Reason::UsernsNotAdvertised
            .remediation()
            .contains("containerd 2.0+"));
    }
}
