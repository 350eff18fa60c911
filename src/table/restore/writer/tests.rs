use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::table::store::TableMeta;
use crate::table::stored_row::StoredRow;

fn entry(chunk: usize, i: usize) -> Entry {
    Entry {
        row: Arc::new(json!({"chunk": chunk, "i": i}).as_object().unwrap().clone()).into(),
        part: (i % 3) as u32,
        off: (chunk * 1_000 + i) as i64,
    }
}

/// Chunk `c` writes keys k0..k999 with its number, and removes the keys k{c}00..k{c}09 when
/// `c` is odd: a later chunk must win over an earlier one for every key.
fn chunk(c: usize) -> ChunkWrite {
    let mut rest = WriteBatch::default();
    rest.put_table(
        "t",
        &TableMeta {
            epoch: "ep".into(),
            source: "cdc.t".into(),
            partitions: 3,
        },
    );
    let rows = (0..1_000)
        .map(|i| {
            let key = format!("k{i}");
            let removed = c % 2 == 1 && (c * 100..c * 100 + 10).contains(&i);
            let mut entry = (!removed).then(|| entry(c, i));
            // every other row as the bytes a changelog record carried (formatted otherwise than
            // the store would: stored as they are, they must load as the same row)
            if let Some(e) = entry.as_mut().filter(|_| i % 2 == 0) {
                let json = serde_json::to_vec_pretty(&*e.row).unwrap();
                e.row = StoredRow::from_json(&json).unwrap();
            }
            ChunkRow { key, entry }
        })
        .collect();
    ChunkWrite {
        table: "t".into(),
        rows,
        rest,
    }
}

#[test]
fn chunks_are_written_in_order_before_the_read_returns() {
    for threaded in [true, false] {
        written_in_order(threaded);
    }
}

fn written_in_order(threaded: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // many more chunks than may wait: the read waits on the writer along the way
    let chunks = 8;
    let got = with_writer_on(&store, threaded, |w| {
        for c in 0..chunks {
            assert!(w.send(chunk(c)), "the writer stopped");
        }
        Ok(42)
    })
    .unwrap();
    assert_eq!(got, 42, "the read's own result");
    let loaded = store.load().unwrap();
    let t = loaded.tables.iter().find(|t| &*t.name == "t").unwrap();
    let last = chunks - 1;
    // the last chunk (7, odd) removed k700..k709; every other key has its values
    assert_eq!(t.rows.len(), 990);
    for (key, e) in &t.rows {
        let i: usize = key[1..].parse().unwrap();
        assert_eq!(e, &entry(last, i), "{key}");
        // a row received as JSON is stored as it came, not serialised again
        let pretty = e.row.json().is_some_and(|j| j.contains("\n  "));
        assert_eq!(pretty, i.is_multiple_of(2), "{key}");
    }
    assert!(!t.rows.contains_key("k700") && t.rows.contains_key("k500"));
}

#[test]
fn a_failed_read_still_leaves_what_it_sent_written() {
    for threaded in [true, false] {
        failed_read(threaded);
    }
}

fn failed_read(threaded: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let got: Result<(), RestoreError> = with_writer_on(&store, threaded, |w| {
        assert!(w.send(chunk(0)));
        assert!(w.send(chunk(2)));
        Err(RestoreError::Superseded("t".into(), 0))
    });
    assert!(matches!(got, Err(RestoreError::Superseded(..))), "{got:?}");
    let loaded = store.load().unwrap();
    let t = loaded.tables.iter().find(|t| &*t.name == "t").unwrap();
    assert_eq!(t.rows.len(), 1_000);
    assert_eq!(t.rows["k3"], entry(2, 3));
}
