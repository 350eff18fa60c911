//! `ExtractNewRecordState` output: the row itself, with metadata fields starting with `__`
//! (`__op`, `__deleted`, `__table` or `__source_table`, `__source_ts_ms`) that are read and then
//! stripped.

use serde_json::Value;

use super::columns::decode_columns;
use super::envelope::{op_of, source_schema, table_name};
use super::key::{row_key, MessageKey};
use super::raw::{self, Fields};
use super::schema::Schema;
use super::{Change, DecodeError, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, Row};

pub(super) fn unwrapped(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Schema<'_>>,
    fields: &Fields<'_>,
    decimal_budget: &mut usize,
) -> Result<DecodeOutput, DecodeError> {
    let deleted = match fields.value("__deleted")? {
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(Value::Bool(b)) => b,
        None | Some(Value::Null) => false,
        Some(_) => return Err(DecodeError::BadShape("`__deleted` is not true or false")),
    };
    let op = match fields.value("__op")? {
        Some(op) => op_of(Some(&op))?,
        None if deleted => Op::Delete,
        None => Op::Update,
    };
    let op = if deleted { Op::Delete } else { op };
    // `add.fields=table` names it `__table`, `add.fields=source.table` `__source_table`
    let text = |names: &[&str]| -> Result<Option<String>, DecodeError> {
        for name in names {
            if let Some(t) = fields.str(name)?.filter(|t| !t.is_empty()) {
                return Ok(Some(t.into_owned()));
            }
        }
        Ok(None)
    };
    let (table, table_from_topic) =
        table_name(text(&["__table", "__source_table"])?.as_deref(), rec.topic)?;
    let schema_name = source_schema(
        text(&["__schema", "__source_schema"])?.as_deref(),
        text(&["__db", "__source_db"])?.as_deref(),
    )?;
    let ts_ms = match fields.i64("__source_ts_ms")? {
        Some(ts) => Some(ts),
        None => fields.i64("__ts_ms")?,
    }
    .or(rec.timestamp_ms);
    // in member order: duplicates resolve as in a `Value` parse
    let mut row = Row::new();
    for (column, value) in fields.iter() {
        if !column.starts_with("__") {
            row.insert(column.to_string(), raw::value(value)?);
        }
    }
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
    let field_schemas = match schema {
        Some(s) => s.struct_fields(None)?,
        None => None,
    };
    let undecodable = decode_columns(&mut row, field_schemas.as_ref(), decimal_budget)?;
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
