//! One topology under faults: its livetable nodes, its workload, its clients, the faults injected
//! at random moments, the recovery measured after each, and the final checks (every client ==
//! oracle == HTTP API == changelog folded).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{Client, Kind};
use crate::proxy::{Mode, Proxy};
use crate::rng::Rng;
use crate::stack::{self, log, Broker, Debezium, Proc, SmallFs};
use crate::views;
use crate::workload::{self, PgWriter, State, Workload};

/// What is shared by the phases of a run.
pub struct Ctx {
    pub run_id: String,
    pub livetable: PathBuf,
    pub brokers: String,
    pub broker: Mutex<Broker>,
    pub proxy: Proxy,
    pub work: PathBuf,
    pub logs: PathBuf,
    pub started: Instant,
    pub pids: Arc<Mutex<BTreeMap<String, u32>>>,
    pub memory: Arc<Mutex<BTreeMap<String, MemStat>>>,
    pub debezium: Option<Debezium>,
    pub verbose_nodes: bool,
    /// The views file every node gets (`views.rs`).
    pub views: PathBuf,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemStat {
    pub samples: u64,
    pub first_mib: f64,
    pub max_mib: f64,
    pub last_mib: f64,
    /// (seconds since the start, MiB) every 10 s
    pub timeline: Vec<(u64, f64)>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // the Kafka Connect worker and PostgreSQL, started through dev/connect and dev/postgres,
        // are not our children: stop them (an interrupted run must not leave them running)
        if let Some(d) = &self.debezium {
            d.stop_processes();
        }
    }
}

/// Samples the resident memory of every registered process once a second until `stop`.
pub fn sample_memory(ctx: &Ctx, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let pids = ctx.pids.clone();
    let memory = ctx.memory.clone();
    let started = ctx.started;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now: Vec<(String, u32)> = pids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let mut m = memory.lock().unwrap_or_else(|e| e.into_inner());
            let secs = started.elapsed().as_secs();
            for (name, pid) in now {
                let Some(bytes) = stack::rss(pid) else {
                    continue;
                };
                let mib = bytes as f64 / (1024.0 * 1024.0);
                let s = m.entry(name).or_default();
                if s.samples == 0 {
                    s.first_mib = mib;
                }
                s.samples += 1;
                s.max_mib = s.max_mib.max(mib);
                s.last_mib = mib;
                if s.timeline.last().is_none_or(|(t, _)| secs >= t + 10) {
                    s.timeline.push((secs, (mib * 10.0).round() / 10.0));
                }
            }
        }
    })
}

/// A livetable process.
pub struct Node {
    pub name: String,
    pub role: String,
    pub base: String,
    pub proc: Proc,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    pub restarts_after_crash: Vec<String>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        ctx: &Ctx,
        name: &str,
        role: &str,
        group: &str,
        topics: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Node> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let args: Vec<String> = [
            "--role",
            role,
            "--brokers",
            &ctx.brokers,
            "--topics",
            topics,
            "--group-id",
            group,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &data_dir.display().to_string(),
            "--kafka-prop",
            "session.timeout.ms=6000",
            "--shutdown-grace-secs",
            "10",
            "--views",
            &ctx.views.display().to_string(),
            "--log",
            if ctx.verbose_nodes {
                "info,livetable=debug"
            } else {
                "info"
            },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::new(name, &ctx.livetable, args, &ctx.logs).env("RUST_LOG", "");
        let mut n = Node {
            name: name.into(),
            role: role.into(),
            base: format!("http://127.0.0.1:{port}"),
            proc,
            pids: ctx.pids.clone(),
            restarts_after_crash: Vec::new(),
        };
        n.start()?;
        Ok(n)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.proc.start()?;
        if let Some(pid) = self.proc.pid() {
            self.pids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.name.clone(), pid);
        }
        Ok(())
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn serves(&self) -> bool {
        self.role != "materialiser"
    }

    pub async fn status(&self, path: &str) -> Option<(u16, Value)> {
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let r = c.get(format!("{}{path}", self.base)).send().await.ok()?;
        let st = r.status().as_u16();
        Some((st, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn ready(&self) -> bool {
        matches!(self.status("/readyz").await, Some((200, _)))
    }

    /// `{key: n}` of a table on this node's API.
    pub async fn api(&self, table: &str) -> Option<State> {
        self.rows(table, |v| v["n"].as_i64()).await
    }

    /// The rows of a table (or view) on this node's API, each reduced by `f` (a row it gives
    /// `None` for is left out); `None` when the API does not answer 200.
    pub async fn rows<V>(
        &self,
        table: &str,
        f: impl Fn(&Value) -> Option<V>,
    ) -> Option<BTreeMap<String, V>> {
        let (st, body) = self.status(&format!("/api/tables/{table}")).await?;
        if st != 200 {
            return None;
        }
        Some(
            body["rows"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| f(v).map(|r| (k.clone(), r)))
                .collect(),
        )
    }

    async fn row_n(&self, table: &str, key: &str) -> Option<i64> {
        let (st, body) = self
            .status(&format!("/api/tables/{table}/rows/{key}"))
            .await?;
        (st == 200).then(|| body["n"].as_i64()).flatten()
    }

    /// Restarts the process when it exited by itself; says so.
    pub fn revive(&mut self, why: &str) -> Option<String> {
        let st = self.proc.exited()?;
        let tail = self.proc.log_tail(5);
        let note = format!(
            "{} exited by itself ({st}) {why}; restarted. log tail:\n{tail}",
            self.name
        );
        log(&note);
        self.restarts_after_crash.push(note.clone());
        let _ = self.start();
        Some(note)
    }
}

/// A topology to put under faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// One `--role all` node, its data directory on a small filesystem.
    AllInOne,
    /// Two materialisers and a gateway; the clients are on the gateway.
    Split,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// kill -9 of a livetable process, restarted, recovery waited for.
    Kill9,
    /// kill -9, restarted, the next fault comes before it recovered (mid-restore, mid-rebalance).
    Kill9Quick,
    BrokerSigstop10s,
    BrokerKill9Restart,
    ProxyCut,
    ProxyBlackhole8s,
    ProxyDelay2s,
    DiskFull,
    ConnectKill9,
    ChangelogDeleted,
}

#[derive(Debug, serde::Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    pub phase: Topology,
    pub at_secs: f64,
    pub target: String,
    /// From the end of the fault to every probe value on every serving node's API.
    pub recovery_ms: Option<u64>,
    pub note: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct TableCheck {
    pub table: String,
    pub oracle_rows: usize,
    /// Keys whose value on the API differs from the oracle at the end (missing, extra or other n).
    pub api_lost: usize,
    pub changelog_lost: usize,
    /// A view's topic differing when no serving node was given the views to write since it
    /// last started (VIEWS-GROUP-1, counted apart from `changelog_lost`).
    pub view_topic_unwritten: usize,
    /// Keys of a `history` view (on the APIs) whose entries are not the key's last `limit`
    /// changes: changes in flight at a kill -9 arrive as one entry (documented), a failed
    /// delivery is not in the topic. Reported, not failed.
    pub history_merged: usize,
    /// Changes a `history` view's rows (on the APIs) left out between their first and last
    /// entry (merged into one entry). Reported, not failed.
    pub history_skipped: usize,
    /// Keys whose last value in the input topic itself (read back whole after the run) differs
    /// from the oracle: acknowledged writes the broker does not serve. livetable cannot show what
    /// its input lacks, so where this is not 0 the other counts are not livetable's alone.
    pub input_lost: usize,
    pub clients_lost: usize,
    pub details: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ClientReport {
    pub name: String,
    pub kind: Option<Kind>,
    pub table: String,
    pub keys: Option<usize>,
    pub connects: u64,
    pub resumes: u64,
    pub snapshots: u64,
    /// `format=rows` connections the server closed with 4409 (behind the replay buffer).
    pub rows_resyncs: u64,
    pub messages: u64,
    pub values_checked: u64,
    pub reordered_visible: u64,
    pub stale_after_recovery: u64,
    pub stale_behind_position: u64,
    pub replay_after_stale: u64,
    /// A history shown deleted behind a value the client had shown (`clients.rs`, the
    /// documented gap): reported, not failed.
    pub deleted_behind: u64,
    pub final_equal: bool,
    pub lost: usize,
    pub examples: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PhaseReport {
    pub topology: Option<Topology>,
    pub nodes: Vec<String>,
    pub group: String,
    pub duration_secs: f64,
    pub changes: u64,
    pub deletes: u64,
    pub recreates: u64,
    pub pg_transactions: u64,
    pub pg_rows_written: u64,
    pub faults: Vec<Fault>,
    pub clients: Vec<ClientReport>,
    pub tables: Vec<TableCheck>,
    pub shutdown: Vec<String>,
    pub failures: Vec<String>,
    pub crashes: Vec<String>,
}

pub struct Plan {
    pub kills: usize,
    pub kills_quick: usize,
    pub others: Vec<FaultKind>,
    pub rate: u64,
    pub keys: usize,
    pub partitions: i32,
    pub gap_ms: (u64, u64),
    pub settle: Duration,
    pub recovery: Duration,
}

struct PgPart {
    writer: Arc<PgWriter>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    probe_n: i64,
}

pub async fn run(
    ctx: &Ctx,
    topology: Topology,
    plan: &Plan,
    rng: &mut Rng,
    fs: Option<&SmallFs>,
) -> anyhow::Result<PhaseReport> {
    let tag = match topology {
        Topology::AllInOne => "a",
        Topology::Split => "b",
    };
    let prefix = format!("{}{tag}", ctx.run_id);
    let group = format!("{prefix}-g");
    let topics = format!("^{prefix}\\..*");
    let topic = format!("{prefix}.public.ticks");
    let mut rep = PhaseReport {
        topology: Some(topology),
        group: group.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    log(format!(
        "phase {topology:?}: input topic {topic} ({} partitions), group {group}",
        plan.partitions
    ));
    workload::create_topic(&ctx.brokers, &topic, plan.partitions).await?;
    let wl = Arc::new(Workload::new(
        &ctx.brokers,
        &topic,
        "ticks",
        plan.partitions,
        plan.keys,
    )?);
    // the first rows, so that the table exists when the clients connect
    let mut first = Rng::new(rng.next_u64());
    wl.probe(&mut first).await;
    let mut nodes: Vec<Node> = Vec::new();
    let dir = |name: &str| -> anyhow::Result<PathBuf> {
        let d = match (topology, fs) {
            (Topology::AllInOne, Some(fs)) => fs.dir.join(name),
            _ => ctx.work.join(format!("{prefix}-{name}")),
        };
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    match topology {
        Topology::AllInOne => {
            nodes.push(Node::spawn(
                ctx,
                &format!("{prefix}-all"),
                "all",
                &group,
                &topics,
                &dir("all")?,
            )?);
        }
        Topology::Split => {
            for i in 1..=2 {
                let name = format!("{prefix}-mat{i}");
                nodes.push(Node::spawn(
                    ctx,
                    &name,
                    "materialiser",
                    &group,
                    &topics,
                    &dir(&format!("mat{i}"))?,
                )?);
            }
            let name = format!("{prefix}-gw");
            nodes.push(Node::spawn(
                ctx,
                &name,
                "gateway",
                &group,
                &topics,
                &dir("gw")?,
            )?);
        }
    }
    rep.nodes = nodes
        .iter()
        .map(|n| format!("{} ({})", n.name, n.role))
        .collect();
    // the PostgreSQL part runs with the all-in-one topology
    let mut pg: Option<PgPart> = None;
    if topology == Topology::AllInOne {
        if let Some(d) = &ctx.debezium {
            let d2 = Debezium {
                repo: d.repo.clone(),
                pg_port: d.pg_port,
                name: d.name.clone(),
                table: d.table.clone(),
                prefix: prefix.clone(),
                brokers: d.brokers.clone(),
                log: d.log.clone(),
            };
            log("starting PostgreSQL and Kafka Connect (Debezium)");
            let started = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                d2.start_postgres()?;
                d2.start_connect()
            })
            .await?;
            match started {
                Ok(()) => {
                    let writer = Arc::new(PgWriter {
                        port: d.pg_port,
                        table: d.table.clone(),
                        keys: 50,
                        transactions: Default::default(),
                        statements: Default::default(),
                        errors: Default::default(),
                    });
                    let stop = Arc::new(AtomicBool::new(false));
                    let task = tokio::spawn(writer.clone().run(rng.next_u64(), 20, stop.clone()));
                    pg = Some(PgPart {
                        writer,
                        stop,
                        task,
                        probe_n: 1_000_000_000_000,
                    });
                }
                Err(e) => rep
                    .failures
                    .push(format!("the PostgreSQL part could not start: {e}")),
            }
        }
    }
    let serving: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i].serves()).collect();
    for n in &nodes {
        wait_until(Duration::from_secs(120), || n.ready()).await;
    }
    // the workload starts; the clients attach once the table is there
    let stop_wl = Arc::new(AtomicBool::new(false));
    let wl_task = tokio::spawn(
        wl.clone()
            .run(plan.rate, rng.next_u64(), 3, stop_wl.clone()),
    );
    let gw = &nodes[serving[0]];
    let table_there = wait_until(Duration::from_secs(120), || async {
        gw.api("ticks").await.is_some_and(|s| !s.is_empty())
    })
    .await;
    if !table_there {
        rep.failures
            .push(format!("table ticks never appeared on {}", gw.name));
    }
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let some_keys: Vec<String> = {
        let mut k: Vec<String> = (0..25)
            .map(|_| Workload::key_name(rng.below(plan.keys as u64) as usize))
            .collect();
        k.push(Workload::probe_key(0));
        k.sort();
        k.dedup();
        k
    };
    // the table's clients, and those of two views (`views.rs`: their rows carry the input's `n`)
    for (table, kind, filtered) in [
        ("ticks", Kind::WsPatch, false),
        ("ticks", Kind::WsPatch, true),
        ("ticks", Kind::WsRows, false),
        ("ticks", Kind::WsRows, true),
        ("ticks", Kind::Sse, false),
        ("ticks", Kind::Sse, true),
        (views::WATCHED[0], Kind::WsPatch, false),
        (views::WATCHED[0], Kind::Sse, true),
        (views::WATCHED[1], Kind::WsPatch, false),
        (views::WATCHED[1], Kind::Sse, true),
    ] {
        let name = format!("{kind:?}{}", if filtered { "-keys" } else { "" }).to_lowercase();
        let keys = filtered.then(|| some_keys.clone());
        clients.push(Client::start(
            &name,
            kind,
            &gw.base,
            table,
            keys,
            stop_clients.clone(),
        ));
    }
    if let (Some(d), Some(_)) = (&ctx.debezium, &pg) {
        let gw = &nodes[serving[0]];
        let t = d.table.clone();
        wait_until(Duration::from_secs(120), || async {
            gw.api(&t).await.is_some()
        })
        .await;
        clients.push(Client::start(
            "pg-ws-patch",
            Kind::WsPatch,
            &gw.base,
            &d.table,
            None,
            stop_clients.clone(),
        ));
        clients.push(Client::start(
            "pg-sse",
            Kind::Sse,
            &gw.base,
            &d.table,
            None,
            stop_clients.clone(),
        ));
    }

    // the faults, in a random order, at random moments
    let mut faults: Vec<FaultKind> = Vec::new();
    faults.extend(std::iter::repeat_n(FaultKind::Kill9, plan.kills));
    faults.extend(std::iter::repeat_n(FaultKind::Kill9Quick, plan.kills_quick));
    let mut last = Vec::new();
    for k in &plan.others {
        match k {
            FaultKind::ChangelogDeleted => last.push(*k),
            FaultKind::BrokerKill9Restart
                if !ctx
                    .broker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restartable() => {}
            FaultKind::DiskFull if fs.is_none() || topology != Topology::AllInOne => {}
            FaultKind::ConnectKill9 if pg.is_none() => {}
            _ => faults.push(*k),
        }
    }
    rng.shuffle(&mut faults);
    // deleting the changelog comes after the main checks: what it breaks must not hide the rest
    let delete_changelog = !last.is_empty();
    let total = faults.len();
    for (i, kind) in faults.into_iter().enumerate() {
        tokio::time::sleep(rng.millis(plan.gap_ms.0, plan.gap_ms.1)).await;
        let at_secs = ctx.started.elapsed().as_secs_f64();
        let mut fault = Fault {
            kind,
            phase: topology,
            at_secs: (at_secs * 10.0).round() / 10.0,
            target: String::new(),
            recovery_ms: None,
            note: String::new(),
        };
        log(format!("fault {}/{total} ({topology:?}): {kind:?}", i + 1));
        let mut measure = true;
        match kind {
            FaultKind::Kill9 | FaultKind::Kill9Quick => {
                let t = rng.below(nodes.len() as u64) as usize;
                fault.target = nodes[t].name.clone();
                nodes[t].kill9();
                tokio::time::sleep(rng.millis(100, 1500)).await;
                nodes[t].start()?;
                if kind == FaultKind::Kill9Quick {
                    measure = false;
                    fault.note = "the next fault comes before recovery".into();
                }
            }
            FaultKind::BrokerSigstop10s => {
                fault.target = "broker".into();
                let pid = ctx
                    .broker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .tansu
                    .pid();
                if let Some(pid) = pid {
                    stack::signal(pid, "STOP");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    stack::signal(pid, "CONT");
                }
            }
            FaultKind::BrokerKill9Restart => {
                fault.target = "broker".into();
                {
                    let mut b = ctx.broker.lock().unwrap_or_else(|e| e.into_inner());
                    b.tansu.kill9();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                let port = {
                    let mut b = ctx.broker.lock().unwrap_or_else(|e| e.into_inner());
                    b.tansu.start()?;
                    if let Some(pid) = b.tansu.pid() {
                        ctx.pids
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert("broker".into(), pid);
                    }
                    b.port
                };
                let ok = tokio::task::spawn_blocking(move || {
                    stack::wait_port(port, Duration::from_secs(30), "broker")
                })
                .await?;
                if let Err(e) = ok {
                    rep.failures.push(format!("broker restart: {e}"));
                }
            }
            FaultKind::ProxyCut => {
                fault.target = "proxy".into();
                let n = ctx.proxy.cut();
                fault.note = format!("{n} connections cut");
            }
            FaultKind::ProxyBlackhole8s => {
                fault.target = "proxy".into();
                ctx.proxy.set(Mode::Blackhole);
                tokio::time::sleep(Duration::from_secs(8)).await;
                ctx.proxy.set(Mode::Pass);
            }
            FaultKind::ProxyDelay2s => {
                fault.target = "proxy".into();
                ctx.proxy.set(Mode::Delay(Duration::from_secs(2)));
                tokio::time::sleep(Duration::from_secs(10)).await;
                ctx.proxy.set(Mode::Pass);
            }
            FaultKind::DiskFull => {
                let (Some(fs), Some(node)) = (fs, nodes.first_mut()) else {
                    continue;
                };
                fault.target = format!("{} data dir ({} MiB tmpfs)", node.name, fs.mib);
                let filled = fs.fill();
                tokio::time::sleep(Duration::from_secs(15)).await;
                let health = node.status("/healthz").await.map(|(s, _)| s);
                let exited = node.proc.exited();
                fs.free();
                fault.note = format!(
                    "ballast {} MiB; while full: /healthz {:?}, process {}",
                    filled >> 20,
                    health,
                    match &exited {
                        Some(st) => format!("exited ({st})"),
                        None => "running".into(),
                    }
                );
                if exited.is_some() {
                    fault.note.push_str("; restarted after the space was freed");
                    node.start()?;
                }
            }
            FaultKind::ConnectKill9 => {
                let Some(d) = &ctx.debezium else { continue };
                fault.target = format!("kafka connect {}", d.name);
                if let Some(pid) = d.connect_pid() {
                    stack::signal(pid, "KILL");
                }
                let d2 = Debezium {
                    repo: d.repo.clone(),
                    pg_port: d.pg_port,
                    name: d.name.clone(),
                    table: d.table.clone(),
                    prefix: prefix.clone(),
                    brokers: d.brokers.clone(),
                    log: d.log.clone(),
                };
                tokio::time::sleep(Duration::from_millis(500)).await;
                let r = tokio::task::spawn_blocking(move || d2.start_connect()).await?;
                if let Err(e) = r {
                    rep.failures.push(format!("connect restart: {e}"));
                }
            }
            FaultKind::ChangelogDeleted => continue,
        }
        // a process that died by itself is restarted (as a supervisor would) and reported
        for n in nodes.iter_mut() {
            if let Some(note) = n.revive(&format!("after {kind:?}")) {
                rep.crashes.push(note);
            }
        }
        if measure {
            let ended = Instant::now();
            let probes = wl.probe(rng).await;
            let why = format!("while recovering from {kind:?}");
            let mut fresh = fresh_supervised(
                &mut nodes,
                &serving,
                "ticks",
                &probes,
                plan.recovery,
                &why,
                &mut rep.crashes,
            )
            .await;
            if let (FaultKind::ConnectKill9, Some(p)) = (kind, pg.as_mut()) {
                // the database's change through the restarted Connect
                p.probe_n += 1;
                let t = ctx
                    .debezium
                    .as_ref()
                    .map(|d| d.table.clone())
                    .unwrap_or_default();
                let q = format!("insert into {t}(id, n, price) values ('probe', {n}, 0) on conflict (id) do update set n = excluded.n", n = p.probe_n);
                let w = p.writer.clone();
                let _ = pg_exec(&w, &q).await;
                let want: State = [("probe".to_string(), p.probe_n)].into();
                fresh = fresh.and(
                    fresh_supervised(
                        &mut nodes,
                        &serving,
                        &t,
                        &want,
                        plan.recovery,
                        &why,
                        &mut rep.crashes,
                    )
                    .await,
                );
            }
            match fresh {
                Some(()) => fault.recovery_ms = Some(ended.elapsed().as_millis() as u64),
                None => {
                    let msg = format!(
                        "{kind:?} on {}: not fresh again within {:?}",
                        fault.target, plan.recovery
                    );
                    log(&msg);
                    fault.note.push_str("; NOT RECOVERED");
                    rep.failures.push(msg);
                }
            }
            for n in nodes.iter_mut() {
                if let Some(note) = n.revive(&format!("while recovering from {kind:?}")) {
                    rep.crashes.push(note);
                }
            }
        }
        if let Some(ms) = fault.recovery_ms {
            log(format!("  recovered in {ms} ms"));
        }
        rep.faults.push(fault);
    }

    // the end: no more faults, the workload stops, everything must converge
    ctx.proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_wl.store(true, Ordering::Relaxed);
    let _ = wl_task.await;
    let mut prng = Rng::new(rng.next_u64());
    wl.probe(&mut prng).await;
    if let Err(e) = wl.drain(Duration::from_secs(180)).await {
        rep.failures.push(format!("workload: {e}"));
    }
    let mut tables: Vec<(String, State)> = vec![("ticks".into(), wl.oracle().state())];
    if let Some(p) = pg.as_mut() {
        p.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut p.task).await;
        rep.pg_transactions = p.writer.transactions.load(Ordering::Relaxed);
        rep.pg_rows_written = p.writer.statements.load(Ordering::Relaxed);
        match p.writer.state().await {
            Ok(s) => tables.push((p.writer.table.clone(), s)),
            Err(e) => rep.failures.push(format!("reading the database: {e}")),
        }
    }
    {
        let o = wl.oracle();
        rep.changes = o.sent;
        rep.deletes = o.deletes;
        rep.recreates = o.recreates;
    }
    for n in nodes.iter_mut() {
        if let Some(note) = n.revive("before the final checks") {
            rep.crashes.push(note);
        }
    }
    for n in &nodes {
        if !wait_until(plan.settle, || n.ready()).await {
            let r = n.status("/readyz").await;
            rep.failures.push(format!(
                "{} not ready {:?} after the last fault: {r:?}",
                n.name, plan.settle
            ));
        }
    }
    log(format!(
        "phase {topology:?}: final checks ({} changes sent)",
        rep.changes
    ));
    let (checks, reports) =
        check_tables(ctx, &nodes, &serving, &clients, &tables, plan, &group, "").await?;
    rep.tables.extend(checks);
    rep.clients.extend(reports);
    let ticks = &tables[0].1;
    let changes = wl.oracle().changes.clone();
    let (checks, reports) = views::check(
        ctx,
        &nodes,
        &serving,
        &clients,
        ticks,
        &changes,
        plan.settle,
        &group,
        "",
    )
    .await?;
    rep.tables.extend(checks);
    rep.clients.extend(reports);
    if delete_changelog {
        changelog_deleted(
            ctx, &mut nodes, &serving, &clients, &wl, plan, rng, &group, &mut rep,
        )
        .await?;
        let o = wl.oracle();
        rep.changes = o.sent;
        rep.deletes = o.deletes;
        rep.recreates = o.recreates;
    }
    stop_clients.store(true, Ordering::Relaxed);
    for c in &clients {
        c.stop();
    }
    // SIGTERM: every node must exit by itself within its grace period (10 s)
    for n in nodes.iter_mut() {
        let t = Instant::now();
        let st = tokio::task::block_in_place(|| n.proc.stop(Duration::from_secs(15)));
        let msg = match st {
            Some(st) => format!(
                "{}: SIGTERM -> exit in {:.1} s ({st})",
                n.name,
                t.elapsed().as_secs_f64()
            ),
            None => format!("{}: did not exit within 15 s of SIGTERM (killed)", n.name),
        };
        if st.is_none() || t.elapsed() > Duration::from_secs(11) {
            rep.failures.push(msg.clone());
        }
        rep.shutdown.push(msg);
        ctx.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&n.name);
    }
    if let Some(p) = pg.take() {
        p.task.abort();
        if let Some(d) = &ctx.debezium {
            let d2 = Debezium {
                repo: d.repo.clone(),
                pg_port: d.pg_port,
                name: d.name.clone(),
                table: d.table.clone(),
                prefix: prefix.clone(),
                brokers: d.brokers.clone(),
                log: d.log.clone(),
            };
            let _ = tokio::task::spawn_blocking(move || d2.stop()).await;
        }
    }
    rep.duration_secs = (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    Ok(rep)
}

/// The final checks of some tables: every serving node's API, the changelog folded and every
/// client's state against the oracle (`want`). Client reports only when `tag` is empty (the main
/// round).
#[allow(clippy::too_many_arguments)]
async fn check_tables(
    ctx: &Ctx,
    nodes: &[Node],
    serving: &[usize],
    clients: &[Client],
    tables: &[(String, State)],
    plan: &Plan,
    group: &str,
    tag: &str,
) -> anyhow::Result<(Vec<TableCheck>, Vec<ClientReport>)> {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    for (table, want) in tables {
        let mut tc = TableCheck {
            table: format!("{table}{tag}"),
            oracle_rows: want.len(),
            ..Default::default()
        };
        // the API of every serving node
        for i in serving {
            let n = &nodes[*i];
            let have = settled(plan.settle, Duration::from_millis(200), want, || async {
                Ok(n.api(table).await.unwrap_or_default())
            })
            .await?;
            tc.api_lost += differing(
                &mut tc.details,
                &format!("API of {}", n.name),
                &diff(want, &have),
            );
        }
        // the changelog, folded: last record per key, fences left out
        let cl = format!("{group}.table.{table}");
        let brokers = ctx.brokers.clone();
        let within = plan.settle.min(Duration::from_secs(60));
        let have = settled(within, Duration::from_secs(2), want, || async {
            let (b, c) = (brokers.clone(), cl.clone());
            Ok(tokio::task::spawn_blocking(move || fold_changelog(&b, &c))
                .await?
                .unwrap_or_default())
        })
        .await?;
        tc.changelog_lost = differing(
            &mut tc.details,
            &format!("changelog {cl}"),
            &diff(want, &have),
        );
        // the input topic itself, folded: what the broker serves of the acknowledged writes
        if tag.is_empty() {
            let prefix = group.strip_suffix("-g").unwrap_or(group);
            let input = format!("{prefix}.public.{table}");
            let (b, i) = (brokers.clone(), input.clone());
            let have = tokio::task::spawn_blocking(move || fold_input(&b, &i))
                .await?
                .unwrap_or_default();
            tc.input_lost = differing(
                &mut tc.details,
                &format!("input topic {input} (read back whole, against the acknowledged writes)"),
                &diff(want, &have),
            );
        }
        // every client of the table (short when the API did not converge: the clients cannot
        // either)
        let wait = if tc.api_lost == 0 { 30 } else { 5 };
        let (lost, r) = check_clients(clients, table, want, Duration::from_secs(wait)).await;
        tc.clients_lost += lost;
        reports.extend(r);
        checks.push(tc);
    }
    Ok((checks, if tag.is_empty() { reports } else { Vec::new() }))
}

/// Every client of `table` against the oracle `want` (one deadline, `wait`, for all of them):
/// the keys that differ at the end, and a report per client.
pub async fn check_clients(
    clients: &[Client],
    table: &str,
    want: &State,
    wait: Duration,
) -> (usize, Vec<ClientReport>) {
    let until = Instant::now() + wait;
    let mut lost = 0;
    let mut reports = Vec::new();
    for c in clients.iter().filter(|c| c.table == table) {
        let w = c.want(want);
        let seen = c.seen.clone();
        let left = until.saturating_duration_since(Instant::now());
        wait_until(left, || {
            let seen = seen.clone();
            let w = w.clone();
            async move { seen.lock().unwrap_or_else(|e| e.into_inner()).ns() == w }
        })
        .await;
        let s = c.seen.lock().unwrap_or_else(|e| e.into_inner());
        let d = diff(&w, &s.ns());
        lost += d.len();
        // the first examples, and the first of each kind among the others
        let mut examples: Vec<String> = s.examples.iter().take(10).cloned().collect();
        for tag in [
            "reordered-visible",
            "replay-after-stale",
            "stale-after-recovery",
            "deleted-behind",
        ] {
            if !examples.iter().any(|e| e.contains(tag)) {
                examples.extend(s.examples.iter().find(|e| e.contains(tag)).cloned());
            }
        }
        if !d.is_empty() {
            examples.push(format!(
                "final state: {} keys differ, e.g. {:?}",
                d.len(),
                &d[..d.len().min(5)]
            ));
        }
        reports.push(ClientReport {
            name: format!("{}:{}", c.name, table),
            kind: Some(c.kind),
            table: table.to_string(),
            keys: c.keys.as_ref().map(|k| k.len()),
            connects: s.connects,
            resumes: s.resumes,
            snapshots: s.snapshots,
            rows_resyncs: s.rows_resyncs,
            messages: s.messages,
            values_checked: s.values_checked,
            reordered_visible: s.reordered_visible,
            stale_after_recovery: s.stale_after_recovery,
            stale_behind_position: s.stale_behind_position,
            replay_after_stale: s.replay_after_stale,
            deleted_behind: s.deleted_behind,
            final_equal: d.is_empty(),
            lost: d.len(),
            examples,
            errors: s.errors.iter().take(5).cloned().collect(),
        });
    }
    (lost, reports)
}

/// The changelog topic deleted while the workload runs (after the main checks, so that what it
/// breaks does not hide anything else); then the same checks again.
#[allow(clippy::too_many_arguments)]
async fn changelog_deleted(
    ctx: &Ctx,
    nodes: &mut [Node],
    serving: &[usize],
    clients: &[Client],
    wl: &Arc<Workload>,
    plan: &Plan,
    rng: &mut Rng,
    group: &str,
    rep: &mut PhaseReport,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(wl.clone().run(plan.rate, rng.next_u64(), 3, stop.clone()));
    tokio::time::sleep(rng.millis(2000, 5000)).await;
    let cl = format!("{group}.table.ticks");
    log(format!(
        "fault: ChangelogDeleted ({cl}), then the checks again"
    ));
    let mut fault = Fault {
        kind: FaultKind::ChangelogDeleted,
        phase: rep.topology.unwrap_or(Topology::Split),
        at_secs: (ctx.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        target: cl.clone(),
        recovery_ms: None,
        note: String::new(),
    };
    if let Err(e) = workload::delete_topic(&ctx.brokers, &cl).await {
        fault.note = format!("delete failed: {e}");
    }
    let ended = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    // a process that died of the deletion (BUG-3) is restarted now, as its supervisor would: the
    // crash is reported, and what is measured is how the restarted process recovers
    for n in nodes.iter_mut() {
        if let Some(note) = n.revive("after ChangelogDeleted") {
            rep.crashes.push(note);
        }
    }
    let probes = wl.probe(rng).await;
    if let Err(e) = wl.drain(Duration::from_secs(120)).await {
        rep.failures.push(format!("workload: {e}"));
    }
    match fresh_everywhere(nodes, serving, "ticks", &probes, plan.recovery).await {
        Some(()) => fault.recovery_ms = Some(ended.elapsed().as_millis() as u64),
        None => {
            fault.note.push_str("; NOT RECOVERED");
            rep.failures.push(format!(
                "ChangelogDeleted on {cl}: not fresh again within {:?}",
                plan.recovery
            ));
        }
    }
    for n in nodes.iter_mut() {
        if let Some(note) = n.revive("after ChangelogDeleted") {
            rep.crashes.push(note);
        }
    }
    rep.faults.push(fault);
    let (want, changes) = {
        let o = wl.oracle();
        (o.state(), o.changes.clone())
    };
    let tag = " (after the changelog was deleted)";
    let tables = vec![("ticks".to_string(), want)];
    let (checks, _) = check_tables(ctx, nodes, serving, clients, &tables, plan, group, tag).await?;
    rep.tables.extend(checks);
    // the views over the table, whose input's changelog was deleted and written again
    let (checks, _) = views::check(
        ctx,
        nodes,
        serving,
        clients,
        &tables[0].1,
        &changes,
        plan.settle,
        group,
        tag,
    )
    .await?;
    rep.tables.extend(checks);
    Ok(())
}

async fn pg_exec(w: &PgWriter, q: &str) -> anyhow::Result<()> {
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=gameodds",
        w.port
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(q).await?;
    Ok(())
}

/// Keys whose value differs: `key: want -> have` (`-` for absent).
/// Records the keys that differ (`d`, from [`diff`]) of `what` in `details`; returns how many.
pub fn differing(details: &mut Vec<String>, what: &str, d: &[String]) -> usize {
    if !d.is_empty() {
        details.push(format!(
            "{what}: {} keys differ, e.g. {:?}",
            d.len(),
            &d[..d.len().min(5)]
        ));
    }
    d.len()
}

pub fn diff<V: PartialEq + std::fmt::Display>(
    want: &BTreeMap<String, V>,
    have: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match have.get(k) {
            Some(h) if h == w => {}
            Some(h) => out.push(format!("{k}: {w} -> {h}")),
            None => out.push(format!("{k}: {w} -> -")),
        }
    }
    for (k, h) in have {
        if !want.contains_key(k) {
            out.push(format!("{k}: - -> {h}"));
        }
    }
    out
}

/// What `get` gives, asked every `every` until it equals `want` or `within` passed (the last
/// answer then).
pub async fn settled<V, F, Fut>(
    within: Duration,
    every: Duration,
    want: &V,
    get: F,
) -> anyhow::Result<V>
where
    V: PartialEq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<V>>,
{
    settled_when(within, every, |have| have == want, get).await
}

/// What `get` gives, asked every `every` until `done` holds for it or `within` passed (the
/// last answer then).
pub async fn settled_when<V, F, Fut>(
    within: Duration,
    every: Duration,
    done: impl Fn(&V) -> bool,
    mut get: F,
) -> anyhow::Result<V>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<V>>,
{
    let until = Instant::now() + within;
    loop {
        let have = get().await?;
        if done(&have) || Instant::now() > until {
            return Ok(have);
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` until it is true or `deadline` passed; whether it became true.
pub async fn wait_until<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let every = Duration::from_millis(100);
    let got = settled_when(
        deadline,
        every,
        |ok| *ok,
        || {
            let fut = f();
            async move { Ok(fut.await) }
        },
    );
    got.await.unwrap_or(false)
}

/// [`fresh_everywhere`], restarting (as a supervisor would, and reported in `crashes`) any
/// process that exits while the wait lasts: a node may meet a fault's effect only at its next
/// write, after the fault ended (a full disk: sled's first failed write stops it), and the wait
/// must not count the time it stays down as livetable's.
async fn fresh_supervised(
    nodes: &mut [Node],
    serving: &[usize],
    table: &str,
    probes: &State,
    deadline: Duration,
    why: &str,
    crashes: &mut Vec<String>,
) -> Option<()> {
    let until = Instant::now() + deadline;
    loop {
        for n in nodes.iter_mut() {
            if let Some(note) = n.revive(why) {
                crashes.push(note);
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let window = left.min(Duration::from_secs(1));
        if fresh_everywhere(nodes, serving, table, probes, window)
            .await
            .is_some()
        {
            return Some(());
        }
        if left <= window {
            return None;
        }
    }
}

/// Waits until every serving node shows at least the probe values.
async fn fresh_everywhere(
    nodes: &[Node],
    serving: &[usize],
    table: &str,
    probes: &State,
    deadline: Duration,
) -> Option<()> {
    let ok = wait_until(deadline, || async {
        for i in serving {
            for (k, n) in probes {
                if nodes[*i].row_n(table, k).await.is_none_or(|have| have < *n) {
                    return false;
                }
            }
        }
        true
    })
    .await;
    ok.then_some(())
}

/// The input topic folded: per key (`id` of the message key), the `n` of its last change in
/// offset order, deletes removing it. Debezium envelopes, with or without a schema wrapper.
pub fn fold_input(brokers: &str, topic: &str) -> anyhow::Result<State> {
    let field = |v: &Value, name: &str| -> Value {
        let inner = if v.get("payload").is_some_and(Value::is_object) {
            &v["payload"]
        } else {
            v
        };
        inner[name].clone()
    };
    use rdkafka::message::Message;
    fold_topic_msgs(brokers, topic, |m, r| {
        let Some(key) = r
            .key()
            .and_then(|k| serde_json::from_slice::<Value>(k).ok())
            .and_then(|k| field(&k, "id").as_str().map(String::from))
        else {
            return;
        };
        // a tombstone follows its delete: nothing to do
        let Some(v) = r
            .payload()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
        else {
            return;
        };
        if field(&v, "op") == "d" {
            m.remove(&key);
        } else if let Some(n) = field(&v, "after")["n"].as_i64() {
            m.insert(key, n);
        }
    })
}

/// The changelog topic folded as a compacting broker would keep it: the last record per key,
/// fence records left out. Reads every partition to its end.
pub fn fold_changelog(brokers: &str, topic: &str) -> anyhow::Result<State> {
    use rdkafka::message::{Headers, Message};
    fold_topic_msgs(brokers, topic, |m, r| {
        let fence = r
            .headers()
            .is_some_and(|h| h.iter().any(|x| x.key == "livetable.fence"));
        if fence {
            return;
        }
        let Some(k) = r.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        match r
            .payload()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
        {
            Some(row) => {
                m.insert(k, row["n"].as_i64().unwrap_or(-1));
            }
            None => {
                m.remove(&k);
            }
        }
    })
}

/// Reads `topic` whole (every partition from its beginning, until 3 s pass with nothing new, at
/// most 60 s) and folds each record into a state.
pub fn fold_topic_msgs<V>(
    brokers: &str,
    topic: &str,
    mut f: impl FnMut(&mut BTreeMap<String, V>, &rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<BTreeMap<String, V>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("chaos-reader-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    anyhow::ensure!(parts > 0, "{topic}: no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut m = BTreeMap::new();
    let mut last = Instant::now();
    let until = Instant::now() + Duration::from_secs(60);
    while last.elapsed() < Duration::from_secs(3) && Instant::now() < until {
        let Some(Ok(r)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        last = Instant::now();
        f(&mut m, &r);
    }
    Ok(m)
}
