//! Shared setup for the integration tests that run real runtimes.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use usernsguard_runtime::bundle::Payload;
use usernsguard_runtime::discover::{find_on_path, RuntimeHandler};
use usernsguard_runtime::selftest::{self, SelfTestConfig};
use usernsguard_runtime::{Check, SelfTestReport};

/// These tests run containers; without root they would prove nothing, so they fail loudly.
pub fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(euid, 0, "this integration test needs root (it runs real containers with user namespaces); run it as root, as CI does");
}

pub fn payload() -> Payload {
    Payload {
        host_path: PathBuf::from(env!("CARGO_BIN_EXE_usernsguard-probe")),
        args: vec![],
    }
}

pub fn handler(name: &str) -> RuntimeHandler {
    let path = std::env::var_os("PATH");
    let binary = find_on_path(name, path.as_deref()).unwrap_or_else(|| {
        panic!("{name} is not installed: apt-get install {name} (the README's test command does)")
    });
    RuntimeHandler::new(name, binary)
}

pub fn config(handlers: Vec<RuntimeHandler>, checks: &[Check]) -> SelfTestConfig {
    let mut c = SelfTestConfig::new(handlers, payload());
    c.checks = checks.to_vec();
    c.timeout = Duration::from_secs(20);
    c.work_dir = PathBuf::from("/run/usernsguard-test");
    c
}

pub fn selftest(names: &[&str], checks: &[Check]) -> SelfTestReport {
    let handlers = names.iter().map(|n| handler(n)).collect();
    selftest::run(&config(handlers, checks)).expect("self-test runs")
}
