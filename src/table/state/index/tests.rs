use std::sync::atomic::Ordering;

use crate::filter::IndexKey;
use crate::table::state::test_tables::{arriving_during_a_pass, loaded};
use crate::table::state::Tables;

fn epl(t: &crate::table::state::Table) -> Vec<String> {
    let epl = [IndexKey::Str("epl".into())];
    let t = t.read();
    t.rows
        .lookup("league", &epl)
        .unwrap()
        .into_iter()
        .cloned()
        .collect()
}

#[test]
fn an_index_over_rows_held_as_json_finds_them_and_shares_their_parse() {
    let tables = Tables::default();
    let t = loaded(&tables, 4);
    let parsed = |t: &crate::table::state::Table| {
        let t = t.read();
        t.rows.values().filter(|e| e.row.is_parsed()).count()
    };
    assert_eq!(parsed(&t), 0, "rows held as their JSON");
    assert!(t.ensure_index("league"));
    assert_eq!(
        parsed(&t),
        4,
        "the table's rows hold the parse the build made"
    );
    assert_eq!(epl(&t), ["k0", "k3"]);
}

#[test]
fn clients_arriving_together_share_one_build() {
    let tables = Tables::default();
    let t = loaded(&tables, 20_000);
    let indexed = arriving_during_a_pass(&t, || t.ensure_index("league"))
        .into_iter()
        .all(|indexed| indexed);
    assert!(indexed);
    assert_eq!(
        t.index_builds.load(Ordering::Relaxed),
        1,
        "one copy and build"
    );
    assert_eq!(epl(&t).len(), 6_667);
}
