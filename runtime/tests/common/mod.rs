//! Shared setup for the integration tests that run real runtimes.

#![allow(dead_code)]

pub mod containerd;

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

/// A fake runtime: a shell script whose `--version` says `version_line` and whose other
/// subcommands run `body` (with the subcommand in `$1`).
pub fn fake_runtime(dir: &std::path::Path, name: &str, version_line: &str, body: &str) -> RuntimeHandler {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\nwhile [ \"${{1#--}}\" != \"$1\" ]; do\n  case \"$1\" in --version) echo '{version_line}'; exit 0;; --root) shift;; esac\n  shift\ndone\n{body}\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    RuntimeHandler::new(name, path)
}

/// Everything a self-test could leave behind, described; empty when clean.
pub fn leftovers(work_dir: &std::path::Path, markers: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .unwrap_or("");
        if ppid == me.to_string() {
            found.push(format!("child process {pid}: {cmdline}"));
        } else if markers.iter().any(|m| cmdline.contains(m))
            || cmdline.contains(&*work_dir.to_string_lossy())
        {
            found.push(format!("process {pid}: {cmdline}"));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo
        .lines()
        .filter(|l| l.contains(&*work_dir.to_string_lossy()))
    {
        found.push(format!("mount: {line}"));
    }
    if let Ok(entries) = std::fs::read_dir(work_dir) {
        for e in entries.flatten() {
            found.push(format!("temp dir entry: {}", e.path().display()));
        }
    }
    for state in ["/run/runc", "/run/crun"] {
        for e in std::fs::read_dir(state).into_iter().flatten().flatten() {
            if is_probe_id(&e.file_name().to_string_lossy()) {
                found.push(format!("runtime state: {}", e.path().display()));
            }
        }
    }
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for e in std::fs::read_dir(controller.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if is_probe_id(&e.file_name().to_string_lossy()) {
                found.push(format!("cgroup: {}", e.path().display()));
            }
        }
    }
    found
}

/// A probe container id of this process (`ug-<pid>-...`), or one of an older naming.
fn is_probe_id(name: &str) -> bool {
    name.starts_with(&format!("ug-{}-", std::process::id())) || name.starts_with("usernsguard-")
}

/// Serialises the tests of one binary: leftover checks look at every child process and
/// cgroup, which a concurrently running test would legitimately own.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fake runtime that answers `--version` and hangs in every other subcommand, with a
/// grandchild that keeps its pipes open. Returns it and the marker in its processes'
/// command lines, for leftover checks.
pub fn hanging_runtime(dir: &std::path::Path) -> (RuntimeHandler, String) {
    // A sleep duration unique to this process marks the processes to look for.
    let marker = format!("1000.{}", std::process::id());
    let body = format!("sleep {marker} & sleep {marker}");
    (fake_runtime(dir, "hang", "runc version 9.9.9", &body), marker)
}
