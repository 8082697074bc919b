//! RuntimeClasses: one per RuntimeProfile (unless `runtimeClass.create` is false), owned
//! through an ownerReference, so deleting the profile garbage-collects its RuntimeClass
//! without a finalizer.

use std::sync::Arc;

use k8s_openapi::api::node::v1::{Overhead, RuntimeClass, Scheduling};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource};
use serde_json::json;

use super::context::{Context, ControllerError};
use crate::crd::names::{self, CONTROLLER_FIELD_MANAGER};
use crate::crd::{InstallState, RuntimeProfile};

/// The RuntimeClass a profile owns, or None when the profile opts out.
pub fn desired_runtime_class(p: &RuntimeProfile) -> Option<RuntimeClass> {
    let opts = &p.spec.runtime_class;
    if !opts.create {
        return None;
    }
    let handler = &p.spec.handler;
    let mut selector = p.spec.node_selector.clone();
    selector.insert(
        names::runtime_label(handler),
        InstallState::Installed.as_str().into(),
    );
    if opts.require_self_test_pass {
        selector.insert(names::userns_label(handler), "pass".into());
    }
    let overhead = (!opts.overhead.is_empty()).then(|| Overhead {
        pod_fixed: Some(
            opts.overhead
                .iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect(),
        ),
    });
    let mut rc = RuntimeClass {
        handler: handler.clone(),
        overhead,
        scheduling: Some(Scheduling {
            node_selector: Some(selector),
            tolerations: None,
        }),
        ..RuntimeClass::default()
    };
    rc.metadata.name = Some(opts.name.clone().unwrap_or_else(|| handler.clone()));
    rc.metadata.owner_references = p.controller_owner_ref(&()).map(|o| vec![o]);
    Some(rc)
}

/// Applies the profile's RuntimeClass (server-side apply: idempotent, and only triggered by
/// a change of the profile or of the RuntimeClass itself), then records its name in the
/// profile's status if it is not there yet.
pub async fn reconcile_profile(p: Arc<RuntimeProfile>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let Some(rc) = desired_runtime_class(&p) else {
        return Ok(Action::await_change());
    };
    let rc_name = rc.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(&rc).expect("RuntimeClass serializes");
    body["apiVersion"] = json!("node.k8s.io/v1");
    body["kind"] = json!("RuntimeClass");
    let pp = PatchParams::apply(CONTROLLER_FIELD_MANAGER).force();
    Api::<RuntimeClass>::all(ctx.client.clone())
        .patch(&rc_name, &pp, &Patch::Apply(&body))
        .await?;
    let recorded = p.status.as_ref().and_then(|s| s.runtime_class_name.as_deref());
    if recorded != Some(rc_name.as_str()) {
        let name = p
            .meta()
            .name
            .clone()
            .ok_or(ControllerError::Unnamed("RuntimeProfile"))?;
        let status = json!({
            "apiVersion": names::API_VERSION, "kind": "RuntimeProfile",
            "metadata": {"name": name},
            "status": {"runtimeClassName": rc_name},
        });
        Api::<RuntimeProfile>::all(ctx.client.clone())
            .patch_status(&name, &pp, &Patch::Apply(&status))
            .await?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, StatusCode};
    use std::time::Duration;

    const APPLY: Option<&str> = Some("application/apply-patch+yaml");

    #[tokio::test]
    async fn profile_gets_owned_runtime_class_with_selector_and_overhead() {
        let (ctx, mut server) = Context::test(vec![]);
        let mut p = RuntimeProfile::test();
        p.spec.node_selector.insert("pool".into(), "userns".into());
        p.spec
            .runtime_class
            .overhead
            .insert("memory".into(), "20Mi".into());
        let scenario = tokio::spawn(async move {
            let seen = server.next().await;
            seen.expect(
                Method::PATCH,
                "/apis/node.k8s.io/v1/runtimeclasses/crun?&force=true&fieldManager=usernsguard-controller",
                APPLY,
            );
            assert_eq!(
                seen.body,
                json!({
                    "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                    "metadata": {"name": "crun", "ownerReferences": [{
                        "apiVersion": "usernsguard.io/v1alpha1", "kind": "RuntimeProfile",
                        "name": "crun", "uid": "rtp-uid", "controller": true}]},
                    "handler": "crun",
                    "overhead": {"podFixed": {"memory": "20Mi"}},
                    "scheduling": {"nodeSelector": {
                        "pool": "userns",
                        "usernsguard.io/runtime.crun": "installed",
                        "usernsguard.io/userns.crun": "pass"}},
                })
            );
            seen.echo();
            let seen = server.next().await;
            seen.expect(
                Method::PATCH,
                "/apis/usernsguard.io/v1alpha1/runtimeprofiles/crun/status?&force=true&fieldManager=usernsguard-controller",
                APPLY,
            );
            assert_eq!(seen.body["status"], json!({"runtimeClassName": "crun"}));
            let mut stored = serde_json::to_value(RuntimeProfile::test()).unwrap();
            stored["status"] = json!({"runtimeClassName": "crun"});
            seen.reply(StatusCode::OK, &stored);
        });
        reconcile_profile(Arc::new(p), ctx).await.unwrap();
        crate::testing::finish(scenario, Duration::from_secs(1)).await;
    }

    #[test]
    fn runtime_class_follows_profile_options() {
        let mut p = RuntimeProfile::test();
        p.spec.runtime_class.require_self_test_pass = false;
        p.spec.runtime_class.name = Some("crun-userns".into());
        let rc = desired_runtime_class(&p).unwrap();
        assert_eq!(rc.metadata.name.as_deref(), Some("crun-userns"));
        let sel = rc.scheduling.unwrap().node_selector.unwrap();
        assert_eq!(sel.len(), 1, "{sel:?}");
        assert_eq!(sel["usernsguard.io/runtime.crun"], "installed");
        assert!(rc.overhead.is_none());
        p.spec.runtime_class.create = false;
        assert!(desired_runtime_class(&p).is_none());
    }
}
