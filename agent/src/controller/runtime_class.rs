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
        || !same_overhead(desired.overhead.as_ref(), current.overhead.as_ref())
        || desired.scheduling != current.scheduling
        || desired.metadata.owner_references != current.metadata.owner_references
}

/// The API server stores quantities in canonical form ("0.5" comes back as "500m", "1024Mi"
/// as "1Gi"), so the profile's spelling is compared by value, or every reconcile would
/// rewrite the RuntimeClass.
fn same_overhead(desired: Option<&Overhead>, current: Option<&Overhead>) -> bool {
    let fixed = |o: Option<&Overhead>| o.and_then(|o| o.pod_fixed.clone()).unwrap_or_default();
    let (desired, current) = (fixed(desired), fixed(current));
    desired.len() == current.len()
        && desired.iter().all(|(k, q)| {
            current.get(k).is_some_and(|c| {
                c.0 == q.0 || matches!((quantity(&c.0), quantity(&q.0)), (Some(a), Some(b)) if a == b)
            })
        })
}

/// A Kubernetes quantity's value in nano-units (`1` → 10^9), exact for what a RuntimeClass
/// overhead holds; `None` for a form it does not parse.
fn quantity(s: &str) -> Option<i128> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.len() > 9 || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let int: i128 = if int.is_empty() || int == "+" || int == "-" {
        0
    } else {
        int.parse().ok()?
    };
    let frac_nanos: i128 = format!("{frac:0<9}").parse().ok()?;
    let nanos = int * 1_000_000_000
        + if number.starts_with('-') {
            -frac_nanos
        } else {
            frac_nanos
        };
    let (mul, div): (i128, i128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        _ => return None,
    };
    Some(nanos.checked_mul(mul)? / div)
}

/// `None` when the profile with `uid` owns `current`; otherwise who does, in words (one
/// created by hand has no owner at all).
pub fn owner_other_than(current: &RuntimeClass, uid: &str) -> Option<String> {
    let owners = current.owner_references();
    if owners.iter().any(|o| o.uid == uid) {
        return None;
    }
    Some(match owners.first() {
        Some(o) => format!("{} {}", o.kind, o.name),
        None => "no RuntimeProfile (created outside usernsguard)".into(),
    })
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

    /// The API server's canonical form of the profile's overhead is the same overhead; a
    /// different value or resource is not.
    #[test]
    fn overhead_is_compared_by_value_as_the_api_server_rewrites_it() {
        let mut p = RuntimeProfile::test();
        p.spec.runtime_class.overhead = [
            ("cpu".to_owned(), "0.5".to_owned()),
            ("memory".to_owned(), "1024Mi".to_owned()),
        ]
        .into();
        let desired = desired_runtime_class(&p).unwrap();
        let with = |cpu: &str, memory: &str| {
            let mut rc = desired.clone();
            rc.overhead = Some(Overhead {
                pod_fixed: Some(
                    [
                        ("cpu".to_owned(), Quantity(cpu.into())),
                        ("memory".to_owned(), Quantity(memory.into())),
                    ]
                    .into(),
                ),
            });
            rc
        };
        assert!(!differs(&desired, Some(&with("500m", "1Gi"))));
        assert!(!differs(&desired, Some(&with("0.5", "1024Mi"))));
        assert!(differs(&desired, Some(&with("400m", "1Gi"))));
        assert!(differs(&desired, Some(&with("500m", "1G"))), "1G is not 1Gi");
        let mut fewer = desired.clone();
        fewer.overhead = None;
        assert!(differs(&desired, Some(&fewer)));
        assert_eq!(quantity("1.5k"), quantity("1500"));
        assert_eq!(quantity("100m"), quantity("0.1"));
        assert_eq!(quantity("2Ki"), quantity("2048"));
        assert_eq!(
            quantity("1e3"),
            None,
            "exponents are not parsed: compared as written"
        );
    }
}
