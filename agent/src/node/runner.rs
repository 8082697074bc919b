//! The seam between the node reconciler and the self-test engine: what one run is asked to
//! do, and the trait the reconciler calls. [`super::engine::EngineRunner`] implements it with
//! real probes; tests use `crate::testing::FakeRunner`, so the reconciler's API traffic is
//! tested without running containers.

use std::time::Duration;

use usernsguard_runtime::report::{Check, SelfTestReport};

/// What one self-test run is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    /// Runtime handlers to probe; empty: every handler the node's CRI runtime registers.
    pub handlers: Vec<String>,
    /// Checks to run; empty: all of them.
    pub checks: Vec<Check>,
    /// Per-probe time limit.
    pub timeout: Duration,
}

/// The self-test engine as the agent sees it. Implementations block (they run probe
/// containers); the agent calls them through `spawn_blocking`.
pub trait SelfTestRunner: Send + Sync + 'static {
    fn run(&self, req: &RunRequest) -> SelfTestReport;
}
