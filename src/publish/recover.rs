//! Finding out whether a pending publish was written: the id store says which partition and from
//! which offset (the floor); every published record carries its id in a header. A pending entry
//! exists without an answer only after a crash of livetable or a delivery the producer could not
//! confirm either way, so this runs rarely, once per partition for all the ids waiting on it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Header with the publish id (the id's JSON text) on every record published with an id.
pub const HEADER_ID: &str = "livetable.publish_id";
/// Header with the publisher's principal, when tokens name one.
pub const HEADER_PRINCIPAL: &str = "livetable.principal";

/// Errors while reading a partition back.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading {topic}/{partition} did not reach its end in time")]
    Deadline { topic: String, partition: i32 },
}

/// The reading consumer's callbacks: reaching a partition's end is the point, not an error.
struct ScanContext;

impl ClientContext for ScanContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "reading back a partition");
    }
}

impl ConsumerContext for ScanContext {}

/// An id being looked for: (id JSON text, principal).
pub type Wanted = (String, Option<String>);

/// Reads `topic`/`partition` after `floor` (-1: from the beginning; a floor past the end, as after
/// the topic was recreated, also reads from the beginning) up to its end, and returns the offset
/// of every wanted id found. Blocking: call it from `spawn_blocking`.
pub fn scan(
    base: &ClientConfig,
    topic: &str,
    partition: i32,
    floor: i64,
    wanted: &HashSet<Wanted>,
    deadline: Instant,
) -> Result<HashMap<Wanted, i64>, RecoverError> {
    let mut c = base.clone();
    c.set("group.id", "livetable-publish-recover")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer<ScanContext> = c.create_with_context(ScanContext)?;
    let start = if floor >= 0 {
        Offset::Offset(floor + 1)
    } else {
        Offset::Beginning
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, start)?;
    consumer.assign(&tpl)?;
    let mut found = HashMap::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RecoverError::Deadline {
                topic: topic.to_string(),
                partition,
            });
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(found),
            Some(Err(e)) => {
                tracing::debug!(topic, partition, error = %e, "reading back a partition");
            }
            Some(Ok(m)) => {
                let Some(headers) = m.headers() else {
                    continue;
                };
                let mut id = None;
                let mut principal = None;
                for h in headers.iter() {
                    let v = h.value.and_then(|v| std::str::from_utf8(v).ok());
                    match h.key {
                        HEADER_ID => id = v,
                        HEADER_PRINCIPAL => principal = v,
                        _ => {}
                    }
                }
                if let Some(id) = id {
                    let w = (id.to_string(), principal.map(str::to_string));
                    if wanted.contains(&w) {
                        found.entry(w).or_insert(m.offset());
                    }
                }
            }
        }
    }
}
