//! The writer task, which takes queued publishes in order, records them `Pending` (one sled batch
//! and flush per batch), resolves recovering ids by reading their partitions back, and hands the
//! records to librdkafka; and the metadata task, which keeps the writable topics' partition counts
//! (creating topics configured with `partitions` when they are missing).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::job::{DeliveryContext, Job, JobKind, Outcome, Shared};
use super::recover::{self, Wanted, HEADER_ID, HEADER_PRINCIPAL};
use super::store::{Entry, StoreError};

pub(super) type PublishProducer = ThreadedProducer<DeliveryContext>;

/// The producer in use, replaced when librdkafka reports a fatal error (as the idempotent
/// producer does when a broker that lost its state answers "unknown producer id").
pub(super) struct Producers {
    current: Mutex<Option<Arc<PublishProducer>>>,
    config: ClientConfig,
    shared: Arc<Shared>,
}

impl Producers {
    pub fn new(config: ClientConfig, shared: Arc<Shared>) -> Result<Self, KafkaError> {
        let p = config.create_with_context(DeliveryContext {
            shared: shared.clone(),
        })?;
        Ok(Producers {
            current: Mutex::new(Some(Arc::new(p))),
            config,
            shared,
        })
    }

    /// Takes the producer out (at shutdown); publishing stops.
    pub fn take(&self) -> Option<Arc<PublishProducer>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The producer, a new one if the current one failed fatally; `None` after shutdown.
    async fn healthy(&self) -> Option<Arc<PublishProducer>> {
        let p = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        if let Some((code, reason)) = p.client().fatal_error() {
            tracing::error!(%code, reason, "the publish producer failed; starting a new one");
        } else if self.shared.replace_producer.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "records timed out while the broker answers: starting a new publish producer"
            );
        } else {
            return Some(p);
        }
        let (config, shared) = (self.config.clone(), self.shared.clone());
        let created = tokio::task::spawn_blocking(move || {
            config.create_with_context::<_, PublishProducer>(DeliveryContext { shared })
        })
        .await;
        let fresh = match created {
            Ok(Ok(f)) => Arc::new(f),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot start a new publish producer");
                return Some(p);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a new publish producer");
                return Some(p);
            }
        };
        {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.is_none() {
                return None;
            }
            *current = Some(fresh.clone());
        }
        // dropping librdkafka's producer blocks (it purges and reports what it still held)
        drop(tokio::task::spawn_blocking(move || drop(p)));
        Some(fresh)
    }
}

/// Publishes the writer takes in one batch (one log record and flush).
const WRITER_BATCH: usize = 4096;
/// How often an idle writer writes the outcomes recorded meanwhile.
const IDLE_WRITE: Duration = Duration::from_millis(100);
/// How long a metadata request may take (the broker may be down).
pub(super) const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) struct Writer {
    pub shared: Arc<Shared>,
    pub producers: Arc<Producers>,
    /// Client settings for reading partitions back.
    pub scan_config: ClientConfig,
    pub ack_timeout: Duration,
}

impl Writer {
    /// Runs until cancelled, or until `drain` is cancelled and the queue is empty. While idle,
    /// writes the outcomes recorded since its last batch every `IDLE_WRITE`.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Job>,
        drain: CancellationToken,
        cancel: CancellationToken,
    ) {
        let mut idle = tokio::time::interval(IDLE_WRITE);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                j = rx.recv() => match j { Some(j) => j, None => return },
                _ = drain.cancelled() => match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => {
                        self.batch(Vec::new()).await;
                        return;
                    }
                },
                _ = idle.tick() => {
                    self.batch(Vec::new()).await;
                    continue;
                }
            };
            let mut jobs = Vec::with_capacity(64);
            jobs.push(first);
            while jobs.len() < WRITER_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.batch(jobs) => {}
            }
        }
    }

    /// One batch: settles recovering ids, records the new ids `Pending` together with the
    /// outcomes recorded since the last batch (one log record, flushed when it holds new ids),
    /// then hands the records to librdkafka in queue order.
    async fn batch(&self, jobs: Vec<Job>) {
        let now = Instant::now();
        let created = now_ms();
        let (jobs, late): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.deadline > now);
        for j in late {
            // never produced: nothing to undo (a recovering id keeps its pending entry)
            j.finish(
                Outcome::Failed("waited too long for the broker".into()),
                false,
            );
        }
        let found = self.recover(&jobs).await;
        let shared = &self.shared;
        let mut batch = sled::Batch::default();
        // floors as they are now: every record of this batch will land above them
        let mut floors_changed = false;
        let floors = {
            let mut f = shared.floors.lock().unwrap_or_else(|e| e.into_inner());
            for (topic, partition) in std::mem::take(&mut f.1) {
                if let Some(o) = f.0.get(&(topic.clone(), partition)) {
                    shared.log.stage_floor(&mut batch, &topic, partition, *o);
                    floors_changed = true;
                }
            }
            f.0.clone()
        };
        let mut to_send = Vec::with_capacity(jobs.len());
        let mut settled = Vec::new();
        for mut j in jobs {
            let created = match &j.kind {
                JobKind::Produce => created,
                JobKind::Recover(old) => {
                    let old = *old;
                    let wanted = j
                        .answer
                        .id
                        .as_ref()
                        .map(|t| (t.id_json.clone(), t.principal.clone()));
                    match wanted.and_then(|w| found.get(&w)) {
                        Some(Ok(offset)) => {
                            j.pending = Some(old);
                            settled.push((j, Ok(*offset)));
                            continue;
                        }
                        Some(Err(message)) => {
                            settled.push((j, Err(message.clone())));
                            continue;
                        }
                        // not in its partition: produce it now; the id keeps its creation time
                        None => old.created_ms(),
                    }
                }
            };
            if j.answer.id.is_some() {
                j.pending = Some(Entry::Pending {
                    created_ms: created,
                    hash: j.hash,
                    partition: j.partition,
                    floor: floors
                        .get(&(j.topic.clone(), j.partition))
                        .copied()
                        .unwrap_or(-1),
                });
            }
            to_send.push(j);
        }
        // outcomes recorded since the last batch first, then this batch's new ids (an id
        // forgotten and published again appears in that order)
        let mut changes = {
            let mut ids = shared.ids.lock().unwrap_or_else(|e| e.into_inner());
            let mut changes = std::mem::take(&mut ids.changes);
            if !shared.stopped.load(Ordering::Acquire) {
                for j in &to_send {
                    if let (Some(t), Some(p)) = (&j.answer.id, j.pending) {
                        ids.index.apply(&t.scope, Some(p));
                        changes.push((t.scope.clone(), Some(p)));
                    }
                }
            }
            changes
        };
        for (j, r) in settled {
            let partition = j.partition;
            match r {
                Ok(offset) => j.finish(
                    Outcome::Written {
                        partition,
                        offset,
                        recovered: true,
                    },
                    false,
                ),
                Err(message) => j.finish(Outcome::Failed(message), false),
            }
        }
        // what settling recorded goes in this record too
        changes.extend(std::mem::take(
            &mut shared.ids.lock().unwrap_or_else(|e| e.into_inner()).changes,
        ));
        if changes.is_empty() && to_send.is_empty() && !floors_changed {
            return;
        }
        let new_ids = to_send.iter().any(|j| j.pending.is_some());
        shared.log.stage(&mut batch, created, &changes);
        // new ids are durable before any of these records can reach the broker
        let s = shared.clone();
        let stored = tokio::task::spawn_blocking(move || {
            s.log.apply(batch)?;
            if new_ids {
                s.log.flush_blocking()?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
        if let Err(e) = stored {
            tracing::error!(error = %e, "cannot record publishes in the id log");
            for j in to_send {
                j.finish(Outcome::Failed("the id log failed".into()), false);
            }
            return;
        }
        shared.metrics.publish.ids.set(
            shared
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .index
                .len() as i64,
        );
        if to_send.is_empty() {
            return;
        }
        let Some(producer) = self.producers.healthy().await else {
            for j in to_send {
                j.finish(Outcome::Failed("shutting down".into()), true);
            }
            return;
        };
        for j in to_send {
            send(&producer, j);
        }
    }
}

/// Hands one record to librdkafka (which copies it); a refusal answers at once.
fn send(producer: &PublishProducer, mut j: Job) {
    let topic = j.topic.clone();
    let payload = std::mem::take(&mut j.payload);
    let key = j.key.take();
    let partition = j.partition;
    let mut headers = OwnedHeaders::new();
    if let Some(t) = &j.answer.id {
        headers = headers.insert(Header {
            key: HEADER_ID,
            value: Some(t.id_json.as_bytes()),
        });
        if let Some(p) = &t.principal {
            headers = headers.insert(Header {
                key: HEADER_PRINCIPAL,
                value: Some(p.as_bytes()),
            });
        }
    }
    let mut record = BaseRecord::<str, [u8], Box<Job>>::with_opaque_to(&topic, Box::new(j))
        .partition(partition)
        .payload(&payload[..])
        .headers(headers);
    if let Some(k) = &key {
        record = record.key(k.as_str());
    }
    if let Err((e, record)) = producer.send(record) {
        // never handed over: certainly not written
        record.delivery_opaque.finish(
            Outcome::Failed(format!("the producer refused the record: {e}")),
            true,
        );
    }
}

impl Writer {
    /// Reads back the partitions of recovering ids, once per partition; per id: its offset, or
    /// why its outcome is still unknown. Ids absent from the answer are not in their partition.
    async fn recover(&self, jobs: &[Job]) -> HashMap<Wanted, Result<i64, String>> {
        let mut groups: HashMap<(Arc<str>, i32), (i64, HashSet<Wanted>)> = HashMap::new();
        for j in jobs {
            if let (JobKind::Recover(Entry::Pending { floor, .. }), Some(t)) =
                (&j.kind, &j.answer.id)
            {
                let g = groups
                    .entry((j.topic.clone(), j.partition))
                    .or_insert((i64::MAX, HashSet::new()));
                g.0 = g.0.min(*floor);
                g.1.insert((t.id_json.clone(), t.principal.clone()));
            }
        }
        if groups.is_empty() {
            return HashMap::new();
        }
        let config = self.scan_config.clone();
        let deadline = Instant::now() + self.ack_timeout / 2;
        let metrics = self.shared.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = HashMap::new();
            for ((topic, partition), (floor, wanted)) in groups {
                let scans = &metrics.publish.recovery_scans;
                match recover::scan(&config, &topic, partition, floor, &wanted, deadline) {
                    Ok(found) => {
                        for w in wanted {
                            match found.get(&w) {
                                Some(o) => {
                                    scans.with_label_values(&["found"]).inc();
                                    out.insert(w, Ok(*o));
                                }
                                None => scans.with_label_values(&["not_found"]).inc(),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%topic, partition, error = %e, "cannot read back a partition to resolve publishes");
                        for w in wanted {
                            scans.with_label_values(&["error"]).inc();
                            out.insert(
                                w,
                                Err(format!(
                                    "the outcome of an earlier publish of this id is unknown: {e}"
                                )),
                            );
                        }
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }
}

/// Keeps the partition counts of the writable topics, creating those configured with
/// `partitions` when they are missing (as after a broker lost its data).
pub(super) struct Metadata {
    pub shared: Arc<Shared>,
    pub admin: Arc<AdminClient<DefaultClientContext>>,
    pub topics: Vec<(String, Option<i32>)>,
}

impl Metadata {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let all_known = {
                let p = self
                    .shared
                    .partitions
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                self.topics.iter().all(|(t, _)| p.contains_key(t))
            };
            let pause = if all_known {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.shared.refresh.notified() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.refresh() => {}
            }
            // at most one round a second, however many publishes ask for one
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One round: every writable topic's partition count, creating missing ones if configured.
    pub async fn refresh(&self) {
        for (topic, create) in &self.topics {
            let admin = self.admin.clone();
            let t = topic.clone();
            let count = tokio::task::spawn_blocking(move || {
                admin
                    .inner()
                    .fetch_metadata(Some(&t), METADATA_TIMEOUT)
                    .map(|m| {
                        m.topics()
                            .iter()
                            .find(|x| x.name() == t && x.error().is_none())
                            .map(|x| x.partitions().len() as i32)
                            .filter(|n| *n > 0)
                    })
            })
            .await;
            let count = match count {
                Ok(Ok(c)) => {
                    // the broker answers: records that timed out meanwhile mean a stuck producer
                    if self.shared.producer_suspect.swap(false, Ordering::AcqRel) {
                        self.shared.replace_producer.store(true, Ordering::Release);
                    }
                    c
                }
                Ok(Err(e)) => {
                    tracing::debug!(topic, error = %e, "no metadata for a writable topic");
                    continue;
                }
                Err(_) => continue,
            };
            if count.is_none() {
                if let Some(n) = create {
                    self.create(topic, *n).await;
                }
            }
            let mut p = self
                .shared
                .partitions
                .write()
                .unwrap_or_else(|e| e.into_inner());
            match count {
                Some(n) => {
                    if p.insert(topic.clone(), n) != Some(n) {
                        tracing::info!(topic, partitions = n, "writable topic available");
                    }
                }
                None => {
                    if p.remove(topic).is_some() {
                        tracing::warn!(topic, "writable topic missing on the broker");
                    }
                }
            }
        }
    }

    async fn create(&self, topic: &str, partitions: i32) {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        match self.admin.create_topics([&new], &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(t) => tracing::info!(topic = t, partitions, "created a writable topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, code)) => {
                            tracing::warn!(topic = t, %code, "cannot create a writable topic")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(topic, error = %e, "cannot create a writable topic"),
        }
        // the next round sees its partitions
        self.shared.refresh.notify_one();
    }
}
