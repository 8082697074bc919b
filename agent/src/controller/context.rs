//! What the controller's reconcilers share: the API client, the NodeReport store, the error
//! type and the retry policy.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
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
