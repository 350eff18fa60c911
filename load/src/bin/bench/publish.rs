//! The publish scenario (issue 16, docs/publish.md): clients publishing to Kafka through
//! livetable's WebSocket. Each run starts a livetable of its own (data directory, id store) whose
//! `[publish]` table lists a fresh topic that livetable creates with `PARTITIONS` partitions, so
//! no run is answered from an earlier run's ids; `publish-load --ws` (on the tools' CPU) drives the
//! connections over real sockets and reads a uniform sample of the acks back from the topic (the
//! record at the ack's partition and offset must carry the publish's id). Two measures, `runs`
//! runs each, medians reported: acknowledged publishes/s with every connection's window full, and
//! the ack latency at a paced rate.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::measure::{median, Goal, Scenario};
use crate::probe;
use crate::scenarios::{prefill, s, Sizes};
use crate::stack::Env;

/// Partitions of each run's topic.
pub const PARTITIONS: u32 = 6;
/// Publishes in flight per connection: livetable's default `max_in_flight`.
pub const WINDOW: usize = 64;

/// The `[publish]` table of a run: `topic` writable, created when missing; no rate limit that a
/// run could reach; every id of a run remembered (the throughput runs publish ~600k ids).
fn config_text(topic: &str) -> String {
    format!(
        "[publish]\nmax_in_flight = {WINDOW}\nmax_in_flight_total = 10000\n\
         dedup_max_entries = 2000000\n\n\
         [[publish.topic]]\nname = \"{topic}\"\npartitions = {PARTITIONS}\n\
         rate_per_sec = 1000000\nburst = 1000000\n"
    )
}

/// What one run measured.
struct Run {
    /// publish-load's summary.
    out: Value,
    /// livetable's CPU over the measured seconds, % of a core.
    server_cpu: f64,
    /// livetable's `livetable_publish_ack_seconds` p50 and p99 over the measured seconds (bucket
    /// upper bounds, ms).
    server_ack: (Option<f64>, Option<f64>),
    /// The 1-minute load average when the run started.
    load: f64,
}

impl Run {
    fn f(&self, path: &[&str]) -> f64 {
        path.iter()
            .fold(&self.out, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One run: a livetable for `label`/`r`, publish-load at `rate` (0 = window-bound) against it.
fn run(env: &Env, z: &Sizes, input: &str, label: &str, r: usize, rate: u64) -> anyhow::Result<Run> {
    let name = format!("publish-{label}-{r}");
    let topic = format!("{}.{name}.bets", env.run_id);
    let cfg = env.work.path().join(format!("{name}.toml"));
    std::fs::write(&cfg, config_text(&topic))?;
    let cfg = cfg
        .to_str()
        .context("the work directory's path is not UTF-8")?;
    let max = (z.pub_connections + 100).to_string();
    let mut lt = env.livetable(&name, input, &["--config", cfg, "--max-connections", &max])?;
    probe::until_publishable(&lt.base, &topic, Duration::from_secs(30))
        .with_context(|| lt.log_tail())?;
    let load = load_average();
    let ws = format!("{}/ws", lt.base.replace("http://", "ws://"));
    let tool = env.spawn_tool(
        "publish-load",
        &[
            s("--ws"),
            ws,
            s("--brokers"),
            env.brokers.clone(),
            s("--topic"),
            topic,
            s("--connections"),
            s(z.pub_connections),
            s("--window"),
            s(WINDOW),
            s("--rate"),
            s(rate),
            s("--secs"),
            s(z.pub_secs),
            s("--warmup-secs"),
            s(z.pub_warmup_secs),
            s("--verify"),
            s(z.pub_verify),
        ],
    )?;
    // the server's view over the measured seconds: publish-load measures from its start + warm-up
    std::thread::sleep(Duration::from_secs(z.pub_warmup_secs));
    let (m0, cpu0) = (probe::metrics(&lt.base), lt.cpu_secs().unwrap_or(0.0));
    std::thread::sleep(Duration::from_secs(z.pub_secs));
    let (m1, cpu1) = (probe::metrics(&lt.base), lt.cpu_secs().unwrap_or(0.0));
    let out = tool.finish()?;
    lt.stop()?;
    let (b0, b1) = (
        probe::buckets(&m0, "livetable_publish_ack_seconds"),
        probe::buckets(&m1, "livetable_publish_ack_seconds"),
    );
    let ms = |q| probe::bucket_quantile(&b0, &b1, q).map(|v| v * 1000.0);
    Ok(Run {
        out,
        server_cpu: (cpu1 - cpu0) / z.pub_secs as f64 * 100.0,
        server_ack: (ms(0.5), ms(0.99)),
        load,
    })
}

/// Problems that make a run's figures worthless: failed connections, acks that do not match the
/// topic, duplicates (every id of a run is new), no ack at all.
fn problems(label: &str, r: usize, run: &Run) -> Vec<String> {
    let o = &run.out;
    let mut p = Vec::new();
    let n = |k: &str| o[k].as_u64().unwrap_or(0);
    if n("acked") == 0 {
        p.push("no publish acknowledged".to_string());
    }
    if n("failed_connections") > 0 {
        p.push(format!("{} connections failed", n("failed_connections")));
    }
    if n("duplicates") > 0 {
        p.push(format!("{} acks were duplicates", n("duplicates")));
    }
    let v = &o["verified"];
    if v["matched"].as_u64() != v["sampled"].as_u64() || v["sampled"].as_u64().unwrap_or(0) == 0 {
        p.push(format!("acks read back: {v}"));
    }
    p.into_iter()
        .map(|x| format!("{label} run {}: {x}", r + 1))
        .collect()
}

fn runs_note(label: &str, runs: &[Run]) -> String {
    let each: Vec<String> = runs
        .iter()
        .map(|r| {
            let nacks = &r.out["nacks"];
            let nacks = match nacks.as_object() {
                Some(m) if !m.is_empty() => format!(", nacks {nacks}"),
                _ => String::new(),
            };
            let skipped = r.out["skipped_ticks"].as_u64().unwrap_or(0);
            let skipped = if skipped > 0 {
                format!(", {skipped} ticks skipped (window full)")
            } else {
                String::new()
            };
            format!(
                "{:.0}/s, p50/p99/p99.9 {:.1}/{:.1}/{:.1} ms, server {:.0}% of a core, load {:.1}{nacks}{skipped}",
                r.f(&["acked_per_sec"]),
                r.f(&["ack_latency_ms", "p50"]),
                r.f(&["ack_latency_ms", "p99"]),
                r.f(&["ack_latency_ms", "p999"]),
                r.server_cpu,
                r.load
            )
        })
        .collect();
    format!("{label} runs: {}", each.join("; "))
}

/// The scenario: `pub_runs` throughput runs, then `pub_runs` runs paced at `pub_rate`.
pub fn publish(env: &Env, z: &Sizes, sc: &mut Scenario) -> anyhow::Result<()> {
    // livetable needs an input topic to consume; one record, never changed
    let input = env.topic("publish");
    prefill(env, &input, 1, 1)?;
    let (mut tput, mut paced, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..z.pub_runs {
        let run = run(env, z, &input, "throughput", r, 0)?;
        bad.extend(problems("throughput", r, &run));
        tput.push(run);
    }
    for r in 0..z.pub_runs {
        let run = run(env, z, &input, "paced", r, z.pub_rate)?;
        bad.extend(problems("paced", r, &run));
        paced.push(run);
    }
    let med = |runs: &[Run], path: &[&str]| median(runs.iter().map(|r| r.f(path)).collect());
    let n = tput.len();
    let c = z.pub_connections;
    sc.add(
        &format!("acknowledged publishes/s, {c} connections (median of {n})"),
        med(&tput, &["acked_per_sec"]),
        "publishes/s",
        Some(Goal::AtLeast(50_000.0)),
    );
    sc.add(
        "throughput runs: ack latency p50 (median)",
        med(&tput, &["ack_latency_ms", "p50"]),
        "ms",
        None,
    );
    sc.add(
        "throughput runs: ack latency p99 (median)",
        med(&tput, &["ack_latency_ms", "p99"]),
        "ms",
        None,
    );
    sc.add(
        "throughput runs: server CPU (median)",
        median(tput.iter().map(|r| r.server_cpu).collect()),
        "% of a core",
        None,
    );
    let rate = z.pub_rate;
    sc.add(
        &format!("ack latency p50 at {rate}/s (median of {n})"),
        med(&paced, &["ack_latency_ms", "p50"]),
        "ms",
        None,
    );
    sc.add(
        &format!("ack latency p99 at {rate}/s (median of {n})"),
        med(&paced, &["ack_latency_ms", "p99"]),
        "ms",
        Some(Goal::AtMost(20.0)),
    );
    sc.add(
        &format!("ack latency p99.9 at {rate}/s (median of {n})"),
        med(&paced, &["ack_latency_ms", "p999"]),
        "ms",
        None,
    );
    sc.add(
        &format!("acknowledged/s achieved at {rate}/s (median)"),
        med(&paced, &["acked_per_sec"]),
        "publishes/s",
        None,
    );
    let server = |runs: &[Run], q: fn(&Run) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(q).collect();
        (!v.is_empty()).then(|| median(v))
    };
    if let Some(v) = server(&paced, |r| r.server_ack.0) {
        sc.add(
            &format!("server: publish -> broker ack p50 at {rate}/s (bucket upper bound, median)"),
            v,
            "ms",
            None,
        );
    }
    if let Some(v) = server(&paced, |r| r.server_ack.1) {
        sc.add(
            &format!("server: publish -> broker ack p99 at {rate}/s (bucket upper bound, median)"),
            v,
            "ms",
            None,
        );
    }
    sc.add(
        "paced runs: server CPU (median)",
        median(paced.iter().map(|r| r.server_cpu).collect()),
        "% of a core",
        None,
    );
    let all = tput.iter().chain(&paced);
    let (sampled, matched) = all.fold((0.0, 0.0), |(s, m), r| {
        (
            s + r.f(&["verified", "sampled"]),
            m + r.f(&["verified", "matched"]),
        )
    });
    sc.add(
        "sampled acks whose record (read back at the ack's partition/offset) has the publish's id",
        matched,
        "acks",
        Some(Goal::AtLeast(sampled)),
    );
    sc.note(runs_note("throughput", &tput));
    sc.note(runs_note(&format!("{rate}/s"), &paced));
    anyhow::ensure!(bad.is_empty(), "{}", bad.join("; "));
    Ok(())
}
