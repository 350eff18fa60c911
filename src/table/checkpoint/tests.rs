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
use crate::table::state::{Delta, NoSink, RowWrite, Table};
use crate::table::store::{AckMeta, SliceMeta, TableMeta, WriteBatch};

/// Slice 0 of table `t` owned with `acked` 2, row `k` applied at 5 and the delete of `gone` at 6
/// in the outbox, a dead letter in the store, and a checkpointer against a broker that never
/// answers (nothing listens on its port: every delivery times out after 300 ms, retriably).
struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    t: Arc<Table>,
    letter: DeadLetter,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    checkpointer: Checkpointer,
}

fn setup(group: &str) -> Setup {
    setup_with(group, 300)
}

/// [`setup`] with deliveries that time out after `timeout_ms`.
fn setup_with(group: &str, timeout_ms: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // a port nothing listens on: every delivery times out (after 300 ms), retriably
    let mut config = Config::for_tests(
        "127.0.0.1:1",
        TopicSelection::Names(vec!["in".into()]),
        dir.path(),
        group,
    );
    config
        .kafka_props
        .push(("message.timeout.ms".into(), timeout_ms.to_string()));
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
        dead_letters_acked: Default::default(),
    };
    Setup {
        _dir: dir,
        store,
        t,
        letter,
        metrics,
        cancel,
        checkpointer,
    }
}

/// A checkpoint of `rows` and `letters` of slice 0 of `t`, acknowledging it up to `acked`, with
/// input partition `in`/0 next at `next`.
fn checkpoint(
    rows: Vec<PendingRow>,
    letters: Vec<PendingLetter>,
    next: i64,
    acked: i64,
) -> Checkpoint {
    Checkpoint {
        rows,
        letters,
        positions: [(("in".to_string(), 0), next)].into_iter().collect(),
        acked: vec![SliceAck {
            table: "t".into(),
            part: 0,
            acked,
            resets: 0,
        }],
        barrier: None,
    }
}

fn row(key: &str, off: i64, deleted: bool) -> PendingRow {
    PendingRow {
        table: "t".into(),
        part: 0,
        key: key.into(),
        off,
        deleted,
        delivery: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_retrying_records_no_acknowledgement_and_keeps_the_outbox() {
    let Setup {
        _dir,
        store,
        t,
        letter,
        metrics,
        cancel,
        checkpointer,
    } = setup("cp-cancel");
    let (tx, rx) = mpsc::channel(4);
    tx.send(checkpoint(
        vec![row("k", 5, false), row("gone", 6, true)],
        vec![PendingLetter {
            id: 1,
            letter: letter.clone(),
            delivery: None,
            generation: 0,
        }],
        7,
        6,
    ))
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

/// A revoke that timed out during an outage made the slice a followed one while its records
/// waited: they are not produced (not this node's any more), and the slice's acknowledged offset
/// does not pass them, so if this node takes it back they are produced again (its outbox:
/// rows above `acked`, the tombstone's mark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_not_produced_after_the_slice_was_let_go_stay_in_the_outbox() {
    let Setup {
        _dir,
        store,
        t,
        checkpointer,
        ..
    } = setup("cp-let-go");
    t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Followed);
    let (tx, rx) = mpsc::channel(4);
    tx.send(checkpoint(
        vec![row("k", 5, false), row("gone", 6, true)],
        Vec::new(),
        7,
        6,
    ))
    .await
    .unwrap();
    // the next batch's checkpoint acknowledges the slice again, with no record of its own (an
    // unchanged write): it must not pass the records of the one before
    tx.send(checkpoint(Vec::new(), Vec::new(), 9, 8))
        .await
        .unwrap();
    drop(tx);
    tokio::time::timeout(Duration::from_secs(20), checkpointer.run(rx))
        .await
        .expect("settles without a broker: the records are not this node's to produce")
        .unwrap();
    let slice = t.read().slice(0).cloned().expect("slice");
    assert_eq!(slice.acked, 2, "not raised past the records not produced");
    assert_eq!(slice.tombs.get("gone"), Some(&6), "the tombstone stays due");
    let loaded = store.load().unwrap();
    assert_eq!(loaded.deletes.len(), 1, "the tombstone's mark stays");
    let keys = crate::table::repair::slice_keys(&t.read(), 0, false);
    assert!(
        keys.iter().any(|k| k.0 == "k") && keys.iter().any(|k| k.0 == "gone"),
        "a take-back produces both again: {keys:?}"
    );
}

#[test]
fn only_what_no_cluster_setting_can_mend_is_refused_for_good() {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    let produce = |c| KafkaError::MessageProduction(c);
    assert!(is_permanent(&produce(C::MessageSizeTooLarge)));
    assert!(is_permanent(&produce(C::InvalidRecord)));
    for retried in [
        C::TopicAuthorizationFailed,
        C::ClusterAuthorizationFailed,
        C::PolicyViolation,
        C::InvalidTopic,
        C::InvalidRequiredAcks,
        C::RequestTimedOut,
    ] {
        assert!(!is_permanent(&produce(retried)), "{retried:?}");
    }
}

/// A shutdown while a delivery waits on a broker that is down leaves the record in the outbox
/// within a few seconds, not after the message timeout (here 60 s; 30 s by default, past the
/// shutdown grace, which made the stop an unclean one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_out_a_delivery_to_a_broker_that_is_down() {
    let Setup {
        _dir,
        store,
        t,
        cancel,
        checkpointer,
        ..
    } = setup_with("cp-shutdown", 60_000);
    let (tx, rx) = mpsc::channel(8);
    // several checkpoints queued: the stop waits once, not once per checkpoint
    for off in [5, 7, 9, 11] {
        tx.send(checkpoint(
            vec![row("k", off, false), row("gone", 6, true)],
            Vec::new(),
            off + 2,
            off + 1,
        ))
        .await
        .unwrap();
    }
    drop(tx);
    let run = tokio::spawn(checkpointer.run(rx));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "waiting for the delivery");
    let stopped = std::time::Instant::now();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("ends within the shutdown's wait, not the message timeout")
        .unwrap()
        .unwrap();
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "within the 10 s grace with 4 checkpoints queued: {took:?}"
    );
    assert_eq!(
        t.read().slice(0).map(|s| s.acked),
        Some(2),
        "nothing acknowledged"
    );
    assert_eq!(
        store.load().unwrap().deletes.len(),
        1,
        "the tombstone's mark stays"
    );
}
