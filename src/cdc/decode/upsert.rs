//! Records of an `upsert` topic (declared in the views file): the value is the row JSON, a null
//! value deletes, the key is the message key or the declared key columns. A plain KTable topic
//! becomes a live table like a CDC table.

use super::limits::{self, nests_deeper_than};
use super::{Change, DecodeError, DecodeOutput, Decoded, Op, RawRecord, MAX_DEPTH};
use crate::views::input::{decode_upsert, InputError};

/// How one upsert topic is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertInput {
    /// The live table it feeds.
    pub table: String,
    /// Columns that make the row key (`None`: the message key).
    pub key: Option<Vec<String>>,
}

/// Decodes one record of an upsert topic (its size was checked by the caller).
pub(super) fn decode(
    rec: &RawRecord<'_>,
    input: &UpsertInput,
) -> Result<DecodeOutput, DecodeError> {
    if let Some(v) = rec.value {
        if nests_deeper_than(v, MAX_DEPTH) {
            return Err(DecodeError::TooDeep { limit: MAX_DEPTH });
        }
    }
    let r = decode_upsert(rec.key, rec.value, input.key.as_deref()).map_err(|e| match e {
        InputError::NotJson => DecodeError::InvalidJson("the value of an upsert record".into()),
        InputError::NotAnObject => DecodeError::NotAnObject,
        InputError::NoKey => DecodeError::NoKey,
    })?;
    limits::check_key(&r.key)?;
    let op = if r.row.is_some() {
        Op::Update
    } else {
        Op::Delete
    };
    Ok(DecodeOutput {
        decoded: Decoded::Change(Change {
            table: input.table.clone(),
            schema: None,
            table_from_topic: false,
            key: r.key,
            old_key: None,
            key_from_message_key: false,
            op,
            row: r.row,
            ts_ms: rec.timestamp_ms,
            kafka_ts_ms: rec.timestamp_ms,
            source_pos: None,
        }),
        undecodable_decimals: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> RawRecord<'a> {
        RawRecord {
            topic: "prices",
            key,
            value,
            timestamp_ms: Some(7),
        }
    }

    fn change(out: DecodeOutput) -> Change {
        match out.decoded {
            Decoded::Change(c) => c,
            Decoded::Skip(r) => panic!("skipped: {r:?}"),
        }
    }

    #[test]
    fn rows_deletes_and_bad_records() {
        let by_message_key = UpsertInput {
            table: "prices".into(),
            key: None,
        };
        let c = change(
            decode(
                &rec(Some(b"\"AAPL\""), Some(br#"{"px":"1.50"}"#)),
                &by_message_key,
            )
            .unwrap(),
        );
        assert_eq!(
            (c.table.as_str(), c.key.as_str(), c.op),
            ("prices", "AAPL", Op::Update)
        );
        assert_eq!(c.row.unwrap()["px"], "1.50");
        let d = change(decode(&rec(Some(b"AAPL"), None), &by_message_key).unwrap());
        assert_eq!((d.key.as_str(), d.op, d.row), ("AAPL", Op::Delete, None));
        let by_column = UpsertInput {
            table: "prices".into(),
            key: Some(vec!["sym".into()]),
        };
        let c = change(decode(&rec(None, Some(br#"{"sym":"X","px":2}"#)), &by_column).unwrap());
        assert_eq!(c.key, "X");
        assert_eq!(
            decode(&rec(None, Some(b"[1]")), &by_column).unwrap_err(),
            DecodeError::NotAnObject
        );
        assert!(matches!(
            decode(&rec(Some(b"k"), Some(b"{no")), &by_message_key),
            Err(DecodeError::InvalidJson(_))
        ));
        assert_eq!(
            decode(&rec(None, Some(b"{}")), &by_message_key).unwrap_err(),
            DecodeError::NoKey
        );
        let deep = "[".repeat(200) + &"]".repeat(200);
        let deep = format!(r#"{{"a":{deep}}}"#);
        assert!(matches!(
            decode(&rec(Some(b"k"), Some(deep.as_bytes())), &by_message_key),
            Err(DecodeError::TooDeep { .. })
        ));
    }
}
