//! The views scenarios (issue 15, "Measure").
//!
//! `views-events`: a `group_by` over an events topic. `view_events` score events (`cdc-gen
//! --scores`, `view_players` players) wait in a 1-partition topic; a livetable whose views file
//! declares the topic `events` and a `group_by` per player (count, sum, max) starts and reads them
//! all: events/s = events / seconds from the spawn to `/readyz` 200 (which waits for the events
//! topics to be read to their ends), start-up included. The view is then checked: one row per
//! player, and the counts sum to the events. Then, once the node wrote the view's changelog topic,
//! it is killed (-9), its data directory removed, and it starts again empty: seconds from the
//! spawn to ready (the view restored from its topic, the events after the topic's floor read
//! again) and the events it read again; the view is checked again. `view_runs` runs, a livetable
//! and a topic per run, medians.
//!
//! `views-top-n`: the cost of one update of a `top_n` (top 10, `order_by = score desc`) over N
//! rows, N = `view_top_rows` (e.g. 10k, 100k, 1M), measured in this process on the operator
//! itself (what a node runs per change, without I/O): N inserts, then `view_top_updates` random
//! updates of random rows, timed. A re-sort would cost ~N per update (100x from 10k to 1M); an
//! ordered set costs ~log N.

use std::time::{Duration, Instant};

use livetable::views::{ViewOperator, ViewsFile};
use serde_json::{json, Map, Value};

use crate::measure::{median, Goal, Scenario};
use crate::probe;
use crate::scenarios::{s, Sizes};
use crate::stack::Env;

fn views_file(env: &Env, name: &str, topic: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = env.work.path().join(format!("{name}.views.toml"));
    std::fs::write(
        &path,
        format!(
            "[topics.\"{topic}\"]\nformat = \"events\"\nname = \"scores\"\nkey = [\"player\"]\n\n\
             [views.totals]\nfrom = \"scores\"\n[views.totals.group_by]\nby = [\"player\"]\n\
             aggregates = {{ games = \"count()\", points = \"sum(score)\", best = \"max(score)\" }}\n"
        ),
    )?;
    Ok(path)
}

/// What one run measured.
struct EventsRun {
    rate: f64,
    cpu_per_million: f64,
    /// An empty node of the same deployment, restored from the view's changelog topic: seconds
    /// from the spawn to ready, and the events it read again.
    restore_secs: f64,
    read_again: f64,
}

/// The view's games summed, and its row count, as `/api/tables/totals` says.
fn view_counts(base: &str) -> anyhow::Result<(u64, usize)> {
    let body = probe::client()
        .get(format!("{base}/api/tables/totals"))
        .send()?
        .json::<Value>()?;
    let rows = body["rows"].as_object().cloned().unwrap_or_default();
    let games: u64 = rows.values().filter_map(|r| r["games"].as_u64()).sum();
    Ok((games, rows.len()))
}

/// One run: events/s and the process's CPU seconds per million events; then the node is killed
/// (-9) once its view's topic holds the view with its floor, its data directory removed, and the
/// time an empty node takes to be ready again from the view's topic is measured.
fn events_run(env: &Env, z: &Sizes, run: usize) -> anyhow::Result<EventsRun> {
    let name = format!("views-events-{run}");
    let topic = format!("{}.{name}.scores", env.run_id);
    env.tool(
        "cdc-gen",
        &[
            s("--brokers"),
            env.brokers.clone(),
            s("--topic"),
            s(&topic),
            s("--scores"),
            s("--keys"),
            s(z.view_players),
            s("--count"),
            s(z.view_events),
        ],
    )?;
    let views = views_file(env, &name, &topic)?;
    let t0 = Instant::now();
    let mut lt = env.livetable(
        &name,
        &env.topic(&format!("{name}-none")),
        &["--views", views.to_str().unwrap_or_default()],
    )?;
    let secs = probe::time_to_ready(&lt.base, t0, Duration::from_secs(600))?;
    let cpu = lt.cpu_secs()?;
    let (games, rows) = view_counts(&lt.base)?;
    anyhow::ensure!(
        games == z.view_events && rows as u64 <= z.view_players && rows > 0,
        "{name}: the view counts {games} events over {rows} players, want {} events over at most {} ({})",
        z.view_events,
        z.view_players,
        lt.log_tail()
    );
    // the view's topic holds the whole view (this node writes it), and its floor went out
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let m = probe::metrics(&lt.base);
        let sent = probe::metric_where(&m, "livetable_view_log_records_total", "outcome=\"sent\"");
        if probe::metric(&m, "livetable_view_log_writer") == 1.0 && sent > rows as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < until,
            "{name}: the view's topic was not written within 120 s ({})",
            lt.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    lt.kill9();
    std::fs::remove_dir_all(&lt.data_dir)?;
    let t1 = Instant::now();
    env.start(&mut lt)?;
    let restore_secs = probe::time_to_ready(&lt.base, t1, Duration::from_secs(600))?;
    let m = probe::metrics(&lt.base);
    // `+ 0.0`: the sum of no series is -0.0
    let read_again = probe::metric(&m, "livetable_records_consumed_total") + 0.0;
    let (games, again) = view_counts(&lt.base)?;
    anyhow::ensure!(
        games == z.view_events && again == rows,
        "{name}: restored from the view's topic, the view counts {games} events over {again} players, want {} over {rows} ({})",
        z.view_events,
        lt.log_tail()
    );
    anyhow::ensure!(
        probe::metric(&m, "livetable_view_log_restores_total") == 1.0,
        "{name}: the empty node did not restore the view from its topic ({})",
        lt.log_tail()
    );
    lt.stop()?;
    Ok(EventsRun {
        rate: z.view_events as f64 / secs,
        cpu_per_million: cpu * 1e6 / z.view_events as f64,
        restore_secs,
        read_again,
    })
}

pub fn events(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    let mut restores = Vec::new();
    let mut again = Vec::new();
    for run in 0..z.view_runs {
        let r = events_run(env, z, run)?;
        rates.push(r.rate);
        cpus.push(r.cpu_per_million);
        restores.push(r.restore_secs);
        again.push(r.read_again);
    }
    sc.add(
        "group_by over events: events/s (spawn to ready)",
        median(rates),
        "events/s",
        None,
    );
    sc.add(
        "process CPU per million events (start-up included)",
        median(cpus),
        "s",
        None,
    );
    sc.add(
        "empty node after kill -9, restored from the view's changelog topic: spawn to ready",
        median(restores),
        "s",
        None,
    );
    sc.add(
        "events read again by that node",
        median(again),
        "events",
        None,
    );
    Ok(())
}

fn score_row(player: u64, score: u64) -> Map<String, Value> {
    match json!({"player": format!("p{player}"), "score": score}) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Nanoseconds per update of a top 10 over `rows` rows.
fn top_n_cost(rows: u64, updates: u64) -> anyhow::Result<f64> {
    let file = ViewsFile::parse(
        "[views.top]\nfrom = \"scores\"\ntop_n = { order_by = [\"score desc\", \"player\"], limit = 10 }\n",
    )?;
    let mut op = ViewOperator::new(&file.views[0]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut current: Vec<Map<String, Value>> = Vec::with_capacity(rows as usize);
    for p in 0..rows {
        let row = score_row(p, next() % 1_000_000);
        op.apply_change(&format!("p{p}"), None, Some(&row));
        current.push(row);
    }
    let keys: Vec<String> = (0..rows).map(|p| format!("p{p}")).collect();
    let plan: Vec<(usize, Map<String, Value>)> = (0..updates)
        .map(|_| {
            let p = (next() % rows) as usize;
            (p, score_row(p as u64, next() % 1_000_000))
        })
        .collect();
    let mut emitted = 0usize;
    let t0 = Instant::now();
    for (p, row) in plan {
        emitted += op
            .apply_change(&keys[p], Some(&current[p]), Some(&row))
            .len();
        current[p] = row;
    }
    let ns = t0.elapsed().as_nanos() as f64 / updates as f64;
    anyhow::ensure!(emitted > 0, "no update reached the top");
    Ok(ns)
}

pub fn top_n(z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let mut costs = Vec::new();
    for &rows in &z.view_top_rows {
        let runs: Vec<f64> = (0..z.view_runs)
            .map(|_| top_n_cost(rows, z.view_top_updates))
            .collect::<anyhow::Result<_>>()?;
        let ns = median(runs);
        sc.add(
            &format!(
                "top_n update over {} rows",
                crate::measure::human(rows as f64)
            ),
            ns,
            "ns",
            None,
        );
        costs.push((rows, ns));
    }
    if let (Some(&(r0, c0)), Some(&(r1, c1))) = (costs.first(), costs.last()) {
        let growth = r1 as f64 / r0 as f64;
        // logarithmic: the cost may grow with log N and with the larger set's cache misses, never
        // like N (a re-sort would be `growth` times dearer)
        sc.add(
            &format!("cost ratio {}x rows (a re-sort: {growth:.0}x)", growth),
            c1 / c0,
            "x",
            Some(Goal::AtMost(growth.log2().max(2.0))),
        );
    }
    Ok(())
}
