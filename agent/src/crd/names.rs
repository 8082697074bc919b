//! Every name from DESIGN.md that the code spells: the API group, label prefixes, field
//! managers, condition types, event reasons and install states. Other modules import these
//! instead of writing the strings, so a rename is one edit here (plus the chart and
//! dashboards, which DESIGN.md lists).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `apiVersion` of every usernsguard kind.
pub const API_VERSION: &str = "usernsguard.io/v1alpha1";

/// Prefix of the verdict labels the agent owns on its node: `usernsguard.io/userns.<handler>`
/// = `pass` | `fail` | `unknown`.
pub const USERNS_LABEL_PREFIX: &str = "usernsguard.io/userns.";
/// Prefix of the install-state labels the agent owns on its node:
/// `usernsguard.io/runtime.<handler>` = [`InstallState`].
pub const RUNTIME_LABEL_PREFIX: &str = "usernsguard.io/runtime.";

/// Field manager of every agent write (and the Events' reporting controller).
pub const AGENT_FIELD_MANAGER: &str = "usernsguard-agent";
/// Field manager of every controller write.
pub const CONTROLLER_FIELD_MANAGER: &str = "usernsguard-controller";

/// Condition: every selected node reported for the observed generation.
pub const CONDITION_READY: &str = "Ready";
/// Condition: at least one selected node failed or could not run the probes.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Reason of the Warning Event on a Node whose handler started failing a SelfTest.
pub const EVENT_SELFTEST_FAILED: &str = "UsernsSelfTestFailed";

/// Reason of the Warning Event on a Node whose runtime install or uninstall failed.
pub const EVENT_INSTALL_FAILED: &str = "RuntimeInstallFailed";
/// Reason of the Normal Event on a Node whose runtime was installed (or changed).
pub const EVENT_INSTALLED: &str = "RuntimeInstalled";
/// Reason of the Normal Event on a Node whose runtime was uninstalled.
pub const EVENT_UNINSTALLED: &str = "RuntimeUninstalled";

/// Finalizer the controller puts on every RuntimeProfile: released once no NodeReport lists
/// an install of it, so a deleted profile is uninstalled from every node first.
pub const UNINSTALL_FINALIZER: &str = "usernsguard.io/uninstall";

/// Handler names end up in node label keys (`usernsguard.io/runtime.<handler>` is the longer
/// one): a label name is at most 63 characters, `runtime.` takes 8 of them.
pub const HANDLER_MAX_LEN: usize = 55;
/// A label-name suffix: what a handler may be called so that its node labels are valid.
pub const HANDLER_PATTERN: &str = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$";

/// The verdict label key of `handler`.
pub fn userns_label(handler: &str) -> String {
    format!("{USERNS_LABEL_PREFIX}{handler}")
}

/// The install-state label key of `handler`.
pub fn runtime_label(handler: &str) -> String {
    format!("{RUNTIME_LABEL_PREFIX}{handler}")
}

/// Install state of a runtime handler on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstallState {
    Installed,
    Pending,
    Failed,
}

impl InstallState {
    pub const ALL: [InstallState; 3] = [
        InstallState::Installed,
        InstallState::Pending,
        InstallState::Failed,
    ];

    /// The `state` label of `usernsguard_runtime_install_state` and the value of the
    /// `usernsguard.io/runtime.<handler>` node label.
    pub const fn as_str(self) -> &'static str {
        match self {
            InstallState::Installed => "installed",
            InstallState::Pending => "pending",
            InstallState::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn names_agree_with_the_types_and_the_wire_format() {
        use crate::crd::{NodeReport, RuntimeProfile, SelfTest};
        assert_eq!(SelfTest::api_version(&()), API_VERSION);
        assert_eq!(NodeReport::api_version(&()), API_VERSION);
        assert_eq!(RuntimeProfile::api_version(&()), API_VERSION);
        for s in InstallState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(userns_label("crun"), "usernsguard.io/userns.crun");
        assert_eq!(runtime_label("crun"), "usernsguard.io/runtime.crun");
        let longest = runtime_label(&"a".repeat(HANDLER_MAX_LEN));
        assert_eq!(longest.split_once('/').unwrap().1.len(), 63, "label name limit");
    }
}
