//! A keyed `delta` whose input's updates do not follow on, against the view fed every change.

use std::sync::Arc;

use serde_json::{json, Value};

use super::super::order::tests::{batches, restore_in_chunks, tick};
use super::super::reconcile::tests::{content, input_after, start, whole, written};
use super::super::tests::{commit, row, rows_of, run, Change, Rng};
use crate::table::state::{NoSink, TableState, Tables};
use crate::views::ViewsFile;

const MOVES: &str = r#"
[views.mv]
from = "scores"
delta = { columns = ["score"], key = ["team"] }
"#;

/// Views `defs` over an input table of `parts` partitions.
fn views_over(
    parts: u32,
    defs: &[crate::views::ViewDef],
) -> (Arc<Tables>, super::super::tests::Run) {
    let t = Arc::new(Tables::default());
    t.ensure("scores", "e1", "game.scores", parts);
    let r = run(defs, &t, &Default::default());
    (t, r)
}

/// Replaces the input table by a copy of itself with a later update number: its next update
/// does not follow on (as after a restore or a slice handed over).
fn replace(tables: &Tables) {
    let mut state: TableState = tables.get("scores").unwrap().read().clone();
    state.useq += 7;
    tables.insert(state);
}

#[test]
fn a_keyed_delta_keeps_each_rows_movement_when_its_input_does_not_follow_on() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let ((fed_t, fed), (gap_t, gapped)) = (views_over(3, &defs), views_over(3, &defs));
    let mut rng = Rng(0x0dd5_eed5);
    let mut next = [0i64, 300, 40];
    let mut change = |rng: &mut Rng, k: u64, delete: bool| -> Change {
        let part = (k % 3) as u32;
        let off = next[part as usize];
        next[part as usize] += 1;
        let team = ["a", "b", "c"][rng.below(3) as usize];
        let r = (!delete).then(|| row(json!({"team": team, "score": rng.below(40) as i64})));
        (format!("p{k:02}"), r, part, off)
    };
    let (mut gaps, mut kept) = (0, 0);
    for round in 0..60 {
        if rng.below(3) > 0 {
            let batch: Vec<Change> = (0..1 + rng.below(3))
                .map(|_| {
                    let k = rng.below(12);
                    let delete = rng.below(6) == 0;
                    change(&mut rng, k, delete)
                })
                .collect();
            commit(&fed_t, &*fed.views, &batch);
            commit(&gap_t, &*gapped.views, &batch);
        } else {
            // changes the view does not see, in one partition, each key once (so their order is
            // their offsets' and each movement is one step), then the input replaced and a change
            // of another key of that partition
            let part = rng.below(3);
            let mut keys: Vec<u64> = (0..4).map(|i| part + 3 * i).collect();
            let trigger = keys.remove(rng.below(4) as usize);
            let keys: Vec<u64> = keys.into_iter().filter(|_| rng.below(3) > 0).collect();
            for k in keys {
                let delete = rng.below(5) == 0;
                let c = change(&mut rng, k, delete);
                commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
                commit(&gap_t, &NoSink, &[c]);
            }
            replace(&gap_t);
            let c = change(&mut rng, trigger, false);
            commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
            commit(&gap_t, &*gapped.views, &[c]);
            gaps += 1;
        }
        let want = rows_of(&fed_t, "mv");
        assert_eq!(rows_of(&gap_t, "mv"), want, "round {round}");
        kept += want
            .values()
            .filter(|r| !r["score_change"].is_null())
            .count();
    }
    let rebuilds = gapped
        .metrics
        .view_rebuilds
        .with_label_values(&["mv"])
        .get();
    assert!(
        gaps >= 10 && rebuilds > gaps,
        "{gaps} gaps, {rebuilds} recomputations"
    );
    assert!(kept > 60, "movements were there to keep ({kept})");
}

#[test]
fn a_keyed_delta_restored_from_its_topic_shows_each_keys_row_and_movement() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let (mut plain_wrong, mut moving) = (0, 0);
    for seed in [0x51de_0001_u64, 0x51de_0002, 0x51de_0003] {
        let all = batches(seed, 60);
        // changes the topic lacks (in flight at a kill -9): new keys, in one partition
        let p0 = all.iter().flatten().filter(|c| c.2 == 0).map(|c| c.3).max();
        let since: Vec<Change> = (0..3)
            .map(|i| {
                let team = ["a", "b", "a"][i as usize];
                let r = row(json!({"team": team, "score": 100 + i}));
                (format!("q{i}"), Some(r), 0, p0.unwrap() + 1 + i)
            })
            .collect();
        for cut in [20, 40, 60] {
            let (_, commits) = written(&defs, &all[..cut]);
            let logs = whole(&commits);
            for extra in [false, true] {
                let mut input_batches = all[..cut].to_vec();
                if extra {
                    input_batches.push(since.clone());
                }
                let (fed, _) = written(&defs, &input_batches);
                let want = rows_of(&fed, "mv");
                moving += want
                    .values()
                    .filter(|r| !r["score_change"].is_null())
                    .count();
                let input = input_after(&defs, &input_batches, input_batches.len());
                let (t, _) = start(&defs, Some(input.clone()), Some(&logs));
                assert_eq!(
                    rows_of(&t, "mv"),
                    want,
                    "seed {seed:#x}, {cut} batches, {extra}"
                );
                let (plain, _) = start(&defs, Some(input), None);
                if rows_of(&plain, "mv") != want {
                    plain_wrong += 1;
                }
            }
        }
    }
    assert!(moving >= 12, "rows with a movement to keep ({moving})");
    assert!(
        plain_wrong >= 12,
        "without the topic the movements go ({plain_wrong} of 18)"
    );
}

#[test]
fn a_keyed_delta_restored_before_its_input_places_its_rows_as_they_come() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let all = batches(0x51de_0777, 60);
    let (fed, commits) = written(&defs, &all);
    let logs = whole(&commits);
    // an empty data directory: the input restored from its changelog in updates of 4 rows
    let (t, r) = start(&defs, None, Some(&logs));
    restore_in_chunks(&t, &r.views, &input_after(&defs, &all, all.len()));
    tick(&r.views);
    let want = rows_of(&fed, "mv");
    assert!(want.values().any(|r| !r["score_change"].is_null()));
    assert_eq!(rows_of(&t, "mv"), want);
}

#[test]
fn a_row_deleted_and_put_back_with_its_values_while_not_followed_becomes_its_keys_latest() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let ((fed_t, fed), (gap_t, gapped)) = (views_over(2, &defs), views_over(2, &defs));
    let r = |team: &str, score: i64| Some(row(json!({"team": team, "score": score})));
    let seen: Vec<Change> = vec![
        ("p1".into(), r("a", 10), 0, 0),
        ("p1".into(), r("a", 12), 0, 1),
        ("p2".into(), r("a", 20), 1, 0),
    ];
    for c in &seen {
        commit(&fed_t, &*fed.views, std::slice::from_ref(c));
        commit(&gap_t, &*gapped.views, std::slice::from_ref(c));
    }
    assert_eq!(rows_of(&gap_t, "mv")["a"]["score"], json!(20));
    // p1 deleted and put back with the values it had, past the view
    for c in [("p1".into(), None, 0, 2), ("p1".into(), r("a", 12), 0, 3)] {
        commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
        commit(&gap_t, &NoSink, &[c]);
    }
    replace(&gap_t);
    let c: Change = ("p3".into(), r("b", 1), 0, 4);
    commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
    commit(&gap_t, &*gapped.views, &[c]);
    let want = rows_of(&fed_t, "mv");
    assert_eq!(want["a"]["score"], json!(12), "p1 is team a's latest again");
    let have = rows_of(&gap_t, "mv");
    assert_eq!(
        have["a"]["score"],
        json!(12),
        "not taken as unchanged: {have:?}"
    );
    assert_eq!(have["b"], want["b"]);
    // the delete it did not see is not known: p1's movement spans the gap (12 -> 12 keeps the
    // last one), where the view fed every change started it again
    assert_eq!(have["a"]["score_change"], json!(2));
    assert_eq!(want["a"]["score_change"], Value::Null);
}

#[test]
fn a_row_changed_at_its_old_position_after_its_partition_restarted_is_taken() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let ((fed_t, fed), (gap_t, gapped)) = (views_over(2, &defs), views_over(2, &defs));
    let r = |team: &str, score: i64| Some(row(json!({"team": team, "score": score})));
    let seen: Vec<Change> = vec![
        ("p0".into(), r("a", 1), 0, 4),
        ("p1".into(), r("a", 10), 0, 5),
        ("p2".into(), r("a", 20), 1, 0),
    ];
    for c in &seen {
        commit(&fed_t, &*fed.views, std::slice::from_ref(c));
        commit(&gap_t, &*gapped.views, std::slice::from_ref(c));
    }
    // partition 0's topic created again while the view does not follow: its rows go to -1, and
    // p1 changes at the offset it had in the old topic
    let restart = |tables: &Tables| {
        let mut state: TableState = tables.get("scores").unwrap().read().clone();
        state.slice_mut(0).resets += 1;
        state.rows.set_offsets(0, -1);
        tables.insert(state);
    };
    restart(&fed_t);
    restart(&gap_t);
    let c: Change = ("p1".into(), r("a", 15), 0, 5);
    commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
    commit(&gap_t, &NoSink, &[c]);
    replace(&gap_t);
    let c: Change = ("p3".into(), r("b", 1), 1, 1);
    commit(&fed_t, &*fed.views, std::slice::from_ref(&c));
    commit(&gap_t, &*gapped.views, &[c]);
    let want = rows_of(&fed_t, "mv");
    assert_eq!(want["a"]["score"], json!(15));
    assert_eq!(rows_of(&gap_t, "mv"), want);
}

#[test]
fn a_keyed_delta_whose_topic_was_not_read_at_start_gets_its_movements_at_the_take_over() {
    let defs = ViewsFile::parse(MOVES).unwrap().views;
    let all = batches(0x4d2e_61b7, 60);
    let (fed, commits) = written(&defs, &all);
    let down = |_: &str, _: &str| Err("the broker does not answer".to_string());
    let (t, r) = start(
        &defs,
        Some(input_after(&defs, &all, all.len())),
        Some(&down),
    );
    let moves = |t: &Tables| rows_of(t, "mv");
    assert!(
        fed_has_movements(&moves(&fed)) && moves(&t) != moves(&fed),
        "started from the current rows: no movement"
    );
    r.views
        .restore_unread("mv", &content(&commits, "mv", usize::MAX));
    assert_eq!(
        moves(&t),
        moves(&fed),
        "placed by its topic at the take-over"
    );
}

fn fed_has_movements(rows: &std::collections::BTreeMap<String, crate::cdc::decode::Row>) -> bool {
    rows.values().any(|r| !r["score_change"].is_null())
}
