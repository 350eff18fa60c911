//! A hostile CDC corpus against the real service and broker (issue 13, "Hostile input, in CI").
//!
//! The test generates (deterministically) more than 10,000 malformed records — truncated JSON,
//! wrong types, deep nesting, invalid UTF-8 in keys and values, unknown ops, absurd decimal scales
//! and lengths, oversize values, huge keys, bad table names — interleaved with 4,000 good changes
//! (full envelopes with and without schemas, unwrapped rows, tombstones) over 200 keys, produced
//! to a 3-partition topic (each good key always to the same partition, so its order holds; the
//! bad records anywhere). Then:
//! - the service stays up (`/healthz` 200, it shuts down cleanly at the end);
//! - the table on the HTTP API equals the oracle folded by the test from the good changes;
//! - every malformed record is in the dead-letter topic, once, with the reason the test expects
//!   (matched by its partition and offset), and nothing else is;
//! - the process's peak RSS stays under a bound (one poison pill alone used to take > 10 GB).
//!
//! Accepted harmlessly, and why:
//! - keys with `/`, `..`, `%`, NUL, raw non-JSON text: a row key is an opaque string; these rows
//!   are stored and served exactly like any other (they are part of the oracle);
//! - heartbeats and transaction markers: not row changes, skipped and counted;
//! - tombstones of keys that never existed: deleting nothing changes nothing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use livetable::config::TopicSelection;
use rdkafka::producer::FutureRecord;
use serde_json::{json, Map, Value};

/// Records larger than this are dead-lettered as `oversized`; small enough that the truncated dead
/// letter fits librdkafka's default `message.max.bytes`.
const MAX_RECORD_BYTES: usize = 256 * 1024;
const KEYS: usize = 200;
const GOOD_CHANGES: usize = 4000;
const PARTITIONS: i32 = 3;
/// The process's peak RSS (VmHWM) must stay under this: about twice what a run takes here
/// (~340 MiB in a debug build, most of it the clients' queues and the corpus itself).
const RSS_LIMIT_BYTES: u64 = 768 << 20;

/// xorshift64*: a deterministic corpus without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// A good change (or a harmless odd-key row): in the oracle.
    Good,
    /// Accepted harmlessly (skipped, or a delete of nothing).
    Harmless,
    /// Dead-lettered with this reason.
    Dead(&'static str),
}

struct Rec {
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    expect: Expect,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `unscaled` with `scale` digits after the point, as the decoder prints it.
fn decimal_text(unscaled: i64, scale: u32) -> String {
    let sign = if unscaled < 0 { "-" } else { "" };
    let m = unscaled.unsigned_abs();
    if scale == 0 {
        return format!("{sign}{m}");
    }
    let p = 10u64.pow(scale);
    format!("{sign}{}.{:0width$}", m / p, m % p, width = scale as usize)
}

/// One good row of table `items`, in its three wire forms and as the decoder must produce it.
struct GoodRow {
    id: String,
    price: i64,
    odds: (i64, u32),
    qty: i64,
    note: String,
}

impl GoodRow {
    fn random(id: &str, rng: &mut Rng) -> GoodRow {
        let notes = [
            "",
            "plain",
            "naïve ✓",
            "quote \" and \\ slash",
            "tab\tnew\nline",
            "nul \u{0} inside",
            "emoji 🎲",
        ];
        GoodRow {
            id: id.to_string(),
            price: rng.below(2_000_000) as i64 - 1_000_000,
            odds: (rng.below(100_000) as i64 - 50_000, rng.below(6) as u32),
            qty: rng.below(1000) as i64,
            note: rng.pick(&notes).to_string(),
        }
    }

    /// What the HTTP API must serve.
    fn expected(&self) -> Value {
        json!({"id": self.id, "price": decimal_text(self.price, 3),
               "odds": decimal_text(self.odds.0, self.odds.1), "qty": self.qty, "note": self.note})
    }

    /// Debezium's form: price as a string (decimal.handling.mode=string) or as Decimal bytes
    /// (with a schema), odds as a VariableScaleDecimal.
    fn wire(&self, decimal_bytes: bool) -> Value {
        let price = if decimal_bytes {
            json!(b64(
                &num_bigint::BigInt::from(self.price).to_signed_bytes_be()
            ))
        } else {
            json!(decimal_text(self.price, 3))
        };
        let odds = json!({"scale": self.odds.1,
                          "value": b64(&num_bigint::BigInt::from(self.odds.0).to_signed_bytes_be())});
        json!({"id": self.id, "price": price, "odds": odds, "qty": self.qty, "note": self.note})
    }
}

fn row_fields() -> Value {
    json!([
        {"type":"string","optional":false,"field":"id"},
        {"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,
         "parameters":{"scale":"3","connect.decimal.precision":"12"},"field":"price"},
        {"type":"struct","optional":true,"name":"io.debezium.data.VariableScaleDecimal","version":1,
         "fields":[{"type":"int32","optional":false,"field":"scale"},{"type":"bytes","optional":false,"field":"value"}],"field":"odds"},
        {"type":"int64","optional":true,"field":"qty"},
        {"type":"string","optional":true,"field":"note"}
    ])
}

fn envelope_schema(fields: Value) -> Value {
    json!({"type":"struct","name":"hostile.public.items.Envelope","optional":false,"fields":[
        {"type":"struct","optional":true,"name":"hostile.public.items.Value","field":"before","fields":fields},
        {"type":"struct","optional":true,"name":"hostile.public.items.Value","field":"after","fields":fields},
        {"type":"struct","optional":false,"name":"io.debezium.connector.postgresql.Source","field":"source",
         "fields":[{"type":"string","optional":false,"field":"table"}]},
        {"type":"string","optional":false,"field":"op"}]})
}

fn source(ts: u64) -> Value {
    json!({"version":"3.6.3.Final","connector":"postgresql","name":"hostile","ts_ms":ts,
           "db":"shop","schema":"public","table":"items"})
}

/// A full envelope, with a schema or not.
fn envelope(op: &str, before: Value, after: Value, with_schema: bool, ts: u64) -> Value {
    let payload =
        json!({"before": before, "after": after, "source": source(ts), "op": op, "ts_ms": ts});
    if with_schema {
        json!({"schema": envelope_schema(row_fields()), "payload": payload})
    } else {
        payload
    }
}

fn message_key(id: &str) -> Vec<u8> {
    json!({ "id": id }).to_string().into_bytes()
}

/// FNV-1a: a good key always goes to the same partition.
fn partition_of(key: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    (h % PARTITIONS as u64) as i32
}

/// The good changes over `KEYS` keys, and the final table they fold to.
fn good_changes(rng: &mut Rng) -> (Vec<Rec>, BTreeMap<String, Value>) {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    let mut out = Vec::new();
    for n in 0..GOOD_CHANGES {
        let id = format!("k{}", rng.below(KEYS));
        let ts = 1_800_000_000_000 + n as u64;
        let exists = rows.contains_key(&id);
        let key = message_key(&id);
        let form = rng.below(3);
        let value = if exists && rng.chance(25) {
            rows.remove(&id);
            match form {
                0 => Some(envelope(
                    "d",
                    GoodRow::random(&id, rng).wire(false),
                    Value::Null,
                    false,
                    ts,
                )),
                1 => Some(envelope(
                    "d",
                    GoodRow::random(&id, rng).wire(true),
                    Value::Null,
                    true,
                    ts,
                )),
                _ => None, // a tombstone
            }
        } else {
            let row = GoodRow::random(&id, rng);
            rows.insert(id.clone(), row.expected());
            let op = if exists { "u" } else { *rng.pick(&["c", "r"]) };
            match form {
                0 => Some(envelope(op, Value::Null, row.wire(false), false, ts)),
                1 => Some(envelope(op, Value::Null, row.wire(true), true, ts)),
                _ => {
                    let mut v = row.wire(false);
                    v["__op"] = json!(op);
                    v["__table"] = json!("items");
                    v["__deleted"] = json!("false");
                    v["__source_ts_ms"] = json!(ts);
                    Some(v)
                }
            }
        };
        out.push(Rec {
            partition: partition_of(&id),
            key: Some(key),
            value: value.map(|v| v.to_string().into_bytes()),
            expect: Expect::Good,
        });
    }
    (out, rows)
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// A valid create of a throwaway key (never in the oracle unless accepted).
fn create(id: &str, rng: &mut Rng, with_schema: bool) -> Value {
    envelope(
        "c",
        Value::Null,
        GoodRow::random(id, rng).wire(with_schema),
        with_schema,
        1,
    )
}

/// The malformed records, by category, and the harmless ones (odd keys join `oracle`).
fn hostile_records(rng: &mut Rng, oracle: &mut BTreeMap<String, Value>) -> Vec<Rec> {
    let mut out = Vec::new();
    let push = |out: &mut Vec<Rec>,
                rng: &mut Rng,
                key: Option<Vec<u8>>,
                value: Option<Vec<u8>>,
                expect: Expect| {
        out.push(Rec {
            partition: rng.below(PARTITIONS as usize) as i32,
            key,
            value,
            expect,
        });
    };
    let bad_key = |n: usize| Some(message_key(&format!("bad{n}")));
    let s = |v: Value| Some(v.to_string().into_bytes());
    // truncated JSON: a valid envelope cut short (never empty: an empty value reads as a tombstone)
    for n in 0..2300 {
        let v = create(&format!("bad{n}"), rng, n % 2 == 0)
            .to_string()
            .into_bytes();
        let cut = 1 + rng.below(v.len() - 1);
        push(
            &mut out,
            rng,
            bad_key(n),
            Some(v[..cut].to_vec()),
            Expect::Dead("invalid_json"),
        );
    }
    // garbage, and invalid UTF-8 inside a string value
    for n in 0..500 {
        // `{` then a control character: never valid JSON, whatever follows
        let len = 3 + rng.below(200);
        let mut g: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        g[0] = b'{';
        g[1] = 0x01;
        push(
            &mut out,
            rng,
            bad_key(n),
            Some(g),
            Expect::Dead("invalid_json"),
        );
    }
    for n in 0..800 {
        let v = create(&format!("bad{n}"), rng, false).to_string();
        let at = v.find("\"note\":\"").unwrap() + 8;
        let mut bytes = v.into_bytes();
        bytes.splice(at..at, [0xff, 0xfe, 0xc3]);
        push(
            &mut out,
            rng,
            bad_key(n),
            Some(bytes),
            Expect::Dead("invalid_json"),
        );
    }
    // not an object
    for n in 0..400 {
        let v = rng
            .pick(&["[1,2]", "\"items\"", "42", "true", "[]", "null null"])
            .as_bytes()
            .to_vec();
        let expect = if v == b"null null" {
            "invalid_json"
        } else {
            "not_an_object"
        };
        push(&mut out, rng, bad_key(n), Some(v), Expect::Dead(expect));
    }
    // wrong types for the row side, __deleted, or a row of metadata only
    for n in 0..1200 {
        let id = format!("bad{n}");
        let v = match n % 4 {
            0 => envelope(
                "c",
                Value::Null,
                json!(rng.pick(&["x", "1"]).to_string()),
                rng.chance(50),
                1,
            ),
            1 => envelope("d", json!(5), Value::Null, false, 1),
            2 => json!({"id": id, "__op": "u", "__table": "items", "__deleted": "maybe"}),
            _ => json!({"__op": "c", "__table": "items", "__source_ts_ms": 1}),
        };
        push(&mut out, rng, bad_key(n), s(v), Expect::Dead("bad_shape"));
    }
    // unknown ops, a string or not, in envelopes and rows
    for n in 0..1200 {
        let id = format!("bad{n}");
        let op = rng
            .pick(&[
                json!(42),
                json!("x"),
                json!(""),
                json!("create"),
                json!(null),
                json!(["c"]),
            ])
            .clone();
        let v = if n % 3 == 0 {
            json!({"id": id, "__op": op, "__table": "items"})
        } else {
            let mut e = create(&id, rng, n % 3 == 1);
            let p = if e.get("payload").is_some() {
                &mut e["payload"]
            } else {
                &mut e
            };
            p["op"] = op;
            e
        };
        push(&mut out, rng, bad_key(n), s(v), Expect::Dead("unknown_op"));
    }
    // deep nesting in a column (the bound is 64 levels for the whole record)
    for n in 0..600 {
        let depth = 64 + rng.below(if n % 10 == 0 { 20_000 } else { 200 });
        let v = format!(
            r#"{{"before":null,"after":{{"id":"bad{n}","deep":{}}},"source":{{"table":"items"}},"op":"c"}}"#,
            nested(depth)
        );
        push(
            &mut out,
            rng,
            bad_key(n),
            Some(v.into_bytes()),
            Expect::Dead("too_deep"),
        );
    }
    // no usable key: invalid UTF-8 (not JSON either), none, empty, {} or a null field
    for n in 0..1500 {
        let key: Option<Vec<u8>> = match n % 5 {
            0 => Some(vec![0xff, 0xfe, b'k', (n % 200) as u8 | 0x80]),
            1 => None,
            2 => Some(b"\"\"".to_vec()),
            3 => Some(b"{}".to_vec()),
            _ => Some(br#"{"id":null}"#.to_vec()),
        };
        let v = create(&format!("bad{n}"), rng, n % 2 == 0);
        push(&mut out, rng, key, s(v), Expect::Dead("no_key"));
    }
    // huge keys: 16 KiB + up to 24 KiB
    for n in 0..300 {
        let id = "K".repeat(16 * 1024 + 1 + rng.below(24 * 1024));
        let v = create(&format!("bad{n}"), rng, false);
        push(
            &mut out,
            rng,
            Some(message_key(&id)),
            s(v),
            Expect::Dead("key_too_long"),
        );
    }
    // absurd decimal scales (the poison pill of issue 13) and lengths
    for n in 0..800 {
        let id = format!("bad{n}");
        let v = match n % 4 {
            0 | 1 => {
                let scale = *rng.pick(&[
                    "2147483647",
                    "-2147483648",
                    "16384",
                    "-131073",
                    "99999999999",
                ]);
                let mut fields = row_fields();
                fields[1]["parameters"]["scale"] = json!(scale);
                let row = GoodRow::random(&id, rng).wire(true);
                json!({"schema": envelope_schema(fields),
                       "payload": {"before": null, "after": row, "source": source(1), "op": "c"}})
            }
            2 => {
                let mut row = GoodRow::random(&id, rng).wire(false);
                row["odds"]["scale"] =
                    json!(rng.pick(&[i64::from(i32::MAX), i64::from(i32::MIN), 1 << 40]));
                envelope("c", Value::Null, row, false, 1)
            }
            _ => {
                let mut row = GoodRow::random(&id, rng).wire(false);
                row["odds"]["scale"] = json!(-2_147_483_648i64);
                row["__op"] = json!("c");
                row["__table"] = json!("items");
                row
            }
        };
        push(
            &mut out,
            rng,
            bad_key(n),
            s(v),
            Expect::Dead("decimal_out_of_range"),
        );
    }
    for n in 0..30 {
        let mut row = GoodRow::random(&format!("bad{n}"), rng).wire(false);
        row["odds"]["value"] = json!(b64(&vec![0x11; 61_231 + rng.below(1000)]));
        push(
            &mut out,
            rng,
            bad_key(n),
            s(envelope("c", Value::Null, row, false, 1)),
            Expect::Dead("decimal_out_of_range"),
        );
    }
    // decimals that would expand a small record a thousandfold
    for n in 0..20 {
        let mut row = Map::new();
        row.insert("id".into(), json!(format!("bad{n}")));
        for c in 0..5000 {
            row.insert(format!("c{c}"), json!({"scale": 16383, "value": "AQ=="}));
        }
        push(
            &mut out,
            rng,
            bad_key(n),
            s(envelope("c", Value::Null, Value::Object(row), false, 1)),
            Expect::Dead("decimals_too_large"),
        );
    }
    // oversize values
    for n in 0..20 {
        let mut row = GoodRow::random(&format!("bad{n}"), rng).wire(false);
        row["note"] = json!("x".repeat(MAX_RECORD_BYTES + rng.below(64 * 1024)));
        push(
            &mut out,
            rng,
            bad_key(n),
            s(envelope("c", Value::Null, row, false, 1)),
            Expect::Dead("oversized"),
        );
    }
    // bad table names
    for n in 0..400 {
        let id = format!("bad{n}");
        let v = if n % 2 == 0 {
            let mut row = GoodRow::random(&id, rng).wire(false);
            row["__table"] = json!(rng.pick(&["it\u{0}ems", "items\n", "\u{7f}"]).to_string());
            row
        } else {
            let mut e = create(&id, rng, false);
            e["source"]["table"] = json!("t".repeat(256 + rng.below(10_000)));
            e
        };
        push(&mut out, rng, bad_key(n), s(v), Expect::Dead("bad_name"));
    }
    // harmless: odd keys are rows like any other (in the oracle)
    let odd = [
        "a/b", "../..", "..", "%2F%00", "50%", "k\u{0}x", "sp ace", "é/ü", "%", "/",
    ];
    for n in 0..300 {
        let id = format!("{}#{n}", odd[n % odd.len()]);
        let row = GoodRow::random(&id, rng);
        let key = if n % 3 == 0 {
            // a raw key that is not JSON: used as a string
            id.clone().into_bytes()
        } else {
            message_key(&id)
        };
        oracle.insert(id.clone(), row.expected());
        push(
            &mut out,
            rng,
            Some(key),
            s(envelope("c", Value::Null, row.wire(false), false, 1)),
            Expect::Good,
        );
    }
    // harmless: heartbeats, transaction markers, tombstones of keys that never existed
    for n in 0..300 {
        let (key, value) = match n % 3 {
            0 => (
                Some(br#"{"serverName":"hostile"}"#.to_vec()),
                s(json!({"ts_ms": n})),
            ),
            1 => (
                None,
                s(
                    json!({"status":"END","id":format!("{n}:1"),"ts_ms":1,"event_count":1,
                                  "data_collections":[{"data_collection":"public.items","event_count":1}]}),
                ),
            ),
            _ => (Some(message_key(&format!("ghost{n}"))), None),
        };
        push(&mut out, rng, key, value, Expect::Harmless);
    }
    out
}

/// Shuffles `bad` (the categories mix) and interleaves it into `good` at random points, keeping
/// the order of the good changes.
fn interleave(good: Vec<Rec>, mut bad: Vec<Rec>, rng: &mut Rng) -> Vec<Rec> {
    for i in (1..bad.len()).rev() {
        let j = rng.below(i + 1);
        bad.swap(i, j);
    }
    let total = good.len() + bad.len();
    let (mut g, mut b) = (good.into_iter().peekable(), bad.into_iter().peekable());
    let mut out = Vec::with_capacity(total);
    while g.peek().is_some() || b.peek().is_some() {
        let take_bad =
            b.peek().is_some() && (g.peek().is_none() || rng.below(total) < total * 3 / 4);
        out.push(if take_bad {
            b.next().unwrap()
        } else {
            g.next().unwrap()
        });
    }
    out
}

fn vm_hwm_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The sum of `livetable_records_consumed_total` for `topic`, over every outcome.
fn consumed(metrics: &str, topic: &str) -> u64 {
    let needle = format!("topic=\"{topic}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("livetable_records_consumed_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cdc_corpus() {
    let started = Instant::now();
    let u = unique("hostile");
    let topic = format!("{u}.public.items");
    create_topic(&topic, PARTITIONS).await;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (good, mut oracle) = good_changes(&mut rng);
    let bad = hostile_records(&mut rng, &mut oracle);
    let malformed = bad
        .iter()
        .filter(|r| matches!(r.expect, Expect::Dead(_)))
        .count();
    assert!(malformed >= 10_000, "{malformed} malformed records");
    let records = interleave(good, bad, &mut rng);

    // produce, remembering where each record landed
    let producer = producer();
    let mut pending = Vec::with_capacity(records.len());
    for r in &records {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v.as_slice());
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((_, back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    let mut expected_dead: HashMap<(i32, i64), &'static str> = HashMap::new();
    for (f, r) in pending.into_iter().zip(&records) {
        let d = f.await.unwrap().unwrap();
        let (partition, offset) = (d.partition, d.offset);
        if let Expect::Dead(reason) = r.expect {
            expected_dead.insert((partition, offset), reason);
        }
    }
    eprintln!(
        "produced {} records ({} malformed) in {:?}",
        records.len(),
        malformed,
        started.elapsed()
    );

    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.max_record_bytes = MAX_RECORD_BYTES;
    let dlq = c.dlq_topic.clone();
    let rss_before = vm_hwm_bytes();
    let (svc, base) = start_service(c).await;

    let total = records.len() as u64;
    eventually("every record consumed", Duration::from_secs(60), || {
        let base = base.clone();
        let topic = topic.clone();
        async move { (consumed(&metrics_text(&base).await, &topic) >= total).then_some(()) }
    })
    .await;
    eprintln!("consumed in {:?}", started.elapsed());

    // the service is up and the good rows are exact
    let (status, _) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200, "the service stays healthy");
    let (status, body) = get_json(&format!("{base}/api/tables/items")).await;
    assert_eq!(status, 200);
    let rows = body["rows"].as_object().unwrap();
    let want: Map<String, Value> = oracle.into_iter().collect();
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !rows.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = rows
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, v) in &want {
        assert_eq!(&rows[k], v, "row {k:?}");
    }
    let (_, tables) = get_json(&format!("{base}/api/tables")).await;
    assert_eq!(
        tables["tables"].as_array().unwrap().len(),
        1,
        "no other table appeared: {tables}"
    );

    // every malformed record is dead-lettered once, with its reason; nothing else is
    let want_letters = expected_dead.len();
    let letters = tokio::task::spawn_blocking(move || {
        read_topic(&dlq, want_letters, Duration::from_secs(40))
    })
    .await
    .unwrap();
    let header = |h: &[(String, String)], k: &str| {
        h.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let mut seen: HashMap<(i32, i64), String> = HashMap::new();
    for (_, _, h) in &letters {
        assert_eq!(header(h, "livetable.dlq.topic"), topic);
        let at = (
            header(h, "livetable.dlq.partition").parse().unwrap(),
            header(h, "livetable.dlq.offset").parse().unwrap(),
        );
        let reason = header(h, "livetable.dlq.reason");
        assert!(
            seen.insert(at, reason).is_none(),
            "{at:?} dead-lettered twice"
        );
    }
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for (at, want) in &expected_dead {
        let got = seen
            .get(at)
            .unwrap_or_else(|| panic!("{at:?} ({want}) is not in the dead-letter topic"));
        assert_eq!(got, want, "reason of {at:?}");
        *by_reason.entry(want).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        expected_dead.len(),
        "only malformed records are dead-lettered"
    );
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains(&format!(
            "livetable_dead_lettered_total {}",
            expected_dead.len()
        )),
        "dead-letter count"
    );

    let rss_after = vm_hwm_bytes();
    eprintln!(
        "dead letters by reason: {by_reason:?}; peak RSS {} MiB before the service, {} MiB after; {:?} in all",
        rss_before >> 20,
        rss_after >> 20,
        started.elapsed()
    );
    assert!(
        rss_after < RSS_LIMIT_BYTES,
        "peak RSS {} MiB",
        rss_after >> 20
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}
