//! The `[publish]` section: which topics clients may write, and the limits of each.
//!
//! ```toml
//! [publish]
//! ack_timeout_ms = 5000          # nack `unavailable` after this (also librdkafka's message.timeout.ms)
//! max_in_flight = 64             # unanswered publishes per connection
//! max_in_flight_total = 10000    # unanswered publishes in the process (bounds memory)
//! dedup_window_secs = 600        # how long an id is remembered
//! dedup_max_entries = 200000     # most ids remembered (the oldest go first; ~200 B each)
//!
//! [[publish.topic]]
//! name = "bets"
//! schema = "schemas/bet.json"    # JSON Schema, relative to the config file's directory
//! max_bytes = 65536              # key + value as produced
//! rate_per_sec = 50              # per connection
//! burst = 100
//! pin = { field = "user_id", claim = "sub" }   # value.user_id must equal the token's `sub`
//! partitions = 3                 # create the topic when missing (else it must exist)
//! ```
//!
//! Loading reads and compiles every schema, so a bad schema stops the start-up with an error that
//! names the setting (`publish.topic[bets].schema`), never the first publish.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Errors in the `[publish]` section; each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum PublishConfigError {
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid { setting: String, reason: String },
    #[error("setting `{setting}`: cannot read {path}: {source}")]
    ReadSchema {
        setting: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting `{setting}`: {path} is not JSON: {source}")]
    SchemaJson {
        setting: String,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("setting `{setting}`: {path} is not a valid JSON Schema: {reason}")]
    SchemaInvalid {
        setting: String,
        path: PathBuf,
        reason: String,
    },
    #[error("publish section: {0}")]
    Parse(#[from] Box<toml::de::Error>),
}

fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> PublishConfigError {
    PublishConfigError::Invalid {
        setting: setting.into(),
        reason: reason.into(),
    }
}

/// The `[publish]` table as written (embed it in the service's file configuration as
/// `publish: Option<PublishSection>`, then call [`PublishConfig::from_section`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSection {
    pub ack_timeout_ms: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub max_in_flight_total: Option<usize>,
    pub dedup_window_secs: Option<u64>,
    pub dedup_max_entries: Option<usize>,
    #[serde(default)]
    pub topic: Vec<TopicSection>,
}

/// One `[[publish.topic]]` entry as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSection {
    pub name: String,
    pub schema: Option<PathBuf>,
    pub max_bytes: Option<usize>,
    pub rate_per_sec: Option<u32>,
    pub burst: Option<u32>,
    pub pin: Option<Pin>,
    pub partitions: Option<i32>,
}

/// A field of the value that must equal a claim of the client's token (`user_id = sub`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// A top-level field name, or a JSON pointer when it starts with `/` (`/user/id`).
    pub field: String,
    /// The claim whose value the field must equal.
    pub claim: String,
}

/// The validated publishing configuration.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub ack_timeout: Duration,
    pub max_in_flight: usize,
    pub max_in_flight_total: usize,
    pub dedup_window: Duration,
    pub dedup_max_entries: usize,
    /// The writable topics by name.
    pub topics: BTreeMap<String, Arc<TopicPolicy>>,
}

/// What a writable topic accepts.
pub struct TopicPolicy {
    pub name: String,
    pub schema: Option<jsonschema::Validator>,
    /// The schema file (for messages and logs).
    pub schema_path: Option<PathBuf>,
    pub max_bytes: usize,
    pub rate_per_sec: NonZeroU32,
    pub burst: NonZeroU32,
    pub pin: Option<Pin>,
    /// Create the topic with this many partitions when it is missing.
    pub partitions: Option<i32>,
}

impl std::fmt::Debug for TopicPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicPolicy")
            .field("name", &self.name)
            .field("schema_path", &self.schema_path)
            .field("max_bytes", &self.max_bytes)
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &self.burst)
            .field("pin", &self.pin)
            .field("partitions", &self.partitions)
            .finish()
    }
}

pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
pub const DEFAULT_MAX_IN_FLIGHT_TOTAL: usize = 10_000;
pub const DEFAULT_DEDUP_WINDOW_SECS: u64 = 600;
pub const DEFAULT_DEDUP_MAX_ENTRIES: usize = 200_000;
pub const DEFAULT_MAX_BYTES: usize = 65_536;
pub const DEFAULT_RATE_PER_SEC: u32 = 50;
/// Kafka's default `message.max.bytes` is about 1 MB; larger records would be refused anyway.
pub const MAX_MAX_BYTES: usize = 1_000_000;

impl PublishConfig {
    /// Reads the `[publish]` table of a whole TOML configuration file (other keys are ignored);
    /// `None` when the file has no such table. Schema paths are relative to `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Option<Self>, PublishConfigError> {
        #[derive(Deserialize)]
        struct File {
            publish: Option<PublishSection>,
        }
        let file: File = toml::from_str(text).map_err(Box::new)?;
        file.publish
            .map(|s| Self::from_section(s, base_dir))
            .transpose()
    }

    /// Validates the section and compiles its schemas (read from files: call it at start-up, or
    /// from `spawn_blocking`).
    pub fn from_section(s: PublishSection, base_dir: &Path) -> Result<Self, PublishConfigError> {
        let ack_timeout_ms = s.ack_timeout_ms.unwrap_or(DEFAULT_ACK_TIMEOUT_MS);
        if !(100..=300_000).contains(&ack_timeout_ms) {
            return Err(invalid(
                "publish.ack_timeout_ms",
                format!("{ack_timeout_ms} is not between 100 and 300000"),
            ));
        }
        let max_in_flight = s.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        let max_in_flight_total = s.max_in_flight_total.unwrap_or(DEFAULT_MAX_IN_FLIGHT_TOTAL);
        if max_in_flight == 0 {
            return Err(invalid("publish.max_in_flight", "must be at least 1"));
        }
        if !(1..=1_000_000).contains(&max_in_flight_total) {
            return Err(invalid(
                "publish.max_in_flight_total",
                format!("{max_in_flight_total} is not between 1 and 1000000"),
            ));
        }
        if max_in_flight > max_in_flight_total {
            return Err(invalid(
                "publish.max_in_flight",
                format!("{max_in_flight} is more than publish.max_in_flight_total ({max_in_flight_total})"),
            ));
        }
        let window = s.dedup_window_secs.unwrap_or(DEFAULT_DEDUP_WINDOW_SECS);
        if !(1..=7 * 24 * 3600).contains(&window) {
            return Err(invalid(
                "publish.dedup_window_secs",
                format!("{window} is not between 1 and 604800 (a week)"),
            ));
        }
        if window * 1000 < ack_timeout_ms {
            return Err(invalid(
                "publish.dedup_window_secs",
                format!("{window} s is shorter than publish.ack_timeout_ms ({ack_timeout_ms} ms): ids would be forgotten while in flight"),
            ));
        }
        let dedup_max_entries = s.dedup_max_entries.unwrap_or(DEFAULT_DEDUP_MAX_ENTRIES);
        if dedup_max_entries == 0 {
            return Err(invalid("publish.dedup_max_entries", "must be at least 1"));
        }
        let mut topics = BTreeMap::new();
        for t in s.topic {
            let policy = TopicPolicy::from_section(t, base_dir)?;
            if topics.contains_key(&policy.name) {
                return Err(invalid(
                    format!("publish.topic[{}]", policy.name),
                    "listed twice",
                ));
            }
            topics.insert(policy.name.clone(), Arc::new(policy));
        }
        Ok(PublishConfig {
            ack_timeout: Duration::from_millis(ack_timeout_ms),
            max_in_flight,
            max_in_flight_total,
            dedup_window: Duration::from_secs(window),
            dedup_max_entries,
            topics,
        })
    }
}

impl TopicPolicy {
    fn from_section(t: TopicSection, base_dir: &Path) -> Result<Self, PublishConfigError> {
        check_topic_name(&t.name)?;
        let setting = |field: &str| format!("publish.topic[{}].{field}", t.name);
        let max_bytes = t.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        if !(1..=MAX_MAX_BYTES).contains(&max_bytes) {
            return Err(invalid(
                setting("max_bytes"),
                format!("{max_bytes} is not between 1 and {MAX_MAX_BYTES}"),
            ));
        }
        let rate = t.rate_per_sec.unwrap_or(DEFAULT_RATE_PER_SEC);
        let rate_per_sec = NonZeroU32::new(rate)
            .ok_or_else(|| invalid(setting("rate_per_sec"), "must be >= 1"))?;
        let burst = t.burst.unwrap_or(rate.saturating_mul(2));
        let burst =
            NonZeroU32::new(burst).ok_or_else(|| invalid(setting("burst"), "must be >= 1"))?;
        if let Some(pin) = &t.pin {
            if pin.field.is_empty() || pin.claim.is_empty() {
                return Err(invalid(setting("pin"), "field and claim must not be empty"));
            }
        }
        if let Some(p) = t.partitions {
            if !(1..=10_000).contains(&p) {
                return Err(invalid(
                    setting("partitions"),
                    format!("{p} is not between 1 and 10000"),
                ));
            }
        }
        let (schema, schema_path) = match &t.schema {
            None => (None, None),
            Some(rel) => {
                let path = base_dir.join(rel);
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    PublishConfigError::ReadSchema {
                        setting: setting("schema"),
                        path: path.clone(),
                        source,
                    }
                })?;
                let json: Value = serde_json::from_str(&text).map_err(|source| {
                    PublishConfigError::SchemaJson {
                        setting: setting("schema"),
                        path: path.clone(),
                        source,
                    }
                })?;
                let validator = jsonschema::validator_for(&json).map_err(|e| {
                    PublishConfigError::SchemaInvalid {
                        setting: setting("schema"),
                        path: path.clone(),
                        reason: e.to_string(),
                    }
                })?;
                (Some(validator), Some(path))
            }
        };
        Ok(TopicPolicy {
            name: t.name,
            schema,
            schema_path,
            max_bytes,
            rate_per_sec,
            burst,
            pin: t.pin,
            partitions: t.partitions,
        })
    }

    /// Checks `value` against the schema; the error is the reason given to the client (the first
    /// few violations with their JSON pointers, bounded in length).
    pub fn check_schema(&self, value: &Value) -> Result<(), String> {
        let Some(v) = &self.schema else {
            return Ok(());
        };
        if v.is_valid(value) {
            return Ok(());
        }
        let mut reasons = Vec::new();
        for e in v.iter_errors(value).take(3) {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            reasons.push(format!("{at}: {e}"));
        }
        let mut reason = reasons.join("; ");
        truncate(&mut reason, 512);
        Err(reason)
    }

    /// Checks the pinned field against the client's claims. Without claims (no tokens) there is
    /// nothing to check.
    pub fn check_pin(
        &self,
        value: &Value,
        claims: Option<&serde_json::Map<String, Value>>,
    ) -> Result<(), String> {
        let (Some(pin), Some(claims)) = (&self.pin, claims) else {
            return Ok(());
        };
        let Some(expected) = claims.get(&pin.claim) else {
            return Err(format!(
                "the token has no `{}` claim, which `{}` is pinned to",
                pin.claim, pin.field
            ));
        };
        let actual = if pin.field.starts_with('/') {
            value.pointer(&pin.field)
        } else {
            value.get(&pin.field)
        };
        if actual == Some(expected) {
            Ok(())
        } else {
            Err(format!(
                "`{}` must equal the token's `{}` claim",
                pin.field, pin.claim
            ))
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

fn check_topic_name(name: &str) -> Result<(), PublishConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            format!("publish.topic[{name}].name"),
            "a Kafka topic name is 1-249 characters of [a-zA-Z0-9._-]",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(text: &str, dir: &Path) -> Result<PublishConfig, PublishConfigError> {
        PublishConfig::from_toml(text, dir).map(|c| c.expect("a [publish] table"))
    }

    #[test]
    fn defaults_and_a_full_topic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("schemas")).unwrap();
        std::fs::write(
            dir.path().join("schemas/bet.json"),
            r#"{"type":"object","required":["stake"],"properties":{"stake":{"type":"number","minimum":0.01}}}"#,
        )
        .unwrap();
        let c = load(
            r#"
            brokers = "ignored:9092"
            [publish]
            [[publish.topic]]
            name = "bets"
            schema = "schemas/bet.json"
            max_bytes = 1024
            rate_per_sec = 5
            pin = { field = "user_id", claim = "sub" }
            partitions = 3
            [[publish.topic]]
            name = "clicks"
            "#,
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.ack_timeout, Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS));
        assert_eq!(c.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(c.dedup_window, Duration::from_secs(600));
        let bets = &c.topics["bets"];
        assert_eq!(bets.max_bytes, 1024);
        assert_eq!(bets.burst.get(), 10, "burst defaults to twice the rate");
        assert_eq!(bets.partitions, Some(3));
        assert!(bets.check_schema(&json!({"stake": 2})).is_ok());
        let reason = bets.check_schema(&json!({"stake": 0})).unwrap_err();
        assert!(reason.starts_with("/stake: "), "{reason}");
        let reason = bets.check_schema(&json!({})).unwrap_err();
        assert!(reason.contains("stake"), "{reason}");
        let clicks = &c.topics["clicks"];
        assert_eq!(clicks.max_bytes, DEFAULT_MAX_BYTES);
        assert!(clicks.check_schema(&json!([1, 2])).is_ok());
    }

    #[test]
    fn no_publish_table_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PublishConfig::from_toml("brokers = \"x\"", dir.path())
            .unwrap()
            .is_none());
    }

    #[test]
    fn errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.json"), "{not json").unwrap();
        std::fs::write(dir.path().join("bad-schema.json"), r#"{"type": 12}"#).unwrap();
        let cases = [
            ("[publish]\nack_timeout_ms = 5", "publish.ack_timeout_ms"),
            ("[publish]\nmax_in_flight = 0", "publish.max_in_flight"),
            (
                "[publish]\nmax_in_flight = 20\nmax_in_flight_total = 10",
                "publish.max_in_flight",
            ),
            (
                "[publish]\ndedup_window_secs = 0",
                "publish.dedup_window_secs",
            ),
            (
                "[publish]\ndedup_window_secs = 2\nack_timeout_ms = 3000",
                "publish.dedup_window_secs",
            ),
            (
                "[publish]\ndedup_max_entries = 0",
                "publish.dedup_max_entries",
            ),
            (
                "[[publish.topic]]\nname = \"a b\"",
                "publish.topic[a b].name",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nmax_bytes = 0",
                "publish.topic[t].max_bytes",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nrate_per_sec = 0",
                "publish.topic[t].rate_per_sec",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nburst = 0",
                "publish.topic[t].burst",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\npin = { field = \"\", claim = \"sub\" }",
                "publish.topic[t].pin",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\npartitions = 0",
                "publish.topic[t].partitions",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nschema = \"missing.json\"",
                "publish.topic[t].schema",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nschema = \"bad.json\"",
                "publish.topic[t].schema",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\nschema = \"bad-schema.json\"",
                "publish.topic[t].schema",
            ),
            (
                "[[publish.topic]]\nname = \"t\"\n[[publish.topic]]\nname = \"t\"",
                "publish.topic[t]",
            ),
        ];
        for (text, setting) in cases {
            let e = load(text, dir.path()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{setting}`")), "{text:?}: {e}");
        }
        let e = load("[publish]\nunknown = 1", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown"), "{e}");
    }

    #[test]
    fn pin_compares_the_field_with_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(
            "[[publish.topic]]\nname = \"t\"\npin = { field = \"user_id\", claim = \"sub\" }\n\
             [[publish.topic]]\nname = \"deep\"\npin = { field = \"/user/id\", claim = \"sub\" }",
            dir.path(),
        )
        .unwrap();
        let t = &c.topics["t"];
        let claims = json!({"sub": "u1"});
        let claims = claims.as_object();
        assert!(t.check_pin(&json!({"user_id": "u1"}), claims).is_ok());
        assert!(t.check_pin(&json!({"user_id": "u2"}), claims).is_err());
        assert!(t.check_pin(&json!({}), claims).is_err());
        assert!(
            t.check_pin(&json!({"user_id": "u2"}), None).is_ok(),
            "no tokens"
        );
        let other = json!({"name": "x"});
        assert!(t
            .check_pin(&json!({"user_id": "u1"}), other.as_object())
            .unwrap_err()
            .contains("no `sub` claim"));
        let deep = &c.topics["deep"];
        assert!(deep
            .check_pin(&json!({"user": {"id": "u1"}}), claims)
            .is_ok());
        assert!(deep.check_pin(&json!({"user_id": "u1"}), claims).is_err());
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        let mut s = "ééé".to_string();
        truncate(&mut s, 3);
        assert_eq!(s, "é");
    }
}
