//! The row key (message key fields or configured key columns) and the table name from a topic.

use serde_json::Value;

use super::limits::check_key;
use super::{split_schema, DecodeError, DecodeSettings, RawRecord, Row};

/// The row key: configured key columns from the row (or the message key's fields of those names),
/// else every field of the message key, joined with `:`.
pub(super) fn row_key(
    rec: &RawRecord<'_>,
    settings: &DecodeSettings,
    table: &str,
    row: Option<&Row>,
) -> Result<String, DecodeError> {
    let key = compose_key(rec, settings, table, row)?;
    if key.is_empty() {
        return Err(DecodeError::NoKey);
    }
    check_key(&key)?;
    Ok(key)
}

fn compose_key(
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

/// The last dot-separated segment of a topic (`odds.public.game_odds` -> `game_odds`).
pub(super) fn topic_table(topic: &str) -> Option<String> {
    topic
        .rsplit('.')
        .next()
        .filter(|t| !t.is_empty())
        .map(String::from)
}
