//! publish-load: N connections publishing to Kafka, measuring acknowledged publishes/s and the
//! ack latency (HDR histogram, from the publish to its ack).
//!
//! Two ways to reach livetable's publishing:
//! - in-process (default): a `livetable::publish::Publisher` over a temporary sled directory,
//!   one `Session` per connection, against `--brokers` (the publishing core alone);
//! - `--ws ws://HOST:PORT/ws`: real WebSocket connections sending
//!   `{"type":"publish","topic":..,"key":..,"value":..,"id":..}` frames and reading the
//!   `ack`/`nack` answers: the service itself (bench's `publish` scenario runs this mode).
//!
//! `--rate 0` keeps `--window` publishes in flight per connection (throughput); `--rate R` sends
//! R publishes/s in total, evenly spread over the connections (latency at a given load; the
//! latency is measured from the actual send, so a connection whose window is full skips a tick,
//! counted as `skipped`). `--verify N` reads N acknowledged publishes, sampled uniformly, back
//! from the topic (the record at the ack's partition and offset must carry the publish's id).
//! Progress on stderr, a JSON summary on stdout.

mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use livetable::metrics::Metrics;
use livetable::publish::{PublishConfig, PublishContext, PublishRequest, Publisher, Reply};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "publish-load",
    about = "Publishing load: acknowledged publishes/s and ack latency"
)]
struct Args {
    /// Kafka bootstrap servers (in-process mode).
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Drive livetable's WebSocket at this URL instead of the in-process publisher.
    #[arg(long)]
    ws: Option<String>,
    /// Topic to publish to (in-process: created with `--partitions`; default a fresh name).
    #[arg(long)]
    topic: Option<String>,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Publishes in flight per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Total publishes per second (0: as fast as acknowledgements come back).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Seconds of warm-up not measured.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Bytes of padding in each value (a value is about 60 bytes plus this).
    #[arg(long, default_value_t = 40)]
    value_bytes: usize,
    /// Distinct keys per connection.
    #[arg(long, default_value_t = 16)]
    keys: usize,
    /// `dedup_max_entries` of the in-process publisher.
    #[arg(long, default_value_t = 2_000_000)]
    max_ids: usize,
    /// Publish without ids (nothing remembered: the cost of exactly-once, by difference).
    #[arg(long)]
    no_ids: bool,
    /// Acknowledged publishes (a uniform sample of the measured ones) read back from the topic
    /// at the end, read through `--brokers`; 0: none.
    #[arg(long, default_value_t = 0)]
    verify: usize,
}

/// What every connection adds up.
struct Totals {
    acks: u64,
    /// Acks of an earlier publish of the id (none expected: every id of a run is new).
    duplicates: u64,
    nacks: BTreeMap<String, u64>,
    skipped: u64,
    /// Connections that failed (could not connect, closed, publishes left unanswered).
    failed: u64,
    latency_us: Histogram<u64>,
    sample: verify::Sample,
}

impl Totals {
    /// Totals sampling at most `sample` acks for `--verify`.
    fn new(sample: usize, seed: u64) -> Self {
        Totals {
            acks: 0,
            duplicates: 0,
            nacks: BTreeMap::new(),
            skipped: 0,
            failed: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
            sample: verify::Sample::new(sample, seed),
        }
    }

    fn merge(&mut self, o: &mut Totals) {
        self.acks += o.acks;
        self.duplicates += o.duplicates;
        self.skipped += o.skipped;
        self.failed += o.failed;
        for (k, v) in &o.nacks {
            *self.nacks.entry(k.clone()).or_default() += v;
        }
        let _ = self.latency_us.add(&o.latency_us);
        self.sample.acks.append(&mut o.sample.acks);
    }

    fn answer(&mut self, reply: &Reply, took: Duration, measured: bool) {
        if !measured {
            return;
        }
        match reply {
            Reply::Ack(a) => {
                self.acks += 1;
                self.duplicates += u64::from(a.duplicate);
                let _ = self.latency_us.record((took.as_micros() as u64).max(1));
                self.sample.offer(a);
            }
            Reply::Nack(n) => *self.nacks.entry(n.code.as_str().to_string()).or_default() += 1,
        }
    }
}

struct Plan {
    a: Args,
    topic: String,
    /// Measurement window: [start, end).
    start: Instant,
    end: Instant,
}

impl Plan {
    fn request(&self, conn: usize, n: u64) -> PublishRequest {
        PublishRequest {
            topic: self.topic.clone(),
            key: json!(format!("c{conn}-k{}", n % self.a.keys as u64)),
            value: json!({"conn": conn, "n": n, "pad": "x".repeat(self.a.value_bytes)}),
            id: (!self.a.no_ids).then(|| json!(format!("{conn}-{n}"))),
        }
    }

    fn measured(&self, sent: Instant) -> bool {
        sent >= self.start && sent < self.end
    }

    /// The totals of connection `conn`: its share of the acks to verify.
    fn totals(&self, conn: usize) -> Totals {
        Totals::new(
            self.a.verify.div_ceil(self.a.connections.max(1)),
            conn as u64,
        )
    }

    /// The pause between two sends of one connection (None: window-bound).
    fn period(&self) -> Option<Duration> {
        (self.a.rate > 0)
            .then(|| Duration::from_secs_f64(self.a.connections as f64 / self.a.rate as f64))
    }
}

/// The answer of a publish with the time it was sent.
async fn timed(sent: Instant, f: livetable::publish::PublishFuture) -> (Instant, Reply) {
    (sent, f.await)
}

/// One in-process connection: a session, `window` in flight, paced or not.
async fn in_process_connection(plan: Arc<Plan>, publisher: Publisher, conn: usize) -> Totals {
    let session = publisher.session(PublishContext::default());
    let mut t = plan.totals(conn);
    let mut in_flight = FuturesUnordered::new();
    let mut n = 0u64;
    let mut tick = plan.period().map(|p| {
        let mut i = tokio::time::interval_at(
            tokio::time::Instant::now() + p.mul_f64(conn as f64 / plan.a.connections as f64),
            p,
        );
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let now = Instant::now();
        if now >= plan.end && in_flight.is_empty() {
            break;
        }
        match &mut tick {
            None => {
                while now < plan.end && in_flight.len() < plan.a.window {
                    let sent = Instant::now();
                    let f = session.submit(plan.request(conn, n));
                    n += 1;
                    in_flight.push(timed(sent, f));
                }
                if let Some((sent, reply)) = in_flight.next().await {
                    t.answer(&reply, sent.elapsed(), plan.measured(sent));
                }
            }
            Some(tick) => {
                tokio::select! {
                    _ = tick.tick(), if now < plan.end => {
                        let sent = Instant::now();
                        if in_flight.len() >= plan.a.window {
                            if plan.measured(sent) {
                                t.skipped += 1;
                            }
                            continue;
                        }
                        let f = session.submit(plan.request(conn, n));
                        n += 1;
                        in_flight.push(timed(sent, f));
                    }
                    Some((sent, reply)) = in_flight.next(), if !in_flight.is_empty() => {
                        t.answer(&reply, sent.elapsed(), plan.measured(sent));
                    }
                }
            }
        }
    }
    t
}

/// One WebSocket connection: publish frames out, ack/nack frames in, matched by id.
async fn ws_connection(plan: Arc<Plan>, url: String, conn: usize) -> anyhow::Result<Totals> {
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("connect {url}"))?;
    let (mut tx, mut rx) = ws.split();
    let mut t = plan.totals(conn);
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut n = 0u64;
    let period = plan.period();
    let mut tick = tokio::time::interval(period.unwrap_or(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = Instant::now();
        if now >= plan.end && sent_at.is_empty() {
            break;
        }
        if now >= plan.end + Duration::from_secs(30) {
            anyhow::bail!(
                "connection {conn}: {} publishes never answered",
                sent_at.len()
            );
        }
        let can_send = now < plan.end && sent_at.len() < plan.a.window;
        tokio::select! {
            _ = tick.tick(), if can_send && period.is_some() => {
                send(&plan, &mut tx, &mut sent_at, conn, &mut n).await?;
            }
            _ = std::future::ready(()), if can_send && period.is_none() => {
                send(&plan, &mut tx, &mut sent_at, conn, &mut n).await?;
            }
            m = rx.next() => {
                let Some(m) = m else { anyhow::bail!("connection {conn} closed") };
                let Message::Text(text) = m? else { continue };
                let Ok(reply) = serde_json::from_str::<Reply>(&text) else { continue };
                let id = match &reply {
                    Reply::Ack(a) => a.id.clone(),
                    Reply::Nack(x) => x.id.clone(),
                };
                let Some(Value::String(id)) = id else { continue };
                if let Some(sent) = sent_at.remove(&id) {
                    t.answer(&reply, sent.elapsed(), plan.measured(sent));
                }
            }
        }
    }
    Ok(t)
}

async fn send<S>(
    plan: &Plan,
    tx: &mut S,
    sent_at: &mut HashMap<String, Instant>,
    conn: usize,
    n: &mut u64,
) -> anyhow::Result<()>
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let mut msg = serde_json::to_value(plan.request(conn, *n))?;
    msg["type"] = json!("publish");
    sent_at.insert(format!("{conn}-{n}"), Instant::now());
    *n += 1;
    tx.send(Message::Text(msg.to_string().into())).await?;
    Ok(())
}

/// This process's resident memory (with the in-process publisher: its remembered ids).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|x| x.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 4096
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        !(a.no_ids && a.ws.is_some()),
        "--no-ids is for the in-process mode (WebSocket publishes need ids)"
    );
    let topic = a.topic.clone().unwrap_or_else(|| {
        format!(
            "publish-load-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )
    });
    let start = Instant::now() + Duration::from_secs(a.warmup_secs);
    let plan = Arc::new(Plan {
        topic: topic.clone(),
        start,
        end: start + Duration::from_secs(a.secs),
        a: a.clone(),
    });
    let totals = Arc::new(Mutex::new(Totals::new(0, 0)));
    let metrics = Arc::new(Metrics::new());
    let mut tasks = tokio::task::JoinSet::new();
    let mut publisher = None;
    let _dir;
    match &a.ws {
        Some(url) => {
            for conn in 0..a.connections {
                let (plan, url, totals) = (plan.clone(), url.clone(), totals.clone());
                tasks.spawn(async move {
                    let mut t = match ws_connection(plan.clone(), url, conn).await {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("connection {conn}: {e:#}");
                            let mut t = plan.totals(conn);
                            t.failed = 1;
                            t
                        }
                    };
                    totals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .merge(&mut t);
                });
            }
        }
        None => {
            let dir = tempfile::tempdir()?;
            let config = PublishConfig::from_toml(
                &format!(
                    "[publish]\nmax_in_flight = {window}\nmax_in_flight_total = {total}\n\
                     dedup_max_entries = {max_ids}\n\
                     [[publish.topic]]\nname = \"{topic}\"\nrate_per_sec = 1000000000\npartitions = {p}\n",
                    window = a.window,
                    total = (a.connections * a.window).max(10_000),
                    p = a.partitions,
                    max_ids = a.max_ids,
                ),
                dir.path(),
            )?
            .context("the [publish] table")?;
            let db = livetable::publish::sled::Config::new()
                .path(dir.path().join("db"))
                .open()?;
            let mut kafka = rdkafka::config::ClientConfig::new();
            kafka.set("bootstrap.servers", &a.brokers);
            let p =
                Publisher::open(config, kafka, db.open_tree("publish")?, metrics.clone()).await?;
            // the topic is created by the publisher: wait until a publish is acknowledged
            let probe = p.session(PublishContext::default());
            let until = Instant::now() + Duration::from_secs(30);
            let mut i = 0;
            loop {
                let mut r = plan.request(usize::MAX, i);
                r.id = Some(json!(format!("probe-{i}")));
                if let Reply::Ack(_) = probe.submit(r).await {
                    break;
                }
                anyhow::ensure!(Instant::now() < until, "topic {topic} not writable in 30 s");
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for conn in 0..a.connections {
                let (plan, p, totals) = (plan.clone(), p.clone(), totals.clone());
                tasks.spawn(async move {
                    let mut t = in_process_connection(plan, p, conn).await;
                    totals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .merge(&mut t);
                });
            }
            publisher = Some(p);
            _dir = dir;
        }
    }
    eprintln!(
        "publishing to {topic}: {} connections, window {}, rate {}, {} s (+{} s warm-up)",
        a.connections,
        a.window,
        if a.rate == 0 {
            "max".to_string()
        } else {
            format!("{}/s", a.rate)
        },
        a.secs,
        a.warmup_secs
    );
    while tasks.join_next().await.is_some() {}
    let rss_mib = rss_bytes() >> 20;
    if let Some(p) = publisher {
        p.close().await;
    }
    // every task ended: the totals are taken out (no lock held across the verification's await)
    let mut t = std::mem::replace(
        &mut *totals.lock().unwrap_or_else(|e| e.into_inner()),
        Totals::new(0, 0),
    );
    let verified = if a.verify > 0 {
        let sample = std::mem::take(&mut t.sample.acks);
        let (brokers, topic) = (a.brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || verify::verify(&brokers, &topic, sample)).await??
    } else {
        Value::Null
    };
    let h = &t.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = json!({
        "mode": if a.ws.is_some() { "ws" } else { "in-process" },
        "topic": topic,
        "connections": a.connections,
        "window": a.window,
        "rate_target": a.rate,
        "secs": a.secs,
        "acked": t.acks,
        "acked_per_sec": t.acks as f64 / a.secs as f64,
        "duplicates": t.duplicates,
        "nacks": t.nacks,
        "skipped_ticks": t.skipped,
        "failed_connections": t.failed,
        "verified": verified,
        "rss_mib_at_end": rss_mib,
        "ack_latency_ms": {
            "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
            "max": h.max() as f64 / 1000.0,
        },
    });
    eprintln!(
        "acked {}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, nacks {:?}",
        (t.acks as f64 / a.secs as f64).round(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        t.nacks
    );
    println!("{summary}");
    Ok(())
}
