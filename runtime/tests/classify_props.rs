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

/// The densest possible input for the automaton: every position starts a match.
#[test]
fn megabytes_of_back_to_back_phrases() {
    let line = "mqueue".repeat(1 << 20);
    assert_eq!(classify(&line), Reason::Unrelated);
    let line = "idmap ".repeat(1 << 19);
    assert_eq!(classify(&line), Reason::IdmapUnsupported);
}
