//! The fields the table layer needs to name tables and keys right (issue 12, item 6): `schema`,
//! `table_from_topic`, `old_key`, and deletes under PostgreSQL's default replica identity (only
//! the primary key in `before`), built from the real captures.

use serde_json::{json, Value};

use super::super::*;
use super::{decode_all, load, settings};

fn with_keys(spec: &str) -> DecodeSettings {
    DecodeSettings {
        key_columns: KeyColumns::parse(spec).unwrap(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    }
}

/// Decodes a fixture record after `edit` rewrites its value (`None` keeps a tombstone).
fn decode_edited(
    name: &str,
    index: usize,
    s: &DecodeSettings,
    edit: impl FnOnce(&mut Value),
) -> Result<Change, DecodeError> {
    let rec = &load(name)[index];
    let value = rec.value.as_deref().map(|v| {
        let mut v: Value = serde_json::from_str(v).unwrap();
        edit(&mut v);
        v.to_string()
    });
    let raw = RawRecord {
        topic: &rec.topic,
        key: rec.key.as_deref().map(str::as_bytes),
        value: value.as_deref().map(str::as_bytes),
        timestamp_ms: None,
    };
    match decode(&raw, s)?.decoded {
        Decoded::Change(c) => Ok(c),
        Decoded::Skip(r) => panic!("skipped: {r:?}"),
    }
}

/// The payload of a (possibly schema-wrapped) envelope or row.
fn payload(v: &mut Value) -> &mut Value {
    if v.get("payload").is_some() {
        &mut v["payload"]
    } else {
        v
    }
}

#[test]
fn schema_and_table_origin() {
    let ch: Vec<Change> = decode_all("pg_a_envelope_noschema.jsonl")
        .into_iter()
        .map(|o| match o.decoded {
            Decoded::Change(c) => c,
            Decoded::Skip(_) => panic!(),
        })
        .collect();
    for (i, c) in ch.iter().enumerate() {
        if i == 8 || i == 12 {
            // tombstones: the topic's last segment, no schema
            assert_eq!((c.schema.as_deref(), c.table_from_topic), (None, true));
        } else {
            assert_eq!(
                (c.schema.as_deref(), c.table_from_topic),
                (Some("public"), false)
            );
        }
        assert!(c.old_key.is_none() && !c.key_from_message_key);
    }
    // public.users and auth.users are told apart
    let users = |schema: &str| {
        let v = json!({"before":null,"after":{"id":1},"op":"c",
                       "source":{"db":"app","schema":schema,"table":"users"}});
        edited_one("app.any.users", &v, &settings())
    };
    let (a, b) = (users("public"), users("auth"));
    assert_eq!((a.table.as_str(), b.table.as_str()), ("users", "users"));
    assert_eq!(
        (a.schema.as_deref(), b.schema.as_deref()),
        (Some("public"), Some("auth"))
    );
    // MySQL names the database, not a schema
    let v = json!({"before":null,"after":{"id":1},"op":"c","source":{"db":"shop","table":"users"}});
    assert_eq!(
        edited_one("x.users", &v, &settings()).schema.as_deref(),
        Some("shop")
    );
    // no source.table: the topic names the table
    let v = json!({"before":null,"after":{"id":1},"op":"c","source":{"db":"shop"}});
    let c = edited_one("routed.users", &v, &settings());
    assert_eq!((c.table.as_str(), c.table_from_topic), ("users", true));
    // unwrapped rows: __table and the schema fields of add.fields
    let c = edited_one(
        "routed.x",
        &json!({"id":1,"__table":"users","__schema":"auth","__db":"app"}),
        &settings(),
    );
    assert_eq!(
        (c.table.as_str(), c.schema.as_deref(), c.table_from_topic),
        ("users", Some("auth"), false)
    );
    let c = edited_one(
        "routed.x",
        &json!({"id":1,"__source_table":"users","__source_db":"app"}),
        &settings(),
    );
    assert_eq!(
        (c.table.as_str(), c.schema.as_deref()),
        ("users", Some("app"))
    );
    let c = edited_one("routed.users", &json!({"id":1}), &settings());
    assert_eq!((c.schema, c.table_from_topic), (None, true));
    // the seed's MySQL flavour: __table, no schema
    let out = decode_all("mysql_on_mariadb_seedlike_unwrap_route.jsonl");
    let Decoded::Change(c) = &out[0].decoded else {
        panic!()
    };
    assert_eq!((c.schema.as_deref(), c.table_from_topic), (None, false));
}

fn edited_one(topic: &str, v: &Value, s: &DecodeSettings) -> Change {
    let v = v.to_string();
    let rec = RawRecord {
        topic,
        key: Some(b"1"),
        value: Some(v.as_bytes()),
        timestamp_ms: None,
    };
    match decode(&rec, s).unwrap().decoded {
        Decoded::Change(c) => c,
        Decoded::Skip(r) => panic!("{r:?}"),
    }
}

#[test]
fn an_update_that_changes_a_key_column_names_the_old_key() {
    // pg_b offset 4: `update game_odds set odd1=1.75 where game_id='g1'` (REPLICA IDENTITY FULL,
    // schemas on: odd1 is a Decimal of scale 3 on both sides)
    let s = with_keys("game_odds=odd1");
    let c = decode_edited("pg_b_envelope_schema.jsonl", 4, &s, |_| {}).unwrap();
    assert_eq!(c.op, Op::Update);
    assert_eq!(
        (c.key.as_str(), c.old_key.as_deref()),
        ("1.750", Some("1.500"))
    );
    // the same without schemas: the keys are the base64 text the rows were stored under
    let c = decode_edited("pg_a_envelope_noschema.jsonl", 4, &s, |_| {}).unwrap();
    assert_eq!(
        (c.key.as_str(), c.old_key.as_deref()),
        ("BtY=", Some("Bdw="))
    );
    // composite key columns, one of which changed
    let s = with_keys("game_odds=game_id+odd1");
    let c = decode_edited("pg_b_envelope_schema.jsonl", 4, &s, |_| {}).unwrap();
    assert_eq!(
        (c.key.as_str(), c.old_key.as_deref()),
        ("g1:1.750", Some("g1:1.500"))
    );
    // key columns that did not change, and message keys: no old key
    for s in [with_keys("game_odds=game_id"), settings()] {
        for i in [4, 5, 6, 10] {
            let c = decode_edited("pg_b_envelope_schema.jsonl", i, &s, |_| {}).unwrap();
            assert_eq!(c.old_key, None, "offset {i}");
        }
    }
    // default replica identity: an update's `before` is null; nothing to compare
    let s = with_keys("game_odds=odd1");
    let c = decode_edited("pg_b_envelope_schema.jsonl", 4, &s, |v| {
        payload(v)["before"] = Value::Null
    })
    .unwrap();
    assert_eq!((c.key.as_str(), c.old_key), ("1.750", None));
    // an update whose before holds the message key's field with another value (Debezium sends a
    // primary-key change as delete + create, other producers may not)
    let c = decode_edited("pg_a_envelope_noschema.jsonl", 4, &settings(), |v| {
        payload(v)["before"]["game_id"] = json!("g0")
    })
    .unwrap();
    assert_eq!((c.key.as_str(), c.old_key.as_deref()), ("g1", Some("g0")));
    // unwrapped rows carry no before
    let c = decode_edited(
        "pg_c_unwrap_rewrite.jsonl",
        4,
        &with_keys("game_odds=odd1"),
        |_| {},
    )
    .unwrap();
    assert_eq!(c.old_key, None);
}

/// Keeps only the primary key `game_id` in a row, as PostgreSQL's default replica identity does
/// for a delete's `before`: the other columns absent (`drop`) or null.
fn only_primary_key(row: &mut Value, drop: bool) {
    let row = row.as_object_mut().unwrap();
    if drop {
        row.retain(|k, _| k == "game_id" || k.starts_with("__"));
    } else {
        for (k, v) in row.iter_mut() {
            if k != "game_id" && !k.starts_with("__") {
                *v = Value::Null;
            }
        }
    }
}

#[test]
fn deletes_with_only_the_primary_key_decode_to_the_right_key() {
    // pg_a/pg_b offset 7: `delete from game_odds where game_id='g3'`; pg_c offset 7 the same
    // through ExtractNewRecordState (rewrite mode: the before row with __deleted=true)
    let cases: [(&str, usize, bool); 3] = [
        ("pg_a_envelope_noschema.jsonl", 7, false),
        ("pg_b_envelope_schema.jsonl", 7, false),
        ("pg_c_unwrap_rewrite.jsonl", 7, true),
    ];
    for (name, index, unwrapped) in cases {
        for drop in [true, false] {
            let edit = |v: &mut Value| {
                let p = payload(v);
                if unwrapped {
                    only_primary_key(p, drop)
                } else {
                    only_primary_key(&mut p["before"], drop)
                }
            };
            let what = format!("{name} drop={drop}");
            // message keys, and key columns naming the primary key
            for s in [settings(), with_keys("game_odds=game_id")] {
                let c = decode_edited(name, index, &s, edit).unwrap();
                assert_eq!(
                    (
                        c.op,
                        c.key.as_str(),
                        c.key_from_message_key,
                        c.row.is_none()
                    ),
                    (Op::Delete, "g3", false, true),
                    "{what}"
                );
            }
            // key columns naming a non-key column: the delete falls back to the message key
            let c = decode_edited(name, index, &with_keys("game_odds=odd1"), edit).unwrap();
            assert_eq!(
                (c.op, c.key.as_str(), c.key_from_message_key),
                (Op::Delete, "g3", true),
                "{what}"
            );
            // with the full before-image the key column is there
            let c = decode_edited(name, index, &with_keys("game_odds=odd1"), |_| {}).unwrap();
            assert!(!c.key_from_message_key, "{what}");
            assert_ne!(c.key, "g3", "{what}");
        }
    }
    // the tombstone after it (pg_a offset 8) falls back the same way
    let c = decode_edited(
        "pg_a_envelope_noschema.jsonl",
        8,
        &with_keys("game_odds=odd1"),
        |_| {},
    )
    .unwrap();
    assert_eq!(
        (
            c.op,
            c.key.as_str(),
            c.key_from_message_key,
            c.table_from_topic
        ),
        (Op::Delete, "g3", true, true)
    );
    // only deletes fall back: a create without its key column is still an error
    let err = decode_edited(
        "pg_a_envelope_noschema.jsonl",
        3,
        &with_keys("game_odds=odd1"),
        |v| payload(v)["after"]["odd1"] = Value::Null,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "no_key");
}
