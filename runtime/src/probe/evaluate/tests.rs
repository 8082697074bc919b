//! One test per arm of the judging functions, from recorded outcomes.

use super::*;
use crate::probe::payload::MountObservation;

const MAP: IdMapping = IdMapping {
    container_id: 0,
    host_id: 0x7000_0000,
    size: 65536,
};

fn judge(selinux_labels: bool) -> Judge<'static> {
    Judge {
        uid: MAP,
        runtime: "runc 1.2.0",
        selinux_labels,
    }
}

fn mounted(uid: u32, gid: u32) -> MountObservation {
    MountObservation {
        mounted: true,
        uid: Some(uid),
        gid: Some(gid),
        error: None,
    }
}

/// A container that ran as asked: mapping, namespaces, mounts, `/dev/mqueue` owned by 0.
fn good() -> Observation {
    Observation {
        uid: 0,
        uid_map: "         0 1879048192      65536\n".into(),
        gid_map: "         0 1879048192      65536\n".into(),
        namespaces: Some(NamespaceIds { user: 11, net: 22 }),
        proc: mounted(65534, 65534),
        sys: mounted(65534, 65534),
        mqueue: mounted(0, 65534),
        idmaps: vec![],
    }
}

fn observed(obs: Observation, expected_ns: Option<NamespaceIds>) -> Outcome {
    Outcome::Observed {
        observation: Box::new(obs),
        expected_ns,
        written: vec![],
    }
}

fn assert_result(r: &CheckResult, outcome: CheckOutcome, reason: Option<Reason>, needle: &str) {
    assert_eq!((r.result, r.reason), (outcome, reason), "{}", r.message);
    assert!(r.message.contains(needle), "{needle:?} not in {:?}", r.message);
    assert_eq!(r.remediation.is_some(), reason.is_some());
}

// ---------------------------------------------------------------------------------------------
// Outcomes without an observation
// ---------------------------------------------------------------------------------------------

#[test]
fn runtime_failure_with_a_userns_cause_is_a_fail_with_that_reason() {
    let text = r#"runc create failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted"#;
    let out = Outcome::RuntimeFailed {
        status: "exit status: 1".into(),
        text: text.into(),
    };
    let r = evaluate(Check::UsernsJoined, &out, &judge(true));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::MqueueSetxattr),
        "setxattr /proc/thread-self/fd/7",
    );
    assert!(r.message.starts_with("runc 1.2.0 failed: "), "{}", r.message);
}

#[test]
fn runtime_failure_unrelated_to_user_namespaces_is_an_error_not_a_verdict() {
    let out = Outcome::RuntimeFailed {
        status: "exit status: 1".into(),
        text: "exec: \"/probe\": exec format error".into(),
    };
    let r = evaluate(Check::UsernsCreated, &out, &judge(false));
    assert_result(&r, CheckOutcome::Error, None, "unrelated to user namespaces");
    // Our own names in the runtime's text (the payload path, a container id, the work dir)
    // are objects, not statements: still no user-namespace verdict.
    let echoed = Outcome::RuntimeFailed {
        status: "exit status: 1".into(),
        text: "container ug-4242-7-0-1: exec: \"/.usernsguard/probe\": exec format error (bundle /run/usernsguard/run-Ab12/h0/c1/bundle)".into(),
    };
    let r = evaluate(Check::UsernsJoined, &echoed, &judge(false));
    assert_result(&r, CheckOutcome::Error, None, "unrelated to user namespaces");
}

#[test]
fn timeout_is_an_error_with_reason_timeout_and_the_output_if_any() {
    let quiet = Outcome::Timeout {
        timeout: Duration::from_millis(300),
        text: "  ".into(),
    };
    let r = evaluate(Check::UsernsCreated, &quiet, &judge(false));
    assert_result(
        &r,
        CheckOutcome::Error,
        Some(Reason::Timeout),
        "did not finish within 0.3s",
    );
    assert!(
        !r.message.contains(": "),
        "no empty output appended: {}",
        r.message
    );
    let talkative = Outcome::Timeout {
        timeout: Duration::from_secs(1),
        text: "waiting for the console".into(),
    };
    let r = evaluate(Check::UsernsCreated, &talkative, &judge(false));
    assert!(r.message.ends_with(": waiting for the console"), "{}", r.message);
}

#[test]
fn success_without_an_observation_and_setup_failures_are_errors() {
    let out = Outcome::NoObservation {
        stdout: "hello".into(),
        stderr: String::new(),
    };
    let r = evaluate(Check::UsernsCreated, &out, &judge(false));
    assert_result(&r, CheckOutcome::Error, None, "is it an OCI runtime?");
    let r = evaluate(
        Check::UsernsJoined,
        &Outcome::Setup("pre-creating namespaces: EPERM".into()),
        &judge(false),
    );
    assert_result(&r, CheckOutcome::Error, None, "pre-creating namespaces: EPERM");
}

#[test]
fn long_runtime_output_is_cut_on_a_character_boundary() {
    let text = format!("uid_map {}", "é".repeat(3000));
    let out = Outcome::RuntimeFailed {
        status: String::new(),
        text: format!("write /proc/1/uid_map: {text}: operation not permitted"),
    };
    let r = evaluate(Check::UsernsCreated, &out, &judge(false));
    assert!(r.message.ends_with('…'), "{}", &r.message[r.message.len() - 10..]);
    assert!(r.message.len() < 2100);
}

// ---------------------------------------------------------------------------------------------
// Observations
// ---------------------------------------------------------------------------------------------

#[test]
fn everything_as_asked_passes_and_says_so() {
    let r = evaluate(Check::UsernsCreated, &observed(good(), None), &judge(false));
    assert_result(&r, CheckOutcome::Pass, None, "/dev/mqueue owned by 0:65534");
    assert!(!r.message.contains("joined"), "{}", r.message);
    let ns = Some(NamespaceIds { user: 11, net: 22 });
    let r = evaluate(Check::UsernsJoined, &observed(good(), ns), &judge(true));
    assert_result(
        &r,
        CheckOutcome::Pass,
        None,
        "joined the given user and network namespaces",
    );
}

#[test]
fn a_container_outside_the_requested_user_namespace_fails() {
    let mut obs = good();
    obs.uid_map = "0 0 4294967295\n".into();
    let r = evaluate(Check::CriPod, &observed(obs, None), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::UsernsUnsupported),
        "\"0 0 4294967295\"",
    );
}

#[test]
fn a_runtime_that_ignores_the_namespace_paths_fails() {
    let given = Some(NamespaceIds { user: 11, net: 99 });
    let r = evaluate(Check::UsernsJoined, &observed(good(), given), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::UsernsUnsupported),
        "did not join",
    );
    assert!(r.message.contains("net 99"), "{}", r.message);
    let mut unknown = good();
    unknown.namespaces = None;
    let r = evaluate(Check::UsernsJoined, &observed(unknown, given), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::UsernsUnsupported),
        "are unknown",
    );
}

#[test]
fn each_missing_mount_fails_with_its_own_reason() {
    type Pick = fn(&mut Observation) -> &mut MountObservation;
    let cases: [(Pick, Reason, &str); 3] = [
        (
            |o| &mut o.proc,
            Reason::ProcMountEperm,
            "/proc inside the container",
        ),
        (
            |o| &mut o.sys,
            Reason::SysfsMountEperm,
            "/sys inside the container",
        ),
        (
            |o| &mut o.mqueue,
            Reason::OtherUserns,
            "/dev/mqueue inside the container",
        ),
    ];
    for (mount, reason, needle) in cases {
        let mut obs = good();
        mount(&mut obs).mounted = false;
        let r = evaluate(Check::UsernsCreated, &observed(obs.clone(), None), &judge(false));
        assert_result(&r, CheckOutcome::Fail, Some(reason), needle);
        assert!(
            r.message.ends_with(": not procfs") || r.message.contains(": not "),
            "{}",
            r.message
        );
        mount(&mut obs).error = Some("statfs: permission denied".into());
        let r = evaluate(Check::UsernsCreated, &observed(obs, None), &judge(false));
        assert!(r.message.ends_with("statfs: permission denied"), "{}", r.message);
    }
}

#[test]
fn unmapped_mqueue_owner_warns_without_selinux_labels_and_fails_with_them() {
    let mut obs = good();
    obs.mqueue = mounted(65534, 65534);
    let warn = evaluate(Check::UsernsJoined, &observed(obs.clone(), None), &judge(false));
    assert_result(
        &warn,
        CheckOutcome::Warn,
        Some(Reason::MqueueOwnerUnmapped),
        "owned by 65534:65534",
    );
    assert!(warn.message.contains("harmless here"), "{}", warn.message);
    let fail = evaluate(Check::UsernsJoined, &observed(obs, None), &judge(true));
    assert_result(
        &fail,
        CheckOutcome::Fail,
        Some(Reason::MqueueSetxattr),
        "setxattr: operation not permitted",
    );
    // Ownership is the uid: a mapped uid with an unmapped gid passes.
    let mut gid_only = good();
    gid_only.mqueue = mounted(0, 65534);
    assert_eq!(
        evaluate(Check::CriPod, &observed(gid_only, None), &judge(true)).result,
        CheckOutcome::Pass
    );
}

// ---------------------------------------------------------------------------------------------
// idmap-mount
// ---------------------------------------------------------------------------------------------

fn idmap_outcome(inside: u32, write_error: Option<&str>, written: Written) -> Outcome {
    let mut obs = good();
    obs.idmaps = vec![IdmapObservation {
        path: "/mnt/idmap/disk".into(),
        dir: mounted(inside, inside),
        write_error: write_error.map(str::to_owned),
    }];
    Outcome::Observed {
        observation: Box::new(obs),
        expected_ns: None,
        written: vec![written],
    }
}

fn parts(outcomes: Vec<Outcome>) -> Vec<(String, Outcome)> {
    outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| (["/var/lib/kubelet (ext4)", "tmpfs"][i].to_owned(), o))
        .collect()
}

#[test]
fn idmap_passes_only_when_every_place_maps() {
    let ok = || idmap_outcome(0, None, Written::File { host_uid: 0 });
    let r = evaluate_idmap(&parts(vec![ok(), ok()]), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Pass,
        None,
        "/var/lib/kubelet (ext4): the directory",
    );
    assert!(r.message.contains("; tmpfs: the directory"), "{}", r.message);
    let ignored = idmap_outcome(65534, Some("Permission denied (os error 13)"), Written::Nothing);
    let r = evaluate_idmap(&parts(vec![ok(), ignored]), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::IdmapIgnored),
        "tmpfs: the runtime accepted",
    );
    assert!(
        r.message.contains("cannot write there (Permission denied"),
        "{}",
        r.message
    );
}

#[test]
fn a_failing_place_outranks_an_erroring_one_and_no_place_is_an_error() {
    let failed = idmap_outcome(65534, None, Written::Nothing);
    let r = evaluate_idmap(
        &parts(vec![Outcome::Setup("mounting tmpfs: EPERM".into()), failed]),
        &judge(false),
    );
    assert_eq!(r.result, CheckOutcome::Fail, "{}", r.message);
    assert!(r.message.contains("mounting tmpfs: EPERM"), "{}", r.message);
    let r = evaluate_idmap(
        &parts(vec![Outcome::Setup("no kubelet dir".into())]),
        &judge(false),
    );
    assert_result(&r, CheckOutcome::Error, None, "no kubelet dir");
    let r = evaluate_idmap(&[], &judge(false));
    assert_result(&r, CheckOutcome::Error, None, "no directory");
}

#[test]
fn kernel_refusing_the_idmap_is_idmap_unsupported() {
    let refused = Outcome::RuntimeFailed {
        status: "exit status: 1".into(),
        text: "failed to set MOUNT_ATTR_IDMAP on /run/usernsguard/run-x/tmpfs: invalid argument (maybe the source filesystem doesn't support idmap mounts on this kernel?)".into(),
    };
    let r = evaluate_idmap(&parts(vec![refused]), &judge(false));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::IdmapUnsupported),
        "MOUNT_ATTR_IDMAP",
    );
}

#[test]
fn idmap_arms() {
    let judge = judge(false);
    let one = |o| evaluate_idmap(&parts(vec![o]), &judge);
    let r = one(idmap_outcome(0, None, Written::NotAFile));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::OtherUserns),
        "not a regular file",
    );
    let r = one(idmap_outcome(0, None, Written::File { host_uid: 1879048192 }));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::IdmapIgnored),
        "landed as host uid 1879048192",
    );
    let r = one(idmap_outcome(0, Some("Read-only file system"), Written::Nothing));
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::OtherUserns),
        "unexpected idmap result",
    );
    let mut outside = good();
    outside.uid_map = "0 0 4294967295".into();
    let r = one(Outcome::Observed {
        observation: Box::new(outside),
        expected_ns: None,
        written: vec![Written::Nothing],
    });
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::UsernsUnsupported),
        "requested user namespace",
    );
    let r = one(observed(good(), None));
    assert_result(
        &r,
        CheckOutcome::Error,
        None,
        "reported nothing about /var/lib/kubelet",
    );
}

// ---------------------------------------------------------------------------------------------
// features
// ---------------------------------------------------------------------------------------------

fn claims(userns: Option<bool>, idmap: Option<bool>) -> FeaturesAnswer {
    FeaturesAnswer::Claims(ClaimedFeatures {
        available: true,
        user_namespaces: userns,
        idmap_mounts: idmap,
        oci_version_max: None,
    })
}

fn probe(check: Check, outcome: CheckOutcome, reason: Option<Reason>) -> CheckResult {
    CheckResult::new(check, outcome, reason, "")
}

#[test]
fn features_that_cannot_be_read_are_an_error_and_none_at_all_a_skip() {
    let failed = FeaturesAnswer::Failed {
        message: "runc features: permission denied".into(),
        timed_out: false,
    };
    let r = evaluate_features(&failed, &[], "runc 1.4.3");
    assert_result(&r, CheckOutcome::Error, None, "cannot read runc 1.4.3's features");
    let hung = FeaturesAnswer::Failed {
        message: "did not finish".into(),
        timed_out: true,
    };
    assert_eq!(evaluate_features(&hung, &[], "x").reason, Some(Reason::Timeout));
    let none = FeaturesAnswer::Claims(ClaimedFeatures::default());
    let r = evaluate_features(&none, &[], "crun 1.8.1");
    assert_result(&r, CheckOutcome::Skip, None, "no `features` subcommand");
}

#[test]
fn features_without_evidence_are_not_a_pass() {
    let results = [
        probe(Check::UsernsCreated, CheckOutcome::Error, Some(Reason::Timeout)),
        probe(
            Check::IdmapMount,
            CheckOutcome::Fail,
            Some(Reason::IdmapUnsupported),
        ),
    ];
    let r = evaluate_features(&claims(Some(true), Some(true)), &results, "runc 1.2.0");
    assert_result(&r, CheckOutcome::Skip, None, "no probe reached a verdict");
    let r = evaluate_features(&claims(Some(true), Some(true)), &[], "runc 1.2.0");
    assert_eq!(r.result, CheckOutcome::Skip);
}

#[test]
fn claims_confirmed_by_the_probes_pass_warnings_included() {
    let results = [
        probe(
            Check::UsernsCreated,
            CheckOutcome::Warn,
            Some(Reason::MqueueOwnerUnmapped),
        ),
        probe(Check::IdmapMount, CheckOutcome::Fail, Some(Reason::IdmapIgnored)),
    ];
    let r = evaluate_features(&claims(Some(true), Some(false)), &results, "runc 1.1.5");
    assert_result(
        &r,
        CheckOutcome::Pass,
        None,
        "user namespaces: yes, idmap mounts: no",
    );
    assert!(
        r.message.contains("(user namespaces, idmap mounts)"),
        "{}",
        r.message
    );
}

#[test]
fn claims_contradicted_by_the_probes_fail() {
    let idmap_ignored = [probe(
        Check::IdmapMount,
        CheckOutcome::Fail,
        Some(Reason::IdmapIgnored),
    )];
    let r = evaluate_features(&claims(Some(true), Some(true)), &idmap_ignored, "runc x");
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::FeaturesMismatch),
        "idmap mounts are ignored",
    );
    let idmap_works = [probe(Check::IdmapMount, CheckOutcome::Pass, None)];
    let r = evaluate_features(&claims(Some(true), None), &idmap_works, "runc x");
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::FeaturesMismatch),
        "idmap mounts work",
    );
    let no_userns = [probe(
        Check::UsernsCreated,
        CheckOutcome::Fail,
        Some(Reason::UsernsUnsupported),
    )];
    let r = evaluate_features(&claims(Some(true), None), &no_userns, "runc x");
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::FeaturesMismatch),
        "user namespaces do not work",
    );
    let userns_works = [probe(Check::UsernsCreated, CheckOutcome::Pass, None)];
    let r = evaluate_features(&claims(Some(false), None), &userns_works, "runc x");
    assert_result(
        &r,
        CheckOutcome::Fail,
        Some(Reason::FeaturesMismatch),
        "user namespaces work",
    );
}
