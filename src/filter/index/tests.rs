use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

fn row(v: Value) -> Row {
    v.as_object().cloned().unwrap_or_default()
}

fn f(s: &str) -> Filter {
    Filter::parse(s).unwrap()
}

fn brute(
    filters: &BTreeMap<u32, Filter>,
    old: Option<&Row>,
    new: Option<&Row>,
) -> BTreeMap<u32, Transition> {
    let mut out = BTreeMap::new();
    for (id, filter) in filters {
        let was = old.is_some_and(|r| filter.matches(r));
        let now = new.is_some_and(|r| filter.matches(r));
        let t = match (was, now) {
            (false, true) => Transition::MoveIn,
            (true, false) => Transition::MoveOut,
            (true, true) => Transition::Update,
            (false, false) => continue,
        };
        out.insert(*id, t);
    }
    out
}

fn routed(
    index: &FilterIndex<u32>,
    old: Option<&Row>,
    new: Option<&Row>,
) -> BTreeMap<u32, Transition> {
    let list = index.route(old, new);
    let n = list.len();
    let map: BTreeMap<u32, Transition> = list.into_iter().collect();
    assert_eq!(map.len(), n, "a subscription listed twice");
    map
}

#[test]
fn move_in_move_out_update() {
    let mut index = FilterIndex::new();
    index.insert(1, f("league = 'nba'"));
    index.insert(2, f("league = 'nfl'"));
    index.insert(3, f("odd1 > 2"));
    index.insert(4, f("league IN ('nba', 'nhl') AND odd1 < 10"));
    assert_eq!(index.unindexed_len(), 1);
    let a = row(json!({"league": "nba", "odd1": "1.5"}));
    let b = row(json!({"league": "nfl", "odd1": "2.5"}));
    let c = row(json!({"league": "nfl", "odd1": "3.5"}));
    assert_eq!(
        routed(&index, None, Some(&a)),
        BTreeMap::from([(1, Transition::MoveIn), (4, Transition::MoveIn)])
    );
    assert_eq!(
        routed(&index, Some(&a), Some(&b)),
        BTreeMap::from([
            (1, Transition::MoveOut),
            (2, Transition::MoveIn),
            (3, Transition::MoveIn),
            (4, Transition::MoveOut)
        ])
    );
    assert_eq!(
        routed(&index, Some(&b), Some(&c)),
        BTreeMap::from([(2, Transition::Update), (3, Transition::Update)])
    );
    assert_eq!(
        routed(&index, Some(&c), None),
        BTreeMap::from([(2, Transition::MoveOut), (3, Transition::MoveOut)])
    );
    let mut sorted = index.matching(&a);
    sorted.sort();
    assert_eq!(sorted, vec![1, 4]);
    assert!(index.remove(1).is_some());
    assert!(index.remove(1).is_none());
    assert_eq!(
        routed(&index, None, Some(&a)),
        BTreeMap::from([(4, Transition::MoveIn)])
    );
    index.insert(4, f("league = 'nfl'"));
    assert_eq!(index.len(), 3);
    assert_eq!(routed(&index, None, Some(&a)), BTreeMap::new());
}

#[test]
fn index_choice_and_cross_type_equality() {
    let mut index = FilterIndex::new();
    index.insert(1, f("n = 5"));
    index.insert(2, f("n = '5'"));
    index.insert(3, f("active"));
    index.insert(4, f("NOT active AND n = 1"));
    index.insert(5, f("n = NULL"));
    index.insert(6, f("n = 1 OR n = 2"));
    assert_eq!(index.unindexed_len(), 1);
    let expect = |r: Value, ids: &[u32]| {
        let mut got = index.matching(&row(r.clone()));
        got.sort();
        assert_eq!(got, ids, "{r}");
    };
    expect(json!({"n": 5}), &[1, 2]);
    expect(json!({"n": "5.0"}), &[1]);
    expect(json!({"n": "5"}), &[1, 2]);
    expect(json!({"n": 5.0}), &[1, 2]);
    expect(json!({"n": 1, "active": false}), &[4, 6]);
    expect(json!({"active": true}), &[3]);
    expect(json!({"n": null}), &[]);
}

fn arb_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(json!(null))),
        (0i64..4).prop_map(|i| Some(json!(i))),
        (0i64..4).prop_map(|i| Some(json!(i.to_string()))),
        Just(Some(json!("1.0"))),
        Just(Some(json!("1.50"))),
        Just(Some(json!(1.5))),
        Just(Some(json!("x"))),
        Just(Some(json!(true))),
        Just(Some(json!(false))),
    ]
}

fn arb_row() -> impl Strategy<Value = Row> {
    proptest::collection::vec(arb_value(), 3).prop_map(|values| {
        let mut r = Row::new();
        for (name, v) in ["a", "b", "c"].iter().zip(values) {
            if let Some(v) = v {
                r.insert(name.to_string(), v);
            }
        }
        r
    })
}

fn arb_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..4).prop_map(|i| i.to_string()),
        (0i64..4).prop_map(|i| format!("'{i}'")),
        Just("1.5".to_string()),
        Just("'1.50'".to_string()),
        Just("1.0".to_string()),
        Just("'x'".to_string()),
        Just("NULL".to_string()),
        Just("TRUE".to_string()),
        Just("FALSE".to_string()),
    ]
}

fn arb_column() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_string)
}

fn arb_leaf() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        Just("="),
        Just("="),
        Just("!="),
        Just("<"),
        Just("<="),
        Just(">"),
        Just(">=")
    ];
    prop_oneof![
        3 => (arb_column(), op.clone(), arb_literal()).prop_map(|(c, o, l)| format!("{c} {o} {l}")),
        1 => (arb_literal(), op, arb_column()).prop_map(|(l, o, c)| format!("{l} {o} {c}")),
        2 => (arb_column(), proptest::collection::vec(arb_literal(), 1..4), any::<bool>())
            .prop_map(|(c, ls, neg)| format!("{c} {}IN ({})", if neg { "NOT " } else { "" }, ls.join(", "))),
        1 => (arb_column(), any::<bool>())
            .prop_map(|(c, neg)| format!("{c} IS {}NULL", if neg { "NOT " } else { "" })),
        1 => arb_column(),
        1 => (arb_column(), arb_column()).prop_map(|(x, y)| format!("{x} < {y}")),
    ]
}

fn arb_filter() -> impl Strategy<Value = String> {
    arb_leaf().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 2..4)
                .prop_map(|v| format!("({})", v.join(" AND "))),
            proptest::collection::vec(inner.clone(), 2..4)
                .prop_map(|v| format!("({})", v.join(" OR "))),
            inner.prop_map(|e| format!("NOT ({e})")),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn index_equals_brute_force(
        filters in proptest::collection::vec(arb_filter(), 1..24),
        rows in proptest::collection::vec(proptest::option::of(arb_row()), 1..16),
        removals in proptest::collection::vec(any::<u32>(), 0..4),
    ) {
        let mut index = FilterIndex::new();
        let mut oracle = BTreeMap::new();
        for (i, text) in filters.iter().enumerate() {
            let filter = Filter::parse(text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            index.insert(i as u32, filter.clone());
            oracle.insert(i as u32, filter);
        }
        let mut current: Option<Row> = None;
        for (step, next) in rows.iter().enumerate() {
            if step == rows.len() / 2 {
                for r in &removals {
                    let id = r % filters.len() as u32;
                    index.remove(id);
                    oracle.remove(&id);
                }
            }
            prop_assert_eq!(
                routed(&index, current.as_ref(), next.as_ref()),
                brute(&oracle, current.as_ref(), next.as_ref())
            );
            if let Some(r) = next {
                let mut got = index.matching(r);
                got.sort();
                let want: Vec<u32> = oracle.iter().filter(|(_, f)| f.matches(r)).map(|(id, _)| *id).collect();
                prop_assert_eq!(got, want);
            }
            current = next.clone();
        }
    }
}

/// Per-change cost with 10,000 distinct equality subscriptions vs 10, each change matching one
/// subscription before and one after in both cases: run with
/// `cargo test --release --lib filter::index::tests::bench_equality_index -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_equality_index() {
    fn per_change_ns(subscriptions: usize) -> f64 {
        let mut index = FilterIndex::new();
        for i in 0..subscriptions {
            index.insert(i, f(&format!("league = 'L{i}' AND odd1 > 1")));
        }
        // every row's league has exactly one subscription
        let rows: Vec<Row> = (0..10_000)
            .map(|i| {
                row(json!({
                    "league": format!("L{}", (i * 7919) % subscriptions),
                    "odd1": format!("{}.{:03}", 1 + i % 5, i % 1000),
                    "odd2": "2.250",
                }))
            })
            .collect();
        let mut out = Vec::new();
        let changes = 1_000_000;
        let start = crate::views::tests::thread_cpu_ns();
        let mut routed = 0usize;
        for i in 0..changes {
            let old = &rows[i % rows.len()];
            let new = &rows[(i + 1) % rows.len()];
            out.clear();
            index.route_into(Some(old), Some(new), &mut out);
            routed += out.len();
        }
        let ns = (crate::views::tests::thread_cpu_ns() - start) as f64 / changes as f64;
        println!(
            "{subscriptions:>6} subscriptions: {ns:>6.0} ns CPU/change, {:.3} subscriptions routed/change",
            routed as f64 / changes as f64
        );
        ns
    }
    let few = per_change_ns(10);
    let many = per_change_ns(10_000);
    // the same 10,000 filters evaluated one by one, for comparison
    let filters: Vec<Filter> = (0..10_000)
        .map(|i| f(&format!("league = 'L{i}' AND odd1 > 1")))
        .collect();
    let old = row(json!({"league": "L17", "odd1": "1.5"}));
    let new = row(json!({"league": "L18", "odd1": "1.5"}));
    let start = crate::views::tests::thread_cpu_ns();
    let mut n = 0;
    for _ in 0..20 {
        n += filters
            .iter()
            .filter(|f| f.matches(&old) || f.matches(&new))
            .count();
    }
    assert_eq!(n, 40);
    let linear = (crate::views::tests::thread_cpu_ns() - start) as f64 / 20.0;
    println!(
        "ratio 10,000 / 10 subscriptions: {:.2}; evaluating all 10,000 instead: {linear:.0} ns/change",
        many / few
    );
    assert!(
        many / few < 5.0,
        "index cost grows with the subscription count"
    );
}
