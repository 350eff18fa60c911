//! `ExtractNewRecordState` output: the row itself, with metadata fields starting with `__`
//! (`__op`, `__deleted`, `__table` or `__source_table`, `__source_ts_ms`) that are read and then
//! stripped.

use serde_json::Value;

use super::columns::{decode_columns, struct_fields};
use super::envelope::{op_of, source_schema, table_name};
use super::key::{row_key, MessageKey};
use super::{Change, DecodeError, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, Row};

pub(super) fn unwrapped(
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
