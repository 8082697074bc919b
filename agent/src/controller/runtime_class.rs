//! RuntimeClasses: one per RuntimeProfile (unless `runtimeClass.create` is false), owned
//! through an ownerReference, so the garbage collector removes it with the profile (after
//! the profile's uninstall finalizer is released). [`super::runtime_profile`] decides when
//! these run.

use k8s_openapi::api::node::v1::{Overhead, RuntimeClass, Scheduling};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
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

/// Whether the RuntimeClass in the cluster (`current`) differs from `desired` in what the
/// profile decides: handler, overhead, scheduling and the owner. Everything else (labels
/// added by others, managed fields) is left alone, so a reconcile triggered by any NodeReport
/// change writes nothing.
pub fn differs(desired: &RuntimeClass, current: Option<&RuntimeClass>) -> bool {
    let Some(current) = current else { return true };
    desired.handler != current.handler
        || desired.overhead != current.overhead
        || desired.scheduling != current.scheduling
        || desired.metadata.owner_references != current.metadata.owner_references
}

/// Server-side apply of the profile's RuntimeClass (forced: the controller owns these
/// fields).
pub async fn apply(ctx: &Context, rc: &RuntimeClass) -> Result<(), ControllerError> {
    let name = rc
        .metadata
        .name
        .clone()
        .ok_or(ControllerError::Unnamed("RuntimeClass"))?;
    let mut body = serde_json::to_value(rc).expect("RuntimeClass serializes");
    body["apiVersion"] = json!("node.k8s.io/v1");
    body["kind"] = json!("RuntimeClass");
    let pp = PatchParams::apply(CONTROLLER_FIELD_MANAGER).force();
    Api::<RuntimeClass>::all(ctx.client.clone())
        .patch(&name, &pp, &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Deletes the RuntimeClass `name` if this profile (`owner_uid`) owns it: what is left when
/// a profile switches `runtimeClass.create` off or renames its RuntimeClass. One someone
/// else created under that name is not touched.
pub async fn delete_owned(ctx: &Context, name: &str, owner_uid: &str) -> Result<(), ControllerError> {
    let owned = ctx
        .runtime_classes
        .get(&ObjectRef::new(name))
        .is_some_and(|rc| rc.owner_references().iter().any(|o| o.uid == owner_uid));
    if !owned {
        return Ok(());
    }
    match Api::<RuntimeClass>::all(ctx.client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// What others add (labels, managed fields) is no difference; what the profile decides is.
    #[test]
    fn only_the_fields_the_profile_decides_make_a_difference() {
        let p = RuntimeProfile::test();
        let desired = desired_runtime_class(&p).unwrap();
        assert!(differs(&desired, None));
        let mut current = desired.clone();
        current.metadata.labels = Some([("team".to_owned(), "x".to_owned())].into());
        current.metadata.resource_version = Some("9".into());
        assert!(!differs(&desired, Some(&current)));
        current.handler = "runc".into();
        assert!(differs(&desired, Some(&current)));
        let mut current = desired.clone();
        current.scheduling = None;
        assert!(
            differs(&desired, Some(&current)),
            "someone removed the node selector"
        );
    }
}
