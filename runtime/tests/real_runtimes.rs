//! Self-test against the real runc and crun installed on this machine (Debian 12: runc
//! 1.1.5, crun 1.8.1). Needs root: probes create user namespaces and run containers.
//!
//! These assert what DESIGN.md says these exact versions do: runc 1.1.5 joins a
//! pre-created user namespace without becoming root in it first, so `/dev/mqueue` shows the
//! overflow uid; it also accepts and ignores idmapped mounts. crun 1.8.1 gets both right.

mod common;

use usernsguard_runtime::{Check, CheckOutcome, HandlerReport, Reason, Verdict};

fn result(h: &HandlerReport, check: Check) -> (CheckOutcome, Option<Reason>, String) {
    let r = h
        .check(check)
        .unwrap_or_else(|| panic!("{} has no {check} result: {h:#?}", h.handler));
    (r.result, r.reason, r.message.clone())
}

#[test]
fn runc_1_1_fails_joined_userns_and_ignores_idmap_while_crun_passes() {
    common::require_root();
    let report = common::selftest(&["runc", "crun"], &[]);
    let runc = report.handler("runc").expect("runc handler");
    let crun = report.handler("crun").expect("crun handler");
    assert_eq!(runc.runtime, "runc");
    assert!(
        runc.version.starts_with("1.1."),
        "expected Debian's runc 1.1.x, got {}",
        runc.version
    );
    assert_eq!(crun.runtime, "crun");

    let (res, reason, msg) = result(runc, Check::UsernsCreated);
    assert_eq!((res, reason), (CheckOutcome::Pass, None), "{msg}");
    assert!(
        msg.contains("owned by 0:"),
        "runc makes mqueue root-owned when it creates the userns: {msg}"
    );

    // No SELinux labels here: the latent defect is a warning, not a broken pod.
    let (res, reason, msg) = result(runc, Check::UsernsJoined);
    assert_eq!(
        (res, reason),
        (CheckOutcome::Warn, Some(Reason::MqueueOwnerUnmapped)),
        "{msg}"
    );
    assert!(msg.contains("owned by 65534"), "{msg}");

    // Both places pods' volumes live: the work dir's disk filesystem and a tmpfs.
    let (res, reason, msg) = result(runc, Check::IdmapMount);
    assert_eq!(
        (res, reason),
        (CheckOutcome::Fail, Some(Reason::IdmapIgnored)),
        "{msg}"
    );
    assert!(
        msg.contains("(ext4): the runtime accepted") && msg.contains("; tmpfs: the runtime accepted"),
        "{msg}"
    );

    let (res, _, msg) = result(runc, Check::Features);
    assert_eq!(res, CheckOutcome::Pass, "{msg}");
    assert!(msg.contains("user namespaces: yes, idmap mounts: no"), "{msg}");
    assert_eq!(runc.features.user_namespaces, Some(true));
    assert_eq!(runc.verdict, Verdict::Fail);

    for check in [Check::UsernsCreated, Check::UsernsJoined, Check::IdmapMount] {
        let (res, reason, msg) = result(crun, check);
        assert_eq!((res, reason), (CheckOutcome::Pass, None), "crun {check}: {msg}");
    }
    let joined = result(crun, Check::UsernsJoined).2;
    assert!(joined.contains("owned by 0:0"), "{joined}");
    assert!(
        joined.contains("joined the given user and network namespaces"),
        "{joined}"
    );
    let idmap = result(crun, Check::IdmapMount).2;
    assert!(
        idmap.contains("tmpfs: the directory (host uid 0) shows uid 0"),
        "{idmap}"
    );
    for check in [Check::CriAdvertised, Check::CriPod] {
        let (res, _, msg) = result(crun, check);
        assert_eq!(res, CheckOutcome::Skip, "no CRI runtime given: {msg}");
    }
    let (res, _, msg) = result(crun, Check::Features);
    assert_eq!(
        res,
        CheckOutcome::Skip,
        "crun 1.8.1 has no features subcommand: {msg}"
    );
    assert!(!crun.features.available);
    assert_eq!(crun.verdict, Verdict::Pass);
    assert!(!report.all_pass());
}

#[test]
fn check_selection_runs_only_the_selected_checks() {
    common::require_root();
    let report = common::selftest(&["crun"], &[Check::UsernsJoined]);
    let crun = report.handler("crun").unwrap();
    assert_eq!(crun.checks.len(), 1);
    assert_eq!(crun.checks[0].check, Check::UsernsJoined);
    assert_eq!(crun.checks[0].result, CheckOutcome::Pass);
    assert!(crun.checks[0].duration_seconds > 0.0);
    assert_eq!(crun.verdict, Verdict::Pass);
    assert!(report.all_pass());
}

#[test]
fn node_facts_describe_this_machine() {
    common::require_root();
    let report = common::selftest(&["crun"], &[Check::Features]);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(report.node.kernel, kernel.trim());
    // This machine's kernel has SELinux compiled in but it cannot be enabled.
    assert_eq!(
        report.node.selinux.mode,
        usernsguard_runtime::SelinuxMode::Disabled
    );
    assert!(report.node.max_user_namespaces.unwrap_or(0) > 0);
}
