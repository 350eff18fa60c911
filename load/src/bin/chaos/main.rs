//! chaos: the fault-injection suite of livetable.
//!
//! Runs livetable (the real binary) in two topologies, one after the other: one all-in-one node
//! (`--role all`, its data directory on a small tmpfs), then two materialisers and a gateway. Each
//! gets a workload with an oracle (Debezium envelopes produced straight to a 4-partition input
//! topic, with deletes and re-creates; plus, with the all-in-one node, a real PostgreSQL ->
//! Debezium -> Kafka Connect stream), clients attached the whole time (WebSocket `patch` and
//! `rows`, SSE; whole table and key filters) that check every value they apply, and faults at
//! random moments from a seed: kill -9 of livetable, SIGSTOP of the broker, kill -9 and restart
//! of the broker, a TCP proxy that cuts, blackholes or delays the broker's traffic, a full data
//! filesystem, kill -9 of Kafka Connect, the changelog topic deleted. After each fault the time
//! until the serving node shows new probe values is measured. At the end every client == oracle
//! == HTTP API == changelog folded, and so are the declared views over the table (`views.rs`).
//!
//! Progress on stderr; the JSON report on stdout; a markdown report in a file. Exit status 1 when
//! a check failed.

mod clients;
mod phase;
mod proxy;
mod report;
mod rng;
mod stack;
mod views;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use phase::{FaultKind, Plan, Topology};
use stack::log;

/// Fault-injection suite for livetable: faults at random (seeded) moments against a workload with
/// an oracle and clients that check every value; JSON report on stdout, markdown report in a file.
#[derive(Parser, Debug, Clone)]
#[command(name = "chaos")]
pub struct Args {
    /// Seed of every random choice (faults, their moments and targets, the workload); default
    /// from the clock. The report names it: the same seed replays the same plan.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The long run for people: 100 kill -9, every other fault several times, more keys.
    #[arg(long)]
    pub long: bool,
    /// kill -9 of livetable processes in all, over the topologies (default 20, --long 100); half
    /// wait for recovery (measured), half strike again before it (mid-restore, mid-rebalance).
    #[arg(long)]
    pub kills: Option<usize>,
    /// Topologies to run, comma-separated: all-in-one, split (2 materialisers + 1 gateway).
    #[arg(long, default_value = "all-in-one,split", value_delimiter = ',')]
    pub topologies: Vec<String>,
    /// Fault kinds besides kill -9, comma-separated: broker-stop, broker-restart, proxy-cut,
    /// proxy-blackhole, proxy-delay, disk-full, connect-kill, changelog-delete; or `none`.
    #[arg(
        long,
        default_value = "broker-stop,broker-restart,proxy-cut,proxy-blackhole,proxy-delay,disk-full,connect-kill,changelog-delete",
        value_delimiter = ','
    )]
    pub faults: Vec<String>,
    /// Changes per second of the workload.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Distinct keys of the workload (default 1000, --long 5000).
    #[arg(long)]
    pub keys: Option<usize>,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Pause between two faults, random in this range of milliseconds (`LO-HI`).
    #[arg(long, default_value = "500-3000")]
    pub gap_ms: String,
    /// Ports: the broker on BASE, the proxy (the broker's advertised address) on BASE+1, the S3
    /// store on BASE+2.
    #[arg(long, default_value_t = 19592)]
    pub port_base: u16,
    /// Broker storage: `memory` (Tansu's default; a restart loses every topic, so the broker
    /// restart fault is skipped) or `s3` (Tansu's s3:// engine on a moto server installed from
    /// PyPI, kept outside the broker, so the broker can be killed and restarted; measured here:
    /// its fetches fail with UnknownServerError under livetable's load, see RELIABILITY.md).
    #[arg(long, default_value = "memory")]
    pub broker_storage: String,
    /// Skip the PostgreSQL -> Debezium part (it is skipped anyway, with a message, when Java or
    /// the PostgreSQL server binaries are missing).
    #[arg(long)]
    pub no_postgres: bool,
    /// Port of the suite's private PostgreSQL (dev/postgres).
    #[arg(long, default_value_t = 55459)]
    pub pg_port: u16,
    /// Size of the tmpfs that holds the all-in-one node's data directory (MiB).
    #[arg(long, default_value_t = 256)]
    pub disk_mib: u64,
    /// The livetable binary [default: `livetable` beside this binary].
    #[arg(long)]
    pub livetable: Option<PathBuf>,
    /// Directory for logs, data directories and reports [default: target/chaos/<run id>].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The markdown report [default: <out-dir>/report.md].
    #[arg(long)]
    pub report_md: Option<PathBuf>,
    /// Share of the kill -9 that strike again before recovery (percent); the others wait for
    /// recovery and measure it.
    #[arg(long, default_value_t = 50)]
    pub quick_kill_pct: usize,
    /// How long a fault may take to recover (fresh probe values on every serving node) before
    /// it counts as not recovered.
    #[arg(long, default_value_t = 120)]
    pub recovery_secs: u64,
    /// How long the final checks wait for the API, the changelog and the clients to converge.
    #[arg(long, default_value_t = 120)]
    pub settle_secs: u64,
    /// livetable=debug in the nodes' logs.
    #[arg(long)]
    pub verbose_nodes: bool,
}

fn fault_kind(s: &str) -> anyhow::Result<Option<FaultKind>> {
    Ok(Some(match s.trim() {
        "broker-stop" => FaultKind::BrokerSigstop10s,
        "broker-restart" => FaultKind::BrokerKill9Restart,
        "proxy-cut" => FaultKind::ProxyCut,
        "proxy-blackhole" => FaultKind::ProxyBlackhole8s,
        "proxy-delay" => FaultKind::ProxyDelay2s,
        "disk-full" => FaultKind::DiskFull,
        "connect-kill" => FaultKind::ConnectKill9,
        "changelog-delete" => FaultKind::ChangelogDeleted,
        "none" | "" => return Ok(None),
        other => anyhow::bail!("unknown fault kind {other:?} (see --help)"),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Ctrl-C or SIGTERM: stop, and let every process, mount and worker be cleaned up
    let ok = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = term.recv() => anyhow::bail!("terminated"),
        }
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1)
    });
    let mut rng = rng::Rng::new(seed);
    let run_id = format!(
        "chaos{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            % 100_000_000
    );
    let repo = stack::repo_root()?;
    let out = args
        .out_dir
        .clone()
        .unwrap_or_else(|| repo.join("target/chaos").join(&run_id));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let work = out.join("data");
    std::fs::create_dir_all(&work)?;
    let livetable = match &args.livetable {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("livetable"),
    };
    anyhow::ensure!(
        livetable.is_file(),
        "{} not found: build it (cargo build --bin livetable) or pass --livetable",
        livetable.display()
    );
    let kills = args.kills.unwrap_or(if args.long { 100 } else { 20 });
    let rate = args.rate.unwrap_or(if args.long { 500 } else { 300 });
    let keys = args.keys.unwrap_or(if args.long { 5000 } else { 1000 });
    let gap = args
        .gap_ms
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .context("--gap-ms must be LO-HI")?;
    let mut others = Vec::new();
    for f in &args.faults {
        if let Some(k) = fault_kind(f)? {
            others.push(k);
        }
    }
    let topologies: Vec<Topology> = args
        .topologies
        .iter()
        .map(|t| match t.trim() {
            "all-in-one" => Ok(Topology::AllInOne),
            "split" => Ok(Topology::Split),
            o => anyhow::bail!("unknown topology {o:?}"),
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!topologies.is_empty(), "no topology");
    log(format!(
        "run {run_id}, seed {seed}, {kills} kill -9, rate {rate}/s, {keys} keys, out {}",
        out.display()
    ));

    let (bport, pport, mport) = (args.port_base, args.port_base + 1, args.port_base + 2);
    let mut skipped: Vec<String> = Vec::new();
    let broker = {
        let (repo, logs, s3) = (repo.clone(), logs.clone(), args.broker_storage == "s3");
        tokio::task::spawn_blocking(move || {
            stack::Broker::start(&repo, bport, pport, mport, s3, &logs)
        })
        .await??
    };
    log(format!("broker on 127.0.0.1:{bport}, advertised through the proxy on 127.0.0.1:{pport}; storage {}", broker.storage_text()));
    if !broker.restartable() {
        skipped.push(format!(
            "broker kill -9 + restart: {}",
            broker.storage_text()
        ));
    }
    let proxy = proxy::Proxy::start(
        ([127, 0, 0, 1], pport).into(),
        ([127, 0, 0, 1], bport).into(),
    )
    .await?;
    let brokers = format!("127.0.0.1:{pport}");
    let pids: Arc<Mutex<std::collections::BTreeMap<String, u32>>> = Arc::default();
    if let Some(pid) = broker.tansu.pid() {
        pids.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert("broker".into(), pid);
    }
    let debezium = if args.no_postgres {
        skipped.push("PostgreSQL -> Debezium part: --no-postgres".into());
        None
    } else if let Some(why) = stack::Debezium::missing() {
        let msg = format!("PostgreSQL -> Debezium part skipped: {why} (./dev/test installs it)");
        log(&msg);
        skipped.push(msg);
        None
    } else {
        Some(stack::Debezium {
            repo: repo.clone(),
            pg_port: args.pg_port,
            name: run_id.clone(),
            table: format!("pg_{run_id}"),
            prefix: String::new(),
            brokers: brokers.clone(),
            log: logs.join("debezium.log"),
        })
    };
    if debezium.is_none() {
        others.retain(|k| *k != FaultKind::ConnectKill9);
    }
    // the all-in-one node's data directory on a filesystem the suite can fill
    let fs = if others.contains(&FaultKind::DiskFull) && topologies.contains(&Topology::AllInOne) {
        match stack::SmallFs::mount(&work.join("smallfs"), args.disk_mib) {
            Ok(fs) => Some(fs),
            Err(why) => {
                let msg = format!("filesystem-full fault skipped: {why}");
                log(&msg);
                skipped.push(msg);
                None
            }
        }
    } else {
        None
    };
    let ctx = phase::Ctx {
        run_id: run_id.clone(),
        livetable: livetable.clone(),
        brokers,
        broker: Mutex::new(broker),
        proxy,
        work: work.clone(),
        logs: logs.clone(),
        started,
        pids,
        memory: Arc::default(),
        debezium,
        verbose_nodes: args.verbose_nodes,
        views: views::write_file(&work)?,
    };
    let stop_mem = Arc::new(AtomicBool::new(false));
    let mem_task = phase::sample_memory(&ctx, stop_mem.clone());

    let n = topologies.len();
    let mut phases = Vec::new();
    let mut left = kills;
    for (i, t) in topologies.iter().enumerate() {
        // the all-in-one node takes 60% of the kills when both run
        let k = if i + 1 == n {
            left
        } else {
            (kills * 6).div_ceil(10).min(left)
        };
        left -= k;
        let mut kinds = others.clone();
        if args.long {
            // every other fault several times in the long run
            let times = if *t == Topology::AllInOne { 3 } else { 2 };
            kinds = others
                .iter()
                .flat_map(|k| {
                    let r = if *k == FaultKind::ChangelogDeleted || *k == FaultKind::DiskFull {
                        1
                    } else {
                        times
                    };
                    std::iter::repeat_n(*k, r)
                })
                .collect();
        }
        // the changelog is deleted in the last topology only (the all-in-one's PostgreSQL
        // table shares nothing with it, but one such fault per run is enough to see its effect)
        if i + 1 != n {
            kinds.retain(|k| *k != FaultKind::ChangelogDeleted);
        }
        if *t == Topology::Split {
            kinds.retain(|k| !matches!(k, FaultKind::DiskFull | FaultKind::ConnectKill9));
            if !args.long && n > 1 {
                // the other kinds ran with the all-in-one node already
                kinds.retain(|k| matches!(k, FaultKind::ProxyCut | FaultKind::ChangelogDeleted));
            }
        }
        let plan = Plan {
            kills: k - k * args.quick_kill_pct.min(100) / 100,
            kills_quick: k * args.quick_kill_pct.min(100) / 100,
            others: kinds,
            rate,
            keys,
            partitions: args.partitions,
            gap_ms: gap,
            settle: std::time::Duration::from_secs(args.settle_secs),
            recovery: std::time::Duration::from_secs(args.recovery_secs),
        };
        match phase::run(&ctx, *t, &plan, &mut rng, fs.as_ref()).await {
            Ok(rep) => phases.push(rep),
            Err(e) => {
                log(format!("phase {t:?} failed to run: {e:#}"));
                phases.push(phase::PhaseReport {
                    topology: Some(*t),
                    failures: vec![format!("the phase could not run: {e:#}")],
                    ..Default::default()
                });
            }
        }
    }
    stop_mem.store(true, std::sync::atomic::Ordering::Relaxed);
    mem_task.abort();
    let memory = ctx.memory.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let storage = ctx
        .broker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .storage_text();
    let command: Vec<String> = std::env::args().collect();
    let report = report::Report::build(report::Inputs {
        run_id: &run_id,
        seed,
        command: command.join(" "),
        long: args.long,
        storage,
        out: &out,
        duration: started.elapsed(),
        phases: &phases,
        memory: &memory,
        skipped: &skipped,
        rate,
        keys,
        partitions: args.partitions,
    });
    let md = args
        .report_md
        .clone()
        .unwrap_or_else(|| out.join("report.md"));
    std::fs::write(&md, report.markdown())?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report.json)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&report.json)?);
    log(format!(
        "done in {:.0} s: {} failures; markdown report {}",
        started.elapsed().as_secs_f64(),
        report.failures(),
        md.display()
    ));
    drop(fs);
    drop(ctx);
    Ok(report.failures() == 0)
}
