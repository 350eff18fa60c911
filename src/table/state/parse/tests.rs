use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::fanout::selector::Selector;
use crate::fanout::snapshot::{copy_of, NeedsParse, SnapshotCopy};
use crate::table::state::test_tables::{arriving_during_a_pass, loaded};
use crate::table::state::{Table, Tables};

fn parsed(t: &Table) -> usize {
    t.read().rows.values().filter(|e| e.row.is_parsed()).count()
}

fn scan() -> Selector {
    // `<>` has no equality: not indexed, a scan
    Selector::build(None, Some("league <> 'nba'"), None).unwrap()
}

fn keys(copy: &SnapshotCopy, sel: &Selector) -> Vec<String> {
    copy.selected(sel).map(|(k, _)| k.to_string()).collect()
}

#[test]
fn a_scan_over_rows_held_as_json_gives_up_under_the_lock() {
    let tables = Tables::default();
    let t = loaded(&tables, 30);
    assert_eq!(
        SnapshotCopy::try_take(&t.read(), &scan()).err(),
        Some(NeedsParse)
    );
    assert_eq!(parsed(&t), 0, "nothing parsed by the try");
    // nothing to parse for: no filter, keys (filtered after the copy)
    let whole = SnapshotCopy::try_take(&t.read(), &Selector::default()).unwrap();
    assert_eq!(whole.selected(&Selector::default()).count(), 30);
    let sel = Selector::build(
        Some(HashSet::from(["k3".to_string(), "k4".to_string()])),
        Some("league <> 'nba'"),
        None,
    )
    .unwrap();
    assert_eq!(parsed(&t), 0);
    let copy = SnapshotCopy::try_take(&t.read(), &sel).unwrap();
    assert_eq!(keys(&copy, &sel), ["k3"]);
}

#[test]
fn a_scan_parses_outside_the_lock_once_and_selects_what_a_parse_under_it_does() {
    let tables = Tables::default();
    let t = loaded(&tables, 3_000);
    let sel = scan();
    let (copy, _) = copy_of(&t, &sel);
    assert_eq!(t.parse_passes.load(Ordering::Relaxed), 1);
    assert_eq!(parsed(&t), 3_000, "the table's rows keep the parse");
    let reference = {
        let other = Tables::default();
        let u = loaded(&other, 3_000);
        let r = SnapshotCopy::take(&u.read(), &sel);
        keys(&r, &sel)
    };
    assert_eq!(keys(&copy, &sel).len(), 1_000);
    assert_eq!(keys(&copy, &sel), reference);
    assert_eq!(
        copy.parts(&sel),
        SnapshotCopy::take(&t.read(), &sel).parts(&sel)
    );
    // parsed now: the next copy is taken at once
    let (again, _) = copy_of(&t, &sel);
    assert_eq!(keys(&again, &sel), reference);
    assert_eq!(t.parse_passes.load(Ordering::Relaxed), 1);
}

#[test]
fn clients_arriving_together_share_one_parse() {
    let tables = Tables::default();
    let t = loaded(&tables, 20_000);
    let sel = scan();
    let counts = arriving_during_a_pass(&t, || copy_of(&t, &sel).0.selected(&sel).count());
    assert_eq!(counts, [6_667; 8]);
    assert_eq!(
        t.parse_passes.load(Ordering::Relaxed),
        1,
        "one copy and parse"
    );
}

#[test]
fn key_filters_limit_the_parse_to_the_rows_they_let_through() {
    use crate::fanout::snapshot::tests::KeyIn;
    let tables = Tables::default();
    let t = loaded(&tables, 3_000);
    let mut sel = scan();
    sel.filters.push(Arc::new(KeyIn(&["k3", "k6", "k7"])));
    let (copy, _) = copy_of(&t, &sel);
    assert_eq!(keys(&copy, &sel), ["k3", "k6"]);
    assert_eq!(parsed(&t), 3, "only the rows the key filter lets through");
    assert_eq!(t.parse_passes.load(Ordering::Relaxed), 1);
}
