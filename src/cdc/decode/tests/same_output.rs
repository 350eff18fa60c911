//! The borrowed, typed decoder gives exactly what the Value-based one gave (`reference`): the same
//! `DecodeOutput` for every record, the same error for every refused one. The one documented
//! difference: a number out of `f64`'s range or a lone surrogate escape in a part of the record
//! that is not used made the whole record invalid JSON to the Value decoder; it is now skipped.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::super::*;
use super::{arb_json, fixtures_dir, reference};

fn settings(key_columns: &str) -> DecodeSettings {
    DecodeSettings {
        key_columns: KeyColumns::parse(key_columns).unwrap(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    }
}

fn same(topic: &str, key: Option<&[u8]>, value: Option<&[u8]>, s: &DecodeSettings) {
    let rec = RawRecord {
        topic,
        key,
        value,
        timestamp_ms: Some(3),
    };
    let new = decode(&rec, s);
    let old = reference::decode(&rec, s);
    match (&new, &old) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{}", show(value)),
        (Err(DecodeError::InvalidJson(_)), Err(DecodeError::InvalidJson(_))) => {}
        (_, Err(DecodeError::InvalidJson(why)))
            if why.contains("number out of range") || why.contains("surrogate") => {}
        (a, b) => assert_eq!(a, b, "{}", show(value)),
    }
}

fn show(value: Option<&[u8]>) -> String {
    value.map_or("tombstone".into(), |v| {
        String::from_utf8_lossy(&v[..v.len().min(2000)]).into_owned()
    })
}

/// A captured record: topic, key, value.
type Capture = (String, Option<String>, Option<String>);

/// Every record of every capture, under message keys and key columns.
fn captures() -> Vec<Capture> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            out.push((
                v["topic"].as_str().unwrap().to_string(),
                v["key"].as_str().map(String::from),
                v["value"].as_str().map(String::from),
            ));
        }
    }
    out
}

const KEY_COLUMNS: [&str; 4] = ["", "*=game_id", "*=odd1", "*=game_id+odd5"];

#[test]
fn the_captures_decode_the_same() {
    let records = captures();
    assert!(records.len() > 60);
    for ks in KEY_COLUMNS {
        for (topic, key, value) in &records {
            same(
                topic,
                key.as_deref().map(str::as_bytes),
                value.as_deref().map(str::as_bytes),
                &settings(ks),
            );
        }
    }
}

/// A capture's value edited: `path` picks a member (in the payload when schema-wrapped), which
/// becomes `replacement`.
fn edit(value: &str, pick: usize, replacement: Value) -> String {
    let mut v: Value = serde_json::from_str(value).unwrap();
    let target = if v.get("payload").is_some_and(Value::is_object) && pick.is_multiple_of(3) {
        &mut v["schema"]
    } else if v.get("payload").is_some_and(Value::is_object) {
        &mut v["payload"]
    } else {
        &mut v
    };
    if let Some(obj) = target.as_object_mut() {
        let keys: Vec<String> = obj.keys().cloned().collect();
        if !keys.is_empty() {
            let k = &keys[pick % keys.len()];
            // sometimes one level down (a column of `after`, a source field, a schema field list)
            match obj.get_mut(k.as_str()) {
                Some(Value::Object(inner)) if pick.is_multiple_of(2) && !inner.is_empty() => {
                    let ik: Vec<String> = inner.keys().cloned().collect();
                    inner.insert(ik[(pick / 2) % ik.len()].clone(), replacement);
                }
                _ => {
                    obj.insert(k.clone(), replacement);
                }
            }
        }
    }
    v.to_string()
}

fn arb_replacement() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => arb_json(),
        1 => prop_oneof![Just(json!("c")), Just(json!("u")), Just(json!("d")), Just(json!("t")), Just(json!("m"))],
        1 => (any::<i64>(), "[A-Za-z0-9+/]{0,12}={0,2}").prop_map(|(s, v)| json!({"scale": s % 40_000, "value": v})),
        1 => Just(json!({"scale":"2147483647"})),
        1 => Just(json!("")),
        1 => any::<i64>().prop_map(|n| json!(n.to_string())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn edited_captures_decode_the_same(pick in any::<usize>(), which in any::<usize>(),
                                       replacement in arb_replacement(), ks in 0usize..4) {
        let records = captures_cached();
        let (topic, key, value) = &records[which % records.len()];
        if let Some(value) = value {
            let edited = edit(value, pick, replacement);
            same(topic, key.as_deref().map(str::as_bytes), Some(edited.as_bytes()), &settings(KEY_COLUMNS[ks]));
        }
    }

    #[test]
    fn cut_or_corrupted_captures_decode_the_same(which in any::<usize>(), at in 0.0f64..1.0, byte in any::<u8>(),
                                                 cut in any::<bool>(), ks in 0usize..4) {
        let records = captures_cached();
        let (topic, key, value) = &records[which % records.len()];
        if let Some(value) = value {
            let mut bytes = value.as_bytes().to_vec();
            let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            same(topic, key.as_deref().map(str::as_bytes), Some(&bytes), &settings(KEY_COLUMNS[ks]));
        }
    }

    #[test]
    fn arbitrary_json_decodes_the_same(v in arb_json(), k in arb_json(), ks in 0usize..4) {
        let (value, key) = (v.to_string(), k.to_string());
        let s = settings(KEY_COLUMNS[ks]);
        same("odds.t", Some(key.as_bytes()), Some(value.as_bytes()), &s);
        let wrapped = json!({"schema": {"type": "struct", "fields": k}, "payload": v}).to_string();
        same("odds.t", Some(key.as_bytes()), Some(wrapped.as_bytes()), &s);
    }
}

fn captures_cached() -> &'static [Capture] {
    static CAPTURES: std::sync::OnceLock<Vec<Capture>> = std::sync::OnceLock::new();
    CAPTURES.get_or_init(captures)
}

#[test]
fn the_unit_test_records_decode_the_same() {
    // shapes the other unit tests use, hostile ones included
    let cases = [
        r#"{"op":42,"after":{"a":1},"source":{"table":"t"}}"#,
        r#"{"op":"c","source":{"table":"t"}}"#,
        r#"{"id":1,"op":"t"}"#,
        r#"{"schema":"public","payload":"x"}"#,
        r#"{"schema":null,"payload":null}"#,
        r#"{"schema":{"type":"struct"},"payload":[1]}"#,
        r#"{"a":1,"a":{"scale":2,"value":"AQ=="}}"#,
        r#"{"before":null,"after":{"id":1,"id":2},"source":{"table":"t","table":"u"},"op":"c","op":"u"}"#,
        r#"{"id":1,"__deleted":"maybe"}"#,
        r#"{"id":1,"__op":5}"#,
        r#"{"status":"END","id":"1","event_count":1,"data_collections":[]}"#,
        r#"{"ts_ms":1}"#,
        r#"{"ts_ms":1.5}"#,
        r#"{"source":{},"ddl":"x"}"#,
        r#"{"op":"m","source":{}}"#,
        r#"null"#,
        r#"[1,2]"#,
        r#""x""#,
        r#"{"id":1,"x":1e999}"#,
    ];
    for v in cases {
        for ks in KEY_COLUMNS {
            same(
                "db.public.t",
                Some(br#"{"id":1}"#),
                Some(v.as_bytes()),
                &settings(ks),
            );
        }
    }
}
