//! Debezium JSON -> [`Change`] (pure: no I/O, no clocks, no globals).
//!
//! Handles every shape a Debezium/Kafka Connect JSON pipeline produces: the full envelope
//! (`before`/`after`/`op`/`source`) with or without `schemas.enable` (`schema` + `payload`), the
//! `ExtractNewRecordState` output (`__deleted`, `__op`, `__table`, `__source_ts_ms`) in rewrite and
//! tombstone modes, tombstones (null value), ops `r c u d t`, and the records that are not row
//! changes (schema changes, heartbeats, transaction markers, logical messages), which are skipped.
//! Invariants: for any input bytes `decode` returns, it never panics, and it never allocates
//! more than a bounded multiple of the record's size: every size a record can ask for (decimal
//! scales and digits, nesting, key and name lengths) is bounded (`limits`, [`crate::cdc::decimal`])
//! and a record past a bound is a [`DecodeError`] with its own reason.
//!
//! Decoding is lazy (issue 14): the record is read one level at a time with its members borrowed
//! and unparsed (`raw`), the Connect schema only for what it says of decimals (`schema`), and only
//! what a change needs is built into `Value`s: the row side its op names, a few `source` fields,
//! and for an update the key columns of `before`. The output is the one a full `Value` parse gave
//! (`tests/same_output.rs` checks it against that decoder, kept as `tests/reference.rs`).

use serde_json::{Map, Value};

use crate::cdc::decimal::DecimalError;
use crate::config::KeyColumns;

mod columns;
mod envelope;
mod key;
mod limits;
mod raw;
mod schema;
mod sequence;
mod unwrapped;
mod upsert;

use envelope::{envelope, tombstone};
use raw::{Fields, Json};
use schema::Schema;
use unwrapped::unwrapped;

pub use key::message_key_fields;
pub(crate) use key::unwrap_schema;
pub use limits::{DECIMAL_SLACK_BYTES, MAX_DEPTH, MAX_KEY_BYTES, MAX_NAME_BYTES};
pub use sequence::SourcePos;
pub use upsert::UpsertInput;

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
    /// The table's short name: `source.table`, else `__table`/`__source_table`, else the topic's
    /// last dot-separated segment (then [`Change::table_from_topic`] is true).
    pub table: String,
    /// The source schema or database the table belongs to: `source.schema`, else `source.db`
    /// (unwrapped rows: `__schema`, `__source_schema`, `__db`, `__source_db`), so that
    /// `public.users` and `auth.users` can be told apart; `None` when the record does not say
    /// (tombstones, unwrapped rows without those fields). The naming policy is the table layer's.
    pub schema: Option<String>,
    /// True when `table` was inferred from the topic's last segment (tombstones, and records
    /// without `source.table`/`__table`): on a topic routed to another name it need not be the
    /// table's real name, so the table layer can resolve it, e.g. a tombstone to the table its
    /// key had on that topic.
    pub table_from_topic: bool,
    /// The row key (empty for a truncate, never empty otherwise, at most
    /// [`MAX_KEY_BYTES`] bytes).
    pub key: String,
    /// For an update whose row key changed: the key the row had before (from `before`), so the
    /// old row can be deleted. It arises with `--key-columns` when an update changes a key
    /// column; with message keys Debezium sends a primary-key change as a delete and a create,
    /// but an update whose `before` holds the message key's fields with other values sets it too.
    /// Needs `before` to carry the key columns (PostgreSQL: `REPLICA IDENTITY FULL`, or key
    /// columns in the replica identity); `None` otherwise.
    pub old_key: Option<String>,
    /// True when `--key-columns` apply to the table but the record does not carry them, so `key`
    /// is the message key (its fields joined with `:`) instead. Only deletes fall back: under
    /// PostgreSQL's default replica identity a delete's `before` holds only the primary-key
    /// columns, and a tombstone has no row. Such a key names the row only when the key columns
    /// and the message key agree; otherwise the table layer must map it (or ignore the delete).
    pub key_from_message_key: bool,
    pub op: Op,
    /// The row after the change; `None` for deletes and truncates.
    pub row: Option<Row>,
    /// The database commit time (`source.ts_ms`), else the event time, else the Kafka timestamp.
    pub ts_ms: Option<i64>,
    /// The Kafka record's timestamp (for the Kafka-to-socket latency metric).
    pub kafka_ts_ms: Option<i64>,
    /// The change's position in its connector's stream, when the connector states one that
    /// orders its events (PostgreSQL's `source.sequence`): re-sent events are told by it.
    pub source_pos: Option<SourcePos>,
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
// a Change is moved once, into the batch; boxing it would cost an allocation per record
#[allow(clippy::large_enum_variant)]
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
    #[error("column `{column}`: {error}")]
    DecimalOutOfRange { column: String, error: DecimalError },
    #[error("the decimals of the record expand to more than twice its size plus {slack} bytes")]
    DecimalsTooLarge { slack: usize },
    #[error("JSON nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("row key of {size} bytes exceeds the limit of {limit} bytes")]
    KeyTooLong { size: usize, limit: usize },
    #[error("table or schema name `{0}` is longer than 255 bytes or has control characters")]
    BadName(String),
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
            DecodeError::DecimalOutOfRange { .. } => "decimal_out_of_range",
            DecodeError::DecimalsTooLarge { .. } => "decimals_too_large",
            DecodeError::TooDeep { .. } => "too_deep",
            DecodeError::KeyTooLong { .. } => "key_too_long",
            DecodeError::BadName(_) => "bad_name",
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
    /// Topics whose records are row states (`upsert` in the views file), by topic.
    pub upsert: std::sync::Arc<std::collections::HashMap<String, UpsertInput>>,
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
    if let Some(input) = settings.upsert.get(rec.topic) {
        return upsert::decode(rec, input);
    }
    if rec.topic.starts_with("__debezium-heartbeat") {
        return Ok(skip(SkipReason::Heartbeat));
    }
    let Some(value) = rec.value else {
        return tombstone(rec, settings);
    };
    if limits::nests_deeper_than(value, MAX_DEPTH) {
        return Err(DecodeError::TooDeep { limit: MAX_DEPTH });
    }
    let mut decimal_budget = size.saturating_mul(2).saturating_add(DECIMAL_SLACK_BYTES);
    let text = std::str::from_utf8(value).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let (schema, payload) = split_schema(raw::parse(text)?)?;
    let payload = match payload {
        Json::Object(fields) => fields,
        Json::Null => return tombstone(rec, settings),
        Json::Other => return Err(DecodeError::NotAnObject),
    };
    if let Some(reason) = non_change(&payload)? {
        return Ok(skip(reason));
    }
    if is_envelope(&payload) {
        if payload.str("op")?.as_deref() == Some("m") {
            return Ok(skip(SkipReason::Message));
        }
        envelope(
            rec,
            settings,
            schema.as_ref(),
            &payload,
            &mut decimal_budget,
        )
    } else {
        unwrapped(
            rec,
            settings,
            schema.as_ref(),
            &payload,
            &mut decimal_budget,
        )
    }
}

/// A Debezium envelope: `op` with `before` or `after`, or with a `source` block. A row of
/// `ExtractNewRecordState` output has metadata fields (`__op`, `__table`, ...) that an envelope
/// never has at its top level, so such a row stays a row whatever its columns are called. A
/// record that is plainly an envelope with a bad `op` or row is then an error, not a row.
fn is_envelope(payload: &Fields<'_>) -> bool {
    payload.contains_key("op")
        && (payload.contains_key("before")
            || payload.contains_key("after")
            || payload.get("source").is_some_and(raw::is_object))
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
fn split_schema(top: Json<'_>) -> Result<(Option<Schema<'_>>, Json<'_>), DecodeError> {
    let Json::Object(fields) = top else {
        return Ok((None, top));
    };
    if fields.len() != 2 {
        return Ok((None, Json::Object(fields)));
    }
    let (Some(schema), Some(payload)) = (fields.get("schema"), fields.get("payload")) else {
        return Ok((None, Json::Object(fields)));
    };
    if raw::is_null(schema) {
        return Ok((None, raw::parse(payload.get())?));
    }
    match Schema::read(schema)? {
        Some(s) if s.typed => Ok((Some(s), raw::parse(payload.get())?)),
        _ => Ok((None, Json::Object(fields))),
    }
}

/// Records on change topics that are not row changes, by their exact Debezium shapes, so that a
/// row with a column called `ddl` or `status` is still a row: schema changes carry a `source`
/// block and `ddl`/`tableChanges`/`databaseName`; transaction markers `status` BEGIN/END, `id`,
/// `event_count` and `data_collections`; heartbeats are `{"ts_ms": n}` alone (on any topic: the
/// heartbeat topic prefix is configurable).
fn non_change(payload: &Fields<'_>) -> Result<Option<SkipReason>, DecodeError> {
    if payload.contains_key("op") {
        return Ok(None);
    }
    if payload.get("source").is_some_and(raw::is_object)
        && (payload.contains_key("ddl")
            || payload.contains_key("tableChanges")
            || payload.contains_key("databaseName"))
    {
        return Ok(Some(SkipReason::SchemaChange));
    }
    if matches!(payload.str("status")?.as_deref(), Some("BEGIN" | "END"))
        && payload.contains_key("id")
        && payload.contains_key("event_count")
        && payload.contains_key("data_collections")
    {
        return Ok(Some(SkipReason::Transaction));
    }
    if payload.len() == 1 && payload.value("ts_ms")?.is_some_and(|v| v.is_i64()) {
        return Ok(Some(SkipReason::Heartbeat));
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
