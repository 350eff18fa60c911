use std::sync::{Arc, Weak};

use serde_json::json;

use super::*;
use crate::cdc::decode::Op;
use crate::table::state::AppliedChange;

/// Update `useq` of one partition: `n` changes at offsets after `off`, each row `width` bytes.
fn update(useq: u64, off: &mut i64, n: usize, width: usize) -> Arc<HubUpdate> {
    let changes: Vec<AppliedChange> = (0..n)
        .map(|i| {
            *off += 1;
            let row = json!({"id": format!("k{i}"), "pad": "x".repeat(width)});
            AppliedChange {
                key: format!("k{i}"),
                op: Op::Update,
                row: row.as_object().cloned().map(|r| Arc::new(r).into()),
                before: None,
                part: 0,
                off: *off,
                ts_ms: None,
                kafka_ts_ms: None,
                polled: None,
            }
        })
        .collect();
    let mut pos = Position::new(1);
    pos.raise(0, *off);
    let update = TableUpdate {
        table: "t".into(),
        epoch: "e".into(),
        useq,
        seq: useq,
        pos,
        changes,
    };
    let token: Arc<str> = update.token().to_string().into();
    Arc::new(HubUpdate::new(update, None, token))
}

fn buffer() -> UpdateBuffer {
    UpdateBuffer::new(
        "e".into(),
        Mark {
            useq: 0,
            seq: 0,
            pos: Position::new(1),
        },
    )
}

fn token(off: i64) -> Token {
    let mut pos = Position::new(1);
    pos.raise(0, off);
    Token {
        epoch: "e".into(),
        pos,
    }
}

/// Pushes `u` as the hub does, its stamp its useq.
fn push(b: &mut UpdateBuffer, u: Arc<HubUpdate>, window_changes: usize) {
    let stamp = u.update.useq;
    b.push(u, stamp, window_changes);
}

/// What the hub's budget does to one buffer: drops its oldest updates while it holds more than
/// `bytes`; returns how many were unread.
fn trim(b: &mut UpdateBuffer, bytes: usize) -> u64 {
    let mut unread = 0;
    while b.bytes() > bytes {
        match b.drop_oldest() {
            Some(u) => unread += u64::from(u),
            None => break,
        }
    }
    unread
}

fn total(kept: &[Arc<HubUpdate>]) -> usize {
    kept.iter().map(|u| u.bytes).sum()
}

#[test]
fn the_window_holds_the_newest_changes_and_read_updates_outside_it_are_dropped() {
    let mut b = buffer();
    let mut off = 0;
    let mut sizes = Vec::new();
    for useq in 1..=5 {
        // nobody listens: each update is read by all as soon as it is sent
        let u = update(useq, &mut off, 2, 10);
        sizes.push(u.bytes);
        push(&mut b, u, 4);
    }
    // the window: the last two updates (4 changes); the rest, read by all, is gone
    assert_eq!(
        b.window().map(|u| u.update.useq).collect::<Vec<_>>(),
        [4, 5]
    );
    assert_eq!(b.bytes(), sizes[3] + sizes[4]);
    assert!(
        b.reaches(&token(6)),
        "offsets after 6 are all in the window"
    );
    assert!(!b.reaches(&token(5)), "offset 6 left the window");
    assert_eq!(b.last.useq, 5);
}

#[test]
fn updates_a_subscriber_has_not_read_are_kept_outside_the_window_until_it_reads_them() {
    let mut b = buffer();
    let mut off = 0;
    // a subscriber holds weak references to every update it was sent and has not read
    let mut unread: Vec<Weak<HubUpdate>> = Vec::new();
    let mut kept = Vec::new();
    for useq in 1..=4 {
        let u = update(useq, &mut off, 1, 100);
        unread.push(Arc::downgrade(&u));
        kept.push(u.clone());
        push(&mut b, u, 1);
    }
    assert_eq!(b.window().count(), 1, "the window is one change");
    assert_eq!(b.bytes(), total(&kept), "every unread update is kept");
    assert!(unread.iter().all(|w| w.upgrade().is_some()));
    // it reads them all; the next update drops every one outside the window
    drop(kept);
    unread.clear();
    let u = update(5, &mut off, 1, 100);
    let newest = u.bytes;
    push(&mut b, u, 1);
    assert_eq!(b.bytes(), newest);
}

#[test]
fn over_the_byte_budget_the_oldest_updates_go_read_or_not_and_the_window_shrinks() {
    let mut b = buffer();
    let mut off = 0;
    let probe = update(0, &mut 0, 10, 1000).bytes;
    // room for about three updates of ten ~1 KB rows
    let budget = probe * 3 + probe / 2;
    let mut unread: Vec<Weak<HubUpdate>> = Vec::new();
    let mut dropped = 0;
    for useq in 1..=20 {
        let u = update(useq, &mut off, 10, 1000);
        unread.push(Arc::downgrade(&u));
        push(&mut b, u, 1000);
        dropped += trim(&mut b, budget);
        assert!(b.bytes() <= budget, "{} > {budget}", b.bytes());
    }
    assert_eq!(
        dropped, 17,
        "the subscriber had read none of the 17 dropped"
    );
    let alive: Vec<bool> = unread.iter().map(|w| w.upgrade().is_some()).collect();
    assert_eq!(alive.iter().filter(|a| **a).count(), 3);
    assert!(alive[17..].iter().all(|a| *a), "the newest are kept");
    // the window shrank with them: a resume from before the kept updates is refused
    assert_eq!(b.window().count(), 3);
    assert!(b.reaches(&token(170)));
    assert!(!b.reaches(&token(169)));
}

#[test]
fn the_newest_update_is_kept_even_over_the_budget() {
    let mut b = buffer();
    let mut off = 0;
    let u = update(1, &mut off, 10, 1000);
    let bytes = u.bytes;
    push(&mut b, u, 1000);
    let u = update(2, &mut off, 10, 1000);
    push(&mut b, u, 1000);
    assert_eq!(trim(&mut b, 1000), 0, "nobody was sent them");
    assert_eq!(b.window().map(|u| u.update.useq).collect::<Vec<_>>(), [2]);
    assert!(b.bytes() > 1000 && b.bytes() < 2 * bytes);
    assert_eq!(b.oldest(), None, "the newest is not offered to the budget");
    assert_eq!(b.drop_oldest(), None);
}

#[test]
fn a_new_lineage_empties_the_buffer() {
    let mut b = buffer();
    let mut off = 0;
    push(&mut b, update(1, &mut off, 3, 10), 10);
    b.reset("f".into(), Position::new(1));
    assert_eq!(b.bytes(), 0);
    assert_eq!(b.window().count(), 0);
    assert!(!b.reaches(&token(3)), "another lineage");
}

#[test]
fn the_estimate_grows_with_the_rows() {
    let small = update(1, &mut 0, 10, 10).bytes;
    let large = update(1, &mut 0, 10, 10_000).bytes;
    assert!(large >= small + 10 * 9_990, "{small} -> {large}");
}

#[test]
fn rows_received_as_json_are_counted_by_their_json_without_being_parsed() {
    let row =
        StoredRow::from_json(format!(r#"{{"pad":"{}"}}"#, "x".repeat(10_000)).as_bytes()).unwrap();
    let change = AppliedChange {
        key: "k".into(),
        op: Op::Update,
        row: Some(row.clone()),
        before: None,
        part: 0,
        off: 1,
        ts_ms: None,
        kafka_ts_ms: None,
        polled: None,
    };
    let update = TableUpdate {
        table: "t".into(),
        epoch: "e".into(),
        useq: 1,
        seq: 1,
        pos: Position::new(1),
        changes: vec![change],
    };
    let unparsed = update_bytes(&update, None);
    assert!(unparsed >= 10_000, "{unparsed}");
    assert!(!row.is_parsed());
}
