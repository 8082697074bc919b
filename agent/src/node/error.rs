//! What can stop one sync of the node agent (self-tests or installs), and the time limit
//! every API call of it runs under: the loop retries with backoff and keeps its results.

use std::time::Duration;

/// Why one sync did not finish.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("API request timed out after {0:?}: {1}")]
    Timeout(Duration, &'static str),
    #[error("self-test runner panicked: {0}")]
    Runner(String),
    #[error("runtime installer panicked: {0}")]
    Installer(String),
}

impl AgentError {
    /// Bounded label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Kube(_) => "kube",
            AgentError::Timeout(..) => "timeout",
            AgentError::Runner(_) => "runner",
            AgentError::Installer(_) => "installer",
        }
    }
}

/// Runs one API call under `limit`: a hung connection must not stall the loop.
pub async fn bounded<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(AgentError::Timeout(limit, what)),
    }
}
