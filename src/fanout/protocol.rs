//! The wire protocol, version 2 (a public contract, documented in `docs/protocol.md`): JSON text
//! frames over WebSocket, the same JSON in server-sent events.

use std::collections::HashSet;

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub use crate::config::Format;

/// The protocol version this server speaks (stated in `docs/protocol.md`; no message carries it).
pub const PROTOCOL_VERSION: u32 = 2;

/// What a client receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Serialised once (from a copy of the rows' keys and shared rows, after the table's lock)
    /// and shared by every client that subscribes while it is current. A big snapshot is several
    /// frames of about [`SNAPSHOT_PART_BYTES`]: a `snapshot` message with the first rows and
    /// `"more":true`, then `patch` messages at the same position adding the other rows, the last
    /// one without `more`.
    Snapshot {
        table: String,
        epoch: String,
        seq: u64,
        pos: String,
        rows: usize,
        parts: std::sync::Arc<[Utf8Bytes]>,
    },
    /// `kafka_ts_ms` and `polled` are not sent: they feed the latency metrics.
    Patch {
        table: String,
        epoch: String,
        seq: u64,
        pos: String,
        ts_ms: Option<i64>,
        kafka_ts_ms: Option<i64>,
        polled: Option<std::time::Instant>,
        patch: Map<String, Value>,
    },
    /// `format=rows`: one flat row per message.
    Row(Value),
    /// `format=rows`: one flat row per message, already its JSON text (a snapshot's rows: text
    /// holds a 1M-row snapshot in ~1/7 of the memory of `Value`s).
    RowText(Utf8Bytes),
    /// `format=rows` with `up_to_date=true`: the rows sent on connect are complete (every row the
    /// subscription held then was sent); what follows are changes.
    UpToDate,
    /// A subscription waits for its table to exist.
    Waiting {
        table: String,
    },
    /// The node stopped (or started again) being caught up with its input: while not, what it
    /// sends may be behind the database.
    Status {
        caught_up: bool,
        reason: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong,
    /// The answer to a publish (`ack` or `nack`), already JSON.
    Publish(String),
    /// A token sent in an `auth` or `refresh` message was accepted; it expires at `exp`.
    Authenticated {
        exp: Option<u64>,
    },
}

/// The text of a patch message.
pub fn patch_json(
    table: &str,
    epoch: &str,
    seq: u64,
    pos: &str,
    ts_ms: Option<i64>,
    patch: &Map<String, Value>,
) -> String {
    json!({"type": "patch", "table": table, "epoch": epoch, "seq": seq, "pos": pos, "ts_ms": ts_ms, "patch": patch})
        .to_string()
}

/// Target size of one frame of a snapshot: a client's and the server's per-connection buffers
/// stay about this big however large the table is.
pub const SNAPSHOT_PART_BYTES: usize = 128 * 1024;

impl Outgoing {
    /// The frames to send, in order: a snapshot's shared frames without a copy, every other
    /// message as one JSON text.
    pub fn frames(&self) -> Vec<Utf8Bytes> {
        let text = match self {
            Outgoing::Snapshot { parts, .. } => return parts.to_vec(),
            Outgoing::RowText(text) => return vec![text.clone()],
            Outgoing::Patch {
                table,
                epoch,
                seq,
                pos,
                ts_ms,
                patch,
                ..
            } => patch_json(table, epoch, *seq, pos, *ts_ms, patch),
            Outgoing::Row(row) => row.to_string(),
            Outgoing::UpToDate => json!({"__up_to_date": true}).to_string(),
            Outgoing::Waiting { table } => json!({
                "type": "waiting",
                "table": table,
                "message": "the table does not exist yet; its snapshot follows when it appears"
            })
            .to_string(),
            Outgoing::Status { caught_up, reason } => {
                json!({"type": "status", "caught_up": caught_up, "reason": reason}).to_string()
            }
            Outgoing::Error { code, message } => {
                json!({"type": "error", "code": code.as_str(), "message": message, "fatal": code.is_fatal()})
                    .to_string()
            }
            Outgoing::Pong => json!({"type": "pong"}).to_string(),
            Outgoing::Publish(text) => text.clone(),
            Outgoing::Authenticated { exp } => {
                json!({"type": "authenticated", "exp": exp}).to_string()
            }
        };
        vec![text.into()]
    }

    /// The resume token, for SSE event ids.
    pub fn event_id(&self) -> Option<String> {
        match self {
            Outgoing::Snapshot { pos, .. } | Outgoing::Patch { pos, .. } if !pos.is_empty() => {
                Some(pos.clone())
            }
            _ => None,
        }
    }

    /// A `format=rows` message's row, parsed (tests).
    #[cfg(test)]
    pub fn row_value(&self) -> Option<Value> {
        match self {
            Outgoing::Row(v) => Some(v.clone()),
            Outgoing::RowText(t) => serde_json::from_str(t.as_str()).ok(),
            _ => None,
        }
    }

    pub fn event_name(&self) -> &'static str {
        match self {
            Outgoing::Snapshot { .. } => "snapshot",
            Outgoing::Patch { .. } => "patch",
            Outgoing::Row(_) | Outgoing::RowText(_) => "row",
            Outgoing::UpToDate => "up_to_date",
            Outgoing::Waiting { .. } => "waiting",
            Outgoing::Status { .. } => "status",
            Outgoing::Error { .. } => "error",
            Outgoing::Pong => "pong",
            Outgoing::Publish(_) => "publish",
            Outgoing::Authenticated { .. } => "authenticated",
        }
    }
}

/// Error codes sent to clients; fatal ones are followed by a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadMessage,
    UnknownTable,
    TooManySubscriptions,
    RateLimited,
    SlowConsumer,
    ServerBusy,
    /// No place for a copy of a table of this client's own (`--max-table-copies`): the
    /// subscription was not made; the client may try again.
    Busy,
    /// No token, or one that does not verify (fatal before the connection is authenticated).
    Unauthorized,
    /// The token expired (fatal).
    TokenExpired,
    /// The token does not allow this subscription.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownTable => "unknown_table",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::Busy => "busy",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
        }
    }

    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::SlowConsumer | ErrorCode::ServerBusy | ErrorCode::TokenExpired
        )
    }
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Subscribe {
        table: String,
        #[serde(default)]
        keys: Option<Vec<String>>,
        #[serde(default)]
        since: Option<String>,
        /// A filter expression (docs/protocol.md, "Filters and columns").
        #[serde(default, rename = "where")]
        filter: Option<String>,
        /// The columns to receive: `["a","b"]` or `"a,b"`.
        #[serde(default)]
        columns: Option<Columns>,
    },
    Unsubscribe {
        table: String,
    },
    Ping,
    /// Write a record to a writable topic (docs/publish.md).
    Publish(crate::publish::PublishRequest),
    /// The token, as the first message when the upgrade request carried none.
    Auth {
        token: String,
    },
    /// A new token replacing the connection's (before the old one expires).
    Refresh {
        token: String,
    },
}

/// A `columns` list in a subscribe message: an array of names or one comma-separated string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Columns {
    List(Vec<String>),
    Text(String),
}

impl Columns {
    /// As `a,b` (names with a comma cannot be listed).
    pub fn spec(&self) -> String {
        match self {
            Columns::List(v) => v.join(","),
            Columns::Text(s) => s.clone(),
        }
    }
}

/// The query of `/ws`, `/sse` and `/`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SubscribeQuery {
    pub table: Option<String>,
    pub keys: Option<String>,
    pub since: Option<String>,
    pub format: Option<String>,
    /// A filter expression over the row's columns (`where=price > 2.5 AND league = 'EPL'`).
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// The columns to receive, comma-separated.
    pub columns: Option<String>,
    /// `format=rows`: `true` sends `{"__up_to_date":true}` after the rows sent on connect.
    pub up_to_date: Option<String>,
}

impl SubscribeQuery {
    /// Whether the client asked for the end-of-initial-rows marker (`up_to_date=true` or `1`),
    /// or the error for the client.
    pub fn up_to_date(&self) -> Result<bool, String> {
        match self.up_to_date.as_deref() {
            None | Some("false" | "0") => Ok(false),
            Some("true" | "1") => Ok(true),
            Some(v) => Err(format!("up_to_date={v}: use true or false")),
        }
    }

    /// The selection the query asks for, or the error for the client.
    pub fn selector(&self) -> Result<super::selector::Selector, String> {
        super::selector::Selector::build(
            parse_keys(self.keys.as_deref()),
            self.filter.as_deref(),
            self.columns.as_deref(),
        )
    }
}

/// `k1,k2` -> key set; empty means the whole table.
pub fn parse_keys(s: Option<&str>) -> Option<HashSet<String>> {
    let keys: HashSet<String> = s?
        .split(',')
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect();
    (!keys.is_empty()).then_some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_strictly() {
        assert_eq!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","table":"t","keys":["a"]}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                table: "t".into(),
                keys: Some(vec!["a".into()]),
                since: None,
                filter: None,
                columns: None,
            }
        );
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"subscribe","table":"t","where":"a > 1","columns":["a","b"]}"#,
        )
        .unwrap();
        let ClientMessage::Subscribe {
            filter, columns, ..
        } = m
        else {
            panic!("a subscribe message");
        };
        assert_eq!(filter.as_deref(), Some("a > 1"));
        assert_eq!(columns.map(|c| c.spec()).as_deref(), Some("a,b"));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"subscribe"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"nope"}"#).is_err());
        // unknown fields are ignored, so newer clients keep working
        assert_eq!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"ping","x":1}"#).unwrap(),
            ClientMessage::Ping
        );
    }

    #[test]
    fn keys() {
        assert_eq!(parse_keys(Some("a,b,")).unwrap().len(), 2);
        assert!(parse_keys(Some("")).is_none());
    }

    #[test]
    fn frames() {
        let p = Outgoing::Patch {
            table: "t".into(),
            epoch: "e".into(),
            seq: 3,
            pos: "e~3".into(),
            ts_ms: Some(9),
            kafka_ts_ms: None,
            polled: None,
            patch: Map::new(),
        };
        assert_eq!(
            p.frames()[0].as_str(),
            r#"{"type":"patch","table":"t","epoch":"e","seq":3,"pos":"e~3","ts_ms":9,"patch":{}}"#
        );
        assert_eq!(p.event_id().unwrap(), "e~3");
    }
}
