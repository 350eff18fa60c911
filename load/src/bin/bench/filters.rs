//! The filters scenario (issue 15, "equality predicates are indexed"): `filter_clients`
//! WebSocket clients, each with its own `where=league = 'L{n}'` (distinct leagues), watch a
//! `filter_rows`-row table while cdc-gen changes it at `filter_rate`/s. The same run with the
//! same rows selected by an expression the hub cannot index (`league >= 'L{n}' AND league <=
//! 'L{n}'`) shows what the index saves: with it a change is queued only for the subscriptions of
//! its league; without it every subscription wakes for every update and evaluates its filter.
//! Server CPU per change, server freshness (commit -> socket, `livetable_freshness_seconds`)
//! p99, livetable's own share of it (poll -> socket, `livetable_ingest_to_socket_seconds`) p99
//! and the clients' freshness; `filter_runs` runs, configurations alternating, medians, a
//! livetable and a topic per run.

use std::time::{Duration, Instant};

use crate::measure::{median, Goal, Scenario};
use crate::probe;
use crate::scenarios::{s, swarm_connected, Sizes, TABLE};
use crate::stack::{Env, Livetable};

/// cdc-gen over `keys` keys with a `league` column of `leagues` values: `count` changes, at
/// `rate`/s when given.
fn gen(
    env: &Env,
    topic: &str,
    keys: u64,
    leagues: u64,
    count: u64,
    rate: Option<(u64, u64)>,
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![
        s("--brokers"),
        env.brokers.clone(),
        s("--topic"),
        s(topic),
        s("--keys"),
        s(keys),
        s("--count"),
        s(count),
        s("--leagues"),
        s(leagues),
    ];
    if let Some((rate, secs)) = rate {
        args.extend([s("--rate"), s(rate), s("--duration-secs"), s(secs + 5)]);
    }
    env.tool("cdc-gen", &args)
}

/// Starts livetable `name` and waits until its table holds `rows` rows (its metrics).
fn loaded(
    env: &Env,
    name: &str,
    topic: &str,
    rows: u64,
    args: &[&str],
) -> anyhow::Result<Livetable> {
    let lt = env.livetable(name, topic, args)?;
    let label = format!("table=\"{TABLE}\"");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let have = probe::metric_where(&probe::metrics(&lt.base), "livetable_table_rows", &label);
        if have >= rows as f64 {
            return Ok(lt);
        }
        anyhow::ensure!(
            Instant::now() < until,
            "{name}: {have} of {rows} rows after 60 s ({})",
            lt.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one run measured.
struct Run {
    connect_secs: f64,
    cpu_per_change_us: f64,
    server_p99_ms: f64,
    /// livetable's own share: poll of the record -> socket.
    share_p99_ms: f64,
    client_p50_ms: f64,
    client_p99_ms: f64,
    rows_delivered: f64,
    routed: f64,
    resnapshots: f64,
}

/// One run: `clients` clients connecting at `ramp`/s with `filter`.
fn run(
    env: &Env,
    z: &Sizes,
    name: &str,
    filter: &str,
    clients: u64,
    ramp: u64,
) -> anyhow::Result<Run> {
    let topic = env.topic(name);
    let leagues = z.filter_clients;
    gen(env, &topic, z.filter_rows, leagues, z.filter_rows, None)?;
    let max = (clients + 100).to_string();
    let lt = loaded(
        env,
        name,
        &topic,
        z.filter_rows,
        &["--max-connections", &max],
    )?;
    let secs = z.filter_secs;
    let extra = [s("--where"), s(filter), s("--where-values"), s(leagues)];
    let t0 = Instant::now();
    let (swarm, connected) = swarm_connected(
        env,
        &lt,
        clients,
        ramp,
        clients / ramp + 1 + secs + z.filter_swarm_slack_secs,
        z,
        &extra,
    )?;
    anyhow::ensure!(
        connected >= clients as f64,
        "{name}: {connected} of {clients} clients connected ({})",
        lt.log_tail()
    );
    // every snapshot sent (a filtered snapshot scans the table)
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let m = probe::metrics(&lt.base);
        let sent = probe::metric(&m, "livetable_snapshot_seconds_count");
        if sent >= clients as f64 || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // the idle process's own CPU (consumer polls, timers), subtracted from the load's
    let idle0 = lt.cpu_secs()?;
    let idle_t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let idle_per_sec = (lt.cpu_secs()? - idle0) / idle_t.elapsed().as_secs_f64();
    let m0 = probe::metrics(&lt.base);
    let before = probe::buckets(&m0, "livetable_freshness_seconds");
    let share0 = probe::buckets(&m0, "livetable_ingest_to_socket_seconds");
    let routed0 = probe::metric(&m0, "livetable_routed_updates_total");
    let cpu0 = lt.cpu_secs()?;
    let t1 = Instant::now();
    let changes = z.filter_rate * secs;
    gen(
        env,
        &topic,
        z.filter_rows,
        leagues,
        changes,
        Some((z.filter_rate, secs)),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let cpu = lt.cpu_secs()? - cpu0 - idle_per_sec * t1.elapsed().as_secs_f64();
    let m1 = probe::metrics(&lt.base);
    let after = probe::buckets(&m1, "livetable_freshness_seconds");
    let share1 = probe::buckets(&m1, "livetable_ingest_to_socket_seconds");
    let out = swarm.finish()?;
    let rows = out["row_updates"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(rows > 0.0, "{name}: the clients received no row update");
    let p = |k: &str| out["freshness_ms"][k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        connect_secs,
        cpu_per_change_us: cpu / changes as f64 * 1e6,
        server_p99_ms: probe::bucket_quantile(&before, &after, 0.99).unwrap_or(f64::NAN) * 1e3,
        share_p99_ms: probe::bucket_quantile(&share0, &share1, 0.99).unwrap_or(f64::NAN) * 1e3,
        client_p50_ms: p("p50"),
        client_p99_ms: p("p99"),
        rows_delivered: rows,
        routed: probe::metric(&m1, "livetable_routed_updates_total") - routed0,
        resnapshots: probe::metric(&m1, "livetable_resnapshots_total"),
    })
}

pub fn filters(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let indexed = "league = 'L{n}'";
    let scanned = "league >= 'L{n}' AND league <= 'L{n}'";
    let (many, few) = (z.filter_clients, z.filter_scan_clients);
    let (mut on, mut on_few, mut off) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..z.filter_runs {
        // a scanned snapshot of the whole table takes tens of milliseconds: those clients come
        // slowly enough that none waits past ws-swarm's 10 s connect timeout
        let name = |c: &str| format!("filters-{c}-{r}");
        on.push(run(env, z, &name("indexed"), indexed, many, 1_000)?);
        on_few.push(run(env, z, &name("indexed-few"), indexed, few, 1_000)?);
        off.push(run(env, z, &name("scanned-few"), scanned, few, 25)?);
    }
    let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    for (label, v, goal) in [
        (format!("{many} clients, indexed (league = X)"), &on, true),
        (
            format!("{few} clients, indexed (league = X)"),
            &on_few,
            false,
        ),
        (
            format!("{few} clients, not indexed (league >= X AND league <= X)"),
            &off,
            false,
        ),
    ] {
        sc.add(
            &format!("{label}: server CPU per change"),
            m(v, |r| r.cpu_per_change_us),
            "µs",
            None,
        );
        sc.add(
            &format!("{label}: server freshness p99 (commit -> socket, bucket bound)"),
            m(v, |r| r.server_p99_ms),
            "ms",
            goal.then_some(Goal::AtMost(10.0)),
        );
        sc.add(
            &format!("{label}: livetable's share p99 (poll -> socket, bucket bound)"),
            m(v, |r| r.share_p99_ms),
            "ms",
            None,
        );
        sc.add(
            &format!("{label}: client freshness p50"),
            m(v, |r| r.client_p50_ms),
            "ms",
            None,
        );
        sc.add(
            &format!("{label}: client freshness p99"),
            m(v, |r| r.client_p99_ms),
            "ms",
            None,
        );
        sc.add(
            &format!("{label}: row updates delivered"),
            m(v, |r| r.rows_delivered),
            "rows",
            None,
        );
        sc.add(
            &format!("{label}: updates queued for routed subscriptions"),
            m(v, |r| r.routed),
            "updates",
            None,
        );
        sc.add(
            &format!("{label}: snapshots sent again"),
            m(v, |r| r.resnapshots),
            "snapshots",
            None,
        );
        sc.add(
            &format!("{label}: connect + every snapshot"),
            m(v, |r| r.connect_secs),
            "s",
            None,
        );
    }
    sc.add(
        &format!("server CPU per change, {few} clients: not indexed / indexed"),
        m(&off, |r| r.cpu_per_change_us) / m(&on_few, |r| r.cpu_per_change_us),
        "x",
        None,
    );
    sc.add(
        &format!("server CPU per change, indexed: {many} / {few} clients"),
        m(&on, |r| r.cpu_per_change_us) / m(&on_few, |r| r.cpu_per_change_us),
        "x",
        None,
    );
    Ok(())
}
