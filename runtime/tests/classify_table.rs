//! Table test for the pod-failure classifier: every row of `fixtures/classify.tsv` is a
//! real message from a public issue tracker (or the source that prints it) with the
//! reason it must get. A wording change upstream is taught by adding a row here.

use std::str::FromStr;

use usernsguard_runtime::classify::{classify, classify_bytes};
use usernsguard_runtime::Reason;

struct Row {
    line: usize,
    expected: Reason,
    source: String,
    message: String,
}

fn rows() -> Vec<Row> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classify.tsv");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
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
            !source.trim().is_empty(),
            "{path}:{line}: every row must cite its source"
        );
        assert!(!message.is_empty(), "{path}:{line}: empty message");
        rows.push(Row {
            line,
            expected,
            source: source.to_owned(),
            message: message.to_owned(),
        });
    }
    rows
}

#[test]
fn every_table_row_gets_its_reason() {
    let rows = rows();
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let got = classify(&row.message);
            (got != row.expected).then(|| {
                format!(
                    "line {}: expected {}, got {} ({})\n    {}",
                    row.line, row.expected, got, row.source, row.message
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} rows misclassified:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn bytes_and_str_entry_points_agree_on_the_table() {
    for row in rows() {
        assert_eq!(
            classify_bytes(row.message.as_bytes()),
            classify(&row.message),
            "line {}",
            row.line
        );
    }
}
