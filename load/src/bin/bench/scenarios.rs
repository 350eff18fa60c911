//! The scenarios of the benchmark report. Each starts the livetable processes it needs, drives
//! them with the load tools and returns its measures; goals are reported, never asserted.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::measure::{median, Goal, Scenario};
use crate::stack::{Env, Livetable};
use crate::{delivery, probe};

pub const TABLE: &str = "game_odds";

/// Sizes of a run: the figures, or seconds-long ones for `--quick`.
pub struct Sizes {
    /// livetable's (and the delivery probe's) `fetch.wait.max.ms` in the live scenarios
    pub fetch_wait_ms: u32,
    pub ingest_changes: u64,
    pub ingest_keys: u64,
    pub recovery_rows: u64,
    /// Restores from an empty data dir per core setting (the server's CPU, then every core).
    pub restore_runs: usize,
    pub snapshot_runs: usize,
    pub storm_clients: u64,
    pub storm_secs: u64,
    pub fanout_clients: u64,
    pub fanout_rows: u64,
    pub fanout_rate: u64,
    pub fanout_secs: u64,
    pub light_clients: u64,
    pub light_rate: u64,
    pub light_secs: u64,
    pub latency_clients: u64,
    pub latency_few_clients: u64,
    pub latency_rate: u64,
    pub latency_secs: u64,
    pub idle_connections: u64,
    /// connections of the scenario connections-snapshot (on a 100-row table)
    pub snapshot_connections: u64,
    /// The open-file limit when it lowered `idle_connections`.
    pub idle_capped_by: Option<u64>,
    pub local_addrs: u8,
    /// scale-out: ingest by 1 and 2 materialisers (changes, keys), runs per configuration
    pub so_ingest_changes: u64,
    pub so_ingest_keys: u64,
    pub so_runs: usize,
    /// scale-out: clients served by 1 and 2 gateways
    pub so_clients: u64,
    pub so_rows: u64,
    pub so_rate: u64,
    pub so_secs: u64,
    /// scale-out: failover (keys, changes/s while one materialiser is killed, runs)
    pub fo_keys: u64,
    pub fo_rate: u64,
    pub fo_runs: usize,
    /// scale-out: resumes on the other gateway, changes missed by each
    pub resume_runs: usize,
    pub resume_missed: u64,
    /// publish: WebSocket connections, seconds measured (after a warm-up), runs per measure,
    /// the paced rate of the latency runs, acks read back per run
    pub pub_connections: usize,
    pub pub_secs: u64,
    pub pub_warmup_secs: u64,
    pub pub_runs: usize,
    pub pub_rate: u64,
    pub pub_verify: usize,
    /// auth: rows, WebSocket connections timed per run, fan-out clients, changes/s, seconds, runs
    pub auth_rows: u64,
    pub auth_connects: usize,
    pub auth_clients: u64,
    pub auth_rate: u64,
    pub auth_secs: u64,
    pub auth_runs: usize,
    pub filter_rows: u64,
    pub filter_clients: u64,
    pub filter_scan_clients: u64,
    pub filter_rate: u64,
    pub filter_secs: u64,
    pub filter_runs: usize,
    /// Seconds the filter runs' clients stay connected beyond the connect ramp and the load:
    /// room for the snapshots, the idle CPU sample, cdc-gen's start and the settle (the run
    /// waits for the clients to end).
    pub filter_swarm_slack_secs: u64,
    pub view_events: u64,
    pub view_players: u64,
    pub view_runs: usize,
    pub view_top_rows: Vec<u64>,
    pub view_top_updates: u64,
    /// clients-1k: clients, the two rates (changes/s); clients-100-max: clients, the rates tried
    /// (rising); both: seconds of load per run, runs per configuration
    pub rates_1k_clients: u64,
    pub rates_1k_low: u64,
    pub rates_1k_high: u64,
    pub rates_100_clients: u64,
    pub rates_100: Vec<u64>,
    pub rates_secs: u64,
    pub rates_runs: usize,
    /// cdc-gen's `linger.ms` in the rate scenarios
    pub rates_linger_ms: u32,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            ingest_changes: 1_000_000,
            ingest_keys: 100_000,
            recovery_rows: 1_000_000,
            restore_runs: 3,
            snapshot_runs: 5,
            storm_clients: 1_000,
            storm_secs: 30,
            fanout_clients: 10_000,
            fanout_rows: 1_000,
            fanout_rate: 100,
            fanout_secs: 10,
            fetch_wait_ms: 10,
            light_clients: 10,
            light_rate: 100,
            light_secs: 20,
            latency_clients: 1_000,
            latency_few_clients: 10,
            latency_rate: 1_000,
            latency_secs: 10,
            idle_connections: 50_000,
            snapshot_connections: 10_000,
            idle_capped_by: None,
            local_addrs: 4,
            so_ingest_changes: 400_000,
            so_ingest_keys: 40_000,
            so_runs: 3,
            so_clients: 1_000,
            so_rows: 1_000,
            so_rate: 200,
            so_secs: 10,
            fo_keys: 200,
            fo_rate: 1_000,
            fo_runs: 3,
            resume_runs: 5,
            resume_missed: 50,
            pub_connections: 100,
            pub_secs: 10,
            pub_warmup_secs: 2,
            pub_runs: 3,
            pub_rate: 10_000,
            pub_verify: 500,
            auth_rows: 1_000,
            auth_connects: 3_000,
            auth_clients: 1_000,
            auth_rate: 200,
            auth_secs: 10,
            auth_runs: 3,
            filter_rows: 100_000,
            filter_clients: 10_000,
            filter_scan_clients: 1_000,
            filter_rate: 1_000,
            filter_secs: 10,
            filter_runs: 3,
            filter_swarm_slack_secs: 50,
            view_events: 1_000_000,
            view_players: 10_000,
            view_runs: 3,
            view_top_rows: vec![10_000, 100_000, 1_000_000],
            view_top_updates: 200_000,
            rates_1k_clients: 1_000,
            rates_1k_low: 200,
            rates_1k_high: 1_000,
            rates_100_clients: 100,
            rates_100: vec![1_000, 2_000, 5_000, 10_000, 20_000],
            rates_secs: 10,
            rates_runs: 3,
            rates_linger_ms: 5,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            ingest_changes: 20_000,
            ingest_keys: 2_000,
            recovery_rows: 5_000,
            restore_runs: 1,
            snapshot_runs: 3,
            storm_clients: 50,
            storm_secs: 3,
            fanout_clients: 100,
            fanout_rows: 100,
            fanout_rate: 50,
            fanout_secs: 3,
            fetch_wait_ms: 10,
            light_clients: 5,
            light_rate: 50,
            light_secs: 3,
            latency_clients: 20,
            latency_few_clients: 5,
            latency_rate: 100,
            latency_secs: 3,
            idle_connections: 300,
            snapshot_connections: 300,
            idle_capped_by: None,
            local_addrs: 2,
            so_ingest_changes: 10_000,
            so_ingest_keys: 1_000,
            so_runs: 1,
            so_clients: 40,
            so_rows: 100,
            so_rate: 50,
            so_secs: 3,
            fo_keys: 40,
            fo_rate: 200,
            fo_runs: 1,
            resume_runs: 2,
            resume_missed: 10,
            pub_connections: 20,
            pub_secs: 2,
            pub_warmup_secs: 1,
            pub_runs: 1,
            pub_rate: 1_000,
            pub_verify: 50,
            auth_rows: 100,
            auth_connects: 20,
            auth_clients: 20,
            auth_rate: 50,
            auth_secs: 3,
            auth_runs: 1,
            filter_rows: 2_000,
            filter_clients: 100,
            filter_scan_clients: 50,
            filter_rate: 200,
            filter_secs: 3,
            filter_runs: 1,
            filter_swarm_slack_secs: 20,
            view_events: 20_000,
            view_players: 1_000,
            view_runs: 1,
            view_top_rows: vec![1_000, 10_000],
            view_top_updates: 20_000,
            rates_1k_clients: 20,
            rates_1k_low: 50,
            rates_1k_high: 100,
            rates_100_clients: 10,
            rates_100: vec![200],
            rates_secs: 2,
            rates_runs: 1,
            rates_linger_ms: 5,
        }
    }
}

pub fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

/// ws-swarm's arguments for `clients` no-state clients of the table listening `secs`, then `extra`.
pub fn swarm_args(base: &str, clients: u64, secs: u64, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        s("--base"),
        s(base),
        s("--table"),
        s(TABLE),
        s("--clients"),
        s(clients),
        s("--duration-secs"),
        s(secs),
        s("--no-state"),
    ];
    v.extend_from_slice(extra);
    v
}

/// Produces `count` changes over `keys` keys as fast as possible; returns cdc-gen's summary.
pub fn prefill(env: &Env, topic: &str, keys: u64, count: u64) -> anyhow::Result<Value> {
    prefill_partitions(env, topic, keys, count, 1)
}

/// [`prefill`] into a topic of `partitions` partitions (when cdc-gen creates it).
pub fn prefill_partitions(
    env: &Env,
    topic: &str,
    keys: u64,
    count: u64,
    partitions: u32,
) -> anyhow::Result<Value> {
    env.tool(
        "cdc-gen",
        &[
            s("--brokers"),
            env.brokers.clone(),
            s("--topic"),
            s(topic),
            s("--keys"),
            s(keys),
            s("--count"),
            s(count),
            s("--partitions"),
            s(partitions),
        ],
    )
}

/// Produces `rate` changes/s over `keys` keys for `secs` seconds (cdc-gen gets 5 s of slack);
/// returns cdc-gen's summary.
pub fn paced(env: &Env, topic: &str, keys: u64, rate: u64, secs: u64) -> anyhow::Result<Value> {
    paced_linger(env, topic, keys, rate, secs, 1)
}

/// [`paced`] with cdc-gen's producer lingering `linger_ms` for a fuller request.
pub fn paced_linger(
    env: &Env,
    topic: &str,
    keys: u64,
    rate: u64,
    secs: u64,
    linger_ms: u32,
) -> anyhow::Result<Value> {
    env.tool(
        "cdc-gen",
        &[
            s("--brokers"),
            env.brokers.clone(),
            s("--topic"),
            s(topic),
            s("--keys"),
            s(keys),
            s("--count"),
            s(rate * secs),
            s("--rate"),
            s(rate),
            s("--duration-secs"),
            s(secs + 5),
            s("--linger-ms"),
            s(linger_ms),
        ],
    )
}

/// Starts ws-swarm with `clients` no-state clients ramped at `ramp`/s, each listening `secs`, and
/// waits until livetable counts them all (at most the ramp + 60 s); returns the running swarm and
/// the connections livetable counted. `more`: further ws-swarm arguments.
pub fn swarm_connected(
    env: &Env,
    lt: &Livetable,
    clients: u64,
    ramp: u64,
    secs: u64,
    z: &Sizes,
    more: &[String],
) -> anyhow::Result<(crate::stack::Tool, f64)> {
    let mut extra = vec![
        s("--ramp-per-sec"),
        s(ramp),
        s("--local-addrs"),
        s(z.local_addrs),
    ];
    extra.extend_from_slice(more);
    let swarm = env.spawn_tool("ws-swarm", &swarm_args(&lt.base, clients, secs, &extra))?;
    let until = Instant::now() + Duration::from_secs(clients / ramp + 60);
    let mut connected = 0.0;
    while Instant::now() < until {
        connected = probe::metric(&probe::metrics(&lt.base), "livetable_connections");
        if connected >= clients as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((swarm, connected))
}

/// Starts livetable on a prefilled topic and waits until it holds `seq` changes.
pub fn loaded(
    env: &Env,
    name: &str,
    topic: &str,
    seq: u64,
    extra: &[&str],
) -> anyhow::Result<Livetable> {
    let lt = env.livetable(name, topic, extra)?;
    let (_, _, got) = probe::until_seq(
        &lt.base,
        TABLE,
        seq,
        Duration::from_secs(20),
        Instant::now(),
    );
    anyhow::ensure!(
        got >= seq,
        "{name}: livetable reached seq {got} of {seq} ({})",
        lt.log_tail()
    );
    Ok(lt)
}

/// Ingest: N changes over K keys are in the topic before livetable starts; changes/s from the
/// first applied change to the last.
pub fn ingest(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<Livetable> {
    let topic = env.topic("ingest");
    let gen = prefill(env, &topic, z.ingest_keys, z.ingest_changes)?;
    sc.add(
        "cdc-gen produce rate (context)",
        gen["rate_per_sec"].as_f64().unwrap_or(0.0),
        "changes/s",
        None,
    );
    let t0 = Instant::now();
    let lt = env.livetable("ingest", &topic, &["--max-connections", "20000"])?;
    let (first, last, seq) = probe::until_seq(
        &lt.base,
        TABLE,
        z.ingest_changes,
        Duration::from_secs(20),
        t0,
    );
    anyhow::ensure!(seq > 0, "nothing ingested ({})", lt.log_tail());
    let rate = seq as f64 / (last - first).max(1e-3);
    sc.add(
        "changes/s (decode -> sled -> changelog)",
        rate,
        "changes/s",
        Some(Goal::AtLeast(150_000.0)),
    );
    sc.add("changes applied", seq as f64, "changes", None);
    sc.add("start -> all applied", last, "s", None);
    let m = probe::metrics(&lt.base);
    sc.add(
        "server CPU during the run",
        lt.cpu_secs().unwrap_or(f64::NAN),
        "s",
        None,
    );
    sc.add(
        "store size",
        probe::metric(&m, "livetable_store_size_bytes") / 1e6,
        "MB",
        None,
    );
    if seq < z.ingest_changes {
        sc.note(format!("stalled at seq {seq} of {}", z.ingest_changes));
    }
    Ok(lt)
}

/// Snapshot: first byte and complete on the ingest table, then a storm of clients at once.
pub fn snapshot(env: &Env, z: &Sizes, lt: &Livetable, sc: &mut Scenario) -> anyhow::Result<()> {
    let rows = probe::table_seq(&lt.base, TABLE).map_or(0, |t| t.1);
    sc.setup = format!(
        "{rows}-row table (the ingest table); {} runs each; then {} WebSocket clients at once",
        z.snapshot_runs, z.storm_clients
    );
    let (mut first, mut done, mut ws) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..z.snapshot_runs {
        let (f, d) = probe::sse_snapshot_timing(&lt.base, TABLE)?;
        first.push(f);
        done.push(d);
        let one = env.tool("ws-swarm", &swarm_args(&lt.base, 1, 1, &[]))?;
        ws.push(
            one["time_to_snapshot_ms"]["max"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    sc.add(
        "SSE first byte (median)",
        median(first),
        "ms",
        Some(Goal::AtMost(50.0)),
    );
    sc.add(
        "SSE snapshot complete (median)",
        median(done),
        "ms",
        Some(Goal::AtMost(500.0)),
    );
    sc.add(
        "WebSocket connect -> snapshot received (median)",
        median(ws),
        "ms",
        Some(Goal::AtMost(500.0)),
    );
    let storm = env.tool(
        "ws-swarm",
        &swarm_args(
            &lt.base,
            z.storm_clients,
            z.storm_secs,
            &[s("--local-addrs"), s(z.local_addrs)],
        ),
    )?;
    let served = storm["connected"].as_u64().unwrap_or(0);
    sc.add(
        "storm: clients served",
        served as f64,
        "clients",
        Some(Goal::AtLeast(z.storm_clients as f64)),
    );
    sc.add(
        "storm: time to snapshot p50",
        storm["time_to_snapshot_ms"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        "ms",
        None,
    );
    sc.add(
        "storm: all served (max time to snapshot)",
        storm["time_to_snapshot_ms"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0,
        "s",
        Some(Goal::AtMost(5.0)),
    );
    Ok(())
}

/// Recovery: N distinct rows; graceful restart -> ready; data dir deleted -> restored and ready.
pub fn recovery(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let topic = env.topic("recovery");
    prefill(env, &topic, z.recovery_rows, z.recovery_rows)?;
    let t0 = Instant::now();
    let mut lt = env.livetable("recovery", &topic, &[])?;
    let (first, last, seq) = probe::until_seq(
        &lt.base,
        TABLE,
        z.recovery_rows,
        Duration::from_secs(20),
        t0,
    );
    anyhow::ensure!(
        seq >= z.recovery_rows,
        "recovery: reached seq {seq} ({})",
        lt.log_tail()
    );
    if last - first > 1.0 {
        sc.add(
            "ingest of distinct rows (context)",
            seq as f64 / (last - first),
            "changes/s",
            None,
        );
    }
    probe::time_to_ready(&lt.base, Instant::now(), Duration::from_secs(120))?;
    lt.stop()?;
    let t0 = Instant::now();
    env.start(&mut lt)?;
    let restart = probe::time_to_ready(&lt.base, t0, Duration::from_secs(300))?;
    let m = probe::metrics(&lt.base);
    let join = probe::metric(&m, "livetable_group_join_seconds");
    let load = probe::metric(&m, "livetable_store_load_seconds");
    sc.add(
        "restart -> ready (graceful stop before)",
        restart,
        "s",
        None,
    );
    sc.add(
        "restart: the store load in it (livetable_store_load_seconds)",
        load,
        "s",
        None,
    );
    sc.add(
        "restart: the group join in it (livetable_group_join_seconds; it overlaps the load)",
        join,
        "s",
        None,
    );
    // the broker's delay counts only where it outlasted the load
    sc.add(
        "restart -> ready beyond the group join's wait past the load",
        restart - (join - load).max(0.0),
        "s",
        Some(Goal::AtMost(2.0)),
    );
    let rows = probe::table_seq(&lt.base, TABLE).map_or(0, |t| t.1);
    anyhow::ensure!(rows == z.recovery_rows, "after restart {rows} rows");
    // the restore: on the server's CPU (the per-core figure), then on every core of the machine
    // (the restore's store writes run on a thread of their own where it has more than one)
    let mut settings = Vec::new();
    if let Some(cpu) = lt.cpu() {
        settings.push((Some(cpu.to_string()), format!("on CPU {cpu}")));
    }
    settings.push((None, "on every core".to_string()));
    for (cpu, label) in settings {
        lt.set_cpu(cpu);
        let (mut ready, mut phase) = (Vec::new(), Vec::new());
        for _ in 0..z.restore_runs {
            lt.stop()?;
            std::fs::remove_dir_all(&lt.data_dir).context("removing the data dir")?;
            let t0 = Instant::now();
            env.start(&mut lt)?;
            ready.push(probe::time_to_ready(
                &lt.base,
                t0,
                Duration::from_secs(600),
            )?);
            let m = probe::metrics(&lt.base);
            phase.push(probe::metric(&m, "livetable_restore_duration_seconds"));
            let rows = probe::table_seq(&lt.base, TABLE).map_or(0, |t| t.1);
            anyhow::ensure!(rows == z.recovery_rows, "after restore {rows} rows");
        }
        let runs = z.restore_runs;
        sc.add(
            &format!("empty data dir -> restored from the changelog and ready, {label} (median of {runs})"),
            median(ready),
            "s",
            Some(Goal::AtMost(10.0)),
        );
        sc.add(
            &format!(
                "restore phase (livetable_restore_duration_seconds), {label} (median of {runs})"
            ),
            median(phase),
            "s",
            None,
        );
    }
    Ok(())
}

/// Live load on a table watched by many clients: row updates delivered, freshness, server view.
/// A live load: `clients` watch a `rows`-row table while `rate` changes/s arrive for `secs`.
#[derive(Clone, Copy)]
pub struct Live {
    pub clients: u64,
    pub rows: u64,
    pub rate: u64,
    pub secs: u64,
    /// of the input topic
    pub partitions: u32,
}

/// A live-client run up to its load: a prefilled topic, the broker's own delivery probe (when
/// `time_broker`), a livetable for `l.clients` connections and a swarm of them connected,
/// listening through the ramp, `l.secs` of load and 8 s of slack.
pub struct LiveStack {
    pub topic: String,
    pub delivery: Option<delivery::Delivery>,
    pub lt: Livetable,
    pub swarm: crate::stack::Tool,
    /// Connections livetable counted before the load.
    pub connected: f64,
}

pub fn live_stack(
    env: &Env,
    name: &str,
    l: &Live,
    time_broker: bool,
    z: &Sizes,
) -> anyhow::Result<LiveStack> {
    let topic = env.topic(name);
    prefill_partitions(env, &topic, l.rows, l.rows, l.partitions)?;
    // the broker's own delivery time, measured in the same run (not while 1,000s of clients
    // saturate the tools' core: there it would time the core, not the broker); started before
    // livetable so that its group join is over before the clients' listening time starts
    let delivery = if time_broker {
        Some(delivery::start(
            &env.brokers,
            &topic,
            delivery::now_ms(),
            z.fetch_wait_ms,
        )?)
    } else {
        None
    };
    let max = (l.clients + 100).to_string();
    let fetch = format!("fetch.wait.max.ms={}", z.fetch_wait_ms);
    let lt = loaded(
        env,
        name,
        &topic,
        l.rows,
        &["--max-connections", &max, "--kafka-prop", &fetch],
    )?;
    let ramp = 2_000u64;
    let ramp_secs = l.clients / ramp + 1;
    let (swarm, connected) =
        swarm_connected(env, &lt, l.clients, ramp, ramp_secs + l.secs + 8, z, &[])?;
    Ok(LiveStack {
        topic,
        delivery,
        lt,
        swarm,
        connected,
    })
}

pub fn live(env: &Env, name: &str, l: Live, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let LiveStack {
        topic,
        delivery,
        lt,
        swarm,
        connected,
    } = live_stack(env, name, &l, name != "fanout", z)?;
    let Live {
        rows, rate, secs, ..
    } = l;
    sc.add(
        "clients connected before the load",
        connected,
        "clients",
        None,
    );
    let m0 = probe::metrics(&lt.base);
    let cpu0 = lt.cpu_secs().unwrap_or(0.0);
    let t0 = Instant::now();
    let gen = paced(env, &topic, rows, rate, secs)?;
    let load_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let broker = match delivery {
        Some(d) => d.finish()?,
        None => Value::Null,
    };
    let m1 = probe::metrics(&lt.base);
    let cpu = lt.cpu_secs().unwrap_or(0.0) - cpu0;
    let out = swarm.finish()?;
    let row_updates = out["row_updates"].as_f64().unwrap_or(0.0);
    sc.add(
        "changes/s produced",
        gen["rate_per_sec"].as_f64().unwrap_or(0.0),
        "changes/s",
        None,
    );
    let delivered = row_updates / load_secs;
    let fresh = &out["freshness_ms"];
    let p = |k: &str| fresh[k].as_f64().unwrap_or(f64::NAN);
    if name == "fanout" {
        sc.add(
            "row updates/s delivered (received by the clients)",
            delivered,
            "rows/s",
            Some(Goal::AtLeast(1_000_000.0)),
        );
        sc.add(
            "freshness p99 (client receipt - source ts_ms)",
            p("p99"),
            "ms",
            Some(Goal::AtMost(50.0)),
        );
        sc.add("freshness p50", p("p50"), "ms", None);
    } else {
        sc.add(
            "row updates/s delivered (context)",
            delivered,
            "rows/s",
            None,
        );
        sc.add(
            "latency p50 (client receipt - source ts_ms)",
            p("p50"),
            "ms",
            Some(Goal::AtMost(12.0)),
        );
        sc.add("latency p99", p("p99"), "ms", Some(Goal::AtMost(20.0)));
        sc.add("latency p99.9", p("p99_9"), "ms", None);
        let b = |k: &str| broker[k].as_f64().unwrap_or(f64::NAN);
        sc.add(
            "broker delivery p50 (plain consumer receipt - source ts_ms)",
            b("p50"),
            "ms",
            None,
        );
        sc.add("broker delivery p99", b("p99"), "ms", None);
        let light = name == "light";
        sc.add(
            "latency beyond the broker p50 (client p50 - plain consumer p50)",
            p("p50") - b("p50"),
            "ms",
            light.then_some(Goal::AtMost(2.0)),
        );
        sc.add(
            "latency beyond the broker p99 (client p99 - plain consumer p99)",
            p("p99") - b("p99"),
            "ms",
            light.then_some(Goal::AtMost(10.0)),
        );
    }
    let sent = probe::metric(&m1, "livetable_patches_sent_total")
        - probe::metric(&m0, "livetable_patches_sent_total");
    sc.add(
        "server: patch messages written/s",
        sent / load_secs,
        "msgs/s",
        None,
    );
    let (b0, b1) = (
        probe::buckets(&m0, "livetable_kafka_to_socket_seconds"),
        probe::buckets(&m1, "livetable_kafka_to_socket_seconds"),
    );
    let (s0, s1) = (
        probe::buckets(&m0, "livetable_ingest_to_socket_seconds"),
        probe::buckets(&m1, "livetable_ingest_to_socket_seconds"),
    );
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        if let Some(v) = probe::bucket_quantile(&b0, &b1, q) {
            sc.add(
                &format!("server: Kafka timestamp -> socket write {name} (bucket upper bound)"),
                v * 1000.0,
                "ms",
                None,
            );
        }
        if let Some(v) = probe::bucket_quantile(&s0, &s1, q) {
            sc.add(
                &format!(
                    "server: livetable's share, poll -> socket write {name} (bucket upper bound)"
                ),
                v * 1000.0,
                "ms",
                None,
            );
        }
    }
    sc.add(
        "server CPU used during the load",
        cpu / load_secs * 100.0,
        "% of a core",
        None,
    );
    sc.add(
        "client-side messages received",
        out["messages"].as_f64().unwrap_or(0.0),
        "msgs",
        None,
    );
    let closed = probe::metric(&m1, "livetable_slow_client_disconnects_total");
    if closed > 0.0 {
        sc.note(format!(
            "{closed} clients closed by the server as slow consumers"
        ));
    }
    if out["errors"].as_u64().unwrap_or(0) > 0 || out["reconnects"].as_u64().unwrap_or(0) > 0 {
        sc.note(format!(
            "swarm: {} errors, {} reconnects",
            out["errors"], out["reconnects"]
        ));
    }
    Ok(())
}

/// Idle connections after their snapshot: RSS growth per connection with N clients on a table of
/// `rows` rows (name: the scenario's).
pub fn connections(
    env: &Env,
    name: &str,
    n: u64,
    rows: u64,
    goal_kib: f64,
    sc: &mut Scenario,
    z: &Sizes,
) -> anyhow::Result<()> {
    let topic = env.topic(name);
    prefill(env, &topic, rows, rows)?;
    let max = (n + 100).to_string();
    let lt = loaded(env, name, &topic, rows, &["--max-connections", &max])?;
    std::thread::sleep(Duration::from_secs(1));
    let before = lt.rss()?;
    let ramp = 5_000u64;
    // every client stays connected until well after the last one connected
    let hold = 2 * (n / ramp) + 30;
    let (swarm, open) = swarm_connected(env, &lt, n, ramp, hold, z, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let after = lt.rss()?;
    // the same connections, still idle, later: what the allocator gave back of the connect
    // storm's transient buffers (snapshot frames being written) meanwhile
    let later_secs = (hold / 2).min(15);
    std::thread::sleep(Duration::from_secs(later_secs));
    let later = lt.rss()?;
    let still_open = probe::metric(&probe::metrics(&lt.base), "livetable_connections");
    let out = swarm.finish()?;
    sc.add(
        "connections open at the measurement",
        open,
        "connections",
        Some(Goal::AtLeast(n as f64)),
    );
    sc.add("RSS before", before as f64 / 1e6, "MB", None);
    sc.add("RSS with the connections", after as f64 / 1e6, "MB", None);
    let per = (after.saturating_sub(before)) as f64 / open.max(1.0) / 1024.0;
    sc.add(
        "RSS per idle connection",
        per,
        "KiB",
        Some(Goal::AtMost(goal_kib)),
    );
    if still_open >= open {
        sc.add(
            &format!("RSS per idle connection {later_secs} s later (context)"),
            (later.saturating_sub(before)) as f64 / open.max(1.0) / 1024.0,
            "KiB",
            None,
        );
    } else {
        sc.note(format!(
            "{still_open} of {open} connections still open {later_secs} s later: no later RSS figure"
        ));
    }
    if out["errors"].as_u64().unwrap_or(0) > 0 {
        sc.note(format!(
            "swarm: {} clients failed to connect",
            out["errors"]
        ));
    }
    Ok(())
}
