//! The decoder against the real Debezium captures in `tests/fixtures/debezium/`.
//! Expectations are written by hand from the captured workload (`db/workload-pg.sql`): 3 snapshot
//! rows, an insert, updates (one in a 2-row transaction), a delete (+ tombstone), an insert with a
//! NULL and a 6-decimal value, an update of it, and a primary-key change g4 -> g6.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use num_bigint::BigInt;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

pub(super) struct FixtureRecord {
    topic: String,
    key: Option<String>,
    value: Option<String>,
}

pub(crate) fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

pub(super) fn load(name: &str) -> Vec<FixtureRecord> {
    let text = std::fs::read_to_string(fixtures_dir().join(name)).unwrap();
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            FixtureRecord {
                topic: v["topic"].as_str().unwrap().to_string(),
                key: v["key"].as_str().map(String::from),
                value: v["value"].as_str().map(String::from),
            }
        })
        .collect()
}

fn settings() -> DecodeSettings {
    DecodeSettings {
        key_columns: KeyColumns::default(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    }
}

pub(super) fn decode_all(name: &str) -> Vec<DecodeOutput> {
    load(name)
        .iter()
        .map(|r| {
            let rec = RawRecord {
                topic: &r.topic,
                key: r.key.as_deref().map(str::as_bytes),
                value: r.value.as_deref().map(str::as_bytes),
                timestamp_ms: None,
            };
            decode(&rec, &settings()).unwrap_or_else(|e| panic!("{name}: {e}"))
        })
        .collect()
}

fn changes(outputs: &[DecodeOutput]) -> Vec<Change> {
    outputs
        .iter()
        .map(|o| match &o.decoded {
            Decoded::Change(c) => c.clone(),
            Decoded::Skip(r) => panic!("unexpected skip {r:?}"),
        })
        .collect()
}

/// (op, key) of each record, in order.
fn ops_keys(changes: &[Change]) -> Vec<(&'static str, String)> {
    changes
        .iter()
        .map(|c| (c.op.as_str(), c.key.clone()))
        .collect()
}

fn seq(list: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    list.iter().map(|(o, k)| (*o, k.to_string())).collect()
}

/// Folds changes into the final table, as the store will.
fn fold(changes: &[Change]) -> BTreeMap<String, Value> {
    let mut table = BTreeMap::new();
    for c in changes {
        match &c.row {
            Some(row) => {
                table.insert(c.key.clone(), Value::Object(row.clone()));
            }
            None => {
                table.remove(&c.key);
            }
        }
    }
    table
}

/// Base64 of an unscaled decimal, as Kafka Connect writes `Decimal` bytes.
fn b64(unscaled: i64) -> String {
    base64::engine::general_purpose::STANDARD.encode(BigInt::from(unscaled).to_signed_bytes_be())
}

const ENVELOPE_ORDER: &[(&str, &str)] = &[
    ("r", "g1"),
    ("r", "g2"),
    ("r", "g3"),
    ("c", "g4"),
    ("u", "g1"),
    ("u", "g2"),
    ("u", "g4"),
    ("d", "g3"),
    ("d", "g3"),
    ("c", "g5"),
    ("u", "g5"),
    ("d", "g4"),
    ("d", "g4"),
    ("c", "g6"),
];

/// The final table with odds as exact decimal strings (NUMERIC(10,3); odd5 unconstrained).
fn final_exact(odd5_g6: &str) -> BTreeMap<String, Value> {
    let row = |id: &str, o: [Value; 5], ts: &str| json!({"game_id": id, "odd1": o[0], "odd2": o[1], "odd3": o[2], "odd4": o[3], "odd5": o[4], "updated_at": ts});
    BTreeMap::from([
        (
            "g1".into(),
            row(
                "g1",
                [
                    json!("1.750"),
                    json!("2.250"),
                    json!("3.125"),
                    json!("4.000"),
                    json!("5.5"),
                ],
                "2026-11-21T22:35:56.913545Z",
            ),
        ),
        (
            "g2".into(),
            row(
                "g2",
                [
                    json!("1.100"),
                    json!("1.300"),
                    json!("1.300"),
                    json!("1.400"),
                    json!("1.5"),
                ],
                "2026-11-21T22:35:56.913870Z",
            ),
        ),
        (
            "g5".into(),
            row(
                "g5",
                [
                    Value::Null,
                    json!("1.000"),
                    json!("1.000"),
                    json!("1.000"),
                    json!("-0.5"),
                ],
                "2026-11-21T22:35:56.914217Z",
            ),
        ),
        (
            "g6".into(),
            row(
                "g6",
                [
                    json!("2.000"),
                    json!("3.100"),
                    json!("4.000"),
                    json!("5.000"),
                    json!(odd5_g6),
                ],
                "2026-11-21T22:35:56.914261Z",
            ),
        ),
    ])
}

/// The final table when odd1..odd4 arrive as schema-less base64 bytes (scale 3).
fn final_base64(
    odd5: impl Fn(&str) -> Value,
    ts: impl Fn(&str) -> &'static str,
) -> BTreeMap<String, Value> {
    let row = |id: &str, o: [i64; 4]| {
        let odd = |i: usize| {
            if o[i] < 0 {
                Value::Null
            } else {
                json!(b64(o[i]))
            }
        };
        json!({"game_id": id, "odd1": odd(0), "odd2": odd(1), "odd3": odd(2), "odd4": odd(3), "odd5": odd5(id), "updated_at": ts(id)})
    };
    BTreeMap::from([
        ("g1".into(), row("g1", [1750, 2250, 3125, 4000])),
        ("g2".into(), row("g2", [1100, 1300, 1300, 1400])),
        ("g5".into(), row("g5", [-1, 1000, 1000, 1000])),
        ("g6".into(), row("g6", [2000, 3100, 4000, 5000])),
    ])
}

fn pg_ts(id: &str) -> &'static str {
    match id {
        "g1" => "2026-11-21T22:35:56.913545Z",
        "g2" => "2026-11-21T22:35:56.913870Z",
        "g5" => "2026-11-21T22:35:56.914217Z",
        _ => "2026-11-21T22:35:56.914261Z",
    }
}

fn pg_odd5(id: &str) -> Value {
    json!(match id {
        "g1" => "5.5",
        "g2" => "1.5",
        "g5" => "-0.5",
        _ => "6",
    })
}

#[test]
fn envelope_without_schema() {
    let out = decode_all("pg_a_envelope_noschema.jsonl");
    let ch = changes(&out);
    assert_eq!(ops_keys(&ch), seq(ENVELOPE_ORDER));
    assert!(ch.iter().all(|c| c.table == "game_odds"));
    assert_eq!(ch[0].ts_ms, Some(1795300519274));
    assert_eq!(fold(&ch), final_base64(pg_odd5, pg_ts));
    // odd1..odd4 are Decimal bytes with no schema: kept, and reported.
    assert_eq!(
        out[0].undecodable_decimals,
        ["odd1", "odd2", "odd3", "odd4"]
    );
    assert!(
        out[8].undecodable_decimals.is_empty(),
        "a tombstone has no columns"
    );
}

#[test]
fn postgres_changes_carry_their_source_position() {
    for name in ["pg_a_envelope_noschema.jsonl", "pg_b_envelope_schema.jsonl"] {
        let ch = changes(&decode_all(name));
        // every event names the connector's stream; a tombstone has no source block
        let streamed: Vec<_> = ch
            .iter()
            .filter(|c| c.op != Op::Read)
            .filter_map(|c| c.source_pos.as_ref())
            .collect();
        assert!(streamed.len() >= 5, "{name}: {streamed:?}");
        assert!(streamed.iter().all(|p| !p.stream.is_empty()));
        // in the order Debezium wrote them, positions never decrease (a primary-key update is a
        // delete and a create at one position)
        assert!(
            streamed.windows(2).all(|w| w[0].at <= w[1].at),
            "{name}: {streamed:?}"
        );
        assert!(ch
            .iter()
            .filter(|c| c.op == Op::Read)
            .all(|c| c.source_pos.is_some()));
    }
    let unwrapped = changes(&decode_all("pg_c_unwrap_rewrite.jsonl"));
    assert!(unwrapped.iter().all(|c| c.source_pos.is_none()));
}

#[test]
fn envelope_with_schema_gives_exact_decimals() {
    let out = decode_all("pg_b_envelope_schema.jsonl");
    let ch = changes(&out);
    assert_eq!(ops_keys(&ch), seq(ENVELOPE_ORDER));
    assert_eq!(fold(&ch), final_exact("6"));
    assert!(out.iter().all(|o| o.undecodable_decimals.is_empty()));
    assert_eq!(ch[2].row.as_ref().unwrap()["odd5"], json!("5.555"));
}

#[test]
fn decimal_string_mode_passes_through() {
    let out = decode_all("pg_f_decimal_string.jsonl");
    let ch = changes(&out);
    assert_eq!(ops_keys(&ch), seq(ENVELOPE_ORDER));
    let mut expected = final_exact("6.0");
    // string mode prints unconstrained NUMERIC as Debezium formats it
    expected.get_mut("g5").unwrap()["odd5"] = json!("-0.5");
    assert_eq!(fold(&ch), expected);
    assert_eq!(ch[9].row.as_ref().unwrap()["odd5"], json!("123456.789012"));
    assert!(out.iter().all(|o| o.undecodable_decimals.is_empty()));
}

#[test]
fn unwrap_rewrite_mode() {
    let out = decode_all("pg_c_unwrap_rewrite.jsonl");
    let ch = changes(&out);
    let order: Vec<_> = ENVELOPE_ORDER
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 8 && *i != 12)
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(ops_keys(&ch), seq(&order));
    assert_eq!(fold(&ch), final_base64(pg_odd5, pg_ts));
    assert_eq!(ch[0].ts_ms, Some(1795300519614), "__source_ts_ms");
    let row = ch[0].row.as_ref().unwrap();
    assert!(
        row.keys().all(|k| !k.starts_with("__")),
        "metadata fields are stripped: {row:?}"
    );
}

#[test]
fn unwrap_tombstone_mode() {
    let out = decode_all("pg_c_unwrap_tombstone.jsonl");
    let ch = changes(&out);
    let order: Vec<_> = ENVELOPE_ORDER
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 8 && *i != 12)
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(ops_keys(&ch), seq(&order));
    assert_eq!(fold(&ch), final_base64(pg_odd5, pg_ts));
    assert!(ch[7].row.is_none() && ch[10].row.is_none());
}

#[test]
fn seed_like_mysql_unwrap_with_route() {
    let out = decode_all("mysql_on_mariadb_seedlike_unwrap_route.jsonl");
    let ch = changes(&out);
    assert_eq!(ops_keys(&ch), seq(ENVELOPE_ORDER));
    assert!(ch.iter().all(|c| c.table == "game_odds"));
    // MySQL DECIMAL(10,3) everywhere, all schema-less base64; odd5 of g5 is 123456.789 -> -0.5 (-500)
    let odd5 = |id: &str| {
        json!(b64(match id {
            "g1" => 5500,
            "g2" => 1500,
            "g5" => -500,
            _ => 6000,
        }))
    };
    let ts = |id: &str| match id {
        "g1" => "2026-11-21T23:16:44.532621Z",
        "g2" => "2026-11-21T23:16:44.538624Z",
        "g5" => "2026-11-21T23:16:44.541552Z",
        _ => "2026-11-21T23:16:44.541852Z",
    };
    assert_eq!(fold(&ch), final_base64(odd5, ts));
    assert_eq!(
        out[9].undecodable_decimals,
        ["odd2", "odd3", "odd4", "odd5"],
        "odd1 is NULL"
    );
}

#[test]
fn snapshot_reads_and_delete_then_tombstone() {
    let ch = changes(&decode_all("pg_d_snapshot_reads.jsonl"));
    assert_eq!(ops_keys(&ch), seq(&[("r", "g1"), ("r", "g2"), ("r", "g3")]));
    let ch = changes(&decode_all("pg_e_delete_then_tombstone.jsonl"));
    assert_eq!(
        ops_keys(&ch),
        seq(&[("d", "g3"), ("d", "g3"), ("d", "g4"), ("d", "g4")])
    );
    assert!(ch.iter().all(|c| c.row.is_none()));
}

fn one(topic: &str, key: Option<&str>, value: Option<&str>) -> Result<DecodeOutput, DecodeError> {
    let rec = RawRecord {
        topic,
        key: key.map(str::as_bytes),
        value: value.map(str::as_bytes),
        timestamp_ms: Some(7),
    };
    decode(&rec, &settings())
}

#[test]
fn truncate_clears_the_table() {
    let v = r#"{"before":null,"after":null,"source":{"table":"game_odds","ts_ms":5},"op":"t","ts_ms":6}"#;
    let out = one("odds.public.game_odds", None, Some(v)).unwrap();
    assert_eq!(
        out.decoded,
        Decoded::Change(Change {
            table: "game_odds".into(),
            schema: None,
            table_from_topic: false,
            key: String::new(),
            old_key: None,
            key_from_message_key: false,
            op: Op::Truncate,
            row: None,
            ts_ms: Some(5),
            kafka_ts_ms: Some(7),
            source_pos: None,
        })
    );
}

#[test]
fn non_change_records_are_skipped() {
    let schema_change = r#"{"source":{"server":"odds"},"databaseName":"gameodds","ddl":"CREATE TABLE t (id int)","tableChanges":[]}"#;
    assert_eq!(
        one("odds", None, Some(schema_change)).unwrap().decoded,
        Decoded::Skip(SkipReason::SchemaChange)
    );
    assert_eq!(
        one("__debezium-heartbeat.odds", None, Some(r#"{"ts_ms":1}"#))
            .unwrap()
            .decoded,
        Decoded::Skip(SkipReason::Heartbeat)
    );
    assert_eq!(
        one(
            "odds.any",
            Some(r#"{"serverName":"odds"}"#),
            Some(r#"{"ts_ms":1}"#)
        )
        .unwrap()
        .decoded,
        Decoded::Skip(SkipReason::Heartbeat)
    );
    let tx = r#"{"status":"BEGIN","id":"571","event_count":null,"data_collections":null}"#;
    assert_eq!(
        one("odds.transaction", None, Some(tx)).unwrap().decoded,
        Decoded::Skip(SkipReason::Transaction)
    );
    let msg = r#"{"op":"m","source":{},"message":{"prefix":"p","content":"AA=="}}"#;
    assert_eq!(
        one("odds.message", None, Some(msg)).unwrap().decoded,
        Decoded::Skip(SkipReason::Message)
    );
}

#[test]
fn bad_records_have_clear_reasons() {
    assert_eq!(
        one("t.x", Some("1"), Some("{not json"))
            .unwrap_err()
            .reason(),
        "invalid_json"
    );
    assert_eq!(
        one("t.x", Some("1"), Some("[1,2]")).unwrap_err().reason(),
        "not_an_object"
    );
    assert_eq!(
        one("t.x", Some("1"), Some(r#"{"op":"z","after":{}}"#))
            .unwrap_err()
            .reason(),
        "unknown_op"
    );
    assert_eq!(
        one(
            "t.x",
            Some("1"),
            Some(r#"{"op":"c","after":null,"source":{}}"#)
        )
        .unwrap_err()
        .reason(),
        "bad_shape"
    );
    assert_eq!(
        one(
            "t.x",
            None,
            Some(r#"{"op":"c","after":{"a":1},"source":{}}"#)
        )
        .unwrap_err()
        .reason(),
        "no_key"
    );
    assert_eq!(
        one("t.x", Some(r#"{}"#), None).unwrap_err().reason(),
        "no_key"
    );
    let big = format!(r#"{{"id":"{}"}}"#, "x".repeat(2 << 20));
    assert_eq!(
        one("t.x", Some("1"), Some(&big)).unwrap_err().reason(),
        "oversized"
    );
}

#[test]
fn key_columns_and_composite_keys() {
    let s = DecodeSettings {
        key_columns: KeyColumns::parse("game_1=game_id,multi=a+b").unwrap(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    };
    let v = r#"{"id":9,"game_id":"123121","odd1":0.32,"__op":"c","__table":"game_1"}"#;
    let rec = RawRecord {
        topic: "odds.game_1",
        key: Some(br#"{"id":9}"#),
        value: Some(v.as_bytes()),
        timestamp_ms: None,
    };
    let Decoded::Change(c) = decode(&rec, &s).unwrap().decoded else {
        panic!()
    };
    assert_eq!((c.table.as_str(), c.key.as_str()), ("game_1", "123121"));
    // tombstone on a configured table: the key columns come from the message key
    let rec = RawRecord {
        topic: "odds.game_1",
        key: Some(br#"{"game_id":"123121"}"#),
        value: None,
        timestamp_ms: None,
    };
    let Decoded::Change(c) = decode(&rec, &s).unwrap().decoded else {
        panic!()
    };
    assert_eq!((c.key.as_str(), c.op), ("123121", Op::Delete));
    // composite message keys join their fields in order, schema-wrapped or not
    let wrapped = br#"{"schema":{"type":"struct"},"payload":{"league":"nba","game":42}}"#;
    let rec = RawRecord {
        topic: "odds.x",
        key: Some(wrapped),
        value: Some(br#"{"v":1}"#),
        timestamp_ms: None,
    };
    let Decoded::Change(c) = decode(&rec, &settings()).unwrap().decoded else {
        panic!()
    };
    assert_eq!(c.key, "nba:42");
    let rec = RawRecord {
        topic: "odds.multi",
        key: None,
        value: Some(br#"{"a":"x","b":2,"v":1}"#),
        timestamp_ms: None,
    };
    let Decoded::Change(c) = decode(&rec, &s).unwrap().decoded else {
        panic!()
    };
    assert_eq!(c.key, "x:2");
}

#[test]
fn decimal_schema_in_unwrapped_records() {
    let v = r#"{"schema":{"type":"struct","fields":[{"field":"id","type":"int32"},{"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]},"payload":{"id":1,"price":"MDk="}}"#;
    let out = one("shop.items", Some("1"), Some(v)).unwrap();
    let Decoded::Change(c) = out.decoded else {
        panic!()
    };
    assert_eq!(c.row.unwrap()["price"], json!("123.45"));
    assert!(out.undecodable_decimals.is_empty());
}

/// A schema of many fields is looked up through an index: the same field (the first of its name)
/// as a scan gives.
#[test]
fn decimal_schema_with_many_fields() {
    let mut fields: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"field":"c{i}","type":"string"}}"#))
        .collect();
    fields.push(r#"{"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}"#.into());
    // a second field of the name: the first one counts
    fields.push(r#"{"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"4"}}"#.into());
    let columns: Vec<String> = (0..40).map(|i| format!(r#""c{i}":"MDk=""#)).collect();
    let v = format!(
        r#"{{"schema":{{"type":"struct","fields":[{}]}},"payload":{{{},"price":"MDk="}}}}"#,
        fields.join(","),
        columns.join(",")
    );
    let out = one("shop.items", Some("1"), Some(&v)).unwrap();
    let Decoded::Change(c) = out.decoded else {
        panic!()
    };
    let row = c.row.unwrap();
    assert_eq!(row["price"], json!("123.45"));
    assert_eq!(row["c39"], json!("MDk="), "a string field stays a string");
    assert!(out.undecodable_decimals.is_empty());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(topic in "[a-z._-]{0,20}", key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                                   value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256))) {
        let rec = RawRecord { topic: &topic, key: key.as_deref(), value: value.as_deref(), timestamp_ms: None };
        let _ = decode(&rec, &settings());
    }

    #[test]
    fn arbitrary_json_never_panics(v in arb_json(), k in arb_json()) {
        let value = v.to_string();
        let key = k.to_string();
        let rec = RawRecord { topic: "odds.t", key: Some(key.as_bytes()), value: Some(value.as_bytes()), timestamp_ms: None };
        let _ = decode(&rec, &settings());
        let wrapped = json!({"schema": k, "payload": v}).to_string();
        let rec = RawRecord { topic: "odds.t", key: Some(key.as_bytes()), value: Some(wrapped.as_bytes()), timestamp_ms: None };
        let _ = decode(&rec, &settings());
    }
}

pub(super) fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just("op".to_string()),
            Just("t".to_string()),
            Just("d".to_string()),
            Just("AA==".to_string()),
            "[a-z_]{0,6}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("op".to_string()),
                        Just("after".to_string()),
                        Just("before".to_string()),
                        Just("source".to_string()),
                        Just("schema".to_string()),
                        Just("payload".to_string()),
                        Just("fields".to_string()),
                        Just("scale".to_string()),
                        Just("value".to_string()),
                        Just("__deleted".to_string()),
                        Just("table".to_string()),
                        "[a-z]{1,4}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

mod bounds;
mod keys;
mod reference;
mod same_output;
mod shapes;
