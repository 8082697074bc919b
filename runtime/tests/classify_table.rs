//! Table tests for the pod-failure classifier over real messages from public issue
//! trackers (or the source that prints them), each with the reason it must get.
//!
//! * `fixtures/classify.tsv` is the table the rules are written against: every row must
//!   get its reason. A wording change upstream is taught by adding a row there.
//! * `fixtures/classify_heldout.tsv` was set aside at random before the rules were
//!   written and is never tuned against: its accuracy estimates how the classifier does
//!   on messages it has not seen. Its test asserts the floor that was honestly reached,
//!   and the absolute requirements: no unrelated message counted as a user-namespace
//!   failure, every mqueue/setxattr message right.
//!
//! Both tests print a per-reason table to stderr directly (not through the test
//! harness's captured `eprintln!`), so `cargo test` shows it without `--nocapture`.
//! A row whose label is a documented policy decision rather than the thread's root
//! cause says `[cause: X]` in its source; the tables report that agreement too.

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;

use usernsguard_runtime::classify::{classify, classify_bytes};
use usernsguard_runtime::Reason;

struct Row {
    line: usize,
    expected: Reason,
    /// The thread's root cause where it differs from the text-policy label.
    cause: Option<Reason>,
    source: String,
    message: String,
}

impl Row {
    fn cause(&self) -> Reason {
        self.cause.unwrap_or(self.expected)
    }
}

fn rows(file: &str) -> Vec<Row> {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut rows = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        let mut cols = raw.splitn(3, '\t');
        let (Some(reason), Some(source), Some(message)) = (cols.next(), cols.next(), cols.next()) else {
            panic!("{path}:{line}: expected `reason<TAB>source<TAB>message`, got {raw:?}");
        };
        let expected = Reason::from_str(reason).unwrap_or_else(|e| panic!("{path}:{line}: {e}"));
        assert!(
            source.contains("https://") || source.contains('#'),
            "{path}:{line}: every row must cite its source (URL or tracker and issue number)"
        );
        let cause = source.split_once("[cause: ").map(|(_, rest)| {
            let code = rest.split(']').next().unwrap_or_default();
            Reason::from_str(code).unwrap_or_else(|e| panic!("{path}:{line}: cause: {e}"))
        });
        assert!(!message.is_empty(), "{path}:{line}: empty message");
        rows.push(Row {
            line,
            expected,
            cause,
            source: source.to_owned(),
            message: message.to_owned(),
        });
    }
    rows
}

/// Per-reason counts of one table.
#[derive(Default)]
struct Score {
    by_reason: BTreeMap<Reason, (usize, usize)>,
    right: usize,
    total: usize,
    cause_right: usize,
    /// Rows labelled `unrelated` that the classifier counted as user-namespace failures.
    false_positives: Vec<String>,
    misses: Vec<String>,
}

fn score(rows: &[Row]) -> Score {
    let mut s = Score::default();
    for row in rows {
        let got = classify(&row.message);
        let entry = s.by_reason.entry(row.expected).or_default();
        entry.1 += 1;
        s.total += 1;
        if got == row.expected {
            entry.0 += 1;
            s.right += 1;
        } else {
            s.misses.push(format!(
                "line {}: expected {}, got {} ({})\n    {}",
                row.line, row.expected, got, row.source, row.message
            ));
            if !row.expected.is_userns() && got.is_userns() {
                s.false_positives.push(format!("line {}: {got}", row.line));
            }
        }
        if got == row.cause() {
            s.cause_right += 1;
        }
    }
    s
}

fn pct(right: usize, total: usize) -> f64 {
    if total == 0 {
        100.0
    } else {
        100.0 * right as f64 / total as f64
    }
}

/// Writes the per-reason table straight to stderr, past the harness's output capture.
fn report(title: &str, s: &Score, relabelled: usize) {
    let mut out = format!(
        "\n{title}\n  {:<24} {:>6} {:>6} {:>8}\n",
        "reason", "right", "rows", "accuracy"
    );
    for (reason, (right, total)) in &s.by_reason {
        out += &format!(
            "  {:<24} {:>6} {:>6} {:>7.1}%\n",
            reason.as_str(),
            right,
            total,
            pct(*right, *total)
        );
    }
    out += &format!(
        "  {:<24} {:>6} {:>6} {:>7.1}%\n",
        "all",
        s.right,
        s.total,
        pct(s.right, s.total)
    );
    out += &format!(
        "  unrelated counted as user-namespace failures: {}\n  agreement with the threads' root causes ({relabelled} rows labelled by policy, not cause): {}/{} ({:.1}%)\n",
        s.false_positives.len(),
        s.cause_right,
        s.total,
        pct(s.cause_right, s.total)
    );
    // One write: parallel tests must not interleave their tables.
    let _ = std::io::stderr().lock().write_all(out.as_bytes());
}

#[test]
fn every_table_row_gets_its_reason() {
    let rows = rows("classify.tsv");
    let s = score(&rows);
    report(
        "classifier accuracy on fixtures/classify.tsv",
        &s,
        rows.iter().filter(|r| r.cause.is_some()).count(),
    );
    assert!(rows.len() >= 150, "the table shrank to {} rows", rows.len());
    assert!(
        s.misses.is_empty(),
        "{} of {} rows misclassified:\n{}",
        s.misses.len(),
        rows.len(),
        s.misses.join("\n")
    );
}

#[test]
fn the_table_has_enough_unrelated_rows_that_look_related() {
    let rows = rows("classify.tsv");
    let looks_related = |m: &str| {
        let m = m.to_ascii_lowercase();
        [
            "namespace",
            "mount",
            "selinux",
            "avc",
            "permission denied",
            "not permitted",
            "idmap",
            "userns",
        ]
        .iter()
        .any(|w| m.contains(w))
    };
    let n = rows
        .iter()
        .filter(|r| r.expected == Reason::Unrelated && looks_related(&r.message))
        .count();
    assert!(
        n >= 40,
        "only {n} unrelated rows mention namespaces, mounts, SELinux or permissions"
    );
}

/// The held-out rows, never tuned against: a random quarter of the candidate messages set
/// aside before the rules were written, and messages collected after they were frozen.
/// The floor is what the classifier reached when it was first run against them (rounded
/// down); the hard requirements are exact.
#[test]
fn held_out_rows_meet_the_accuracy_floor() {
    let rows = rows("classify_heldout.tsv");
    let s = score(&rows);
    report(
        "classifier accuracy on fixtures/classify_heldout.tsv (held out, never tuned against)",
        &s,
        rows.iter().filter(|r| r.cause.is_some()).count(),
    );
    // Misses are listed, not tuned against: a wording worth teaching goes into classify.tsv.
    let mut out = String::new();
    for miss in &s.misses {
        out += &format!("  held-out miss: {miss}\n");
    }
    let _ = std::io::stderr().lock().write_all(out.as_bytes());

    assert!(
        s.false_positives.is_empty(),
        "unrelated messages counted as user-namespace failures: {:?}",
        s.false_positives
    );
    for row in &rows {
        let m = row.message.to_ascii_lowercase();
        if row.expected == Reason::MqueueSetxattr || (m.contains("mqueue") && m.contains("setxattr")) {
            assert_eq!(classify(&row.message), row.expected, "line {}", row.line);
        }
    }
    assert!(
        rows.len() >= 90,
        "the held-out table shrank to {} rows",
        rows.len()
    );
    let accuracy = pct(s.right, s.total);
    assert!(
        accuracy >= 97.0,
        "held-out accuracy {accuracy:.1}% fell below the 97% floor"
    );
}

#[test]
fn bytes_and_str_entry_points_agree_on_the_tables() {
    for file in ["classify.tsv", "classify_heldout.tsv"] {
        for row in rows(file) {
            assert_eq!(
                classify_bytes(row.message.as_bytes()),
                classify(&row.message),
                "{file} line {}",
                row.line
            );
        }
    }
}
