//! RuntimeProfile reconciler: the uninstall finalizer, the profile's RuntimeClass and its
//! status, rolled up from the NodeReports' `status.installs` (each written by its node's
//! agent, which does the installing; see `crate::node::installs`).
//!
//! The finalizer exists because deleting a profile must take its runtime off every node
//! first: the agents see the deletion (their profile watch) and uninstall; the finalizer is
//! released when no NodeReport lists an install of the profile any more. A node that goes
//! away takes its NodeReport with it (owner reference), so it never blocks the deletion.
//! `usernsguard controller --uninstall-all` uses [`release_if_uninstalled`] the same way.
//!
//! Reconciles are triggered by the profile, its RuntimeClass, any NodeReport change and any
//! Node label change (see [`super::run`]); each writes only what differs, so a burst of 5,000
//! NodeReports costs at most a few status writes per profile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::context::{condition, Context, ControllerError};
use super::runtime_class;
use crate::crd::names::{
    self, CONDITION_DEGRADED, CONDITION_READY, CONTROLLER_FIELD_MANAGER, UNINSTALL_FINALIZER,
};
use crate::crd::{
    InstallCounts, InstallState, NodeReport, RuntimeInstallStatus, RuntimeProfile, RuntimeProfileStatus,
};

/// How many node names a condition message lists before it says "and N more".
const NAMES_IN_MESSAGE: usize = 5;

/// Finalizer, RuntimeClass, status: in that order, each only when it differs.
pub async fn reconcile_profile(p: Arc<RuntimeProfile>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    // Counting before the first complete lists would publish zeros and release finalizers
    // of profiles still installed somewhere.
    for ready in [
        ctx.reports.wait_until_ready().await,
        ctx.nodes.wait_until_ready().await,
        ctx.runtime_classes.wait_until_ready().await,
    ] {
        if ready.is_err() {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    }
    let name = p
        .meta()
        .name
        .clone()
        .ok_or(ControllerError::Unnamed("RuntimeProfile"))?;
    let reports = ctx.reports.state();

    if p.meta().deletion_timestamp.is_some() {
        if release_if_uninstalled(&ctx.client, &p, &reports).await? {
            return Ok(Action::await_change());
        }
        let desired = desired_status(&p, &reports, &ctx.nodes.state(), None, Timestamp::now());
        write_status(&ctx, &name, p.status.as_ref(), desired).await?;
        return Ok(Action::await_change());
    }

    if !p.finalizers().iter().any(|f| f == UNINSTALL_FINALIZER) {
        add_finalizer(&ctx.client, &p).await?;
    }

    let uid = p.uid().unwrap_or_default();
    let mut conflict = None;
    let runtime_class_name = match runtime_class::desired_runtime_class(&p) {
        Some(rc) => {
            let rc_name = rc.metadata.name.clone().unwrap_or_default();
            let current = ctx.runtime_classes.get(&ObjectRef::new(&rc_name));
            match current
                .as_deref()
                .map(|c| runtime_class::owner_other_than(c, &uid))
            {
                // Someone else's (an operator's, or another profile's with the same name):
                // taking it over would flip it between owners on every reconcile.
                Some(Some(owner)) => {
                    conflict = Some(format!(
                        "RuntimeClass {rc_name} exists and belongs to {owner}; set runtimeClass.name"
                    ));
                    None
                }
                _ => {
                    if runtime_class::differs(&rc, current.as_deref()) {
                        runtime_class::apply(&ctx, &rc).await?;
                    }
                    Some(rc_name)
                }
            }
        }
        None => None,
    };
    // Every other RuntimeClass this profile owns is stale (a rename, `create` switched off),
    // found in the store rather than the status, which a failed write may have left behind.
    let stale: Vec<String> = ctx
        .runtime_classes
        .state()
        .iter()
        .filter(|rc| rc.owner_references().iter().any(|o| o.uid == uid))
        .map(|rc| rc.name_any())
        .filter(|n| Some(n) != runtime_class_name.as_ref())
        .collect();
    for old in stale {
        runtime_class::delete_owned(&ctx, &old, &uid).await?;
    }

    let now = Timestamp::now();
    let mut desired = desired_status(&p, &reports, &ctx.nodes.state(), runtime_class_name, now);
    if let Some(message) = conflict {
        tracing::warn!(profile = %name, %message, "RuntimeClass not applied");
        let old = p
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let generation = p.meta().generation.unwrap_or(0);
        let degraded = ("True", "RuntimeClassConflict", message);
        if let Some(c) = desired
            .conditions
            .iter_mut()
            .find(|c| c.type_ == CONDITION_DEGRADED)
        {
            *c = condition(old, CONDITION_DEGRADED, degraded, generation, now);
        }
    }
    write_status(&ctx, &name, p.status.as_ref(), desired).await?;
    Ok(Action::await_change())
}

/// The status the profile should have. A node counts when the profile selects it (while it
/// is being deleted: when its NodeReport still lists an install of it); it is not reported
/// while its entry is missing or for an older generation.
pub fn desired_status(
    p: &RuntimeProfile,
    reports: &[Arc<NodeReport>],
    nodes: &[Arc<PartialObjectMeta<Node>>],
    runtime_class_name: Option<String>,
    now: Timestamp,
) -> RuntimeProfileStatus {
    let name = p.name_any();
    let generation = p.meta().generation.unwrap_or(0);
    let deleting = p.meta().deletion_timestamp.is_some();
    let entries: BTreeMap<String, &RuntimeInstallStatus> = reports
        .iter()
        .filter_map(|nr| Some((nr.name_any(), nr.install_of(&name)?)))
        .collect();
    // Deleting: the nodes still holding an install. Otherwise: the selected nodes (a node
    // that is no longer selected and still has an entry is being uninstalled; it is not
    // part of the rollout any more).
    let counted: BTreeMap<String, Option<&RuntimeInstallStatus>> = if deleting {
        entries.iter().map(|(node, e)| (node.clone(), Some(*e))).collect()
    } else {
        nodes
            .iter()
            .filter(|n| p.spec.selects(n.labels()))
            .map(|n| (n.name_any(), entries.get(&n.name_any()).copied()))
            .collect()
    };
    let mut c = InstallCounts::default();
    let mut failing: Vec<String> = Vec::new();
    let mut waiting: Vec<String> = Vec::new();
    for (node, entry) in &counted {
        c.total += 1;
        match entry {
            Some(e) if e.generation == generation || deleting => match e.state {
                InstallState::Installed => c.installed += 1,
                InstallState::Pending => {
                    c.pending += 1;
                    waiting.push(node.clone());
                }
                InstallState::Failed => {
                    c.failed += 1;
                    failing.push(format!("{node} ({})", e.reason.as_deref().unwrap_or("failed")));
                }
            },
            _ => {
                c.not_reported += 1;
                waiting.push(node.clone());
            }
        }
    }
    let old = p.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let ready = if deleting {
        (
            "False",
            "Uninstalling",
            format!(
                "waiting for {} node(s) to uninstall: {}",
                entries.len(),
                list(entries.keys().cloned().collect())
            ),
        )
    } else if c.total == 0 {
        (
            "False",
            "NoNodes",
            "no node is selected by nodeSelector".to_owned(),
        )
    } else if c.installed == c.total {
        (
            "True",
            "Installed",
            format!("installed on all {} selected nodes", c.total),
        )
    } else {
        (
            "False",
            "Installing",
            format!(
                "installed on {} of {} nodes; {} pending, {} not reported yet (waiting: {})",
                c.installed,
                c.total,
                c.pending,
                c.not_reported,
                list(waiting)
            ),
        )
    };
    let degraded = if c.failed > 0 {
        (
            "True",
            "InstallFailed",
            format!(
                "{} node(s) failed: {}; see their NodeReports' status.installs and Events",
                c.failed,
                list(failing)
            ),
        )
    } else {
        ("False", "NoFailures", "no node failed".to_owned())
    };
    RuntimeProfileStatus {
        observed_generation: Some(generation),
        conditions: vec![
            condition(old, CONDITION_READY, ready, generation, now),
            condition(old, CONDITION_DEGRADED, degraded, generation, now),
        ],
        nodes: Some(c),
        runtime_class_name: if deleting {
            p.status.as_ref().and_then(|s| s.runtime_class_name.clone())
        } else {
            runtime_class_name
        },
    }
}

fn list(mut names: Vec<String>) -> String {
    let more = names.len().saturating_sub(NAMES_IN_MESSAGE);
    names.truncate(NAMES_IN_MESSAGE);
    let mut s = names.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// The nodes whose NodeReport still lists an install of the profile.
pub fn holders(p: &RuntimeProfile, reports: &[Arc<NodeReport>]) -> Vec<String> {
    let name = p.name_any();
    reports
        .iter()
        .filter(|nr| nr.install_of(&name).is_some())
        .map(|nr| nr.name_any())
        .collect()
}

/// Releases the uninstall finalizer of a deleted profile once no node holds an install of
/// it. Returns whether the profile is free to go.
pub async fn release_if_uninstalled(
    client: &Client,
    p: &RuntimeProfile,
    reports: &[Arc<NodeReport>],
) -> Result<bool, ControllerError> {
    if !holders(p, reports).is_empty() {
        return Ok(false);
    }
    let Some(i) = p.finalizers().iter().position(|f| f == UNINSTALL_FINALIZER) else {
        return Ok(true);
    };
    // JSON patch with a test: removes exactly our entry, fails (and is retried) if the list
    // changed since it was read.
    let patch = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": UNINSTALL_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    patch_finalizers(client, p, patch).await?;
    Ok(true)
}

async fn add_finalizer(client: &Client, p: &RuntimeProfile) -> Result<(), ControllerError> {
    let patch = match &p.meta().finalizers {
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [UNINSTALL_FINALIZER]},
        ]),
        Some(current) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": UNINSTALL_FINALIZER},
        ]),
    };
    patch_finalizers(client, p, patch).await
}

async fn patch_finalizers(
    client: &Client,
    p: &RuntimeProfile,
    patch: serde_json::Value,
) -> Result<(), ControllerError> {
    let name = p
        .meta()
        .name
        .clone()
        .ok_or(ControllerError::Unnamed("RuntimeProfile"))?;
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON patch");
    let pp = PatchParams {
        field_manager: Some(CONTROLLER_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match Api::<RuntimeProfile>::all(client.clone())
        .patch(&name, &pp, &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing left to release.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    ctx: &Context,
    name: &str,
    current: Option<&RuntimeProfileStatus>,
    desired: RuntimeProfileStatus,
) -> Result<(), ControllerError> {
    if current == Some(&desired) {
        return Ok(());
    }
    let body = json!({
        "apiVersion": names::API_VERSION, "kind": "RuntimeProfile",
        "metadata": {"name": name},
        "status": desired,
    });
    Api::<RuntimeProfile>::all(ctx.client.clone())
        .patch_status(
            name,
            &PatchParams::apply(CONTROLLER_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
