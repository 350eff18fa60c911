//! The views scenarios (issue 15, "Measure").
//!
//! `views-events`: a `group_by` over an events topic. `view_events` score events (`cdc-gen
//! --scores`, `view_players` players) wait in a 1-partition topic; a livetable whose views file
//! declares the topic `events` and a `group_by` per player (count, sum, max) starts and reads them
//! all: events/s = events / seconds from the spawn to `/readyz` 200 (which waits for the events
//! topics to be read to their ends), start-up included. The view is then checked: one row per
//! player, and the counts sum to the events. `view_runs` runs, a livetable and a topic per run,
//! medians.
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

/// One run: events/s, and the process's CPU seconds per million events.
fn events_run(env: &Env, z: &Sizes, run: usize) -> anyhow::Result<(f64, f64)> {
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
    let body = probe::client()
        .get(format!("{}/api/tables/totals", lt.base))
        .send()?
        .json::<Value>()?;
    let rows = body["rows"].as_object().cloned().unwrap_or_default();
    let games: u64 = rows.values().filter_map(|r| r["games"].as_u64()).sum();
    anyhow::ensure!(
        games == z.view_events && rows.len() as u64 <= z.view_players && !rows.is_empty(),
        "{name}: the view counts {games} events over {} players, want {} events over at most {} ({})",
        rows.len(),
        z.view_events,
        z.view_players,
        lt.log_tail()
    );
    lt.stop()?;
    Ok((
        z.view_events as f64 / secs,
        cpu * 1e6 / z.view_events as f64,
    ))
}

pub fn events(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for run in 0..z.view_runs {
        let (rate, cpu) = events_run(env, z, run)?;
        rates.push(rate);
        cpus.push(cpu);
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
