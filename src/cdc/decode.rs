//! Debezium JSON -> [`Change`] (pure: no I/O, no clocks, no globals).
//!
//! Handles every shape a Debezium/Kafka Connect JSON pipeline produces: the full envelope
//! (`before`/`after`/`op`/`source`) with or without `schemas.enable` (`schema` + `payload`), the
//! `ExtractNewRecordState` output (`__deleted`, `__op`, `__table`, `__source_ts_ms`) in rewrite and
//! tombstone modes, tombstones (null value), ops `r c u d t`, and the records that are not row
//! changes (schema changes, heartbeats, transaction markers, logical messages), which are skipped.
//! Invariant: for any input bytes `decode` returns, it never panics.

use serde_json::{Map, Value};

use super::decimal;
use crate::config::KeyColumns;

/// A row: column name -> JSON value, in the source's column order.
pub type Row = Map<String, Value>;

/// The kind of a change, as Debezium names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `r`: a snapshot read.
    Read,
    /// `c`: an insert.
    Create,
    /// `u`: an update.
    Update,
    /// `d`: a delete (also a tombstone, and `__deleted=true`).
    Delete,
    /// `t`: a truncate; clears the table.
    Truncate,
}

impl Op {
    /// The Debezium letter, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }

    fn from_letter(s: &str) -> Option<Op> {
        Some(match s {
            "r" => Op::Read,
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            _ => return None,
        })
    }
}

/// One row change of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    /// The row key (empty for a truncate).
    pub key: String,
    pub op: Op,
    /// The row after the change; `None` for deletes and truncates.
    pub row: Option<Row>,
    /// The database commit time (`source.ts_ms`), else the event time, else the Kafka timestamp.
    pub ts_ms: Option<i64>,
    /// The Kafka record's timestamp (for the Kafka-to-socket latency metric).
    pub kafka_ts_ms: Option<i64>,
}

/// Why a well-formed record carries no row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    SchemaChange,
    Heartbeat,
    Transaction,
    Message,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::SchemaChange => "schema_change",
            SkipReason::Heartbeat => "heartbeat",
            SkipReason::Transaction => "transaction",
            SkipReason::Message => "message",
        }
    }
}

/// What one record decodes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Change(Change),
    Skip(SkipReason),
}

/// The decoded record plus the columns whose values look like base64 decimals that could not be
/// decoded (no schema): the caller counts and warns about them.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOutput {
    pub decoded: Decoded,
    pub undecodable_decimals: Vec<String>,
}

/// Why a record cannot be decoded; it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized { size: usize, limit: usize },
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("value is not a JSON object")]
    NotAnObject,
    #[error("not a Debezium change event: {0}")]
    BadShape(&'static str),
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("no row key: the message key is empty and no key columns are configured or present")]
    NoKey,
    #[error("no table name in the record or topic")]
    NoTable,
}

impl DecodeError {
    /// A short fixed label for metrics and the `livetable.dlq.reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::BadShape(_) => "bad_shape",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::NoKey => "no_key",
            DecodeError::NoTable => "no_table",
        }
    }
}

/// A Kafka record as the decoder sees it.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
}

/// Settings that change how records decode.
#[derive(Debug, Clone)]
pub struct DecodeSettings {
    pub key_columns: KeyColumns,
    pub max_record_bytes: usize,
}

/// Decodes one record.
pub fn decode(rec: &RawRecord<'_>, settings: &DecodeSettings) -> Result<DecodeOutput, DecodeError> {
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
    let parsed: Value =
        serde_json::from_slice(value).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let (schema, payload) = split_schema(parsed);
    let payload = match payload {
        Value::Object(map) => map,
        Value::Null => return tombstone(rec, settings),
        _ => return Err(DecodeError::NotAnObject),
    };
    if let Some(reason) = non_change(rec.topic, &payload) {
        return Ok(skip(reason));
    }
    if payload.get("op").is_some_and(Value::is_string)
        && (payload.contains_key("after") || payload.contains_key("before"))
    {
        envelope(rec, settings, schema.as_ref(), payload)
    } else if let Some(op) = payload
        .get("op")
        .and_then(Value::as_str)
        .filter(|op| matches!(*op, "t" | "m"))
    {
        if op == "m" {
            return Ok(skip(SkipReason::Message));
        }
        envelope(rec, settings, schema.as_ref(), payload)
    } else {
        unwrapped(rec, settings, schema.as_ref(), payload)
    }
}

fn skip(reason: SkipReason) -> DecodeOutput {
    DecodeOutput {
        decoded: Decoded::Skip(reason),
        undecodable_decimals: Vec::new(),
    }
}

/// `{"schema": .., "payload": ..}` -> (schema, payload); anything else is its own payload.
fn split_schema(v: Value) -> (Option<Value>, Value) {
    match v {
        Value::Object(mut map)
            if map.len() == 2 && map.contains_key("schema") && map.contains_key("payload") =>
        {
            let payload = map.remove("payload").unwrap_or(Value::Null);
            (map.remove("schema").filter(|s| !s.is_null()), payload)
        }
        other => (None, other),
    }
}

/// Records on change topics that are not row changes.
fn non_change(topic: &str, payload: &Row) -> Option<SkipReason> {
    if payload.contains_key("ddl") || payload.contains_key("tableChanges") {
        return Some(SkipReason::SchemaChange);
    }
    if payload.contains_key("databaseName")
        && payload.contains_key("source")
        && !payload.contains_key("op")
    {
        return Some(SkipReason::SchemaChange);
    }
    let status = payload.get("status").and_then(Value::as_str);
    if matches!(status, Some("BEGIN" | "END"))
        && payload.contains_key("id")
        && !payload.contains_key("op")
    {
        return Some(SkipReason::Transaction);
    }
    if payload.len() == 1 && payload.contains_key("ts_ms")
        || topic.contains("heartbeat") && !payload.contains_key("op")
    {
        return Some(SkipReason::Heartbeat);
    }
    None
}

fn envelope(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Value>,
    mut payload: Row,
) -> Result<DecodeOutput, DecodeError> {
    let op_text = payload
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let op = Op::from_letter(&op_text).ok_or(DecodeError::UnknownOp(op_text))?;
    let source = payload.get("source").and_then(Value::as_object);
    let table = source
        .and_then(|s| s.get("table"))
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| topic_table(rec.topic))
        .ok_or(DecodeError::NoTable)?;
    let ts_ms = source
        .and_then(|s| s.get("ts_ms"))
        .and_then(Value::as_i64)
        .or_else(|| payload.get("ts_ms").and_then(Value::as_i64))
        .or(rec.timestamp_ms);
    if op == Op::Truncate {
        let change = Change {
            table,
            key: String::new(),
            op,
            row: None,
            ts_ms,
            kafka_ts_ms: rec.timestamp_ms,
        };
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
        Some(row) => decode_columns(row, field_schemas),
        None => Vec::new(),
    };
    let key = row_key(rec, settings, &table, row.as_ref())?;
    let row = if op == Op::Delete { None } else { row };
    Ok(DecodeOutput {
        decoded: Decoded::Change(Change {
            table,
            key,
            op,
            row,
            ts_ms,
            kafka_ts_ms: rec.timestamp_ms,
        }),
        undecodable_decimals: undecodable,
    })
}

fn unwrapped(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Value>,
    mut row: Row,
) -> Result<DecodeOutput, DecodeError> {
    let deleted = match row.get("__deleted") {
        Some(Value::String(s)) => s == "true",
        Some(Value::Bool(b)) => *b,
        _ => false,
    };
    let op = match row.get("__op").and_then(Value::as_str) {
        Some(letter) => {
            Op::from_letter(letter).ok_or_else(|| DecodeError::UnknownOp(letter.to_string()))?
        }
        None if deleted => Op::Delete,
        None => Op::Update,
    };
    let op = if deleted { Op::Delete } else { op };
    let table = row
        .get("__table")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| topic_table(rec.topic))
        .ok_or(DecodeError::NoTable)?;
    let ts_ms = row
        .get("__source_ts_ms")
        .and_then(Value::as_i64)
        .or_else(|| row.get("__ts_ms").and_then(Value::as_i64))
        .or(rec.timestamp_ms);
    row.retain(|column, _| !column.starts_with("__"));
    if row.is_empty() && op != Op::Truncate {
        return Err(DecodeError::BadShape("the row has no columns"));
    }
    if op == Op::Truncate {
        let change = Change {
            table,
            key: String::new(),
            op,
            row: None,
            ts_ms,
            kafka_ts_ms: rec.timestamp_ms,
        };
        return Ok(DecodeOutput {
            decoded: Decoded::Change(change),
            undecodable_decimals: Vec::new(),
        });
    }
    let undecodable = decode_columns(&mut row, schema.and_then(|s| struct_fields(s, None)));
    let key = row_key(rec, settings, &table, Some(&row))?;
    let row = if op == Op::Delete { None } else { Some(row) };
    Ok(DecodeOutput {
        decoded: Decoded::Change(Change {
            table,
            key,
            op,
            row,
            ts_ms,
            kafka_ts_ms: rec.timestamp_ms,
        }),
        undecodable_decimals: undecodable,
    })
}

fn tombstone(rec: &RawRecord<'_>, settings: &DecodeSettings) -> Result<DecodeOutput, DecodeError> {
    let table = topic_table(rec.topic).ok_or(DecodeError::NoTable)?;
    let key = row_key(rec, settings, &table, None)?;
    let change = Change {
        table,
        key,
        op: Op::Delete,
        row: None,
        ts_ms: rec.timestamp_ms,
        kafka_ts_ms: rec.timestamp_ms,
    };
    Ok(DecodeOutput {
        decoded: Decoded::Change(change),
        undecodable_decimals: Vec::new(),
    })
}

/// The last dot-separated segment of a topic (`odds.public.game_odds` -> `game_odds`).
fn topic_table(topic: &str) -> Option<String> {
    topic
        .rsplit('.')
        .next()
        .filter(|t| !t.is_empty())
        .map(String::from)
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
/// base64 decimals but cannot be decoded (no schema tells their scale).
fn decode_columns(row: &mut Row, fields: Option<&Vec<Value>>) -> Vec<String> {
    let mut undecodable = Vec::new();
    for (column, value) in row.iter_mut() {
        if let Some(text) = variable_scale(value) {
            *value = Value::String(text);
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
                            .or_else(|| s.as_i64().map(|n| n as i32))
                    });
                match scale.and_then(|scale| decimal::decode_base64(b64, scale)) {
                    Some(text) => *value = Value::String(text),
                    None => undecodable.push(column.clone()),
                }
            }
            Some(_) => {}
            None if fields.is_none() && decimal::looks_like_base64_decimal(b64) => {
                undecodable.push(column.clone())
            }
            None => {}
        }
    }
    undecodable
}

/// `{"scale": n, "value": base64}` (VariableScaleDecimal) -> decimal string.
fn variable_scale(value: &Value) -> Option<String> {
    let obj = value.as_object()?;
    if obj.len() != 2 {
        return None;
    }
    let scale = i32::try_from(obj.get("scale")?.as_i64()?).ok()?;
    decimal::decode_base64(obj.get("value")?.as_str()?, scale)
}

/// The row key: configured key columns from the row (or the message key's fields of those names),
/// else every field of the message key, joined with `:`.
fn row_key(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    table: &str,
    row: Option<&Row>,
) -> Result<String, DecodeError> {
    let message_key = rec.key.and_then(parse_key);
    if let Some(columns) = settings.key_columns.for_table(table) {
        let from = |source: &Row| -> Option<String> {
            let parts: Option<Vec<String>> = columns
                .iter()
                .map(|c| source.get(c).and_then(key_part))
                .collect();
            parts.map(|p| p.join(":"))
        };
        let from_key = || match &message_key {
            Some(Value::Object(k)) => from(k),
            _ => None,
        };
        return row
            .and_then(from)
            .or_else(from_key)
            .ok_or(DecodeError::NoKey);
    }
    match message_key {
        Some(Value::Object(fields)) if !fields.is_empty() => {
            let parts: Option<Vec<String>> = fields.values().map(key_part).collect();
            parts.map(|p| p.join(":")).ok_or(DecodeError::NoKey)
        }
        Some(Value::Object(_)) | None => Err(DecodeError::NoKey),
        Some(scalar) => key_part(&scalar).ok_or(DecodeError::NoKey),
    }
}

/// A message key as JSON (schema-wrapped or not); a key that is not JSON is taken as a string.
fn parse_key(bytes: &[u8]) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => match split_schema(v) {
            (_, Value::Null) => None,
            (_, v) => Some(v),
        },
        Err(_) => std::str::from_utf8(bytes)
            .ok()
            .map(|s| Value::String(s.to_string())),
    }
}

fn key_part(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
