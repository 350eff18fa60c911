//! Every operator against a brute-force oracle computed from the same input, through inserts,
//! updates, deletes, retractions, and the three ways of restoring a view.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::config::*;
use super::value::{group_key, SortCell, SortValue};
use super::*;
use crate::filter::Decimal;

type Table = BTreeMap<String, Row>;

fn row(v: Value) -> Row {
    v.as_object().cloned().unwrap_or_default()
}

fn apply_out(state: &mut Table, changes: Vec<OutChange>) {
    for (k, r) in changes {
        match r {
            Some(r) => {
                state.insert(k, r);
            }
            None => {
                state.remove(&k);
            }
        }
    }
}

fn def(input: InputKind, operator: OperatorDef) -> ViewDef {
    ViewDef {
        name: "v".into(),
        from: "t".into(),
        input,
        operator,
        line: 1,
    }
}

fn arb_val() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(null)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(-3)),
        Just(json!(0.5)),
        Just(json!("0.1")),
        Just(json!("0.2")),
        Just(json!("0.3")),
        Just(json!("1.50")),
        Just(json!("-2.25")),
        Just(json!("0.125")),
        Just(json!("abc")),
        Just(json!("zz")),
        Just(json!(true)),
    ]
}

fn arb_row() -> impl Strategy<Value = Row> {
    (
        prop_oneof![
            4 => Just(json!("a")),
            4 => Just(json!("b")),
            2 => Just(json!("c")),
            1 => Just(json!(null)),
        ],
        arb_val(),
        arb_val(),
    )
        .prop_map(|(g, v, w)| row(json!({"g": g, "v": v, "w": w})))
}

/// A table change: row key index and the new row (`None` deletes).
fn arb_ops() -> impl Strategy<Value = Vec<(usize, Option<Row>)>> {
    proptest::collection::vec(
        (0usize..7, proptest::option::weighted(0.75, arb_row())),
        1..60,
    )
}

fn arb_events() -> impl Strategy<Value = Vec<(Option<usize>, Row)>> {
    proptest::collection::vec(
        (proptest::option::weighted(0.9, 0usize..5), arb_row()),
        1..60,
    )
}

/// Runs table ops through `op`, checking the output table against `oracle(table, seqs)` after
/// every change; `seqs` holds each row's last-change number. Returns the final tables.
fn run_table(
    op: &mut ViewOperator,
    ops: &[(usize, Option<Row>)],
    oracle: impl Fn(&Table, &BTreeMap<String, u64>) -> Table,
) -> Result<(Table, Table), TestCaseError> {
    let mut table = Table::new();
    let mut seqs = BTreeMap::new();
    let mut out = Table::new();
    for (step, (k, new)) in ops.iter().enumerate() {
        let key = format!("k{k}");
        let old = table.get(&key).cloned();
        let changes = op.apply_change(&key, old.as_ref(), new.as_ref());
        apply_out(&mut out, changes);
        match new {
            Some(r) => {
                table.insert(key.clone(), r.clone());
                seqs.insert(key, step as u64);
            }
            None => {
                table.remove(&key);
                seqs.remove(&key);
            }
        }
        prop_assert_eq!(&out, &oracle(&table, &seqs), "after step {}", step);
    }
    Ok((table, out))
}

fn run_events(
    op: &mut ViewOperator,
    events: &[(Option<usize>, Row)],
    oracle: impl Fn(&[(Option<String>, Row)]) -> Table,
) -> Result<Table, TestCaseError> {
    let mut seen: Vec<(Option<String>, Row)> = Vec::new();
    let mut out = Table::new();
    for (step, (k, r)) in events.iter().enumerate() {
        let key = k.map(|k| format!("e{k}"));
        apply_out(&mut out, op.apply_event(key.as_deref(), r));
        seen.push((key, r.clone()));
        prop_assert_eq!(&out, &oracle(&seen), "after event {}", step);
    }
    Ok(out)
}

/// Restores `op` three ways where its plan allows and checks each copy behaves like `op` on `more`.
fn check_restores(
    view: &ViewDef,
    op: &ViewOperator,
    table: &Table,
    out: &Table,
    more: &[(usize, Option<Row>)],
) -> Result<(), TestCaseError> {
    let mut copies = vec![ViewOperator::load_state(view, &op.save_state().unwrap()).unwrap()];
    match op.restore_plan() {
        RestorePlan::FromOutput | RestorePlan::FromOutputAndRowState => {
            let mut fresh = ViewOperator::new(view);
            for (k, r) in out {
                let state = op.row_state(k);
                prop_assert!(fresh.rebuild_from_output_and_row_state(k, r, state.as_ref()));
            }
            copies.push(fresh);
        }
        RestorePlan::ReplayInput => {
            let mut fresh = ViewOperator::new(view);
            let mut replayed = Table::new();
            for (k, r) in table {
                apply_out(&mut replayed, fresh.apply_change(k, None, Some(r)));
            }
            prop_assert_eq!(&replayed, out, "replay of the input rebuilds the output");
            copies.push(fresh);
        }
        RestorePlan::PersistedState => {}
    }
    for mut copy in copies {
        let mut original = op.clone();
        let mut t = table.clone();
        let (mut a, mut b) = (out.clone(), out.clone());
        for (k, new) in more {
            let key = format!("k{k}");
            let old = t.get(&key).cloned();
            apply_out(
                &mut a,
                original.apply_change(&key, old.as_ref(), new.as_ref()),
            );
            apply_out(&mut b, copy.apply_change(&key, old.as_ref(), new.as_ref()));
            match new {
                Some(r) => t.insert(key, r.clone()),
                None => t.remove(&key),
            };
            prop_assert_eq!(&a, &b);
        }
    }
    Ok(())
}

// ---------- group_by ----------

fn group_by_spec() -> GroupBySpec {
    let agg = |name: &str, kind, column: Option<&str>| AggregateSpec {
        name: name.into(),
        kind,
        column: column.map(str::to_string),
    };
    GroupBySpec {
        by: vec!["g".into()],
        aggregates: vec![
            agg("n", AggKind::Count, None),
            agg("nv", AggKind::Count, Some("v")),
            agg("s", AggKind::Sum, Some("v")),
            agg("a", AggKind::Avg, Some("v")),
            agg("lo", AggKind::Min, Some("v")),
            agg("hi", AggKind::Max, Some("w")),
            agg("last", AggKind::Latest, Some("w")),
        ],
    }
}

/// The aggregates of one group's rows, in order of arrival (`rows` = (row, change number)).
fn oracle_group(rows: &[(&Row, u64)]) -> Row {
    let mut out = Row::new();
    out.insert("g".into(), rows[0].0["g"].clone());
    out.insert("n".into(), json!(rows.len()));
    let vs: Vec<&Value> = rows
        .iter()
        .filter_map(|(r, _)| r.get("v"))
        .filter(|v| !v.is_null())
        .collect();
    out.insert("nv".into(), json!(vs.len()));
    let nums: Vec<(Decimal, bool)> = vs
        .iter()
        .filter_map(|v| Decimal::from_json(v).map(|d| (d, v.is_string())))
        .collect();
    let (sum, avg) = if nums.is_empty() {
        (Value::Null, Value::Null)
    } else {
        let mut total = Decimal::zero();
        for (d, _) in &nums {
            total = total.add(d);
        }
        let numbers = !nums.iter().any(|(_, s)| *s);
        (
            total.to_json(numbers),
            total.div_count(nums.len() as u64).unwrap().to_json(numbers),
        )
    };
    out.insert("s".into(), sum);
    out.insert("a".into(), avg);
    let extreme = |col: &str, max: bool| -> Value {
        let mut best: Option<(SortValue, Value)> = None;
        for (r, _) in rows {
            if let Some(v) = r.get(col) {
                if let Some(s) = SortValue::of(v) {
                    let better = match &best {
                        None => true,
                        Some((b, _)) => (max && s > *b) || (!max && s < *b),
                    };
                    if better {
                        best = Some((s, v.clone()));
                    }
                }
            }
        }
        best.map_or(Value::Null, |(_, v)| v)
    };
    out.insert("lo".into(), extreme("v", false));
    out.insert("hi".into(), extreme("w", true));
    let last = rows
        .iter()
        .filter(|(r, _)| r.get("w").is_some_and(|v| !v.is_null()))
        .max_by_key(|(_, seq)| *seq)
        .map_or(Value::Null, |(r, _)| r["w"].clone());
    out.insert("last".into(), last);
    out
}

fn oracle_group_by_table(table: &Table, seqs: &BTreeMap<String, u64>) -> Table {
    let mut groups: BTreeMap<String, Vec<(&Row, u64)>> = BTreeMap::new();
    for (k, r) in table {
        if let Some(g) = group_key(r, &["g".to_string()]) {
            groups.entry(g).or_default().push((r, seqs[k]));
        }
    }
    groups
        .into_iter()
        .map(|(g, rows)| (g, oracle_group(&rows)))
        .collect()
}

fn oracle_group_by_events(events: &[(Option<String>, Row)]) -> Table {
    let mut groups: BTreeMap<String, Vec<(&Row, u64)>> = BTreeMap::new();
    for (i, (_, r)) in events.iter().enumerate() {
        if let Some(g) = group_key(r, &["g".to_string()]) {
            groups.entry(g).or_default().push((r, i as u64));
        }
    }
    groups
        .into_iter()
        .map(|(g, rows)| (g, oracle_group(&rows)))
        .collect()
}

// ---------- top_n ----------

fn top_n_spec(limit: usize, grouped: bool, rank: bool) -> TopNSpec {
    TopNSpec {
        order_by: vec![
            SortColumn {
                column: "v".into(),
                descending: true,
            },
            SortColumn {
                column: "w".into(),
                descending: false,
            },
        ],
        limit,
        group_by: if grouped { vec!["g".into()] } else { vec![] },
        rank: rank.then(|| "rank".to_string()),
    }
}

fn oracle_top_n(spec: &TopNSpec, table: &Table) -> Table {
    type Ranked<'a> = (Vec<SortCell>, &'a String, &'a Row);
    let mut groups: BTreeMap<String, Vec<Ranked<'_>>> = BTreeMap::new();
    for (k, r) in table {
        let g = if spec.group_by.is_empty() {
            Some(String::new())
        } else {
            group_key(r, &spec.group_by)
        };
        let Some(g) = g else { continue };
        let sort: Vec<SortCell> = spec
            .order_by
            .iter()
            .map(|c| SortCell {
                value: SortValue::of_column(r, &c.column),
                descending: c.descending,
            })
            .collect();
        groups.entry(g).or_default().push((sort, k, r));
    }
    let mut out = Table::new();
    for (_, mut rows) in groups {
        rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (i, (_, k, r)) in rows.into_iter().take(spec.limit).enumerate() {
            let mut r = r.clone();
            if let Some(c) = &spec.rank {
                r.insert(c.clone(), json!(i + 1));
            }
            out.insert(k.clone(), r);
        }
    }
    out
}

// ---------- max_by / min_by ----------

fn extreme_spec(max: bool, keyed: bool) -> ExtremeSpec {
    ExtremeSpec {
        max,
        key: keyed.then(|| vec!["g".to_string()]),
        by: "v".into(),
    }
}

fn oracle_extreme_table(spec: &ExtremeSpec, table: &Table) -> Table {
    let mut best: BTreeMap<String, (SortValue, String, Row)> = BTreeMap::new();
    for (k, r) in table {
        let g = match &spec.key {
            Some(cols) => group_key(r, cols),
            None => Some(k.clone()),
        };
        let (Some(g), Some(v)) = (g, SortValue::of_column(r, &spec.by)) else {
            continue;
        };
        let better = match best.get(&g) {
            None => true,
            Some((b, bk, _)) => {
                (v == *b && k < bk) || (spec.max && v > *b) || (!spec.max && v < *b)
            }
        };
        if better {
            best.insert(g, (v, k.clone(), r.clone()));
        }
    }
    best.into_iter().map(|(g, (_, _, r))| (g, r)).collect()
}

fn oracle_extreme_events(spec: &ExtremeSpec, events: &[(Option<String>, Row)]) -> Table {
    let mut best: BTreeMap<String, (SortValue, Row)> = BTreeMap::new();
    for (k, r) in events {
        let g = match &spec.key {
            Some(cols) => group_key(r, cols),
            None => k.clone(),
        };
        let (Some(g), Some(v)) = (g, SortValue::of_column(r, &spec.by)) else {
            continue;
        };
        let better = match best.get(&g) {
            None => true,
            Some((b, _)) => (spec.max && v > *b) || (!spec.max && v < *b),
        };
        if better {
            best.insert(g, (v, r.clone()));
        }
    }
    best.into_iter().map(|(g, (_, r))| (g, r)).collect()
}

// ---------- history and delta ----------

fn history_spec(limit: usize) -> HistorySpec {
    HistorySpec {
        key: None,
        limit,
        columns: Some(vec!["v".into()]),
        field: "history".into(),
    }
}

/// History from the list of every change per key.
fn oracle_history(limit: usize, changes: &[(String, Option<Row>)]) -> Table {
    let mut lists: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (k, r) in changes {
        let entry = match r {
            Some(r) => {
                let mut m = Row::new();
                if let Some(v) = r.get("v") {
                    m.insert("v".into(), v.clone());
                }
                Value::Object(m)
            }
            None => Value::Null,
        };
        let list = lists.entry(k.clone()).or_default();
        if list.last() != Some(&entry) {
            list.push(entry);
        }
    }
    lists
        .into_iter()
        .map(|(k, list)| {
            let start = list.len().saturating_sub(limit);
            (k, row(json!({"history": list[start..].to_vec()})))
        })
        .collect()
}

/// Delta from each key's rows since its last delete: the last step where `v` moved.
fn oracle_delta(changes: &[(String, Option<Row>)]) -> Table {
    let mut runs: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for (k, r) in changes {
        match r {
            Some(r) => runs.entry(k.clone()).or_default().push(r.clone()),
            None => {
                runs.remove(k);
            }
        }
    }
    runs.into_iter()
        .map(|(k, rows)| {
            let mut out = rows[rows.len() - 1].clone();
            let mut change = Value::Null;
            let mut movement = Value::Null;
            for pair in rows.windows(2) {
                let (b, n) = (&pair[0]["v"], &pair[1]["v"]);
                if let (Some(bd), Some(nd)) = (Decimal::from_json(b), Decimal::from_json(n)) {
                    if bd != nd {
                        let numbers = b.is_number() && n.is_number();
                        change = nd.sub(&bd).to_json(numbers);
                        movement = nd.sub(&bd).abs().to_json(numbers);
                    }
                }
            }
            out.insert("v_change".into(), change);
            out.insert("v_move".into(), movement);
            (k, out)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn group_by_over_a_table_equals_oracle(ops in arb_ops(), more in arb_ops()) {
        let view = def(InputKind::Table, OperatorDef::GroupBy(group_by_spec()));
        let mut op = ViewOperator::new(&view);
        let (table, out) = run_table(&mut op, &ops, oracle_group_by_table)?;
        prop_assert_eq!(op.restore_plan(), RestorePlan::PersistedState);
        check_restores(&view, &op, &table, &out, &more)?;
        // without `latest` the input replay rebuilds it
        let mut spec = group_by_spec();
        spec.aggregates.retain(|a| a.kind != AggKind::Latest);
        let view = def(InputKind::Table, OperatorDef::GroupBy(spec));
        let mut op = ViewOperator::new(&view);
        let mut out = Table::new();
        let mut table = Table::new();
        for (k, new) in &ops {
            let key = format!("k{k}");
            let old = table.get(&key).cloned();
            apply_out(&mut out, op.apply_change(&key, old.as_ref(), new.as_ref()));
            match new { Some(r) => table.insert(key, r.clone()), None => table.remove(&key) };
        }
        prop_assert_eq!(op.restore_plan(), RestorePlan::ReplayInput);
        check_restores(&view, &op, &table, &out, &more)?;
    }

    #[test]
    fn group_by_over_events_equals_oracle(events in arb_events(), more in arb_events()) {
        let view = def(InputKind::Events, OperatorDef::GroupBy(group_by_spec()));
        let mut op = ViewOperator::new(&view);
        let out = run_events(&mut op, &events, oracle_group_by_events)?;
        prop_assert_eq!(op.restore_plan(), RestorePlan::FromOutputAndRowState);
        let restored = ViewOperator::load_state(&view, &op.save_state().unwrap()).unwrap();
        // with avg: rebuilt from the output rows and each row's state
        let mut with_state = ViewOperator::new(&view);
        for (k, r) in &out {
            let state = op.row_state(k);
            prop_assert!(state.is_some(), "a row of a view with avg has a state");
            prop_assert!(with_state.rebuild_from_output_and_row_state(k, r, state.as_ref()));
        }
        // ... and never from the rows alone, nor with a state that does not give the row
        if let Some((k, r)) = out.iter().next() {
            prop_assert!(!ViewOperator::new(&view).rebuild_from_output_and_row_state(k, r, None));
        }
        if let Some((k, r)) = out.iter().find(|(_, r)| !r["a"].is_null()) {
            let mut state = op.row_state(k).unwrap();
            let sum = state["a"]["sum"].as_str().unwrap().to_string();
            state["a"]["sum"] = json!(format!("{sum}1"));
            prop_assert!(
                !ViewOperator::new(&view).rebuild_from_output_and_row_state(k, r, Some(&state)),
                "a state whose average is not the row's is refused: {}", state
            );
        }
        // without avg: rebuilt from the output rows alone
        let mut spec = group_by_spec();
        spec.aggregates.retain(|a| a.kind != AggKind::Avg);
        let no_avg = def(InputKind::Events, OperatorDef::GroupBy(spec));
        let mut op2 = ViewOperator::new(&no_avg);
        let mut out2 = Table::new();
        for (k, r) in &events {
            let key = k.map(|k| format!("e{k}"));
            apply_out(&mut out2, op2.apply_event(key.as_deref(), r));
        }
        prop_assert_eq!(op2.restore_plan(), RestorePlan::FromOutput);
        let mut rebuilt = ViewOperator::new(&no_avg);
        for (k, r) in &out2 {
            rebuilt.rebuild_from_output(k, r);
        }
        let copies = [
            (op.clone(), restored, out.clone()),
            (op, with_state, out),
            (op2, rebuilt, out2),
        ];
        for (mut a, mut b, start) in copies {
            let (mut sa, mut sb) = (start.clone(), start);
            for (k, r) in &more {
                let key = k.map(|k| format!("e{k}"));
                apply_out(&mut sa, a.apply_event(key.as_deref(), r));
                apply_out(&mut sb, b.apply_event(key.as_deref(), r));
                prop_assert_eq!(&sa, &sb);
            }
        }
    }

    #[test]
    fn top_n_equals_oracle(ops in arb_ops(), more in arb_ops(), limit in 1usize..5, grouped: bool, rank: bool) {
        let spec = top_n_spec(limit, grouped, rank);
        let view = def(InputKind::Table, OperatorDef::TopN(spec.clone()));
        let mut op = ViewOperator::new(&view);
        let (table, out) = run_table(&mut op, &ops, |t, _| oracle_top_n(&spec, t))?;
        prop_assert_eq!(op.restore_plan(), RestorePlan::ReplayInput);
        check_restores(&view, &op, &table, &out, &more)?;
    }

    #[test]
    fn max_by_and_min_by_over_a_table_equal_oracle(ops in arb_ops(), more in arb_ops(), max: bool, keyed: bool) {
        let spec = extreme_spec(max, keyed);
        let view = def(InputKind::Table, OperatorDef::Extreme(spec.clone()));
        let mut op = ViewOperator::new(&view);
        let (table, out) = run_table(&mut op, &ops, |t, _| oracle_extreme_table(&spec, t))?;
        prop_assert_eq!(op.restore_plan(), RestorePlan::ReplayInput);
        check_restores(&view, &op, &table, &out, &more)?;
    }

    #[test]
    fn max_by_and_min_by_over_events_equal_oracle(events in arb_events(), more in arb_events(), max: bool, keyed: bool) {
        let spec = extreme_spec(max, keyed);
        let view = def(InputKind::Events, OperatorDef::Extreme(spec.clone()));
        let mut op = ViewOperator::new(&view);
        let out = run_events(&mut op, &events, |seen| oracle_extreme_events(&spec, seen))?;
        prop_assert_eq!(op.restore_plan(), RestorePlan::FromOutput);
        let mut rebuilt = ViewOperator::new(&view);
        for (k, r) in &out {
            rebuilt.rebuild_from_output(k, r);
        }
        let (mut sa, mut sb) = (out.clone(), out);
        for (k, r) in &more {
            let key = k.map(|k| format!("e{k}"));
            apply_out(&mut sa, op.apply_event(key.as_deref(), r));
            apply_out(&mut sb, rebuilt.apply_event(key.as_deref(), r));
            prop_assert_eq!(&sa, &sb);
        }
    }

    #[test]
    fn history_equals_oracle(ops in arb_ops(), more in arb_ops(), limit in 1usize..6) {
        let view = def(InputKind::Table, OperatorDef::History(history_spec(limit)));
        let mut op = ViewOperator::new(&view);
        let mut changes: Vec<(String, Option<Row>)> = Vec::new();
        let mut table = Table::new();
        let mut out = Table::new();
        for (k, new) in &ops {
            let key = format!("k{k}");
            let old = table.get(&key).cloned();
            apply_out(&mut out, op.apply_change(&key, old.as_ref(), new.as_ref()));
            changes.push((key.clone(), new.clone()));
            match new { Some(r) => table.insert(key, r.clone()), None => table.remove(&key) };
            prop_assert_eq!(&out, &oracle_history(limit, &changes));
        }
        prop_assert_eq!(op.restore_plan(), RestorePlan::FromOutput);
        check_restores(&view, &op, &table, &out, &more)?;
    }

    #[test]
    fn delta_equals_oracle(ops in arb_ops(), more in arb_ops()) {
        let view = def(InputKind::Table, OperatorDef::Delta(DeltaSpec { key: None, columns: vec!["v".into()] }));
        let mut op = ViewOperator::new(&view);
        let mut changes: Vec<(String, Option<Row>)> = Vec::new();
        let mut table = Table::new();
        let mut out = Table::new();
        for (k, new) in &ops {
            let key = format!("k{k}");
            let old = table.get(&key).cloned();
            apply_out(&mut out, op.apply_change(&key, old.as_ref(), new.as_ref()));
            changes.push((key.clone(), new.clone()));
            match new { Some(r) => table.insert(key, r.clone()), None => table.remove(&key) };
            prop_assert_eq!(&out, &oracle_delta(&changes));
        }
        prop_assert_eq!(op.restore_plan(), RestorePlan::FromOutput);
        check_restores(&view, &op, &table, &out, &more)?;
    }

    #[test]
    fn delta_by_key_columns_equals_oracle(ops in arb_ops(), more in arb_ops()) {
        // several rows share an output key (`g`); rows move between keys and leave
        let cols = vec!["g".to_string()];
        let view = def(InputKind::Table, OperatorDef::Delta(DeltaSpec { key: Some(cols.clone()), columns: vec!["v".into()] }));
        let mut op = ViewOperator::new(&view);
        let mut changes: Vec<(String, Option<Row>)> = Vec::new();
        let mut last_change: BTreeMap<String, usize> = BTreeMap::new();
        let mut table = Table::new();
        let mut out = Table::new();
        for (i, (k, new)) in ops.iter().enumerate() {
            let key = format!("k{k}");
            let old = table.get(&key).cloned();
            apply_out(&mut out, op.apply_change(&key, old.as_ref(), new.as_ref()));
            changes.push((key.clone(), new.clone()));
            last_change.insert(key.clone(), i);
            match new { Some(r) => table.insert(key, r.clone()), None => table.remove(&key) };
            // each row's own movement (a row without a key is out of the view: its past starts
            // again), shown under its key by the row changed last
            let own = oracle_delta(&changes.iter().map(|(k, r)| {
                (k.clone(), r.clone().filter(|r| group_key(r, &cols).is_some()))
            }).collect::<Vec<_>>());
            let mut want: BTreeMap<String, (usize, Row)> = BTreeMap::new();
            for (k, r) in &table {
                let Some(g) = group_key(r, &cols) else { continue };
                let at = last_change[k];
                if want.get(&g).is_none_or(|(a, _)| *a < at) {
                    want.insert(g, (at, own[k].clone()));
                }
            }
            let want: Table = want.into_iter().map(|(g, (_, r))| (g, r)).collect();
            prop_assert_eq!(&out, &want);
        }
        prop_assert_eq!(op.restore_plan(), RestorePlan::PersistedState);
        check_restores(&view, &op, &table, &out, &more)?;
    }
}

// ---------- named cases ----------

fn sum_view(aggregates: &[(&str, &str)]) -> ViewDef {
    def(
        InputKind::Table,
        OperatorDef::GroupBy(GroupBySpec {
            by: vec!["account".into()],
            aggregates: aggregates
                .iter()
                .map(|(name, spec)| {
                    let (kind, column) = parse_aggregate(spec).unwrap();
                    AggregateSpec {
                        name: name.to_string(),
                        kind,
                        column,
                    }
                })
                .collect(),
        }),
    )
}

#[test]
fn decimal_sums_are_exact_through_retraction() {
    let view = sum_view(&[
        ("balance", "sum(amount)"),
        ("mean", "avg(amount)"),
        ("low", "min(amount)"),
        ("high", "max(amount)"),
    ]);
    let mut op = ViewOperator::new(&view);
    let mut out = Table::new();
    let t1 = row(json!({"account": "A", "amount": "0.1"}));
    let t2 = row(json!({"account": "A", "amount": "0.2"}));
    let t3 = row(json!({"account": "A", "amount": "0.125"}));
    apply_out(&mut out, op.apply_change("t1", None, Some(&t1)));
    apply_out(&mut out, op.apply_change("t2", None, Some(&t2)));
    assert_eq!(out["A"]["balance"], json!("0.3"));
    assert_eq!(out["A"]["mean"], json!("0.15"));
    apply_out(&mut out, op.apply_change("t3", None, Some(&t3)));
    assert_eq!(out["A"]["balance"], json!("0.425"));
    assert_eq!(out["A"]["high"], json!("0.2"));
    // delete the current maximum: the next one takes its place
    apply_out(&mut out, op.apply_change("t2", Some(&t2), None));
    assert_eq!(out["A"]["high"], json!("0.125"));
    assert_eq!(out["A"]["balance"], json!("0.225"));
    // retract the 3-digit value: the sum goes back to one digit
    apply_out(&mut out, op.apply_change("t3", Some(&t3), None));
    assert_eq!(out["A"]["balance"], json!("0.1"));
    assert_eq!(out["A"]["low"], json!("0.1"));
    // an update moves a row to another account: retract here, add there
    let t1b = row(json!({"account": "B", "amount": "0.1"}));
    apply_out(&mut out, op.apply_change("t1", Some(&t1), Some(&t1b)));
    assert!(!out.contains_key("A"));
    assert_eq!(out["B"]["balance"], json!("0.1"));
    // JSON numbers stay numbers
    let n = row(json!({"account": "C", "amount": 0.1}));
    let m = row(json!({"account": "C", "amount": 0.2}));
    apply_out(&mut out, op.apply_change("n", None, Some(&n)));
    apply_out(&mut out, op.apply_change("m", None, Some(&m)));
    assert_eq!(out["C"]["balance"], json!(0.3));
}

#[test]
fn a_sum_longer_than_an_input_value_comes_back_from_the_output() {
    // over events: restored from the output rows and each row's state; two 1,024-character
    // values sum to 1,025 characters, longer than an input value may be
    let mut view = sum_view(&[("balance", "sum(amount)"), ("mean", "avg(amount)")]);
    view.input = InputKind::Events;
    let mut op = ViewOperator::new(&view);
    let nines = "9".repeat(crate::filter::decimal::MAX_DECIMAL_CHARS);
    let mut out = Table::new();
    for _ in 0..2 {
        let e = row(json!({"account": "A", "amount": nines}));
        apply_out(&mut out, op.apply_event(Some("e"), &e));
    }
    let balance = out["A"]["balance"].as_str().unwrap_or_default().to_string();
    assert_eq!(balance.len(), crate::filter::decimal::MAX_DECIMAL_CHARS + 1);
    let mut rebuilt = ViewOperator::new(&view);
    assert!(rebuilt.rebuild_from_output_and_row_state("A", &out["A"], op.row_state("A").as_ref()));
    // the next event adds to the restored sum, as it does to the original's
    let e = row(json!({"account": "A", "amount": "1"}));
    let mut a = out.clone();
    apply_out(&mut a, op.apply_event(Some("e"), &e));
    apply_out(&mut out, rebuilt.apply_event(Some("e"), &e));
    assert_eq!(out, a);
    // a sum that cannot be read is refused (the view is then computed from its events), not
    // taken as no sum
    let mut bad = out["A"].clone();
    bad.insert("balance".into(), json!("12x"));
    let mut refused = ViewOperator::new(&view);
    assert!(!refused.rebuild_from_output_and_row_state("A", &bad, op.row_state("A").as_ref()));
}

#[test]
fn top_n_lets_the_next_row_in_when_the_first_is_deleted() {
    let spec = TopNSpec {
        order_by: vec![SortColumn {
            column: "score".into(),
            descending: true,
        }],
        limit: 2,
        group_by: vec![],
        rank: Some("rank".into()),
    };
    let mut op = ViewOperator::new(&def(InputKind::Table, OperatorDef::TopN(spec)));
    let mut out = Table::new();
    for (k, s) in [("ann", 30), ("bob", 50), ("cat", 40), ("dan", 10)] {
        let r = row(json!({"player": k, "score": s}));
        apply_out(&mut out, op.apply_change(k, None, Some(&r)));
    }
    assert_eq!(out.keys().collect::<Vec<_>>(), ["bob", "cat"]);
    assert_eq!(out["bob"]["rank"], json!(1));
    let bob = row(json!({"player": "bob", "score": 50}));
    let changes = op.apply_change("bob", Some(&bob), None);
    assert_eq!(changes.len(), 3, "{changes:?}"); // bob out, cat re-ranked, ann in
    apply_out(&mut out, changes);
    assert_eq!(out["cat"]["rank"], json!(1));
    assert_eq!(out["ann"]["rank"], json!(2));
    // a change below the top sends nothing
    let dan = row(json!({"player": "dan", "score": 11}));
    assert!(op
        .apply_change(
            "dan",
            Some(&row(json!({"player": "dan", "score": 10}))),
            Some(&dan)
        )
        .is_empty());
}

#[test]
fn the_high_score_board() {
    // scores events -> max per player -> top 2
    let file = ViewsFile::parse(
        r#"
        [topics.scores]
        format = "events"
        [views.best]
        from = "scores"
        max_by = { key = ["player"], by = "score" }
        [views.board]
        from = "best"
        top_n = { order_by = ["score desc", "player"], limit = 2 }
        "#,
    )
    .unwrap();
    let mut best = ViewOperator::new(&file.views[0]);
    let mut board = ViewOperator::new(&file.views[1]);
    let mut best_rows = Table::new();
    let mut board_rows = Table::new();
    for (player, score) in [
        ("ann", 10),
        ("bob", 20),
        ("ann", 30),
        ("cat", 25),
        ("bob", 5),
    ] {
        let event = row(json!({"player": player, "score": score}));
        for (k, new) in best.apply_event(None, &event) {
            let old = best_rows.get(&k).cloned();
            apply_out(
                &mut board_rows,
                board.apply_change(&k, old.as_ref(), new.as_ref()),
            );
            apply_out(&mut best_rows, vec![(k, new)]);
        }
    }
    assert_eq!(best_rows["bob"]["score"], json!(20));
    assert_eq!(board_rows.len(), 2);
    assert_eq!(board_rows["ann"]["rank"], json!(1));
    assert_eq!(board_rows["cat"]["rank"], json!(2));
}

#[test]
fn state_of_another_operator_is_refused() {
    let top = def(
        InputKind::Table,
        OperatorDef::TopN(top_n_spec(3, false, true)),
    );
    let history = def(InputKind::Table, OperatorDef::History(history_spec(3)));
    let saved = ViewOperator::new(&top).save_state().unwrap();
    assert!(matches!(
        ViewOperator::load_state(&history, &saved),
        Err(StateError::WrongOperator { .. })
    ));
    assert!(matches!(
        ViewOperator::load_state(&history, b"not json"),
        Err(StateError::Decode(_))
    ));
}

/// A keyed delta over a table: a state saved with its output only (an older version) is refused
/// (it is computed again); a key fed as an insert although it is held keeps the others' row.
#[test]
fn keyed_delta_refuses_an_output_only_state_and_survives_a_replayed_insert() {
    let view = def(
        InputKind::Table,
        OperatorDef::Delta(DeltaSpec {
            key: Some(vec!["g".into()]),
            columns: vec!["v".into()],
        }),
    );
    let old_format = br#"{"operator":"delta","state":{"rows":{"x":{"g":"x","v":1}}}}"#;
    let loaded = ViewOperator::load_state(&view, old_format);
    assert!(matches!(loaded, Err(StateError::Outdated)), "{loaded:?}");
    let events = def(InputKind::Events, view.operator.clone());
    assert!(
        ViewOperator::load_state(&events, old_format).is_ok(),
        "over events the output is the whole state"
    );

    let mut op = ViewOperator::new(&view);
    let mut out = Table::new();
    let r = |v: i64| row(json!({"g": "x", "v": v}));
    apply_out(&mut out, op.apply_change("b", None, Some(&r(1))));
    apply_out(&mut out, op.apply_change("a", None, Some(&r(2))));
    // `a` again as an insert (a replay), then deleted: `b` still has the key
    apply_out(&mut out, op.apply_change("a", None, Some(&r(3))));
    apply_out(&mut out, op.apply_change("a", Some(&r(3)), None));
    assert_eq!(
        out.get("x").map(|r| r["v"].clone()),
        Some(json!(1)),
        "{out:?}"
    );
}

// ---------- micro-benchmarks ----------

/// CPU time of this thread, so a benchmark on a shared machine is not charged for the time other
/// processes hold the core.
pub(crate) fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID is valid
    // on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// `cargo test --release --lib views::tests::bench_top_n -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_top_n() {
    fn per_update_ns(rows: usize) -> f64 {
        let mut op = ViewOperator::new(&def(
            InputKind::Table,
            OperatorDef::TopN(TopNSpec {
                order_by: vec![SortColumn {
                    column: "score".into(),
                    descending: true,
                }],
                limit: 10,
                group_by: vec![],
                rank: Some("rank".into()),
            }),
        ));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut current: Vec<Row> = Vec::with_capacity(rows);
        for i in 0..rows {
            let r = row(json!({"player": i, "score": next() % 1_000_000_000}));
            op.apply_change(&i.to_string(), None, Some(&r));
            current.push(r);
        }
        let updates = 200_000;
        let keys: Vec<String> = (0..rows).map(|i| i.to_string()).collect();
        // the new rows are made before the clock starts
        let planned: Vec<(usize, Row)> = (0..updates)
            .map(|_| {
                let i = (next() % rows as u64) as usize;
                (
                    i,
                    row(json!({"player": i, "score": next() % 1_000_000_000})),
                )
            })
            .collect();
        let start = thread_cpu_ns();
        let mut emitted = 0usize;
        for (i, new) in planned {
            emitted += op
                .apply_change(&keys[i], Some(&current[i]), Some(&new))
                .len();
            current[i] = new;
        }
        let ns = (thread_cpu_ns() - start) as f64 / updates as f64;
        println!(
            "top_n limit 10 over {rows:>9} rows: {ns:>7.0} ns CPU/update ({:.4} output changes/update)",
            emitted as f64 / updates as f64
        );
        ns
    }
    let small = per_update_ns(10_000);
    let large = per_update_ns(1_000_000);
    println!(
        "ratio 1M / 10k rows: {:.2} (log2 ratio of sizes: {:.2})",
        large / small,
        (1_000_000f64).log2() / (10_000f64).log2()
    );
}

/// `cargo test --release --lib views::tests::bench_group_by -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_group_by() {
    let view = def(
        InputKind::Events,
        OperatorDef::GroupBy(GroupBySpec {
            by: vec!["account".into()],
            aggregates: [
                ("balance", "sum(amount)"),
                ("n", "count()"),
                ("largest", "max(amount)"),
                ("last", "latest(amount)"),
            ]
            .iter()
            .map(|(name, spec)| {
                let (kind, column) = parse_aggregate(spec).unwrap();
                AggregateSpec {
                    name: name.to_string(),
                    kind,
                    column,
                }
            })
            .collect(),
        }),
    );
    let mut op = ViewOperator::new(&view);
    let events: Vec<Row> = (0..1_000_000u64)
        .map(|i| {
            let cents = (i * 7919) % 100_000;
            row(json!({
                "account": format!("acc{}", (i * 31) % 10_000),
                "amount": format!("{}.{:02}", cents / 100, cents % 100),
            }))
        })
        .collect();
    let start = thread_cpu_ns();
    let mut emitted = 0usize;
    for e in &events {
        emitted += op.apply_event(None, e).len();
    }
    let secs = (thread_cpu_ns() - start) as f64 / 1e9;
    println!(
        "group_by (sum, count, max, latest of decimal strings) over {} events into 10,000 groups: {:.0} events/s of CPU ({emitted} output changes)",
        events.len(),
        events.len() as f64 / secs
    );
}

#[test]
fn a_delta_compares_an_own_row_with_an_input_row_besides_its_movement() {
    let defs = ViewsFile::parse(
        "[views.mv]\nfrom = \"scores\"\ndelta = { columns = [\"score\"], key = [\"team\"] }\n",
    )
    .unwrap()
    .views;
    let op = ViewOperator::new(&defs[0]);
    let r = |v: serde_json::Value| v.as_object().cloned().unwrap();
    let own = r(json!({"team": "a", "score": 5, "score_change": 2, "score_move": 2}));
    assert!(op.same_values(&own, &r(json!({"team": "a", "score": 5}))));
    assert!(!op.same_values(&own, &r(json!({"team": "a", "score": 6}))));
    // a column the input lost, or one it gained, is a change
    assert!(!op.same_values(&own, &r(json!({"score": 5}))));
    assert!(!op.same_values(&own, &r(json!({"team": "a", "score": 5, "x": 1}))));
    let extra = r(json!({"team": "a", "score": 5, "score_change_x": 1, "score_change": 2}));
    assert!(!op.same_values(&extra, &r(json!({"team": "a", "score": 5}))));
    // an input column with a movement column's name is overwritten by the movement
    assert!(op.same_values(
        &own,
        &r(json!({"team": "a", "score": 5, "score_change": 9}))
    ));
}
