//! Runtimes that hang, crash, are not runtimes, or are missing: every check must end in a
//! clear `Error` within the timeout, and nothing may be left behind. Needs root.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use usernsguard_runtime::discover::RuntimeHandler;
use usernsguard_runtime::selftest;
use usernsguard_runtime::{Check, CheckOutcome, Reason, SelinuxFacts, Verdict};

fn work_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/usernsguard-test-{name}-{}", std::process::id()))
}

#[test]
fn hanging_runtime_times_out_every_check_and_its_children_die() {
    common::require_root();
    let _serial = common::serial();
    let bin = tempfile::tempdir().unwrap();
    let (hang, marker) = common::hanging_runtime(bin.path());
    let direct = [
        Check::UsernsCreated,
        Check::UsernsJoined,
        Check::IdmapMount,
        Check::Features,
    ];
    let mut config = common::config(vec![hang], &direct);
    config.timeout = Duration::from_millis(300);
    config.work_dir = work_dir("hang");
    let started = Instant::now();
    let report = selftest::run(&config).unwrap();
    let elapsed = started.elapsed();
    let h = &report.handlers[0];
    assert_eq!(h.checks.len(), 4);
    for c in &h.checks {
        assert_eq!(
            (c.result, c.reason),
            (CheckOutcome::Error, Some(Reason::Timeout)),
            "{c:?}"
        );
        assert!(c.message.contains("did not finish within 0.3s"), "{}", c.message);
        assert!(c.duration_seconds < 2.0, "{c:?}");
    }
    assert_eq!(h.verdict, Verdict::Unknown);
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    assert_eq!(
        common::leftovers(&config.work_dir, &[&marker]),
        Vec::<String>::new()
    );
}

#[test]
fn a_binary_that_is_not_a_runtime_and_a_missing_binary_are_clear_errors() {
    common::require_root();
    let _serial = common::serial();
    let handlers = vec![
        RuntimeHandler::new("true", "/bin/true"),
        RuntimeHandler::new("gone", "/nonexistent/runc"),
    ];
    let mut config = common::config(handlers, &[]);
    config.work_dir = work_dir("notruntime");
    let report = selftest::run(&config).unwrap();
    let not_runtime = report.handler("true").unwrap();
    for c in &not_runtime.checks {
        assert_eq!((c.result, c.reason), (CheckOutcome::Error, None));
        assert!(
            c.message.contains("/bin/true is not an OCI runtime"),
            "{}",
            c.message
        );
    }
    let missing = report.handler("gone").unwrap();
    for c in &missing.checks {
        assert_eq!(c.result, CheckOutcome::Error);
        assert!(
            c.message.contains("cannot execute /nonexistent/runc"),
            "{}",
            c.message
        );
        assert!(c.message.contains("No such file"), "{}", c.message);
    }
    assert_eq!(missing.verdict, Verdict::Unknown);
    assert_eq!(common::leftovers(&config.work_dir, &[]), Vec::<String>::new());
}

#[test]
fn a_runtime_that_answers_version_but_runs_nothing_is_an_error_not_a_pass() {
    common::require_root();
    let _serial = common::serial();
    let bin = tempfile::tempdir().unwrap();
    let noop = common::fake_runtime(bin.path(), "noop", "crun version 1.0", "exit 0");
    let mut config = common::config(vec![noop], &[Check::UsernsCreated]);
    config.work_dir = work_dir("noop");
    let report = selftest::run(&config).unwrap();
    let c = &report.handlers[0].checks[0];
    assert_eq!(c.result, CheckOutcome::Error);
    assert!(c.message.contains("reported nothing"), "{}", c.message);
}

/// Real runc and crun whose probe container never finishes: the runtime is killed, then
/// `delete --force` removes the container's processes, cgroups and state.
#[test]
fn real_runtimes_with_a_hanging_container_are_cleaned_up() {
    common::require_root();
    let _serial = common::serial();
    let mut config = common::config(
        vec![common::handler("runc"), common::handler("crun")],
        &[Check::UsernsJoined],
    );
    config.payload.args = vec!["--hang".into()];
    config.timeout = Duration::from_secs(2);
    config.work_dir = work_dir("realhang");
    let report = selftest::run(&config).unwrap();
    for h in &report.handlers {
        let c = &h.checks[0];
        assert_eq!(
            (c.result, c.reason),
            (CheckOutcome::Error, Some(Reason::Timeout)),
            "{}: {c:?}",
            h.handler
        );
    }
    let payload = config.payload.host_path.to_string_lossy().into_owned();
    assert_eq!(
        common::leftovers(&config.work_dir, &[&payload]),
        Vec::<String>::new()
    );
}

/// The SELinux-enforcing path end to end, with injected facts: the probe bundle carries the
/// mount label, and the runtime's setxattr failure becomes `mqueue_setxattr`. The fake
/// runtime fails the way runc 1.1.5 does on an enforcing node, and only when the bundle has
/// the mount label and joins a pre-created user namespace.
#[test]
fn enforcing_selinux_sets_the_mount_label_and_setxattr_failure_is_mqueue_setxattr() {
    common::require_root();
    let _serial = common::serial();
    let bin = tempfile::tempdir().unwrap();
    let body = r#"[ "$1" = run ] || exit 0
cfg="$3/config.json"
if grep -q '"mountLabel":"system_u:object_r:container_file_t:s0"' "$cfg" && grep -q '"path":"/proc/[0-9]*/ns/user"' "$cfg"; then
  echo 'runc run failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted' >&2
  exit 1
fi
echo "refusing this bundle: $(grep -o '"mountLabel":"[^"]*"' "$cfg")" >&2
exit 1"#;
    let fake = common::fake_runtime(bin.path(), "runc-selinux", "runc version 1.2.0", body);
    let mut config = common::config(vec![fake], &[Check::UsernsJoined, Check::UsernsCreated]);
    config.selinux = Some(SelinuxFacts::enforcing("system_u:object_r:container_file_t:s0"));
    config.work_dir = work_dir("selinux");
    let report = selftest::run(&config).unwrap();
    assert_eq!(
        report.node.selinux.mode,
        usernsguard_runtime::SelinuxMode::Enforcing
    );
    let h = &report.handlers[0];
    let joined = h.check(Check::UsernsJoined).unwrap();
    assert_eq!(
        (joined.result, joined.reason),
        (CheckOutcome::Fail, Some(Reason::MqueueSetxattr)),
        "{}",
        joined.message
    );
    assert!(joined
        .message
        .contains("setxattr /proc/thread-self/fd/7: operation not permitted"));
    assert!(joined.remediation.as_deref().unwrap().contains("runc to 1.2.1"));
    // The created-userns bundle carries the label too but no namespace path; the fake refuses
    // it with an unrelated message, which must not be mistaken for a user-namespace failure.
    let created = h.check(Check::UsernsCreated).unwrap();
    assert_eq!(created.result, CheckOutcome::Error, "{}", created.message);
    assert!(
        created.message.contains("container_file_t"),
        "the label reaches every probe bundle: {}",
        created.message
    );
    assert_eq!(h.verdict, Verdict::Fail);
}
