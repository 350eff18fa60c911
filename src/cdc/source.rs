//! The Kafka clients of the input side: the group consumer of the Debezium topics (with its
//! rebalance callbacks), readers outside any group, the producer configuration.
//!
//! The consumer uses incremental cooperative rebalancing (`cooperative-sticky`): when a topic
//! appears or a member joins, only the partitions that move are revoked; the others keep flowing.
//! Assigned partitions start paused at the position the listener gives (the local store's, else
//! the group's committed offset): the listener restores their state, then resumes them.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;

/// What the owner of the consumer does when partitions move. Called on the thread that polls the
/// consumer, inside the poll.
pub trait RebalanceListener: Send + Sync {
    /// Where an assigned partition starts (`None`: the group's committed offset).
    fn start_offset(&self, topic: &str, partition: i32) -> Option<i64>;
    /// Partitions were assigned (and paused) in group generation `generation`.
    fn assigned(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        parts: &[(String, i32)],
        generation: i32,
    );
    /// Partitions are about to be revoked: finish and make durable what was applied from them.
    fn revoking(&self, consumer: &BaseConsumer<SourceContext>, parts: &[(String, i32)]);
}

/// Consumer callbacks: log through tracing, hand rebalances to the listener, track the assignment.
pub struct SourceContext {
    listener: OnceLock<Arc<dyn RebalanceListener>>,
    assignment: Mutex<Option<BTreeSet<(String, i32)>>>,
    brokers: String,
    created: std::time::Instant,
    /// From the consumer's creation to its first assignment (the group join).
    first_assignment: OnceLock<std::time::Duration>,
}

impl SourceContext {
    pub fn new(brokers: &str) -> Self {
        SourceContext {
            listener: OnceLock::new(),
            assignment: Mutex::new(None),
            brokers: brokers.to_string(),
            created: std::time::Instant::now(),
            first_assignment: OnceLock::new(),
        }
    }

    /// How long the group took to give this consumer its first partitions (`None` before).
    pub fn group_join_time(&self) -> Option<std::time::Duration> {
        self.first_assignment.get().copied()
    }

    /// Sets the listener (before the first poll).
    pub fn set_listener(&self, listener: Arc<dyn RebalanceListener>) {
        let _ = self.listener.set(listener);
    }

    /// The partitions assigned to this member; `None` before the first assignment.
    pub fn assignment(&self) -> Option<BTreeSet<(String, i32)>> {
        self.assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Whether a message of this kind may be logged now: at most one every `every` per kind (a broker
/// that is down makes every client report every retry).
pub fn throttled(kind: &str, every: std::time::Duration) -> bool {
    static LAST: OnceLock<Mutex<std::collections::HashMap<String, std::time::Instant>>> =
        OnceLock::new();
    let mut last = LAST
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    match last.get(kind) {
        Some(t) if now.duration_since(*t) < every => false,
        _ => {
            last.insert(kind.to_string(), now);
            true
        }
    }
}

/// A broker that cannot be reached: a warning, repeated at most every 10 s.
fn unreachable(message: &str) -> bool {
    message.contains("Connect to ")
        || message.contains("brokers are down")
        || message.contains("Broker transport failure")
        || message.contains("Connection refused")
        || message.contains("Disconnected")
        || message.contains("timed out")
}

/// librdkafka's log callback, shared by every client livetable makes.
pub fn log_librdkafka(brokers: &str, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    // a subscription pattern matching no topic yet is normal before Debezium created the topics;
    // --kafka-prop goes to consumers and producers alike, which ignore the other's properties
    let expected = log_message.contains("Subscribed topic not available")
        || log_message.contains("Unknown topic or partition")
        || (fac == "CONFWARN" && log_message.contains("will be ignored by this"));
    if unreachable(log_message) && (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
        if throttled("librdkafka-unreachable", std::time::Duration::from_secs(10)) {
            tracing::warn!(brokers, "cannot reach the broker (retrying): {log_message}");
        }
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
            if !expected =>
        {
            tracing::error!(facility = fac, brokers, "librdkafka: {log_message}")
        }
        RDKafkaLogLevel::Warning if !expected => {
            tracing::warn!(facility = fac, brokers, "librdkafka: {log_message}")
        }
        _ if expected => tracing::info!(facility = fac, "librdkafka: {log_message}"),
        _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(&self.brokers, level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        error_librdkafka(&self.brokers, error, reason);
    }
}

/// librdkafka's error callback: topics that do not exist yet (a subscription pattern before
/// Debezium created its topics, a registry before the first table) are normal, not errors.
pub fn error_librdkafka(brokers: &str, error: rdkafka::error::KafkaError, reason: &str) {
    let expected = reason.contains("Subscribed topic not available")
        || reason.contains("topic does not exist")
        || error.rdkafka_error_code()
            == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition);
    if unreachable(reason) || unreachable(&error.to_string()) {
        if throttled("librdkafka-unreachable", std::time::Duration::from_secs(10)) {
            tracing::warn!(
                brokers,
                "cannot reach the broker (retrying): {error}: {reason}"
            );
        }
        return;
    }
    if expected {
        tracing::info!(brokers, "librdkafka: {error}: {reason}");
    } else {
        tracing::error!(brokers, "librdkafka: {error}: {reason}");
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
        let listener = self.listener.get();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(l) = listener {
                    for (topic, partition) in &parts {
                        let start = l
                            .start_offset(topic, *partition)
                            .map_or(Offset::Stored, Offset::Offset);
                        if let Err(e) = tpl.set_partition_offset(topic, *partition, start) {
                            tracing::warn!(topic, partition, error = %e, "cannot set the start offset");
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
                // paused until their state is restored
                if let Err(e) = consumer.pause(tpl) {
                    tracing::error!(error = %e, "pausing assigned partitions failed");
                }
                {
                    let mut a = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                    let set = a.get_or_insert_with(BTreeSet::new);
                    if !parts.is_empty() {
                        let _ = self.first_assignment.set(self.created.elapsed());
                    }
                    if !cooperative {
                        set.clear();
                    }
                    set.extend(parts.iter().cloned());
                }
                let generation = generation(consumer);
                tracing::info!(partitions = ?parts, generation, "partitions assigned");
                if let Some(l) = listener {
                    l.assigned(consumer, &parts, generation);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts, "partitions revoked");
                if let Some(l) = listener {
                    l.revoking(consumer, &parts);
                }
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
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if let Some(l) = listener {
                    l.revoking(consumer, &parts);
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign after a rebalance error failed");
                }
                if let Some(set) = self
                    .assignment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    set.clear();
                }
            }
        }
    }
}

/// The consumer group generation this member is in (`-1` outside a group).
pub fn generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> i32 {
    // SAFETY: the client pointer is valid for the consumer's lifetime; the metadata object
    // returned is owned by us and destroyed right after reading it.
    unsafe {
        let md =
            rdkafka::bindings::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if md.is_null() {
            return -1;
        }
        let g = rdkafka::bindings::rd_kafka_consumer_group_metadata_generation_id(md);
        rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(md);
        g
    }
}

/// Common client settings: brokers, then the user's `--kafka-prop` overrides (so the admin client
/// speaks TLS/SASL too; the consumer and producers apply them again after their own settings, so
/// the user's value wins there as well).
pub fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("client.id", format!("livetable-{}", config.group_id));
    apply_overrides(&mut c, config);
    c
}

fn apply_overrides(c: &mut ClientConfig, config: &Config) {
    for (k, v) in &config.kafka_props {
        c.set(k, v);
    }
}

/// The consumer of the Debezium topics (not yet subscribed: set its listener first).
pub fn consumer(config: &Config) -> KafkaResult<Arc<BaseConsumer<SourceContext>>> {
    let mut c = client_config(config);
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // only the partitions that move are revoked when a topic appears or a member joins
        .set("partition.assignment.strategy", "cooperative-sticky")
        // latency: hand records over as soon as they exist
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "1")
        // regex subscriptions see topics created later within a few seconds
        .set("topic.metadata.refresh.interval.ms", "2000")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000");
    if let Some(id) = &config.instance_id {
        c.set("group.instance.id", id);
    }
    apply_overrides(&mut c, config);
    let consumer: BaseConsumer<SourceContext> =
        c.create_with_context(SourceContext::new(&config.brokers))?;
    Ok(Arc::new(consumer))
}

/// Subscribes the consumer to the configured topics.
pub fn subscribe(consumer: &BaseConsumer<SourceContext>, config: &Config) -> KafkaResult<()> {
    consumer.subscribe(&config.topics.subscription())
}

/// A consumer outside any group.
pub type Reader = BaseConsumer<ReaderContext>;

/// A consumer outside any group, for reading topics (restores, the registry, the follower).
pub fn reader(config: &Config) -> KafkaResult<Reader> {
    let mut c = client_config(config);
    c.set("group.id", format!("{}-reader", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "1");
    apply_overrides(&mut c, config);
    c.create_with_context(ReaderContext {
        brokers: config.brokers.clone(),
    })
}

/// Callbacks of readers, producers and admin clients: logs through tracing.
pub struct ReaderContext {
    brokers: String,
}

impl ReaderContext {
    pub fn new(brokers: &str) -> Self {
        ReaderContext {
            brokers: brokers.to_string(),
        }
    }
}

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(&self.brokers, level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        error_librdkafka(&self.brokers, error, reason);
    }
}

impl ConsumerContext for ReaderContext {}

/// The producer of the changelog, registry and dead-letter topics.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "30000")
        // a deleted topic is not created again by a produce's metadata request (a broker with
        // auto.create.topics.enable would give it its defaults: one partition, not compacted);
        // livetable creates its topics itself
        .set("allow.auto.create.topics", "false")
        // whatever livetable accepts must fit: a record up to --max-record-bytes, plus its key and
        // headers (a dead letter keeps the original record)
        .set(
            "message.max.bytes",
            (config.max_record_bytes + 64 * 1024)
                .max(1_000_000)
                .to_string(),
        );
    apply_overrides(&mut c, config);
    c
}

/// The low and high watermarks librdkafka last saw in a fetch response (no request is sent;
/// `None` until a fetch for the partition returned). ListOffsets is not used: some brokers answer
/// it wrongly.
pub fn cached_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
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
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && hi >= 0).then_some((lo.max(0), hi))
}

/// The high watermark librdkafka last saw in a fetch response.
pub fn cached_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    cached_watermarks(consumer, topic, partition).map(|(_, hi)| hi)
}
