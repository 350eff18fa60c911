//! Records of `upsert` and `events` topics -> view inputs (pure: bytes in, rows out).
//!
//! - `upsert`: the value is the row JSON (an object; a `{"schema", "payload"}` wrapper is
//!   unwrapped), a null or empty value deletes; the key is the Kafka message key, or the
//!   configured key columns of the row. A plain KTable topic.
//! - `events`: the value is one event (an object); a null value is no event. The event key is the
//!   configured key columns of the event, else the message key, else none.
//!
//! A message key is rendered as the CDC tables render theirs: a JSON string as it is, another
//! scalar as its JSON text, an object as its field values joined with `:` (only the key columns'
//! fields when key columns are configured), and bytes that are not JSON as UTF-8 text.

use serde_json::Value;

use super::value::{group_key, key_part};
use crate::cdc::decode::{unwrap_schema, Row};

/// Why a record of an upsert or events topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("record value is not JSON")]
    NotJson,
    #[error("record value is not a JSON object")]
    NotAnObject,
    #[error("record has no usable key")]
    NoKey,
}

/// One record of an upsert topic: the row key and the new row (`None` deletes it).
#[derive(Debug, Clone, PartialEq)]
pub struct UpsertRecord {
    pub key: String,
    pub row: Option<Row>,
}

/// One record of an events topic.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub key: Option<String>,
    pub row: Row,
}

fn parse_value(bytes: Option<&[u8]>) -> Result<Option<Row>, InputError> {
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|_| InputError::NotJson)?;
    match unwrap_schema(v) {
        Value::Null => Ok(None),
        Value::Object(row) => Ok(Some(row)),
        _ => Err(InputError::NotAnObject),
    }
}

fn message_key(bytes: Option<&[u8]>, key_columns: Option<&[String]>) -> Option<String> {
    let bytes = bytes.filter(|b| !b.is_empty())?;
    let v = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => unwrap_schema(v),
        Err(_) => return std::str::from_utf8(bytes).ok().map(str::to_string),
    };
    match v {
        Value::Object(fields) => match key_columns {
            Some(columns) => group_key(&fields, columns),
            None if fields.is_empty() => None,
            None => {
                let parts: Option<Vec<String>> =
                    fields.values().map(|v| key_part(Some(v))).collect();
                parts.map(|p| p.join(":"))
            }
        },
        scalar => key_part(Some(&scalar)),
    }
}

/// Decodes one record of an `upsert` topic.
pub fn decode_upsert(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    key_columns: Option<&[String]>,
) -> Result<UpsertRecord, InputError> {
    let row = parse_value(value)?;
    let from_row = match (&row, key_columns) {
        (Some(r), Some(columns)) => group_key(r, columns),
        _ => None,
    };
    let key = from_row
        .or_else(|| message_key(key, key_columns))
        .ok_or(InputError::NoKey)?;
    Ok(UpsertRecord { key, row })
}

/// Decodes one record of an `events` topic; `Ok(None)` for a null value.
pub fn decode_event(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    key_columns: Option<&[String]>,
) -> Result<Option<EventRecord>, InputError> {
    let Some(row) = parse_value(value)? else {
        return Ok(None);
    };
    let key = match key_columns {
        Some(columns) => group_key(&row, columns).or_else(|| message_key(key, key_columns)),
        None => message_key(key, None),
    };
    Ok(Some(EventRecord { key, row }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upsert_records() {
        let r =
            decode_upsert(Some(b"\"p1\""), Some(br#"{"player":"p1","score":5}"#), None).unwrap();
        assert_eq!(r.key, "p1");
        assert_eq!(r.row.unwrap()["score"], json!(5));
        let tomb = decode_upsert(Some(b"p1"), None, None).unwrap();
        assert_eq!((tomb.key.as_str(), tomb.row), ("p1", None));
        let null = decode_upsert(Some(br#"{"id":7}"#), Some(b"null"), None).unwrap();
        assert_eq!((null.key.as_str(), null.row), ("7", None));
        let cols = ["league".to_string(), "id".to_string()];
        let keyed = decode_upsert(
            None,
            Some(br#"{"schema":{"type":"struct"},"payload":{"league":"nba","id":3}}"#),
            Some(&cols),
        )
        .unwrap();
        assert_eq!(keyed.key, "nba:3");
        let tomb =
            decode_upsert(Some(br#"{"league":"nba","id":3,"x":1}"#), None, Some(&cols)).unwrap();
        assert_eq!(tomb.key, "nba:3");
        // a row of two columns, one named `schema`, is a row (not an envelope without payload)
        let row = decode_upsert(Some(b"7"), Some(br#"{"schema":"public","id":7}"#), None).unwrap();
        assert_eq!(row.row.unwrap()["schema"], json!("public"));
        let e = decode_event(Some(b"k"), Some(br#"{"schema":"v2","amount":5}"#), None)
            .unwrap()
            .unwrap();
        assert_eq!(e.row["amount"], json!(5));
        assert_eq!(
            decode_upsert(None, Some(b"{}"), None),
            Err(InputError::NoKey)
        );
        assert_eq!(
            decode_upsert(Some(b"k"), Some(b"[1]"), None),
            Err(InputError::NotAnObject)
        );
        assert_eq!(
            decode_upsert(Some(b"k"), Some(b"{oops"), None),
            Err(InputError::NotJson)
        );
    }

    #[test]
    fn event_records() {
        let e = decode_event(
            Some(b"acc1"),
            Some(br#"{"account":"A","amount":"1.50"}"#),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("acc1"));
        let cols = ["account".to_string()];
        let e = decode_event(
            None,
            Some(br#"{"account":"A","amount":"1.50"}"#),
            Some(&cols),
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("A"));
        let e = decode_event(None, Some(br#"{"amount":1}"#), None)
            .unwrap()
            .unwrap();
        assert_eq!(e.key, None);
        assert_eq!(decode_event(Some(b"k"), None, None), Ok(None));
        assert_eq!(
            decode_event(Some(b"k"), Some(b"5"), None),
            Err(InputError::NotAnObject)
        );
    }
}
