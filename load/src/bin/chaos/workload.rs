//! The workload and its oracle.
//!
//! Volume: Debezium envelopes (`c`, `u`, `d` and some tombstones after deletes) produced directly
//! to an input topic with several partitions, each key to the partition its key hashes to (as
//! Kafka Connect's producer does). Every value carries `n`, taken from one counter, so the values of
//! a key are ordered by `n`: a client that ever shows a smaller `n` after a larger one (or a key
//! again after its delete with an `n` not larger than before) shows a value older than one it
//! already showed. Some keys are deleted and created again.
//!
//! The oracle is what was produced: the last value (or delete) of every key. Probe keys, one per
//! partition (`probe-p<N>`, sent to partition N explicitly), measure when a node is fresh again
//! after a fault.
//!
//! The PostgreSQL part writes the same kind of rows through SQL transactions (several rows per
//! transaction, deletes and re-inserts); its oracle is the database itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::rng::Rng;

/// `{key: n}`: a deleted key is absent.
pub type State = BTreeMap<String, i64>;

/// `{key: [change]}`: every value (`Some(n)`) and delete (`None`) of each key, oldest first.
pub type Changes = BTreeMap<String, Vec<Option<i64>>>;

#[derive(Default)]
pub struct Oracle {
    /// The last value of every key ever written: `Some(n)`, or `None` once deleted.
    pub last: BTreeMap<String, Option<i64>>,
    /// Every change of every key, in the order produced (`None`: a delete). A failed delivery
    /// stays in it: it may or may not be in the topic, and a key's later changes follow it.
    pub changes: Changes,
    pub sent: u64,
    pub deletes: u64,
    pub recreates: u64,
    pub tombstones: u64,
}

impl Oracle {
    pub fn state(&self) -> State {
        self.last
            .iter()
            .filter_map(|(k, v)| v.map(|n| (k.clone(), n)))
            .collect()
    }
}

pub fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

pub async fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let r = admin(brokers)?
        .create_topics(
            [&NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?;
    for x in r {
        if let Err((t, e)) = x {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("create topic {t}: {e}");
            }
        }
    }
    Ok(())
}

pub async fn delete_topic(brokers: &str, name: &str) -> anyhow::Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let r = admin(brokers)?.delete_topics(&[name], &opts).await?;
    for x in r {
        if let Err((t, e)) = x {
            anyhow::bail!("delete topic {t}: {e}");
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The row of `key` at value `n` (`g` and `price` follow from `n`: the views' oracle,
/// `views.rs`, computes them the same way).
fn row(key: &str, n: i64) -> String {
    format!(
        r#"{{"id":"{key}","n":{n},"g":"{}","price":"{}"}}"#,
        group_of(n),
        price_of(n)
    )
}

/// The group column of a row at value `n`.
pub fn group_of(n: i64) -> String {
    format!("g{}", n.rem_euclid(5))
}

/// The price column of a row at value `n` (a decimal string with 3 digits after the point).
pub fn price_of(n: i64) -> String {
    format!("{}.{:03}", n.rem_euclid(89), n.rem_euclid(1000))
}

fn envelope(table: &str, op: &str, before: Option<String>, after: Option<String>) -> String {
    format!(
        r#"{{"before":{},"after":{},"op":"{op}","source":{{"connector":"chaos","table":"{table}","ts_ms":{}}},"ts_ms":{}}}"#,
        before.as_deref().unwrap_or("null"),
        after.as_deref().unwrap_or("null"),
        now_ms(),
        now_ms()
    )
}

/// Produces the workload to one input topic and keeps its oracle.
pub struct Workload {
    pub topic: String,
    pub table: String,
    pub partitions: i32,
    pub keys: usize,
    pub oracle: Arc<Mutex<Oracle>>,
    producer: FutureProducer,
    next_n: AtomicU64,
    inflight: Arc<tokio::sync::Semaphore>,
    pub failed: Arc<Mutex<Vec<String>>>,
    pub acked: Arc<AtomicU64>,
}

impl Workload {
    /// The oracle (a panic elsewhere while it was held leaves it as it was).
    pub fn oracle(&self) -> std::sync::MutexGuard<'_, Oracle> {
        self.oracle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new(
        brokers: &str,
        topic: &str,
        table: &str,
        partitions: i32,
        keys: usize,
    ) -> anyhow::Result<Workload> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // the key decides the partition, as with Kafka Connect's producer
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            // batches of several records: Tansu 0.6 (memory://) serves a partition of tens of
            // thousands of one-record batches at a crawl (BROKER-1 in RELIABILITY.md)
            .set("linger.ms", "50")
            // a delivery outlives every fault the suite injects
            .set("message.timeout.ms", "300000")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        Ok(Workload {
            topic: topic.into(),
            table: table.into(),
            partitions,
            keys,
            oracle: Arc::default(),
            producer,
            next_n: AtomicU64::new(1),
            inflight: Arc::new(tokio::sync::Semaphore::new(200_000)),
            failed: Arc::default(),
            acked: Arc::default(),
        })
    }

    pub fn key_name(i: usize) -> String {
        format!("k{i}")
    }

    pub fn probe_key(p: i32) -> String {
        format!("probe-p{p}")
    }

    async fn send(&self, key: &str, value: Option<String>, partition: Option<i32>) {
        let Ok(permit) = self.inflight.clone().acquire_owned().await else {
            return;
        };
        let k = format!(r#"{{"id":"{key}"}}"#);
        let mut rec: FutureRecord<'_, str, str> = FutureRecord::to(&self.topic).key(&k);
        if let Some(v) = &value {
            rec = rec.payload(v);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        let fut = loop {
            match self.producer.send_result(rec) {
                Ok(f) => break f,
                Err((_, back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let failed = self.failed.clone();
        let acked = self.acked.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            match fut.await {
                Ok(Ok(_)) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => failed.lock().unwrap_or_else(|e| e.into_inner()).push(key),
            }
            drop(permit);
        });
    }

    fn take_n(&self) -> i64 {
        self.next_n.fetch_add(1, Ordering::Relaxed) as i64
    }

    /// One change of key `key` (explicit partition for probes): create, update or delete.
    async fn change(&self, key: &str, partition: Option<i32>, rng: &mut Rng, delete_pct: u64) {
        let n = self.take_n();
        let prev = {
            let o = self.oracle();
            o.last.get(key).copied().flatten()
        };
        let tombstone;
        let (value, next) = match prev {
            None => {
                let mut o = self.oracle();
                if o.last.contains_key(key) {
                    o.recreates += 1;
                }
                tombstone = false;
                (envelope(&self.table, "c", None, Some(row(key, n))), Some(n))
            }
            Some(p) if partition.is_none() && rng.below(100) < delete_pct => {
                tombstone = rng.below(2) == 0;
                (envelope(&self.table, "d", Some(row(key, p)), None), None)
            }
            Some(p) => {
                tombstone = false;
                (
                    envelope(&self.table, "u", Some(row(key, p)), Some(row(key, n))),
                    Some(n),
                )
            }
        };
        {
            let mut o = self.oracle();
            o.last.insert(key.to_string(), next);
            o.changes.entry(key.to_string()).or_default().push(next);
            o.sent += 1;
            if next.is_none() {
                o.deletes += 1;
            }
            if tombstone {
                o.tombstones += 1;
            }
        }
        self.send(key, Some(value), partition).await;
        if tombstone {
            self.send(key, None, partition).await;
        }
    }

    /// Produces at `rate` changes per second until `stop` is set.
    pub async fn run(
        self: Arc<Self>,
        rate: u64,
        seed: u64,
        delete_pct: u64,
        stop: Arc<AtomicBool>,
    ) {
        let mut rng = Rng::new(seed);
        let tick = Duration::from_millis(20);
        let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0);
        let mut budget = 0.0;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            budget += per_tick;
            while budget >= 1.0 {
                budget -= 1.0;
                let k = Self::key_name(rng.below(self.keys as u64) as usize);
                self.change(&k, None, &mut rng, delete_pct).await;
            }
            next += tick;
            tokio::time::sleep_until(next.into()).await;
        }
    }

    /// A new value for every probe key; returns them (`{key: n}`).
    pub async fn probe(&self, rng: &mut Rng) -> State {
        let mut out = State::new();
        for p in 0..self.partitions {
            let key = Self::probe_key(p);
            self.change(&key, Some(p), rng, 0).await;
            let o = self.oracle();
            if let Some(Some(n)) = o.last.get(&key) {
                out.insert(key, *n);
            }
        }
        out
    }

    /// Waits until every record sent so far was acknowledged (or failed); re-sends a newer
    /// value of every key whose record failed, so the oracle stays the truth.
    pub async fn drain(&self, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        let mut rng = Rng::new(7);
        loop {
            while self.inflight.available_permits() < 200_000 {
                anyhow::ensure!(
                    Instant::now() < until,
                    "{} deliveries still pending after {deadline:?}",
                    200_000 - self.inflight.available_permits()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let failed: Vec<String> =
                std::mem::take(&mut *self.failed.lock().unwrap_or_else(|e| e.into_inner()));
            if failed.is_empty() {
                return Ok(());
            }
            crate::stack::log(format!(
                "{} deliveries failed; sending a newer value of their keys",
                failed.len()
            ));
            for k in failed {
                let p = k
                    .strip_prefix("probe-p")
                    .and_then(|p| p.parse::<i32>().ok());
                // a failed delete is replaced by a create: both end the key in a known state
                self.change(&k, p, &mut rng, 0).await;
            }
        }
    }
}

/// Writes rows through SQL transactions while `stop` is not set; counts transactions.
pub struct PgWriter {
    pub port: u16,
    pub table: String,
    pub keys: usize,
    pub transactions: AtomicU64,
    pub statements: AtomicU64,
    pub errors: AtomicU64,
}

impl PgWriter {
    pub async fn run(self: Arc<Self>, seed: u64, rate_tx: u64, stop: Arc<AtomicBool>) {
        let mut rng = Rng::new(seed);
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=gameodds",
            self.port
        );
        let client = loop {
            match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    break client;
                }
                Err(e) => {
                    crate::stack::log(format!("postgres connect: {e}"));
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // n continues from the database's largest (a re-run on the same table)
        let mut n: i64 = client
            .query_one(
                &format!("select coalesce(max(n), 0) from {}", self.table),
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            + 1;
        let pause = Duration::from_millis(1000 / rate_tx.max(1));
        while !stop.load(Ordering::Relaxed) {
            // mostly small transactions, now and then a big one (a kill lands inside it)
            let rows = if rng.below(10) == 0 {
                40
            } else {
                1 + rng.below(5)
            };
            let mut sql = String::from("begin;");
            for _ in 0..rows {
                let k = format!("k{}", rng.below(self.keys as u64));
                if rng.below(100) < 5 {
                    sql.push_str(&format!("delete from {} where id = '{k}';", self.table));
                } else {
                    sql.push_str(&format!(
                        "insert into {t}(id, n, price) values ('{k}', {n}, {p}.{q:03}) on conflict (id) do update set n = excluded.n, price = excluded.price;",
                        t = self.table,
                        p = n % 89,
                        q = n % 1000
                    ));
                    n += 1;
                }
            }
            sql.push_str("commit;");
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    self.transactions.fetch_add(1, Ordering::Relaxed);
                    self.statements.fetch_add(rows, Ordering::Relaxed);
                }
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    crate::stack::log(format!("postgres transaction failed: {e}"));
                    let _ = client.batch_execute("rollback").await;
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The table as the database has it (`{id: n}`).
    pub async fn state(&self) -> anyhow::Result<State> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=gameodds",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let rows = client
            .query(&format!("select id, n from {}", self.table), &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect())
    }
}
