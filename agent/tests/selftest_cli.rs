//! `usernsguard selftest` as an operator runs it: the real binary (which is also the probe
//! payload), real runc and crun, JSON and table output, and the exit-code contract.
//! Needs root for the probing cases.

use std::process::{Command, Output};

fn usernsguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usernsguard"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn require_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test runs real containers with user namespaces and needs root, as CI has"
    );
}

#[test]
fn json_report_has_camel_case_fields_and_exit_1_when_runc_fails() {
    require_root();
    let out = usernsguard(&[
        "selftest",
        "--output",
        "json",
        "--work-dir",
        "/run/usernsguard-cli-json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "runc 1.1.5 fails, so exit 1; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert!(doc["startedAt"].is_string());
    assert!(doc["node"]["selinux"]["mode"].is_string());
    let handlers = doc["handlers"].as_array().unwrap();
    let runc = handlers
        .iter()
        .find(|h| h["handler"] == "runc")
        .expect("runc found on PATH");
    let crun = handlers
        .iter()
        .find(|h| h["handler"] == "crun")
        .expect("crun found on PATH");
    assert_eq!(runc["verdict"], "fail");
    assert_eq!(crun["verdict"], "pass");
    let joined = runc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "userns-joined")
        .unwrap();
    assert_eq!(joined["reason"], "mqueue_owner_unmapped");
    assert!(joined["durationSeconds"].as_f64().unwrap() > 0.0);
    assert!(joined["remediation"].as_str().unwrap().contains("crun"));
}

#[test]
fn table_and_exit_0_when_every_selected_handler_passes() {
    require_root();
    let out = usernsguard(&[
        "selftest",
        "--runtime",
        "crun=/usr/bin/crun",
        "--work-dir",
        "/run/usernsguard-cli-table",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("node: kernel "), "{text}");
    for check in ["userns-created", "userns-joined", "idmap-mount", "features"] {
        assert!(
            text.lines().any(|l| l.starts_with("crun") && l.contains(check)),
            "{check} row missing:\n{text}"
        );
    }
    assert!(text.contains("crun: PASS"), "{text}");
}

#[test]
fn bad_usage_exits_2_naming_the_bad_input() {
    for (args, needle) in [
        (vec!["selftest", "--runtime", "crun"], "NAME=PATH"),
        (vec!["selftest", "--check", "userns"], "unknown check \"userns\""),
        (vec!["selftest", "--timeout", "ten"], "invalid duration \"ten\""),
        (vec!["selftest", "--output", "xml"], "xml"),
    ] {
        let out = usernsguard(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn not_root_exits_2_with_a_one_line_reason() {
    require_root();
    // Drop to nobody for this one run; the binary must be reachable by it.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_usernsguard"),
            "selftest",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn missing_runtime_binary_is_reported_not_crashed() {
    require_root();
    let out = usernsguard(&[
        "selftest",
        "--runtime",
        "gone=/nonexistent/runc",
        "--output",
        "json",
        "--work-dir",
        "/run/usernsguard-cli-gone",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let h = &doc["handlers"][0];
    assert_eq!(h["verdict"], "unknown");
    assert!(h["checks"][0]["message"]
        .as_str()
        .unwrap()
        .contains("cannot execute /nonexistent/runc"));
}
