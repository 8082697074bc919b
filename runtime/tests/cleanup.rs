//! Fifty consecutive self-test runs, hangs included, must leave no process, mount,
//! namespace holder, temp dir, runtime state or cgroup behind. Needs root.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use usernsguard_runtime::discover::RuntimeHandler;
use usernsguard_runtime::selftest;
use usernsguard_runtime::{Check, CheckOutcome, Reason};

const RUNS: usize = 50;

#[test]
fn fifty_runs_with_hangs_leave_nothing_behind() {
    common::require_root();
    let _serial = common::serial();
    let bin = tempfile::tempdir().unwrap();
    let marker = format!("1000.{}", std::process::id());
    let hang = common::fake_runtime(
        bin.path(),
        "hang",
        "runc version 9.9.9",
        &format!("sleep {marker} & sleep {marker}"),
    );
    let work_dir = PathBuf::from(format!("/run/usernsguard-test-cleanup-{}", std::process::id()));
    let (runc, crun) = (common::handler("runc"), common::handler("crun"));
    let payload_path = common::payload().host_path.to_string_lossy().into_owned();
    let mut timeouts = 0;
    let mut passes = 0;
    for i in 0..RUNS {
        let mut handlers = vec![
            runc.clone(),
            crun.clone(),
            RuntimeHandler::new("notruntime", "/bin/true"),
        ];
        let mut config = common::config(vec![], &[]);
        match i % 10 {
            // A runtime that hangs in every subcommand, with a grandchild holding its pipes.
            3 => {
                handlers = vec![hang.clone()];
                config.timeout = Duration::from_millis(400);
            }
            // Real runtimes whose container hangs: killed, then deleted with --force.
            7 => {
                config.payload.args = vec!["--hang".into()];
                config.checks = vec![Check::UsernsJoined];
                config.timeout = Duration::from_millis(1500);
                handlers.truncate(2);
            }
            _ => {}
        }
        config.handlers = handlers;
        config.work_dir = work_dir.clone();
        let report = selftest::run(&config).expect("self-test runs");
        for c in report.handlers.iter().flat_map(|h| &h.checks) {
            timeouts += usize::from(c.reason == Some(Reason::Timeout));
            passes += usize::from(c.result == CheckOutcome::Pass);
        }
        let left = common::leftovers(&work_dir, &[&marker, &payload_path]);
        assert_eq!(left, Vec::<String>::new(), "after run {i}");
    }
    // 5 hang runs x 4 checks + 5 hanging-container runs x 2 handlers.
    assert_eq!(timeouts, 5 * 4 + 5 * 2, "every hang must end in a timeout result");
    assert!(
        passes >= 40 * 4,
        "the real runtimes ran their probes ({passes} passes)"
    );
    std::fs::remove_dir(&work_dir).unwrap();
}
