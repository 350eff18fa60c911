//! bench: runs livetable's benchmark scenarios end to end against the local stack (the broker is
//! started with dev/broker when none answers; every livetable is the release binary beside this
//! one, with its own data directory and topics), records the machine, the git revision and the
//! exact commands, and writes the results as JSON and as a Markdown table into BENCHMARKS.md.
//!
//!   cargo build --release --workspace && target/release/bench            # full run (~15 min)
//!   target/release/bench --quick --markdown-out /tmp/b.md                 # seconds, for CI

mod auth;
mod client;
mod delivery;
mod filters;
mod measure;
mod probe;
mod publish;
mod rates;
mod report;
mod scale_out;
mod scenarios;
mod stack;
mod views;

use std::path::PathBuf;

use clap::Parser;

use measure::Scenario;
use scenarios::{Live, Sizes};

/// Every scenario: a run of these (not --quick) is a full run.
const DEFAULT_SCENARIOS: &str = "ingest,snapshot,recovery,fanout,light,latency,latency-few-clients,clients-1k,clients-100-max,connections,connections-snapshot,publish,auth,filters,views,scale-out";

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "livetable's benchmark scenarios, end to end, into BENCHMARKS.md"
)]
struct Args {
    /// Small sizes: every scenario in seconds (a smoke run; the figures mean little).
    #[arg(long)]
    quick: bool,
    /// Kafka-protocol broker on loopback; started with dev/broker if nothing answers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Scenarios to run (comma-separated): ingest, snapshot, recovery, fanout, light, latency,
    /// latency-few-clients, clients-1k, clients-100-max, connections, connections-snapshot, publish, auth, filters, views (= views-events,
    /// views-top-n), scale-out (= scale-out-ingest, scale-out-clients, scale-out-failover,
    /// scale-out-resume); each also by its own name.
    #[arg(long, default_value = DEFAULT_SCENARIOS)]
    scenarios: String,
    /// `fetch.wait.max.ms` of livetable's consumer (and of the delivery probe) in the live
    /// scenarios (fanout, light, latency, latency-few-clients); 10 is livetable's default.
    #[arg(long, default_value_t = 10)]
    fetch_wait_ms: u32,
    /// The rates (changes/s, comma-separated) of clients-100-max instead of the run's defaults.
    #[arg(long, value_delimiter = ',')]
    rates_100: Option<Vec<u64>>,
    /// Clients of clients-100-max instead of 100 (to tell the clients' share of a tail from the
    /// broker's).
    #[arg(long)]
    rates_100_clients: Option<u64>,
    /// cdc-gen's `linger.ms` in clients-1k and clients-100-max instead of 5 (the other scenarios
    /// use 1; at thousands of changes/s Tansu falls behind requests of one or two records).
    #[arg(long)]
    rates_linger_ms: Option<u32>,
    /// Runs per configuration of clients-1k and clients-100-max instead of the run's default.
    #[arg(long)]
    rates_runs: Option<usize>,
    /// CPU list livetable is pinned to (taskset -c); empty = not pinned.
    #[arg(long, default_value = "0")]
    server_cpu: String,
    /// CPU list the load tools are pinned to; empty = not pinned.
    #[arg(long, default_value = "1")]
    tools_cpu: String,
    /// JSON results file [default: target/bench/bench-<time>.json in the repository].
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Markdown file whose results section is replaced [default: BENCHMARKS.md for a full run
    /// (every scenario, not --quick); else none: the table is printed].
    #[arg(long)]
    markdown_out: Option<PathBuf>,
}

/// Open files: tens of thousands of connections need more than the usual 1024 or 20000.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            let new = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                let soft = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut z = if a.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    z.fetch_wait_ms = a.fetch_wait_ms;
    if let Some(r) = &a.rates_100 {
        z.rates_100 = r.clone();
    }
    if let Some(n) = a.rates_100_clients {
        z.rates_100_clients = n.max(1);
    }
    if let Some(n) = a.rates_linger_ms {
        z.rates_linger_ms = n;
    }
    if let Some(n) = a.rates_runs {
        z.rates_runs = n.max(1);
    }
    // livetable and ws-swarm each hold one descriptor per connection, and inherit this limit
    let nofile = raise_nofile(z.idle_connections + 10_000);
    if nofile < z.idle_connections + 1000 {
        let n = nofile.saturating_sub(1000).max(100);
        eprintln!("bench: open-file limit {nofile} (hard limit; raising it needs CAP_SYS_RESOURCE): idle connections lowered to {n}");
        z.idle_connections = n;
        z.idle_capped_by = Some(nofile);
    }
    let cpu = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let env = stack::Env::new(&a.brokers, cpu(&a.server_cpu), cpu(&a.tools_cpu))?;
    let wanted: Vec<&str> = a.scenarios.split(',').map(str::trim).collect();
    let started = std::time::Instant::now();
    let mut results: Vec<Scenario> = Vec::new();
    let run = |name: &'static str,
               setup: String,
               results: &mut Vec<Scenario>,
               f: &mut dyn FnMut(&mut Scenario) -> anyhow::Result<()>| {
        let group = (name.starts_with("scale-out-") && wanted.contains(&"scale-out"))
            || (name.starts_with("views-") && wanted.contains(&"views"));
        if !wanted.contains(&name) && !group {
            return;
        }
        eprintln!("bench: --- {name}: {setup}");
        let began = std::time::Instant::now();
        let began_wall = std::time::SystemTime::now();
        let mut sc = Scenario::new(name, setup);
        if let Err(e) = f(&mut sc) {
            eprintln!("bench: {name} failed: {e:#}");
            // the logs of the processes it ran: the work directory goes with the run
            eprintln!(
                "bench: {name}: livetable logs written during the scenario\n{}",
                env.log_tails_since(began_wall, 40)
            );
            sc.error = Some(format!("{e:#}"));
        }
        // where a run's time goes (the CI smoke run of every scenario takes minutes)
        eprintln!(
            "bench: --- {name} took {:.1} s",
            began.elapsed().as_secs_f64()
        );
        results.push(sc);
    };

    let mut ingest_lt = None;
    run("ingest", format!("{} changes (full Debezium envelopes) over {} keys, in the topic before livetable starts", z.ingest_changes, z.ingest_keys), &mut results, &mut |sc| {
        ingest_lt = Some(scenarios::ingest(&env, &z, sc)?);
        Ok(())
    });
    run("snapshot", String::new(), &mut results, &mut |sc| {
        let lt = ingest_lt
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("needs the ingest scenario's table"))?;
        scenarios::snapshot(&env, &z, lt, sc)
    });
    drop(ingest_lt.take());
    run(
        "recovery",
        format!("{} distinct rows (1 change each)", z.recovery_rows),
        &mut results,
        &mut |sc| scenarios::recovery(&env, &z, sc),
    );
    // the live scenarios: clients watch a table while cdc-gen produces at a set rate
    let live = |clients, rows, rate, secs, partitions| Live {
        clients,
        rows,
        rate,
        secs,
        partitions,
    };
    let live_scenarios = [
        (
            "fanout",
            format!(
                "{} WebSocket clients on a {}-row table, {} changes/s for {} s",
                z.fanout_clients, z.fanout_rows, z.fanout_rate, z.fanout_secs
            ),
            live(z.fanout_clients, z.fanout_rows, z.fanout_rate, z.fanout_secs, 1),
        ),
        (
            "light",
            format!(
                "{} WebSocket clients on a 1000-row table of a 3-partition topic, {} changes/s for {} s, with a plain consumer timing the broker's delivery",
                z.light_clients, z.light_rate, z.light_secs
            ),
            live(z.light_clients, 1000, z.light_rate, z.light_secs, 3),
        ),
        (
            "latency",
            format!(
                "{} WebSocket clients on a 1000-row table, {} changes/s for {} s",
                z.latency_clients, z.latency_rate, z.latency_secs
            ),
            live(z.latency_clients, 1000, z.latency_rate, z.latency_secs, 1),
        ),
        (
            "latency-few-clients",
            format!(
                "{} WebSocket clients on a 1000-row table, {} changes/s for {} s (the pipeline without a saturated client process)",
                z.latency_few_clients, z.latency_rate, z.latency_secs
            ),
            live(z.latency_few_clients, 1000, z.latency_rate, z.latency_secs, 1),
        ),
    ];
    for (name, setup, l) in live_scenarios {
        run(name, setup, &mut results, &mut |sc| {
            scenarios::live(&env, name, l, &z, sc)
        });
    }
    run(
        "clients-1k",
        format!(
            "{} WebSocket clients (ws-swarm, no state) on a 1000-row table, {} changes/s for {} s, then {} changes/s; cdc-gen lingering {} ms; a topic, livetable and swarm per run, a plain consumer timing the broker in each; {} runs per rate, medians",
            z.rates_1k_clients, z.rates_1k_low, z.rates_secs, z.rates_1k_high, z.rates_linger_ms, z.rates_runs
        ),
        &mut results,
        &mut |sc| rates::clients_1k(&env, &z, sc),
    );
    run(
        "clients-100-max",
        format!(
            "{} WebSocket clients (ws-swarm, no state) on a 1000-row table at {:?} changes/s, {} s each, cdc-gen lingering {} ms; a topic, livetable and swarm per run, a plain consumer timing the broker in each; {} runs per rate, medians; the highest rate with >= 0.95 of the row updates delivered and p99 <= 10 ms",
            z.rates_100_clients, z.rates_100, z.rates_secs, z.rates_linger_ms, z.rates_runs
        ),
        &mut results,
        &mut |sc| rates::clients_100_max(&env, &z, sc),
    );
    run(
        "connections",
        format!(
            "{} idle WebSocket clients on a 1-row table",
            z.idle_connections
        ),
        &mut results,
        &mut |sc| {
            let n = z.idle_connections;
            scenarios::connections(&env, "connections", n, 1, 8.0, sc, &z)
        },
    );
    run(
        "connections-snapshot",
        format!(
            "{} idle WebSocket clients on a 100-row table, each after its snapshot",
            z.snapshot_connections
        ),
        &mut results,
        &mut |sc| {
            let n = z.snapshot_connections;
            scenarios::connections(&env, "connections-snapshot", n, 100, 4.0, sc, &z)
        },
    );

    run(
        "publish",
        format!(
            "publishes over {} WebSocket connections (publish-load --ws, window {}, ~100-byte values, 16 keys per connection) to a {}-partition topic in livetable's [publish] table; {} s measured after {} s of warm-up; {} runs as fast as acks come back, then {} runs paced at {}/s; a fresh livetable, topic and id store per run; {} acks per run read back from the topic",
            z.pub_connections,
            publish::WINDOW,
            publish::PARTITIONS,
            z.pub_secs,
            z.pub_warmup_secs,
            z.pub_runs,
            z.pub_runs,
            z.pub_rate,
            z.pub_verify
        ),
        &mut results,
        &mut |sc| publish::publish(&env, &z, sc),
    );

    run(
        "auth",
        format!(
            "the same {}-row table on a livetable without auth and one with --auth jwt (HS256); connect: {} WebSocket connections one after another per configuration and run, each timed from the TCP connect to its snapshot (3 keys; with a token granting the table and the key glob g*, and with a row-filter token game_id = sub); fan-out: {} ws-swarm clients watch the table, {} changes/s for {} s, each with a token granting g* (every row passes the claim check), one livetable at a time; {} runs, configurations alternating, medians",
            z.auth_rows, z.auth_connects, z.auth_clients, z.auth_rate, z.auth_secs, z.auth_runs
        ),
        &mut results,
        &mut |sc| auth::auth(&env, &z, sc),
    );

    run(
        "filters",
        format!(
            "{} WebSocket clients (ws-swarm, no state), each with its own where=league = 'L<n>' on a {}-row table ({} leagues of {} rows), {} changes/s for {} s (each change in one league); then {} such clients, indexed and with league >= 'L<n>' AND league <= 'L<n>' (the same rows, an expression the hub cannot index: every client wakes for every update and a snapshot scans the table); server CPU per change net of the idle process's; a livetable and a topic per run, {} runs, configurations alternating, medians",
            z.filter_clients, z.filter_rows, z.filter_clients, z.filter_rows / z.filter_clients.max(1), z.filter_rate, z.filter_secs, z.filter_scan_clients, z.filter_runs
        ),
        &mut results,
        &mut |sc| filters::filters(&env, &z, sc),
    );

    run(
        "views-events",
        format!(
            "{} score events of {} players waiting in a 1-partition events topic; a livetable with a group_by per player (count, sum, max) over it starts: events / seconds from the spawn to /readyz 200 (the events read to their end), start-up included; the view checked (counts sum to the events); {} runs, medians",
            z.view_events, z.view_players, z.view_runs
        ),
        &mut results,
        &mut |sc| views::events(&env, &z, sc),
    );
    run(
        "views-top-n",
        format!(
            "a top 10 (order_by score desc) over {:?} rows: {} random updates of random rows applied to the operator in the bench process (no I/O), ns per update; {} runs, medians",
            z.view_top_rows, z.view_top_updates, z.view_runs
        ),
        &mut results,
        &mut |sc| views::top_n(&z, sc),
    );

    let cores = match (&env.server_cpu, &env.tools_cpu) {
        (Some(a), Some(b)) => format!("every livetable process on CPU {a}, the tools on CPU {b}"),
        _ => "processes not pinned".to_string(),
    };
    run(
        "scale-out-ingest",
        format!(
            "{} changes over {} keys in a {}-partition topic before the materialisers start; {cores}, except \"one core each\": materialiser 1 on the server CPU, 2 on the tools' CPU (nothing else runs then but the broker); a deployment per run",
            z.so_ingest_changes, z.so_ingest_keys, scale_out::PARTITIONS
        ),
        &mut results,
        &mut |sc| scale_out::ingest(&env, &z, sc),
    );
    run(
        "scale-out-clients",
        format!(
            "{} WebSocket clients (one ws-swarm per gateway, clients split evenly) on a {}-row table of a {}-partition topic, {} changes/s for {} s; 1 materialiser; {cores}",
            z.so_clients, z.so_rows, scale_out::PARTITIONS, z.so_rate, z.so_secs
        ),
        &mut results,
        &mut |sc| scale_out::clients(&env, &z, sc),
    );
    run(
        "scale-out-failover",
        format!(
            "2 materialisers + 1 gateway, {} keys of a {}-partition topic changed {} times/s; one materialiser goes: kill -9, SIGTERM then a restart (a join), kill -9 and an immediate restart without and with --instance-id; a WebSocket client in bench (not pinned) on the gateway; session.timeout.ms=6000; {cores}",
            z.fo_keys, scale_out::PARTITIONS, z.fo_rate
        ),
        &mut results,
        &mut |sc| scale_out::failover(&env, &z, sc),
    );
    run(
        "scale-out-resume",
        format!(
            "1 materialiser + 2 gateways, 1000-row table; a client (in bench) takes the snapshot on one gateway and disconnects, {} keys change, it reconnects to the other with since=<pos>; {} runs, alternating gateways; {cores}",
            z.resume_missed, z.resume_runs
        ),
        &mut results,
        &mut |sc| scale_out::resume(&env, &z, sc),
    );

    let rep = report::Report::new(&env, &a.quick, started.elapsed().as_secs_f64(), results);
    let json_out = a.json_out.unwrap_or_else(|| {
        env.repo
            .join(format!("target/bench/bench-{}.json", env.run_id))
    });
    if let Some(dir) = json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_out, serde_json::to_string_pretty(&rep)?)?;
    eprintln!("bench: results in {}", json_out.display());
    let md = rep.markdown();
    // only a full run replaces the results section: a run of some scenarios would drop the others
    let full = !a.quick && a.scenarios == DEFAULT_SCENARIOS;
    let md_out = a
        .markdown_out
        .or_else(|| full.then(|| env.repo.join("BENCHMARKS.md")));
    match md_out {
        Some(p) => {
            report::write_section(&p, &md)?;
            eprintln!("bench: results section of {} updated", p.display());
        }
        None => println!("{md}"),
    }
    let failed: Vec<&str> = rep
        .scenarios
        .iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.name)
        .collect();
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {}", failed.join(", "));
    Ok(())
}
