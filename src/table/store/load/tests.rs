use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;

use super::super::{encode_row, TableMeta, WriteBatch};
use super::*;

/// Four tables, rows spread over many chunks, table boundaries inside chunks, and many more
/// chunks after table `c` than the channel holds.
fn fill(store: &Store) -> Vec<(&'static str, usize)> {
    let tables = vec![
        ("a", 5_000),
        ("b", 1),
        ("c", 2 * CHUNK_ROWS + 17),
        ("d", 12 * CHUNK_ROWS),
    ];
    let mut b = WriteBatch::default();
    for (name, n) in &tables {
        b.put_table(
            name,
            &TableMeta {
                epoch: format!("ep-{name}"),
                source: format!("cdc.{name}"),
                partitions: 3,
            },
        );
        for i in 0..*n {
            let key = format!("k{i}");
            let row = json!({"t": name, "i": i}).as_object().unwrap().clone();
            b.put_row(name, &key, (i % 3) as u32, i as i64, &encode_row(&row));
        }
    }
    store.apply(b).unwrap();
    tables
}

/// Runs `f` on a thread and fails the test if it does not end within a minute (a load that
/// waits on a full channel for ever would otherwise hang the suite).
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the load did not end within 60 s")
}

fn open(dir: &Path) -> Store {
    Store::open(dir).unwrap()
}

#[test]
fn any_number_of_parsers_loads_every_row_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tables = fill(&store);
    let one = store.load_with(1).unwrap();
    for parsers in [2, 3, 8] {
        let many = store.load_with(parsers).unwrap();
        assert_eq!(many.tables.len(), tables.len());
        for t in &many.tables {
            let same = one.tables.iter().find(|o| o.name == t.name).unwrap();
            let keys: Vec<_> = t.rows.keys().collect();
            assert_eq!(keys, same.rows.keys().collect::<Vec<_>>(), "{}", t.name);
        }
    }
    for t in &one.tables {
        let n = tables.iter().find(|(name, _)| *t.name == **name).unwrap().1;
        assert_eq!(t.rows.len(), n, "{}", t.name);
        for (key, e) in &t.rows {
            let i: usize = key[1..].parse().unwrap();
            assert_eq!(e.row["t"], json!(*t.name));
            assert_eq!(e.row["i"], json!(i));
            assert_eq!((e.part, e.off), ((i % 3) as u32, i as i64), "{key}");
        }
    }
}

#[test]
fn the_first_corrupt_row_in_store_order_is_the_error_and_nothing_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store);
    // two corrupt rows in different chunks of table `c` (keys sort as strings: k100.. < k9..)
    let bad = |key: &str, value: &[u8]| {
        let mut k = b"rc\0".to_vec();
        k.extend_from_slice(key.as_bytes());
        store.tree.insert(k, value).unwrap();
    };
    bad("k3000", b"\0\0\0\x01\0\0\0\0\0\0\0\x05{not json");
    bad("k9000", b"short");
    for parsers in [1, 2, 4] {
        let s = store.clone();
        let err = within_a_minute(move || s.load_with(parsers).map(|_| ()).unwrap_err());
        match err {
            StoreError::Corrupt { key, reason } => {
                assert_eq!(
                    (key.as_str(), reason),
                    ("rc\0k3000", "row json"),
                    "{parsers}"
                )
            }
            other => panic!("{other}"),
        }
    }
}
