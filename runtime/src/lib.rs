//! Everything usernsguard does on a node without talking to Kubernetes: discovering OCI
//! runtimes, running user-namespace probe containers through them, the self-test matrix
//! and its verdicts, node facts, classifying pod failure messages, and (in [`install`],
//! apart from all of that) installing runtimes and restarting the CRI runtime.
//!
//! The crate has no kube dependency so that `usernsguard selftest` on a plain containerd
//! host and the in-cluster agent run exactly the same code.

pub mod bundle;
pub mod classify;
pub mod cri;
pub mod cri_config;
pub mod discover;
pub mod facts;
pub mod host;
pub mod install;
pub mod probe;
pub mod process;
pub mod reason;
pub mod report;
pub mod selftest;
pub mod userns;

pub use facts::{NodeFacts, SelinuxFacts, SelinuxMode};
pub use reason::Reason;
pub use report::{Check, CheckOutcome, CheckResult, HandlerReport, SelfTestReport, Verdict};
