//! The Kafka consumer of the Debezium topics and its positions.
//!
//! Positions live in sled, next to the state they describe. When the group assigns a partition,
//! the rebalance callback starts it from the position stored in sled (if any), so a restart neither
//! loses nor re-applies records; without one it starts from the committed group offset, else from
//! the earliest record. Group offsets are committed only after the state is durable.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;

/// Partition positions (next offset to apply) shared between the ingest loop and the callbacks.
pub type Positions = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// Consumer callbacks: seek assigned partitions to the sled positions, track the assignment.
pub struct SourceContext {
    positions: Positions,
    assignment: Mutex<Option<BTreeSet<(String, i32)>>>,
}

impl SourceContext {
    pub fn new(positions: Positions) -> Self {
        SourceContext {
            positions,
            assignment: Mutex::new(None),
        }
    }

    /// The partitions assigned to this member; `None` before the first assignment.
    pub fn assignment(&self) -> Option<BTreeSet<(String, i32)>> {
        self.assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                {
                    let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
                    for (topic, partition) in &parts {
                        if let Some(next) = positions.get(&(topic.clone(), *partition)) {
                            if let Err(e) =
                                tpl.set_partition_offset(topic, *partition, Offset::Offset(*next))
                            {
                                tracing::warn!(topic, partition, error = %e, "cannot set the start offset from the store");
                            }
                        }
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "partition assignment failed");
                }
                let mut a = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                let set = a.get_or_insert_with(BTreeSet::new);
                if !cooperative {
                    set.clear();
                }
                set.extend(parts.iter().cloned());
                tracing::info!(partitions = ?parts, "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "partition revocation failed");
                }
                let mut a = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(set) = a.as_mut() {
                    for p in &parts {
                        set.remove(p);
                    }
                }
                tracing::info!(partitions = ?parts, "partitions revoked");
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign after a rebalance error failed");
                }
            }
        }
    }
}

/// Common client settings: brokers, then the user's `--kafka-prop` overrides.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("client.id", "livetable");
    c
}

fn apply_overrides(c: &mut ClientConfig, config: &Config) {
    for (k, v) in &config.kafka_props {
        c.set(k, v);
    }
}

/// The consumer of the Debezium topics, subscribed.
pub fn subscribe(
    config: &Config,
    positions: Positions,
) -> KafkaResult<Arc<BaseConsumer<SourceContext>>> {
    let mut c = client_config(config);
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // latency: hand records over as soon as they exist
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "1")
        // regex subscriptions see topics created later within a few seconds
        .set("topic.metadata.refresh.interval.ms", "2000")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000");
    apply_overrides(&mut c, config);
    let consumer: BaseConsumer<SourceContext> =
        c.create_with_context(SourceContext::new(positions))?;
    consumer.subscribe(&config.topics.subscription())?;
    Ok(Arc::new(consumer))
}

/// A consumer outside any group, for reading topics from the beginning (restore).
pub fn reader(config: &Config) -> KafkaResult<BaseConsumer> {
    let mut c = client_config(config);
    c.set("group.id", format!("{}-restore", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10");
    apply_overrides(&mut c, config);
    c.create()
}

/// The producer of the changelog and dead-letter topics.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "30000");
    apply_overrides(&mut c, config);
    c
}

/// The high watermark librdkafka last saw in a fetch response (no request is sent; `None` until a
/// fetch for the partition returned). ListOffsets is not used: some brokers answer it wrongly.
pub fn cached_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = CString::new(topic).ok()?;
    let (mut lo, mut hi) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid for the consumer's lifetime; the topic is a valid C
    // string; the out-pointers point to live locals. The call only reads librdkafka's cache.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut lo,
            &mut hi,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && hi >= 0).then_some(hi)
}
