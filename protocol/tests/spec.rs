//! protocol/README.md is the specification: its tables must match the code.

use skillmesh_protocol::{ENVELOPE_HEADER_BYTES, ErrorCode, Kind, MAX_MAILBOX_REQUEST_BYTES};

const SPEC: &str = include_str!("../README.md");

/// Rows of the markdown table whose header line starts with `header`.
fn table(header: &str) -> Vec<Vec<String>> {
    let mut lines = SPEC.lines().skip_while(|l| !l.starts_with(header));
    lines.next();
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect()
}

fn number(cell: &str) -> usize {
    cell.split_whitespace()
        .next()
        .unwrap_or("")
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

#[test]
fn kind_table_matches_the_code() {
    let rows = table("| code | kind name |");
    assert_eq!(rows.len(), Kind::ALL.len());
    for (row, kind) in rows.iter().zip(Kind::ALL) {
        assert_eq!(number(&row[0]), usize::from(kind.code()), "{row:?}");
        assert_eq!(row[1], kind.name(), "{row:?}");
        assert_eq!(number(&row[3]), kind.max_payload(), "{row:?}");
    }
    assert_eq!(ENVELOPE_HEADER_BYTES, 100);
}

#[test]
fn error_table_matches_the_code() {
    let rows = table("| code | name | meaning |");
    assert_eq!(rows.len(), ErrorCode::ALL.len());
    for (row, code) in rows.iter().zip(ErrorCode::ALL) {
        assert_eq!(number(&row[0]), usize::from(code.code()), "{row:?}");
        assert_eq!(row[1], code.name(), "{row:?}");
    }
}

#[test]
fn mailbox_request_limit_matches() {
    let stated = SPEC
        .lines()
        .find(|l| l.starts_with("A request is at most"))
        .expect("mailbox limit line");
    let n: usize = stated
        .split_whitespace()
        .find_map(|w| w.replace(',', "").parse().ok())
        .expect("a number");
    assert_eq!(n, MAX_MAILBOX_REQUEST_BYTES);
}
