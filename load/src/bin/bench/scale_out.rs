//! The scale-out scenarios (README "Running several instances"): materialisers in one consumer
//! group over a 4-partition input topic, gateways serving clients from the changelog topics.
//! Every livetable process is pinned to the server CPU unless a scenario says otherwise, the load
//! tools to the tools CPU; the clients that need exact timings (failover, resume) run inside bench.
//! Each run is a deployment of its own (group id, changelog topics, data directories).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;

use crate::client::{self, Order, Watcher};
use crate::measure::{median, Goal, Scenario};
use crate::probe;
use crate::scenarios::{s, swarm_args, Sizes, TABLE};
use crate::stack::{Env, Livetable};

/// Partitions of every scale-out input topic.
pub const PARTITIONS: u32 = 4;

/// cdc-gen's arguments: `count` changes over `keys` keys into `topic` (created with 4
/// partitions), at `rate`/s (0 = as fast as possible) for at most `secs`.
fn gen_args(env: &Env, topic: &str, keys: u64, count: u64, rate: u64, secs: u64) -> Vec<String> {
    vec![
        s("--brokers"),
        env.brokers.clone(),
        s("--topic"),
        s(topic),
        s("--partitions"),
        s(PARTITIONS),
        s("--keys"),
        s(keys),
        s("--count"),
        s(count),
        s("--rate"),
        s(rate),
        s("--duration-secs"),
        s(secs),
    ]
}

fn materialiser(env: &Env, dep: &str, name: &str, topic: &str) -> anyhow::Result<Livetable> {
    env.node(
        dep,
        name,
        "materialiser",
        topic,
        env.server_cpu.clone(),
        &[],
    )
}

fn gateway(env: &Env, dep: &str, name: &str, topic: &str, max: u64) -> anyhow::Result<Livetable> {
    let max = max.to_string();
    env.node(
        dep,
        name,
        "gateway",
        topic,
        env.server_cpu.clone(),
        &["--max-connections", &max],
    )
}

/// Waits until a gateway serves the table at `seq` changes or more.
fn gateway_at(gw: &Livetable, seq: u64, limit: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        let now = probe::table_seq(&gw.base, TABLE).map_or(0, |t| t.0);
        if now >= seq {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the gateway serves seq {now} of {seq} after {limit:?} ({})",
            gw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn seq_of(base: &str) -> u64 {
    probe::table_seq(base, TABLE).map_or(0, |t| t.0)
}

/// Ingest by 1 and 2 materialisers of a 4-partition topic filled before they start.
pub fn ingest(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let topic = env.topic("so-ingest");
    let n = z.so_ingest_changes;
    let gen = env.tool(
        "cdc-gen",
        &gen_args(env, &topic, z.so_ingest_keys, n, 0, 3600),
    )?;
    sc.add(
        "cdc-gen produce rate (context)",
        gen["rate_per_sec"].as_f64().unwrap_or(0.0),
        "changes/s",
        None,
    );
    let server = env.server_cpu.clone();
    let mut configs = vec![
        ("1 materialiser", vec![server.clone()]),
        ("2 materialisers on one core", vec![server.clone(), server]),
    ];
    if let (Some(a), Some(b)) = (&env.server_cpu, &env.tools_cpu) {
        // nothing else runs during the ingest but the broker, so the tools' core is free
        configs.push((
            "2 materialisers, one core each",
            vec![Some(a.clone()), Some(b.clone())],
        ));
    }
    for (ci, (label, cpus)) in configs.iter().enumerate() {
        let (mut rates, mut cpu, mut shares) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..z.so_runs {
            let run = ingest_run(env, &topic, &format!("so-ingest-{ci}-{r}"), cpus, n)?;
            if run.fences != PARTITIONS as f64 {
                sc.note(format!(
                    "{label}, run {}: {} partition takeovers for {PARTITIONS} partitions (a rebalance moved partitions during the run)",
                    r + 1,
                    run.fences
                ));
            }
            rates.push(run.rate);
            cpu.push(run.cpu);
            shares.push(run.shares);
        }
        let runs = rates.len();
        sc.add(
            &format!("{label}: changes/s (median of {runs})"),
            median(rates.clone()),
            "changes/s",
            None,
        );
        sc.add(
            &format!("{label}: CPU of the materialisers (median)"),
            median(cpu),
            "s",
            None,
        );
        sc.note(format!(
            "{label}: runs {} changes/s; changes applied per materialiser {}",
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            shares
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

struct IngestRun {
    rate: f64,
    shares: Vec<u64>,
    fences: f64,
    cpu: f64,
}

/// One deployment of materialisers (one per entry of `cpus`, pinned there) over the prefilled
/// topic; changes/s from the first change applied (by any) to the last (the sum of their
/// `livetable_table_seq` reaching `n`).
fn ingest_run(
    env: &Env,
    topic: &str,
    dep: &str,
    cpus: &[Option<String>],
    n: u64,
) -> anyhow::Result<IngestRun> {
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for (i, cpu) in cpus.iter().enumerate() {
        let name = format!("mat{}", i + 1);
        nodes.push(env.node(dep, &name, "materialiser", topic, cpu.clone(), &[])?);
    }
    let stall = Duration::from_secs(20);
    let (mut first, mut last, mut cur) = (None, Instant::now(), 0u64);
    let mut shares = vec![0u64; nodes.len()];
    loop {
        for (share, node) in shares.iter_mut().zip(&nodes) {
            // a failed scrape reads 0: a materialiser's count never goes back in this run
            let seq = probe::metric(&probe::metrics(&node.base), "livetable_table_seq") as u64;
            *share = (*share).max(seq);
        }
        let sum: u64 = shares.iter().sum();
        if sum > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if sum != cur {
            cur = sum;
            last = Instant::now();
        }
        if sum >= n || (last.elapsed() > stall && (first.is_some() || t0.elapsed() > stall * 3)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::ensure!(
        cur >= n,
        "{dep}: the materialisers applied {cur} of {n} changes ({})",
        nodes[0].log_tail()
    );
    let first = first.context("nothing applied")?;
    let mut fences = 0.0;
    let mut cpu = 0.0;
    for node in &nodes {
        fences += probe::metric(
            &probe::metrics(&node.base),
            "livetable_fences_written_total",
        );
        cpu += node.cpu_secs().unwrap_or(f64::NAN);
    }
    Ok(IngestRun {
        rate: cur as f64 / (last - first).as_secs_f64().max(1e-3),
        shares,
        fences,
        cpu,
    })
}

/// The same clients and change rate served by 1, then 2 gateways of one deployment.
pub fn clients(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let topic = env.topic("so-clients");
    let dep = "so-clients";
    env.tool(
        "cdc-gen",
        &gen_args(env, &topic, z.so_rows, z.so_rows, 0, 3600),
    )?;
    let mat = materialiser(env, dep, "mat1", &topic)?;
    let max = z.so_clients + 100;
    let gw1 = gateway(env, dep, "gw1", &topic, max)?;
    gateway_at(&gw1, z.so_rows, Duration::from_secs(60))?;
    let one = serve(env, z, &topic, &mat, &[&gw1])?;
    let gw2 = gateway(env, dep, "gw2", &topic, max)?;
    gateway_at(&gw2, seq_of(&gw1.base), Duration::from_secs(60))?;
    let two = serve(env, z, &topic, &mat, &[&gw1, &gw2])?;
    for (label, r) in [("1 gateway", one), ("2 gateways", two)] {
        sc.add(
            &format!("{label}: clients connected before the load"),
            r.connected,
            "clients",
            None,
        );
        sc.add(
            &format!("{label}: row updates/s delivered"),
            r.delivered,
            "rows/s",
            None,
        );
        let worst = if r.fresh.len() > 1 {
            " (the worse gateway)"
        } else {
            ""
        };
        let p = |i: usize| r.fresh.iter().map(|f| f[i]).fold(f64::NAN, f64::max);
        sc.add(&format!("{label}: freshness p50{worst}"), p(0), "ms", None);
        sc.add(&format!("{label}: freshness p99{worst}"), p(1), "ms", None);
        for (i, c) in r.cpu.iter().enumerate() {
            sc.add(
                &format!("{label}: CPU of gateway {}", i + 1),
                *c,
                "% of a core",
                None,
            );
        }
        sc.add(
            &format!("{label}: CPU of the materialiser (context)"),
            r.mat_cpu,
            "% of a core",
            None,
        );
        if r.fresh.len() > 1 {
            sc.note(format!(
                "{label}: freshness p50/p99 per gateway {}",
                r.fresh
                    .iter()
                    .map(|f| format!("{:.0}/{:.0} ms", f[0], f[1]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for n in r.notes {
            sc.note(format!("{label}: {n}"));
        }
    }
    Ok(())
}

struct Served {
    connected: f64,
    delivered: f64,
    /// Per gateway's clients, freshness [p50, p99] in ms.
    fresh: Vec<[f64; 2]>,
    /// Per gateway, % of a core during the load.
    cpu: Vec<f64>,
    mat_cpu: f64,
    notes: Vec<String>,
}

/// `so_clients` clients split evenly over `gws` (a ws-swarm per gateway, on the tools' CPU)
/// while cdc-gen produces `so_rate` changes/s for `so_secs`.
fn serve(
    env: &Env,
    z: &Sizes,
    topic: &str,
    mat: &Livetable,
    gws: &[&Livetable],
) -> anyhow::Result<Served> {
    let per = z.so_clients / gws.len() as u64;
    let ramp = 2_000u64;
    let ramp_secs = z.so_clients / ramp + 1;
    let listen = ramp_secs + z.so_secs + 8;
    let mut swarms = Vec::new();
    for gw in gws {
        let extra = [
            s("--ramp-per-sec"),
            s(ramp / gws.len() as u64),
            s("--local-addrs"),
            s(z.local_addrs),
        ];
        swarms.push(env.spawn_tool("ws-swarm", &swarm_args(&gw.base, per, listen, &extra))?);
    }
    let until = Instant::now() + Duration::from_secs(ramp_secs + 60);
    let mut connected = 0.0;
    while Instant::now() < until {
        connected = gws
            .iter()
            .map(|g| probe::metric(&probe::metrics(&g.base), "livetable_connections"))
            .sum();
        if connected >= (per * gws.len() as u64) as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu0: Vec<f64> = gws.iter().map(|g| g.cpu_secs().unwrap_or(0.0)).collect();
    let mat0 = mat.cpu_secs().unwrap_or(0.0);
    let t0 = Instant::now();
    env.tool(
        "cdc-gen",
        &gen_args(
            env,
            topic,
            z.so_rows,
            z.so_rate * z.so_secs,
            z.so_rate,
            z.so_secs + 5,
        ),
    )?;
    let load_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let cpu: Vec<f64> = gws
        .iter()
        .zip(&cpu0)
        .map(|(g, c0)| (g.cpu_secs().unwrap_or(0.0) - c0) / load_secs * 100.0)
        .collect();
    let mat_cpu = (mat.cpu_secs().unwrap_or(0.0) - mat0) / load_secs * 100.0;
    let (mut rows, mut fresh, mut notes) = (0.0, Vec::new(), Vec::new());
    for (i, sw) in swarms.into_iter().enumerate() {
        let out = sw.finish()?;
        rows += out["row_updates"].as_f64().unwrap_or(0.0);
        let f = &out["freshness_ms"];
        fresh.push([
            f["p50"].as_f64().unwrap_or(f64::NAN),
            f["p99"].as_f64().unwrap_or(f64::NAN),
        ]);
        if out["errors"].as_u64().unwrap_or(0) > 0 || out["reconnects"].as_u64().unwrap_or(0) > 0 {
            notes.push(format!(
                "swarm of gateway {}: {} errors, {} reconnects",
                i + 1,
                out["errors"],
                out["reconnects"]
            ));
        }
    }
    Ok(Served {
        connected,
        delivered: rows / load_secs,
        fresh,
        cpu,
        mat_cpu,
        notes,
    })
}

/// How the member goes in a failover run.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// kill -9; the survivor takes its partitions after the session timeout.
    Kill,
    /// SIGTERM (the member leaves the group); then it starts again: a node joins.
    Graceful,
    /// kill -9 and an immediate restart on the same data directory, with or without a static
    /// membership id (`--instance-id`).
    KillRestart { static_id: bool },
}

/// kill -9 of one of 2 materialisers while changes flow, `fo_runs` times; a graceful stop and a
/// join; kill -9 and restart with and without `--instance-id`, `fo_runs` times each. A client
/// watches throughout: its changes never go back and it ends with the gateway's rows.
pub fn failover(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let mut order = Vec::new();
    let mut runs = Vec::new();
    for r in 0..z.fo_runs {
        let run = failover_run(env, z, &format!("so-failover-{r}"), Stop::Kill)?;
        sc.note(format!(
            "kill -9 run {}: the killed member held partitions {:?}, {} of {} keys waited for the failover; {:.1} s = {:.1} s to the assignment + {:.1} s takeover + {:.1} s catch-up; longest pause of a key on the client {:.1} s",
            r + 1,
            run.victim_parts,
            run.waiting_keys,
            z.fo_keys,
            run.total,
            run.assigned.unwrap_or(f64::NAN),
            run.active - run.assigned.unwrap_or(f64::NAN),
            run.total - run.active,
            run.max_gap
        ));
        order.push((run.order, run.mismatched));
        runs.push(run);
    }
    let n = runs.len();
    let m = |runs: &[Failover], f: &dyn Fn(&Failover) -> f64| median(runs.iter().map(f).collect());
    sc.add(
        &format!("kill -9 -> every key of the killed materialiser updated again on a gateway's client (median of {n})"),
        m(&runs, &|r| r.total),
        "s",
        Some(Goal::AtMost(10.0)),
    );
    sc.add(
        "part: kill -> the survivor assigned the partitions (session timeout 6 s + rebalance; median)",
        m(&runs, &|r| r.assigned.unwrap_or(f64::NAN)),
        "s",
        None,
    );
    sc.add(
        "part: takeover of the partitions (changelog read, fence; median)",
        m(&runs, &|r| r.active - r.assigned.unwrap_or(f64::NAN)),
        "s",
        None,
    );
    sc.add(
        "part: catch-up (input backlog applied, changelog -> gateway -> client; median)",
        m(&runs, &|r| r.total - r.active),
        "s",
        None,
    );
    sc.add(
        "keys that waited for the failover (median)",
        m(&runs, &|r| r.waiting_keys as f64),
        "keys",
        None,
    );
    let g = failover_run(
        env,
        z,
        &format!("so-failover-{}", z.fo_runs),
        Stop::Graceful,
    )?;
    order.push((g.order, g.mismatched));
    sc.add(
        "graceful stop (SIGTERM) -> every key updated again (context, 1 run)",
        g.total,
        "s",
        None,
    );
    sc.add(
        "graceful stop: member exited (left the group) -> the survivor assigned (the rebalance alone)",
        g.assigned.unwrap_or(f64::NAN) - g.stop_secs,
        "s",
        None,
    );
    sc.note(format!(
        "graceful stop: the member took {:.1} s to exit; {:.1} s = {:.1} s to the assignment + {:.1} s takeover + {:.1} s catch-up; longest pause of a key on the client {:.1} s",
        g.stop_secs,
        g.total,
        g.assigned.unwrap_or(f64::NAN),
        g.active - g.assigned.unwrap_or(f64::NAN),
        g.total - g.active,
        g.max_gap
    ));
    if let Some(j) = &g.join {
        sc.add(
            "join: a member starts -> it is ready with its partitions taken over (1 run)",
            j.ready,
            "s",
            None,
        );
        sc.add(
            "join: a member starts -> every key updated after it is ready (1 run)",
            j.all_keys,
            "s",
            None,
        );
        sc.add(
            "join: longest pause of a key on the client during the join (1 run)",
            j.max_gap,
            "s",
            None,
        );
    }
    for static_id in [false, true] {
        let label = if static_id {
            "with --instance-id"
        } else {
            "without --instance-id"
        };
        let mut rs = Vec::new();
        for r in 0..z.fo_runs {
            let dep = format!("so-restart-{}-{r}", u8::from(static_id));
            let run = failover_run(env, z, &dep, Stop::KillRestart { static_id })?;
            sc.note(format!(
                "kill -9 + restart {label}, run {}: the member held {:?}; ready again {:.1} s after the kill, every key updated again {:.1} s; longest pause of a key on the client {:.1} s",
                r + 1,
                run.victim_parts,
                run.ready.unwrap_or(f64::NAN),
                run.total,
                run.max_gap
            ));
            order.push((run.order, run.mismatched));
            rs.push(run);
        }
        let n = rs.len();
        sc.add(
            &format!("kill -9 + restart {label} -> the restarted member ready (median of {n})"),
            m(&rs, &|r| r.ready.unwrap_or(f64::NAN)),
            "s",
            None,
        );
        sc.add(
            &format!("kill -9 + restart {label} -> every key updated again on the client (median of {n})"),
            m(&rs, &|r| r.total),
            "s",
            None,
        );
    }
    let runs = order.len();
    let sum = |f: &dyn Fn(&(Order, usize)) -> u64| order.iter().map(f).sum::<u64>() as f64;
    sc.add(
        &format!("clients during the rebalances ({runs} runs): a key's change older than one already received"),
        sum(&|o| o.0.went_back),
        "changes",
        Some(Goal::AtMost(0.0)),
    );
    sc.add(
        "clients during the rebalances: seq went back",
        sum(&|o| o.0.seq_back),
        "messages",
        Some(Goal::AtMost(0.0)),
    );
    sc.add(
        "clients during the rebalances: snapshots after the first (state replaced)",
        sum(&|o| o.0.resnapshots),
        "snapshots",
        None,
    );
    sc.add(
        "clients during the rebalances: keys whose final value differs from the gateway's",
        sum(&|o| o.1 as u64),
        "keys",
        Some(Goal::AtMost(0.0)),
    );
    Ok(())
}

/// A node joining (in the graceful run).
struct Join {
    /// From its start until it is ready with partitions taken over (s).
    ready: f64,
    /// From its start until every key changed again after it was ready (s).
    all_keys: f64,
    /// The longest a key went without a change on the client from the start of the join (s).
    max_gap: f64,
}

struct Failover {
    /// From the kill (or SIGTERM) until every key changed again on the client (s).
    total: f64,
    /// From the kill until the survivor logged an assignment (s); None when it logged none (a
    /// restarted member may get its partitions back).
    assigned: Option<f64>,
    /// From the kill until the last partition became active again on the survivor (s).
    active: f64,
    /// A graceful stop: from SIGTERM to the exit (s); 0 for kill -9.
    stop_secs: f64,
    /// KillRestart: from the kill until the restarted member is ready again with partitions (s).
    ready: Option<f64>,
    /// Graceful: the member started again afterwards.
    join: Option<Join>,
    /// The longest a key went without a change on the client from the stop (s).
    max_gap: f64,
    order: Order,
    /// Keys whose value on the client differs from the gateway's once the stream stopped.
    mismatched: usize,
    waiting_keys: usize,
    victim_parts: Vec<i32>,
}

/// Ready, holding partitions it took over (a member without partitions is ready too).
fn member_ready(m: &Livetable) -> bool {
    let t = probe::metrics(&m.base);
    probe::metric(&t, "livetable_ready") == 1.0
        && probe::metric(&t, "livetable_fences_written_total") >= 1.0
}

/// Polls until `cond` holds; fails after `limit` with `what`.
fn poll(
    limit: Duration,
    what: &dyn Fn() -> String,
    cond: &mut dyn FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    while !cond()? {
        anyhow::ensure!(Instant::now() < until, "{} within {limit:?}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Once the stream stopped: polls until the client holds the gateway's rows (the gateway's seq
/// unchanged across the comparison) or `limit` passes; the keys that still differ.
fn converge(watcher: &Watcher, gw: &Livetable, limit: Duration) -> anyhow::Result<usize> {
    let until = Instant::now() + limit;
    loop {
        let (seq, rows) = probe::table_stamps(&gw.base, TABLE).context("the gateway's rows")?;
        let held = watcher.stamps()?;
        let differ = rows
            .iter()
            .filter(|(k, v)| held.get(*k) != Some(*v))
            .count()
            + held.keys().filter(|k| !rows.contains_key(*k)).count();
        let settled = seq_of(&gw.base) == seq;
        if (differ == 0 && settled) || Instant::now() > until {
            return Ok(differ);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 2 materialisers and a gateway with a client; one materialiser goes (`how`) while changes
/// flow; when do its keys move again on the client?
fn failover_run(env: &Env, z: &Sizes, dep: &str, how: Stop) -> anyhow::Result<Failover> {
    let topic = env.topic(dep);
    let keys = z.fo_keys;
    env.tool("cdc-gen", &gen_args(env, &topic, keys, keys, 0, 3600))?;
    let (id1, id2) = (format!("{dep}-mat1"), format!("{dep}-mat2"));
    let static_id = matches!(how, Stop::KillRestart { static_id: true });
    let ids = |id: &str| -> Vec<String> {
        if static_id {
            vec![s("--instance-id"), s(id)]
        } else {
            Vec::new()
        }
    };
    let a1 = ids(&id1);
    let a2 = ids(&id2);
    let cpu = env.server_cpu.clone();
    let mut victim = env.node(
        dep,
        "mat1",
        "materialiser",
        &topic,
        cpu.clone(),
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let survivor = env.node(
        dep,
        "mat2",
        "materialiser",
        &topic,
        cpu,
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let gw = gateway(env, dep, "gw1", &topic, 100)?;
    // both members hold partitions and are caught up, the gateway serves every key
    poll(
        Duration::from_secs(90),
        &|| {
            format!(
                "{dep}: not ready (materialiser 1: {}; materialiser 2: {}; gateway: {})",
                victim.log_tail(),
                survivor.log_tail(),
                gw.log_tail()
            )
        },
        &mut || {
            let rows = probe::table_seq(&gw.base, TABLE).map_or(0, |t| t.1);
            Ok(member_ready(&victim)
                && member_ready(&survivor)
                && rows >= keys
                && probe::ready(&gw.base))
        },
    )?;
    let watcher = Watcher::start(&gw.base, TABLE)?;
    let secs = 120;
    let feed = env.spawn_tool(
        "cdc-gen",
        &gen_args(env, &topic, keys, z.fo_rate * secs, z.fo_rate, secs),
    )?;
    let result = (|| -> anyhow::Result<Failover> {
        // the stream flows: every key changed on the client after 2 s of it
        watcher.mark(Instant::now() + Duration::from_secs(2));
        poll(
            Duration::from_secs(30),
            &|| format!("{dep}: the stream did not reach the client"),
            &mut || Ok(watcher.first_after()?.len() as u64 >= keys),
        )?;
        let victim_parts = held_partitions(&victim.log)?;
        let t_wall = unix_now();
        let t = Instant::now();
        let mut stop_secs = 0.0;
        match how {
            Stop::Graceful => {
                victim.stop()?;
                stop_secs = t.elapsed().as_secs_f64();
            }
            Stop::Kill => victim.kill9(),
            Stop::KillRestart { .. } => {
                victim.kill9();
                env.start(&mut victim)?;
            }
        }
        // a change already on its way when the member went may still arrive: count from 1 s
        // after (or from its exit)
        let grace = Duration::from_secs(1).max(t.elapsed());
        watcher.mark(t + grace);
        let restarted = matches!(how, Stop::KillRestart { .. });
        let ready = std::cell::Cell::new(None);
        let updated = std::cell::Cell::new(0u64);
        let mut firsts = Default::default();
        poll(
            Duration::from_secs(60),
            &|| {
                let victim_state = if restarted {
                    match ready.get() {
                        Some(s) => format!("the restarted member ready after {s:.1} s"),
                        None => "the restarted member NOT ready".to_string(),
                    }
                } else {
                    "no restart".to_string()
                };
                format!(
                    "{dep}: every key updated again and the restarted member ready after the stop: {} of {keys} keys updated, {victim_state}",
                    updated.get()
                )
            },
            &mut || {
                if restarted && ready.get().is_none() && member_ready(&victim) {
                    ready.set(Some(t.elapsed().as_secs_f64()));
                }
                firsts = watcher.first_after()?;
                updated.set(firsts.len() as u64);
                Ok(firsts.len() as u64 >= keys && (!restarted || ready.get().is_some()))
            },
        )?;
        let ready = ready.get();
        let max_gap = watcher.order()?.max_gap.as_secs_f64();
        let last = firsts.values().max().copied().unwrap_or(t);
        // a key of the survivor changes every keys/rate seconds; the others waited
        let waiting_keys = firsts
            .values()
            .filter(|at| **at > t + grace + Duration::from_secs(1))
            .count();
        let join = if how == Stop::Graceful {
            let tj = Instant::now();
            watcher.mark(tj);
            env.start(&mut victim)?;
            poll(
                Duration::from_secs(60),
                &|| {
                    format!(
                        "{dep}: the joining member not ready ({})",
                        victim.log_tail()
                    )
                },
                &mut || Ok(member_ready(&victim)),
            )?;
            let ready_at = Instant::now();
            let ready = (ready_at - tj).as_secs_f64();
            poll(
                Duration::from_secs(60),
                &|| format!("{dep}: keys not updated after the join"),
                &mut || Ok(watcher.updated_since(ready_at)? as u64 >= keys),
            )?;
            Some(Join {
                ready,
                all_keys: tj.elapsed().as_secs_f64(),
                max_gap: watcher.order()?.max_gap.as_secs_f64(),
            })
        } else {
            None
        };
        let events = log_events(&survivor.log)?;
        let assigned = events
            .iter()
            .find(|e| e.at >= t_wall && e.message == "partitions assigned" && !e.parts.is_empty())
            .map(|e| e.at - t_wall);
        anyhow::ensure!(
            restarted || assigned.is_some(),
            "{dep}: the survivor logged no assignment after the stop (the stopped member held {victim_parts:?})"
        );
        let active = events
            .iter()
            .filter(|e| e.at >= t_wall && e.message == "partition active")
            .map(|e| e.at - t_wall)
            .fold(f64::NAN, f64::max);
        Ok(Failover {
            total: (last - t).as_secs_f64(),
            assigned,
            active,
            stop_secs,
            ready,
            join,
            max_gap,
            order: watcher.order()?,
            mismatched: 0,
            waiting_keys,
            victim_parts,
        })
    })();
    feed.kill();
    let mut run = result?;
    run.mismatched = converge(&watcher, &gw, Duration::from_secs(20))?;
    run.order = watcher.order()?;
    Ok(run)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A line of a node's JSON log that the scenarios read.
struct LogEvent {
    /// Unix time (s).
    at: f64,
    message: String,
    /// The input partitions it names (`partitions` or `partition`).
    parts: Vec<i32>,
}

fn log_events(path: &Path) -> anyhow::Result<Vec<LogEvent>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let f = &v["fields"];
            let parts = match (&f["partitions"], &f["partition"]) {
                (Value::String(p), _) => partitions_in(p),
                (_, Value::Number(p)) => p.as_i64().map(|p| p as i32).into_iter().collect(),
                _ => Vec::new(),
            };
            Some(LogEvent {
                at: unix_secs(v["timestamp"].as_str()?)?,
                message: f["message"].as_str()?.to_string(),
                parts,
            })
        })
        .collect())
}

/// The partitions a member held when its log ended (its assignments minus its revokes).
fn held_partitions(log: &Path) -> anyhow::Result<Vec<i32>> {
    let mut held = BTreeSet::new();
    for e in log_events(log)? {
        match e.message.as_str() {
            "partitions assigned" => held.extend(e.parts),
            "partitions revoked" => e.parts.iter().for_each(|p| {
                held.remove(p);
            }),
            _ => {}
        }
    }
    Ok(held.into_iter().collect())
}

/// The partition numbers of a logged `[("topic", 1), ("topic", 3)]`.
fn partitions_in(s: &str) -> Vec<i32> {
    s.match_indices("\", ")
        .filter_map(|(i, m)| {
            let rest = &s[i + m.len()..];
            rest[..rest.find(')')?].trim().parse().ok()
        })
        .collect()
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time (`2026-11-22T18:54:16.123456Z`).
fn unix_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|x| x.parse::<f64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    // days from the civil date (H. Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// A client at a position on one gateway resumes on the other after changes it missed.
pub fn resume(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    let dep = "so-resume";
    let topic = env.topic(dep);
    let rows = 1_000;
    env.tool("cdc-gen", &gen_args(env, &topic, rows, rows, 0, 3600))?;
    let _mat = materialiser(env, dep, "mat1", &topic)?;
    let gw1 = gateway(env, dep, "gw1", &topic, 100)?;
    let gw2 = gateway(env, dep, "gw2", &topic, 100)?;
    for gw in [&gw1, &gw2] {
        gateway_at(gw, rows, Duration::from_secs(60))?;
    }
    let idle = Duration::from_millis(300);
    let (mut first, mut keys) = (Vec::new(), Vec::new());
    let (mut snapshots, mut hits) = (0.0, 0.0);
    for i in 0..z.resume_runs {
        let (from, to) = if i % 2 == 0 {
            (&gw1, &gw2)
        } else {
            (&gw2, &gw1)
        };
        let pos = client::position(&from.base, TABLE, idle)?;
        let seq = seq_of(&from.base) + z.resume_missed;
        // changes to the first `resume_missed` keys while the client is away
        env.tool(
            "cdc-gen",
            &gen_args(env, &topic, rows, z.resume_missed, 0, 3600),
        )?;
        gateway_at(to, seq, Duration::from_secs(30))?;
        let m0 = probe::metrics(&to.base);
        let r = client::resume(&to.base, TABLE, &pos, idle)?;
        let m1 = probe::metrics(&to.base);
        let delta = |name: &str, label: &str| {
            probe::metric_where(&m1, name, label) - probe::metric_where(&m0, name, label)
        };
        snapshots += r.snapshots as f64;
        hits += delta("livetable_resumes_total", "result=\"hit\"");
        anyhow::ensure!(
            r.first_kind == "patch",
            "resume {}: the first message was a {} (pos {pos})",
            i + 1,
            r.first_kind
        );
        first.push(r.first_ms);
        keys.push(r.keys as f64);
    }
    sc.add(
        &format!(
            "connect with since=<pos of the other gateway> -> first missed change (median of {})",
            first.len()
        ),
        median(first.clone()),
        "ms",
        Some(Goal::AtMost(50.0)),
    );
    sc.add(
        "snapshots sent to the resuming clients",
        snapshots,
        "snapshots",
        Some(Goal::AtMost(0.0)),
    );
    sc.add(
        "resume hits counted by the gateways",
        hits,
        "resumes",
        Some(Goal::AtLeast(first.len() as f64)),
    );
    sc.add(
        &format!(
            "keys in the resume patches (median; {} changed while away)",
            z.resume_missed
        ),
        median(keys),
        "keys",
        None,
    );
    sc.note(format!(
        "first missed change per run: {} ms",
        first
            .iter()
            .map(|f| format!("{f:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_are_read() {
        assert_eq!(unix_secs("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            unix_secs("2026-11-22T04:21:00.5Z"),
            Some(1_795_321_260.5),
            "date -d 2026-11-22T04:21:00Z +%s = 1795321260"
        );
        assert_eq!(unix_secs("2024-02-29T12:00:00Z"), Some(1_709_208_000.0));
        assert_eq!(unix_secs("not a time"), None);
        assert_eq!(
            partitions_in(r#"[("b1.so-failover-0.game_odds", 1), ("b1.x", 3)]"#),
            vec![1, 3]
        );
        assert!(partitions_in("[]").is_empty());
    }
}
