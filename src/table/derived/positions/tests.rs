use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{HeldMarks, Resets, Upto};
use crate::table::state::TableState;
use crate::table::viewlog::Mark;

fn mark(epoch: &str, upto: &[(u32, i64)]) -> Arc<Mark> {
    Arc::new(Mark {
        input: Some(format!("{epoch}#7")),
        upto: upto.to_vec(),
        ..Mark::default()
    })
}

#[test]
fn positions_only_rise_and_another_lineage_starts_them_again() {
    let (e1, e2): (Arc<str>, Arc<str>) = ("e1".into(), "e2".into());
    let mut u = Upto::default();
    assert_eq!(u.epoch(), None);
    u.pass(&e1, 0, 10);
    u.pass(&e1, 0, 4);
    u.pass(&e1, 2, 3);
    assert_eq!(u.of("e1"), vec![(0, 10), (2, 3)]);
    assert_eq!(
        u.of("e2"),
        vec![],
        "another lineage's positions are not these"
    );
    u.pass(&e2, 1, 1);
    assert_eq!((u.epoch(), u.of("e2")), (Some("e2"), vec![(1, 1)]));
    u.forget(&HashSet::from([1]));
    assert_eq!(u.get(1), None);
}

#[test]
fn the_input_raises_positions_or_sets_them() {
    let mut t = TableState::new("scores", "e1", "game.scores", 2);
    t.slice_mut(0).last_off = 5;
    let mut u = Upto::default();
    u.pass(&"e1".into(), 0, 9);
    u.pass_input(&t);
    assert_eq!(
        u.of("e1"),
        vec![(0, 9)],
        "a view ahead of its input stays ahead"
    );
    u.set_to_input(&t);
    assert_eq!(
        u.of("e1"),
        vec![(0, 5)],
        "a recomputation holds exactly the input"
    );
}

#[test]
fn restarts_are_compared_per_partition_when_partitions_are_added() {
    let mut t = TableState::new("scores", "e1", "game.scores", 2);
    let mut r = Resets::default();
    assert!(r.look(&t).is_empty(), "the first look sees no restart");
    t.slice_mut(1).resets += 1;
    t.slice_mut(2);
    assert_eq!(r.since(&t), HashSet::from([1]));
    assert_eq!(r.look(&t), HashSet::from([1]));
    assert!(r.look(&t).is_empty(), "looked at: not again");
}

#[test]
fn held_marks_are_reached_per_lineage_partitions_that_restarted_aside() {
    let mut held = HeldMarks::new(HashMap::from([
        ("a".to_string(), mark("e1", &[(0, 10), (1, 4)])),
        ("b".to_string(), mark("e1", &[(0, 7), (1, 9)])),
    ]));
    assert_eq!(held.upto("b", "e1", 1), Some(9));
    assert_eq!(held.upto("b", "e2", 1), None, "another lineage");
    assert_eq!(held.upto("c", "e1", 1), None, "no record");
    let at = |a: i64, b: i64| move |p: u32| Some(if p == 0 { a } else { b });
    assert_eq!(held.reached("e1", at(10, 8)), Some(false));
    assert_eq!(held.reached("e1", at(10, 9)), Some(true));
    assert_eq!(
        held.reached("e2", at(0, 0)),
        None,
        "no mark of that lineage"
    );
    held.restarted(&HashSet::from([1]));
    assert!(held.is_reset(1));
    assert_eq!(
        held.upto("b", "e1", 1),
        None,
        "the marks say nothing of it now"
    );
    assert_eq!(held.reached("e1", at(10, 0)), Some(true));
}
