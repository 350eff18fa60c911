use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast;

use super::super::{BufferLimits, Hub, Sent};
use crate::cdc::decode::Op;
use crate::metrics::Metrics;
use crate::table::state::{Delta, RowWrite, SliceMode, Tables};

/// Rows of about 10 KB: an update is about 20 KB to the estimate (the row and its frame), so a
/// budget of 200,000 bytes holds nine.
const PAD: usize = 10_000;

struct Fixture {
    tables: Arc<Tables>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    off: i64,
}

impl Fixture {
    /// Tables `a` and `b` (one partition each) and a hub with a one-change replay window and a
    /// budget of `bytes` for both.
    fn new(bytes: usize) -> Self {
        let tables = Arc::new(Tables::default());
        let metrics = Arc::new(Metrics::new());
        let limits = BufferLimits { changes: 1, bytes };
        let hub = Arc::new(Hub::new(tables.clone(), metrics.clone(), limits, 1024));
        for t in ["a", "b"] {
            tables
                .ensure(t, "e1", t, 1)
                .update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
            hub.open(t);
        }
        Fixture {
            tables,
            hub,
            metrics,
            // offsets of two digits: every update has the same estimate
            off: 10,
        }
    }

    /// One update of `table`: a new ~10 KB row.
    fn commit(&mut self, table: &str) {
        let t = self.tables.get(table).expect("table");
        let mut d = Delta::new(t);
        self.off += 1;
        assert!(self.off < 100, "offsets of two digits");
        let key = format!("k{}", self.off);
        let row = json!({"id": key, "pad": "x".repeat(PAD)});
        d.stage(RowWrite {
            key,
            row: row.as_object().cloned().map(|r| Arc::new(r).into()),
            op: Op::Update,
            part: 0,
            off: self.off,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        });
        self.tables.commit(d, &*self.hub);
    }

    /// `livetable_fanout_buffer_bytes` of `table`.
    fn held(&self, table: &str) -> usize {
        let g = self.metrics.fanout_buffer_bytes.with_label_values(&[table]);
        usize::try_from(g.get()).expect("bytes")
    }

    /// A subscriber of every update of `table` that reads none.
    fn stalled(&self, table: &str) -> broadcast::Receiver<Sent> {
        self.hub.updates(table).expect("table")
    }
}

/// How many of the updates a receiver was sent are still there to read.
fn readable(rx: &mut broadcast::Receiver<Sent>) -> (usize, usize) {
    let (mut kept, mut dropped) = (0, 0);
    while let Ok(s) = rx.try_recv() {
        match s.take() {
            Ok(_) => kept += 1,
            Err(_) => dropped += 1,
        }
    }
    (kept, dropped)
}

#[test]
fn all_tables_together_hold_at_most_the_budget_and_the_oldest_updates_go_first() {
    let budget = 200_000;
    let mut f = Fixture::new(budget);
    let (mut ra, mut rb) = (f.stalled("a"), f.stalled("b"));
    for _ in 0..6 {
        f.commit("a");
    }
    let one = f.held("a") / 6;
    assert!(
        one > 2 * PAD && 9 * one < budget,
        "one update is {one} bytes"
    );
    assert_eq!(f.hub.budget.used(), 6 * one, "a alone is within the budget");
    // b's updates push the process over: a's, the oldest, go first, down to its newest
    for _ in 0..8 {
        f.commit("b");
        let used = f.hub.budget.used();
        assert_eq!(used, f.held("a") + f.held("b"), "the gauges add up");
        assert!(used <= budget, "{used} > {budget}");
    }
    assert_eq!((f.held("a"), f.held("b")), (one, 8 * one));
    assert_eq!(f.metrics.fanout_buffer_evictions.get(), 5);
    // then b's own oldest go, never a's newest (updates counted: b's seq now has two digits)
    for _ in 0..5 {
        f.commit("b");
    }
    assert_eq!((f.held("a") / one, f.held("b") / one), (1, 8));
    assert_eq!(f.metrics.fanout_buffer_evictions.get(), 10);
    assert_eq!(
        readable(&mut ra),
        (1, 5),
        "a's stalled reader finds 5 dropped"
    );
    assert_eq!(readable(&mut rb), (8, 5));
}

#[test]
fn a_publisher_passes_over_a_busy_table_and_a_later_one_catches_up() {
    let budget = 200_000;
    let mut f = Fixture::new(budget);
    let (mut ra, mut rb) = (f.stalled("a"), f.stalled("b"));
    for _ in 0..4 {
        f.commit("b");
    }
    for _ in 0..5 {
        f.commit("a");
    }
    let one = f.held("b") / 4;
    assert_eq!(f.hub.budget.used(), 9 * one, "nine updates fit");
    // b's buffer is held elsewhere (a subscriber composing its resume, say) while a publishes:
    // b holds the oldest updates, but a's publisher must not wait for it
    let b = f.hub.channel("b").expect("b");
    let busy = b.buffer.lock().expect("lock");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (hub, tables, metrics, off) = (f.hub.clone(), f.tables.clone(), f.metrics.clone(), f.off);
    let publisher = std::thread::spawn(move || {
        let mut g = Fixture {
            tables,
            hub,
            metrics,
            off,
        };
        for _ in 0..2 {
            g.commit("a");
        }
        let _ = done_tx.send(g.off);
    });
    let off = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the publisher of a waited for b's buffer");
    publisher.join().expect("publisher");
    drop(busy);
    f.off = off;
    // only a could be trimmed: its own two oldest went
    assert!(f.hub.budget.used() <= budget);
    assert_eq!((f.held("a"), f.held("b")), (5 * one, 4 * one));
    // the next publish finds b free: b's oldest, the oldest of all, goes
    f.commit("a");
    assert!(f.hub.budget.used() <= budget);
    assert_eq!((f.held("a"), f.held("b")), (6 * one, 3 * one));
    assert_eq!(f.metrics.fanout_buffer_evictions.get(), 3);
    assert_eq!(readable(&mut ra), (6, 2));
    assert_eq!(readable(&mut rb), (3, 1));
}
