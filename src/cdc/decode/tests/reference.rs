//! The Value-based decoder as it was before the borrowed, typed one (commit 7840601): it parses
//! the whole record into a `serde_json::Value`. Kept, test-only, as the oracle that the faster
//! decoder must agree with (`tests/same_output.rs`).

use serde_json::Value;

use crate::cdc::decimal;
use crate::cdc::decode::key::{key_names, old_key, row_key, topic_table, MessageKey};
use crate::cdc::decode::limits::{check_name, nests_deeper_than, quote};
use crate::cdc::decode::{
    Change, DecodeError, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, Row, SkipReason,
    DECIMAL_SLACK_BYTES, MAX_DEPTH,
};

/// Decodes one record.
pub(super) fn decode(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
) -> Result<DecodeOutput, DecodeError> {
    let size = rec.value.map_or(0, <[u8]>::len) + rec.key.map_or(0, <[u8]>::len);
    if size > settings.max_record_bytes {
        return Err(DecodeError::Oversized {
            size,
            limit: settings.max_record_bytes,
        });
    }
    if rec.topic.starts_with("__debezium-heartbeat") {
        return Ok(skip(SkipReason::Heartbeat));
    }
    let Some(value) = rec.value else {
        return tombstone(rec, settings);
    };
    if nests_deeper_than(value, MAX_DEPTH) {
        return Err(DecodeError::TooDeep { limit: MAX_DEPTH });
    }
    let mut decimal_budget = size.saturating_mul(2).saturating_add(DECIMAL_SLACK_BYTES);
    let parsed: Value =
        serde_json::from_slice(value).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let (schema, payload) = split_schema(parsed);
    let payload = match payload {
        Value::Object(map) => map,
        Value::Null => return tombstone(rec, settings),
        _ => return Err(DecodeError::NotAnObject),
    };
    if let Some(reason) = non_change(&payload) {
        return Ok(skip(reason));
    }
    if is_envelope(&payload) {
        if payload.get("op").and_then(Value::as_str) == Some("m") {
            return Ok(skip(SkipReason::Message));
        }
        envelope(rec, settings, schema.as_ref(), payload, &mut decimal_budget)
    } else {
        unwrapped(rec, settings, schema.as_ref(), payload, &mut decimal_budget)
    }
}

/// A Debezium envelope: `op` with `before` or `after`, or with a `source` block. A row of
/// `ExtractNewRecordState` output has metadata fields (`__op`, `__table`, ...) that an envelope
/// never has at its top level, so such a row stays a row whatever its columns are called. A
/// record that is plainly an envelope with a bad `op` or row is then an error, not a row.
fn is_envelope(payload: &Row) -> bool {
    payload.contains_key("op")
        && (payload.contains_key("before")
            || payload.contains_key("after")
            || payload.get("source").is_some_and(Value::is_object))
        && !payload.keys().any(|k| k.starts_with("__"))
}

fn skip(reason: SkipReason) -> DecodeOutput {
    DecodeOutput {
        decoded: Decoded::Skip(reason),
        undecodable_decimals: Vec::new(),
    }
}

/// `{"schema": .., "payload": ..}` -> (schema, payload); anything else is its own payload. The
/// schema must be null or a Kafka Connect schema (an object with a `type`): a row whose only
/// columns are `schema` and `payload` stays a row.
fn split_schema(v: Value) -> (Option<Value>, Value) {
    match v {
        Value::Object(mut map)
            if map.len() == 2
                && map.contains_key("payload")
                && map.get("schema").is_some_and(|s| {
                    s.is_null() || s.get("type").is_some_and(Value::is_string)
                }) =>
        {
            let payload = map.remove("payload").unwrap_or(Value::Null);
            (map.remove("schema").filter(|s| !s.is_null()), payload)
        }
        other => (None, other),
    }
}

/// Records on change topics that are not row changes, by their exact Debezium shapes, so that a
/// row with a column called `ddl` or `status` is still a row: schema changes carry a `source`
/// block and `ddl`/`tableChanges`/`databaseName`; transaction markers `status` BEGIN/END, `id`,
/// `event_count` and `data_collections`; heartbeats are `{"ts_ms": n}` alone (on any topic: the
/// heartbeat topic prefix is configurable).
fn non_change(payload: &Row) -> Option<SkipReason> {
    if payload.contains_key("op") {
        return None;
    }
    if payload.get("source").is_some_and(Value::is_object)
        && (payload.contains_key("ddl")
            || payload.contains_key("tableChanges")
            || payload.contains_key("databaseName"))
    {
        return Some(SkipReason::SchemaChange);
    }
    let status = payload.get("status").and_then(Value::as_str);
    if matches!(status, Some("BEGIN" | "END"))
        && payload.contains_key("id")
        && payload.contains_key("event_count")
        && payload.contains_key("data_collections")
    {
        return Some(SkipReason::Transaction);
    }
    if payload.len() == 1 && payload.get("ts_ms").is_some_and(Value::is_i64) {
        return Some(SkipReason::Heartbeat);
    }
    None
}

fn envelope(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Value>,
    mut payload: Row,
    decimal_budget: &mut usize,
) -> Result<DecodeOutput, DecodeError> {
    let op = op_of(payload.get("op"))?;
    let source = payload.get("source").and_then(Value::as_object);
    let (table, table_from_topic) = table_name(
        source.and_then(|s| s.get("table")).and_then(Value::as_str),
        rec.topic,
    )?;
    let schema_name = source_schema(
        source.and_then(|s| s.get("schema")).and_then(Value::as_str),
        source.and_then(|s| s.get("db")).and_then(Value::as_str),
    )?;
    let ts_ms = source
        .and_then(|s| s.get("ts_ms"))
        .and_then(Value::as_i64)
        .or_else(|| payload.get("ts_ms").and_then(Value::as_i64))
        .or(rec.timestamp_ms);
    let mut change = Change {
        table,
        schema: schema_name,
        table_from_topic,
        key: String::new(),
        old_key: None,
        key_from_message_key: false,
        op,
        row: None,
        ts_ms,
        kafka_ts_ms: rec.timestamp_ms,
        source_pos: crate::cdc::decode::sequence::postgres(
            source
                .and_then(|s| s.get("connector"))
                .and_then(Value::as_str),
            source.and_then(|s| s.get("name")).and_then(Value::as_str),
            source
                .and_then(|s| s.get("sequence"))
                .and_then(Value::as_str),
        ),
    };
    if op == Op::Truncate {
        return Ok(DecodeOutput {
            decoded: Decoded::Change(change),
            undecodable_decimals: Vec::new(),
        });
    }
    let side = if op == Op::Delete { "before" } else { "after" };
    let mut row = match payload.remove(side) {
        Some(Value::Object(row)) => Some(row),
        Some(Value::Null) | None if op == Op::Delete => None,
        _ => {
            return Err(DecodeError::BadShape(if op == Op::Delete {
                "`before` is not an object"
            } else {
                "`after` is not an object"
            }))
        }
    };
    let field_schemas = schema.and_then(|s| struct_fields(s, Some(side)));
    let undecodable = match row.as_mut() {
        Some(row) => decode_columns(row, field_schemas, decimal_budget)?,
        None => Vec::new(),
    };
    let message_key = MessageKey::parse(rec.key);
    let key = row_key(&message_key, settings, &change.table, row.as_ref(), op)?;
    if op == Op::Update {
        if let Some(Value::Object(before)) = payload.get("before") {
            // only the key's columns of `before`, decoded as the row's are (a Decimal key)
            let mut old: Row = key_names(&message_key, settings, &change.table)
                .into_iter()
                .filter_map(|c| before.get(&c).map(|v| (c, v.clone())))
                .collect();
            let before_schemas = schema.and_then(|s| struct_fields(s, Some("before")));
            decode_columns(&mut old, before_schemas, decimal_budget)?;
            change.old_key = old_key(&message_key, settings, &change.table, &old, &key.key);
        }
    }
    change.key = key.key;
    change.key_from_message_key = key.from_message_key;
    change.row = if op == Op::Delete { None } else { row };
    Ok(DecodeOutput {
        decoded: Decoded::Change(change),
        undecodable_decimals: undecodable,
    })
}

fn tombstone(rec: &RawRecord<'_>, settings: &DecodeSettings) -> Result<DecodeOutput, DecodeError> {
    let table = topic_table(rec.topic).ok_or(DecodeError::NoTable)?;
    let key = row_key(
        &MessageKey::parse(rec.key),
        settings,
        &table,
        None,
        Op::Delete,
    )?;
    let change = Change {
        table,
        schema: None,
        table_from_topic: true,
        key: key.key,
        old_key: None,
        key_from_message_key: key.from_message_key,
        op: Op::Delete,
        row: None,
        ts_ms: rec.timestamp_ms,
        kafka_ts_ms: rec.timestamp_ms,
        source_pos: None,
    };
    Ok(DecodeOutput {
        decoded: Decoded::Change(change),
        undecodable_decimals: Vec::new(),
    })
}

/// An op letter (`r c u d t`); anything else, a string or not, is an unknown op.
fn op_of(op: Option<&Value>) -> Result<Op, DecodeError> {
    match op {
        Some(Value::String(letter)) => {
            Op::from_letter(letter).ok_or_else(|| DecodeError::UnknownOp(quote(letter)))
        }
        Some(other) => Err(DecodeError::UnknownOp(quote(&other.to_string()))),
        None => Err(DecodeError::UnknownOp(String::new())),
    }
}

/// The table named by the record, else the topic's last segment (then `true`); checked.
fn table_name(named: Option<&str>, topic: &str) -> Result<(String, bool), DecodeError> {
    let (table, from_topic) = match named.filter(|t| !t.is_empty()) {
        Some(t) => (t.to_string(), false),
        None => (topic_table(topic).ok_or(DecodeError::NoTable)?, true),
    };
    check_name(&table)?;
    Ok((table, from_topic))
}

/// The schema, else the database, when the record names one; checked.
fn source_schema(schema: Option<&str>, db: Option<&str>) -> Result<Option<String>, DecodeError> {
    match schema
        .filter(|s| !s.is_empty())
        .or(db.filter(|d| !d.is_empty()))
    {
        Some(name) => {
            check_name(name)?;
            Ok(Some(name.to_string()))
        }
        None => Ok(None),
    }
}

fn unwrapped(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Value>,
    mut row: Row,
    decimal_budget: &mut usize,
) -> Result<DecodeOutput, DecodeError> {
    let deleted = match row.get("__deleted") {
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(Value::Bool(b)) => *b,
        None | Some(Value::Null) => false,
        Some(_) => return Err(DecodeError::BadShape("`__deleted` is not true or false")),
    };
    let op = match row.get("__op") {
        Some(op) => op_of(Some(op))?,
        None if deleted => Op::Delete,
        None => Op::Update,
    };
    let op = if deleted { Op::Delete } else { op };
    // `add.fields=table` names it `__table`, `add.fields=source.table` `__source_table`
    let text = |fields: &[&str]| {
        fields.iter().find_map(|f| {
            row.get(*f)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
        })
    };
    let (table, table_from_topic) = table_name(text(&["__table", "__source_table"]), rec.topic)?;
    let schema_name = source_schema(
        text(&["__schema", "__source_schema"]),
        text(&["__db", "__source_db"]),
    )?;
    let ts_ms = row
        .get("__source_ts_ms")
        .and_then(Value::as_i64)
        .or_else(|| row.get("__ts_ms").and_then(Value::as_i64))
        .or(rec.timestamp_ms);
    row.retain(|column, _| !column.starts_with("__"));
    if row.is_empty() && op != Op::Truncate {
        return Err(DecodeError::BadShape("the row has no columns"));
    }
    let mut change = Change {
        table,
        schema: schema_name,
        table_from_topic,
        key: String::new(),
        old_key: None,
        key_from_message_key: false,
        op,
        row: None,
        ts_ms,
        kafka_ts_ms: rec.timestamp_ms,
        source_pos: None,
    };
    if op == Op::Truncate {
        return Ok(DecodeOutput {
            decoded: Decoded::Change(change),
            undecodable_decimals: Vec::new(),
        });
    }
    let undecodable = decode_columns(
        &mut row,
        schema.and_then(|s| struct_fields(s, None)),
        decimal_budget,
    )?;
    let key = row_key(
        &MessageKey::parse(rec.key),
        settings,
        &change.table,
        Some(&row),
        op,
    )?;
    change.key = key.key;
    change.key_from_message_key = key.from_message_key;
    change.row = if op == Op::Delete { None } else { Some(row) };
    Ok(DecodeOutput {
        decoded: Decoded::Change(change),
        undecodable_decimals: undecodable,
    })
}

/// The `fields` of a struct schema; with `side`, of the named field (`after`/`before`).
fn struct_fields<'a>(schema: &'a Value, side: Option<&str>) -> Option<&'a Vec<Value>> {
    let fields = schema.get("fields")?.as_array()?;
    match side {
        None => Some(fields),
        Some(side) => fields
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(side))
            .and_then(|f| f.get("fields"))
            .and_then(Value::as_array),
    }
}

const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";

/// Turns binary decimals into exact decimal strings in place; returns the columns that look like
/// base64 decimals but cannot be decoded (no schema tells their scale). A decimal past the bounds
/// of [`decimal`], or decimals that together would pass `decimal_budget` bytes, are errors.
fn decode_columns(
    row: &mut Row,
    fields: Option<&Vec<Value>>,
    decimal_budget: &mut usize,
) -> Result<Vec<String>, DecodeError> {
    let mut undecodable = Vec::new();
    for (column, value) in row.iter_mut() {
        let out_of_range = |error| DecodeError::DecimalOutOfRange {
            column: quote(column),
            error,
        };
        if let Some((scale, b64)) = variable_scale(value) {
            match decimal::decode_base64(b64, scale) {
                Ok(text) => {
                    spend(decimal_budget, &text)?;
                    *value = Value::String(text);
                }
                Err(e) if e.out_of_range() => return Err(out_of_range(e)),
                // not base64: not a decimal, kept as it is
                Err(_) => {}
            }
            continue;
        }
        let Value::String(b64) = value else { continue };
        let field = fields.and_then(|fs| {
            fs.iter()
                .find(|f| f.get("field").and_then(Value::as_str) == Some(column))
        });
        match field {
            Some(f) if f.get("name").and_then(Value::as_str) == Some(DECIMAL) => {
                let scale = f
                    .get("parameters")
                    .and_then(|p| p.get("scale"))
                    .and_then(|s| {
                        s.as_str()
                            .and_then(|t| t.parse().ok())
                            .or_else(|| s.as_i64())
                    });
                match scale.map(|scale| decimal::decode_base64(b64, scale)) {
                    Some(Ok(text)) => {
                        spend(decimal_budget, &text)?;
                        *value = Value::String(text);
                    }
                    Some(Err(e)) if e.out_of_range() => return Err(out_of_range(e)),
                    Some(Err(_)) | None => undecodable.push(column.clone()),
                }
            }
            Some(_) => {}
            None if fields.is_none() && decimal::looks_like_base64_decimal(b64) => {
                undecodable.push(column.clone())
            }
            None => {}
        }
    }
    Ok(undecodable)
}

/// Takes a decoded decimal's size from the record's budget.
fn spend(budget: &mut usize, text: &str) -> Result<(), DecodeError> {
    *budget = budget
        .checked_sub(text.len())
        .ok_or(DecodeError::DecimalsTooLarge {
            slack: DECIMAL_SLACK_BYTES,
        })?;
    Ok(())
}

/// `{"scale": n, "value": base64}` (VariableScaleDecimal) -> (scale, base64).
fn variable_scale(value: &Value) -> Option<(i64, &str)> {
    let obj = value.as_object()?;
    if obj.len() != 2 {
        return None;
    }
    Some((obj.get("scale")?.as_i64()?, obj.get("value")?.as_str()?))
}
