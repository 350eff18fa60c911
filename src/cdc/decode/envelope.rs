//! The full Debezium envelope (`before`/`after`/`op`/`source`, with or without a schema) and
//! tombstones (a null value: a delete of the message key's row). Only what a change needs is
//! built: the row side the op names, the few `source` fields, and `before`'s key columns for an
//! update; the rest of the envelope is skipped unparsed.

use serde_json::Value;

use super::columns::decode_columns;
use super::key::{key_names, old_key, row_key, topic_table, MessageKey};
use super::limits::{check_name, quote};
use super::raw::{self, Fields};
use super::schema::Schema;
use super::sequence;
use super::{Change, DecodeError, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, Row};

pub(super) fn envelope(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    schema: Option<&Schema<'_>>,
    payload: &Fields<'_>,
    decimal_budget: &mut usize,
) -> Result<DecodeOutput, DecodeError> {
    let op = op_of(payload.value("op")?.as_ref())?;
    let source = payload
        .get("source")
        .map(raw::object)
        .transpose()?
        .flatten();
    let source_str = |name| source.as_ref().map(|s| s.str(name)).transpose();
    let (table, table_from_topic) =
        table_name(source_str("table")?.flatten().as_deref(), rec.topic)?;
    let schema_name = source_schema(
        source_str("schema")?.flatten().as_deref(),
        source_str("db")?.flatten().as_deref(),
    )?;
    let source_ts = match &source {
        Some(s) => s.i64("ts_ms")?,
        None => None,
    };
    let ts_ms = match source_ts {
        Some(ts) => Some(ts),
        None => payload.i64("ts_ms")?,
    }
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
        source_pos: sequence::postgres(
            source_str("connector")?.flatten().as_deref(),
            source_str("name")?.flatten().as_deref(),
            source_str("sequence")?.flatten().as_deref(),
        ),
    };
    if op == Op::Truncate {
        return Ok(DecodeOutput {
            decoded: Decoded::Change(change),
            undecodable_decimals: Vec::new(),
        });
    }
    let side = if op == Op::Delete { "before" } else { "after" };
    let mut row = match payload.get(side) {
        Some(r) if raw::is_object(r) => Some(
            serde_json::from_str::<Row>(r.get())
                .map_err(|e| DecodeError::InvalidJson(e.to_string()))?,
        ),
        Some(r) if raw::is_null(r) && op == Op::Delete => None,
        None if op == Op::Delete => None,
        _ => {
            return Err(DecodeError::BadShape(if op == Op::Delete {
                "`before` is not an object"
            } else {
                "`after` is not an object"
            }))
        }
    };
    let field_schemas = match schema {
        Some(s) => s.struct_fields(Some(side))?,
        None => None,
    };
    let undecodable = match row.as_mut() {
        Some(row) => decode_columns(row, field_schemas.as_ref(), decimal_budget)?,
        None => Vec::new(),
    };
    let message_key = MessageKey::parse(rec.key);
    let key = row_key(&message_key, settings, &change.table, row.as_ref(), op)?;
    if op == Op::Update {
        if let Some(before) = payload
            .get("before")
            .map(raw::object)
            .transpose()?
            .flatten()
        {
            // only the key's columns of `before`, decoded as the row's are (a Decimal key)
            let mut old = Row::new();
            let names = key_names(&message_key, settings, &change.table);
            // many key columns: looked up in an index of `before`, not each by a scan of it
            let index = (names.len() > 16).then(|| before.index());
            for column in names {
                let found = match &index {
                    Some(index) => index.get(column.as_str()).copied(),
                    None => before.get(&column),
                };
                if let Some(v) = found {
                    old.insert(column, raw::value(v)?);
                }
            }
            let before_schemas = match schema {
                Some(s) => s.struct_fields(Some("before"))?,
                None => None,
            };
            decode_columns(&mut old, before_schemas.as_ref(), decimal_budget)?;
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

pub(super) fn tombstone(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
) -> Result<DecodeOutput, DecodeError> {
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
pub(super) fn op_of(op: Option<&Value>) -> Result<Op, DecodeError> {
    match op {
        Some(Value::String(letter)) => {
            Op::from_letter(letter).ok_or_else(|| DecodeError::UnknownOp(quote(letter)))
        }
        Some(other) => Err(DecodeError::UnknownOp(quote(&other.to_string()))),
        None => Err(DecodeError::UnknownOp(String::new())),
    }
}

/// The table named by the record, else the topic's last segment (then `true`); checked.
pub(super) fn table_name(named: Option<&str>, topic: &str) -> Result<(String, bool), DecodeError> {
    let (table, from_topic) = match named.filter(|t| !t.is_empty()) {
        Some(t) => (t.to_string(), false),
        None => (topic_table(topic).ok_or(DecodeError::NoTable)?, true),
    };
    check_name(&table)?;
    Ok((table, from_topic))
}

/// The schema, else the database, when the record names one; checked.
pub(super) fn source_schema(
    schema: Option<&str>,
    db: Option<&str>,
) -> Result<Option<String>, DecodeError> {
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
