//! Declared views under the same faults as their input: every node gets a views file (`FILE`)
//! over the workload's table; at the end each view, on every serving node's API and folded
//! from its changelog topic, must equal what the test computes from the table's oracle (a
//! `history`: must be what the workload produced, as below).
//!
//! The views checked are those whose rows are a function of the input's rows (a `top_n`, a
//! `group_by` without `latest`) and a `delta`, whose rows (not its movements, which depend on
//! the past) are the input's latest rows. Each output row is reduced to the columns the oracle
//! knows (`canonical`), so a difference names the key and both values.
//!
//! A `history` depends on the order of past changes, and after a kill -9 the changes in flight
//! arrive as one entry (README, "Reliability"), so it is held to what is promised under faults:
//! each key's entries are changes of that key in the order they were produced (a subsequence of
//! the workload's changes, deletes included) and the last is the key's last change; every key
//! the table holds has one. How many keys hold fewer changes than their last `limit` is reported
//! (`history_merged`), not failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::clients::Client;
use crate::phase::{
    check_clients, diff, differing, fold_topic_msgs, settled_when, ClientReport, Ctx, Node,
    TableCheck,
};
use crate::workload::{group_of, price_of, Changes, State};

/// The views declared over the workload's table (`ticks`). `top_n` by the counter (unique), a
/// `group_by` over a column that moves as rows change (retracts from one group, adds to
/// another), a `delta` of the counter, and a `history` of it long enough to span most of a
/// phase (so the faults of the whole phase, not only the last one, are in its entries), short
/// enough that the busiest keys are trimmed.
const FILE: &str = r#"# written by chaos (load/src/bin/chaos/views.rs)
[views.chaos_top]
from = "ticks"
top_n = { order_by = ["n desc", "id"], limit = 10 }

[views.chaos_groups]
from = "ticks"
[views.chaos_groups.group_by]
by = ["g"]
aggregates = { rows = "count()", total = "sum(price)", low = "min(n)", high = "max(n)" }

[views.chaos_delta]
from = "ticks"
delta = { columns = ["n"] }

[views.chaos_history]
from = "ticks"
history = { limit = 40, columns = ["n"] }
"#;

/// The views of `FILE`, in the order they are checked.
const VIEWS: [&str; 4] = ["chaos_top", "chaos_groups", "chaos_delta", HISTORY];

/// The `history` view and its `limit`.
const HISTORY: &str = "chaos_history";
const HISTORY_LIMIT: usize = 40;

/// The views clients watch the whole run (a delta's rows carry the input's `n`, a history's
/// last entry does: the clients check every value as they do the table's).
pub const WATCHED: [&str; 2] = ["chaos_delta", HISTORY];

/// Rows of the top view.
const TOP: usize = 10;

/// Output rows reduced to what the oracle knows: key -> canonical text.
type Rows = BTreeMap<String, String>;

/// Writes the views file into `work`; its path.
pub fn write_file(work: &Path) -> anyhow::Result<PathBuf> {
    let path = work.join("views.toml");
    std::fs::write(&path, FILE)?;
    Ok(path)
}

/// What each view must hold when the table is `want` (`{key: n}`).
fn expected(view: &str, want: &State) -> Rows {
    match view {
        "chaos_top" => {
            let mut rows: Vec<(&String, i64)> = want.iter().map(|(k, n)| (k, *n)).collect();
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            rows.iter()
                .take(TOP)
                .enumerate()
                .map(|(i, (k, n))| ((*k).clone(), format!("n={n} rank={}", i + 1)))
                .collect()
        }
        "chaos_groups" => {
            // group -> (rows, total in thousandths, low, high)
            let mut groups: BTreeMap<String, (u64, i128, i64, i64)> = BTreeMap::new();
            for n in want.values() {
                let g = groups
                    .entry(group_of(*n))
                    .or_insert((0, 0, i64::MAX, i64::MIN));
                g.0 += 1;
                g.1 += thousandths(&price_of(*n)).unwrap_or(i128::MIN / 2);
                g.2 = g.2.min(*n);
                g.3 = g.3.max(*n);
            }
            groups
                .into_iter()
                .map(|(g, (rows, total, low, high))| {
                    (
                        g,
                        format!("rows={rows} total={total}/1000 low={low} high={high}"),
                    )
                })
                .collect()
        }
        _ => want
            .iter()
            .map(|(k, n)| (k.clone(), format!("n={n}")))
            .collect(),
    }
}

/// An output row of `view` reduced as [`expected`] does (`?` for a column it lacks or cannot
/// read).
fn canonical(view: &str, row: &Value) -> String {
    let int = |c: &str| {
        row[c]
            .as_i64()
            .map_or_else(|| format!("?{}", row[c]), |n| n.to_string())
    };
    match view {
        "chaos_top" => format!("n={} rank={}", int("n"), int("rank")),
        "chaos_groups" => {
            let total = match &row["total"] {
                Value::String(s) => thousandths(s).map(|t| format!("{t}/1000")),
                _ => None,
            }
            .unwrap_or_else(|| format!("?{}", row["total"]));
            format!(
                "rows={} total={total} low={} high={}",
                int("rows"),
                int("low"),
                int("high")
            )
        }
        // an entry kept to `n` alone, or `null`
        HISTORY => match row["history"].as_array() {
            Some(entries) => entries
                .iter()
                .map(|e| match e {
                    Value::Null => "-".to_string(),
                    e => match (e.as_object().map(|o| o.len()), e["n"].as_i64()) {
                        (Some(1), Some(n)) => n.to_string(),
                        _ => format!("?{e}"),
                    },
                })
                .collect::<Vec<_>>()
                .join(","),
            None => format!("?{}", row["history"]),
        },
        _ => format!("n={}", int("n")),
    }
}

/// What is wrong with the history rows `have` (canonical: entries joined by `,`, `-` for a
/// delete) against every change produced (`changes`): per key, entries that are not changes of
/// that key in the order produced, more than the limit, and (when `current`) a last entry other
/// than the key's last change, or no row for a key the table holds.
fn history_faults(have: &Rows, changes: &Changes, current: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (k, h) in have {
        let Some(entries) = entries_of(h) else {
            out.push(format!("{k}: unreadable history {h}"));
            continue;
        };
        let Some(all) = changes.get(k) else {
            out.push(format!("{k}: never written -> {h}"));
            continue;
        };
        if entries.len() > HISTORY_LIMIT {
            out.push(format!(
                "{k}: {} entries > limit {HISTORY_LIMIT}: {h}",
                entries.len()
            ));
        } else if entries.windows(2).any(|w| w[0] == w[1]) {
            // the operator adds no entry equal to the one before (two deletes in a row)
            out.push(format!("{k}: an entry repeats the one before: {h}"));
        } else if positions(&entries, all).is_none() {
            out.push(format!(
                "{k}: {h} is not in the order of the key's changes (last {:?})",
                &all[all.len().saturating_sub(8)..]
            ));
        } else if current && entries.last() != all.last() {
            out.push(format!("{k}: last change {:?} -> {h}", all.last()));
        }
    }
    if current {
        for (k, all) in changes {
            if let (Some(Some(n)), false) = (all.last(), have.contains_key(k)) {
                out.push(format!("{k}: n={n} -> no history"));
            }
        }
    }
    out
}

/// The entries of a canonical history row (`None`: a delete); `None` when one is unreadable.
fn entries_of(h: &str) -> Option<Vec<Option<i64>>> {
    h.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e == "-" {
                Some(None)
            } else {
                e.parse().ok().map(Some)
            }
        })
        .collect()
}

/// Where each of `entries` is in `all` when they are some of it in the same order (matched
/// from the end: the latest such places); `None` when they are not.
fn positions(entries: &[Option<i64>], all: &[Option<i64>]) -> Option<Vec<usize>> {
    let mut at = all.len();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries.iter().rev() {
        at = all[..at].iter().rposition(|c| c == e)?;
        out.push(at);
    }
    out.reverse();
    Some(out)
}

/// What the histories of `have` lack of their keys' changes: (keys whose history is not the
/// key's last `limit` changes, changes left out between a history's first and last entry).
/// Changes in flight at a kill arrive as one entry; a record whose delivery failed and is not
/// in the topic is not in the history either; a view that could not read its topic at start
/// begins with the current row.
fn history_merged(have: &Rows, changes: &Changes) -> (usize, usize) {
    let (mut keys, mut skipped) = (0, 0);
    for (k, h) in have {
        let (Some(all), Some(entries)) = (changes.get(k), entries_of(h)) else {
            continue;
        };
        let last = &all[all.len().saturating_sub(HISTORY_LIMIT)..];
        if entries != last {
            keys += 1;
        }
        if let Some(p) = positions(&entries, all) {
            if let (Some(first), Some(end)) = (p.first(), p.last()) {
                skipped += end - first + 1 - p.len();
            }
        }
    }
    (keys, skipped)
}

/// Keys of a view's topic whose `n` is above the table's for that key: never a leftover of an
/// earlier write, since a key's `n` only grows (one counter for every change). Not known for
/// the groups.
fn ahead(view: &str, have: &Rows, table: &State) -> Vec<String> {
    if view == "chaos_groups" {
        return Vec::new();
    }
    have.iter()
        .filter_map(|(k, v)| {
            let n: i64 = v.strip_prefix("n=")?.split(' ').next()?.parse().ok()?;
            let want = table.get(k)?;
            (n > *want).then(|| format!("{k}: {want} -> {v}"))
        })
        .collect()
}

/// Whether a serving node logged that it was given views to write since it last started.
fn writer_assigned(nodes: &[Node], serving: &[usize]) -> bool {
    serving.iter().any(|i| {
        nodes[*i]
            .proc
            .log_since("starting livetable")
            .contains("views writer: views assigned")
    })
}

/// A plain decimal string with at most 3 digits after the point, in thousandths (exact).
fn thousandths(s: &str) -> Option<i128> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = format!("{frac:0<3}");
    Some(int.parse::<i128>().ok()? * 1000 + frac.parse::<i128>().ok()?)
}

/// `view` on `node`'s API, reduced; `None` when it does not answer 200.
async fn api(node: &Node, view: &str) -> Option<Rows> {
    node.rows(view, |v| Some(canonical(view, v))).await
}

/// The view's changelog topic folded: the last record per key, a tombstone removing it.
fn fold_view_topic(brokers: &str, topic: &str, view: &str) -> anyhow::Result<Rows> {
    use rdkafka::message::Message;
    fold_topic_msgs(brokers, topic, |m: &mut Rows, r| {
        let Some(k) = r.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        match r
            .payload()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
        {
            Some(row) => {
                m.insert(k, canonical(view, &row));
            }
            None => {
                m.remove(&k);
            }
        }
    })
}

/// Whether a view's rows had nothing wrong (`(rows, what is wrong)`).
fn right(got: &(Rows, Vec<String>)) -> bool {
    got.1.is_empty()
}

/// The final checks of the views when the table's oracle is `table` and every change produced
/// was `changes`: every serving node's API (polled until right or `settle` passed), each view's
/// topic folded, and the clients of the [`WATCHED`] views. `tag` names a later check (client reports only
/// without one, as [`crate::phase`]'s table checks).
#[allow(clippy::too_many_arguments)]
pub async fn check(
    ctx: &Ctx,
    nodes: &[Node],
    serving: &[usize],
    clients: &[Client],
    table: &State,
    changes: &Changes,
    settle: Duration,
    group: &str,
    tag: &str,
) -> anyhow::Result<(Vec<TableCheck>, Vec<ClientReport>)> {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    for view in VIEWS {
        let want = expected(view, table);
        // what is wrong with rows of the view; `current`: they must be up to date (else only
        // what no lag explains: a value no table ever held)
        let faults = |have: &Rows, current: bool| match (view, current) {
            (HISTORY, _) => history_faults(have, changes, current),
            (_, true) => diff(&want, have),
            (_, false) => ahead(view, have, table),
        };
        let mut tc = TableCheck {
            table: format!("view {view}{tag}"),
            oracle_rows: want.len(),
            ..Default::default()
        };
        for i in serving {
            let n = &nodes[*i];
            // the rows, and what is wrong with them: asked until nothing is
            let f = &faults;
            let (have, wrong) =
                settled_when(settle, Duration::from_millis(200), right, || async move {
                    let have = api(n, view).await.unwrap_or_default();
                    let wrong = f(&have, true);
                    Ok((have, wrong))
                })
                .await?;
            tc.api_lost += differing(&mut tc.details, &format!("API of {}", n.name), &wrong);
            // counted once per phase (the later check would count the same histories again)
            if view == HISTORY && tag.is_empty() {
                let (keys, skipped) = history_merged(&have, changes);
                tc.history_merged += keys;
                tc.history_skipped += skipped;
            }
        }
        // one serving node writes the topic, about a second behind the view
        let topic = format!("{group}.table.__view.{view}");
        let within = settle.min(Duration::from_secs(60));
        let f = &faults;
        let (have, wrong) = settled_when(within, Duration::from_secs(2), right, || {
            let (b, t) = (ctx.brokers.clone(), topic.clone());
            async move {
                let have = tokio::task::spawn_blocking(move || fold_view_topic(&b, &t, view))
                    .await?
                    .unwrap_or_default();
                let wrong = f(&have, true);
                Ok((have, wrong))
            }
        })
        .await?;
        if wrong.is_empty() || serving.len() != 1 || writer_assigned(nodes, serving) {
            tc.changelog_lost = differing(&mut tc.details, &format!("view topic {topic}"), &wrong);
        } else {
            // the only serving node was not given the views since it last started (the local
            // broker held the group `<group>.views`): nothing wrote the topic since, so it may
            // lag (RELIABILITY.md, VIEWS-GROUP-1); a value no lag explains is counted
            let unexplained = faults(&have, false);
            let lag: Vec<String> = wrong
                .into_iter()
                .filter(|w| !unexplained.contains(w))
                .collect();
            tc.changelog_lost = differing(
                &mut tc.details,
                &format!("view topic {topic}: values no lag explains"),
                &unexplained,
            );
            tc.view_topic_unwritten = differing(
                &mut tc.details,
                &format!("view topic {topic} (VIEWS-GROUP-1: no serving node was assigned the views since its last start)"),
                &lag,
            );
        }
        if WATCHED.contains(&view) {
            let wait = Duration::from_secs(if tc.api_lost == 0 { 30 } else { 5 });
            let (lost, r) = check_clients(clients, view, table, wait).await;
            tc.clients_lost = lost;
            reports.extend(r);
        }
        checks.push(tc);
    }
    Ok((checks, if tag.is_empty() { reports } else { Vec::new() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousandths_are_exact() {
        assert_eq!(thousandths("12.345"), Some(12_345));
        assert_eq!(thousandths("12.3"), Some(12_300));
        assert_eq!(thousandths("7"), Some(7_000));
        assert_eq!(thousandths("1.2345"), None);
        assert_eq!(thousandths("-1.2"), None);
        assert_eq!(thousandths("1e3"), None);
    }

    #[test]
    fn expected_rows_follow_the_oracle() {
        let want: State = [("a", 12), ("b", 7), ("c", 17)]
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect();
        let top = expected("chaos_top", &want);
        assert_eq!(top["c"], "n=17 rank=1");
        assert_eq!(top["b"], "n=7 rank=3");
        // 12 and 17 are both in g2, 7 in g2 as well: one group
        let groups = expected("chaos_groups", &want);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups["g2"], "rows=3 total=36036/1000 low=7 high=17");
        let row =
            serde_json::json!({"g": "g2", "rows": 3, "total": "36.036", "low": 7, "high": 17});
        assert_eq!(canonical("chaos_groups", &row), groups["g2"]);
        let delta = serde_json::json!({"id": "a", "n": 12, "n_change": 5, "n_move": "up"});
        assert_eq!(canonical("chaos_delta", &delta), "n=12");
        // a topic behind the table is not ahead of it; one with a larger `n` is
        let behind: Rows = [("a".to_string(), "n=10".to_string())].into();
        assert!(ahead("chaos_delta", &behind, &want).is_empty());
        let later: Rows = [("a".to_string(), "n=13 rank=1".to_string())].into();
        assert_eq!(
            ahead("chaos_top", &later, &want),
            vec!["a: 12 -> n=13 rank=1"]
        );
    }

    fn rows(r: &[(&str, &str)]) -> Rows {
        r.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_history_must_be_the_keys_changes_in_order_ending_with_the_last() {
        // a: 1, 4, deleted, 9, 12; b: 2, deleted; c: 3
        let changes: Changes = [
            ("a", vec![Some(1), Some(4), None, Some(9), Some(12)]),
            ("b", vec![Some(2), None]),
            ("c", vec![Some(3)]),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
        let row = serde_json::json!({"history": [{"n": 4}, null, {"n": 12}]});
        assert_eq!(canonical(HISTORY, &row), "4,-,12");
        // merged changes (9 missing) are allowed; b's row went with nothing shown
        let good = rows(&[("a", "4,-,12"), ("c", "3")]);
        assert!(history_faults(&good, &changes, true).is_empty());
        // 9 left out between 4 and 12
        assert_eq!(history_merged(&good, &changes), (1, 1));
        let exact = rows(&[("a", "1,4,-,9,12"), ("b", "2,-"), ("c", "3")]);
        assert!(history_faults(&exact, &changes, true).is_empty());
        assert_eq!(history_merged(&exact, &changes), (0, 0));
        // matched at the latest places: b's delete, not an earlier one
        assert_eq!(
            positions(&[None], &[Some(1), None, Some(2), None]),
            Some(vec![3])
        );
        assert_eq!(positions(&[Some(2), Some(1)], &[Some(1), Some(2)]), None);
        // out of order, another key's value, a delete that did not happen, stale, missing
        let long = vec!["12"; HISTORY_LIMIT + 1].join(",");
        for (a, what) in [
            ("9,4,12", "not in the order"),
            ("4,3,12", "not in the order"),
            ("1,4,-,-,12", "repeats"),
            ("1,-,4,12", "not in the order"),
            ("1,4,-,9,12,12", "repeats"),
            ("1,-,-,12", "repeats"),
            ("4,-,9", "last change"),
            ("", "last change"),
            ("?x", "unreadable"),
            (long.as_str(), "limit"),
        ] {
            let f = history_faults(&rows(&[("a", a), ("c", "3")]), &changes, true);
            assert!(f.len() == 1 && f[0].contains(what), "{a}: {f:?}");
        }
        // entries kept to `n` alone
        let extra = serde_json::json!({"history": [{"n": 4, "id": "a"}, null]});
        assert!(canonical(HISTORY, &extra).starts_with("?{"));
        assert!(canonical(HISTORY, &extra).ends_with("},-"));
        assert_eq!(canonical(HISTORY, &serde_json::json!({"history": []})), "");
        assert!(FILE.contains(&format!("history = {{ limit = {HISTORY_LIMIT}, ")));
        // a stale history is only judged on its order when it need not be current
        assert!(history_faults(&rows(&[("a", "4,-,9")]), &changes, false).is_empty());
        let f = history_faults(&rows(&[("a", "1,4,-,9,12")]), &changes, true);
        assert_eq!(f, vec!["c: n=3 -> no history"]);
        let f = history_faults(&rows(&[("z", "1")]), &changes, false);
        assert!(f[0].contains("never written"), "{f:?}");
    }
}
