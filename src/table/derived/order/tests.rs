//! A `latest` over a table on which nothing was saved, restored from its topic, against the view
//! fed every change: the input's offsets do not follow the order of its changes across
//! partitions, so taking the rows by offset alone gets groups wrong.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::reconcile::tests::{content, input_after, start, whole, written};
use super::super::tests::{commit, row, rows_of, Change, Rng};
use super::place::latest_order;
use crate::cdc::decode::Row;
use crate::table::derived::Views;
use crate::table::state::{TableState, Tables};
use crate::table::viewlog::Commit;
use crate::views::{ViewDef, ViewsFile};

const LATEST: &str = r#"
[views.last]
from = "scores"
[views.last.group_by]
by = ["team"]
aggregates = { score = "latest(score)", note = "latest(note)", n = "count()" }
"#;

fn defs() -> Vec<ViewDef> {
    ViewsFile::parse(LATEST).unwrap().views
}

/// `n` batches of 1 to 3 changes over 12 keys (key `pK` in partition `K % 3`), each partition
/// counting its own offsets from its own base (partition 1 far ahead): rows move between two
/// teams, `note` is NULL in a third, some changes are deletes.
pub(in crate::table::derived) fn batches(seed: u64, n: usize) -> Vec<Vec<Change>> {
    let mut rng = Rng(seed);
    let mut next = [0i64, 500, 40];
    (0..n)
        .map(|_| {
            (0..1 + rng.below(3))
                .map(|_| {
                    let k = rng.below(12);
                    let part = (k % 3) as u32;
                    let off = next[part as usize];
                    next[part as usize] += 1;
                    let r = (rng.below(6) > 0).then(|| {
                        let team = if rng.below(3) == 0 { "b" } else { "a" };
                        let note = match rng.below(3) {
                            0 => Value::Null,
                            _ => json!(format!("n{}", rng.below(50))),
                        };
                        row(json!({"team": team, "score": rng.below(20) as i64, "note": note}))
                    });
                    (format!("p{k}"), r, part, off)
                })
                .collect()
        })
        .collect()
}

fn last(tables: &crate::table::state::Tables) -> BTreeMap<String, Row> {
    rows_of(tables, "last")
}

#[test]
fn a_latest_restored_from_its_topic_keeps_each_groups_latest() {
    let defs = defs();
    let mut by_offset_wrong = 0;
    for seed in [0x1a7e_5eed_u64, 0x2b0c_91f3, 0x3c4d_77a1] {
        let all = batches(seed, 90);
        for cut in [15, 30, 45, 60, 75, 90] {
            let (fed, commits) = written(&defs, &all[..cut]);
            let want = last(&fed);
            let input = input_after(&defs, &all, cut);
            let logs = whole(&commits);
            let (t, r) = start(&defs, Some(input.clone()), Some(&logs));
            assert_eq!(last(&t), want, "seed {seed:#x}, after {cut} batches");
            assert_eq!(
                r.metrics
                    .view_log_restores
                    .with_label_values(&["last"])
                    .get(),
                1
            );
            // the same start without the topic takes the rows by offset
            let (plain, _) = start(&defs, Some(input), None);
            if last(&plain) != want {
                by_offset_wrong += 1;
            }
        }
    }
    assert!(
        by_offset_wrong >= 6,
        "the inputs make offsets disagree with the order of changes ({by_offset_wrong} of 18)"
    );
}

#[test]
fn a_latest_behind_its_input_takes_the_changes_since_after_its_records() {
    let defs = defs();
    let mut by_offset_wrong = 0;
    for seed in (1..=12u64).map(|i| i * 0x9e37_79b9) {
        let all = batches(seed, 60);
        // changes the topic lacks (in flight at a kill -9), all in partition 0 (their order is
        // their offsets', below the other partitions'), of keys new to the groups, NULL in
        // `note`: each group's note still comes from a row the topic's records hold (a change of a group's latest row would
        // leave the order behind it unknown: offsets)
        let p0 = all.iter().flatten().filter(|c| c.2 == 0).map(|c| c.3).max();
        let since: Vec<Change> = (0..6)
            .map(|i| {
                let team = if i % 2 == 0 { "a" } else { "b" };
                let r = row(json!({"team": team, "score": 100 + i, "note": null}));
                (format!("q{}", i % 4), Some(r), 0, p0.unwrap() + 1 + i)
            })
            .collect();
        let mut with_since = all.clone();
        with_since.push(since);
        let (fed, _) = written(&defs, &with_since);
        let (_, commits) = written(&defs, &all);
        let logs = whole(&commits);
        let input = input_after(&defs, &with_since, with_since.len());
        let (t, _) = start(&defs, Some(input.clone()), Some(&logs));
        assert_eq!(last(&t), last(&fed), "seed {seed:#x}");
        let (plain, _) = start(&defs, Some(input), None);
        if last(&plain) != last(&fed) {
            by_offset_wrong += 1;
        }
    }
    assert!(by_offset_wrong >= 1, "offsets alone get a group wrong");
}

/// A [`Views::tick`] a minute from now: past the throttle of a placement of these few rows
/// (ten times its cost), before the records expire.
pub(in crate::table::derived) fn tick(views: &Views) {
    views.tick_at(Instant::now() + Duration::from_secs(60));
}

/// Commits `input`'s rows to the input table of `tables` in updates of 4 rows, by key (an empty
/// node restoring the table from its changelog while the views run).
pub(in crate::table::derived) fn restore_in_chunks(
    tables: &Tables,
    views: &Views,
    input: &TableState,
) {
    let mut rows: Vec<Change> = input
        .rows
        .iter()
        .map(|(k, e)| (k.clone(), Some(e.row.clone()), e.part, e.off))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    for chunk in rows.chunks(4) {
        commit(tables, views, chunk);
    }
}

/// Makes `views` write their topics to a queue; returns its receiving end.
pub(in crate::table::derived) fn writing(views: &Views) -> Receiver<Commit> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Commit>(100_000);
    views.set_log(tx);
    for (_, flags, _) in views.log_views() {
        flags.writes.store(true, Ordering::Release);
    }
    rx
}

#[test]
fn a_latest_restored_before_its_input_places_the_rows_as_they_come() {
    let defs = defs();
    let all = batches(0x5e1f_3377, 70);
    let (fed, commits) = written(&defs, &all);
    let logs = whole(&commits);
    // an input restored after the views started, in updates of 4 rows each (an empty data
    // directory: the table from its changelog); then idle
    let (t, r) = start(&defs, None, Some(&logs));
    let sent = writing(&r.views);
    restore_in_chunks(&t, &r.views, &input_after(&defs, &all, all.len()));
    tick(&r.views);
    assert_eq!(last(&t), last(&fed), "restored with the input");
    assert_eq!(
        sent.try_iter().filter(|c| &*c.view == "last").count(),
        0,
        "not written over its records while it holds them"
    );
}

#[test]
fn a_latest_whose_input_reads_again_what_its_topic_holds_places_it_by_the_topic() {
    let defs = defs();
    let all = batches(0x6a2b_9e01, 70);
    let (_, commits) = written(&defs, &all[..50]);
    let logs = whole(&commits);
    let at = |n: usize| last(&written(&defs, &all[..n]).0);
    // the input at 40 of the topic's 50 batches, reading them again one at a time: a clean stop
    // meanwhile saves nothing of the view, and nothing is written to its topic
    let (t, r) = start(&defs, Some(input_after(&defs, &all, 40)), Some(&logs));
    let sent = writing(&r.views);
    for b in &all[40..45] {
        commit(&t, &*r.views, b);
    }
    let saved: Vec<String> = r.views.save().into_iter().map(|(n, _)| n).collect();
    assert!(!saved.contains(&"last".to_string()), "{saved:?}");
    assert_eq!(sent.try_iter().filter(|c| &*c.view == "last").count(), 0);
    let flags = r.views.log_views();
    let dirty = &flags.iter().find(|(n, _, _)| n == "last").unwrap().1.dirty;
    // (a commit the view could not send marked it too)
    dirty.store(false, Ordering::Release);
    // a kill -9 there: the topic still holds what it did, and the next start goes on from it
    let (t2, r2) = start(
        &defs,
        Some(t.get("scores").unwrap().read().clone()),
        Some(&logs),
    );
    for (t, r) in [(&t, &r), (&t2, &r2)] {
        for b in &all[45..50] {
            commit(t, &*r.views, b);
        }
        assert_eq!(
            last(t),
            at(50),
            "placed by the topic once the input reached it"
        );
        for b in &all[50..] {
            commit(t, &*r.views, b);
        }
        assert_eq!(last(t), at(70), "then every change as it comes");
    }
    assert!(
        dirty.load(Ordering::Acquire),
        "written whole once it no longer holds the records"
    );
    let saved: Vec<String> = r.views.save().into_iter().map(|(n, _)| n).collect();
    assert!(saved.contains(&"last".to_string()), "{saved:?}");
}

#[test]
fn the_order_of_a_group_follows_what_its_latest_columns_show() {
    let cols = [("score", "score"), ("note", "note")];
    let r = |v: Value| v.as_object().cloned().unwrap();
    let record = r(json!({"score": 5, "note": "x"}));
    let (newest, note_giver, older, conflicting) = (
        r(json!({"score": 5, "note": null})),
        r(json!({"score": 2, "note": "x"})),
        r(json!({"score": 1, "note": null})),
        r(json!({"score": 9, "note": "y"})),
    );
    // given oldest offset first: offsets disagree with the order taken
    let rows = vec![
        ("newest", &newest),
        ("conflicting", &conflicting),
        ("note_giver", &note_giver),
        ("older", &older),
    ];
    assert_eq!(
        latest_order(&cols, &record, rows),
        vec!["conflicting", "older", "note_giver", "newest"]
    );
    // a record with NULL in every `latest` column says nothing: offsets
    let none = r(json!({"score": null, "note": null}));
    let rows = vec![("a", &newest), ("b", &older)];
    assert_eq!(latest_order(&cols, &none, rows), vec!["a", "b"]);
}

/// The view fed `batches(seed, 40)`: its rows, its topic, the input, and the input's rows as
/// they are with its positions one below the records' (a last write that changed no row, e.g.
/// the tombstone after a delete, is still to come: a start from it keeps the records).
fn one_below(seed: u64) -> (Arc<Tables>, Vec<Commit>, TableState, TableState) {
    let all = batches(seed, 40);
    let (fed, commits) = written(&defs(), &all);
    let input = input_after(&defs(), &all, all.len());
    let mut behind = input.clone();
    for s in behind.slices.iter_mut() {
        s.last_off -= 1;
    }
    (fed, commits, input, behind)
}

#[test]
fn a_latest_whose_input_reaches_its_records_without_an_update_drops_them_at_the_next_tick() {
    let defs = defs();
    let (fed, commits, input, behind) = one_below(0x7b3c_0a11);
    let logs = whole(&commits);
    let (t, r) = start(&defs, Some(behind), Some(&logs));
    let sent = writing(&r.views);
    assert_eq!(last(&t), last(&fed));
    assert_eq!(
        sent.try_iter().count(),
        0,
        "not written while it keeps the records"
    );
    assert!(
        r.views.save().iter().all(|(n, _)| n != "last"),
        "records kept"
    );
    // the input reaches them with writes that change nothing (no update is published)
    t.get("scores").unwrap().update_slices(|s| {
        for (p, slice) in s.slices.iter_mut().enumerate() {
            slice.last_off = input.slices[p].last_off;
        }
    });
    r.views.tick();
    assert!(
        r.views.save().iter().any(|(n, _)| n == "last"),
        "records dropped"
    );
    assert_eq!(last(&t), last(&fed));
    let flags = r.views.log_views();
    assert!(flags
        .iter()
        .any(|(n, f, _)| n == "last" && f.dirty.load(Ordering::Acquire)));
    drop(sent);
}

#[test]
fn records_kept_are_dropped_once_the_input_stops_moving_or_after_an_hour() {
    let defs = defs();
    let (_, commits, input, behind) = one_below(0x0e8f_1c2d);
    let logs = whole(&commits);
    let kept = |views: &Views| views.save().iter().all(|(n, _)| n != "last");
    let dirty = |views: &Views| {
        views
            .log_views()
            .iter()
            .any(|(n, f, _)| n == "last" && f.dirty.load(Ordering::Acquire))
    };
    let min = |m: u64| Duration::from_secs(60 * m);

    // an input that never moves: the no-move clock has not started, the hour has
    let (_, r) = start(&defs, Some(behind.clone()), Some(&logs));
    let read = Instant::now();
    r.views.tick_at(read + min(11));
    assert!(
        kept(&r.views),
        "the no-move clock starts at the input's first update"
    );
    r.views.tick_at(read + min(59));
    assert!(kept(&r.views) && !dirty(&r.views));
    r.views.tick_at(read + min(61));
    assert!(!kept(&r.views), "dropped an hour after the read");
    assert!(dirty(&r.views), "written whole once dropped");

    // an input that moves once, short of the records, then stops
    let (t, r) = start(&defs, Some(behind), Some(&logs));
    let p0 = input.slices[0].last_off;
    let one = row(json!({"team": "a", "score": 3, "note": null}));
    commit(&t, &*r.views, &[("p0".into(), Some(one), 0, p0)]);
    let moved = Instant::now();
    r.views.tick_at(moved + min(9));
    assert!(kept(&r.views), "the input moved 9 minutes ago");
    r.views.tick_at(moved + min(11));
    assert!(
        !kept(&r.views),
        "dropped 10 minutes after the input last moved"
    );
    assert!(dirty(&r.views));
}

#[test]
fn a_latest_whose_topic_was_not_read_at_start_is_placed_by_it_at_the_take_over() {
    let defs = defs();
    let down = |_: &str, _: &str| Err("the broker does not answer".to_string());
    let mut by_offset_wrong = 0;
    for seed in [0x1a7e_5eed_u64, 0x2b0c_91f3, 0x3c4d_77a1] {
        let all = batches(seed, 60);
        let (fed, commits) = written(&defs, &all);
        let (t, r) = start(
            &defs,
            Some(input_after(&defs, &all, all.len())),
            Some(&down),
        );
        if last(&t) != last(&fed) {
            by_offset_wrong += 1;
        }
        let saved = |views: &Views| views.save().iter().any(|(n, _)| n == "last");
        assert!(
            !saved(&r.views),
            "a clean stop saves nothing the topic would not give"
        );
        // this node takes the topic over and reads it, before its whole rewrite
        r.views
            .restore_unread("last", &content(&commits, "last", usize::MAX));
        assert_eq!(last(&t), last(&fed), "seed {seed:#x}");
        assert!(saved(&r.views) && r.views.log_snapshot("last").is_some());
        let restores = r.metrics.view_log_restores.with_label_values(&["last"]);
        assert_eq!(restores.get(), 1);
        // once only: a later take-over's read changes nothing
        r.views
            .restore_unread("last", &content(&commits, "last", 3));
        assert_eq!((last(&t), restores.get()), (last(&fed), 1));
    }
    assert!(by_offset_wrong >= 1, "offsets alone get a group wrong");
}
