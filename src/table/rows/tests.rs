use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::cdc::decode::Row;
use crate::filter::{equality, Filter};

fn entry(v: Value) -> Entry {
    Entry {
        row: Arc::new(v.as_object().cloned().unwrap_or_default()).into(),
        part: 0,
        off: 0,
    }
}

/// The keys a filter's equality index lookup gives, against a scan of every row.
fn check(rows: &Rows, filter: &str) -> Result<(), TestCaseError> {
    let f = Filter::parse(filter).map_err(|e| TestCaseError::fail(format!("{filter}: {e}")))?;
    let Some((column, literals)) = equality(&f) else {
        return Ok(());
    };
    let Some(found) = rows.lookup(&column, &literals) else {
        return Ok(());
    };
    let found: Vec<String> = found.into_iter().cloned().collect();
    // no row the filter accepts is missed
    for (k, e) in rows.iter() {
        if f.matches(&e.row) {
            prop_assert!(found.contains(k), "{filter}: {k} {:?} not looked up", e.row);
        }
    }
    // and each key found is a row whose column shares a key with the literals
    for k in &found {
        let e = rows.get(k);
        prop_assert!(e.is_some(), "{filter}: {k} looked up but not in the table");
        let keys = value_keys(e.and_then(|e| e.row.get(&column)));
        prop_assert!(keys.iter().any(|x| literals.contains(x)));
    }
    let mut sorted = found.clone();
    sorted.sort();
    prop_assert_eq!(sorted, found, "sorted");
    Ok(())
}

#[test]
fn an_index_follows_inserts_updates_removes_and_retains() {
    let mut rows = Rows::default();
    rows.insert("g1".into(), entry(json!({"league": "nba", "n": 1})));
    assert!(rows.ensure_index("league"));
    rows.insert("g2".into(), entry(json!({"league": "nba", "n": "1.0"})));
    rows.insert("g3".into(), entry(json!({"league": "nhl", "n": 2})));
    let nba = vec![IndexKey::Str("nba".into())];
    let keys = |r: &Rows, c: &str, k: &[IndexKey]| -> Vec<String> {
        r.lookup(c, k).unwrap().into_iter().cloned().collect()
    };
    assert_eq!(keys(&rows, "league", &nba), ["g1", "g2"]);
    // a move to another league, a delete
    rows.insert("g1".into(), entry(json!({"league": "nhl"})));
    assert_eq!(keys(&rows, "league", &nba), ["g2"]);
    rows.remove("g2");
    assert!(keys(&rows, "league", &nba).is_empty());
    // numbers and numeric strings meet under the number
    assert!(rows.ensure_index("n"));
    rows.insert("g4".into(), entry(json!({"n": "2.00"})));
    let two = equality(&Filter::parse("n = 2").unwrap()).unwrap().1;
    assert_eq!(keys(&rows, "n", &two), ["g3", "g4"]);
    rows.retain(|k, _| k != "g3");
    assert_eq!(keys(&rows, "n", &two), ["g4"]);
    assert_eq!(
        keys(&rows, "league", &[IndexKey::Str("nhl".into())]),
        ["g1"]
    );
    assert!(rows.lookup("other", &nba).is_none(), "not indexed: None");
}

fn arb_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(json!(null))),
        (0i64..3).prop_map(|i| Some(json!(i))),
        (0i64..3).prop_map(|i| Some(json!(i.to_string()))),
        Just(Some(json!("1.0"))),
        Just(Some(json!(1.5))),
        Just(Some(json!("x"))),
        Just(Some(json!(true))),
        Just(Some(json!(false))),
    ]
}

fn arb_row() -> impl Strategy<Value = Value> {
    (arb_value(), arb_value()).prop_map(|(a, b)| {
        let mut r = Row::new();
        if let Some(a) = a {
            r.insert("a".into(), a);
        }
        if let Some(b) = b {
            r.insert("b".into(), b);
        }
        Value::Object(r)
    })
}

const FILTERS: &[&str] = &[
    "a = 1",
    "a = '1'",
    "a = 1.0 AND b > 0",
    "a IN (0, '2', 'x')",
    "a = 'x'",
    "b = TRUE",
    "b",
    "NOT b",
    "a = 1.5",
    "b = '1.0' AND a IS NOT NULL",
];

#[test]
fn an_index_built_from_a_copy_files_the_rows_changed_since() {
    let mut rows = Rows::default();
    for (k, league) in [("g1", "nba"), ("g2", "nba"), ("g3", "nhl"), ("g4", "nba")] {
        rows.insert(k.into(), entry(json!({ "league": league })));
    }
    let copy = rows.copy_rows();
    let index = build_index("league", &copy);
    // after the copy: a move, a delete, an insert, a rewrite of the same value, a new key first
    rows.insert("g1".into(), entry(json!({"league": "nhl"})));
    rows.remove("g2");
    rows.insert("g5".into(), entry(json!({"league": "nba"})));
    rows.insert("g4".into(), entry(json!({"league": "nba", "n": 1})));
    rows.insert("a0".into(), entry(json!({"league": "nhl"})));
    assert!(rows.install_index("league", &copy, index));
    let keys = |rows: &Rows, league: &str| -> Vec<String> {
        rows.lookup("league", &[IndexKey::Str(league.into())])
            .unwrap()
            .into_iter()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&rows, "nba"), ["g4", "g5"]);
    assert_eq!(keys(&rows, "nhl"), ["a0", "g1", "g3"]);
    // a build of a column indexed meanwhile is dropped: the index in place stays
    assert!(rows.install_index("league", &copy, Index::new()));
    assert_eq!(keys(&rows, "nba"), ["g4", "g5"]);
    assert_eq!(keys(&rows, "nhl"), ["a0", "g1", "g3"]);
}

/// A row held as its JSON, as loaded from the store.
fn stored(v: &Value) -> Entry {
    Entry {
        row: StoredRow::from_json(v.to_string().as_bytes()).unwrap(),
        part: 0,
        off: 0,
    }
}

/// Installs indexes of `a` and `b` built from `copy`: each must then equal an index built from
/// the rows as they are now.
fn install(
    rows: &mut Rows,
    copy: &[(String, StoredRow)],
    a: Index,
    b: Index,
) -> Result<(), TestCaseError> {
    rows.install_index("a", copy, a);
    rows.install_index("b", copy, b);
    let now = rows.copy_rows();
    for column in ["a", "b"] {
        prop_assert_eq!(
            &rows.indexes[column],
            &build_index(column, &now),
            "{}",
            column
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn lookups_find_every_row_a_scan_accepts(
        ops in proptest::collection::vec((0u8..8, proptest::option::of(arb_row())), 1..60),
        index_at in 0usize..60,
        install_after in 0usize..12,
    ) {
        let mut rows = Rows::default();
        // indexes built from a copy at `index_at`, installed `install_after` changes later
        let mut pending = None;
        for (i, (key, row)) in ops.iter().enumerate() {
            if i == index_at {
                let copy = rows.copy_rows();
                let a = build_index("a", &copy);
                let b = build_index("b", &copy);
                pending = Some((copy, a, b));
            }
            if i == index_at + install_after {
                if let Some((copy, a, b)) = pending.take() {
                    install(&mut rows, &copy, a, b)?;
                }
            }
            let held_as_json = key % 2 == 0;
            let key = format!("k{key}");
            match row {
                Some(v) if held_as_json => rows.insert(key, stored(v)),
                Some(v) => rows.insert(key, entry(v.clone())),
                None if i % 7 == 3 => rows.retain(|k, _| *k != key),
                None => {
                    rows.remove(&key);
                }
            }
            for f in FILTERS {
                check(&rows, f)?;
            }
        }
        if let Some((copy, a, b)) = pending.take() {
            install(&mut rows, &copy, a, b)?;
            for f in FILTERS {
                check(&rows, f)?;
            }
        }
    }
}
