use std::collections::HashSet;

use serde_json::{json, Value};

use super::*;
use crate::table::state::Entry;

pub(crate) const ROWS: [(&str, &str); 6] = [
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
pub(crate) fn table(stored: bool) -> TableState {
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

/// Five selectors: the whole table, keys, a `where`, `columns`, and all three together.
pub(crate) fn selectors() -> [Selector; 5] {
    let keys: HashSet<String> = ["g2", "g3", "zz"].iter().map(|k| k.to_string()).collect();
    [
        Selector::default(),
        Selector::keys(Some(keys.clone())),
        Selector::build(None, Some("league = 'EPL'"), None).unwrap(),
        Selector::build(None, None, Some("home")).unwrap(),
        Selector::build(Some(keys), Some("n IS NULL"), Some("league,away")).unwrap(),
    ]
}

#[test]
fn rows_loaded_from_the_store_give_the_same_frames_as_parsed_ones() {
    for sel in &selectors() {
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

#[test]
fn a_copy_gives_the_snapshot_of_the_state_it_was_copied_from() {
    let keys: HashSet<String> = ["g1", "g2", "g5"].iter().map(|k| k.to_string()).collect();
    for sel in [
        Selector::default(),
        Selector::build(None, Some("league = 'EPL'"), None).unwrap(),
        Selector::build(Some(keys), None, Some("away")).unwrap(),
    ] {
        let mut t = table(true);
        let expected = snapshot_parts(&t, &sel);
        let copy = SnapshotCopy::take(&t, &sel);
        // the table goes on before the copy is serialised
        t.rows.remove("g1");
        let row = StoredRow::from_json(br#"{"game":"g5","league":"EPL","away":"1.00"}"#).unwrap();
        t.rows.insert(
            "g5".into(),
            Entry {
                row,
                part: 0,
                off: 9,
            },
        );
        t.useq += 1;
        let (rows, parts) = copy.parts(&sel);
        assert_eq!(rows, expected.0);
        assert_eq!(text(&parts), text(&expected.1));
        assert_ne!(
            text(&parts),
            text(&snapshot_parts(&t, &sel).1),
            "the table did change"
        );
    }
}

#[test]
fn a_copy_holds_the_rows_sent_not_the_table() {
    // a filter that cannot be looked up runs after the copy, outside the lock: once it has, only
    // the accepted rows are held
    let sel = Selector::build(None, Some("n IS NOT NULL"), None).unwrap();
    let mut copy = SnapshotCopy::take(&table(true), &sel);
    assert_eq!(
        copy.parts(&sel).0,
        1,
        "the rows it sends are filtered before"
    );
    copy.apply_filters(&sel);
    assert_eq!(copy.rows.len(), 1);
    assert_eq!(copy.parts(&sel).0, 1);
    let tables = crate::table::state::Tables::default();
    let t = tables.insert(table(true));
    let (copy, _) = copy_of(&t, &sel);
    assert_eq!(copy.rows.len(), 1, "copy_of applies the filters");
    // looked-up keys: only those present
    let keys: HashSet<String> = ["g2", "zz"].iter().map(|k| k.to_string()).collect();
    let copy = SnapshotCopy::take(&table(true), &Selector::keys(Some(keys)));
    assert_eq!(copy.rows.len(), 1);
}

/// A filter that counts its calls and accepts every row but `g3`, like a token's rule.
#[derive(Debug, Default)]
struct Counting(std::sync::atomic::AtomicUsize);

impl crate::fanout::selector::RowFilter for Counting {
    fn matches(&self, key: &str, _row: &crate::cdc::decode::Row) -> bool {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        key != "g3"
    }
}

/// Selectors whose rows are looked up (keys, an indexed `where`) or scanned, each with filters
/// left to apply, on a table indexed by `league`: (name, table, selector, the keys it selects).
pub(crate) fn filter_cases() -> Vec<(&'static str, TableState, Selector, Vec<&'static str>)> {
    let keys =
        |k: &[&str]| -> Option<HashSet<String>> { Some(k.iter().map(|k| k.to_string()).collect()) };
    let indexed = || {
        let mut t = table(true);
        assert!(t.rows.ensure_index("league"));
        t
    };
    let mut token_like = Selector::keys(keys(&["g1", "g3", "g5"]));
    token_like.filters.push(Arc::new(Counting::default()));
    vec![
        (
            "keys + where",
            table(true),
            Selector::build(
                keys(&["g1", "g2", "g4", "zz"]),
                Some("league = 'EPL'"),
                None,
            )
            .unwrap(),
            vec!["g1", "g2"],
        ),
        (
            "indexed where + a further condition",
            indexed(),
            Selector::build(None, Some("league = 'EPL' AND away > '2.50'"), None).unwrap(),
            vec!["g2", "g5"],
        ),
        (
            "keys + a token's rule",
            table(true),
            token_like,
            vec!["g1", "g5"],
        ),
        (
            "scan",
            table(true),
            Selector::build(None, Some("league = 'NBA' OR n = 7"), None).unwrap(),
            vec!["g3", "g4", "g6"],
        ),
    ]
}

#[test]
fn filters_apply_to_looked_up_rows_too() {
    for (name, t, sel, want) in filter_cases() {
        let (rows, parts) = SnapshotCopy::take(&t, &sel).parts(&sel);
        let mut got: Vec<String> = Vec::new();
        for p in parts.iter() {
            let frame: Value = serde_json::from_str(p.as_str()).unwrap();
            let rows = frame.get("rows").or_else(|| frame.get("patch")).unwrap();
            got.extend(rows.as_object().unwrap().keys().cloned());
        }
        assert_eq!(got, want, "{name}");
        assert_eq!(rows, want.len(), "{name}");
    }
}

#[test]
fn each_filter_runs_once_per_row() {
    let keys: HashSet<String> = ["g1", "g2", "zz"].iter().map(|k| k.to_string()).collect();
    let mut indexed = table(true);
    assert!(indexed.rows.ensure_index("league"));
    let cases = [
        ("scan", table(true), Selector::default(), 6),
        ("keys", table(true), Selector::keys(Some(keys)), 2),
        (
            "indexed",
            indexed,
            Selector::build(None, Some("league = 'EPL'"), None).unwrap(),
            3,
        ),
    ];
    for (name, t, mut sel, calls) in cases {
        let counting = Arc::new(Counting::default());
        sel.filters.push(counting.clone());
        let _ = SnapshotCopy::take(&t, &sel).parts(&sel);
        let runs = counting.0.swap(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs, calls, "{name}: frames");
        let copy = SnapshotCopy::take(&t, &sel);
        let _ = crate::http::table_body::table_body(copy, "odds", &sel);
        let runs = counting.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs, calls, "{name}: body");
    }
}

/// A filter that decides from the key alone, as a token's key patterns do.
#[derive(Debug)]
pub(crate) struct KeyIn(pub &'static [&'static str]);

impl crate::fanout::selector::RowFilter for KeyIn {
    fn matches(&self, key: &str, _row: &crate::cdc::decode::Row) -> bool {
        self.0.contains(&key)
    }

    fn matches_key(&self, key: &str) -> Option<bool> {
        Some(self.0.contains(&key))
    }
}

/// A selector with [`KeyIn`] of g1, g5 and g6 (rows without NULLs: sent as stored).
pub(crate) fn key_only() -> Selector {
    Selector {
        filters: vec![Arc::new(KeyIn(&["g1", "g5", "g6", "zz"]))],
        ..Selector::default()
    }
}

#[test]
fn a_filter_of_keys_selects_rows_held_as_json_without_parsing_them() {
    let sel = key_only();
    let t = table(true);
    let copy = SnapshotCopy::take(&t, &sel);
    let (rows, parts) = copy.parts(&sel);
    assert_eq!(rows, 3);
    assert!(ROWS.iter().all(|(k, _)| !t.rows[*k].row.is_parsed()));
    let frame: Value = serde_json::from_str(parts[0].as_str()).unwrap();
    let keys: Vec<&String> = frame["rows"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["g1", "g5", "g6"]);
    assert_eq!(text(&parts), text(&snapshot_parts(&table(false), &sel).1));
    // looked-up keys with it: the filter applies after the copy, still without a parse
    let keys: HashSet<String> = ["g1", "g2"].iter().map(|k| k.to_string()).collect();
    let sel = Selector {
        keys: Some(keys),
        ..key_only()
    };
    let t = table(true);
    let (rows, parts) = SnapshotCopy::take(&t, &sel).parts(&sel);
    assert_eq!(rows, 1);
    assert!(ROWS.iter().all(|(k, _)| !t.rows[*k].row.is_parsed()));
    assert_eq!(text(&parts), text(&snapshot_parts(&table(false), &sel).1));
}

/// A filter that records whether the table's lock was free while it ran.
#[derive(Debug)]
struct SeesTheLock(
    Arc<crate::table::state::Table>,
    std::sync::atomic::AtomicUsize,
);

impl crate::fanout::selector::RowFilter for SeesTheLock {
    fn matches(&self, _key: &str, _row: &crate::cdc::decode::Row) -> bool {
        // a writer could commit now: the lock is not held
        if self.0.try_update_for_tests() {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }
}

#[test]
fn a_scanned_filter_runs_with_the_table_lock_free() {
    let tables = crate::table::state::Tables::default();
    let t = tables.insert(table(true));
    let free = Arc::new(SeesTheLock(t.clone(), Default::default()));
    let mut sel = Selector::default();
    sel.filters.push(free.clone());
    let (copy, _) = copy_of(&t, &sel);
    let rows = copy.selected(&sel).count();
    assert!(rows > 1);
    assert_eq!(
        free.1.load(std::sync::atomic::Ordering::Relaxed),
        rows,
        "every row was filtered while a writer could take the lock"
    );
}
