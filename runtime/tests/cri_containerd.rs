//! The verdicts against real CRI runtimes: a private containerd 2.1 and 1.6 (tests/containerd)
//! with every runtime this machine has, probed exactly as the agent does — handlers read
//! from the containerd config, the direct checks through each handler's binary, and the
//! CRI checks over the socket with a probe image imported into containerd. Needs root.
//!
//! What DESIGN.md and issue 10 expect here (SELinux off): under containerd 2.1, runc 1.2.0
//! passes with the mqueue warning, runc 1.2.1/1.3.6/1.4.3 pass every check, crun 1.8.1
//! fails cri-advertised and cri-pod, Debian's runc 1.1.5 fails cri-advertised and
//! idmap-mount; under containerd 1.6 no handler is advertised and every verdict says why.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::containerd::{self, Containerd, Version};
use usernsguard_runtime::cri::checks::{self as cri_checks, PROBE_LABEL};
use usernsguard_runtime::cri::client::CriClient;
use usernsguard_runtime::cri_config;
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::selftest::{self, CriSetup, SelfTestConfig};
use usernsguard_runtime::{Check, CheckOutcome, HandlerReport, Reason, SelfTestReport, Verdict};

const IMAGE: &str = "localhost/usernsguard-probe:test";
const IN_IMAGE: &str = "/usr/local/bin/usernsguard-probe";

fn image() -> PathBuf {
    containerd::probe_image(
        std::path::Path::new(env!("CARGO_BIN_EXE_usernsguard-probe")),
        IMAGE,
        IN_IMAGE,
    )
}

/// The self-test as the agent runs it against `cd`: handlers from its config file.
fn selftest_against(cd: &Containerd, work: &str) -> SelfTestReport {
    let host = HostRoot::own();
    let config = cri_config::read_file(&host, &cd.config).unwrap();
    let mut st = SelfTestConfig::new(config.resolve(&host), common::payload());
    st.timeout = Duration::from_secs(30);
    st.work_dir = PathBuf::from(work);
    st.cri = Some(CriSetup {
        socket: cd.socket.clone(),
        config: Some(config),
        probe_image: Some(IMAGE.into()),
        image_command: vec![IN_IMAGE.into()],
    });
    selftest::run(&st).expect("self-test runs")
}

fn check(h: &HandlerReport, check: Check) -> &usernsguard_runtime::CheckResult {
    h.check(check)
        .unwrap_or_else(|| panic!("{} has no {check}: {h:#?}", h.handler))
}

#[track_caller]
fn expect(h: &HandlerReport, c: Check, outcome: CheckOutcome, reason: Option<Reason>) {
    let r = check(h, c);
    assert_eq!(
        (r.result, r.reason),
        (outcome, reason),
        "{} {c}: {}",
        h.handler,
        r.message
    );
}

fn probe_pods(cd: &Containerd) -> usize {
    let mut client = CriClient::connect(&cd.socket, Duration::from_secs(10)).unwrap();
    client
        .list_pods(HashMap::from([(PROBE_LABEL.to_owned(), "true".to_owned())]))
        .unwrap()
        .len()
}

#[test]
fn containerd_2_1_verdicts_per_handler() {
    common::require_root();
    let _serial = common::serial();
    let cd = Containerd::start(
        &format!("ut21-{}", std::process::id() % 100_000),
        Version::V21,
        &containerd::all_handlers(),
        false,
        &[image()],
    );
    let report = selftest_against(&cd, "/run/usernsguard-test-cri21");
    let cri = report.cri.as_ref().expect("the CRI runtime answered");
    assert_eq!(cri.runtime, "containerd");
    assert!(cri.version.starts_with("2.1"), "{cri:?}");
    assert!(!cri.selinux_labels);
    let h = |name: &str| {
        report
            .handler(name)
            .unwrap_or_else(|| panic!("no {name}: {report:#?}"))
    };

    // The release of runc issue 4466: pods start here (no SELinux labels), with a warning.
    let r120 = h("runc-1-2-0");
    expect(
        r120,
        Check::UsernsJoined,
        CheckOutcome::Warn,
        Some(Reason::MqueueOwnerUnmapped),
    );
    expect(r120, Check::CriAdvertised, CheckOutcome::Pass, None);
    expect(
        r120,
        Check::CriPod,
        CheckOutcome::Warn,
        Some(Reason::MqueueOwnerUnmapped),
    );
    assert!(check(r120, Check::CriPod).message.contains("owned by 65534"));
    assert_eq!(r120.verdict, Verdict::Pass, "a warning still passes");

    for name in ["runc-1-2-1", "runc-1-3-6", "runc-1-4-3"] {
        let r = h(name);
        for c in &r.checks {
            assert_eq!(c.result, CheckOutcome::Pass, "{name} {}: {}", c.check, c.message);
        }
        assert_eq!(r.checks.len(), Check::ALL.len());
        assert!(check(r, Check::CriPod)
            .message
            .contains("/dev/mqueue owned by 0:"));
        assert_eq!(r.verdict, Verdict::Pass);
    }

    // crun 1.8.1 has no `features`: not advertised, and containerd 2.1's spec version is
    // too new for it, so no pod starts.
    let crun = h("crun");
    expect(
        crun,
        Check::CriAdvertised,
        CheckOutcome::Fail,
        Some(Reason::UsernsNotAdvertised),
    );
    expect(
        crun,
        Check::CriPod,
        CheckOutcome::Fail,
        Some(Reason::PodStartFailed),
    );
    assert!(
        check(crun, Check::CriPod)
            .message
            .contains("unknown version specified"),
        "{}",
        check(crun, Check::CriPod).message
    );
    expect(crun, Check::UsernsJoined, CheckOutcome::Pass, None);
    assert_eq!(crun.verdict, Verdict::Fail);

    // Debian's runc 1.1.5: features without idmap, and idmap mounts ignored.
    let runc = h("runc");
    expect(
        runc,
        Check::CriAdvertised,
        CheckOutcome::Fail,
        Some(Reason::UsernsNotAdvertised),
    );
    expect(
        runc,
        Check::IdmapMount,
        CheckOutcome::Fail,
        Some(Reason::IdmapIgnored),
    );
    expect(
        runc,
        Check::CriPod,
        CheckOutcome::Fail,
        Some(Reason::IdmapUnsupported),
    );
    assert_eq!(runc.verdict, Verdict::Fail);

    assert_eq!(probe_pods(&cd), 0, "every probe pod was removed");
}

#[test]
fn containerd_1_6_advertises_no_handler_and_every_verdict_says_why() {
    common::require_root();
    let _serial = common::serial();
    let handlers: Vec<_> = containerd::all_handlers()
        .into_iter()
        .filter(|(n, _)| n == "runc" || n == "runc-1-4-3")
        .collect();
    let cd = Containerd::start(
        &format!("ut16-{}", std::process::id() % 100_000),
        Version::V16,
        &handlers,
        false,
        &[image()],
    );
    let report = selftest_against(&cd, "/run/usernsguard-test-cri16");
    assert!(report.cri.as_ref().unwrap().version.starts_with("1.6"));
    assert_eq!(report.handlers.len(), 2);
    for h in &report.handlers {
        expect(
            h,
            Check::CriAdvertised,
            CheckOutcome::Fail,
            Some(Reason::UsernsNotAdvertised),
        );
        assert!(
            check(h, Check::CriAdvertised)
                .message
                .contains("predates per-handler features"),
            "{}",
            check(h, Check::CriAdvertised).message
        );
        // containerd 1.6 ignores the pod's user namespace request and runs it as the host.
        expect(
            h,
            Check::CriPod,
            CheckOutcome::Fail,
            Some(Reason::UsernsUnsupported),
        );
        assert!(
            check(h, Check::CriPod).message.contains("4294967295"),
            "{}",
            check(h, Check::CriPod).message
        );
        assert_eq!(h.verdict, Verdict::Fail, "{}", h.handler);
    }
    let runc143 = report.handler("runc-1-4-3").unwrap();
    expect(runc143, Check::UsernsJoined, CheckOutcome::Pass, None);
    assert_eq!(probe_pods(&cd), 0);
}

/// A probe pod an earlier run left (the agent was killed mid-probe) is found by its label
/// and removed; younger ones, which may be another run's, are left alone.
#[test]
fn leftover_probe_pods_are_removed_by_label() {
    common::require_root();
    let _serial = common::serial();
    let runc = containerd::all_handlers()
        .into_iter()
        .filter(|(n, _)| n == "runc-1-4-3")
        .collect::<Vec<_>>();
    let cd = Containerd::start(
        &format!("ut21l-{}", std::process::id() % 100_000),
        Version::V21,
        &runc,
        false,
        &[],
    );
    let mut client = CriClient::connect(&cd.socket, Duration::from_secs(20)).unwrap();
    let sandbox = k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: "left".into(),
            uid: format!("left-{}", std::process::id()),
            namespace: cri_checks::PROBE_NAMESPACE.into(),
            attempt: 0,
        }),
        labels: HashMap::from([(PROBE_LABEL.to_owned(), "true".to_owned())]),
        ..Default::default()
    };
    client.run_pod_sandbox(&sandbox, "runc-1-4-3").unwrap();
    assert_eq!(probe_pods(&cd), 1);
    assert_eq!(
        cri_checks::remove_leftovers(&mut client, Duration::from_secs(3600)).unwrap(),
        0,
        "a young pod may be a run in progress"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        cri_checks::remove_leftovers(&mut client, Duration::from_secs(1)).unwrap(),
        1
    );
    assert_eq!(probe_pods(&cd), 0);
}
