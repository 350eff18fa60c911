use std::collections::HashSet;

use serde_json::{json, Value};

use super::*;

/// The body of `t`, as the route builds it.
fn body_of(t: &TableState, sel: &Selector) -> Vec<u8> {
    table_body(SnapshotCopy::take(t, sel), "odds", sel)
}
use crate::fanout::snapshot::tests::{key_only, selectors, table, ROWS};
use crate::table::state::TableState;

#[test]
fn rows_loaded_from_the_store_give_the_same_body_as_parsed_ones() {
    for sel in &selectors() {
        let stored = body_of(&table(true), sel);
        let parsed = body_of(&table(false), sel);
        assert_eq!(
            String::from_utf8(stored).unwrap(),
            String::from_utf8(parsed).unwrap()
        );
    }
}

#[test]
fn the_whole_table_is_answered_from_the_stored_json_without_a_parse() {
    let t = table(true);
    let body: Value = serde_json::from_slice(&body_of(&t, &Selector::default())).unwrap();
    assert!(ROWS.iter().all(|(k, _)| !t.rows[*k].row.is_parsed()));
    assert_eq!(body["table"], "odds");
    assert_eq!(body["seq"], json!(t.seq()));
    assert_eq!(body["epoch"], "e1");
    assert_eq!(body["pos"], json!(t.token().to_string()));
    assert_eq!(body["complete"], json!(t.complete()));
    let rows = body["rows"].as_object().unwrap();
    assert_eq!(rows.len(), ROWS.len());
    for (k, json) in ROWS {
        let row: Value = serde_json::from_str(json).unwrap();
        assert_eq!(rows[k], row, "{k}: every column, NULLs included");
    }
}

#[test]
fn keys_and_filters_select_rows_held_as_json() {
    let keys: HashSet<String> = ["g1", "g6", "zz"].iter().map(|k| k.to_string()).collect();
    let t = table(true);
    let body: Value = serde_json::from_slice(&body_of(&t, &Selector::keys(Some(keys)))).unwrap();
    let got: Vec<&String> = body["rows"].as_object().unwrap().keys().collect();
    assert_eq!(got, ["g1", "g6"]);
    let sel = Selector::build(None, Some("league = 'NBA' AND n IS NULL"), Some("league")).unwrap();
    let body: Value = serde_json::from_slice(&body_of(&t, &sel)).unwrap();
    assert_eq!(
        body["rows"],
        json!({"g4": {"league": "NBA"}, "g6": {"league": "NBA"}})
    );
}

#[test]
fn filters_apply_to_looked_up_rows_in_the_body_too() {
    for (name, t, sel, want) in crate::fanout::snapshot::tests::filter_cases() {
        let body: Value = serde_json::from_slice(&body_of(&t, &sel)).unwrap();
        let got: Vec<&String> = body["rows"].as_object().unwrap().keys().collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_filter_of_keys_answers_rows_held_as_json_as_stored() {
    let sel = key_only();
    let t = table(true);
    let body = body_of(&t, &sel);
    assert!(ROWS.iter().all(|(k, _)| !t.rows[*k].row.is_parsed()));
    assert_eq!(
        String::from_utf8(body.clone()).unwrap(),
        String::from_utf8(body_of(&table(false), &sel)).unwrap()
    );
    let body: Value = serde_json::from_slice(&body).unwrap();
    let got: Vec<&String> = body["rows"].as_object().unwrap().keys().collect();
    assert_eq!(got, ["g1", "g5", "g6"]);
}

#[test]
fn a_row_is_answered_as_stored_unless_a_filter_read_its_columns() {
    use crate::table::stored_row::StoredRow;
    // a stored text with a column twice: the parse keeps the last, as the filter sees it
    let text = r#"{"league":"EPL","n":null,"league":"NBA"}"#;
    let row = StoredRow::from_json(text.as_bytes()).unwrap();
    let keys = |k: &str| Selector::keys(Some([k.to_string()].into()));
    // no filter reads rows: the stored text, NULL columns included, and no parse
    let body = row_body("g1", &row, &keys("g1")).unwrap();
    assert_eq!(String::from_utf8(body).unwrap(), text);
    assert!(!row.is_parsed());
    // a key the selector does not name
    assert_eq!(row_body("g1", &row, &keys("g2")), None);
    // a filter reads the row: the columns it judged
    let mut sel = Selector::build(None, Some("league = 'NBA'"), None).unwrap();
    sel.keys = keys("g1").keys;
    let body = row_body("g1", &row, &sel).unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"league":"NBA","n":null}"#
    );
    let mut epl = Selector::build(None, Some("league = 'EPL'"), None).unwrap();
    epl.keys = keys("g1").keys;
    assert_eq!(row_body("g1", &row, &epl), None);
}

#[test]
fn a_body_built_in_pieces_is_the_body_built_at_once() {
    for held_as_json in [true, false] {
        let t = table(held_as_json);
        for sel in &selectors() {
            let whole = body_of(&t, sel);
            for max in [0, 1, 20, 60, 1 << 20] {
                let mut body =
                    TableBody::new(SnapshotCopy::take(&t, sel), "odds".into(), sel.clone());
                let mut joined = Vec::new();
                let mut pieces = 0;
                while let Some(piece) = body.next_piece(max) {
                    assert!(!body.finished() || joined.len() + piece.len() == whole.len());
                    joined.extend_from_slice(&piece);
                    pieces += 1;
                }
                assert!(body.finished());
                assert_eq!(
                    String::from_utf8(joined).unwrap(),
                    String::from_utf8(whole.clone()).unwrap(),
                    "max {max}"
                );
                // past the head, a piece holds a row at least: with a tiny `max`, one each
                let rows = serde_json::from_slice::<Value>(&whole).unwrap()["rows"]
                    .as_object()
                    .unwrap()
                    .len();
                if max <= 1 {
                    assert_eq!(pieces, 1 + rows, "max {max}");
                } else if max == 1 << 20 {
                    assert_eq!(pieces, 1);
                }
            }
        }
    }
}

#[test]
fn a_body_lets_its_copy_go_with_its_last_piece() {
    let t = table(true);
    let sel = Selector::default();
    let mut body = TableBody::new(SnapshotCopy::take(&t, &sel), "odds".into(), sel);
    let first = body.next_piece(1).unwrap();
    assert!(String::from_utf8(first)
        .unwrap()
        .starts_with(r#"{"table":"odds","#));
    assert!(!body.finished());
    let mut last = Vec::new();
    while let Some(piece) = body.next_piece(1) {
        last = piece;
    }
    assert!(body.finished());
    assert!(last.ends_with(b"}}"));
    assert_eq!(body.next_piece(1), None);
}
