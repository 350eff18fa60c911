//! The changelog topics (one compacted topic per table, co-partitioned with its input topic: the
//! changes of input partition p go to changelog partition p), the deployment's table registry and
//! the dead-letter topic.
//!
//! A changelog record: key = row key, value = the full row as JSON (a tombstone on delete),
//! headers `livetable.table`, `livetable.offset` (input offset of the change), `livetable.seq`
//! (the slice's change count), `livetable.acked` (every change up to this input offset is in the
//! changelog before this record), `livetable.owner` (who wrote it) and `livetable.ts_ms`. A fence
//! record (header `livetable.fence`) opens an owner's tenure of a partition; one whose header value
//! is `restarted` ends an owner's rewrite of a partition that started over (see
//! [`crate::table::repair`]); one whose value is `input-reset` says that the owner's input
//! partition started over (its topic was created again): the input offsets of the records after it
//! are not comparable with those before it. Topic definitions live in `topics/`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

use crate::cdc::source::{self, ReaderContext};
use crate::config::Config;
use crate::table::position::Owner;
use crate::table::store::DeadLetter;
use crate::table::stored_row::StoredRow;

/// Errors talking to the broker about topics.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}{}", create_hint(*.code))]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error(
        "changelog topic {topic} has {have} partitions but its input topic {source_topic} has {want}: \
         the changelog must be co-partitioned with its input. Delete the changelog topic (the \
         materialisers recreate and refill it) or repartition both alike"
    )]
    PartitionMismatch {
        topic: String,
        source_topic: String,
        have: usize,
        want: usize,
    },
    #[error("topic {0} is not in the broker's metadata")]
    UnknownTopic(String),
    #[error("topic definition {file}: {source}")]
    Definition {
        file: &'static str,
        source: toml::de::Error,
    },
}

/// What an operator can do about a topic the broker refuses to create.
fn create_hint(code: RDKafkaErrorCode) -> &'static str {
    match code {
        RDKafkaErrorCode::InvalidTopic => {
            " (is there a topic whose name differs from it only in `.` and `_`? Kafka refuses such \
             a pair, so two tables whose names differ only that way cannot both have a \
             changelog topic under one prefix)"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => {
            " (and the topic does not exist: allow the principal to create topics with \
             livetable's prefixes, or create it by hand from topics/)"
        }
        _ => "",
    }
}

impl ChangelogError {
    /// Errors that retrying cannot fix: the service must stop and say why.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ChangelogError::PartitionMismatch { .. } | ChangelogError::Definition { .. }
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
struct TopicDef {
    #[serde(default)]
    partitions: Option<usize>,
    replication_factor: i32,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

const CHANGELOG_DEF: &str = include_str!("../../topics/changelog.toml");

const DLQ_DEF: &str = include_str!("../../topics/dlq.toml");

const VIEW_DEF: &str = include_str!("../../topics/view.toml");
const REGISTRY_DEF: &str = include_str!("../../topics/registry.toml");

/// Header names of changelog records.
pub const HEADER_TABLE: &str = "livetable.table";
pub const HEADER_OFFSET: &str = "livetable.offset";
pub const HEADER_SEQ: &str = "livetable.seq";
pub const HEADER_ACKED: &str = "livetable.acked";
pub const HEADER_OWNER: &str = "livetable.owner";
pub const HEADER_TS: &str = "livetable.ts_ms";
pub const HEADER_FENCE: &str = "livetable.fence";
/// The value of the fence header of a fence that ends the rewrite of a partition that started over.
pub const FENCE_RESTARTED: &str = "restarted";
/// The value of the fence header of a fence that says the input partition's offsets started over.
pub const FENCE_INPUT_RESET: &str = "input-reset";
/// The key of fence records (never a row: readers recognise fences by their header).
pub const FENCE_KEY: &str = "\u{0}livetable.fence";
/// The key of `input-reset` fences: a key of their own, so that compaction keeps the latest one
/// (after every record of the offsets before it) when later fences replace the others.
pub const INPUT_RESET_KEY: &str = "\u{0}livetable.input-reset";

/// What a fence record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceKind {
    /// It opens an owner's tenure of the partition.
    Open,
    /// It ends an owner's rewrite of a partition that started over: a reader that read the
    /// partition before it started over reads it again from the beginning.
    Restarted,
    /// The owner's input partition started over (its topic was created again): the input offsets
    /// of the records after it start again too, and a reader forgets the slice's input position,
    /// acknowledged offset and deletes (as the owner did) instead of taking the new records for
    /// older ones.
    InputReset,
}

impl FenceKind {
    fn header(self) -> &'static str {
        match self {
            FenceKind::Open => "1",
            FenceKind::Restarted => FENCE_RESTARTED,
            FenceKind::InputReset => FENCE_INPUT_RESET,
        }
    }

    /// Any other value opens a tenure (what a livetable of before the value was written reads).
    fn parse(value: &str) -> Self {
        match value {
            FENCE_RESTARTED => FenceKind::Restarted,
            FENCE_INPUT_RESET => FenceKind::InputReset,
            _ => FenceKind::Open,
        }
    }
}

/// What a changelog record says besides its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Input offset of the change (`-1` for a fence).
    pub off: i64,
    /// The slice's change count when the record was produced.
    pub count: u64,
    /// Every change up to this input offset was acknowledged before this record.
    pub acked: i64,
    pub owner: Owner,
    pub ts_ms: Option<i64>,
}

/// One changelog record as read back.
#[derive(Debug, Clone)]
pub struct ChangelogRecord {
    pub table: String,
    /// The record names its table (a header); else `table` is the topic's name without the
    /// prefix.
    pub named: bool,
    pub part: u32,
    /// The record's offset in the changelog partition.
    pub cl_offset: i64,
    pub key: String,
    /// `None`: a tombstone. Kept as the record's JSON (checked to be one object), parsed on use.
    pub row: Option<StoredRow>,
    pub meta: RecordMeta,
    /// A fence record (no row), and what it says.
    pub fence: Option<FenceKind>,
}

/// Why a changelog record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRecord {
    NoKey,
    NotARow,
}

/// Parses a changelog record of `topic` (the table comes from the header, else from the topic).
pub fn parse_record<M: Message>(prefix: &str, m: &M) -> Result<ChangelogRecord, BadRecord> {
    let header = |name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        })
    };
    let named = header(HEADER_TABLE).is_some();
    let table = header(HEADER_TABLE).map(String::from).unwrap_or_else(|| {
        m.topic()
            .strip_prefix(prefix)
            .unwrap_or(m.topic())
            .to_string()
    });
    let num = |name| header(name).and_then(|s| s.parse::<i64>().ok());
    let meta = RecordMeta {
        off: num(HEADER_OFFSET).unwrap_or(-1),
        count: header(HEADER_SEQ).and_then(|s| s.parse().ok()).unwrap_or(0),
        acked: num(HEADER_ACKED).unwrap_or(-1),
        owner: header(HEADER_OWNER)
            .and_then(Owner::parse)
            .unwrap_or_default(),
        ts_ms: num(HEADER_TS),
    };
    let part = u32::try_from(m.partition()).unwrap_or(0);
    if let Some(fence) = header(HEADER_FENCE) {
        return Ok(ChangelogRecord {
            table,
            named,
            part,
            cl_offset: m.offset(),
            key: String::new(),
            row: None,
            meta,
            fence: Some(FenceKind::parse(fence)),
        });
    }
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or(BadRecord::NoKey)?
        .to_string();
    let row = match m.payload() {
        None => None,
        Some(bytes) => Some(StoredRow::from_json(bytes).map_err(|_| BadRecord::NotARow)?),
    };
    Ok(ChangelogRecord {
        table,
        named,
        part,
        cl_offset: m.offset(),
        key,
        row,
        meta,
        fence: None,
    })
}

/// A table as the deployment's registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub table: String,
    /// The input topic that feeds the table.
    pub source: String,
    pub partitions: u32,
    /// The table's lineage: fixed by the first registration.
    pub epoch: String,
    /// The consumer group of the deployment that registered it.
    pub deployment: String,
    pub changelog: String,
}

impl RegistryEntry {
    /// What the local store keeps of the table.
    pub fn meta(&self) -> crate::table::store::TableMeta {
        crate::table::store::TableMeta {
            epoch: self.epoch.clone(),
            source: self.source.clone(),
            partitions: self.partitions,
        }
    }
}

/// Producer of changelog, registry and dead-letter records; creator of their topics.
pub struct Changelog {
    /// Replaced when it failed for good (see [`Changelog::renew_if_broken`]), with its generation
    /// (how many were replaced before it).
    producer: RwLock<(Arc<FutureProducer<ReaderContext>>, u64)>,
    producer_config: rdkafka::ClientConfig,
    brokers: String,
    admin: AdminClient<ReaderContext>,
    prefix: String,
    dlq_topic: String,
    /// See [`Changelog::dlq_generation`].
    dlq_generation: std::sync::atomic::AtomicU64,
    registry_topic: String,
    changelog_def: TopicDef,
    dlq_def: TopicDef,
    registry_def: TopicDef,
    view_def: TopicDef,
    /// Topics known to exist, with their partition counts.
    known: Mutex<HashMap<String, usize>>,
    /// Held while a batch's records or a resend are produced: records of a key reach the broker
    /// in the order its values were applied.
    order: Mutex<()>,
}

impl Changelog {
    pub fn new(config: &Config) -> Result<Self, ChangelogError> {
        let parse = |file: &'static str, text: &str| {
            toml::from_str(text).map_err(|source| ChangelogError::Definition { file, source })
        };
        let producer_config = source::producer_config(config);
        Ok(Changelog {
            producer: RwLock::new((
                Arc::new(producer_config.create_with_context(ReaderContext::new(&config.brokers))?),
                0,
            )),
            producer_config,
            brokers: config.brokers.clone(),
            admin: source::client_config(config)
                .create_with_context(ReaderContext::new(&config.brokers))?,
            prefix: config.changelog_prefix.clone(),
            dlq_topic: config.dlq_topic.clone(),
            dlq_generation: Default::default(),
            registry_topic: config.registry_topic(),
            changelog_def: {
                let mut def: TopicDef = parse("topics/changelog.toml", CHANGELOG_DEF)?;
                // the retention a node's restart relies on (`--changelog-tombstone-retention-secs`)
                def.config.insert(
                    "delete.retention.ms".to_string(),
                    config.changelog_tombstone_retention.as_millis().to_string(),
                );
                def
            },
            dlq_def: parse("topics/dlq.toml", DLQ_DEF)?,
            registry_def: parse("topics/registry.toml", REGISTRY_DEF)?,
            view_def: {
                let mut def: TopicDef = parse("topics/view.toml", VIEW_DEF)?;
                def.config.insert(
                    "delete.retention.ms".to_string(),
                    config.changelog_tombstone_retention.as_millis().to_string(),
                );
                def
            },
            known: Mutex::new(HashMap::new()),
            order: Mutex::new(()),
        })
    }

    fn producer(&self) -> Arc<FutureProducer<ReaderContext>> {
        self.current().0
    }

    fn current(&self) -> (Arc<FutureProducer<ReaderContext>>, u64) {
        self.producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The generation of the producer in use: pass it to [`Changelog::renew_if_broken`] with an
    /// error of a record sent now.
    pub fn generation(&self) -> u64 {
        self.current().1
    }

    /// Replaces the producer when it failed for good: librdkafka declared a fatal error, or the
    /// broker fenced it (`fenced`: what a record failed with, and the generation of the producer
    /// that sent it; Tansu fences an idempotent producer that wrote to a topic deleted and
    /// created again). Every later record would fail. What it had not delivered fails, and is
    /// produced again by its caller. An error of a record a replaced producer sent replaces
    /// nothing: those arrive for seconds after the replacement. True when it was replaced
    /// (blocking).
    pub fn renew_if_broken(&self, fenced: Option<(&KafkaError, u64)>) -> bool {
        let (current, generation) = self.current();
        let fenced = fenced.filter(|(e, sent_by)| {
            *sent_by == generation
                && matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
                )
        });
        let why = match (current.client().fatal_error(), fenced) {
            (Some((code, reason)), _) => format!("{code:?}: {reason}"),
            (None, Some((e, _))) => e.to_string(),
            (None, None) => return false,
        };
        let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if slot.1 != generation {
            return false; // replaced meanwhile
        }
        match self
            .producer_config
            .create_with_context(ReaderContext::new(&self.brokers))
        {
            Ok(p) => {
                tracing::error!(error = %why, generation = generation + 1, "the changelog producer failed for good; replaced by a new one (records not yet acknowledged are produced again)");
                *slot = (Arc::new(p), generation + 1);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the changelog producer failed for good and a new one could not be created; retrying");
                false
            }
        }
    }

    /// The changelog topic of `table`.
    pub fn topic_for(&self, table: &str) -> String {
        topic_name(&self.prefix, table)
    }

    pub fn registry_topic(&self) -> &str {
        &self.registry_topic
    }

    /// Orders produces: hold the guard while producing a batch, or while reading a row's current
    /// value and producing it again.
    pub fn ordered(&self) -> MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the changelog topic of `table` with `partitions` partitions, or checks that the
    /// existing one has that many (blocking: call from a thread outside the async workers).
    pub fn ensure_table(
        &self,
        table: &str,
        source_topic: &str,
        partitions: usize,
    ) -> Result<(), ChangelogError> {
        let topic = self.topic_for(table);
        let have = self.ensure(&topic, partitions, &self.changelog_def)?;
        if have != partitions {
            return Err(ChangelogError::PartitionMismatch {
                topic,
                source_topic: source_topic.to_string(),
                have,
                want: partitions,
            });
        }
        Ok(())
    }

    /// Creates the dead-letter topic if missing.
    pub fn ensure_dlq(&self) -> Result<(), ChangelogError> {
        self.ensure(
            &self.dlq_topic.clone(),
            self.dlq_def.partitions.unwrap_or(1),
            &self.dlq_def,
        )
        .map(|_| ())
    }

    /// Creates the dead-letter topic again after a delivery found it missing or started over
    /// (blocking); letters sent before then are produced again ([`Changelog::dlq_generation`]).
    pub fn recreate_dlq(&self) -> Result<(), ChangelogError> {
        self.forget(&self.dlq_topic);
        self.ensure_dlq()?;
        // only once the topic is there: a letter sent before (into the deleted topic, while this
        // call waits) keeps the older generation and is produced again
        self.dlq_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// How many times this process created the dead-letter topic again: a letter sent before
    /// the last time may have gone with the deleted topic.
    pub fn dlq_generation(&self) -> u64 {
        self.dlq_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> &str {
        &self.dlq_topic
    }

    /// Creates the registry topic if missing.
    pub fn ensure_registry(&self) -> Result<(), ChangelogError> {
        self.ensure(&self.registry_topic.clone(), 1, &self.registry_def)
            .map(|_| ())
    }

    /// Creates the changelog topic of a view (`topic`, one partition) if missing.
    pub fn ensure_view(&self, topic: &str) -> Result<(), ChangelogError> {
        self.ensure(topic, self.view_def.partitions.unwrap_or(1), &self.view_def)
            .map(|_| ())
    }

    /// Forgets what this node knew of `topic` (it was deleted): the next `ensure` looks again.
    pub fn forget(&self, topic: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    /// Creates `topic` if needed; returns its partition count.
    fn ensure(
        &self,
        topic: &str,
        partitions: usize,
        def: &TopicDef,
    ) -> Result<usize, ChangelogError> {
        if let Some(n) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
        {
            return Ok(*n);
        }
        let mut new = NewTopic::new(
            topic,
            i32::try_from(partitions).unwrap_or(i32::MAX),
            TopicReplication::Fixed(def.replication_factor),
        );
        for (k, v) in &def.config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let created = futures::executor::block_on(self.admin.create_topics([&new], &opts))?;
        let mut count = partitions;
        for result in created {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    count = self.partition_count(topic)?;
                }
                // Kafka checks the right to create before it looks whether the topic exists: a
                // principal without it can still use a topic made by hand
                Err((
                    name,
                    code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed),
                )) => {
                    count = self
                        .partition_count(topic)
                        .map_err(|_| ChangelogError::CreateTopic { topic: name, code })?;
                }
                Err((topic, code)) => return Err(ChangelogError::CreateTopic { topic, code }),
            }
        }
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string(), count);
        Ok(count)
    }

    /// The partition count of an existing topic (blocking).
    pub fn partition_count(&self, topic: &str) -> Result<usize, ChangelogError> {
        let md = self
            .producer()
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        md.topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len())
            .ok_or_else(|| ChangelogError::UnknownTopic(topic.to_string()))
    }

    /// Writes a fence record ([`Changelog::send_fence`]) and waits for it (blocking: a delivery
    /// always ends, within the producer's message.timeout.ms); returns its offset, or why it was
    /// not acknowledged. A producer the broker fenced is replaced before this returns, so that a
    /// retry goes through a new one.
    pub fn write_fence(
        &self,
        table: &str,
        part: u32,
        owner: Owner,
        member: &str,
        kind: FenceKind,
    ) -> Result<i64, String> {
        let generation = self.generation();
        let delivery = self
            .send_fence(table, part, owner, member, kind)
            .map_err(|e| e.to_string())?;
        match futures::executor::block_on(delivery) {
            Ok(Ok(d)) => Ok(d.offset),
            Ok(Err((e, _))) => {
                self.renew_if_broken(Some((&e, generation)));
                Err(e.to_string())
            }
            Err(_) => Err("cancelled".into()),
        }
    }

    /// A sender of many rows (a batch's): the producer and each table's topic name are looked up
    /// once, not per record (issue 14: per-record lookups and header strings were ~6 % of ingest).
    pub fn rows(&self) -> RowSender<'_> {
        RowSender {
            prefix: &self.prefix,
            producer: self.producer(),
            last: None,
        }
    }

    /// Produces a fence record: from here on, records of smaller owners are ignored by readers.
    /// `kind`: what else it says.
    pub fn send_fence(
        &self,
        table: &str,
        part: u32,
        owner: Owner,
        member: &str,
        kind: FenceKind,
    ) -> Result<DeliveryFuture, KafkaError> {
        let topic = self.topic_for(table);
        let meta = RecordMeta {
            off: -1,
            count: 0,
            acked: -1,
            owner,
            ts_ms: None,
        };
        let value = serde_json::json!({"owner": owner.to_header(), "member": member}).to_string();
        let record = FutureRecord::to(&topic)
            .key(if kind == FenceKind::InputReset {
                INPUT_RESET_KEY
            } else {
                FENCE_KEY
            })
            .payload(&value)
            .partition(i32::try_from(part).unwrap_or(0))
            .headers(headers(table, &meta, Some(kind)));
        send_retrying_queue_full(&self.producer(), record)
    }

    /// Produces a registry entry.
    pub fn send_registry(&self, entry: &RegistryEntry) -> Result<DeliveryFuture, KafkaError> {
        let value = serde_json::to_string(entry).unwrap_or_default();
        let record = FutureRecord::to(&self.registry_topic)
            .key(&entry.table)
            .payload(&value)
            .partition(0);
        send_retrying_queue_full(&self.producer(), record)
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
        send_retrying_queue_full(&self.producer(), record)
    }

    /// Waits until every record produced so far was acknowledged or failed (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
    }
}

/// Produces rows (see [`Changelog::rows`]).
pub struct RowSender<'a> {
    prefix: &'a str,
    producer: Arc<FutureProducer<ReaderContext>>,
    /// The last table's name and topic: a batch's rows come table by table.
    last: Option<(String, String)>,
}

impl RowSender<'_> {
    /// Produces the latest value of one key to its partition (a tombstone when `payload` is None).
    pub fn send(
        &mut self,
        table: &str,
        part: u32,
        key: &str,
        payload: Option<&[u8]>,
        meta: RecordMeta,
    ) -> Result<DeliveryFuture, KafkaError> {
        let topic = match &self.last {
            Some((t, topic)) if t == table => topic,
            _ => {
                let topic = topic_name(self.prefix, table);
                &self.last.insert((table.to_string(), topic)).1
            }
        };
        let mut record = FutureRecord::to(topic)
            .key(key)
            .partition(i32::try_from(part).unwrap_or(0))
            .headers(headers(table, &meta, None));
        if let Some(p) = payload {
            record = record.payload(p);
        }
        send_retrying_queue_full(&self.producer, record)
    }
}

/// The headers of a record; `fence`: of a fence, and which. Numbers are formatted on the stack:
/// librdkafka copies every header anyway.
fn headers(table: &str, meta: &RecordMeta, fence: Option<FenceKind>) -> OwnedHeaders {
    let mut owner = OwnerText::default();
    let mut h = OwnedHeaders::new_with_capacity(6)
        .insert(Header {
            key: HEADER_TABLE,
            value: Some(table),
        })
        .insert(Header {
            key: HEADER_OWNER,
            value: Some(owner.format(meta.owner)),
        });
    if let Some(kind) = fence {
        return h.insert(Header {
            key: HEADER_FENCE,
            value: Some(kind.header()),
        });
    }
    let (mut off, mut count, mut acked) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    h = h
        .insert(Header {
            key: HEADER_OFFSET,
            value: Some(off.format(meta.off)),
        })
        .insert(Header {
            key: HEADER_SEQ,
            value: Some(count.format(meta.count)),
        })
        .insert(Header {
            key: HEADER_ACKED,
            value: Some(acked.format(meta.acked)),
        });
    if let Some(ts) = meta.ts_ms {
        let mut buf = itoa::Buffer::new();
        h = h.insert(Header {
            key: HEADER_TS,
            value: Some(buf.format(ts)),
        });
    }
    h
}

/// [`Owner::to_header`] without an allocation: `epoch.generation` (at most 10 + 1 + 11 bytes).
#[derive(Default)]
struct OwnerText {
    buf: [u8; 32],
}

impl OwnerText {
    fn format(&mut self, owner: Owner) -> &str {
        let (mut e, mut g) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (e, g) = (
            e.format(owner.epoch).as_bytes(),
            g.format(owner.generation).as_bytes(),
        );
        let n = e.len() + 1 + g.len();
        self.buf[..e.len()].copy_from_slice(e);
        self.buf[e.len()] = b'.';
        self.buf[e.len() + 1..n].copy_from_slice(g);
        // digits and a dot
        std::str::from_utf8(&self.buf[..n]).unwrap_or_default()
    }
}

/// Enqueues a record; when librdkafka's queue is full, waits for it to drain (bounded memory).
fn send_retrying_queue_full<K, P>(
    producer: &FutureProducer<ReaderContext>,
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

/// The longest topic name Kafka accepts.
const MAX_TOPIC_NAME: usize = 249;

/// The changelog topic of `table`: `prefix + table` when that is a legal topic name (ASCII
/// letters, digits, `.`, `_`, `-`; at most 249 characters) and the table's name does not start
/// with `__` (the registry's). Any other name is written with `_` for each character Kafka does
/// not accept (`t` in front of a leading `__`), shortened to fit, and followed by `-` and a hash
/// of the whole name (FNV-1a, 64 bits, hex), so that two tables never share a changelog topic
/// (`a b` and `a_b`, or `赔率` and `比赛`, would both be `__` otherwise, and compaction would keep
/// one table's row of a key for both).
pub fn topic_name(prefix: &str, table: &str) -> String {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !table.starts_with("__")
        && table.chars().all(legal)
        && prefix.len() + table.len() <= MAX_TOPIC_NAME
    {
        return format!("{prefix}{table}");
    }
    let suffix = format!("-{}", crate::table::viewlog::def_id(table));
    let mut name: String = prefix.to_string();
    if table.starts_with("__") {
        name.push('t');
    }
    name.extend(table.chars().map(|c| if legal(c) { c } else { '_' }));
    // every character is ASCII by now (the prefix is checked at start)
    name.truncate(MAX_TOPIC_NAME.saturating_sub(suffix.len()));
    name.push_str(&suffix);
    name.truncate(MAX_TOPIC_NAME);
    name
}

#[cfg(test)]
mod tests {
    #[test]
    fn owner_header_is_formatted_as_to_header() {
        use crate::table::position::Owner;
        for (epoch, generation) in [(0, 0), (1, -1), (u32::MAX, i32::MIN), (42, i32::MAX)] {
            let owner = Owner { epoch, generation };
            let mut text = super::OwnerText::default();
            assert_eq!(text.format(owner), owner.to_header());
            assert_eq!(Owner::parse(text.format(owner)), Some(owner));
        }
    }

    #[test]
    fn topic_names_are_legal() {
        assert_eq!(
            super::topic_name("livetable.table.", "game_odds"),
            "livetable.table.game_odds"
        );
        assert_eq!(super::topic_name("p.", "game-odds.v2"), "p.game-odds.v2");
        let hash = |t: &str| crate::table::viewlog::def_id(t);
        assert_eq!(
            super::topic_name("p.", "spiel äöü/1"),
            format!("p.spiel_____1-{}", hash("spiel äöü/1"))
        );
        assert_eq!(
            super::topic_name("p.", "__registry"),
            format!("p.t__registry-{}", hash("__registry"))
        );
        let long = "x".repeat(400);
        assert_eq!(super::topic_name("p.", &long).len(), 249);
        assert!(super::topic_name("p.", &long).ends_with(&hash(&long)));
        // exactly as long as Kafka allows: kept as it is
        let fits = "y".repeat(247);
        assert_eq!(super::topic_name("p.", &fits), format!("p.{fits}"));
    }

    #[test]
    fn tables_never_share_a_changelog_topic() {
        use std::collections::HashMap;
        let long = |c: &str| format!("{}{c}", "x".repeat(300));
        let names = [
            "a b".to_string(),
            "a_b".to_string(),
            "a/b".to_string(),
            "赔率".to_string(),
            "比赛".to_string(),
            "__".to_string(),
            "t__".to_string(),
            "__registry".to_string(),
            "t__registry".to_string(),
            long("1"),
            long("2"),
            "x".repeat(247),
            "x".repeat(248),
        ];
        let mut seen = HashMap::new();
        for table in &names {
            let topic = super::topic_name("p.", table);
            assert!(topic.len() <= 249, "{topic}");
            assert!(
                topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
                "{topic}"
            );
            if let Some(other) = seen.insert(topic.clone(), table) {
                panic!("`{table}` and `{other}` share {topic}");
            }
        }
        // the registry's own topic is `<prefix>__registry`
        assert!(!seen.contains_key("p.__registry"));
    }

    #[test]
    fn a_refused_topic_says_what_to_look_for() {
        use rdkafka::types::RDKafkaErrorCode as C;
        let e = |code| {
            super::ChangelogError::CreateTopic {
                topic: "p.a_b".into(),
                code,
            }
            .to_string()
        };
        assert!(
            e(C::InvalidTopic).contains("only in `.` and `_`"),
            "{}",
            e(C::InvalidTopic)
        );
        assert!(e(C::TopicAuthorizationFailed).contains("create topics"));
        assert!(e(C::RequestTimedOut).ends_with("Request timed out)"));
    }

    #[test]
    fn embedded_definitions_parse() {
        let c: super::TopicDef = toml::from_str(super::CHANGELOG_DEF).unwrap();
        assert_eq!(c.config["cleanup.policy"], "compact");
        // the file says the default of `--changelog-tombstone-retention-secs`
        assert_eq!(c.config["delete.retention.ms"], "86400000");
        let d: super::TopicDef = toml::from_str(super::DLQ_DEF).unwrap();
        assert_eq!(d.config["cleanup.policy"], "delete");
        let r: super::TopicDef = toml::from_str(super::REGISTRY_DEF).unwrap();
        assert_eq!(r.config["cleanup.policy"], "compact");
        let v: super::TopicDef = toml::from_str(super::VIEW_DEF).unwrap();
        assert_eq!(v.config["cleanup.policy"], "compact");
        assert_eq!(v.partitions, Some(1));
        assert_eq!(v.config["delete.retention.ms"], "86400000");
    }
}
