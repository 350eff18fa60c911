//! Restore: a node with an empty data directory rebuilds every table from its changelog topic
//! before it serves. The last record per key wins; livetable does not rely on the broker having
//! compacted the topic. The end of each partition is the high watermark seen in fetch responses.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::cdc::decode::Row;
use crate::cdc::source;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::changelog::{HEADER_SEQ, HEADER_TABLE};

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(
        "restore did not reach the end of the changelog topics within {0:?} (partitions left: {1})"
    )]
    Timeout(Duration, usize),
    #[error("restore interrupted by shutdown")]
    Cancelled,
}

/// One restored table: its rows and the highest seq found in its changelog.
#[derive(Debug, Default)]
pub struct RestoredTable {
    pub seq: u64,
    pub rows: BTreeMap<String, Row>,
}

/// Reads every `<prefix>*` topic from the beginning to its high watermark.
pub fn read_changelogs(
    config: &Config,
    metrics: &Metrics,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<HashMap<String, RestoredTable>, RestoreError> {
    let reader = source::reader(config)?;
    let metadata = reader.fetch_metadata(None, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(&config.changelog_prefix) && t.error().is_none())
    {
        for p in topic.partitions() {
            tpl.add_partition_offset(topic.name(), p.id(), Offset::Beginning)?;
        }
    }
    let mut tables: HashMap<String, RestoredTable> = HashMap::new();
    let mut next: HashMap<(String, i32), i64> = tpl
        .elements()
        .iter()
        .map(|e| ((e.topic().to_string(), e.partition()), 0))
        .collect();
    if next.is_empty() {
        return Ok(tables);
    }
    tracing::info!(
        partitions = next.len(),
        "restoring tables from the changelog"
    );
    reader.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    while !next.is_empty() {
        if cancelled() {
            return Err(RestoreError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(RestoreError::Timeout(timeout, next.len()));
        }
        match reader.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                metrics.restore_records.inc();
                let tp = (m.topic().to_string(), m.partition());
                if let Some(n) = next.get_mut(&tp) {
                    *n = m.offset() + 1;
                }
                apply_record(&config.changelog_prefix, &m, &mut tables);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "restore: consumer error"),
            None => {}
        }
        next.retain(|(topic, partition), n| !reached_end(&reader, topic, *partition, *n));
    }
    Ok(tables)
}

fn reached_end(reader: &BaseConsumer, topic: &str, partition: i32, next: i64) -> bool {
    source::cached_high_watermark(reader, topic, partition).is_some_and(|hi| next >= hi)
}

fn apply_record<M: Message>(prefix: &str, m: &M, tables: &mut HashMap<String, RestoredTable>) {
    let header = |name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .and_then(|v| std::str::from_utf8(v).ok().map(String::from))
        })
    };
    let table = header(HEADER_TABLE).unwrap_or_else(|| {
        m.topic()
            .strip_prefix(prefix)
            .unwrap_or(m.topic())
            .to_string()
    });
    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
        tracing::warn!(
            topic = m.topic(),
            offset = m.offset(),
            "restore: changelog record without a UTF-8 key skipped"
        );
        return;
    };
    let t = tables.entry(table).or_default();
    if let Some(seq) = header(HEADER_SEQ).and_then(|s| s.parse::<u64>().ok()) {
        t.seq = t.seq.max(seq);
    }
    match m.payload() {
        None => {
            t.rows.remove(key);
        }
        Some(bytes) => match serde_json::from_slice::<Row>(bytes) {
            Ok(row) => {
                t.rows.insert(key.to_string(), row);
            }
            Err(e) => {
                tracing::warn!(topic = m.topic(), offset = m.offset(), error = %e, "restore: changelog record is not a JSON row; skipped")
            }
        },
    }
}
