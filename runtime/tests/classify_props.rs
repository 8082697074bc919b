//! Property tests for the pod-failure classifier: whatever bytes arrive on a kubelet event
//! or a runtime's stderr (huge, non-UTF-8, adversarially repetitive), `classify` must
//! return one of the reason codes, never a probe-only one, and never panic.

use proptest::prelude::*;
use usernsguard_runtime::classify::{classify, classify_bytes};
use usernsguard_runtime::Reason;

/// Reasons only the probes may give: a message alone cannot prove a timeout or a
/// `features` mismatch.
const PROBE_ONLY: [Reason; 2] = [Reason::Timeout, Reason::FeaturesMismatch];

fn assert_classifier_code(reason: Reason) {
    assert!(
        Reason::ALL.contains(&reason),
        "{reason:?} is not a DESIGN.md reason code"
    );
    assert!(
        !PROBE_ONLY.contains(&reason),
        "classifier returned probe-only {reason}"
    );
}

/// Pieces that hit the phrase table (and its word-boundary and quoting rules) so random
/// concatenations exercise every rule, not just the `unrelated` fall-through.
const FRAGMENTS: &[&str] = &[
    "mqueue",
    "setxattr",
    "operation not permitted",
    "Permission denied",
    "invalid argument",
    "idmap",
    "newuidmap",
    "MOUNT_ATTR_IDMAP",
    "mount_setattr",
    "rro",
    "sysfs",
    "mount",
    "mounting \\\"proc\\\" to rootfs",
    "user namespace",
    "hostUsers",
    "not supported",
    "subuid",
    "avc:  denied",
    "65534",
    "no space left on device",
    "noop process for unshare",
    "is out of range",
    "\"",
    "`",
    "\\",
    " ",
    "\t",
];

fn fragment_soup(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(FRAGMENTS).prop_map(|f| f.as_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 0..8),
        ],
        0..max_len,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #[test]
    fn arbitrary_bytes_give_a_classifier_code(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        assert_classifier_code(classify_bytes(&bytes));
    }

    #[test]
    fn phrase_soup_gives_a_classifier_code(bytes in fragment_soup(200)) {
        assert_classifier_code(classify_bytes(&bytes));
    }

    #[test]
    fn str_and_bytes_entry_points_agree(s in any::<String>()) {
        prop_assert_eq!(classify(&s), classify_bytes(s.as_bytes()));
    }

    #[test]
    fn ascii_case_never_changes_the_verdict(bytes in fragment_soup(60)) {
        let upper = bytes.to_ascii_uppercase();
        let lower = bytes.to_ascii_lowercase();
        prop_assert_eq!(classify_bytes(&upper), classify_bytes(&lower));
    }
}

proptest! {
    // Each case builds a multi-megabyte line: few cases keep the suite quick in debug builds.
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn multi_megabyte_non_utf8_lines_give_a_classifier_code(
        chunk in fragment_soup(40),
        filler in prop::collection::vec(any::<u8>(), 1..64),
        megabytes in 1usize..4,
    ) {
        let target = megabytes << 20;
        let mut line = Vec::with_capacity(target + chunk.len() + filler.len());
        while line.len() < target {
            line.extend_from_slice(&filler);
            line.extend_from_slice(&chunk);
        }
        prop_assert!(line.len() >= 1 << 20);
        assert_classifier_code(classify_bytes(&line));
    }
}

/// A real runc message at the very end of a multi-megabyte line of invalid UTF-8 is still
/// found: the classifier must not truncate or give up on long input.
#[test]
fn verdict_at_the_end_of_a_huge_invalid_utf8_line() {
    let mut line = vec![0xff_u8; 3 << 20];
    line.extend_from_slice(
        br#"error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted"#,
    );
    assert_eq!(classify_bytes(&line), Reason::MqueueSetxattr);
}

/// The densest possible input for the automaton: every position starts a match. Bare
/// words are not operations, so a line of them is `unrelated` (the `idmap ` line used to
/// be `idmap_unsupported`, decided by the word alone), however long; a real operation
/// after them is still found.
#[test]
fn megabytes_of_back_to_back_phrases() {
    let line = "mqueue".repeat(1 << 20);
    assert_eq!(classify(&line), Reason::Unrelated);
    let line = "idmap ".repeat(1 << 19);
    assert_eq!(classify(&line), Reason::Unrelated);
    let line = "/proc/1/uid_map".repeat(1 << 17);
    assert_eq!(classify(&line), Reason::OtherUserns);
    let mut line = "userns-".repeat(1 << 19);
    line.push_str(" failed to set MOUNT_ATTR_IDMAP on /x: invalid argument");
    assert_eq!(classify(&line), Reason::IdmapUnsupported);
}

/// User-namespace vocabulary that must never decide when it is only part of a name, an
/// id, an image reference or a path.
const VOCABULARY: &[&str] = &[
    "userns",
    "idmap",
    "idmapped",
    "uid_map",
    "gid_map",
    "subuid",
    "subgid",
    "usernamespace",
    "user_namespace",
    "hostusers",
    "hostUsers",
    "mqueue",
    "newuidmap",
    "newgidmap",
    "setgroups",
    "clone_newuser",
    "usernsguard",
    "sysfs",
    "userns-created",
    "idmap-mount",
    "MOUNT_ATTR_IDMAP",
    "mount_setattr",
];

fn vocab_word() -> impl Strategy<Value = String> {
    (prop::sample::select(VOCABULARY), any::<bool>()).prop_map(|(w, upper)| {
        if upper {
            w.to_ascii_uppercase()
        } else {
            w.to_owned()
        }
    })
}

/// A name, id or path segment built around a vocabulary word, the way pods, images,
/// containers and directories get named.
fn object_with_word() -> impl Strategy<Value = String> {
    (
        vocab_word(),
        "[a-z0-9]{0,6}",
        prop::sample::select(&["", "-", "_", "."][..]),
        "[a-z0-9]{1,8}",
        any::<bool>(),
    )
        .prop_map(|(word, pre, sep, id, before)| match (sep, before) {
            ("", _) => word,
            (sep, true) => format!("{pre}{sep}{word}"),
            (sep, false) => format!("{word}{sep}{id}"),
        })
}

/// Real-world shapes of unrelated failures (image pulls, CNI, missing files) with a
/// vocabulary word in every object position.
fn message_naming_objects() -> impl Strategy<Value = String> {
    (
        0usize..9,
        "[a-z][a-z0-9.-]{0,15}",
        vocab_word(),
        object_with_word(),
        object_with_word(),
        "[0-9a-f]{5,12}",
        "[0-9a-f]{64}",
    )
        .prop_map(|(shape, registry, word, obj1, obj2, id, hex)| match shape {
            0 => format!(
                r#"Failed to pull image "{registry}/{word}": rpc error: code = NotFound desc = failed to pull and unpack image "{registry}/{word}:latest": failed to resolve reference "{registry}/{obj1}:latest": not found"#
            ),
            1 => format!(r#"Back-off pulling image "{registry}/{obj1}:{id}""#),
            2 => format!(
                r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox "{hex}": plugin type="calico" failed (add): error adding host side routes for interface: cali{id}, error: route (Ifindex: 17, Dst: 10.1.2.3/32, Scope: link) already exists for an interface other than 'cali{id}': route (Ifindex: 9, Dst: 10.1.2.3/32, Scope: link) for pod "{obj1}-{id}""#
            ),
            3 => format!(
                r#"NetworkPlugin cni failed to set up pod "{obj1}-{id}_default" network: open /run/flannel/subnet.env: no such file or directory"#
            ),
            4 => format!("open /var/lib/{obj1}/{obj2}: no such file or directory"),
            5 => format!("stat /var/lib/{word}/{word}: permission denied"),
            6 => format!(
                r#"Error: failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: "/{obj1}": stat /{obj1}: no such file or directory: unknown"#
            ),
            7 => format!(r#"MountVolume.SetUp failed for volume "{obj1}" : configmap "{word}" not found"#),
            _ => format!(
                r#"Error: container "{word}" in pod "{obj1}" is waiting to start: image can't be pulled; rpc error: code = Unknown desc = failed to create containerd container: error unpacking image: failed to extract layer sha256:{hex}: write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{id}/fs/{obj2}: no space left on device"#
            ),
        })
}

proptest! {
    /// No name, id, image reference or path alone makes a message a user-namespace
    /// failure: only what failed does.
    #[test]
    fn names_ids_and_paths_alone_are_never_a_userns_failure(msg in message_naming_objects()) {
        prop_assert_eq!(classify(&msg), Reason::Unrelated, "{}", msg);
    }
}

/// The probes name their containers and bundles after the check (`usernsguard-<pid>-<n>-
/// <check>`, `/run/usernsguard/<run>/<handler>/<check>/bundle`), so every probe failure
/// carries `userns` or `idmap` in an object. Those never decide; what failed does.
#[test]
fn probe_ids_and_bundle_paths_do_not_decide() {
    const ID: &str = "usernsguard-4242-7-0-userns-created";
    const BUNDLE: &str = "/run/usernsguard/run-Ab12/h0/idmap-mount/bundle";
    let unrelated = [
        format!("runc run failed: container with id exists: {ID}"),
        format!("open {BUNDLE}/config.json: no such file or directory"),
        format!(r#"runc create failed: unable to start container process: exec: "/usernsguard-probe": stat {BUNDLE}/rootfs/usernsguard-probe: permission denied"#),
        format!(r#"crun: cannot find container `{ID}`: No such file or directory"#),
        format!("{ID}: OCI runtime create failed: unknown version specified"),
        r#"Failed to pull image "registry.example/team/userns-demo:1.0": rpc error: code = NotFound desc = failed to pull and unpack image: not found"#.to_owned(),
        r#"Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox "0123abcd": plugin type="bridge" failed (add): failed to allocate for range 0: no IP addresses available in range set: pod "userns-test" namespace "idmap-e2e""#.to_owned(),
        r#"Error: container "idmap" is waiting to start: trying and failing to pull image"#.to_owned(),
        r#"Liveness probe failed: Get "http://10.0.0.7:8080/userns/healthz": dial tcp 10.0.0.7:8080: connect: connection refused"#.to_owned(),
        r#"smbd: idmap range not specified for domain '*'"#.to_owned(),
        "Error: open /usr/lib/x86_64-linux-gnu/libsubid.so.4: no such file or directory".to_owned(),
    ];
    for msg in &unrelated {
        assert_eq!(classify(msg), Reason::Unrelated, "{msg}");
    }
    let decided = [
        (
            format!(r#"{ID}: runc run failed: unable to start container process: error during container init: error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr {BUNDLE}/rootfs/dev/mqueue: operation not permitted"#),
            Reason::MqueueSetxattr,
        ),
        (
            format!(r#"runc run failed: error mounting "sysfs" to rootfs at "/sys": mount src=sysfs, dst=/sys, dstFd=/proc/thread-self/fd/9, flags=MS_NOSUID|MS_NODEV|MS_NOEXEC: operation not permitted (container {ID})"#),
            Reason::SysfsMountEperm,
        ),
        (
            format!("failed to fulfil mount request: failed to set MOUNT_ATTR_IDMAP on {BUNDLE}/src: invalid argument"),
            Reason::IdmapUnsupported,
        ),
        (
            format!("{ID}: Error during unshare(CLONE_NEWUSER): Operation not permitted"),
            Reason::UsernsUnsupported,
        ),
    ];
    for (msg, reason) in &decided {
        assert_eq!(classify(msg), *reason, "{msg}");
    }
}
