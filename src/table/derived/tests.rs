use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{Event, Views};
use crate::cdc::decode::{Op, Row};
use crate::metrics::Metrics;
use crate::table::events::EventsTopic;
use crate::table::state::{Delta, RowWrite, TableState, TableUpdate, Tables, UpdateSink};
use crate::table::stored_row::StoredRow;
use crate::views::{ViewDef, ViewsFile};

const FILE: &str = r#"
[views.top3]
from = "scores"
top_n = { order_by = ["score desc", "player"], limit = 3 }

[views.per_team]
from = "scores"
[views.per_team.group_by]
by = ["team"]
aggregates = { n = "count()", total = "sum(score)", best = "max(score)" }

[views.best_team]
from = "per_team"
top_n = { order_by = ["total desc", "team"], limit = 1, rank = "" }
"#;

/// What a client holds: per table, the rows built from the updates it was sent.
/// Per table: the last update number and the rows.
type Held = HashMap<String, (u64, BTreeMap<String, Row>)>;

#[derive(Default)]
pub(super) struct Client(pub(super) Mutex<Held>);

impl UpdateSink for Client {
    fn publish(&self, update: TableUpdate) {
        let mut all = self.0.lock().unwrap();
        let (useq, rows) = all.entry(update.table.to_string()).or_default();
        if &*update.table != "scores" {
            // the test replaces the input table with a later useq; views count on their own
            assert_eq!(
                update.useq,
                *useq + 1,
                "updates of {} in order",
                update.table
            );
        }
        *useq = update.useq;
        for c in update.changes {
            match c.row {
                Some(r) => rows.insert(c.key, (*r).clone()),
                None => rows.remove(&c.key),
            };
        }
    }
}

/// Views started on `tables`, with a collecting client and their own metrics.
pub(super) struct Run {
    pub(super) views: Arc<Views>,
    pub(super) client: Arc<Client>,
    pub(super) metrics: Arc<Metrics>,
}

fn try_run(
    defs: &[ViewDef],
    tables: &Arc<Tables>,
    saved: &HashMap<String, Vec<u8>>,
) -> Result<Run, String> {
    run_events(defs, &[], tables, saved)
}

fn run_events(
    defs: &[ViewDef],
    events: &[EventsTopic],
    tables: &Arc<Tables>,
    saved: &HashMap<String, Vec<u8>>,
) -> Result<Run, String> {
    run_with_logs(defs, events, tables, saved, &|_, _| Ok(None))
}

/// Views started with `logs` answering the reads of their topics at start.
pub(super) fn run_with_logs(
    defs: &[ViewDef],
    events: &[EventsTopic],
    tables: &Arc<Tables>,
    saved: &HashMap<String, Vec<u8>>,
    logs: &super::ReadLog<'_>,
) -> Result<Run, String> {
    let client = Arc::new(Client::default());
    let metrics = Arc::new(Metrics::new());
    let views = Views::start(
        defs,
        events,
        tables.clone(),
        client.clone(),
        metrics.clone(),
        saved,
        logs,
    )?;
    Ok(Run {
        views,
        client,
        metrics,
    })
}

pub(super) fn run(defs: &[ViewDef], tables: &Arc<Tables>, saved: &HashMap<String, Vec<u8>>) -> Run {
    try_run(defs, tables, saved).unwrap()
}

pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub(super) fn row(v: Value) -> StoredRow {
    Arc::new(v.as_object().cloned().unwrap()).into()
}

pub(super) fn rows_of(tables: &Tables, name: &str) -> BTreeMap<String, Row> {
    let t = tables.get(name).unwrap();
    let t = t.read();
    t.rows
        .iter()
        .map(|(k, e)| (k.clone(), (*e.row).clone()))
        .collect()
}

/// The views computed by brute force from the input rows.
fn oracle(input: &BTreeMap<String, Row>) -> HashMap<&'static str, BTreeMap<String, Row>> {
    let score = |r: &Row| r["score"].as_i64().unwrap();
    let mut ranked: Vec<(&String, &Row)> = input.iter().collect();
    ranked.sort_by(|a, b| {
        score(b.1)
            .cmp(&score(a.1))
            .then(a.1["player"].as_str().cmp(&b.1["player"].as_str()))
    });
    let top3 = ranked
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, (k, r))| {
            let mut r = (*r).clone();
            r.insert("rank".into(), json!(i + 1));
            ((*k).clone(), r)
        })
        .collect();
    let mut teams: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for r in input.values() {
        let e = teams
            .entry(r["team"].as_str().unwrap().to_string())
            .or_insert((0, 0, i64::MIN));
        e.0 += 1;
        e.1 += score(r);
        e.2 = e.2.max(score(r));
    }
    let per_team: BTreeMap<String, Row> = teams
        .iter()
        .map(|(t, (n, total, best))| {
            let r = json!({"team": t, "n": n, "total": total, "best": best});
            (t.clone(), r.as_object().cloned().unwrap())
        })
        .collect();
    let best_team = teams
        .iter()
        .max_by(|a, b| a.1 .1.cmp(&b.1 .1).then(b.0.cmp(a.0)))
        .map(|(t, _)| (t.clone(), per_team[t].clone()))
        .into_iter()
        .collect();
    HashMap::from([
        ("top3", top3),
        ("per_team", per_team),
        ("best_team", best_team),
    ])
}

fn write(
    tables: &Tables,
    sink: &dyn UpdateSink,
    changes: &[(String, Option<StoredRow>)],
    off: &mut i64,
) {
    let batch: Vec<Change> = changes
        .iter()
        .map(|(key, r)| {
            *off += 1;
            (key.clone(), r.clone(), (*off % 2) as u32, *off)
        })
        .collect();
    commit(tables, sink, &batch);
}

/// One input change: key, row (`None`: delete), partition, offset.
pub(super) type Change = (String, Option<StoredRow>, u32, i64);

pub(super) fn commit(tables: &Tables, sink: &dyn UpdateSink, batch: &[Change]) {
    let mut d = Delta::new(tables.get("scores").unwrap());
    for (key, r, part, off) in batch {
        d.stage(RowWrite {
            key: key.clone(),
            row: r.clone(),
            op: if r.is_some() { Op::Update } else { Op::Delete },
            part: *part,
            off: *off,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        });
    }
    tables.commit(d, sink);
}

fn check(tables: &Tables, client: &Client) {
    let want = oracle(&rows_of(tables, "scores"));
    let held = client.0.lock().unwrap();
    for (name, rows) in want {
        assert_eq!(rows_of(tables, name), rows, "view {name} == oracle");
        let sent = held.get(name).map(|(_, r)| r.clone()).unwrap_or_default();
        assert_eq!(sent, rows, "what clients of {name} were sent == the view");
    }
}

#[test]
fn views_follow_their_input_through_updates_deletes_and_a_replaced_table() {
    let defs = ViewsFile::parse(FILE).unwrap().views;
    let tables = Arc::new(Tables::default());
    tables.ensure("scores", "e1", "game.scores", 2);
    let Run {
        views,
        client,
        metrics,
    } = run(&defs, &tables, &HashMap::new());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut off = 0;
    for round in 0..400 {
        let n = 1 + rng.below(4);
        let changes: Vec<(String, Option<StoredRow>)> = (0..n)
            .map(|_| {
                let p = rng.below(25);
                let r = (rng.below(5) > 0).then(|| {
                    row(
                        json!({"player": format!("p{p:02}"), "team": format!("t{}", p % 4),
                               "score": rng.below(60) as i64}),
                    )
                });
                (format!("p{p:02}"), r)
            })
            .collect();
        write(&tables, &*views, &changes, &mut off);
        if round % 50 == 0 {
            check(&tables, &client);
        }
    }
    check(&tables, &client);
    let rebuilds = |v: &str| metrics.view_rebuilds.with_label_values(&[v]).get();
    assert_eq!(rebuilds("top3"), 1, "built once at start, then followed");

    // the input table replaced (a restore): the next update does not follow, the view is rebuilt
    let mut state: TableState = tables.get("scores").unwrap().read().clone();
    state.useq += 7;
    tables.insert(state);
    write(
        &tables,
        &*views,
        &[(
            "p01".into(),
            Some(row(json!({"player": "p01", "team": "t1", "score": 99}))),
        )],
        &mut off,
    );
    check(&tables, &client);
    assert_eq!(rebuilds("top3"), 2);
    assert_eq!(
        rebuilds("best_team"),
        1,
        "a view of a view follows its input's commits"
    );
    let top = rows_of(&tables, "top3");
    assert_eq!(top["p01"]["rank"], json!(1));
}

#[test]
fn a_view_starts_from_the_rows_its_input_holds() {
    let defs = ViewsFile::parse(FILE).unwrap().views;
    let tables = Arc::new(Tables::default());
    let t = tables.ensure("scores", "e1", "game.scores", 2);
    let mut d = Delta::new(t);
    for (i, s) in [5, 9, 7, 1].iter().enumerate() {
        d.stage(RowWrite {
            key: format!("p{i}"),
            row: Some(row(
                json!({"player": format!("p{i}"), "team": "a", "score": s}),
            )),
            op: Op::Create,
            part: 0,
            off: i as i64,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        });
    }
    tables.commit(d, &crate::table::state::NoSink);
    let started = run(&defs, &tables, &HashMap::new());
    check(&tables, &started.client);
    let top = rows_of(&tables, "top3");
    let ranks: Vec<(&str, &Value)> = top.iter().map(|(k, r)| (k.as_str(), &r["rank"])).collect();
    assert_eq!(
        ranks,
        [("p0", &json!(3)), ("p1", &json!(1)), ("p2", &json!(2))]
    );
    let info = tables.list();
    assert!(info
        .iter()
        .any(|i| i.name == "best_team" && i.rows == 1 && i.partitions == 1));
}

#[test]
fn a_table_created_after_the_views_started_is_taken_change_by_change() {
    let defs = ViewsFile::parse(
        "[views.hist]\nfrom = \"scores\"\nhistory = { limit = 5, columns = [\"score\"] }\n",
    )
    .unwrap()
    .views;
    let tables = Arc::new(Tables::default());
    let views = run(&defs, &tables, &HashMap::new()).views;
    tables.ensure("scores", "e1", "game.scores", 2);
    let mut off = 0;
    let s = |n: i64| Some(row(json!({"player": "p1", "score": n})));
    write(
        &tables,
        &*views,
        &[("p1".into(), s(1)), ("p1".into(), s(2))],
        &mut off,
    );
    write(&tables, &*views, &[("p1".into(), s(3))], &mut off);
    let hist = rows_of(&tables, "hist");
    assert_eq!(
        hist["p1"]["history"],
        json!([{"score": 1}, {"score": 2}, {"score": 3}]),
        "the first update's two changes are both in the history"
    );
    // a new lineage of the input table (a new epoch): the history keeps its past and takes the
    // new lineage's rows as they come (its positions say nothing about the old ones)
    tables.ensure("scores", "e2", "game.scores", 2);
    write(&tables, &*views, &[("p1".into(), s(4))], &mut off);
    assert_eq!(
        rows_of(&tables, "hist")["p1"]["history"],
        json!([{"score": 1}, {"score": 2}, {"score": 3}, {"score": 4}])
    );
    tables.ensure("scores", "e3", "game.scores", 2);
    write(&tables, &*views, &[("p2".into(), s(5))], &mut off);
    assert_eq!(
        rows_of(&tables, "hist")["p1"]["history"],
        json!([{"score": 1}, {"score": 2}, {"score": 3}, {"score": 4}, null]),
        "a key the new lineage does not have is deleted"
    );
}

#[test]
fn a_view_with_a_table_name_is_refused() {
    let defs = ViewsFile::parse(FILE).unwrap().views;
    let tables = Arc::new(Tables::default());
    tables.ensure("per_team", "e1", "t", 1);
    let e = try_run(&defs, &tables, &HashMap::new())
        .err()
        .expect("refused");
    assert!(e.contains("per_team") && e.contains("line"), "{e}");
}

#[test]
fn a_clean_stop_keeps_a_history_when_the_input_comes_back_unchanged() {
    let defs = ViewsFile::parse(
        "[views.hist]\nfrom = \"scores\"\nhistory = { limit = 5, columns = [\"score\"] }\n",
    )
    .unwrap()
    .views;
    let tables = Arc::new(Tables::default());
    tables.ensure("scores", "e1", "game.scores", 2);
    let none = HashMap::new();
    let views = run(&defs, &tables, &none).views;
    let mut off = 0;
    let s = |n: i64| Some(row(json!({"player": "p1", "score": n})));
    for n in 1..=3 {
        write(&tables, &*views, &[("p1".into(), s(n))], &mut off);
    }
    let saved: HashMap<String, Vec<u8>> = views.save().into_iter().collect();
    let input: TableState = tables.get("scores").unwrap().read().clone();
    let want = json!([{"score": 1}, {"score": 2}, {"score": 3}]);

    // the next process: the input restored at the same token -> the history is loaded
    let restart = |input: TableState| {
        let tables = Arc::new(Tables::default());
        tables.insert(input);
        let r = run(&defs, &tables, &saved);
        (tables, r.views, r.client)
    };
    let (t2, v2, c2) = restart(input.clone());
    assert_eq!(rows_of(&t2, "hist")["p1"]["history"], want);
    write(&t2, &*v2, &[("p1".into(), s(4))], &mut off);
    assert_eq!(
        rows_of(&t2, "hist")["p1"]["history"],
        json!([{"score": 1}, {"score": 2}, {"score": 3}, {"score": 4}]),
        "the loaded view follows the input's next update"
    );
    assert_eq!(c2.0.lock().unwrap()["hist"].1, rows_of(&t2, "hist"));

    // the input moved on while the node was down (another token): rebuilt from its rows
    let mut moved = input;
    moved.slice_mut(1).last_off += 10;
    let (t3, _, _) = restart(moved);
    assert_eq!(rows_of(&t3, "hist")["p1"]["history"], json!([{"score": 3}]));
}

#[test]
fn a_saved_view_whose_definition_changed_is_computed_again() {
    let file = |limit: u32| {
        ViewsFile::parse(&format!(
            "[views.top]\nfrom = \"scores\"\ntop_n = {{ order_by = [\"score desc\", \"player\"], limit = {limit} }}\n"
        ))
        .unwrap()
        .views
    };
    let tables = Arc::new(Tables::default());
    tables.ensure("scores", "e1", "game.scores", 2);
    let none = HashMap::new();
    let views = run(&file(1), &tables, &none).views;
    let mut off = 0;
    let s = |p: &str, n: i64| (p.to_string(), Some(row(json!({"player": p, "score": n}))));
    write(
        &tables,
        &*views,
        &[s("a", 1), s("b", 2), s("c", 3)],
        &mut off,
    );
    let saved: HashMap<String, Vec<u8>> = views.save().into_iter().collect();
    let input: TableState = tables.get("scores").unwrap().read().clone();
    let start = |defs: Vec<ViewDef>| {
        let tables = Arc::new(Tables::default());
        tables.insert(input.clone());
        let r = run(&defs, &tables, &saved);
        (
            rows_of(&tables, "top").len(),
            r.metrics.view_rebuilds.with_label_values(&["top"]).get(),
        )
    };
    assert_eq!(start(file(1)), (1, 0), "unchanged: loaded, not rebuilt");
    assert_eq!(
        start(file(2)),
        (2, 1),
        "limit 1 -> 2: computed again with the new limit"
    );
}

#[test]
fn a_commit_stages_the_last_change_of_each_key() {
    let r = |v: i64| json!({"v": v}).as_object().cloned();
    let out = vec![
        ("a".to_string(), r(1)),
        ("b".to_string(), r(2)),
        ("a".to_string(), None),
        ("c".to_string(), r(3)),
        ("b".to_string(), r(4)),
    ];
    let kept: Vec<(String, Option<i64>)> = super::last_per_key(out)
        .into_iter()
        .map(|(k, r)| (k, r.map(|r| r["v"].as_i64().unwrap())))
        .collect();
    assert_eq!(
        kept,
        [
            ("a".into(), None),
            ("c".into(), Some(3)),
            ("b".into(), Some(4))
        ]
    );
}

/// A view of an events topic whose saved state cannot be read makes every view of that topic
/// read it from its beginning (a sibling that loaded must not resume it past events the other
/// never took); so does a topic declared differently (another Kafka topic or key).
#[test]
fn views_of_an_events_topic_resume_only_all_together_and_as_declared() {
    let defs = ViewsFile::parse(
        "[topics.transfers]\nformat = \"events\"\nkey = [\"account\"]\n\n\
         [views.balances]\nfrom = \"transfers\"\n\
         group_by = { by = [\"account\"], aggregates = { total = \"sum(amount)\" } }\n\n\
         [views.counts]\nfrom = \"transfers\"\n\
         group_by = { by = [\"account\"], aggregates = { n = \"count()\" } }\n",
    )
    .unwrap()
    .views;
    let topic = |key: &str| EventsTopic {
        topic: "bank.transfers".into(),
        name: "transfers".into(),
        key: Some(vec![key.into()]),
    };
    let tables = Arc::new(Tables::default());
    let none = HashMap::new();
    let views = run_events(&defs, &[topic("account")], &tables, &none)
        .unwrap()
        .views;
    let event = |amount: i64, offset: i64| Event {
        key: None,
        row: json!({"account": "A", "amount": amount})
            .as_object()
            .cloned()
            .unwrap(),
        kafka_ts_ms: None,
        polled: None,
        part: 0,
        offset,
    };
    views.feed_events("transfers", &[event(5, 0), event(7, 1)]);
    views.events_read([(("transfers".to_string(), 0), 2)].into_iter());
    let saved: HashMap<String, Vec<u8>> = views.save().into_iter().collect();
    let start = |saved: &HashMap<String, Vec<u8>>, key: &str| {
        let tables = Arc::new(Tables::default());
        let r = run_events(&defs, &[topic(key)], &tables, saved).unwrap();
        (
            r.views.events_start("transfers", 0),
            rows_of(&tables, "balances").len(),
        )
    };
    assert_eq!(start(&saved, "account"), (2, 1), "all load: resumed at 2");

    // views saved at different positions (one restored from its topic before the stop) still
    // load together: the reader starts at the lowest (0 where a view names no position), and
    // each view skips what it holds
    let mut apart = saved.clone();
    let mut sv: Value = serde_json::from_slice(&saved["counts"]).unwrap();
    sv["events_next"] = json!([[0, 2], [1, 5]]);
    apart.insert("counts".into(), serde_json::to_vec(&sv).unwrap());
    let mut sv: Value = serde_json::from_slice(&saved["balances"]).unwrap();
    sv["events_next"] = json!([[0, 1]]);
    apart.insert("balances".into(), serde_json::to_vec(&sv).unwrap());
    let tables = Arc::new(Tables::default());
    let r = run_events(&defs, &[topic("account")], &tables, &apart).unwrap();
    assert_eq!(
        (
            r.views.events_start("transfers", 0),
            r.views.events_start("transfers", 1)
        ),
        (1, 0)
    );
    // offset 1 again: `counts` holds it (its position is 2), `balances` takes it
    r.views.feed_events("transfers", &[event(7, 1)]);
    let balances = rows_of(&tables, "balances");
    let counts = rows_of(&tables, "counts");
    assert_eq!(balances["A"]["total"], json!(19));
    assert_eq!(counts["A"]["n"], json!(2));

    // one saved state unreadable (its operator state of another operator)
    let mut broken = saved.clone();
    let mut sv: Value = serde_json::from_slice(&saved["counts"]).unwrap();
    sv["state"] = json!({"operator": "top_n", "state": {}});
    broken.insert("counts".into(), serde_json::to_vec(&sv).unwrap());
    assert_eq!(
        start(&broken, "account"),
        (0, 0),
        "one not loadable: none loaded, read again from the beginning"
    );
    assert_eq!(
        start(&saved, "player"),
        (0, 0),
        "the topic's key changed: read again from the beginning"
    );
    // saved by a version that did not keep the declaration: taken as unchanged
    let legacy: HashMap<String, Vec<u8>> = saved
        .iter()
        .map(|(name, bytes)| {
            let mut sv: Value = serde_json::from_slice(bytes).unwrap();
            assert!(sv.as_object_mut().unwrap().remove("source").is_some());
            (name.clone(), serde_json::to_vec(&sv).unwrap())
        })
        .collect();
    assert_eq!(start(&legacy, "account"), (2, 1), "an older save resumes");
}

/// A view over events restored from its changelog topic, cut after any commit (a writer killed
/// there), part-way through a commit, or compacted, then fed the events again from where the
/// restore says: every event is counted exactly once (the rows equal a run that never stopped).
/// Feeds `events` of the events input `transfers` to `views` in batches of `chunk`, each
/// followed by the positions it read, as the events reader does.
fn feed_transfers(views: &Views, events: &[Event], chunk: usize) {
    for batch in events.chunks(chunk.max(1)) {
        views.feed_events("transfers", batch);
        let mut read: HashMap<(String, i32), i64> = HashMap::new();
        for e in batch {
            read.insert(("transfers".into(), e.part), e.offset + 1);
        }
        views.events_read(read.into_iter());
    }
}

#[test]
fn views_over_events_restored_from_their_topic_take_every_event_once() {
    use crate::table::viewlog::read::LogContent;
    use crate::table::viewlog::Commit;
    use std::sync::atomic::Ordering;

    let defs = ViewsFile::parse(
        "[topics.transfers]\nformat = \"events\"\n\n\
         [views.balances]\nfrom = \"transfers\"\n\
         group_by = { by = [\"account\"], aggregates = { total = \"sum(amount)\", n = \"count()\", \
         mean = \"avg(amount)\" } }\n\n\
         [views.best]\nfrom = \"transfers\"\n\
         max_by = { by = \"amount\", key = [\"account\"] }\n\n\
         [views.recent]\nfrom = \"transfers\"\n\
         history = { limit = 3, key = [\"desk\"], columns = [\"amount\"] }\n",
    )
    .unwrap()
    .views;
    let topics = [EventsTopic {
        topic: "bank.transfers".into(),
        name: "transfers".into(),
        key: None,
    }];
    // 80 events over 2 partitions: an account's events spread over both (sums and maxima do
    // not depend on the order across partitions; amounts are distinct, so maxima have no ties);
    // a desk's events are in one partition (its history depends on their order)
    let mut rng = Rng(0x5eed_1234);
    let mut next = [0i64; 2];
    let all: Vec<Event> = (0..80)
        .map(|i| {
            let account = rng.below(6) as i32;
            let part = rng.below(2) as i32;
            let offset = next[part as usize];
            next[part as usize] += 1;
            Event {
                key: None,
                row: json!({"account": format!("a{account}"), "desk": format!("d{part}"),
                            "amount": (i * 37) % 997})
                .as_object()
                .cloned()
                .unwrap(),
                kafka_ts_ms: None,
                polled: None,
                part,
                offset,
            }
        })
        .collect();
    let feed = |views: &Views, events: &[Event]| feed_transfers(views, events, 7);
    let names = ["balances", "best", "recent"];
    // the oracle: one run over every event
    let oracle_tables = Arc::new(Tables::default());
    let oracle = run_events(&defs, &topics, &oracle_tables, &HashMap::new()).unwrap();
    feed(&oracle.views, &all);

    // the first run, writing every view's topic
    let tables = Arc::new(Tables::default());
    let first = run_events(&defs, &topics, &tables, &HashMap::new()).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Commit>(100_000);
    first.views.set_log(tx);
    for (_, flags, _) in first.views.log_views() {
        flags.writes.store(true, Ordering::Release);
    }
    feed(&first.views, &all);
    let commits: Vec<Commit> = rx.try_iter().collect();
    assert!(commits.len() > 20, "{} commits", commits.len());
    for name in names {
        assert_eq!(
            rows_of(&tables, name),
            rows_of(&oracle_tables, name),
            "{name}"
        );
    }

    // records of one view as the topic holds them after `cut` commits of `writer` (and half of
    // the next one when `partial`); each record carries the floor of the commits acknowledged
    // before it
    type Rec = (
        String,
        Option<Vec<u8>>,
        String,
        Option<String>,
        &'static str,
    );
    let records_of =
        |commits: &[Commit], name: &str, writer: &'static str, cut: usize, partial: bool| {
            let mine: Vec<&Commit> = commits.iter().filter(|c| &*c.view == name).collect();
            let mut records: Vec<Rec> = Vec::new();
            let mut floor: Option<String> = None;
            for (i, c) in mine.iter().enumerate() {
                let take = if i < cut {
                    c.changes.len()
                } else if i == cut && partial {
                    c.changes.len() / 2
                } else {
                    break;
                };
                for (k, r, m) in &c.changes[..take] {
                    let value = r.as_ref().map(|r| serde_json::to_vec(&**r).unwrap());
                    records.push((k.clone(), value, m.to_json(), floor.clone(), writer));
                }
                floor = Some(c.base.to_json());
            }
            records
        };
    // the same, then idle: the writer sent its last row again to carry the newest floor
    let idle_records_of = |commits: &[Commit], name: &str| {
        let mut records = records_of(commits, name, "w1", usize::MAX, false);
        let last_base = commits
            .iter()
            .rfind(|c| &*c.view == name)
            .map(|c| c.base.to_json());
        if let Some(mut again) = records.last().cloned() {
            again.3 = last_base;
            records.push(again);
        }
        records
    };
    let content_of =
        |mut records: Vec<Rec>, compacted: bool, defs: (Option<&str>, Option<&str>)| {
            let (def, expect) = defs;
            if compacted {
                let mut last: HashMap<String, usize> = HashMap::new();
                for (i, r) in records.iter().enumerate() {
                    last.insert(r.0.clone(), i);
                }
                let mut i = 0;
                records.retain(|r| {
                    i += 1;
                    last[&r.0] == i - 1
                });
            }
            let mut content = LogContent::expecting(expect);
            for (k, v, m, f, w) in &records {
                content.push(
                    Some(k.as_bytes()),
                    v.as_deref(),
                    (
                        Some(m.as_bytes()),
                        f.as_ref().map(|f| f.as_bytes()),
                        w.as_bytes(),
                        def.map(str::as_bytes),
                    ),
                );
            }
            content
        };
    // a node restored from `topic(name)`, fed the events from where it says (in another
    // batching); returns its run and tables
    // the same views and a sibling that is not restored (its topic holds nothing): the reader
    // then starts every partition at 0, below what the restored views hold
    let mut with_avg = defs.clone();
    with_avg.extend(
        ViewsFile::parse(
            "[topics.transfers]\nformat = \"events\"\n\n\
             [views.mean]\nfrom = \"transfers\"\n\
             group_by = { by = [\"account\"], aggregates = { m = \"avg(amount)\" } }\n",
        )
        .unwrap()
        .views,
    );
    let restore_and_feed =
        |defs: &[ViewDef],
         topic: &dyn Fn(&str) -> LogContent,
         log: Option<std::sync::mpsc::SyncSender<Commit>>| {
            let tables = Arc::new(Tables::default());
            let r = run_events(defs, &topics, &tables, &HashMap::new()).unwrap();
            if let Some(tx) = log {
                r.views.set_log(tx);
                for (_, flags, _) in r.views.log_views() {
                    flags.writes.store(true, Ordering::Release);
                }
            }
            let restorable = r.views.restorable_from_logs();
            assert_eq!(restorable.len(), defs.len(), "{restorable:?}");
            let mut restored = 0;
            for name in names {
                if r.views.restore_from_log(name, topic(name)) {
                    restored += 1;
                }
            }
            let starts = [
                r.views.events_start("transfers", 0),
                r.views.events_start("transfers", 1),
            ];
            let again: Vec<Event> = all
                .iter()
                .filter(|e| e.offset >= starts[e.part as usize])
                .cloned()
                .collect();
            feed_transfers(&r.views, &again, 5);
            (r, tables, restored, starts)
        };
    let per_view = commits.iter().filter(|c| &*c.view == "balances").count();
    let mut restored_some = 0;
    for cut in 0..=per_view {
        for (partial, compacted, idle) in [
            (false, false, false),
            (true, false, false),
            (true, true, false),
            (false, false, cut == per_view),
        ] {
            let topic = |name: &str| {
                let records = if idle {
                    idle_records_of(&commits, name)
                } else {
                    records_of(&commits, name, "w1", cut, partial)
                };
                content_of(records, compacted, (None, None))
            };
            let (r, tables, restored, starts) = restore_and_feed(&defs, &topic, None);
            restored_some += restored;
            for name in names {
                assert_eq!(
                    rows_of(&tables, name),
                    rows_of(&oracle_tables, name),
                    "{name}: cut after {cut} commits, partial {partial}, compacted {compacted}"
                );
            }
            // every event was read again: nothing is skipped any more, and a clean stop saves
            // every view
            let saved: HashMap<String, Vec<u8>> = r.views.save().into_iter().collect();
            assert_eq!(saved.len(), 3, "cut {cut}: the skips are dropped");
            // a clean stop now, and a start from what it saved: nothing is read twice (a
            // partition with no event after the restore keeps its position too)
            let again_tables = Arc::new(Tables::default());
            let again = run_events(&defs, &topics, &again_tables, &saved).unwrap();
            let resumed = [
                again.views.events_start("transfers", 0),
                again.views.events_start("transfers", 1),
            ];
            assert_eq!(resumed, next, "cut {cut}: resumed at the ends");
            for name in names {
                assert_eq!(rows_of(&again_tables, name), rows_of(&oracle_tables, name));
            }
            // with a sibling that is computed from the beginning, the restored views skip
            // what they hold
            if partial || idle {
                let (_, tables, restored, starts) = restore_and_feed(&with_avg, &topic, None);
                assert_eq!((restored, starts), (3, [0, 0]));
                for name in names {
                    assert_eq!(
                        rows_of(&tables, name),
                        rows_of(&oracle_tables, name),
                        "{name} beside an avg: cut after {cut} commits, compacted {compacted}"
                    );
                }
            }
            if cut == per_view && !partial {
                // a whole topic: only what the last commit of a view took is read again (its
                // records carry the floor of the commit before)
                for p in 0..2 {
                    let floor = names
                        .iter()
                        .map(|name| {
                            let mine: Vec<&Commit> =
                                commits.iter().filter(|c| &*c.view == *name).collect();
                            mine[mine.len() - 2].base.next(p)
                        })
                        .min()
                        .unwrap();
                    assert!(
                        starts[p as usize] >= floor && floor > next[p as usize] / 2,
                        "partition {p}: read again from {} (floor {floor}, end {})",
                        starts[p as usize],
                        next[p as usize]
                    );
                }
            }
        }
    }
    // a hand-over: a node restored from a topic cut part-way writes it on (a second writer,
    // while it still skips what the rows held); a third node restored from both writers'
    // records equals the oracle too
    for cut in [1, per_view / 3, per_view / 2] {
        let first = |name: &str| {
            content_of(
                records_of(&commits, name, "w1", cut, true),
                false,
                (None, None),
            )
        };
        let (tx2, rx2) = std::sync::mpsc::sync_channel::<Commit>(100_000);
        let (_second, _, _, _) = restore_and_feed(&defs, &first, Some(tx2));
        let second_commits: Vec<Commit> = rx2.try_iter().collect();
        assert!(!second_commits.is_empty());
        // the second writer's first commits (its floor still low) or all of them
        for (cut2, compacted) in [
            (1, false),
            (2, false),
            (3, true),
            (usize::MAX, false),
            (usize::MAX, true),
        ] {
            let both = |name: &str| {
                let mut records = records_of(&commits, name, "w1", cut, true);
                records.extend(records_of(&second_commits, name, "w2", cut2, false));
                content_of(records, compacted, (None, None))
            };
            let (_, tables, restored, _) = restore_and_feed(&defs, &both, None);
            assert_eq!(restored, 3);
            for name in names {
                assert_eq!(
                    rows_of(&tables, name),
                    rows_of(&oracle_tables, name),
                    "{name}: hand-over after {cut} commits, then {cut2}, compacted {compacted}"
                );
            }
        }
    }
    // rows of another definition of a view are not restored
    let other = |name: &str| {
        content_of(
            records_of(&commits, name, "w1", per_view, false),
            false,
            (Some("old"), Some("new")),
        )
    };
    let tables = Arc::new(Tables::default());
    let r = run_events(&defs, &topics, &tables, &HashMap::new()).unwrap();
    assert!(!r.views.restore_from_log("balances", other("balances")));
    assert_eq!(r.views.events_start("transfers", 0), 0);
    // rows of a view with `avg` whose records lack its sum and count (an older writer) are not
    // restored: an average alone cannot go on
    let stateless = |name: &str| {
        let mut records = records_of(&commits, name, "w1", per_view, false);
        for r in &mut records {
            let mut mark: serde_json::Value = serde_json::from_str(&r.2).unwrap();
            if name == "balances" {
                assert!(
                    mark["state"]["mean"]["n"].as_u64().is_some_and(|n| n > 0),
                    "{mark}"
                );
            }
            mark.as_object_mut().unwrap().remove("state");
            r.2 = mark.to_string();
        }
        content_of(records, false, (None, None))
    };
    assert!(!r.views.restore_from_log("balances", stateless("balances")));
    assert_eq!(r.views.events_start("transfers", 0), 0);
    assert!(r.views.restore_from_log("best", stateless("best")));
    assert!(restored_some > 3 * per_view, "{restored_some}");
    assert_eq!(
        oracle
            .metrics
            .view_log_restores
            .with_label_values(&["balances"])
            .get(),
        0
    );
}

/// Commits one change of `key` at input partition `part`, offset `off`.
pub(super) fn put_at(
    tables: &Tables,
    sink: &dyn UpdateSink,
    key: &str,
    r: Option<Value>,
    part: u32,
    off: i64,
) {
    commit(tables, sink, &[(key.to_string(), r.map(row), part, off)]);
}

#[test]
fn a_recomputed_latest_takes_the_rows_in_the_order_it_took_them() {
    let defs = ViewsFile::parse(
        "[views.last]\nfrom = \"scores\"\n[views.last.group_by]\nby = [\"team\"]\n\
         aggregates = { last = \"latest(score)\", n = \"count()\" }\n",
    )
    .unwrap()
    .views;
    let tables = Arc::new(Tables::default());
    tables.ensure("scores", "e1", "game.scores", 2);
    let Run { views, metrics, .. } = run(&defs, &tables, &HashMap::new());
    let p = |team: &str, score: i64, x: i64| Some(json!({"team": team, "score": score, "x": x}));
    let last = |t: &Tables, team: &str| rows_of(t, "last")[team]["last"].clone();
    // taken p9 then p1, whose offsets say the opposite (other partitions)
    put_at(&tables, &*views, "p9", p("a", 90, 0), 1, 100);
    put_at(&tables, &*views, "p1", p("a", 10, 0), 0, 5);
    put_at(&tables, &*views, "q1", p("b", 1, 0), 0, 6);
    assert_eq!(last(&tables, "a"), json!(10));
    // a clean stop's save, for later
    let saved: HashMap<String, Vec<u8>> = views.save().into_iter().collect();
    let at_save: TableState = tables.get("scores").unwrap().read().clone();

    // the input replaced (a restore, a slice handed over): its next update does not follow,
    // the view is computed again, in the order it took the rows
    let replace = |tables: &Tables| {
        let mut state: TableState = tables.get("scores").unwrap().read().clone();
        state.useq += 7;
        tables.insert(state);
    };
    replace(&tables);
    put_at(&tables, &*views, "q2", p("b", 2, 0), 1, 101);
    let rebuilds = metrics.view_rebuilds.with_label_values(&["last"]).get();
    assert_eq!(rebuilds, 2, "built at start, then again");
    assert_eq!(
        (last(&tables, "a"), last(&tables, "b")),
        (json!(10), json!(2))
    );

    // p9 changed (another column) while the view did not follow: it is the latest change now
    // (committed past the views: their next update does not follow)
    put_at(
        &tables,
        &crate::table::state::NoSink,
        "p9",
        p("a", 90, 1),
        1,
        102,
    );
    put_at(&tables, &*views, "q3", p("b", 3, 0), 0, 7);
    assert_eq!(last(&tables, "a"), json!(90), "p9 changed after p1");
    // and the order behind it: deleting the latest row hands its place to the one before
    put_at(&tables, &*views, "p9", None, 1, 103);
    assert_eq!(last(&tables, "a"), json!(10));

    // a start from the save, at exactly the saved rows, then a recomputation: the saved order
    let t2 = Arc::new(Tables::default());
    t2.insert(at_save.clone());
    let loaded = run(&defs, &t2, &saved);
    assert_eq!(last(&t2, "a"), json!(10), "loaded as saved");
    replace(&t2);
    put_at(&t2, &*loaded.views, "q2", p("b", 2, 0), 1, 101);
    assert_eq!(
        loaded
            .metrics
            .view_rebuilds
            .with_label_values(&["last"])
            .get(),
        1,
        "loaded, then computed again once"
    );
    assert_eq!(last(&t2, "a"), json!(10), "p1 still after p9");

    // a start on which nothing was saved takes the rows by input offset: p1 (offset 5) before
    // p9 (offset 100)
    let t3 = Arc::new(Tables::default());
    t3.insert(at_save);
    let _fresh = run(&defs, &t3, &HashMap::new());
    assert_eq!(last(&t3, "a"), json!(90));
}

/// An events partition whose offsets started over (its topic created again) below what a view
/// restored from its topic holds: after [`Views::events_reset`] its new events are taken, not
/// skipped as held by the rows' old marks; the other partition still skips what the rows hold;
/// the view's topic is written whole again and each row's mark names the new offsets.
#[test]
fn an_events_partition_that_started_over_is_taken_anew() {
    use crate::table::viewlog::read::LogContent;
    use crate::table::viewlog::Commit;
    use std::sync::atomic::Ordering;

    let defs = ViewsFile::parse(
        "[topics.transfers]\nformat = \"events\"\n\n\
         [views.balances]\nfrom = \"transfers\"\n\
         group_by = { by = [\"account\"], aggregates = { total = \"sum(amount)\" } }\n",
    )
    .unwrap()
    .views;
    let topics = [EventsTopic {
        topic: "bank.transfers".into(),
        name: "transfers".into(),
        key: None,
    }];
    let event = |account: &str, amount: i64, part: i32, offset: i64| Event {
        key: None,
        row: json!({"account": account, "amount": amount})
            .as_object()
            .cloned()
            .unwrap(),
        kafka_ts_ms: None,
        polled: None,
        part,
        offset,
    };
    let feed = |views: &Views, events: &[Event]| feed_transfers(views, events, events.len());
    let total = |tables: &Tables, account: &str| -> Value {
        rows_of(tables, "balances")
            .get(account)
            .map_or(Value::Null, |r| r["total"].clone())
    };
    let writing = |views: &Views| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Commit>(1_000);
        views.set_log(tx);
        let (_, flags, _) = views.log_views().pop().unwrap();
        flags.writes.store(true, Ordering::Release);
        (rx, flags)
    };

    // the writer: partitions 0 and 1 to 20 each over accounts a0..a3 (amount 1 each), then
    // partition 0 to 40 for a0 and partition 1 to 26 for a3
    let first_tables = Arc::new(Tables::default());
    let first = run_events(&defs, &topics, &first_tables, &HashMap::new()).unwrap();
    let _log = writing(&first.views);
    let early: Vec<Event> = (0..80)
        .map(|i| event(&format!("a{}", i % 4), 1, (i % 2) as i32, i / 2))
        .filter(|e| e.offset < 20)
        .collect();
    feed(&first.views, &early);
    let (_, base_then, rows_then) = first.views.log_snapshot("balances").unwrap();
    let late: Vec<Event> = (20..40)
        .map(|o| event("a0", 1, 0, o))
        .chain((20..26).map(|o| event("a3", 1, 1, o)))
        .collect();
    feed(&first.views, &late);
    let (_, _, rows_now) = first.views.log_snapshot("balances").unwrap();
    assert_eq!(total(&first_tables, "a0"), json!(30));
    assert_eq!(total(&first_tables, "a3"), json!(16));
    // the topic: a1 and a2 as written first, a0 and a3 as written last, the floor of the first
    let mut content = LogContent::expecting(None);
    let floor = base_then.to_json();
    let last = |k: &str| k == "a0" || k == "a3";
    for (k, r, m) in rows_then
        .iter()
        .filter(|(k, _, _)| !last(k))
        .chain(rows_now.iter().filter(|(k, _, _)| last(k)))
    {
        let value = r.as_ref().map(|r| serde_json::to_vec(&**r).unwrap());
        content.push(
            Some(k.as_bytes()),
            value.as_deref(),
            (
                Some(m.to_json().as_bytes()),
                Some(floor.as_bytes()),
                b"w0",
                None,
            ),
        );
    }

    let tables = Arc::new(Tables::default());
    let r = run_events(&defs, &topics, &tables, &HashMap::new()).unwrap();
    let (rx, flags) = writing(&r.views);
    assert!(r.views.restore_from_log("balances", content));
    assert_eq!(r.views.events_start("transfers", 0), 20);
    assert_eq!(r.views.events_start("transfers", 1), 20);
    // a0's row holds partition 0 to 40: without a reset, its event at 25 is held already
    feed(&r.views, &[event("a0", 100, 0, 25)]);
    assert_eq!(total(&tables, "a0"), json!(30));
    rx.try_iter().for_each(drop);
    flags.dirty.store(false, Ordering::Release);

    // partition 0 started over: the new topic's events from offset 0 are all new
    r.views.events_reset("transfers", 0, 0);
    assert_eq!(r.views.events_start("transfers", 0), 0);
    assert!(
        flags.dirty.load(Ordering::Acquire),
        "the view's topic is written whole again"
    );
    assert!(
        flags.input_reset.load(Ordering::Acquire),
        "the writer drops the floor of the old offsets"
    );
    let new: Vec<Event> = (0..6)
        .map(|o| event(["a0", "a1", "a4"][o as usize % 3], 1000, 0, o))
        .collect();
    feed(&r.views, &new);
    assert_eq!(total(&tables, "a0"), json!(2030));
    assert_eq!(total(&tables, "a1"), json!(2010));
    assert_eq!(total(&tables, "a4"), json!(2000));
    // every row's mark names the new offsets of partition 0, none the old ones (a3's row still
    // holds partition 1 to 26, the restored row's mark)
    let (_, base, rows) = r.views.log_snapshot("balances").unwrap();
    assert_eq!(base.next(0), 6);
    for (k, _, m) in &rows {
        assert_eq!(m.next(0), 6, "{k}: {m:?}");
    }
    let a3 = rows.iter().find(|(k, _, _)| k == "a3").unwrap();
    assert_eq!(a3.2.next(1), 26);
    // partition 1 did not start over: its events the rows hold are still skipped
    feed(
        &r.views,
        &[event("a2", 100, 1, 20), event("a3", 100, 1, 21)],
    );
    assert_eq!(total(&tables, "a2"), json!(110));
    assert_eq!(total(&tables, "a3"), json!(16));
    feed(&r.views, &[event("a3", 100, 1, 26)]);
    assert_eq!(total(&tables, "a3"), json!(116));
    // and a clean stop saves the new positions
    let saved: HashMap<String, Vec<u8>> = r.views.save().into_iter().collect();
    let sv: Value = serde_json::from_slice(&saved["balances"]).unwrap();
    assert_eq!(sv["events_next"], json!([[0, 6], [1, 27]]));
}
