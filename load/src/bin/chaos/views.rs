//! Declared views under the same faults as their input: every node gets a views file (`FILE`)
//! over the workload's table; at the end each view, on every serving node's API and folded
//! from its changelog topic, must equal what the test computes from the table's oracle.
//!
//! The views checked are those whose rows are a function of the input's rows (a `top_n`, a
//! `group_by` without `latest`) and a `delta`, whose rows (not its movements, which depend on
//! the past) are the input's latest rows. Each output row is reduced to the columns the oracle
//! knows (`canonical`), so a difference names the key and both values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::clients::Client;
use crate::phase::{
    check_clients, diff, differing, fold_topic_msgs, settled, ClientReport, Ctx, Node, TableCheck,
};
use crate::workload::{group_of, price_of, State};

/// The views declared over the workload's table (`ticks`). `top_n` by the counter (unique), a
/// `group_by` over a column that moves as rows change (retracts from one group, adds to
/// another), and a `delta` of the counter.
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
"#;

/// The views of `FILE`, in the order they are checked.
const VIEWS: [&str; 3] = ["chaos_top", "chaos_groups", "chaos_delta"];

/// The view clients watch the whole run (its rows carry the input's `n`, so the clients check
/// every value as they do the table's).
pub const WATCHED: &str = "chaos_delta";

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
        _ => format!("n={}", int("n")),
    }
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

/// The final checks of the views when the table's oracle is `table`: every serving node's API
/// (polled until equal or `settle` passed), each view's topic folded, and the clients of
/// [`WATCHED`].
pub async fn check(
    ctx: &Ctx,
    nodes: &[Node],
    serving: &[usize],
    clients: &[Client],
    table: &State,
    settle: Duration,
    group: &str,
) -> anyhow::Result<(Vec<TableCheck>, Vec<ClientReport>)> {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    for view in VIEWS {
        let want = expected(view, table);
        let mut tc = TableCheck {
            table: format!("view {view}"),
            oracle_rows: want.len(),
            ..Default::default()
        };
        for i in serving {
            let n = &nodes[*i];
            let have = settled(settle, Duration::from_millis(200), &want, || async {
                Ok(api(n, view).await.unwrap_or_default())
            })
            .await?;
            tc.api_lost += differing(
                &mut tc.details,
                &format!("API of {}", n.name),
                &diff(&want, &have),
            );
        }
        // one serving node writes the topic, about a second behind the view
        let topic = format!("{group}.table.__view.{view}");
        let within = settle.min(Duration::from_secs(60));
        let have = settled(within, Duration::from_secs(2), &want, || async {
            let (b, t) = (ctx.brokers.clone(), topic.clone());
            Ok(
                tokio::task::spawn_blocking(move || fold_view_topic(&b, &t, view))
                    .await?
                    .unwrap_or_default(),
            )
        })
        .await?;
        let d = diff(&want, &have);
        if d.is_empty() || serving.len() != 1 || writer_assigned(nodes, serving) {
            tc.changelog_lost = differing(&mut tc.details, &format!("view topic {topic}"), &d);
        } else {
            // the only serving node was not given the views since it last started (the local
            // broker held the group `<group>.views`): nothing wrote the topic since, so it may
            // lag (RELIABILITY.md, VIEWS-GROUP-1); a value ahead of the table is no lag
            tc.changelog_lost = differing(
                &mut tc.details,
                &format!("view topic {topic}: values ahead of the table"),
                &ahead(view, &have, table),
            );
            tc.view_topic_unwritten = differing(
                &mut tc.details,
                &format!("view topic {topic} (VIEWS-GROUP-1: no serving node was assigned the views since its last start)"),
                &d,
            );
        }
        if view == WATCHED {
            let wait = Duration::from_secs(if tc.api_lost == 0 { 30 } else { 5 });
            let (lost, r) = check_clients(clients, view, table, wait).await;
            tc.clients_lost = lost;
            reports.extend(r);
        }
        checks.push(tc);
    }
    Ok((checks, reports))
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
}
