//! The row key (message key fields or configured key columns) and the table name from a topic.

use serde_json::Value;

use super::limits::{check_key, MAX_KEY_BYTES};
use super::{DecodeError, DecodeSettings, Op, Row};

/// A record's message key, parsed once: JSON (schema-wrapped or not), or the raw text when it is
/// not JSON; `None` when absent, empty or null.
pub(super) struct MessageKey(Option<Value>);

impl MessageKey {
    pub(super) fn parse(bytes: Option<&[u8]>) -> MessageKey {
        MessageKey(bytes.and_then(parse_key))
    }

    /// Every field of the message key joined with `:` (a scalar key as its text).
    fn text(&self) -> Option<String> {
        match &self.0 {
            Some(Value::Object(fields)) if !fields.is_empty() => {
                let parts: Option<Vec<String>> = fields.values().map(key_part).collect();
                parts.map(|p| p.join(":"))
            }
            Some(Value::Object(_)) | None => None,
            Some(scalar) => key_part(scalar),
        }
    }
}

/// The fields of a record's message key (`{"id": 5}`, schema-wrapped or not) as a row: what a
/// delete whose key fell back to the message key ([`super::Change::key_from_message_key`]) can
/// still be matched with, column by column. `None` when the key is not a JSON object.
pub fn message_key_fields(bytes: Option<&[u8]>) -> Option<Row> {
    match MessageKey::parse(bytes).0 {
        Some(Value::Object(fields)) if !fields.is_empty() => Some(fields.into_iter().collect()),
        _ => None,
    }
}

/// A row key and where it came from.
pub(super) struct RowKey {
    pub key: String,
    /// Key columns are configured but neither the row nor the message key carries them, so this
    /// is the message key (see [`super::Change::key_from_message_key`]).
    pub from_message_key: bool,
}

/// The row key: configured key columns from the row (or the message key's fields of those names),
/// else every field of the message key, joined with `:`. A delete whose row lacks the key columns
/// (PostgreSQL's default replica identity puts only the primary key in `before`; a tombstone has
/// no row) falls back to the message key. An empty key names no row.
pub(super) fn row_key(
    message_key: &MessageKey,
    settings: &DecodeSettings,
    table: &str,
    row: Option<&Row>,
    op: Op,
) -> Result<RowKey, DecodeError> {
    let (key, from_message_key) = match settings.key_columns.for_table(table) {
        Some(columns) => {
            let from_key = || match &message_key.0 {
                Some(Value::Object(k)) => from_columns(columns, k),
                _ => None,
            };
            match row
                .and_then(|r| from_columns(columns, r))
                .or_else(from_key)
                .filter(|k| !k.is_empty())
            {
                Some(key) => (key, false),
                None if op == Op::Delete => (message_key.text().ok_or(DecodeError::NoKey)?, true),
                None => return Err(DecodeError::NoKey),
            }
        }
        None => (message_key.text().ok_or(DecodeError::NoKey)?, false),
    };
    if key.is_empty() {
        return Err(DecodeError::NoKey);
    }
    check_key(&key)?;
    Ok(RowKey {
        key,
        from_message_key,
    })
}

/// The key the row had before an update, when it differs from `key`: from the key columns of
/// `before`, or without key columns from `before`'s fields named as the message key's. `None`
/// when `before` does not carry them all (e.g. PostgreSQL's default replica identity).
pub(super) fn old_key(
    message_key: &MessageKey,
    settings: &DecodeSettings,
    table: &str,
    before: &Row,
    key: &str,
) -> Option<String> {
    let old = match settings.key_columns.for_table(table) {
        Some(columns) => from_columns(columns, before),
        None => match &message_key.0 {
            Some(Value::Object(fields)) if !fields.is_empty() => {
                let names: Vec<&String> = fields.keys().collect();
                from_columns(&names, before)
            }
            _ => None,
        },
    };
    old.filter(|old| !old.is_empty() && old.len() <= MAX_KEY_BYTES && old != key)
}

/// The names a key is made of in `before`: the key columns, or the message key's field names.
pub(super) fn key_names(
    message_key: &MessageKey,
    settings: &DecodeSettings,
    table: &str,
) -> Vec<String> {
    match settings.key_columns.for_table(table) {
        Some(columns) => columns.to_vec(),
        None => match &message_key.0 {
            Some(Value::Object(fields)) => fields.keys().cloned().collect(),
            _ => Vec::new(),
        },
    }
}

/// The values of `columns` in `source` joined with `:`; `None` when one is missing or null.
fn from_columns<S: AsRef<str>>(columns: &[S], source: &Row) -> Option<String> {
    let parts: Option<Vec<String>> = columns
        .iter()
        .map(|c| source.get(c.as_ref()).and_then(key_part))
        .collect();
    parts.map(|p| p.join(":"))
}

/// A message key as JSON (schema-wrapped or not); a key that is not JSON is taken as a string.
fn parse_key(bytes: &[u8]) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => match unwrap_schema(v) {
            Value::Null => None,
            v => Some(v),
        },
        Err(_) => std::str::from_utf8(bytes)
            .ok()
            .map(|s| Value::String(s.to_string())),
    }
}

/// `{"schema": .., "payload": ..}` -> payload (as for values: the schema must be null or a Kafka
/// Connect schema); anything else is itself.
pub(crate) fn unwrap_schema(v: Value) -> Value {
    match v {
        Value::Object(mut map)
            if map.len() == 2
                && map.contains_key("payload")
                && map.get("schema").is_some_and(|s| {
                    s.is_null() || s.get("type").is_some_and(Value::is_string)
                }) =>
        {
            map.remove("payload").unwrap_or(Value::Null)
        }
        other => other,
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
