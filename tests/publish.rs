//! Publishing against the real broker: every documented answer, exactly-once retries across
//! disconnects, concurrent publishes of one id, restarts and crashes of the publisher, expiry,
//! and a broker that goes away and comes back.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use livetable::auth::glob::Glob;
use livetable::metrics::Metrics;
use livetable::publish::store::{Entry, IdLog, Scope};
use livetable::publish::{
    Ack, NackCode, PublishConfig, PublishContext, PublishRequest, Publisher, Reply,
};
use rdkafka::config::ClientConfig;
use serde_json::{json, Value};

const BET_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["game_id", "stake", "user_id"],
  "properties": {
    "game_id": {"type": "string"},
    "stake": {"type": "number", "minimum": 0.01},
    "user_id": {"type": "string"}
  }
}"#;

fn kafka(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn config(dir: &Path, toml: &str) -> PublishConfig {
    std::fs::write(dir.join("bet.json"), BET_SCHEMA).unwrap();
    PublishConfig::from_toml(toml, dir).unwrap().unwrap()
}

fn open_db(dir: &Path) -> sled::Db {
    // sled's background flusher may hold the directory's lock for a moment after a drop
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return db,
            Err(e) => {
                assert!(Instant::now() < until, "cannot reopen {dir:?}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

async fn open(cfg: PublishConfig, brokers: &str, db: &sled::Db, m: &Arc<Metrics>) -> Publisher {
    Publisher::open(
        cfg,
        kafka(brokers),
        db.open_tree("publish").unwrap(),
        m.clone(),
    )
    .await
    .unwrap()
}

fn req(topic: &str, key: &str, value: Value, id: &str) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        key: json!(key),
        value,
        id: Some(json!(id)),
    }
}

fn bet(user: &str, stake: f64) -> Value {
    json!({"game_id": "g1", "stake": stake, "user_id": user})
}

fn header<'a>(r: &'a PositionedRecord, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn code(reply: Reply) -> (NackCode, String) {
    match reply {
        Reply::Nack(n) => (n.code, n.message),
        Reply::Ack(a) => panic!("expected a nack, got {a:?}"),
    }
}

fn ack(reply: Reply) -> Ack {
    match reply {
        Reply::Ack(a) => a,
        Reply::Nack(n) => panic!("expected an ack, got {n:?}"),
    }
}

fn metric(m: &Metrics, line_start: &str) -> f64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_answer_and_the_session_stays_usable() {
    init_logs();
    let dir = tempdir();
    let (bets, slow) = (unique("bets-"), unique("slow-"));
    create_topic(&bets, 1).await;
    create_topic(&slow, 1).await;
    let cfg = config(
        dir.path(),
        &format!(
            r#"
            [publish]
            max_in_flight = 2
            [[publish.topic]]
            name = "{bets}"
            schema = "bet.json"
            max_bytes = 200
            rate_per_sec = 1000
            pin = {{ field = "user_id", claim = "sub" }}
            [[publish.topic]]
            name = "{slow}"
            rate_per_sec = 5
            burst = 3
            "#
        ),
    );
    let db = open_db(&dir.path().join("db"));
    let m = Arc::new(Metrics::new());
    let p = open(cfg, &brokers(), &db, &m).await;
    let s = p.session(PublishContext::default());

    // ack: the record is at the acknowledged position, with its id in a header
    let a = s
        .publish(req(&bets, "g1", bet("u1", 2.5), "a1"))
        .await
        .unwrap();
    assert_eq!((a.topic.as_str(), a.duplicate), (bets.as_str(), false));
    let records = read_to_end(&brokers(), &bets, 1, Duration::from_secs(20));
    let r = records.iter().find(|r| r.offset == a.offset).unwrap();
    assert_eq!(r.key.as_deref(), Some("g1"));
    assert_eq!(
        serde_json::from_str::<Value>(r.value.as_deref().unwrap()).unwrap(),
        bet("u1", 2.5)
    );
    assert_eq!(header(r, "livetable.publish_id"), Some("\"a1\""));
    // the same id again: the original ack, nothing produced; another record under it: refused
    let again = s
        .publish(req(&bets, "g1", bet("u1", 2.5), "a1"))
        .await
        .unwrap();
    assert_eq!((again.offset, again.duplicate), (a.offset, true));
    let (c, msg) = code(s.submit(req(&bets, "g1", bet("u1", 3.0), "a1")).await);
    assert_eq!(c, NackCode::BadRequest, "{msg}");

    // invalid: the schema's reason with the field's pointer
    let (c, msg) = code(s.submit(req(&bets, "g1", bet("u1", 0.0), "a2")).await);
    assert_eq!(c, NackCode::Invalid);
    assert!(msg.contains("/stake"), "{msg}");
    let (c, msg) = code(s.submit(req(&bets, "g1", json!({"stake": 1}), "a3")).await);
    assert_eq!(c, NackCode::Invalid);
    assert!(msg.contains("game_id"), "{msg}");
    // forbidden: a topic not on the list, a topic the token does not allow, a pinned field
    let (c, _) = code(s.submit(req("not-listed", "k", json!({}), "a4")).await);
    assert_eq!(c, NackCode::Forbidden);
    let claims = json!({"sub": "u1"}).as_object().cloned();
    let as_u1 = p.session(PublishContext {
        principal: Some("u1".into()),
        claims,
        topics: Some(vec![Glob::new(&bets)]),
    });
    let (c, msg) = code(as_u1.submit(req(&bets, "g1", bet("u2", 1.0), "a5")).await);
    assert_eq!(c, NackCode::Forbidden, "{msg}");
    assert!(msg.contains("user_id"), "{msg}");
    let (c, _) = code(as_u1.submit(req(&slow, "k", json!({}), "a6")).await);
    assert_eq!(c, NackCode::Forbidden);
    // the principal scopes ids: u1's "a1" is not the anonymous "a1"
    let own = as_u1
        .publish(req(&bets, "g1", bet("u1", 1.0), "a1"))
        .await
        .unwrap();
    assert!(!own.duplicate && own.offset != a.offset);
    // too_large
    let big = json!({"game_id": "g1", "stake": 1, "user_id": "u1", "pad": "x".repeat(300)});
    let (c, msg) = code(s.submit(req(&bets, "g1", big, "a7")).await);
    assert_eq!(c, NackCode::TooLarge, "{msg}");
    // bad_request
    let bad = [
        PublishRequest {
            topic: String::new(),
            value: json!({}),
            ..Default::default()
        },
        PublishRequest {
            topic: bets.clone(),
            ..Default::default()
        },
        PublishRequest {
            topic: bets.clone(),
            key: json!(5),
            value: bet("u1", 1.0),
            id: None,
        },
        PublishRequest {
            topic: bets.clone(),
            value: bet("u1", 1.0),
            id: Some(json!({"x": 1})),
            ..Default::default()
        },
        PublishRequest {
            topic: bets.clone(),
            value: bet("u1", 1.0),
            id: Some(json!("i".repeat(200))),
            ..Default::default()
        },
    ];
    for r in bad {
        let (c, msg) = code(s.submit(r.clone()).await);
        assert_eq!(c, NackCode::BadRequest, "{r:?}: {msg}");
    }
    // too_many_in_flight: two unanswered futures hold the session's two places
    let f1 = s.submit(req(&bets, "g2", bet("u1", 1.0), "b1"));
    let f2 = s.submit(req(&bets, "g2", bet("u1", 1.0), "b2"));
    let (c, _) = code(s.submit(req(&bets, "g2", bet("u1", 1.0), "b3")).await);
    assert_eq!(c, NackCode::TooManyInFlight);
    let (a1, a2) = (ack(f1.await), ack(f2.await));
    assert_eq!(a2.offset, a1.offset + 1, "one key, one partition, in order");
    ack(s.submit(req(&bets, "g2", bet("u1", 1.0), "b3")).await);
    // rate_limited: burst 3, then told when to come back, and accepted then
    for i in 0..3 {
        ack(s
            .submit(req(&slow, "k", json!({"i": i}), &format!("r{i}")))
            .await);
    }
    let limited = match s.submit(req(&slow, "k", json!({"i": 3}), "r3")).await {
        Reply::Nack(n) => n,
        Reply::Ack(a) => panic!("expected rate_limited, got {a:?}"),
    };
    assert_eq!(limited.code, NackCode::RateLimited);
    let wait = limited.retry_after_ms.expect("retry_after_ms");
    assert!((1..=250).contains(&wait), "{wait}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    ack(s.submit(req(&slow, "k", json!({"i": 3}), "r3")).await);

    let text = m.render();
    for (outcome, at_least) in [
        ("ack", 5.0),
        ("duplicate", 1.0),
        ("invalid", 2.0),
        ("forbidden", 1.0),
        ("too_large", 1.0),
        ("bad_request", 3.0),
        ("too_many_in_flight", 1.0),
    ] {
        let v = metric(
            &m,
            &format!("livetable_publishes_total{{outcome=\"{outcome}\",topic=\"{bets}\"}}"),
        );
        assert!(v >= at_least, "{outcome}: {v}\n{text}");
    }
    assert!(
        metric(
            &m,
            &format!("livetable_publishes_total{{outcome=\"rate_limited\",topic=\"{slow}\"}}")
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "livetable_publishes_total{outcome=\"forbidden\",topic=\"_unlisted\"}"
        ) >= 1.0
    );
    assert!(text.contains(&format!(
        "livetable_publish_duplicates_total{{result=\"stored\",topic=\"{bets}\"}} 1"
    )));
    assert!(
        metric(
            &m,
            &format!("livetable_publish_ack_seconds_count{{topic=\"{bets}\"}}")
        ) >= 5.0
    );
    p.close().await;
}

/// A small deterministic random source (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const CLIENTS: usize = 10;
const PER_CLIENT: usize = 1000;
const KEYS_PER_CLIENT: usize = 3;
const WINDOW: usize = 16;

fn client_id(c: usize, seq: usize) -> String {
    format!("c{c}-{seq}")
}

fn client_key(c: usize, seq: usize) -> String {
    format!("c{c}-k{}", seq % KEYS_PER_CLIENT)
}

struct ClientRun {
    acks: Vec<Option<Ack>>,
    disconnects: usize,
    republished: usize,
}

/// One client: publishes its ids with up to WINDOW in flight; now and then drops its session with
/// everything in flight (a disconnect) and reconnects, retrying every unacknowledged id in order;
/// now and then publishes an acknowledged id again. Every answer for an id must be the same ack.
async fn client(
    c: usize,
    topic: String,
    mut current: tokio::sync::watch::Receiver<Option<Publisher>>,
    acked_total: Arc<AtomicUsize>,
) -> ClientRun {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut acks: Vec<Option<Ack>> = vec![None; PER_CLIENT];
    let (mut next, mut disconnects, mut republished) = (0usize, 0usize, 0usize);
    let until = Instant::now() + Duration::from_secs(240);
    while acks.iter().any(Option::is_none) {
        assert!(Instant::now() < until, "client {c} did not finish in time");
        let publisher = loop {
            if let Some(p) = current.borrow_and_update().clone() {
                break p;
            }
            current.changed().await.unwrap();
        };
        let session = publisher.session(PublishContext::default());
        drop(publisher);
        let mut queue: VecDeque<usize> = (0..next).filter(|&i| acks[i].is_none()).collect();
        let mut in_flight = FuturesUnordered::new();
        let mut refused = false;
        loop {
            while in_flight.len() < WINDOW {
                let seq = match queue.pop_front() {
                    Some(s) => s,
                    None if next < PER_CLIENT => {
                        next += 1;
                        next - 1
                    }
                    None => break,
                };
                let value = json!({"client": c, "seq": seq});
                let f = session.submit(req(&topic, &client_key(c, seq), value, &client_id(c, seq)));
                in_flight.push(async move { (seq, f.await) });
                if next > 0 && rng.one_in(50) {
                    let old = rng.below(next);
                    if acks[old].is_some() {
                        queue.push_back(old);
                        republished += 1;
                    }
                }
            }
            let Some((seq, reply)) = in_flight.next().await else {
                break;
            };
            match reply {
                Reply::Ack(a) => match &acks[seq] {
                    Some(first) => assert_eq!(
                        (first.partition, first.offset),
                        (a.partition, a.offset),
                        "client {c} seq {seq}: a retry got another ack"
                    ),
                    None => {
                        acks[seq] = Some(a);
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Reply::Nack(n) if n.code == NackCode::Unavailable => refused = true,
                Reply::Nack(n) => panic!("client {c} seq {seq}: {n:?}"),
            }
            if refused || rng.one_in(150) {
                disconnects += 1;
                break;
            }
        }
        drop(in_flight);
        drop(session);
        if refused {
            // back off a little before reconnecting (restarting, or the broker is slow)
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    ClientRun {
        acks,
        disconnects,
        republished,
    }
}

async fn wait_acked(acked: &AtomicUsize, n: usize) {
    eventually(
        &format!("{n} publishes acknowledged"),
        Duration::from_secs(120),
        || async { (acked.load(Ordering::Relaxed) >= n).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_disconnects_restarts_and_a_crash() {
    init_logs();
    let dir = tempdir();
    let topic = unique("once-");
    create_topic(&topic, 3).await;
    let toml = format!(
        "[publish]\nmax_in_flight = 32\n[[publish.topic]]\nname = \"{topic}\"\nrate_per_sec = 1000000\n"
    );
    let db_dir = dir.path().join("db");
    let m = Arc::new(Metrics::new());
    let db = open_db(&db_dir);
    let p = open(config(dir.path(), &toml), &brokers(), &db, &m).await;
    let (current_tx, current) = tokio::sync::watch::channel(Some(p));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, topic.clone(), current.clone(), acked.clone())))
        .collect();
    drop(current);

    // a restart (close: drains and records every outcome), then a crash (abort: records nothing
    // more, leaves ids pending), each over the same sled directory
    let mut db = Some(db);
    for (at, crash) in [(3000, false), (6000, true)] {
        wait_acked(&acked, at).await;
        let old = current_tx.send_replace(None).unwrap();
        if crash {
            old.abort().await;
        } else {
            old.close().await;
        }
        drop(old);
        drop(db.take());
        let d = db_dir.clone();
        let reopened = tokio::task::spawn_blocking(move || open_db(&d))
            .await
            .unwrap();
        let p = open(config(dir.path(), &toml), &brokers(), &reopened, &m).await;
        db = Some(reopened);
        current_tx.send_replace(Some(p));
        tracing::info!(at, crash, "publisher restarted");
    }

    let mut runs = Vec::new();
    for c in clients {
        runs.push(c.await.unwrap());
    }
    let p = current_tx.send_replace(None).unwrap();
    p.close().await;

    let records = read_to_end(&brokers(), &topic, 3, Duration::from_secs(60));
    let mut by_id: HashMap<String, Vec<&PositionedRecord>> = HashMap::new();
    for r in &records {
        let id = header(r, "livetable.publish_id").expect("every record has its id");
        by_id.entry(id.to_string()).or_default().push(r);
    }
    let repeated: Vec<_> = by_id.iter().filter(|(_, v)| v.len() > 1).take(5).collect();
    assert!(
        repeated.is_empty(),
        "ids written more than once: {repeated:?}"
    );
    assert_eq!(records.len(), CLIENTS * PER_CLIENT, "every id exactly once");
    let at: HashMap<(i32, i64), &PositionedRecord> = records
        .iter()
        .map(|r| ((r.partition, r.offset), r))
        .collect();
    for (c, run) in runs.iter().enumerate() {
        for (seq, a) in run.acks.iter().enumerate() {
            let a = a.as_ref().unwrap();
            let r = at
                .get(&(a.partition, a.offset))
                .unwrap_or_else(|| panic!("client {c} seq {seq}: nothing at {a:?}"));
            assert_eq!(
                header(r, "livetable.publish_id"),
                Some(format!("\"{}\"", client_id(c, seq)).as_str()),
                "the ack's position holds the record"
            );
            assert_eq!(r.key.as_deref(), Some(client_key(c, seq).as_str()));
        }
    }
    // per client and key, the records are in the order the client sent them
    let mut sorted: Vec<&PositionedRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for r in sorted {
        let v: Value = serde_json::from_str(r.value.as_deref().unwrap()).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        let key = r.key.clone().unwrap();
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "{key}: seq {seq} after {prev}");
        }
    }
    let disconnects: usize = runs.iter().map(|r| r.disconnects).sum();
    let republished: usize = runs.iter().map(|r| r.republished).sum();
    let dup = |result: &str| {
        metric(
            &m,
            &format!("livetable_publish_duplicates_total{{result=\"{result}\",topic=\"{topic}\"}}"),
        )
    };
    let scans = |result: &str| {
        metric(
            &m,
            &format!("livetable_publish_recovery_scans_total{{result=\"{result}\"}}"),
        )
    };
    println!(
        "disconnects {disconnects}, acked ids published again {republished}, duplicates: stored {} concurrent {} recovered {}, recovery scans: found {} not_found {} error {}",
        dup("stored"),
        dup("concurrent"),
        dup("recovered"),
        scans("found"),
        scans("not_found"),
        scans("error")
    );
    assert!(
        disconnects >= 20,
        "the run exercised disconnects: {disconnects}"
    );
    assert!(
        dup("stored") + dup("concurrent") + dup("recovered") >= republished as f64,
        "every acknowledged id published again was answered as a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_id_write_one_record() {
    init_logs();
    let dir = tempdir();
    let topic = unique("same-");
    create_topic(&topic, 2).await;
    let toml = format!("[[publish.topic]]\nname = \"{topic}\"\n");
    let db = open_db(&dir.path().join("db"));
    let m = Arc::new(Metrics::new());
    let p = open(config(dir.path(), &toml), &brokers(), &db, &m).await;
    let sessions: Vec<_> = (0..20)
        .map(|_| p.session(PublishContext::default()))
        .collect();
    let answers = futures::future::join_all(
        sessions
            .iter()
            .map(|s| s.submit(req(&topic, "k", json!({"bet": 1}), "same-id"))),
    )
    .await;
    let acks: Vec<Ack> = answers.into_iter().map(ack).collect();
    let first = &acks[0];
    assert!(acks
        .iter()
        .all(|a| (a.partition, a.offset) == (first.partition, first.offset)));
    assert_eq!(acks.iter().filter(|a| !a.duplicate).count(), 1, "{acks:?}");
    let records = read_to_end(&brokers(), &topic, 2, Duration::from_secs(20));
    assert_eq!(records.len(), 1, "{records:?}");
    let dups: f64 = ["stored", "concurrent"]
        .iter()
        .map(|r| {
            metric(
                &m,
                &format!("livetable_publish_duplicates_total{{result=\"{r}\",topic=\"{topic}\"}}"),
            )
        })
        .sum();
    assert_eq!(dups, 19.0);
    p.close().await;
}

/// What a crash leaves behind a publish that reached the broker: its record, with its id in a
/// header, written by a producer of the test (livetable never heard the acknowledgement).
async fn written_with_id(
    topic: &str,
    partition: i32,
    value: &Value,
    id_json: &str,
) -> rdkafka::producer::future_producer::Delivery {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let payload = serde_json::to_string(value).unwrap();
    let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
        .partition(partition)
        .key("k")
        .payload(payload.as_str())
        .headers(OwnedHeaders::new().insert(Header {
            key: "livetable.publish_id",
            value: Some(id_json),
        }));
    producer().send(rec, Duration::from_secs(10)).await.unwrap()
}

/// What a crash leaves in the id log: each (topic, id JSON) pending on `partition`, read from
/// the beginning.
fn stage_pending(db: &sled::Db, pending: &[(&str, &str)], hash: u64, partition: i32) {
    let (log, _) = IdLog::open(db.open_tree("publish").unwrap()).unwrap();
    let created_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let entry = Entry::Pending {
        created_ms,
        hash,
        partition,
        floor: -1,
    };
    let changes: Vec<_> = pending
        .iter()
        .map(|(topic, id)| (Scope::new(topic, None, id), Some(entry)))
        .collect();
    let mut batch = sled::Batch::default();
    log.stage(&mut batch, created_ms, &changes);
    log.apply(batch).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_crash_left_pending_are_settled_by_reading_the_partition() {
    init_logs();
    let dir = tempdir();
    let topic = unique("pending-");
    create_topic(&topic, 2).await;
    let db = open_db(&dir.path().join("db"));
    // what a crash leaves: x1 was written to its partition but never acknowledged to us, x2 was
    // recorded pending but never reached the broker
    let value = json!({"bet": 1});
    let hash = livetable::publish::store::content_hash(Some("k"), &value);
    let partition = livetable::publish::partition::for_key(b"k", 2);
    let written = written_with_id(&topic, partition, &value, "\"x1\"").await;
    stage_pending(
        &db,
        &[(topic.as_str(), "\"x1\""), (topic.as_str(), "\"x2\"")],
        hash,
        partition,
    );
    let toml = format!("[[publish.topic]]\nname = \"{topic}\"\n");
    let m = Arc::new(Metrics::new());
    let p = open(config(dir.path(), &toml), &brokers(), &db, &m).await;
    let s = p.session(PublishContext::default());
    let x1 = s
        .publish(req(&topic, "k", value.clone(), "x1"))
        .await
        .unwrap();
    assert_eq!(
        (x1.partition, x1.offset, x1.duplicate),
        (written.partition, written.offset, true)
    );
    let x2 = s
        .publish(req(&topic, "k", value.clone(), "x2"))
        .await
        .unwrap();
    assert!(!x2.duplicate);
    assert_eq!(x2.partition, partition);
    let x1_again = s
        .publish(req(&topic, "k", value.clone(), "x1"))
        .await
        .unwrap();
    assert_eq!((x1_again.offset, x1_again.duplicate), (x1.offset, true));
    let records = read_to_end(&brokers(), &topic, 2, Duration::from_secs(20));
    let ids: Vec<_> = records
        .iter()
        .filter_map(|r| header(r, "livetable.publish_id"))
        .collect();
    assert_eq!(ids, ["\"x1\"", "\"x2\""]);
    for (result, n) in [("found", 1.0), ("not_found", 1.0), ("error", 0.0)] {
        let v = metric(
            &m,
            &format!("livetable_publish_recovery_scans_total{{result=\"{result}\"}}"),
        );
        assert_eq!(v, n, "{result}");
    }
    p.close().await;
}

/// One id pending on two topics after a crash, written to one of them only: each is settled by
/// reading its own topic (the one written is a duplicate, the other is written now), also when
/// both are retried together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_pending_on_two_topics_is_settled_per_topic() {
    init_logs();
    let dir = tempdir();
    let (written_to, never) = (unique("pending-a-"), unique("pending-b-"));
    create_topic(&written_to, 1).await;
    create_topic(&never, 1).await;
    let db = open_db(&dir.path().join("db"));
    let value = json!({"order": 17});
    let hash = livetable::publish::store::content_hash(Some("k"), &value);
    let written = written_with_id(&written_to, 0, &value, "\"o-17\"").await;
    stage_pending(
        &db,
        &[
            (written_to.as_str(), "\"o-17\""),
            (never.as_str(), "\"o-17\""),
        ],
        hash,
        0,
    );
    let toml = format!(
        "[[publish.topic]]\nname = \"{written_to}\"\n[[publish.topic]]\nname = \"{never}\"\n"
    );
    let m = Arc::new(Metrics::new());
    let p = open(config(dir.path(), &toml), &brokers(), &db, &m).await;
    let s = p.session(PublishContext::default());
    // retried together: one batch of the writer, one read-back per topic
    let (a, b) = tokio::join!(
        s.publish(req(&written_to, "k", value.clone(), "o-17")),
        s.publish(req(&never, "k", value.clone(), "o-17")),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.offset, a.duplicate), (written.offset, true));
    assert!(
        !b.duplicate,
        "never written to its own topic: written now, {b:?}"
    );
    let records = read_to_end(&brokers(), &never, 1, Duration::from_secs(20));
    assert_eq!(
        records.len(),
        1,
        "the record is in the topic it was published to"
    );
    assert_eq!(
        header(&records[0], "livetable.publish_id"),
        Some("\"o-17\"")
    );
    p.close().await;
}

/// Publishes, retrying the same id while the answer is `unavailable` (as a client does).
async fn publish_retrying(s: &livetable::publish::Session, r: PublishRequest) -> Ack {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match s.submit(r.clone()).await {
            Reply::Ack(a) => return a,
            Reply::Nack(n) if n.code == NackCode::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Reply::Nack(n) => panic!("{r:?}: {n:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_expire_after_the_window_and_the_store_stays_bounded() {
    init_logs();
    let dir = tempdir();
    let topic = unique("expiry-");
    create_topic(&topic, 1).await;
    let toml = format!(
        "[publish]\nack_timeout_ms = 2000\ndedup_window_secs = 2\ndedup_max_entries = 5\n\
         [[publish.topic]]\nname = \"{topic}\"\nrate_per_sec = 1000\n"
    );
    let db = open_db(&dir.path().join("db"));
    let m = Arc::new(Metrics::new());
    let p = open(config(dir.path(), &toml), &brokers(), &db, &m).await;
    let s = p.session(PublishContext::default());
    let first = publish_retrying(&s, req(&topic, "k", json!({"n": 1}), "e1")).await;
    let again = publish_retrying(&s, req(&topic, "k", json!({"n": 1}), "e1")).await;
    assert_eq!((again.offset, again.duplicate), (first.offset, true));
    eventually(
        "e1 forgotten after the window",
        Duration::from_secs(10),
        || async { (metric(&m, "livetable_publish_ids ") == 0.0).then_some(()) },
    )
    .await;
    let later = publish_retrying(&s, req(&topic, "k", json!({"n": 1}), "e1")).await;
    assert!(!later.duplicate && later.offset > first.offset, "{later:?}");
    // the cap: 20 ids in well under the window, at most 5 remembered after a sweep
    for i in 0..20 {
        publish_retrying(&s, req(&topic, "k", json!({"n": i}), &format!("f{i}"))).await;
    }
    eventually(
        "the store back under its cap",
        Duration::from_secs(10),
        || async { (metric(&m, "livetable_publish_ids ") <= 5.0).then_some(()) },
    )
    .await;
    p.close().await;
}

/// Publishes fresh ids until one is acknowledged.
async fn publish_until_acked(
    s: &livetable::publish::Session,
    topic: &str,
    probes: &AtomicUsize,
    what: &str,
) -> Ack {
    eventually(what, Duration::from_secs(60), || {
        let n = probes.fetch_add(1, Ordering::Relaxed);
        let f = s.submit(req(topic, "k", json!({"probe": n}), &format!("probe-{n}")));
        async move {
            match f.await {
                Reply::Ack(a) => Some(a),
                Reply::Nack(_) => None,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_nacked_within_the_timeout_and_publishing_resumes() {
    init_logs();
    let dir = tempdir();
    let addr = format!("127.0.0.1:{}", free_port());
    let broker = OwnBroker::start(&addr);
    let topic = unique("outage-");
    // `partitions`: the publisher creates the topic, and creates it again when the broker comes
    // back without it (this broker keeps its data in memory)
    let toml = format!(
        "[publish]\nack_timeout_ms = 2000\nmax_in_flight = 50\nmax_in_flight_total = 100\n\
         [[publish.topic]]\nname = \"{topic}\"\nrate_per_sec = 100000\npartitions = 2\n"
    );
    let db = open_db(&dir.path().join("db"));
    let m = Arc::new(Metrics::new());
    let p = open(config(dir.path(), &toml), &addr, &db, &m).await;
    let s = p.session(PublishContext::default());
    let probes = AtomicUsize::new(0);
    publish_until_acked(&s, &topic, &probes, "the topic created and writable").await;
    for i in 0..20 {
        s.publish(req(
            &topic,
            "k",
            json!({"before": i}),
            &format!("before-{i}"),
        ))
        .await
        .unwrap();
    }

    broker.stop();
    let rss_before = rss_bytes();
    // 4 connections x 100 publishes, each answered within the ack timeout (+ slack)
    let sessions: Vec<_> = (0..4)
        .map(|_| p.session(PublishContext::default()))
        .collect();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut max_in_flight = 0f64;
    let mut immediate = 0;
    for round in 0..100 {
        for (c, s) in sessions.iter().enumerate() {
            let id = format!("down-{c}-{round}");
            let at = Instant::now();
            let f = s.submit(req(
                &topic,
                &format!("k{c}"),
                json!({"c": c, "round": round}),
                &id,
            ));
            pending.push(async move { (id, at, f.await, at.elapsed()) });
        }
        max_in_flight = max_in_flight.max(metric(&m, "livetable_publish_in_flight "));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut down_ids = Vec::new();
    while let Some((id, _at, reply, took)) = pending.next().await {
        let (code, msg) = match reply {
            Reply::Nack(n) => (n.code, n.message),
            Reply::Ack(a) => panic!("{id} acknowledged while the broker is down: {a:?}"),
        };
        assert!(
            matches!(code, NackCode::Unavailable | NackCode::TooManyInFlight),
            "{id}: {code:?} {msg}"
        );
        assert!(
            took <= Duration::from_millis(2500),
            "{id} answered after {took:?}: {msg}"
        );
        if took < Duration::from_millis(100) {
            immediate += 1;
        }
        down_ids.push(id);
    }
    let rss_after = rss_bytes();
    println!(
        "outage: 400 publishes answered in {:?}, {immediate} at once (bounds full), max in flight {max_in_flight}, rss {} -> {} MiB",
        started.elapsed(),
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(max_in_flight <= 100.0, "in flight {max_in_flight}");
    assert!(
        immediate > 0,
        "beyond the bounds publishes are refused at once"
    );
    assert!(
        rss_after < rss_before + (64 << 20),
        "memory grew from {rss_before} to {rss_after}"
    );

    // the broker comes back empty: the topic is created again and publishing resumes
    broker.restart();
    let resumed = Instant::now();
    publish_until_acked(
        &s,
        &topic,
        &probes,
        "publishing resumed after the broker returned",
    )
    .await;
    println!("resumed {:?} after the broker restarted", resumed.elapsed());
    // the ids refused during the outage, retried: each written once
    let mut retried = FuturesUnordered::new();
    for id in &down_ids {
        let (c, round): (usize, usize) = {
            let mut it = id.trim_start_matches("down-").split('-');
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            )
        };
        let s = &sessions[c];
        let id = id.clone();
        let topic = topic.clone();
        retried.push(async move {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(
                    Instant::now() < until,
                    "{id} not acknowledged after the outage"
                );
                let reply = s
                    .submit(req(
                        &topic,
                        &format!("k{c}"),
                        json!({"c": c, "round": round}),
                        &id,
                    ))
                    .await;
                match reply {
                    Reply::Ack(a) => return a,
                    // the bounds are full while the others are in flight: back off, retry
                    Reply::Nack(n)
                        if matches!(n.code, NackCode::TooManyInFlight | NackCode::Unavailable) =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Reply::Nack(n) => panic!("{id}: {n:?}"),
                }
            }
        });
    }
    let mut n_retried = 0;
    while retried.next().await.is_some() {
        n_retried += 1;
    }
    assert_eq!(n_retried, 400);
    let records = read_to_end(&addr, &topic, 2, Duration::from_secs(30));
    let down: Vec<_> = records
        .iter()
        .filter_map(|r| header(r, "livetable.publish_id"))
        .filter(|id| id.starts_with("\"down-"))
        .collect();
    let distinct: HashSet<_> = down.iter().collect();
    assert_eq!((down.len(), distinct.len()), (400, 400));
    p.close().await;
}
