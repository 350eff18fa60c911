//! The full Debezium envelope (`before`/`after`/`op`/`source`, with or without a schema) and
//! tombstones (a null value: a delete of the message key's row).

use serde_json::Value;

use super::columns::{decode_columns, struct_fields};
use super::key::{row_key, topic_table};
use super::limits::{check_name, quote};
use super::{Change, DecodeError, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, Row};

pub(super) fn envelope(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Value>,
    mut payload: Row,
    decimal_budget: &mut usize,
) -> Result<DecodeOutput, DecodeError> {
    let op = op_of(payload.get("op"))?;
    let source = payload.get("source").and_then(Value::as_object);
    let table = source
        .and_then(|s| s.get("table"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .or_else(|| topic_table(rec.topic))
        .ok_or(DecodeError::NoTable)?;
    check_name(&table)?;
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
        Some(row) => decode_columns(row, field_schemas, decimal_budget)?,
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

pub(super) fn tombstone(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
) -> Result<DecodeOutput, DecodeError> {
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

/// An op letter (`r c u d t`); anything else, a string or not, is an unknown op.
pub(super) fn op_of(op: Option<&Value>) -> Result<Op, DecodeError> {
    match op {
        Some(Value::String(letter)) => {
            Op::from_letter(letter).ok_or_else(|| DecodeError::UnknownOp(quote(letter)))
        }
        Some(other) => Err(DecodeError::UnknownOp(quote(&other.to_string()))),
        None => Err(DecodeError::UnknownOp(String::new())),
    }
}
