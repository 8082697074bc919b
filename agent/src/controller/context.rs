//! What the controller's reconcilers share: the API client, the NodeReport store, the error
//! type and the retry policy.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::Client;

use crate::crd::NodeReport;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no name")]
    Unnamed(&'static str),
}

impl ControllerError {
    /// Bounded label for a reconcile-failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::Kube(_) => "kube",
            ControllerError::Unnamed(_) => "invalid",
        }
    }
}

/// What the reconcilers share.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    /// Every NodeReport, kept current by a watch.
    pub reports: Store<NodeReport>,
    /// Every Node's metadata (labels decide which ones a SelfTest selects), kept current by
    /// a watch.
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// Every RuntimeClass, kept current by the profile controller's `owns` watch: a profile's
    /// RuntimeClass is written only when it differs from the wanted one.
    pub runtime_classes: Store<RuntimeClass>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("reports", &self.reports.len())
            .finish()
    }
}

pub fn error_policy<K>(_obj: Arc<K>, err: &ControllerError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, kind = err.metric_label(), "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// A condition with `(status, reason, message)`, keeping the transition time of an existing
/// condition of the same type and status.
pub fn condition(
    old: &[Condition],
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: i64,
    now: Timestamp,
) -> Condition {
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}
