//! The `usernsguard` binary's library: everything but argument parsing. Dependencies point
//! one way: `cmd` (one module per subcommand) -> `node` and `controller` (the reconcilers)
//! -> `crd`, `metrics`, `http`, `health`, `telemetry`, `payload` -> the `usernsguard-runtime`
//! crate. `testing` (the fake API server, builders and fakes) is compiled for tests and, behind
//! the `testing` feature, for benchmarks.

pub mod cmd;
pub mod controller;
pub mod crd;
pub mod health;
pub mod http;
pub mod metrics;
pub mod node;
pub mod payload;
pub mod telemetry;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
