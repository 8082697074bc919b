//! Test support shared by the unit tests, the integration tests and the benchmarks: the one
//! fake API server (ordered scenarios in [`api_server`], per-resource watch scripts in
//! [`scripted`]), object builders, and a fake self-test engine. Compiled for tests and,
//! behind the `testing` feature, for benchmarks; never part of the shipped binary.

pub mod api_server;
pub mod builders;
pub mod installer;
pub mod runner;
pub mod scripted;

pub use api_server::{
    finish, http_status, json_response, mock_client, query_param, serve_agent_api, unreachable_client,
    AgentApi, ApiServerVerifier, RequestLog, Seen,
};
pub use builders::*;
pub use installer::FakeInstaller;
pub use runner::FakeRunner;
pub use scripted::{
    added, deleted, gone, modified, runtime_classes, selectable_fields, FieldSelector, Reply, Script,
    ScriptedApiServer, Watched,
};

/// A `/proc/self/status` field in KiB (`"VmRSS:"`, `"VmHWM:"`), what the memory
/// benchmarks report; 0 when the field is missing.
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
