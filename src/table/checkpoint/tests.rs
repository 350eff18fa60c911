//! The durability task against a broker that never answers (nothing listens on its port): a
//! shutdown while records are retried must leave them in the outbox.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cdc::decode::Op;
use crate::config::{Config, TopicSelection};
use crate::table::state::{Delta, NoSink, RowWrite};
use crate::table::store::{AckMeta, SliceMeta, TableMeta, WriteBatch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_retrying_records_no_acknowledgement_and_keeps_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    // a port nothing listens on: every delivery times out (after 300 ms), retriably
    let mut config = Config::for_tests(
        "127.0.0.1:1",
        TopicSelection::Names(vec!["in".into()]),
        dir.path(),
        "cp-cancel",
    );
    config
        .kafka_props
        .push(("message.timeout.ms".into(), "300".into()));
    let store = Store::open(&dir.path().join("store")).unwrap();
    let tables = Arc::new(Tables::default());
    let t = tables.ensure("t", "e", "in", 1);
    t.update_slices(|s| {
        let slice = s.slice_mut(0);
        slice.mode = SliceMode::Owned;
        slice.raise_acked(2);
        slice.tombs.insert("gone".into(), 6);
    });
    let mut d = Delta::new(t.clone());
    d.stage(RowWrite {
        key: "k".into(),
        row: Some(Arc::new(json!({"v": 5}).as_object().unwrap().clone()).into()),
        op: Op::Update,
        part: 0,
        off: 5,
        ts_ms: None,
        kafka_ts_ms: None,
        polled: None,
    });
    tables.commit(d, &NoSink);
    let letter = DeadLetter {
        topic: "in".into(),
        partition: 0,
        offset: 4,
        key: None,
        value: Some(b"{oops".to_vec()),
        reason: "invalid_json".into(),
        error: "e".into(),
        truncated: false,
    };
    let mut b = WriteBatch::default();
    // the table as the store holds it: what a restart loads
    b.put_table(
        "t",
        &TableMeta {
            epoch: "e".into(),
            source: "in".into(),
            partitions: 1,
        },
    );
    b.put_slice(
        "t",
        0,
        &SliceMeta {
            last_off: 5,
            count: 1,
            owner: "0.1".into(),
            owned: true,
            kept_ms: None,
        },
    );
    b.put_acks(
        "t",
        0,
        &AckMeta {
            acked: 2,
            cl_next: 0,
        },
    );
    b.mark_deleted("t", "gone", 0, 6);
    b.add_dead_letter(1, &letter);
    store.apply(b).unwrap();

    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let checkpointer = Checkpointer {
        store: store.clone(),
        tables: tables.clone(),
        changelog: Arc::new(Changelog::new(&config).unwrap()),
        consumer: None,
        metrics: metrics.clone(),
        cancel: cancel.clone(),
        progress: Arc::new(Progress::default()),
        repairs: Default::default(),
    };
    let row = |key: &str, off: i64, deleted: bool| PendingRow {
        table: "t".into(),
        part: 0,
        key: key.into(),
        off,
        deleted,
        delivery: None,
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(Checkpoint {
        rows: vec![row("k", 5, false), row("gone", 6, true)],
        letters: vec![PendingLetter {
            id: 1,
            letter: letter.clone(),
            delivery: None,
        }],
        positions: [(("in".to_string(), 0), 7)].into_iter().collect(),
        acked: vec![SliceAck {
            table: "t".into(),
            part: 0,
            acked: 6,
            resets: 0,
        }],
        barrier: None,
    })
    .await
    .unwrap();
    drop(tx);
    let run = tokio::spawn(checkpointer.run(rx));
    // deliveries time out and are retried (at least two failures seen), then the node stops
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metrics.changelog_produce_errors.get() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery failed within 20 s"
        );
        assert!(!run.is_finished(), "ended while the broker is down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!run.is_finished(), "still retrying");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ends once cancelled")
        .unwrap()
        .unwrap();

    assert_eq!(
        t.read().slice(0).map(|s| s.acked),
        Some(2),
        "nothing acknowledged: the row at 5 is still in the outbox"
    );
    let loaded = store.load().unwrap();
    assert_eq!(
        loaded.dead_letters,
        vec![(1, letter)],
        "the dead letter stays"
    );
    assert_eq!(loaded.deletes.len(), 1, "the tombstone's mark stays");
    let stored = loaded
        .tables
        .iter()
        .find(|t| &*t.name == "t")
        .expect("the table");
    assert_eq!(
        stored.slices.first().map(|s| s.acked),
        Some(2),
        "the store keeps the acknowledged offset a restart replays from"
    );
}
