use std::collections::HashSet;

use serde_json::{json, Value};

use super::*;
use crate::table::state::Entry;

const ROWS: [(&str, &str); 6] = [
    (
        "g1",
        r#"{"game":"g1","league":"EPL","home":"1.50","away":"2.10"}"#,
    ),
    (
        "g2",
        r#"{"game":"g2","league":"EPL","home":null,"away":"3.00"}"#,
    ),
    (
        "g3",
        r#"{"game":"g3","league":"NBA","note":"null and void","n":7}"#,
    ),
    (
        "g4",
        r#"{"game":"g4","league":"NBA","x":{"y":null},"s":"é\n\"q\""}"#,
    ),
    (
        "g5",
        r#"{"game":"g5","league":"EPL","home":"1.01","away":"9.50"}"#,
    ),
    (
        "g6",
        r#"{"game":"g6","league":"NBA","px":1.5,"f":0.1,"big":18446744073709551615,"neg":-42,"s":"é\"q\\n\t\u0001"}"#,
    ),
];

#[test]
fn the_rows_without_null_are_in_the_form_livetable_stores() {
    // the store and the changelog hold rows as `encode_row` writes them: that form is what the
    // frames below compare byte for byte
    for (k, json) in ROWS.iter().filter(|(_, j)| !j.contains("null")) {
        let v: Value = serde_json::from_str(json).unwrap();
        let row = v.as_object().unwrap();
        assert_eq!(crate::table::store::encode_row(row), json.as_bytes(), "{k}");
    }
}

/// The table of [`ROWS`], each row loaded from its JSON (`stored`) or parsed from a change.
fn table(stored: bool) -> TableState {
    let mut t = TableState::new("odds", "e1", "src", 1);
    for (i, (k, json)) in ROWS.iter().enumerate() {
        let row = if stored {
            StoredRow::from_json(json.as_bytes()).unwrap()
        } else {
            let v: Value = serde_json::from_str(json).unwrap();
            StoredRow::from(Arc::new(v.as_object().unwrap().clone()))
        };
        let entry = Entry {
            row,
            part: 0,
            off: i as i64,
        };
        t.rows.insert(k.to_string(), entry);
    }
    t
}

fn text(parts: &[Utf8Bytes]) -> String {
    parts
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rows_loaded_from_the_store_give_the_same_frames_as_parsed_ones() {
    let keys: HashSet<String> = ["g2", "g3", "zz"].iter().map(|k| k.to_string()).collect();
    let selectors = [
        Selector::default(),
        Selector::keys(Some(keys.clone())),
        Selector::build(None, Some("league = 'EPL'"), None).unwrap(),
        Selector::build(None, None, Some("home")).unwrap(),
        Selector::build(Some(keys), Some("n IS NULL"), Some("league,away")).unwrap(),
    ];
    for sel in &selectors {
        let stored = snapshot_parts(&table(true), sel);
        let parsed = snapshot_parts(&table(false), sel);
        assert_eq!(stored.0, parsed.0);
        assert_eq!(text(&stored.1), text(&parsed.1));
    }
    // the whole table: NULL columns are left out, whichever way the row is held
    let (rows, parts) = snapshot_parts(&table(true), &Selector::default());
    assert_eq!(rows, 6);
    let frame: Value = serde_json::from_str(parts[0].as_str()).unwrap();
    assert_eq!(
        frame["rows"]["g2"],
        json!({"game":"g2","league":"EPL","away":"3.00"})
    );
    assert_eq!(frame["rows"]["g1"]["home"], json!("1.50"));
    assert_eq!(frame["rows"]["g4"]["x"], json!({"y": null}));
}

#[test]
fn a_row_without_nulls_is_sent_as_stored_without_being_parsed() {
    let t = table(true);
    let _ = snapshot_parts(&t, &Selector::default());
    let parsed: Vec<bool> = ROWS
        .iter()
        .map(|(k, _)| t.rows[*k].row.is_parsed())
        .collect();
    // g2 and g4 hold a null and g3 the word: those are serialised from their columns
    assert_eq!(parsed, [false, true, true, true, false, false]);
}
