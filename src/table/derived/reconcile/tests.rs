//! Tracked views (`history`, `delta` over a table) restored from their topics and reconciled
//! with an input that is at, behind or ahead of the topic, against views fed every change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;

use super::super::order::tests::writing;
use super::super::tests::{commit, row, rows_of, run_with_logs, Change, Rng, Run};
use crate::cdc::decode::Row;
use crate::table::derived::Views;
use crate::table::state::{TableState, Tables};
use crate::table::viewlog::read::LogContent;
use crate::table::viewlog::Commit;
use crate::views::{ViewDef, ViewsFile};

const VIEWS: &str = r#"
[views.hist]
from = "scores"
history = { limit = 50, columns = ["score"] }

[views.moves]
from = "scores"
delta = { columns = ["score"] }
"#;
const NAMES: [&str; 2] = ["hist", "moves"];

/// 60 batches of 1 to 3 changes over 6 keys (a key always in one of 2 partitions), with deletes
/// and values that repeat.
fn batches() -> Vec<Vec<Change>> {
    let mut rng = Rng(0x7ac4_e2d1);
    let mut off = 0;
    (0..60)
        .map(|_| {
            (0..1 + rng.below(3))
                .map(|_| {
                    let k = rng.below(6);
                    off += 1;
                    let r = (rng.below(6) > 0).then(|| {
                        row(json!({"player": format!("p{k}"), "team": k % 3, "score": rng.below(8) as i64}))
                    });
                    (format!("p{k}"), r, (k % 2) as u32, off)
                })
                .collect()
        })
        .chain(std::iter::once(vec![(
            "p7".to_string(),
            Some(row(json!({"player": "p7", "team": 1, "score": 1}))),
            1,
            10_000,
        )]))
        .collect()
}

pub(in crate::table::derived) fn start(
    defs: &[ViewDef],
    input: Option<TableState>,
    topic: Option<&LogContentFn<'_>>,
) -> (Arc<Tables>, Run) {
    let tables = Arc::new(Tables::default());
    match input {
        Some(state) => {
            tables.insert(state);
        }
        None => {
            tables.ensure("scores", "e1", "game.scores", 2);
        }
    }
    let none = |_: &str, _: &str| Ok(None);
    let logs: &LogContentFn<'_> = topic.unwrap_or(&none);
    let run = run_with_logs(defs, &[], &tables, &HashMap::new(), logs).unwrap();
    (tables, run)
}

/// Views restored from `logs` over `input`, held at start or (`late`) only after the views
/// started (a node with an empty data directory).
fn start_at(
    defs: &[ViewDef],
    input: &TableState,
    logs: &LogContentFn<'_>,
    late: bool,
) -> (Arc<Tables>, Run) {
    if !late {
        return start(defs, Some(input.clone()), Some(logs));
    }
    let (t, r) = start_without_input(defs, logs);
    t.insert(input.clone());
    (t, r)
}

/// Views started while the node holds no input table yet.
pub(in crate::table::derived) fn start_without_input(
    defs: &[ViewDef],
    logs: &LogContentFn<'_>,
) -> (Arc<Tables>, Run) {
    let tables = Arc::new(Tables::default());
    let run = run_with_logs(defs, &[], &tables, &HashMap::new(), logs).unwrap();
    (tables, run)
}

pub(in crate::table::derived) type LogContentFn<'a> =
    dyn Fn(&str, &str) -> Result<Option<LogContent>, String> + 'a;

/// What view `name`'s topic holds after the first `n` commits of the writer.
pub(in crate::table::derived) fn content(commits: &[Commit], name: &str, n: usize) -> LogContent {
    let mut c = LogContent::default();
    for commit in commits.iter().filter(|c| &*c.view == name).take(n) {
        for (k, r, m) in &commit.changes {
            let value = r.as_ref().map(|r| serde_json::to_vec(&**r).unwrap());
            c.push(
                Some(k.as_bytes()),
                value.as_deref(),
                (Some(m.to_json().as_bytes()), None, b"w1", None),
            );
        }
    }
    c
}

/// What each view's topic holds after every commit of `commits`.
pub(in crate::table::derived) fn whole(
    commits: &[Commit],
) -> impl Fn(&str, &str) -> Result<Option<LogContent>, String> + '_ {
    |name: &str, _: &str| Ok(Some(content(commits, name, usize::MAX)))
}

/// A top 3 of the input by score, and `view` (a views file's text) over it.
fn over_top(view: &str) -> Vec<ViewDef> {
    let top = "[views.top]\nfrom = \"scores\"\n\
               top_n = { order_by = [\"score desc\", \"player\"], limit = 3 }\n\n";
    ViewsFile::parse(&format!("{top}{view}")).unwrap().views
}

fn views_of(tables: &Tables) -> BTreeMap<&'static str, BTreeMap<String, Row>> {
    NAMES.iter().map(|n| (*n, rows_of(tables, n))).collect()
}

fn assert_sent(run: &Run, tables: &Tables, what: &str) {
    let held = run.client.0.lock().unwrap();
    for n in NAMES {
        let sent = held.get(n).map(|(_, r)| r.clone()).unwrap_or_default();
        assert_eq!(
            sent,
            rows_of(tables, n),
            "{what}: clients of {n} hold the view"
        );
    }
}

#[test]
fn tracked_views_come_back_from_their_topic_at_behind_or_ahead_of_their_input() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = batches();
    // the oracle: every change fed in order
    let (oracle_tables, oracle) = start(&defs, None, None);
    for b in &all {
        commit(&oracle_tables, &*oracle.views, b);
    }
    let want = views_of(&oracle_tables);
    assert!(want["hist"]
        .values()
        .any(|r| r["history"].as_array().unwrap().len() > 4));

    // the writer: its commits (what the topics get), the input after each batch, and how many
    // commits of each view there were by then
    let (tables, w) = start(&defs, None, None);
    let rx = writing(&w.views);
    let mut inputs: Vec<TableState> = vec![tables.get("scores").unwrap().read().clone()];
    let mut commits: Vec<Commit> = Vec::new();
    let mut counts: Vec<HashMap<String, usize>> = vec![HashMap::new()];
    for b in &all {
        commit(&tables, &*w.views, b);
        commits.extend(rx.try_iter());
        inputs.push(tables.get("scores").unwrap().read().clone());
        let mut n: HashMap<String, usize> = HashMap::new();
        for c in &commits {
            *n.entry(c.view.to_string()).or_default() += 1;
        }
        counts.push(n);
    }
    assert_eq!(views_of(&tables), want);
    let at = |k: usize| {
        let counts = counts[k].clone();
        let commits = &commits;
        move |name: &str, _: &str| {
            Ok(Some(content(
                commits,
                name,
                counts.get(name).copied().unwrap_or(0),
            )))
        }
    };

    // the topic holds what the input holds (an idle input, a clean hand-over), or more (the
    // input lost its last changes and reads them again): exact; also when the input table
    // arrives only after the views started (a node with an empty data directory)
    let cases = [(0, 0), (20, 20), (60, 60), (20, 35), (0, 60), (41, 42)];
    for ((input_at, topic_at), late) in cases.iter().flat_map(|c| [(*c, false), (*c, true)]) {
        let logs = at(topic_at);
        let (t, r) = start_at(&defs, &inputs[input_at], &logs, late);
        for b in &all[input_at..] {
            commit(&t, &*r.views, b);
        }
        let what = format!("input at {input_at}, topic at {topic_at}, late {late}");
        assert_eq!(views_of(&t), want, "{what}");
        assert_sent(&r, &t, &what);
        if topic_at > 0 {
            assert_eq!(
                r.metrics
                    .view_log_restores
                    .with_label_values(&["hist"])
                    .get(),
                1
            );
        }
    }

    // the topic lacks the input's last changes (in flight when its writer died): each key's
    // changes since its row arrive as one, then every change after
    let cases = [(10, 30), (0, 25), (45, 60)];
    for ((topic_at, input_at), late) in cases.iter().flat_map(|c| [(*c, false), (*c, true)]) {
        let logs = at(topic_at);
        let (t, r) = start_at(&defs, &inputs[input_at], &logs, late);
        for b in &all[input_at..] {
            commit(&t, &*r.views, b);
        }
        // the same, fed: the changes up to the topic, then per key changed since its row at
        // the input's position, then the rest
        let (et, e) = start(&defs, None, None);
        for b in &all[..topic_at] {
            commit(&et, &*e.views, b);
        }
        let mut last: BTreeMap<String, Change> = BTreeMap::new();
        for c in all[topic_at..input_at].iter().flatten() {
            last.insert(c.0.clone(), c.clone());
        }
        commit(&et, &*e.views, &last.into_values().collect::<Vec<_>>());
        for b in &all[input_at..] {
            commit(&et, &*e.views, b);
        }
        let what = format!("topic at {topic_at}, input at {input_at}, late {late}");
        assert_eq!(views_of(&t), views_of(&et), "{what}");
        assert_sent(&r, &t, &what);
    }
}

#[test]
fn a_tracked_view_keeps_its_past_when_its_input_is_replaced() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = batches();
    let (oracle_tables, oracle) = start(&defs, None, None);
    let (tables, r) = start(&defs, None, None);
    for (i, b) in all.iter().enumerate() {
        commit(&oracle_tables, &*oracle.views, b);
        if i % 15 == 7 {
            // a restore or hand-over: the same rows, an update count that does not follow on
            let mut state: TableState = tables.get("scores").unwrap().read().clone();
            state.useq += 5;
            tables.insert(state);
        }
        commit(&tables, &*r.views, b);
    }
    assert_eq!(views_of(&tables), views_of(&oracle_tables));
    assert_sent(&r, &tables, "replaced inputs");
    let rebuilds = r.metrics.view_rebuilds.with_label_values(&["hist"]).get();
    assert_eq!(rebuilds, 5, "at start, then at each replacement");
}

#[test]
fn a_topic_of_another_lineage_or_definition_is_not_skipped_through() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = batches();
    let (tables, commits) = written(&defs, &all[..30]);
    let written = views_of(&tables);
    // the input in another lineage, empty: its changes are new to the view, not held
    let logs = whole(&commits);
    let other = TableState::new("scores", "e2", "game.scores", 2);
    let (t, r) = start(&defs, Some(other), Some(&logs));
    // restored, then reconciled with an empty input: every history ends with a delete, every
    // delta row goes
    let hist = rows_of(&t, "hist");
    assert_eq!(hist.len(), written["hist"].len());
    for (k, row) in &hist {
        let entries = row["history"].as_array().unwrap();
        assert_eq!(entries.last(), Some(&json!(null)), "{k}");
    }
    assert!(rows_of(&t, "moves").is_empty());
    commit(&t, &*r.views, &all[0]);
    for (key, r2, _, _) in &all[0] {
        let entries = rows_of(&t, "hist")[key]["history"]
            .as_array()
            .unwrap()
            .clone();
        let want = r2
            .as_ref()
            .map_or(json!(null), |r| json!({"score": r["score"]}));
        assert_eq!(entries.last(), Some(&want), "{key}: taken, not skipped");
    }

    // rows of another definition: not restored at all
    let mut c = content(&commits, "hist", usize::MAX);
    c.other_def.insert("p1".into());
    let cell = std::sync::Mutex::new(Some(c));
    let logs = |name: &str, _: &str| {
        Ok((name == "hist")
            .then(|| cell.lock().unwrap().take())
            .flatten())
    };
    let (t, r) = start(
        &defs,
        Some(tables.get("scores").unwrap().read().clone()),
        Some(&logs),
    );
    assert_eq!(
        r.metrics
            .view_log_restores
            .with_label_values(&["hist"])
            .get(),
        0
    );
    let hist = rows_of(&t, "hist");
    assert!(hist
        .values()
        .all(|r| r["history"].as_array().unwrap().len() == 1));
}

#[test]
fn a_partition_whose_offsets_restart_is_taken_again() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    // the input topic created again, with as many partitions or with one more
    for added in [false, true] {
        let (tables, r) = start(&defs, None, None);
        let s = |n: i64| Some(row(json!({"player": "p1", "score": n})));
        commit(&tables, &*r.views, &[("p1".into(), s(1), 0, 500)]);
        commit(&tables, &*r.views, &[("p1".into(), s(2), 0, 501)]);
        // its offsets start over
        tables.get("scores").unwrap().update_slices(|t| {
            if added {
                let parts = t.slices.len() as u32;
                t.slice_mut(parts);
            }
            let slice = t.slice_mut(0);
            slice.last_off = -1;
            slice.resets += 1;
        });
        commit(&tables, &*r.views, &[("p1".into(), s(3), 0, 4)]);
        assert_eq!(
            rows_of(&tables, "hist")["p1"]["history"],
            json!([{"score": 1}, {"score": 2}, {"score": 3}]),
            "the change at a lower offset after the restart is taken (partition added: {added})"
        );
        assert_eq!(rows_of(&tables, "moves")["p1"]["score_change"], json!(1));
    }
}

/// `pa` at 1, then `pk` created at 2, changed at 3, deleted at 4, then `pa` at 5 (partition 0).
fn pk_deleted() -> Vec<Vec<Change>> {
    let s = |k: &str, n: i64| Some(row(json!({"player": k, "score": n})));
    vec![
        vec![("pa".into(), s("pa", 1), 0, 1)],
        vec![("pk".into(), s("pk", 5), 0, 2)],
        vec![("pk".into(), s("pk", 7), 0, 3)],
        vec![("pk".into(), None, 0, 4)],
        vec![("pa".into(), s("pa", 2), 0, 5)],
    ]
}

/// A clean stop of `run` over `tables`, and a start from what it saved, over a copy of its
/// input.
fn restarted_clean(defs: &[ViewDef], tables: &Tables, run: &Run) -> (Arc<Tables>, Run) {
    let saved: HashMap<String, Vec<u8>> = run.views.save().into_iter().collect();
    assert!(saved.contains_key("moves"));
    let t2 = Arc::new(Tables::default());
    t2.insert(tables.get("scores").unwrap().read().clone());
    let r2 = super::super::tests::run(defs, &t2, &saved);
    (t2, r2)
}

#[test]
fn a_delta_restored_ahead_of_its_input_does_not_bring_back_a_deleted_key() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = pk_deleted();
    let (_, commits) = written(&defs, &all);
    let logs = whole(&commits);
    // then `pk` is created again, and must show
    let pk9 = Some(row(json!({"player": "pk", "score": 9})));
    let again = vec![("pk".into(), pk9, 0, 6)];
    let (fed, _) = written(&defs, &[all.clone(), vec![again.clone()]].concat());
    let pk_in = |t: &Tables| rows_of(t, "moves").contains_key("pk");
    // the input lost its last changes (kill -9) and reads them again, one at a time or in one
    // update: the topic holds the delete of `pk`, so its re-read changes are not taken again
    for (behind, whole_update) in [(1, false), (2, false), (3, false), (1, true), (2, true)] {
        let what = format!("input at {behind}, in one update {whole_update}");
        let (t, r) = start(&defs, Some(input_after(&defs, &all, behind)), Some(&logs));
        let sent = writing(&r.views);
        assert!(!pk_in(&t), "{what}: `pk` came back at start");
        let rest: Vec<Vec<Change>> = if whole_update {
            vec![all[behind..].concat()]
        } else {
            all[behind..].to_vec()
        };
        for (i, b) in rest.iter().enumerate() {
            commit(&t, &*r.views, b);
            assert!(!pk_in(&t), "{what}: `pk` came back after update {i}");
        }
        let pk_sent = sent
            .try_iter()
            .filter(|c| &*c.view == "moves")
            .flat_map(|c| c.changes)
            .filter(|(k, _, _)| k == "pk")
            .count();
        assert_eq!(pk_sent, 0, "{what}: nothing of `pk` was written");
        commit(&t, &*r.views, &again);
        assert_eq!(views_of(&t), views_of(&fed), "{what}");
        assert_sent(&r, &t, &what);
    }
}

#[test]
fn a_deleted_key_the_input_may_read_again_is_kept_by_a_clean_stop_and_a_rewrite() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = pk_deleted();
    let (fed, commits) = written(&defs, &all);
    let logs = whole(&commits);
    let (t, r) = start(&defs, Some(input_after(&defs, &all, 1)), Some(&logs));
    commit(&t, &*r.views, &all[1]);
    // a clean stop there, and a start from what it saved
    let (t2, r2) = restarted_clean(&defs, &t, &r);
    // its whole rewrite, read back by a node that restores from it
    let (_, _, rewrite) = r2.views.log_snapshot("moves").unwrap();
    let pk = rewrite.iter().find(|(k, _, _)| k == "pk");
    assert!(
        pk.is_some_and(|(_, row, mark)| row.is_none() && mark.at == Some((0, 4))),
        "the rewrite's tombstone names the delete: {pk:?}"
    );
    for b in &all[2..] {
        commit(&t2, &*r2.views, b);
        assert!(
            !rows_of(&t2, "moves").contains_key("pk"),
            "after a clean stop"
        );
    }
    assert_eq!(views_of(&t2), views_of(&fed));
}

/// Each view of `views` as a whole rewrite writes it: what a node that restores from its topic
/// reads.
fn rewritten(views: &Views) -> Vec<Commit> {
    NAMES
        .iter()
        .map(|n| {
            let (off, base, changes) = views.log_snapshot(n).unwrap();
            let view: Arc<str> = (*n).into();
            Commit {
                view,
                off,
                changes,
                base,
            }
        })
        .collect()
}

#[test]
fn a_key_deleted_because_the_input_lacks_it_names_how_far_the_input_had_read() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = pk_deleted();
    let (fed, _) = written(&defs, &all);
    // the topic lacks the last three changes (in flight at a kill -9); the input has them: the
    // restore deletes `pk`, which the input lacks
    let (_, commits) = written(&defs, &all[..2]);
    let (_, a) = start(
        &defs,
        Some(input_after(&defs, &all, 5)),
        Some(&whole(&commits)),
    );
    // this node rewrites the topic, then a kill -9; the next node's input lost everything
    // after offset 1 and reads it again
    let rewrite = rewritten(&a.views);
    let (t, r) = start(
        &defs,
        Some(input_after(&defs, &all, 1)),
        Some(&whole(&rewrite)),
    );
    for (i, b) in all[1..].iter().enumerate() {
        commit(&t, &*r.views, b);
        assert!(
            !rows_of(&t, "moves").contains_key("pk"),
            "`pk` came back after batch {}",
            i + 1
        );
    }
    assert_eq!(rows_of(&t, "moves"), rows_of(&fed, "moves"));
    // the history's changes the topic lacked arrive as one (its delete), and are not taken
    // again when the input reads them again
    assert_eq!(
        rows_of(&t, "hist")["pk"]["history"],
        json!([{"score": 5}, null])
    );
}

#[test]
fn a_key_deleted_because_the_input_lacks_it_takes_a_change_a_new_owner_fills_in() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let s = |k: &str, n: i64| Some(row(json!({"player": k, "score": n})));
    let all: Vec<Vec<Change>> = vec![
        vec![("pk".into(), s("pk", 5), 0, 5)],
        vec![("pk".into(), None, 0, 7)],
        vec![("pk".into(), s("pk", 9), 0, 9)],
        vec![("pl".into(), s("pl", 1), 0, 10)],
    ];
    let (fed, _) = written(&defs, &all);
    // the topic holds `pk` at 5; the input was handed over with its changelog acknowledged up
    // to 6: it holds the delete at 7 and `pl` at 10, not `pk`'s change at 9 (its former owner
    // applied it, its changelog lost it), which it fills in later
    let (_, commits) = written(&defs, &all[..1]);
    let mut input = input_after(&defs, &[&all[..2], &all[3..]].concat(), 3);
    let slice = input.slice_mut(0);
    slice.acked = 6;
    slice.tombs = HashMap::from([("pk".to_string(), 7)]);
    let (t, r) = start(&defs, Some(input), Some(&whole(&commits)));
    assert!(!rows_of(&t, "moves").contains_key("pk"));
    commit(&t, &*r.views, &all[2]);
    assert_eq!(
        rows_of(&t, "moves").get("pk"),
        rows_of(&fed, "moves").get("pk"),
        "the change filled in below the input's position is taken"
    );
    assert_eq!(
        rows_of(&t, "hist")["pk"]["history"],
        json!([{"score": 5}, null, {"score": 9}])
    );
}

#[test]
fn a_tracked_view_of_a_tracked_view_is_restored_too() {
    let defs = ViewsFile::parse(
        "[views.moves]\nfrom = \"scores\"\ndelta = { columns = [\"score\"] }\n\n\
         [views.moved]\nfrom = \"moves\"\nhistory = { limit = 9, columns = [\"score_move\"] }\n",
    )
    .unwrap()
    .views;
    let s = |n: i64| Some(row(json!({"player": "p1", "score": n})));
    let changes: Vec<Vec<Change>> = [3, 5, 4, 9]
        .iter()
        .enumerate()
        .map(|(i, n)| vec![("p1".to_string(), s(*n), 0, i as i64)])
        .collect();
    let (tables, commits) = written(&defs, &changes);
    let want = rows_of(&tables, "moved");
    assert_eq!(
        want["p1"]["history"],
        json!([{"score_move": null}, {"score_move": 2}, {"score_move": 1}, {"score_move": 5}])
    );
    let logs = whole(&commits);
    let (t, r) = start(
        &defs,
        Some(tables.get("scores").unwrap().read().clone()),
        Some(&logs),
    );
    assert_eq!(rows_of(&t, "moved"), want, "restored, not started again");
    assert_eq!(
        r.metrics
            .view_log_restores
            .with_label_values(&["moved"])
            .get(),
        1
    );
    commit(&t, &*r.views, &[("p1".into(), s(2), 0, 9)]);
    assert_eq!(
        rows_of(&t, "moved")["p1"]["history"],
        json!([{"score_move": null}, {"score_move": 2}, {"score_move": 1}, {"score_move": 5}, {"score_move": 7}])
    );
}

#[test]
fn a_topic_not_read_at_start_is_restored_when_this_node_takes_it_over() {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let all = batches();
    let (tables, commits) = written(&defs, &all);
    let want = views_of(&tables);
    let down = |_: &str, _: &str| Err("the broker does not answer".to_string());
    let (t, r) = start(
        &defs,
        Some(tables.get("scores").unwrap().read().clone()),
        Some(&down),
    );
    assert!(
        rows_of(&t, "hist")
            .values()
            .all(|r| r["history"].as_array().unwrap().len() == 1),
        "started from the current rows"
    );
    for n in NAMES {
        r.views.restore_unread(n, &content(&commits, n, usize::MAX));
    }
    assert_eq!(views_of(&t), want, "restored at the take-over");
    assert_sent(&r, &t, "restored at the take-over");
    // once only: a later take-over's read changes nothing
    r.views.restore_unread("hist", &LogContent::default());
    r.views
        .restore_unread("hist", &content(&commits, "hist", 3));
    assert_eq!(views_of(&t), want);
}

/// A writer's commits of `defs` over `batches` of the input.
pub(in crate::table::derived) fn written(
    defs: &[ViewDef],
    batches: &[Vec<Change>],
) -> (Arc<Tables>, Vec<Commit>) {
    let (tables, w) = start(defs, None, None);
    let rx = writing(&w.views);
    for b in batches {
        commit(&tables, &*w.views, b);
    }
    let commits = rx.try_iter().collect();
    (tables, commits)
}

#[test]
fn a_restored_view_of_a_view_waits_for_that_view_to_be_fed() {
    let defs =
        over_top("[views.tops]\nfrom = \"top\"\nhistory = { limit = 9, columns = [\"score\"] }\n");
    let all = batches();
    let (tables, commits) = written(&defs, &all[..30]);
    let topic = rows_of(&tables, "tops");
    assert!(!topic.is_empty());
    // a node with an empty data directory: no input table yet, `top` holds nothing
    let logs = whole(&commits);
    let (t, r) = start_without_input(&defs, &logs);
    assert_eq!(
        rows_of(&t, "tops"),
        topic,
        "restored, nothing taken from the empty `top`"
    );
    t.insert(tables.get("scores").unwrap().read().clone());
    commit(&t, &*r.views, &all[30]);
    // the same as a node that ran throughout: no delete taken while `top` was empty
    let (oracle, _) = written(&defs, &all[..31]);
    assert_eq!(rows_of(&t, "tops"), rows_of(&oracle, "tops"));
}

/// Views over an input that has not read offset 50 of partition 0 yet (it is at 10), restored
/// from a topic whose `pk` holds that change (score 5): `pk` waits for the input.
fn pk_waiting() -> (Vec<ViewDef>, Arc<Tables>, Run) {
    let defs = ViewsFile::parse(VIEWS).unwrap().views;
    let k = |n: i64| Some(row(json!({"player": "pk", "score": n})));
    let (_, commits) = written(&defs, &[vec![("pk".into(), k(5), 0, 50)]]);
    let logs = whole(&commits);
    let mut input = TableState::new("scores", "e1", "game.scores", 2);
    input.slice_mut(0).last_off = 10;
    let (t, r) = start(&defs, Some(input), Some(&logs));
    (defs, t, r)
}

#[test]
fn a_waiting_key_of_a_partition_whose_offsets_restart_is_deleted() {
    // the input has not read offset 50 of partition 0 yet: `pk` waits
    let (_, t, r) = pk_waiting();
    assert_eq!(rows_of(&t, "hist")["pk"]["history"], json!([{"score": 5}]));
    assert!(rows_of(&t, "moves").contains_key("pk"));
    // its offsets restart: offset 50 will never come; the input lacks `pk`, so it goes
    t.get("scores").unwrap().update_slices(|s| {
        let slice = s.slice_mut(0);
        slice.last_off = -1;
        slice.resets += 1;
    });
    let j = Some(row(json!({"player": "pj", "score": 1})));
    commit(&t, &*r.views, &[("pj".into(), j, 0, 3)]);
    assert_eq!(
        rows_of(&t, "hist")["pk"]["history"],
        json!([{"score": 5}, null])
    );
    assert!(!rows_of(&t, "moves").contains_key("pk"));
}

#[test]
fn a_waiting_key_waits_on_through_a_clean_stop() {
    let j = |n: i64| Some(row(json!({"player": "pj", "score": n})));
    // the input has not read offset 50 of partition 0 yet: `pk` waits
    let (defs, t, r) = pk_waiting();
    commit(&t, &*r.views, &[("pj".into(), j(1), 0, 11)]);
    // a clean stop there, and a start from what it saved
    let (t2, r2) = restarted_clean(&defs, &t, &r);
    assert!(rows_of(&t2, "moves").contains_key("pk"));
    // the input passes offset 50 without `pk`: it goes
    commit(&t2, &*r2.views, &[("pj".into(), j(2), 0, 60)]);
    assert!(!rows_of(&t2, "moves").contains_key("pk"));
    assert_eq!(
        rows_of(&t2, "hist")["pk"]["history"],
        json!([{"score": 5}, null])
    );
}

#[test]
fn a_waiting_key_the_input_passes_without_an_update_goes_at_the_next_tick() {
    // the input has not read offset 50 of partition 0 yet: `pk` waits
    let (_, t, r) = pk_waiting();
    r.views.tick();
    assert!(rows_of(&t, "moves").contains_key("pk"), "still waiting");
    // the input reads past offset 50 with writes that change no row: no update is published
    t.get("scores")
        .unwrap()
        .update_slices(|s| s.slice_mut(0).last_off = 60);
    assert!(rows_of(&t, "moves").contains_key("pk"));
    r.views.tick();
    assert!(
        !rows_of(&t, "moves").contains_key("pk"),
        "the input passed pk's change without it"
    );
    assert_eq!(
        rows_of(&t, "hist")["pk"]["history"],
        json!([{"score": 5}, null])
    );
    // once: the next tick writes nothing more
    r.views.tick();
    assert_eq!(
        rows_of(&t, "hist")["pk"]["history"],
        json!([{"score": 5}, null])
    );
}

#[test]
fn a_tick_deletes_no_waiting_key_against_an_input_the_view_was_not_fed() {
    let (_, t, r) = pk_waiting();
    // the input table replaced (another lineage, nothing fed to the views yet)
    t.insert(TableState::new("scores", "e2", "game.scores", 2));
    r.views.tick();
    assert!(
        rows_of(&t, "moves").contains_key("pk"),
        "deleted against an input the view was not fed"
    );
    assert_eq!(rows_of(&t, "hist")["pk"]["history"], json!([{"score": 5}]));
}

const TEAMS: &str = r#"
[views.teams]
from = "scores"
history = { limit = 200, key = ["team"], columns = ["player", "score"] }
"#;

/// The input after the first `n` batches.
pub(in crate::table::derived) fn input_after(
    defs: &[ViewDef],
    all: &[Vec<Change>],
    n: usize,
) -> TableState {
    let (tables, _) = written(defs, &all[..n]);
    let state = tables.get("scores").unwrap().read().clone();
    state
}

#[test]
fn a_keyed_history_takes_from_its_input_only_the_rows_changed_past_its_topic() {
    let defs = ViewsFile::parse(TEAMS).unwrap().views;
    let all = batches();
    let fed = |batches: &[Vec<Change>]| rows_of(&written(&defs, batches).0, "teams");
    let want = fed(&all);
    // each team's entries come from keys of both input partitions
    assert!(want
        .values()
        .all(|r| r["history"].as_array().unwrap().len() > 20));
    let (_, commits) = written(&defs, &all);
    assert!(
        commits
            .iter()
            .all(|c| c.changes.iter().all(|(_, _, m)| !m.upto.is_empty())),
        "every record says how far the view took each input partition"
    );

    // the topic holds what the input holds, or more (the input reads its last changes again),
    // also with the input arriving after the views started, or the input replaced (a restore, a
    // slice handed over: an update count that does not follow on): exact
    let cases = [(20, 20), (60, 60), (35, 20), (60, 0), (61, 61)];
    for ((topic_at, input_at), late) in cases.iter().flat_map(|c| [(*c, false), (*c, true)]) {
        let (_, commits) = written(&defs, &all[..topic_at]);
        let logs = whole(&commits);
        let (t, r) = start_at(&defs, &input_after(&defs, &all, input_at), &logs, late);
        for (i, b) in all[input_at..].iter().enumerate() {
            if i == 7 {
                let mut state: TableState = t.get("scores").unwrap().read().clone();
                state.useq += 5;
                t.insert(state);
            }
            commit(&t, &*r.views, b);
        }
        let what = format!("topic at {topic_at}, input at {input_at}, late {late}");
        assert_eq!(rows_of(&t, "teams"), want, "{what}");
        let held = r.client.0.lock().unwrap();
        assert_eq!(held["teams"].1, want, "{what}: clients hold the view");
        let restores = r.metrics.view_log_restores.with_label_values(&["teams"]);
        assert_eq!(restores.get(), 1, "{what}");
    }

    // the topic lacks the input's last changes (in flight when its writer died): each row
    // changed since arrives as one entry, oldest first (a delete among them is not known, nor
    // is the row before a change of the update that brings the view up), then every change
    for ((topic_at, input_at), late) in [(10, 30), (41, 42), (45, 60)]
        .iter()
        .flat_map(|c| [(*c, false), (*c, true)])
    {
        // an input held at start is reconciled with at once; one that arrives later, with its
        // first update
        let next: HashSet<&str> = match late {
            false => HashSet::new(),
            true => all[input_at].iter().map(|c| c.0.as_str()).collect(),
        };
        let mut last: BTreeMap<String, Change> = BTreeMap::new();
        for c in all[topic_at..input_at].iter().flatten() {
            last.insert(c.0.clone(), c.clone());
        }
        let mut gap: Vec<Change> = last
            .into_values()
            .filter(|c| c.1.is_some() && !next.contains(c.0.as_str()))
            .collect();
        gap.sort_by_key(|c| c.3);
        let mut expect: Vec<Vec<Change>> = all[..topic_at].to_vec();
        expect.push(gap);
        expect.extend(all[input_at..].iter().cloned());
        let expect = fed(&expect);
        assert_ne!(expect, want, "the case loses something");
        let (_, commits) = written(&defs, &all[..topic_at]);
        let logs = whole(&commits);
        let (t, r) = start_at(&defs, &input_after(&defs, &all, input_at), &logs, late);
        for b in &all[input_at..] {
            commit(&t, &*r.views, b);
        }
        let what = format!("topic at {topic_at}, input at {input_at}, late {late}");
        assert_eq!(rows_of(&t, "teams"), expect, "{what}");
    }
}

#[test]
fn a_keyed_history_over_a_view_is_computed_again() {
    // the view's lineage is new in each process: a position in it would not hold after a restart
    let defs = over_top(
        "[views.top_teams]\nfrom = \"top\"\nhistory = { limit = 9, key = [\"team\"], columns = [\"player\"] }\n",
    );
    let all = batches();
    let (tables, commits) = written(&defs, &all[..30]);
    assert!(!rows_of(&tables, "top_teams").is_empty());
    assert!(commits
        .iter()
        .filter(|c| &*c.view == "top_teams")
        .all(|c| c.changes.iter().all(|(_, _, m)| m.upto.is_empty())));
    let logs = whole(&commits);
    let (_, r) = start(&defs, Some(input_after(&defs, &all, 30)), Some(&logs));
    let restores = r
        .metrics
        .view_log_restores
        .with_label_values(&["top_teams"]);
    assert_eq!(restores.get(), 0);
}

#[test]
fn a_keyed_history_takes_a_change_below_its_partitions_position_and_refuses_old_topics() {
    let defs = ViewsFile::parse(TEAMS).unwrap().views;
    let all = batches();
    // a change below the partition's last offset (a new owner filling the gap the former
    // owner's changelog left) is taken: positions per input key, not one per partition
    let mut more = all.clone();
    more.push(vec![(
        "p9".to_string(),
        Some(row(json!({"player": "p9", "team": 0, "score": 5}))),
        1,
        7,
    )]);
    let (tables, commits) = written(&defs, &more);
    let team0 = rows_of(&tables, "teams")["0"]["history"].clone();
    let last = team0.as_array().and_then(|h| h.last()).cloned();
    assert_eq!(last, Some(json!({"player": "p9", "score": 5})));
    // restored from that topic and the same input: nothing taken again
    let logs = whole(&commits);
    let input = tables.get("scores").unwrap().read().clone();
    let (t, r) = start(&defs, Some(input.clone()), Some(&logs));
    assert_eq!(rows_of(&t, "teams"), rows_of(&tables, "teams"));
    let restores = r.metrics.view_log_restores.with_label_values(&["teams"]);
    assert_eq!(restores.get(), 1);

    // a topic whose records name no positions (written before they were kept) is not restored:
    // every input row would be taken again on top of its histories
    drop(logs);
    let mut old = Vec::new();
    for mut c in commits {
        for (_, _, m) in c.changes.iter_mut() {
            *m = Arc::new(crate::table::viewlog::Mark {
                upto: Vec::new(),
                ..(**m).clone()
            });
        }
        old.push(c);
    }
    let logs = whole(&old);
    let (_, r) = start(&defs, Some(input), Some(&logs));
    let restores = r.metrics.view_log_restores.with_label_values(&["teams"]);
    assert_eq!(restores.get(), 0);
}

#[test]
fn a_keyed_history_restored_twice_from_topics_ahead_of_its_input_files_nothing_twice() {
    let defs = ViewsFile::parse(TEAMS).unwrap().views;
    let all = batches();
    let want = rows_of(&written(&defs, &all).0, "teams");
    // node b: restored from a topic at 60 over an input at 45 (it lost its last changes and
    // reads them again); the whole view it then writes is node c's topic, over the same input
    let (_, commits) = written(&defs, &all[..60]);
    let logs = whole(&commits);
    let input = input_after(&defs, &all, 45);
    let (_, b) = start(&defs, Some(input.clone()), Some(&logs));
    let (_, _, rewrite) = b.views.log_snapshot("teams").unwrap();
    let mut again = LogContent::default();
    for (k, r, m) in &rewrite {
        let value = r.as_ref().map(|r| serde_json::to_vec(&**r).unwrap());
        again.push(
            Some(k.as_bytes()),
            value.as_deref(),
            (Some(m.to_json().as_bytes()), None, b"w2", None),
        );
    }
    let again = std::sync::Mutex::new(Some(again));
    let logs = |_: &str, _: &str| Ok(again.lock().unwrap().take());
    let (t, c) = start(&defs, Some(input), Some(&logs));
    let saved = |v: &Views| v.save().iter().any(|(n, _)| n == "teams");
    for (i, b) in all[45..].iter().enumerate() {
        if i == 5 {
            // reading again what its rows hold: a clean stop now does not save it (its
            // positions would be the input's, below its rows)
            assert!(!saved(&c.views));
        }
        commit(&t, &*c.views, b);
    }
    assert!(saved(&c.views), "past the restored records: saved again");
    assert_eq!(rows_of(&t, "teams"), want);
    // then an input that does not follow on (a slice handed over): the rows the restored
    // records held, never changed since, are held by their own change now
    let extra = vec![(
        "p1".to_string(),
        Some(row(json!({"player": "p1", "team": 1, "score": 9}))),
        1,
        20_000,
    )];
    let mut state: TableState = t.get("scores").unwrap().read().clone();
    state.useq += 5;
    t.insert(state);
    commit(&t, &*c.views, &extra);
    let mut more = all.clone();
    more.push(extra);
    assert_eq!(
        rows_of(&t, "teams"),
        rows_of(&written(&defs, &more).0, "teams")
    );
    let restores = c.metrics.view_log_restores.with_label_values(&["teams"]);
    assert_eq!(restores.get(), 1);
}

#[test]
fn a_keyed_history_restored_skips_a_gap_its_records_hold_after_dropping_them() {
    let defs = ViewsFile::parse(TEAMS).unwrap().views;
    let all = batches();
    let want = rows_of(&written(&defs, &all[..60]).0, "teams");
    // the change the input lacks: an update of a key seen before, changed again neither in its
    // batch nor after, not the last of its partition nor of its team
    let (b, i) = (40..59)
        .flat_map(|b| (0..all[b].len()).map(move |i| (b, i)))
        .rfind(|(b, i)| {
            let c = &all[*b][*i];
            c.1.is_some()
                && all[..*b]
                    .iter()
                    .flatten()
                    .any(|e| e.0 == c.0 && e.1.is_some())
                && !all[*b..60]
                    .iter()
                    .flatten()
                    .any(|e| e.0 == c.0 && e.3 > c.3)
                && all[*b + 1..60].iter().flatten().any(|e| e.2 == c.2)
                // its team's last entry is another's: the view cannot tell it by that
                && all[*b..60].iter().flatten().any(|e| {
                    e.3 > c.3 && e.1.as_ref().is_some_and(|r| r["team"] == c.1.as_ref().unwrap()["team"])
                })
        })
        .unwrap();
    let gap = all[b][i].clone();
    let mut lacking = all[..60].to_vec();
    lacking[b].remove(i);
    let input = written(&defs, &lacking)
        .0
        .get("scores")
        .unwrap()
        .read()
        .clone();
    let (_, commits) = written(&defs, &all[..60]);
    let logs = whole(&commits);
    let (t, r) = start(&defs, Some(input), Some(&logs));
    assert_eq!(rows_of(&t, "teams"), want);
    // the positions reached the records': dropped, so a clean stop saves the view
    assert!(r.views.save().iter().any(|(n, _)| n == "teams"));
    // the new owner fills the gap: the view holds that change already
    commit(&t, &*r.views, &[gap]);
    assert_eq!(rows_of(&t, "teams"), want);
}
