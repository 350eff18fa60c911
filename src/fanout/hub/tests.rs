use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{BufferLimits, Hub};
use crate::cdc::decode::Op;
use crate::fanout::protocol::{Format, Outgoing};
use crate::fanout::selector::Selector;
use crate::metrics::Metrics;
use crate::patch::merge;
use crate::table::state::{Delta, RowWrite, SliceMode, Tables};

fn apply(rows: &mut Value, o: &Outgoing) {
    for f in o.frames() {
        let m: Value = serde_json::from_str(f.as_str()).unwrap();
        match m["type"].as_str() {
            Some("snapshot") => *rows = m["rows"].clone(),
            Some("patch") => merge(rows, &m["patch"]),
            _ => {}
        }
    }
}

fn row(key: &str, n: i64) -> Value {
    json!({"id": key, "v": n, "league": format!("L{}", n % 3), "pad": "x".repeat(200)})
}

/// Snapshots are built after the table's lock is let go, while a committer goes on: every
/// subscription (a shared whole-table snapshot, `columns`, a scanned `where`, an indexed one,
/// `keys`) started meanwhile must end equal to the table once it has taken every update. (Taking
/// the subscription's position after its frames instead of from its copy fails it.)
#[test]
fn subscriptions_started_while_changes_commit_converge_to_the_table() {
    let tables = Arc::new(Tables::default());
    let metrics = Arc::new(Metrics::new());
    let limits = BufferLimits {
        changes: 1_000_000,
        bytes: 1 << 34,
    };
    let hub = Arc::new(Hub::new(tables.clone(), metrics.clone(), limits, 1 << 20));
    let t = tables.ensure("t", "e1", "t", 1);
    t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
    hub.open("t");
    let mut off = 0i64;
    let keys = 4_000;
    let commit = |off: &mut i64, key: String, n: Option<i64>| {
        let mut d = Delta::new(t.clone());
        *off += 1;
        d.stage(RowWrite {
            row: n.map(|n| Arc::new(row(&key, n).as_object().unwrap().clone()).into()),
            key,
            op: if n.is_some() { Op::Update } else { Op::Delete },
            part: 0,
            off: *off,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        });
        tables.commit(d, &*hub);
    };
    for i in 0..keys {
        commit(&mut off, format!("k{i}"), Some(i));
    }
    let stop = AtomicBool::new(false);
    let keyset: HashSet<String> = (0..400).map(|i| format!("k{}", i * 7)).collect();
    let selectors = [
        ("whole", Selector::default()),
        ("columns", Selector::build(None, None, Some("v")).unwrap()),
        (
            "scan",
            Selector::build(None, Some("v > 1000"), None).unwrap(),
        ),
        (
            "indexed",
            Selector::build(None, Some("league = 'L1'"), Some("v,league")).unwrap(),
        ),
        ("keys", Selector::build(Some(keyset), None, None).unwrap()),
    ];
    std::thread::scope(|s| {
        let committer = s.spawn(|| {
            let mut off = off;
            let mut n = keys;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let k = format!("k{}", (n * 7919) % (keys + 500));
                let v = if n % 11 == 0 { None } else { Some(n) };
                commit(&mut off, k, v);
            }
            n
        });
        let mut subs = Vec::new();
        for round in 0..12 {
            for (name, sel) in &selectors {
                let mut rx = hub.updates("t").unwrap();
                let (sub, out, _) = hub
                    .subscribe("t", sel.clone(), None, Format::Patch)
                    .unwrap();
                let mut rows = Value::Null;
                for o in &out {
                    apply(&mut rows, o);
                }
                // drain what has arrived so far now, the rest after the committer stops
                let mut sub = sub;
                while let Ok(sent) = rx.try_recv() {
                    let u = sent.take().expect("not dropped");
                    sub.absorb(&u);
                }
                for o in sub.take() {
                    apply(&mut rows, &o);
                }
                subs.push((round, *name, sel.clone(), sub, rx, rows));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let commits = committer.join().unwrap();
        assert!(
            commits > keys,
            "changes committed while subscriptions started"
        );
        let state = t.read();
        let mut bad = 0;
        for (round, name, sel, mut sub, mut rx, mut rows) in subs {
            while let Ok(sent) = rx.try_recv() {
                let u = sent.take().expect("not dropped");
                sub.absorb(&u);
            }
            for o in sub.take() {
                apply(&mut rows, &o);
            }
            let mut want = Map::new();
            for (k, e) in state.rows.iter() {
                if sel.wants(k, Some(&e.row)) {
                    want.insert(k.clone(), Value::Object(sel.project(&e.row).into_owned()));
                }
            }
            let want = Value::Object(want);
            if rows != want {
                bad += 1;
                let (g, w) = (rows.as_object().unwrap(), want.as_object().unwrap());
                let diff: Vec<_> = w
                    .iter()
                    .filter(|(k, v)| g.get(*k) != Some(v))
                    .map(|(k, _)| k.clone())
                    .chain(g.keys().filter(|k| !w.contains_key(*k)).cloned())
                    .take(5)
                    .collect();
                eprintln!(
                    "round {round} {name}: differs ({} vs {} rows) e.g. {diff:?}",
                    g.len(),
                    w.len()
                );
            }
        }
        assert_eq!(bad, 0, "subscriptions that did not converge");
    });
}

/// A `format=rows` snapshot: one message per selected row, projected, from the rows copied
/// under the lock; looked-up and scanned selectors alike.
#[test]
fn a_rows_format_snapshot_holds_the_selected_rows() {
    let tables = Arc::new(Tables::default());
    let limits = BufferLimits {
        changes: 10_000,
        bytes: 1 << 30,
    };
    let hub = Arc::new(Hub::new(
        tables.clone(),
        Arc::new(Metrics::new()),
        limits,
        1 << 20,
    ));
    let t = tables.ensure("t", "e1", "t", 1);
    t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
    hub.open("t");
    let mut d = Delta::new(t.clone());
    for i in 0..30 {
        let key = format!("k{i:02}");
        d.stage(RowWrite {
            row: Some(Arc::new(row(&key, i).as_object().unwrap().clone()).into()),
            key,
            op: Op::Update,
            part: 0,
            off: i,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        });
    }
    tables.commit(d, &*hub);
    assert!(t.ensure_index("league"));
    let keys: HashSet<String> = ["k01", "k04", "k05", "k99"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    let cases = [
        (
            Selector::build(Some(keys), Some("league = 'L1'"), Some("v")).unwrap(),
            vec![1, 4],
        ),
        (
            Selector::build(None, Some("league = 'L2' AND v > 20"), None).unwrap(),
            vec![23, 26, 29],
        ),
        (
            Selector::build(None, Some("v >= 27"), Some("v")).unwrap(),
            vec![27, 28, 29],
        ),
    ];
    for (sel, want) in cases {
        let projected = sel.columns.is_some();
        let (sub, out, _) = hub.subscribe("t", sel, None, Format::Rows).unwrap();
        assert_eq!(sub.useq, t.read().useq);
        let got: Vec<i64> = out
            .iter()
            .map(|o| match o.row_value() {
                Some(r) => {
                    if projected {
                        assert!(r.get("pad").is_none(), "projected: {r}");
                    }
                    r["v"].as_i64().unwrap()
                }
                None => panic!("not a row: {o:?}"),
            })
            .collect();
        assert_eq!(got, want);
    }
}
