//! Records are told apart by their shape; a shape heuristic must not turn a broken envelope into
//! a row, nor a row into a skip, a truncate or an error (issue 13: `{"op":42,...}` was accepted as
//! an unwrapped row with columns `op`, `after`, `source`).

use serde_json::{json, Value};

use super::super::*;
use super::one;

fn row_of(out: DecodeOutput) -> (Op, Row) {
    match out.decoded {
        Decoded::Change(c) => (c.op, c.row.expect("a row")),
        other => panic!("not a row change: {other:?}"),
    }
}

fn reason(topic: &str, key: Option<&str>, v: &Value) -> &'static str {
    one(topic, key, Some(&v.to_string()))
        .expect_err("must be refused")
        .reason()
}

#[test]
fn a_broken_envelope_is_an_error_not_a_row() {
    let source = json!({"table":"game_odds","ts_ms":1});
    let after = json!({"game_id":"g1","odd1":"1.500"});
    let k = Some(r#"{"game_id":"g1"}"#);
    let t = "odds.public.game_odds";
    for op in [
        json!(42),
        json!(null),
        json!(true),
        json!(["c"]),
        json!({"c":1}),
        json!(""),
    ] {
        let v = json!({"op": op, "after": after, "source": source});
        assert_eq!(reason(t, k, &v), "unknown_op", "{v}");
        let v = json!({"op": op, "before": null, "after": after});
        assert_eq!(reason(t, k, &v), "unknown_op", "{v}");
        let v = json!({"op": op, "source": source});
        assert_eq!(reason(t, k, &v), "unknown_op", "{v}");
    }
    // a known op whose row side is missing or not an object
    for v in [
        json!({"op":"c","source": source}),
        json!({"op":"u","source": source, "before": after}),
        json!({"op":"c","after":"g1","source": source}),
        json!({"op":"r","after":[1],"source": source}),
        json!({"op":"d","before":"g1","source": source}),
    ] {
        assert_eq!(reason(t, k, &v), "bad_shape", "{v}");
    }
}

#[test]
fn rows_with_columns_named_like_envelope_fields_stay_rows() {
    let k = Some("1");
    let t = "shop.public.trades";
    // a column `op` alone must not truncate the table or be skipped as a logical message
    for op in ["t", "m", "c", "buy"] {
        let (o, row) = row_of(one(t, k, Some(&json!({"id":1,"op":op}).to_string())).unwrap());
        assert_eq!((o, row["op"].as_str()), (Op::Update, Some(op)));
    }
    // `op` with a text column `source` (not a Debezium source block)
    let (_, row) = row_of(
        one(
            t,
            k,
            Some(&json!({"id":1,"op":"c","source":"web"}).to_string()),
        )
        .unwrap(),
    );
    assert_eq!(row["source"], json!("web"));
    // metadata fields say it is ExtractNewRecordState output, whatever the columns are called
    let v = json!({"id":1,"op":"UPDATE","before":"{}","after":"{}","__op":"c","__table":"audit"});
    let (o, row) = row_of(one(t, k, Some(&v.to_string())).unwrap());
    assert_eq!((o, row.len()), (Op::Create, 4));
}

#[test]
fn rows_are_not_mistaken_for_non_change_records() {
    let k = Some("1");
    // a `ddl` column (a migrations table), a `status` column with END, a heartbeat-named table
    for (topic, v) in [
        (
            "db.public.migrations",
            json!({"id":1,"ddl":"CREATE TABLE t (id int)"}),
        ),
        ("db.public.migrations", json!({"id":1,"tableChanges":"[]"})),
        (
            "db.public.orders",
            json!({"id":"571","status":"END","total":3}),
        ),
        ("db.public.orders", json!({"id":"571","status":"BEGIN"})),
        ("db.public.heartbeats", json!({"id":1,"beat":3})),
    ] {
        let (_, row) = row_of(one(topic, k, Some(&v.to_string())).unwrap());
        assert_eq!(Value::Object(row), v);
    }
    // the real ones are still skipped
    let tx = r#"{"status":"END","id":"571","event_count":2,"data_collections":[{"data_collection":"public.game_odds","event_count":2}],"ts_ms":1}"#;
    assert_eq!(
        one("odds.transaction", None, Some(tx)).unwrap().decoded,
        Decoded::Skip(SkipReason::Transaction)
    );
    let hb = r#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"ts_ms"}],"name":"io.debezium.connector.common.Heartbeat"},"payload":{"ts_ms":1}}"#;
    assert_eq!(
        one(
            "odds.heartbeats",
            Some(r#"{"serverName":"odds"}"#),
            Some(hb)
        )
        .unwrap()
        .decoded,
        Decoded::Skip(SkipReason::Heartbeat)
    );
}

#[test]
fn a_schema_wrapper_needs_a_connect_schema() {
    // a table with columns `schema` and `payload`
    let v = json!({"schema":"public","payload":"x"});
    let (_, row) = row_of(one("db.public.docs", Some("1"), Some(&v.to_string())).unwrap());
    assert_eq!(Value::Object(row), v);
    let v = json!({"schema":{"owner":"ann"},"payload":{"id":1}});
    let (_, row) = row_of(one("db.public.docs", Some("1"), Some(&v.to_string())).unwrap());
    assert_eq!(Value::Object(row), v);
    // Kafka Connect's tombstone with schemas enabled is still a delete
    let Decoded::Change(c) = one(
        "db.public.docs",
        Some("1"),
        Some(r#"{"schema":null,"payload":null}"#),
    )
    .unwrap()
    .decoded
    else {
        panic!()
    };
    assert_eq!((c.op, c.key.as_str()), (Op::Delete, "1"));
}

#[test]
fn metadata_of_the_wrong_type_is_an_error() {
    let k = Some("1");
    let t = "db.public.items";
    assert_eq!(reason(t, k, &json!({"id":1,"__op":5})), "unknown_op");
    assert_eq!(reason(t, k, &json!({"id":1,"__op":null})), "unknown_op");
    assert_eq!(
        reason(t, k, &json!({"id":1,"__deleted":"maybe"})),
        "bad_shape"
    );
}

#[test]
fn empty_names_and_keys_are_not_used() {
    // an empty source.table or __table falls back to the topic
    let v = json!({"before":null,"after":{"id":1},"source":{"table":""},"op":"c"});
    let Decoded::Change(c) = one("db.public.items", Some("1"), Some(&v.to_string()))
        .unwrap()
        .decoded
    else {
        panic!()
    };
    assert_eq!(c.table, "items");
    let v = json!({"id":1,"__table":""});
    let Decoded::Change(c) = one("db.public.items", Some("1"), Some(&v.to_string()))
        .unwrap()
        .decoded
    else {
        panic!()
    };
    assert_eq!(c.table, "items");
    // an empty message key names no row
    assert_eq!(
        reason("db.public.items", Some(r#""""#), &json!({"id":1})),
        "no_key"
    );
    assert_eq!(
        one("db.public.items", Some(r#""""#), None)
            .unwrap_err()
            .reason(),
        "no_key"
    );
}
