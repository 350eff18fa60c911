//! A publish on its way to the broker ([`Job`]), the state the delivery callback shares with the
//! rest of publishing ([`Shared`]), and the callback itself ([`DeliveryContext`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::ProducerContext;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};

use super::store::{Change, Entry, IdIndex, IdLog, Scope};
use crate::metrics::Metrics;

/// The last offset the broker acknowledged per (topic, partition): the floor of records produced
/// after it.
pub(super) type Floors = HashMap<(Arc<str>, i32), i64>;
/// Floors and the (topic, partition)s whose floor changed since the writer last stored them.
pub(super) type FloorState = (Floors, HashSet<(Arc<str>, i32)>);

/// The ids: in flight, remembered, and the changes not yet written to the log. One lock, so "in
/// flight, or else remembered" is one decision and an outcome moves from one to the other at once.
#[derive(Default)]
pub(super) struct Ids {
    /// Ids handed over and not yet answered by the broker: a second publish of one waits here.
    pub inflight: HashMap<Scope, Arc<Slot>>,
    pub index: IdIndex,
    /// Outcomes recorded in the index since the writer last wrote them to the log.
    pub changes: Vec<Change>,
}

/// State shared by sessions, the writer and the delivery callback (which runs on librdkafka's
/// polling thread).
pub(super) struct Shared {
    pub log: IdLog,
    pub ids: Mutex<Ids>,
    /// Floors, and which of them changed since the writer last stored them.
    pub floors: Mutex<FloorState>,
    /// Partition counts of the writable topics that exist on the broker.
    pub partitions: RwLock<HashMap<String, i32>>,
    pub metrics: Arc<Metrics>,
    /// After an abort nothing more is recorded (as if the process had died).
    pub stopped: AtomicBool,
    /// Asks the metadata task for a refresh (a topic went missing).
    pub refresh: Notify,
    /// A record timed out in the producer: if the broker answers metadata meanwhile, the producer
    /// is stuck (an idempotent producer whose broker lost its state retries an unknown producer
    /// id for ever) and is replaced.
    pub producer_suspect: AtomicBool,
    /// Set by the metadata task: the writer replaces the producer before its next batch.
    pub replace_producer: AtomicBool,
}

/// The outcome of one publish, shared by it and any concurrent publish of the same id.
pub(super) struct Slot {
    pub hash: u64,
    pub tx: watch::Sender<Option<Outcome>>,
}

#[derive(Debug, Clone)]
pub(super) enum Outcome {
    Written {
        partition: i32,
        offset: i64,
        /// Found in the partition by a recovery scan: written by an earlier publish.
        recovered: bool,
    },
    Failed(String),
}

/// The id of a publish that has one.
pub(super) struct TrackedId {
    pub scope: Scope,
    /// The id as JSON text (the record's `livetable.publish_id` header).
    pub id_json: String,
    pub principal: Option<String>,
}

/// Who is told the outcome. Dropping it unanswered (a queue that went away) answers with a
/// failure, so no waiter hangs until its timeout for nothing.
pub(super) struct Answer {
    pub id: Option<TrackedId>,
    pub slot: Arc<Slot>,
    pub shared: Arc<Shared>,
    answered: bool,
}

impl Answer {
    pub fn new(id: Option<TrackedId>, slot: Arc<Slot>, shared: Arc<Shared>) -> Self {
        Answer {
            id,
            slot,
            shared,
            answered: false,
        }
    }

    /// Records `change` in the index (unless aborted), takes the id out of flight, answers.
    fn send(&mut self, outcome: Outcome, change: Option<Option<Entry>>) {
        if let Some(id) = &self.id {
            let mut ids = self.shared.ids.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = change {
                if !self.shared.stopped.load(Ordering::Acquire) {
                    ids.index.apply(&id.scope, entry);
                    ids.changes.push((id.scope.clone(), entry));
                }
            }
            if ids
                .inflight
                .get(&id.scope)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                ids.inflight.remove(&id.scope);
            }
        }
        self.slot.tx.send_replace(Some(outcome));
        self.answered = true;
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.answered {
            self.send(Outcome::Failed("the publish was abandoned".into()), None);
        }
    }
}

pub(super) enum JobKind {
    Produce,
    /// The index holds `Pending` for this id from before: find the record, or produce it.
    Recover(Entry),
}

/// One record on its way to the broker.
pub(super) struct Job {
    pub kind: JobKind,
    pub topic: Arc<str>,
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub hash: u64,
    pub deadline: Instant,
    pub answer: Answer,
    /// The `Pending` entry written for it (what `Done` replaces).
    pub pending: Option<Entry>,
    pub _in_flight: InFlight,
}

impl Job {
    /// Records the outcome of the id (if it has one): `Done` when written, forgotten when
    /// certainly not written (a retry produces it), still `Pending` when unknown; then answers
    /// everyone waiting.
    pub fn finish(mut self, outcome: Outcome, certainly_not_written: bool) {
        if let Outcome::Failed(reason) = &outcome {
            // the client gets a nack; this says which id, for when the nack is lost with its
            // connection and the retry lands after later records of its key
            tracing::debug!(
                topic = %self.topic,
                partition = self.partition,
                id = %self.answer.id.as_ref().map_or("", |t| t.id_json.as_str()),
                certainly_not_written,
                reason,
                "publish failed"
            );
        }
        let change = self.pending.and_then(|p| match &outcome {
            Outcome::Written {
                partition, offset, ..
            } => Some(Some(Entry::Done {
                created_ms: p.created_ms(),
                hash: p.hash(),
                partition: *partition,
                offset: *offset,
            })),
            Outcome::Failed(_) if certainly_not_written => Some(None),
            Outcome::Failed(_) => None,
        });
        self.answer.send(outcome, change);
    }
}

/// A place in the process-wide in-flight bound, reflected in the gauge.
pub(super) struct InFlight {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl InFlight {
    pub fn new(permit: OwnedSemaphorePermit, metrics: &Arc<Metrics>) -> Self {
        metrics.publish.in_flight.inc();
        InFlight {
            _permit: permit,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.publish.in_flight.dec();
    }
}

/// The producer's callbacks: librdkafka logs to `tracing`, deliveries to the store and waiters.
pub(super) struct DeliveryContext {
    pub shared: Arc<Shared>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::warn!(facility = fac, "publish producer: {log_message}")
            }
            _ => tracing::debug!(facility = fac, "publish producer: {log_message}"),
        }
    }

    // a broker that is down is expected now and then: its publishes are nacked `unavailable`
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "publish producer");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Job>;

    fn delivery(&self, result: &DeliveryResult<'_>, job: Box<Job>) {
        match result {
            Ok(m) => {
                let (partition, offset) = (m.partition(), m.offset());
                {
                    let mut f = self.shared.floors.lock().unwrap_or_else(|e| e.into_inner());
                    let k = (job.topic.clone(), partition);
                    f.0.insert(k.clone(), offset);
                    f.1.insert(k);
                }
                job.finish(
                    Outcome::Written {
                        partition,
                        offset,
                        recovered: false,
                    },
                    false,
                );
            }
            Err((e, m)) => {
                // SAFETY: `m` is the message of this delivery report, valid during the callback;
                // the call only reads its status.
                let status = unsafe { rdkafka::bindings::rd_kafka_message_status(m.ptr()) };
                let not_written = status
                    == rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED;
                let code = e.rdkafka_error_code();
                if code == Some(RDKafkaErrorCode::MessageTimedOut) {
                    self.shared.producer_suspect.store(true, Ordering::Release);
                }
                // a topic gone (or a broker back without it), or a record that timed out: the
                // metadata task looks at the broker again
                if matches!(
                    code,
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::MessageTimedOut
                    )
                ) {
                    self.shared.refresh.notify_one();
                }
                tracing::debug!(topic = %job.topic, error = %e, not_written, "publish not acknowledged");
                job.finish(
                    Outcome::Failed(format!("the broker did not acknowledge the record: {e}")),
                    not_written,
                );
            }
        }
    }
}
