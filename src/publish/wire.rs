//! The wire types of publishing, the same over WebSocket and HTTP (docs/publish.md).
//!
//! Client -> server: `{"type":"publish","topic":T,"key":K,"value":{...},"id":"<client id>"}`
//! (the WebSocket layer matches `type`; [`PublishRequest`] is the rest). Server -> client:
//! [`Ack`] or [`Nack`], serialised with their `type`. Every field of a request is optional in the
//! serde sense, so a malformed publish is answered with a `bad_request` nack that carries the
//! client's id instead of failing to parse.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest client id (as JSON text) and key, in bytes.
pub const MAX_ID_BYTES: usize = 128;
pub const MAX_KEY_BYTES: usize = 1024;

/// A publish as the client sent it (the `type` field is the caller's business).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct PublishRequest {
    #[serde(default)]
    pub topic: String,
    /// A string, or absent/null for a record without a key.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub key: Value,
    #[serde(default)]
    pub value: Value,
    /// A string or a number, echoed in the answer; the idempotency key of the publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl PublishRequest {
    /// The request of `POST /api/topics/{topic}` with body `{"key":K,"value":{...}}` and an
    /// optional `Idempotency-Key` header.
    pub fn from_http(topic: &str, idempotency_key: Option<&str>, body: HttpPublishBody) -> Self {
        PublishRequest {
            topic: topic.to_string(),
            key: body.key,
            value: body.value,
            id: idempotency_key.map(|k| Value::String(k.to_string())),
        }
    }
}

/// The JSON body of `POST /api/topics/{topic}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpPublishBody {
    #[serde(default)]
    pub key: Value,
    #[serde(default)]
    pub value: Value,
}

/// The broker acknowledged the record (or did so earlier for the same id: `duplicate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub id: Option<Value>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The answer of an earlier publish with this id; nothing was produced this time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Why a publish was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NackCode {
    /// The value does not match the topic's JSON Schema (the message says where and why).
    Invalid,
    /// The topic is not writable, or the pinned field does not match the token.
    Forbidden,
    /// Key + value are larger than the topic's `max_bytes`.
    TooLarge,
    /// The connection exceeded the topic's rate limit; `retry_after_ms` says when to retry.
    RateLimited,
    /// No acknowledgement from the broker within the timeout (or shutting down, or too many
    /// publishes waiting for the broker). The record may or may not be written: retry with the
    /// same id to learn the outcome without a duplicate.
    Unavailable,
    /// Not a valid publish (missing topic or value, bad id or key, id reused for another record).
    BadRequest,
    /// The connection already has `max_in_flight` unanswered publishes.
    TooManyInFlight,
}

impl NackCode {
    pub const ALL: [NackCode; 7] = [
        NackCode::Invalid,
        NackCode::Forbidden,
        NackCode::TooLarge,
        NackCode::RateLimited,
        NackCode::Unavailable,
        NackCode::BadRequest,
        NackCode::TooManyInFlight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NackCode::Invalid => "invalid",
            NackCode::Forbidden => "forbidden",
            NackCode::TooLarge => "too_large",
            NackCode::RateLimited => "rate_limited",
            NackCode::Unavailable => "unavailable",
            NackCode::BadRequest => "bad_request",
            NackCode::TooManyInFlight => "too_many_in_flight",
        }
    }

    /// The HTTP status of `POST /api/topics/{topic}` answering with this code.
    pub fn http_status(self) -> u16 {
        match self {
            NackCode::Invalid => 422,
            NackCode::Forbidden => 403,
            NackCode::TooLarge => 413,
            NackCode::RateLimited | NackCode::TooManyInFlight => 429,
            NackCode::Unavailable => 503,
            NackCode::BadRequest => 400,
        }
    }
}

/// The publish was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    pub id: Option<Value>,
    pub code: NackCode,
    pub message: String,
    /// With `rate_limited`: when the next publish to this topic would be accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Nack {
    pub fn new(id: Option<Value>, code: NackCode, message: impl Into<String>) -> Self {
        Nack {
            id,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// The answer to one publish, as sent: `{"type":"ack",..}` or `{"type":"nack",..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ack(Ack),
    Nack(Nack),
}

impl Reply {
    /// The JSON text of the answer (a WebSocket text frame, or the HTTP body).
    pub fn to_json(&self) -> String {
        // serialising strings, numbers and JSON values cannot fail
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The HTTP status that goes with this answer: 200 for an ack (also a duplicate one).
    pub fn http_status(&self) -> u16 {
        match self {
            Reply::Ack(_) => 200,
            Reply::Nack(n) => n.code.http_status(),
        }
    }

    pub fn into_result(self) -> Result<Ack, Nack> {
        match self {
            Reply::Ack(a) => Ok(a),
            Reply::Nack(n) => Err(n),
        }
    }
}

impl From<Result<Ack, Nack>> for Reply {
    fn from(r: Result<Ack, Nack>) -> Self {
        match r {
            Ok(a) => Reply::Ack(a),
            Err(n) => Reply::Nack(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_serialise_as_documented() {
        let ack = Reply::Ack(Ack {
            id: Some(json!("c1-7")),
            topic: "bets".into(),
            partition: 2,
            offset: 41,
            duplicate: false,
        });
        assert_eq!(
            ack.to_json(),
            r#"{"type":"ack","id":"c1-7","topic":"bets","partition":2,"offset":41}"#
        );
        let dup = Reply::Ack(Ack {
            id: Some(json!(7)),
            topic: "bets".into(),
            partition: 0,
            offset: 1,
            duplicate: true,
        });
        assert_eq!(
            dup.to_json(),
            r#"{"type":"ack","id":7,"topic":"bets","partition":0,"offset":1,"duplicate":true}"#
        );
        let mut nack = Nack::new(Some(json!("x")), NackCode::RateLimited, "slow down");
        nack.retry_after_ms = Some(20);
        let nack = Reply::Nack(nack);
        assert_eq!(
            nack.to_json(),
            r#"{"type":"nack","id":"x","code":"rate_limited","message":"slow down","retry_after_ms":20}"#
        );
        assert_eq!(nack.http_status(), 429);
        let back: Reply = serde_json::from_str(&nack.to_json()).unwrap();
        assert_eq!(back, nack);
        for c in NackCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.as_str()));
        }
    }

    #[test]
    fn requests_parse_leniently() {
        let r: PublishRequest = serde_json::from_str(
            r#"{"type":"publish","topic":"bets","key":"g1","value":{"stake":2},"id":"a","extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.topic, "bets");
        assert_eq!(r.key, json!("g1"));
        assert_eq!(r.value, json!({"stake": 2}));
        assert_eq!(r.id, Some(json!("a")));
        let r: PublishRequest = serde_json::from_str(r#"{"key":3}"#).unwrap();
        assert_eq!(r.topic, "");
        assert_eq!(r.value, Value::Null);
        assert_eq!(r.id, None);
        let h = PublishRequest::from_http(
            "bets",
            Some("k-1"),
            serde_json::from_str(r#"{"value":{"a":1}}"#).unwrap(),
        );
        assert_eq!(h.id, Some(json!("k-1")));
        assert_eq!(h.key, Value::Null);
    }
}
