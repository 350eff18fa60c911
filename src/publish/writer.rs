//! The writer task: takes queued publishes in order, settles recovering ids by reading their
//! partitions back, writes one log record per batch (the outcomes recorded since the last batch,
//! then the new ids `Pending`), flushes it, and hands the records to librdkafka.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::job::{Job, JobKind, Outcome, Shared};
use super::producer::{Producers, PublishProducer};
use super::recover::{self, Wanted, HEADER_ID, HEADER_PRINCIPAL};
use super::store::{Entry, StoreError};

/// Publishes the writer takes in one batch (one log record and flush).
const WRITER_BATCH: usize = 4096;
/// How often an idle writer writes the outcomes recorded meanwhile.
const IDLE_WRITE: Duration = Duration::from_millis(100);

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
                    // an id is looked for in its own topic and partition (one id may be
                    // pending on several topics)
                    let wanted = j.answer.id.as_ref().map(|t| {
                        (
                            (j.topic.clone(), j.partition),
                            (t.id_json.clone(), t.principal.clone()),
                        )
                    });
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

/// A topic and partition.
type Place = (Arc<str>, i32);

impl Writer {
    /// Reads back the partitions of recovering ids, once per partition; per (topic, partition)
    /// and id: its offset, or why its outcome is still unknown. Ids absent from the answer are not
    /// in their partition.
    async fn recover(&self, jobs: &[Job]) -> HashMap<(Place, Wanted), Result<i64, String>> {
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
                                    out.insert(((topic.clone(), partition), w), Ok(*o));
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
                                ((topic.clone(), partition), w),
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
