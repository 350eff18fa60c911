//! Every size a record can ask for is bounded: a record past a bound is a [`DecodeError`] with its
//! own reason, returned quickly and without allocating what the record asks for (issue 13: a
//! ~700-byte event with `"scale":"2147483647"` made the decimal formatting build a 2 GiB string).

use std::time::{Duration, Instant};

use base64::Engine;
use num_bigint::BigInt;
use serde_json::{json, Value};

use super::super::*;
use super::settings;
use crate::cdc::decimal::{MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS};

/// A schema-enabled envelope (as `pg_b_envelope_schema.jsonl`) with one Decimal column `price`
/// whose schema scale is `scale` (a JSON value: Kafka Connect writes it as a string).
fn decimal_event(scale: Value, unscaled_b64: &str) -> String {
    let row_schema = json!({"type":"struct","optional":true,"name":"shop.public.items.Value","fields":[
        {"type":"string","optional":false,"field":"id"},
        {"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,
         "parameters":{"scale":scale,"connect.decimal.precision":"10"},"field":"price"}]});
    json!({"schema":{"type":"struct","name":"shop.public.items.Envelope","optional":false,"fields":[
            {"field":"before", "type":"struct","optional":true,"fields":row_schema["fields"].clone()},
            {"field":"after", "type":"struct","optional":true,"fields":row_schema["fields"].clone()},
            {"field":"op","type":"string","optional":false}]},
           "payload":{"before":null,"after":{"id":"i1","price":unscaled_b64},
                      "source":{"table":"items","schema":"public","db":"shop","ts_ms":1},"op":"c","ts_ms":2}})
    .to_string()
}

fn b64(n: &BigInt) -> String {
    base64::engine::general_purpose::STANDARD.encode(n.to_signed_bytes_be())
}

fn decode_value(topic: &str, key: Option<&str>, value: &str) -> Result<DecodeOutput, DecodeError> {
    let rec = RawRecord {
        topic,
        key: key.map(str::as_bytes),
        value: Some(value.as_bytes()),
        timestamp_ms: None,
    };
    decode(&rec, &settings())
}

fn price(out: DecodeOutput) -> String {
    let Decoded::Change(c) = out.decoded else {
        panic!("not a change")
    };
    c.row.unwrap()["price"].as_str().unwrap().to_string()
}

/// Decodes and asserts the error reason, and that it came back in seconds at most, debug build on
/// a loaded machine included (the unbounded code took seconds and gigabytes per record, or died).
fn refused(topic: &str, key: Option<&str>, value: &str, reason: &str) {
    let started = Instant::now();
    let Err(err) = decode_value(topic, key, value) else {
        panic!("must be refused")
    };
    assert_eq!(err.reason(), reason, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().len() <= 300,
        "error text is bounded: {} bytes",
        err.to_string().len()
    );
}

#[test]
fn absurd_decimal_scales_are_refused_quickly() {
    let key = Some(r#"{"id":"i1"}"#);
    for scale in [
        json!("2147483647"),
        json!("-2147483648"),
        json!(2147483647),
        json!(-2147483648i64),
        json!("16384"),
        json!(-131073),
        // wrapped to a small i32 by an `as` cast before: must not pass as scale 2
        json!(4294967298i64),
    ] {
        let v = decimal_event(scale.clone(), "AQ==");
        assert!(v.len() < 1000, "a small record: {} bytes", v.len());
        refused("shop.public.items", key, &v, "decimal_out_of_range");
    }
    // VariableScaleDecimal carries its own scale, with or without a schema
    for scale in [2147483647i64, -2147483648, 16384, -131073, 1 << 40] {
        let v = json!({"before":null,"after":{"id":"i1","price":{"scale":scale,"value":"AQ=="}},
                       "source":{"table":"items"},"op":"c"})
        .to_string();
        refused("shop.public.items", key, &v, "decimal_out_of_range");
        let unwrapped = json!({"id":"i1","price":{"scale":scale,"value":"AQ=="}}).to_string();
        refused("shop.public.items", key, &unwrapped, "decimal_out_of_range");
    }
}

#[test]
fn decimal_bounds_admit_every_postgres_numeric() {
    let key = Some(r#"{"id":"i1"}"#);
    // the smallest positive unconstrained NUMERIC: 16383 digits after the point
    let v = decimal_event(json!(MAX_FRACTION_DIGITS.to_string()), "AQ==");
    let text = price(decode_value("shop.public.items", key, &v).unwrap());
    assert_eq!(text.len(), 2 + MAX_FRACTION_DIGITS as usize);
    assert!(text.starts_with("0.000") && text.ends_with("0001"));
    // the widest: 131072 digits before the point and 16383 after
    let digits = (MAX_INTEGER_DIGITS + MAX_FRACTION_DIGITS) as usize;
    let widest = "9".repeat(digits).parse::<BigInt>().unwrap();
    let v = decimal_event(json!(MAX_FRACTION_DIGITS), &b64(&-widest));
    let text = price(decode_value("shop.public.items", key, &v).unwrap());
    assert_eq!(text.len(), 1 + digits + 1);
    assert_eq!(text.find('.'), Some(1 + MAX_INTEGER_DIGITS as usize));
    // one digit more before the point is past the bound
    let too_wide = format!("1{}", "0".repeat(MAX_INTEGER_DIGITS as usize))
        .parse::<BigInt>()
        .unwrap();
    let v = decimal_event(json!("0"), &b64(&too_wide));
    refused("shop.public.items", key, &v, "decimal_out_of_range");
    // negative scales (PostgreSQL 15 NUMERIC(p,-s), Oracle NUMBER(p,-s)) multiply
    let v = decimal_event(json!("-1000"), "Bg==");
    assert_eq!(
        price(decode_value("shop.public.items", key, &v).unwrap()),
        format!("6{}", "0".repeat(1000))
    );
    // a 100-byte unscaled value (241 digits): exact, no longer kept as base64
    let big = "7".repeat(241).parse::<BigInt>().unwrap();
    let v = decimal_event(json!("3"), &b64(&big));
    let text = price(decode_value("shop.public.items", key, &v).unwrap());
    assert_eq!(text, format!("{}.777", "7".repeat(238)));
}

#[test]
fn decimal_expansion_of_a_record_is_bounded() {
    // each column asks for 16385 characters from 36 bytes of input: a 1 MiB record of them
    // would expand to about 500 MB
    let mut row = serde_json::Map::new();
    row.insert("id".into(), json!("i1"));
    for i in 0..25_000 {
        row.insert(
            format!("c{i}"),
            json!({"scale": MAX_FRACTION_DIGITS, "value": "AQ=="}),
        );
    }
    let v = Value::Object(row).to_string();
    assert!(v.len() < 1 << 20);
    refused(
        "shop.public.items",
        Some(r#"{"id":"i1"}"#),
        &v,
        "decimals_too_large",
    );
    // a few such columns are fine
    let v = json!({"id":"i1","a":{"scale":MAX_FRACTION_DIGITS,"value":"AQ=="},
                   "b":{"scale":MAX_FRACTION_DIGITS,"value":"AQ=="}})
    .to_string();
    assert!(decode_value("shop.public.items", Some(r#"{"id":"i1"}"#), &v).is_ok());
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn nesting_depth_is_bounded() {
    let key = Some(r#"{"id":"i1"}"#);
    // envelope (1) + after (2) + column value: MAX_DEPTH levels in all are fine
    let ok = format!(
        r#"{{"before":null,"after":{{"id":"i1","deep":{}}},"source":{{"table":"items"}},"op":"c"}}"#,
        nested(MAX_DEPTH - 2)
    );
    assert!(decode_value("shop.public.items", key, &ok).is_ok());
    let deep = format!(
        r#"{{"before":null,"after":{{"id":"i1","deep":{}}},"source":{{"table":"items"}},"op":"c"}}"#,
        nested(MAX_DEPTH - 1)
    );
    refused("shop.public.items", key, &deep, "too_deep");
    // in a part the decoder does not otherwise read, and far past serde_json's own limit
    let deep = format!(
        r#"{{"before":null,"after":{{"id":"i1"}},"transaction":{},"source":{{"table":"items"}},"op":"c"}}"#,
        nested(100_000)
    );
    refused("shop.public.items", key, &deep, "too_deep");
    // brackets inside strings do not count
    let strings = json!({"id":"i1","s":"[[[[{{{{".repeat(100)}).to_string();
    assert!(decode_value("shop.public.items", key, &strings).is_ok());
}

#[test]
fn key_length_is_bounded() {
    let v = r#"{"id":"x","v":1}"#;
    let at_limit = "k".repeat(MAX_KEY_BYTES);
    let out = decode_value("shop.public.items", Some(&at_limit), v).unwrap();
    let Decoded::Change(c) = out.decoded else {
        panic!()
    };
    assert_eq!(c.key.len(), MAX_KEY_BYTES);
    let over = "k".repeat(MAX_KEY_BYTES + 1);
    refused("shop.public.items", Some(&over), v, "key_too_long");
    // composite keys count after joining
    let half = "k".repeat(MAX_KEY_BYTES / 2);
    let composite = json!({"a": half, "b": half}).to_string();
    refused("shop.public.items", Some(&composite), v, "key_too_long");
    // key columns from the row
    let s = DecodeSettings {
        key_columns: KeyColumns::parse("items=id").unwrap(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    };
    let v = json!({"id": over, "v": 1}).to_string();
    let rec = RawRecord {
        topic: "shop.public.items",
        key: None,
        value: Some(v.as_bytes()),
        timestamp_ms: None,
    };
    assert_eq!(decode(&rec, &s).unwrap_err().reason(), "key_too_long");
}

#[test]
fn table_names_are_bounded() {
    let key = Some("1");
    let long = "t".repeat(MAX_NAME_BYTES + 1);
    let v = json!({"id":1,"__table": long}).to_string();
    refused("shop.public.items", key, &v, "bad_name");
    let v =
        json!({"before":null,"after":{"id":1},"source":{"table":"a\u{0}b"},"op":"c"}).to_string();
    refused("shop.public.items", key, &v, "bad_name");
    let v = json!({"id":1,"__table": "t".repeat(MAX_NAME_BYTES)}).to_string();
    assert!(decode_value("shop.public.items", key, &v).is_ok());
}

#[test]
fn error_texts_are_bounded() {
    let op = "z".repeat(100_000);
    let v = json!({"before":null,"after":{"id":1},"source":{"table":"t"},"op":op}).to_string();
    refused("shop.public.items", Some("1"), &v, "unknown_op");
    let v = json!({"id":1,"__op":op}).to_string();
    refused("shop.public.items", Some("1"), &v, "unknown_op");
}
