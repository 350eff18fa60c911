//! Shared helpers of the integration tests: the real local broker (started by `dev/broker`),
//! unique topic names, fixture replay, polling with deadlines. No mocks.
#![allow(dead_code)]

pub mod procs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

/// The broker the tests use: `LIVETABLE_TEST_BROKERS`, default the one `dev/broker start` runs.
pub fn brokers() -> String {
    std::env::var("LIVETABLE_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("{prefix}{}x{t}x{n}", std::process::id())
}

/// The repository (tests of the root crate and of `load/` share this module).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("dev/broker").is_file())
        .expect("dev/broker above the crate")
        .to_path_buf()
}

/// Runs `dev/<script> args` with the tests' broker and `envs`; panics with its output when it
/// fails; returns its stdout, trimmed.
pub fn dev_script(script: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(repo_root().join("dev").join(script))
        .args(args)
        .env("BROKER_ADDR", brokers())
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dev/{script} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The real Debezium captures (with the connector settings that produced them), in the repository.
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures/debezium")
}

/// One record of a fixture file.
#[derive(Clone, Debug)]
pub struct FixtureRecord {
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

pub fn load_fixture(name: &str) -> Vec<FixtureRecord> {
    let text = std::fs::read_to_string(fixtures_dir().join(name)).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let headers = v["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            FixtureRecord {
                key: v["key"].as_str().map(String::from),
                value: v["value"].as_str().map(String::from),
                headers,
            }
        })
        .collect()
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

pub async fn delete_topic(name: &str) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for x in admin().delete_topics(&[name], &opts).await.unwrap() {
        x.unwrap_or_else(|(t, e)| panic!("delete {t}: {e}"));
    }
}

pub async fn create_topic(name: &str, partitions: i32) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let r = admin()
        .create_topics(
            [&NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap();
    for x in r {
        if let Err((t, e)) = x {
            assert_eq!(
                e,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "create {t}"
            );
        }
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        // the key decides the partition, as with Kafka Connect's producer
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "2")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

/// A Debezium update of `table` that sets row `key` to `{"id": key, "n": n}`, with a `pad`
/// column of `pad` bytes when `pad` > 0.
pub fn n_update(table: &str, key: &str, n: usize, pad: usize) -> FixtureRecord {
    let pad = if pad > 0 {
        format!(r#","pad":"{}""#, "x".repeat(pad))
    } else {
        String::new()
    };
    FixtureRecord {
        key: Some(format!(r#"{{"id":"{key}"}}"#)),
        value: Some(format!(
            r#"{{"before":null,"after":{{"id":"{key}","n":{n}{pad}}},"op":"u","source":{{"table":"{table}","ts_ms":1}}}}"#
        )),
        headers: vec![],
    }
}

/// Produces the updates `range` of `table` to `topic` (update `i` sets `k{i % keys}` to `n = i`,
/// `pad` as in [`n_update`]), each to its key's partition, and records them in `want`.
pub async fn produce_n_updates(
    producer: &FutureProducer,
    topic: &str,
    table: &str,
    (keys, pad): (usize, usize),
    range: std::ops::Range<usize>,
    want: &mut std::collections::BTreeMap<String, i64>,
) {
    let batch: Vec<FixtureRecord> = range
        .clone()
        .map(|i| n_update(table, &format!("k{}", i % keys), i, pad))
        .collect();
    produce_keyed(producer, topic, &batch).await;
    for i in range {
        want.insert(format!("k{}", i % keys), i as i64);
    }
}

/// Produces records to partition 0 of `topic` in order and waits for every acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, records: &[FixtureRecord]) {
    produce_to(producer, topic, records, Some(0)).await
}

/// Produces records to partition `partition` of `topic` in order and waits for every
/// acknowledgement.
pub async fn produce_at(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    records: &[FixtureRecord],
) {
    produce_to(producer, topic, records, Some(partition)).await
}

/// Produces records to `topic`, each to the partition its key hashes to (as Debezium's producer
/// does), and waits for every acknowledgement.
pub async fn produce_keyed(producer: &FutureProducer, topic: &str, records: &[FixtureRecord]) {
    produce_to(producer, topic, records, None).await
}

async fn produce_to(
    producer: &FutureProducer,
    topic: &str,
    records: &[FixtureRecord],
    partition: Option<i32>,
) {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec: FutureRecord<'_, str, str> = FutureRecord::to(topic).headers(headers);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v);
        }
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, back)) => {
                    assert!(
                        Instant::now() < until,
                        "the producer refused a record for 120 s: {e}"
                    );
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    for f in pending {
        tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .expect("the broker acknowledges a produced record within 120 s")
            .unwrap()
            .unwrap();
    }
}

/// A consumed record: key, value, headers (as UTF-8, lossily).
pub type ReadRecord = (Option<String>, Option<String>, Vec<(String, String)>);

/// Reads a topic from the beginning until `expected` records arrived or the deadline passed.
pub fn read_topic(topic: &str, expected: usize, deadline: Duration) -> Vec<ReadRecord> {
    read_partitions(topic, &[0], expected, deadline)
}

/// Reads partitions of a topic from the beginning until `expected` records arrived or the
/// deadline passed.
pub fn read_partitions(
    topic: &str,
    partitions: &[i32],
    expected: usize,
    deadline: Duration,
) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader-"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let until = Instant::now() + deadline;
    while out.len() < expected && Instant::now() < until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let s = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_string(), s(x.value).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((s(m.key()), s(m.payload()), headers));
        }
    }
    out
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        // the probe itself is bounded too: one that hangs fails the test at the deadline
        match tokio::time::timeout_at(until.into(), f()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out after {deadline:?} waiting for: {what} (the probe hung)"),
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP client whose requests give up after 30 s: a server that does not answer fails the test
/// at the request, it does not hang it.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let resp = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The text of `GET /metrics`.
pub async fn metrics_text(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition (`None`: absent).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `GET /api/tables/{table}` reports `seq` and returns the body.
pub async fn table_at_seq(base: &str, table: &str, seq: u64) -> Value {
    eventually(
        &format!("{table} at seq {seq}"),
        Duration::from_secs(30),
        || async {
            let (status, body) = get_json(&format!("{base}/api/tables/{table}")).await;
            (status == 200 && body["seq"].as_u64() == Some(seq)).then_some(body)
        },
    )
    .await
}

/// A temporary directory, removed when dropped unless `LIVETABLE_TEST_KEEP` is set (then the
/// data and logs of a failed run stay for a post-mortem).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("LIVETABLE_TEST_KEEP").is_some())
        .tempdir()
        .unwrap()
}

/// Logs of the service under test, shown by `cargo test -- --nocapture` (filter: RUST_LOG).
pub fn init_logs() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The test configuration of a livetable reading `topics` (unique group, changelog and DLQ names).
pub fn test_config(
    topics: livetable::config::TopicSelection,
    dir: &Path,
    u: &str,
) -> livetable::config::Config {
    livetable::config::Config::for_tests(&brokers(), topics, dir, u)
}

/// Starts livetable in-process on a free port; returns it and its `http://` base URL.
pub async fn start_service(c: livetable::config::Config) -> (livetable::Service, String) {
    init_logs();
    let svc = livetable::start(c, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", svc.local_addr);
    (svc, base)
}

// ---------------------------------------------------------------------------------------------
// Publishing (tests/publish.rs): a broker of a test's own, reading every partition back.

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker of the test's own on `addr` (started and stopped by `dev/broker`), stopped on drop.
pub struct OwnBroker {
    pub addr: String,
}

impl OwnBroker {
    pub fn start(addr: &str) -> Self {
        dev_script("broker", &["start"], &[("BROKER_ADDR", addr)]);
        OwnBroker {
            addr: addr.to_string(),
        }
    }

    pub fn stop(&self) {
        dev_script("broker", &["stop"], &[("BROKER_ADDR", &self.addr)]);
    }

    pub fn restart(&self) {
        dev_script("broker", &["start"], &[("BROKER_ADDR", &self.addr)]);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("dev/broker"))
            .arg("stop")
            .env("BROKER_ADDR", &self.addr)
            .output();
    }
}

/// A record read back with its position.
#[derive(Debug, Clone)]
pub struct PositionedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Reads partitions `0..partitions` of `topic` on `brokers` from the beginning to their ends.
pub fn read_to_end(
    brokers: &str,
    topic: &str,
    partitions: i32,
    deadline: Duration,
) -> Vec<PositionedRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader-"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    let until = Instant::now() + deadline;
    while at_end.len() < partitions as usize {
        assert!(
            Instant::now() < until,
            "reading {topic} did not reach the end of every partition in {deadline:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let s = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), s(x.value).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                at_end.remove(&m.partition());
                out.push(PositionedRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: s(m.key()),
                    value: s(m.payload()),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    out
}

/// A WebSocket client of `path` with a 4 KB receive buffer: once it stops reading, the server's
/// writes wait as soon as the kernel's buffers are full.
#[allow(dead_code)]
pub async fn small_buffer_ws(
    base: &str,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream)
        .await
        .unwrap();
    ws
}

/// This process's resident memory.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Applies one server message to a client's rows: a `snapshot` replaces them, a `patch` merges
/// into them (`null` deletes a row). Returns the message's type, or `None` for other messages.
#[allow(dead_code)]
pub fn absorb(state: &mut std::collections::BTreeMap<String, Value>, m: &Value) -> Option<String> {
    let kind = m["type"].as_str()?.to_string();
    let rows = match kind.as_str() {
        "snapshot" => {
            state.clear();
            &m["rows"]
        }
        "patch" => &m["patch"],
        _ => return None,
    };
    for (k, v) in rows.as_object()? {
        if v.is_null() {
            state.remove(k);
        } else {
            let row = state
                .entry(k.clone())
                .or_insert_with(|| Value::Object(Default::default()));
            livetable::patch::merge(row, v);
        }
    }
    Some(kind)
}

/// A Debezium change event of table `table`'s row keyed by `{key_column: key}`: an update to
/// `after`, or (`None`) a delete whose `before` holds only the key.
#[allow(dead_code)]
pub fn debezium_change(
    table: &str,
    key_column: &str,
    key: &str,
    after: Option<Value>,
) -> FixtureRecord {
    let id = serde_json::json!({ key_column: key });
    let (op, before, after) = match after {
        Some(row) => ("u", Value::Null, row),
        None => ("d", id.clone(), Value::Null),
    };
    FixtureRecord {
        key: Some(id.to_string()),
        value: Some(
            serde_json::json!({"before": before, "after": after, "op": op, "source": {"table": table, "ts_ms": 1}})
                .to_string(),
        ),
        headers: vec![],
    }
}
