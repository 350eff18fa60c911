//! The compacted changelog topic per table (the KTable) and the dead-letter topic.
//!
//! Every applied change is produced as key = row key, value = the full latest row as JSON (or a
//! tombstone), with headers `livetable.table`, `livetable.seq`, `livetable.ts_ms`. Delivery is
//! at-least-once and idempotent by key: the outbox in sled remembers every key until the broker
//! acknowledged its latest value. Topic definitions are kept in `topics/`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Deserialize;

use crate::cdc::decode::Row;
use crate::cdc::source;
use crate::config::Config;
use crate::table::store::DeadLetter;

/// Errors talking to the broker about topics.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic definition {file}: {source}")]
    Definition {
        file: &'static str,
        source: toml::de::Error,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct TopicDef {
    partitions: i32,
    replication_factor: i32,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

const CHANGELOG_DEF: &str = include_str!("../../topics/changelog.toml");
const DLQ_DEF: &str = include_str!("../../topics/dlq.toml");

/// Header names of changelog records.
pub const HEADER_TABLE: &str = "livetable.table";
pub const HEADER_SEQ: &str = "livetable.seq";
pub const HEADER_TS: &str = "livetable.ts_ms";

/// Producer of changelog and dead-letter records.
pub struct Changelog {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    prefix: String,
    dlq_topic: String,
    changelog_def: TopicDef,
    dlq_def: TopicDef,
    known: Mutex<HashSet<String>>,
}

impl Changelog {
    pub fn new(config: &Config) -> Result<Self, ChangelogError> {
        let parse = |file: &'static str, text: &str| {
            toml::from_str(text).map_err(|source| ChangelogError::Definition { file, source })
        };
        Ok(Changelog {
            producer: source::producer_config(config).create()?,
            admin: source::client_config(config).create()?,
            prefix: config.changelog_prefix.clone(),
            dlq_topic: config.dlq_topic.clone(),
            changelog_def: parse("topics/changelog.toml", CHANGELOG_DEF)?,
            dlq_def: parse("topics/dlq.toml", DLQ_DEF)?,
            known: Mutex::new(HashSet::new()),
        })
    }

    /// The changelog topic of `table` (characters Kafka does not allow become `_`).
    pub fn topic_for(&self, table: &str) -> String {
        topic_name(&self.prefix, table)
    }

    /// Creates the changelog topic of `table` if this process has not seen it yet.
    pub async fn ensure_table(&self, table: &str) -> Result<(), ChangelogError> {
        let topic = self.topic_for(table);
        self.ensure(&topic, &self.changelog_def).await
    }

    /// Creates the dead-letter topic if missing.
    pub async fn ensure_dlq(&self) -> Result<(), ChangelogError> {
        self.ensure(&self.dlq_topic.clone(), &self.dlq_def).await
    }

    async fn ensure(&self, topic: &str, def: &TopicDef) -> Result<(), ChangelogError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        let mut new = NewTopic::new(
            topic,
            def.partitions,
            TopicReplication::Fixed(def.replication_factor),
        );
        for (k, v) in &def.config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in self.admin.create_topics([&new], &opts).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(ChangelogError::CreateTopic { topic, code }),
            }
        }
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string());
        Ok(())
    }

    /// Produces the latest value of one key (a tombstone when `row` is `None`).
    pub fn send_row(
        &self,
        table: &str,
        key: &str,
        row: Option<&Row>,
        seq: u64,
        ts_ms: Option<i64>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let payload = row.map(crate::table::store::encode_row);
        self.send_row_json(table, key, payload.as_deref(), seq, ts_ms)
    }

    /// [`Changelog::send_row`] with the row already serialised (`None`: a tombstone).
    pub fn send_row_json(
        &self,
        table: &str,
        key: &str,
        payload: Option<&[u8]>,
        seq: u64,
        ts_ms: Option<i64>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let topic = self.topic_for(table);
        let seq_text = seq.to_string();
        let ts_text = ts_ms.map(|t| t.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_TABLE,
                value: Some(table),
            })
            .insert(Header {
                key: HEADER_SEQ,
                value: Some(&seq_text),
            });
        if let Some(ts) = &ts_text {
            headers = headers.insert(Header {
                key: HEADER_TS,
                value: Some(ts),
            });
        }
        let mut record = FutureRecord::to(&topic).key(key).headers(headers);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        send_retrying_queue_full(&self.producer, record)
    }

    /// Produces a dead letter with headers naming its origin and the reason.
    pub fn send_dead_letter(&self, letter: &DeadLetter) -> Result<DeliveryFuture, KafkaError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "livetable.dlq.topic",
                value: Some(&letter.topic),
            })
            .insert(Header {
                key: "livetable.dlq.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "livetable.dlq.offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "livetable.dlq.reason",
                value: Some(&letter.reason),
            })
            .insert(Header {
                key: "livetable.dlq.error",
                value: Some(&letter.error),
            })
            .insert(Header {
                key: "livetable.dlq.truncated",
                value: Some(if letter.truncated { "true" } else { "false" }),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dlq_topic).headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &letter.value {
            record = record.payload(v.as_slice());
        }
        send_retrying_queue_full(&self.producer, record)
    }
}

/// Enqueues a record; when librdkafka's queue is full, waits for it to drain (bounded memory).
fn send_retrying_queue_full<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                // called from the ingest thread or spawn_blocking, never on an async worker
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// `prefix + table`, with characters Kafka does not accept in topic names replaced by `_`.
pub fn topic_name(prefix: &str, table: &str) -> String {
    let mut name: String = prefix.to_string();
    name.extend(table.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        }
    }));
    name.truncate(249);
    name
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_names_are_legal() {
        assert_eq!(
            super::topic_name("livetable.table.", "game_odds"),
            "livetable.table.game_odds"
        );
        assert_eq!(super::topic_name("p.", "spiel äöü/1"), "p.spiel_____1");
        assert_eq!(super::topic_name("p.", &"x".repeat(400)).len(), 249);
    }

    #[test]
    fn embedded_definitions_parse() {
        let c: super::TopicDef = toml::from_str(super::CHANGELOG_DEF).unwrap();
        assert_eq!(c.config["cleanup.policy"], "compact");
        let d: super::TopicDef = toml::from_str(super::DLQ_DEF).unwrap();
        assert_eq!(d.config["cleanup.policy"], "delete");
    }
}
