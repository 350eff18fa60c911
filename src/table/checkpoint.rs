//! Checkpoints: after a batch is applied, make it durable and tell Kafka.
//!
//! For each checkpoint, in order: flush sled (the batch and its positions become durable), wait
//! until the broker acknowledged its changelog and dead-letter records (re-producing the current
//! value of a key whose record failed), record how far each slice's changelog is acknowledged
//! (and clear the outbox marks of deletes), then commit the positions as the consumer group's
//! offsets. A node that lost its data directory restores from the changelog and resumes from those
//! offsets, so nothing acknowledged is lost and nothing is skipped.
//!
//! A barrier (sent when partitions are revoked) is answered once every checkpoint before it is
//! settled, with the revoked partitions' offsets committed synchronously.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cdc::source::SourceContext;
use crate::metrics::Metrics;
use crate::table::changelog::{Changelog, RecordMeta};
use crate::table::repair;
use crate::table::state::{SliceMode, Tables};
use crate::table::store::{AckMeta, DeadLetter, Store, StoreError};

/// A changelog record in flight for (table, partition, key) reflecting input offset `off`.
pub struct PendingRow {
    pub table: String,
    pub part: u32,
    pub key: String,
    pub off: i64,
    /// A tombstone: its outbox mark is cleared once acknowledged.
    pub deleted: bool,
    pub delivery: Option<DeliveryFuture>,
}

/// A dead letter in flight.
pub struct PendingLetter {
    pub id: u64,
    pub letter: DeadLetter,
    pub delivery: Option<DeliveryFuture>,
    /// [`Changelog::dlq_generation`] before `delivery` was sent.
    pub generation: u64,
}

/// What one applied batch still needs before its offsets can be committed.
/// A slice's changelog holds every change up to input offset `acked`, as of its `resets`-th
/// incarnation of the input partition (an acknowledgement from before a reset is ignored).
#[derive(Debug, Clone)]
pub struct SliceAck {
    pub table: String,
    pub part: u32,
    pub acked: i64,
    pub resets: u32,
}

#[derive(Default)]
pub struct Checkpoint {
    pub rows: Vec<PendingRow>,
    pub letters: Vec<PendingLetter>,
    pub positions: HashMap<(String, i32), i64>,
    /// Per slice, the input offset up to which the changelog holds every change once `rows` are
    /// settled.
    pub acked: Vec<SliceAck>,
    /// Answered once this checkpoint and every one before it are settled; the positions of the
    /// listed partitions are then committed synchronously.
    pub barrier: Option<Barrier>,
}

/// A revoke waiting for everything before it to be durable.
pub struct Barrier {
    pub commit: Vec<(String, i32)>,
    pub done: oneshot::Sender<()>,
}

/// How the durability task is doing, for readiness, health and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    /// Unix ms since when the oldest checkpoint in hand waits (0: none waits).
    pub pending_since_ms: AtomicI64,
    /// Unix ms of the last successful offset commit (0: none yet).
    pub last_commit_ms: AtomicI64,
}

impl Progress {
    /// How long the oldest checkpoint has waited.
    pub fn pending_for(&self) -> Duration {
        match self.pending_since_ms.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => Duration::from_millis(u64::try_from(now_ms() - since).unwrap_or(0)),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long a shutdown waits for a delivery in flight before it leaves the record in the outbox.
const SHUTDOWN_DELIVERY_WAIT: Duration = Duration::from_secs(3);

/// Errors a record can never overcome by being produced again, whatever the cluster's settings
/// become (too large for the broker or the producer, a record the broker finds invalid): such a
/// record is dead-lettered, not retried forever. A missing write permission, a topic policy or
/// an acks setting the broker refuses are the cluster's state, mended by its operator (an ACL
/// granted late, a rotated credential): they are retried like an outage, the checkpoint stays
/// pending and readiness says so, and nothing is dropped from the changelog meanwhile.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidRecord)
    )
}

/// The durability task's dependencies.
pub struct Checkpointer {
    pub store: Store,
    pub tables: Arc<Tables>,
    pub changelog: Arc<Changelog>,
    pub consumer: Option<Arc<BaseConsumer<SourceContext>>>,
    pub metrics: Arc<Metrics>,
    /// Retries stop when it is cancelled (shutdown); what was not settled is produced again after
    /// the restart (the outbox).
    pub cancel: CancellationToken,
    pub progress: Arc<Progress>,
    /// When each table's changelog was last repaired (see [`crate::table::repair`]).
    pub repairs: Mutex<HashMap<String, Instant>>,
    /// The highest offset the dead-letter topic acknowledged, per partition, since this process
    /// started or last created the topic again: an acknowledgement at or below it means the topic
    /// started over (deleted; a broker that takes records for a deleted topic, as Tansu does,
    /// acknowledges them from offset 0 and they are lost).
    pub dead_letters_acked: Mutex<HashMap<i32, i64>>,
}

/// A deleted changelog topic is looked at again at most this often per table.
const REPAIR_EVERY: Duration = Duration::from_secs(5);

/// What a delivery that failed for a missing topic creates again.
enum OnMissing<'a> {
    /// A changelog record of this table: the topic, and the slices that started over are written
    /// again (their records go to the second field, to be waited for like the checkpoint's).
    Changelog(&'a str, &'a mut Vec<PendingRow>),
    /// A dead letter: the dead-letter topic.
    DeadLetters,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The store failed to make a checkpoint durable: the node stops (nothing of that checkpoint is
/// committed) and its next start reopens the store.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreFailed(#[from] pub StoreError);

/// What re-producing a key found.
pub enum Resent {
    Sent(DeliveryFuture),
    /// The slice is no longer this node's (revoked): its new owner produces it.
    NotOwned,
    Failed,
    /// The changelog topic or partition does not exist (deleted).
    MissingTopic,
    /// The record can never be produced (see [`is_permanent`]).
    Rejected(KafkaError),
}

/// How waiting for a record ended.
enum Settled {
    /// `resent`: by a record produced again after the first failed.
    Acknowledged {
        part: i32,
        offset: i64,
        resent: bool,
    },
    /// Not this node's to produce any more.
    Dropped,
    /// Shutdown while retrying: not acknowledged, so it stays in the outbox (produced again
    /// after the restart).
    Cancelled,
    Rejected(KafkaError),
}

impl Checkpointer {
    /// Runs until the sender side is dropped and every checkpoint is done, then commits synchronously.
    ///
    /// A store that fails to flush ends it with the error, nothing of the checkpoint in hand
    /// committed: sled keeps failing every write after an I/O error (a full disk, say) until it is
    /// opened again, so the node must stop and be restarted rather than retry (see [`StoreFailed`]).
    pub async fn run(self, mut rx: mpsc::Receiver<Checkpoint>) -> Result<(), StoreFailed> {
        let mut committed: HashMap<(String, i32), i64> = HashMap::new();
        // false once a record was left unacknowledged at a shutdown: from then on no changelog
        // acknowledgement is recorded and no offset committed (the outbox is produced again
        // after the restart, and the input read again from the last commit)
        let mut whole = true;
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < 64 && group.last().is_some_and(|c| c.barrier.is_none()) {
                match rx.try_recv() {
                    Ok(cp) => group.push(cp),
                    Err(_) => break,
                }
            }
            self.flush().await?;
            let started = Instant::now();
            self.progress
                .pending_since_ms
                .store(now_ms(), Ordering::Release);
            let mut positions = HashMap::new();
            let mut barriers = Vec::new();
            for cp in group {
                if !whole {
                    // a shutdown left a record unacknowledged: the later ones stay in the
                    // outbox too, without a wait for their deliveries (one per checkpoint took
                    // the stop past its grace with the broker down)
                    barriers.extend(cp.barrier);
                    continue;
                }
                let (cl_next, dropped, settled) = self.settle(cp.rows, cp.letters).await;
                whole &= settled;
                if whole {
                    // checkpoints settle in order: everything up to this batch is in the changelog
                    self.record_acks(cp.acked, cl_next, &dropped);
                    for (tp, next) in cp.positions {
                        let slot = positions.entry(tp).or_insert(next);
                        *slot = (*slot).max(next);
                    }
                }
                barriers.extend(cp.barrier);
            }
            self.metrics
                .changelog_produce_seconds
                .observe(started.elapsed().as_secs_f64());
            self.progress.pending_since_ms.store(0, Ordering::Release);
            if barriers.is_empty() {
                self.commit(&positions, CommitMode::Async);
                committed.extend(positions);
            } else {
                self.flush().await?;
                // a round trip to the broker: not on a runtime worker
                let (committer, sync) = (self.committer(), positions.clone());
                let _ =
                    tokio::task::spawn_blocking(move || committer.commit(&sync, CommitMode::Sync))
                        .await;
                committed.extend(positions);
                // revoked partitions are their new owners' to commit from now on: the last
                // commit at the stop must not move them back
                for b in &barriers {
                    for tp in &b.commit {
                        committed.remove(tp);
                    }
                }
            }
            for b in barriers {
                let _ = b.done.send(());
            }
            self.metrics
                .store_bytes
                .set(i64::try_from(self.store.size_on_disk()).unwrap_or(i64::MAX));
        }
        // the last commit waits for the broker, but not longer than a moment: a broker that is
        // down must not hold the shutdown (what is not committed is re-read and recognised)
        let (Some(consumer), false) = (self.consumer.clone(), committed.is_empty()) else {
            return Ok(());
        };
        let metrics = self.metrics.clone();
        let last = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), next) in &committed {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                metrics.commit_errors.inc();
                tracing::warn!(error = %e, "the last offset commit failed; the next start re-reads from the previous one");
            }
        });
        if tokio::time::timeout(Duration::from_secs(3), last)
            .await
            .is_err()
        {
            tracing::warn!(
                "the last offset commit did not finish within 3 s (broker unreachable?)"
            );
        }
        Ok(())
    }

    /// Makes the store durable; a failure is the store's end in this process (not retried).
    async fn flush(&self) -> Result<(), StoreFailed> {
        let started = Instant::now();
        match self.store.flush().await {
            Ok(()) => {
                self.metrics
                    .flush_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "the store failed to flush: stopping (sled fails every write after an I/O error until it is opened again; a restart does that, and re-reads what was not durable)");
                self.cancel.cancel();
                Err(StoreFailed(e))
            }
        }
    }

    /// Sleeps; true when cancelled meanwhile.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    /// Raises each slice's acknowledged offset and changelog position, in memory and in the store;
    /// not the acknowledged offset of a slice in `dropped` (a record of it was not produced: the
    /// slice was let go of while it waited, e.g. a revoke that timed out during an outage), whose
    /// rows stay in the outbox and are produced again if this node takes the slice back.
    fn record_acks(
        &self,
        acked: Vec<SliceAck>,
        cl_next: HashMap<(String, u32), i64>,
        dropped: &HashSet<(String, u32)>,
    ) {
        let mut touched: HashMap<(String, u32), (i64, Option<u32>)> = HashMap::new();
        for a in acked {
            let slot = touched.entry((a.table, a.part)).or_insert((a.acked, None));
            if slot.1.is_some_and(|r| r != a.resets) {
                // acknowledgements across a reset in one checkpoint: keep the newer incarnation's
                if a.resets > slot.1.unwrap_or(0) {
                    *slot = (a.acked, Some(a.resets));
                }
                continue;
            }
            *slot = (slot.0.max(a.acked), Some(a.resets));
        }
        for k in cl_next.keys() {
            touched.entry(k.clone()).or_insert((-1, None));
        }
        for ((table, part), (off, resets)) in touched {
            let Some(t) = self.tables.get(&table) else {
                continue;
            };
            let kept = dropped.contains(&(table.clone(), part));
            let next = cl_next.get(&(table.clone(), part)).copied().unwrap_or(0);
            t.update_slices(|s| {
                let slice = s.slice_mut(part);
                if slice.mode == SliceMode::Absent {
                    // let go of before its records were acknowledged (a materialiser's revoke at a
                    // shutdown does not wait): what the store keeps of it stays as it was then,
                    // and a late record past a new owner's fence must not move it on
                    return;
                }
                // only an owned slice's: once let go of (a revoke that timed out), what reaches
                // its changelog is the follower's to fold, and a later checkpoint's
                // acknowledgement must not pass a record an earlier one did not produce
                if !kept
                    && slice.mode == SliceMode::Owned
                    && resets.is_none_or(|r| r == slice.resets)
                {
                    slice.raise_acked(off);
                }
                slice.cl_next = slice.cl_next.max(next);
                // stored under the table's lock, so the store sees the slice's changes in their
                // order (an input reset's lower offset is not overwritten by an older value)
                if let Err(e) = self.store.put_acks(&table, part, &AckMeta::of(slice)) {
                    tracing::error!(error = %e, "recording the changelog acknowledgement failed; rows will be produced again");
                }
            });
        }
    }

    /// Waits for every delivery; re-produces what failed until the broker takes it; clears the
    /// outbox. Returns the changelog position after the acknowledged records per slice, the
    /// slices with a record not produced because they are no longer this node's (their outbox
    /// stays), and `false` when a shutdown left a record unacknowledged (it stays in the outbox).
    async fn settle(
        &self,
        rows: Vec<PendingRow>,
        letters: Vec<PendingLetter>,
    ) -> (HashMap<(String, u32), i64>, HashSet<(String, u32)>, bool) {
        let mut cl_next: HashMap<(String, u32), i64> = HashMap::new();
        let mut dropped: HashSet<(String, u32)> = HashSet::new();
        let mut whole = true;
        let mut rows: VecDeque<PendingRow> = rows.into();
        while let Some(mut row) = rows.pop_front() {
            if !whole {
                // a shutdown gave up on an earlier record: the rest stay in the outbox too,
                // without waiting for their deliveries one by one
                continue;
            }
            let delivery = row.delivery.take();
            let what = || format!("changelog record {}/{}/{}", row.table, row.part, row.key);
            let resend = || self.resend_row(&row.table, row.part, &row.key);
            let mut refill = Vec::new();
            let settled = self
                .until_acknowledged(
                    delivery,
                    what,
                    resend,
                    OnMissing::Changelog(&row.table, &mut refill),
                )
                .await;
            // a repair's records are waited for like the checkpoint's own
            rows.extend(refill);
            match settled {
                Settled::Acknowledged { offset, .. } => {
                    if offset < self.cl_position(&row.table, row.part) {
                        // below a record this node had acknowledged: the partition started over?
                        let mut refill = Vec::new();
                        self.repair(&row.table, &mut refill).await;
                        rows.extend(refill);
                    }
                    let slot = cl_next.entry((row.table.clone(), row.part)).or_insert(0);
                    *slot = (*slot).max(offset + 1);
                }
                Settled::Dropped => {
                    // not produced: its outbox mark (a tombstone's) stays, and the slice's
                    // acknowledged offset does not pass it
                    dropped.insert((row.table.clone(), row.part));
                    continue;
                }
                Settled::Cancelled => {
                    // its outbox mark (a tombstone's) stays: produced again after the restart
                    whole = false;
                    continue;
                }
                Settled::Rejected(e) => self.reject_row(&row, &e).await,
            }
            if row.deleted {
                if let Err(e) = self
                    .store
                    .clear_deleted(&row.table, &row.key, row.part, row.off)
                {
                    tracing::error!(error = %e, "clearing the outbox failed; the key will be produced again");
                }
            }
        }
        for letter in letters {
            if !whole {
                continue;
            }
            let id = letter.id;
            let settled = self.settle_letter(letter).await;
            if matches!(settled, Settled::Cancelled) {
                // stays in the outbox: produced again at the next start
                whole = false;
                continue;
            }
            if let Err(e) = self.store.clear_dead_letter(id) {
                tracing::error!(error = %e, "clearing a dead letter from the outbox failed; it will be produced again");
            }
        }
        (cl_next, dropped, whole)
    }

    /// Produces one dead letter until the broker takes it; produced again when the topic was
    /// created again after it was sent, or started over under it (see
    /// [`Checkpointer::dead_letters_acked`]).
    async fn settle_letter(&self, letter: PendingLetter) -> Settled {
        let what = || {
            format!(
                "dead letter {}/{}/{}",
                letter.letter.topic, letter.letter.partition, letter.letter.offset
            )
        };
        let (settled, copy) = self
            .until_letter_taken(letter.delivery, letter.letter.clone(), &what)
            .await;
        let Settled::Acknowledged {
            part,
            offset,
            resent,
        } = settled
        else {
            return settled;
        };
        // a letter produced again after a failure may land above letters sent before it: only
        // first sends, which land in the order they were sent, are compared
        let again = if resent {
            false
        } else if letter.generation < self.changelog.dlq_generation() {
            tracing::warn!(what = %what(), "the dead-letter topic was created again after this letter was sent; producing it again");
            true
        } else if self.dead_letters_went_back(part, offset) {
            tracing::warn!(what = %what(), partition = part, offset, "the dead-letter topic acknowledged at or below an offset it had acknowledged before: it started over (deleted?); creating it again and producing the letter again");
            // produced again only once the topic is there again (else it would go where the
            // first copy went); a shutdown meanwhile leaves it in the outbox
            let mut backoff = Duration::from_millis(500);
            while !self.recreate_dead_letters(false).await {
                if self.sleep(backoff).await {
                    return Settled::Cancelled;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            true
        } else {
            false
        };
        if !again {
            return settled;
        }
        self.until_letter_taken(None, copy, &what).await.0
    }

    /// Waits until the broker takes `letter` (sent as `delivery`, else sent now): a shorter copy
    /// once when the whole one is refused for good (refused too: dropped, counted). Returns the
    /// outcome and the copy produced.
    async fn until_letter_taken(
        &self,
        delivery: Option<DeliveryFuture>,
        letter: DeadLetter,
        what: &(dyn Fn() -> String + Sync),
    ) -> (Settled, DeadLetter) {
        let resend = |l: DeadLetter| {
            let changelog = self.changelog.clone();
            async move {
                match tokio::task::spawn_blocking(move || changelog.send_dead_letter(&l)).await {
                    Ok(Ok(d)) => Resent::Sent(d),
                    Ok(Err(e)) if is_permanent(&e) => Resent::Rejected(e),
                    Ok(Err(e)) if repair::missing_topic(&e) => Resent::MissingTopic,
                    _ => Resent::Failed,
                }
            }
        };
        let settled = self
            .until_acknowledged(
                delivery,
                what,
                || resend(letter.clone()),
                OnMissing::DeadLetters,
            )
            .await;
        let Settled::Rejected(e) = settled else {
            return (settled, letter);
        };
        // too large, or not allowed: a shorter copy once, else it is dropped loudly
        let mut short = letter;
        short.value = short.value.map(|v| v[..v.len().min(64 * 1024)].to_vec());
        short.truncated = true;
        let settled = self
            .until_acknowledged(None, what, || resend(short.clone()), OnMissing::DeadLetters)
            .await;
        if let Settled::Rejected(e2) = &settled {
            self.metrics.dead_letters_dropped.inc();
            tracing::error!(what = %what(), error = %e, retry_error = %e2, "the dead-letter topic refuses this record; it is dropped (counted in livetable_dead_letters_dropped_total)");
        }
        (settled, short)
    }

    /// Waits until the broker acknowledges `delivery`; while it does not, backs off and asks
    /// `resend` for a new delivery (a retriable error is retried for as long as it takes, a
    /// permanent one is handed back). A missing topic is created again first (`on_missing`).
    async fn until_acknowledged<F, Fut>(
        &self,
        mut delivery: Option<DeliveryFuture>,
        what: impl Fn() -> String,
        mut resend: F,
        mut on_missing: OnMissing<'_>,
    ) -> Settled
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Resent>,
    {
        let mut backoff = Duration::from_millis(100);
        // the producer generation that sent `delivery` (unknown for the one handed in: it may
        // be of a producer replaced since, whose errors must replace nothing)
        let mut sent_by: Option<u64> = None;
        loop {
            if let Some(d) = delivery.take() {
                // a shutdown waits a moment for a delivery (a broker that answers settles it),
                // not the whole message timeout of a broker that is down (30 s, past the grace)
                let outcome = tokio::select! {
                    r = d => Some(r),
                    _ = async {
                        self.cancel.cancelled().await;
                        tokio::time::sleep(SHUTDOWN_DELIVERY_WAIT).await;
                    } => None,
                };
                let Some(outcome) = outcome else {
                    return Settled::Cancelled;
                };
                let failed = match outcome {
                    Ok(Ok(d)) => {
                        return Settled::Acknowledged {
                            part: d.partition,
                            offset: d.offset,
                            resent: sent_by.is_some(),
                        }
                    }
                    Ok(Err((e, _))) if is_permanent(&e) => return Settled::Rejected(e),
                    Ok(Err((e, _))) if repair::missing_topic(&e) => {
                        self.missing_topic(&mut on_missing).await;
                        Some(e)
                    }
                    Ok(Err((e, _))) => {
                        if crate::cdc::source::throttled(
                            "changelog-not-acknowledged",
                            Duration::from_secs(10),
                        ) {
                            tracing::warn!(what = %what(), error = %e, "not acknowledged by the broker; retrying (repeated at most every 10 s)")
                        }
                        Some(e)
                    }
                    Err(_) => {
                        tracing::warn!(what = %what(), "delivery cancelled; retrying");
                        None
                    }
                };
                self.metrics.changelog_produce_errors.inc();
                self.renew_producer(failed.zip(sent_by)).await;
                if self.sleep(backoff).await {
                    return Settled::Cancelled;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            let generation = self.changelog.generation();
            let r = resend().await;
            match r {
                Resent::Sent(d) => {
                    delivery = Some(d);
                    sent_by = Some(generation);
                }
                Resent::NotOwned => return Settled::Dropped,
                Resent::Rejected(e) => return Settled::Rejected(e),
                Resent::MissingTopic | Resent::Failed => {
                    if matches!(r, Resent::MissingTopic) {
                        self.missing_topic(&mut on_missing).await;
                    }
                    self.renew_producer(None).await;
                    if self.sleep(backoff).await {
                        return Settled::Cancelled;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A delivery failed because its topic is missing (deleted while the node runs).
    async fn missing_topic(&self, on_missing: &mut OnMissing<'_>) {
        match on_missing {
            OnMissing::Changelog(table, refill) => self.repair(table, refill).await,
            OnMissing::DeadLetters => {
                // (failed or throttled: the delivery's retry comes back here)
                self.recreate_dead_letters(true).await;
            }
        }
    }

    /// Whether the dead-letter topic acknowledged `offset` of `part` at or below one it had
    /// acknowledged before; else notes it.
    fn dead_letters_went_back(&self, part: i32, offset: i64) -> bool {
        let mut acked = self
            .dead_letters_acked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let highest = acked.entry(part).or_insert(-1);
        // one offset is one record: the same offset twice is a topic that started over too
        if offset <= *highest {
            return true;
        }
        *highest = offset;
        false
    }

    /// Creates the dead-letter topic again (it was deleted while the node runs; nothing else
    /// would, and every checkpoint with a dead letter would wait for it for ever); a delivery
    /// that failed for a missing topic does so at most every [`REPAIR_EVERY`] (`throttled`).
    /// Whether the topic is there again.
    async fn recreate_dead_letters(&self, throttled: bool) -> bool {
        const KEY: &str = "\0dead-letters";
        {
            let mut last = self.repairs.lock().unwrap_or_else(|e| e.into_inner());
            if throttled && last.get(KEY).is_some_and(|t| t.elapsed() < REPAIR_EVERY) {
                return false;
            }
            last.insert(KEY.to_string(), Instant::now());
        }
        let changelog = self.changelog.clone();
        let done = tokio::task::spawn_blocking(move || changelog.recreate_dlq()).await;
        match done {
            Ok(Ok(())) => {
                // what the deleted topic acknowledged says nothing of the new one
                self.dead_letters_acked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                tracing::warn!(topic = %self.changelog.dlq_topic(), "the dead-letter topic was missing; created again");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "creating the dead-letter topic again failed; retrying");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "creating the dead-letter topic again panicked");
                false
            }
        }
    }

    /// A changelog record the broker can never take: the row goes to the dead-letter topic (with
    /// the reason) and the checkpoint moves on, so nothing else waits behind it. The changelog
    /// lacks this value: a restore or a gateway serves the key's previous value until it changes
    /// again (counted in `livetable_changelog_rejected_total`, logged as an error).
    async fn reject_row(&self, row: &PendingRow, e: &KafkaError) {
        self.metrics.changelog_rejected.inc();
        tracing::error!(table = %row.table, partition = row.part, key = %row.key, error = %e, "the changelog refuses this row for good (too large or not allowed); it goes to the dead-letter topic and the changelog keeps the previous value");
        let value = self.tables.row(&row.table, &row.key).map(|r| r.encode());
        let letter = DeadLetter {
            topic: self.changelog.topic_for(&row.table),
            partition: i32::try_from(row.part).unwrap_or(0),
            offset: row.off,
            key: Some(row.key.as_bytes().to_vec()),
            value: value.map(|v| v[..v.len().min(64 * 1024)].to_vec()),
            reason: "changelog_rejected".into(),
            error: e.to_string(),
            truncated: true,
        };
        let changelog = self.changelog.clone();
        let sent = tokio::task::spawn_blocking(move || changelog.send_dead_letter(&letter)).await;
        match sent {
            Ok(Ok(d)) => {
                if !matches!(d.await, Ok(Ok(_))) {
                    self.metrics.dead_letters_dropped.inc();
                }
            }
            _ => self.metrics.dead_letters_dropped.inc(),
        }
    }

    /// Produces the current value of a key (the newest, whatever change failed), in order with
    /// the ingest loop's produces.
    pub async fn resend_row(&self, table: &str, part: u32, key: &str) -> Resent {
        let (tables, changelog) = (self.tables.clone(), self.changelog.clone());
        let (table, key) = (table.to_string(), key.to_string());
        let sent = tokio::task::spawn_blocking(move || {
            resend_current(&tables, &changelog, &table, part, &key)
        })
        .await;
        match sent {
            Ok(Ok(Some(d))) => Resent::Sent(d),
            Ok(Ok(None)) => Resent::NotOwned,
            Ok(Err(e)) if is_permanent(&e) => Resent::Rejected(e),
            Ok(Err(e)) if repair::missing_topic(&e) => Resent::MissingTopic,
            Ok(Err(e)) => {
                self.metrics.changelog_produce_errors.inc();
                tracing::warn!(error = %e, "changelog produce failed");
                Resent::Failed
            }
            Err(_) => Resent::Failed,
        }
    }

    /// Replaces the changelog producer if it failed for good ([`Changelog::renew_if_broken`]).
    async fn renew_producer(&self, fenced: Option<(KafkaError, u64)>) {
        let changelog = self.changelog.clone();
        let _ = tokio::task::spawn_blocking(move || {
            changelog.renew_if_broken(fenced.as_ref().map(|(e, g)| (e, *g)))
        })
        .await;
    }

    /// The changelog position of slice `part` of `table` after the records acknowledged so far.
    fn cl_position(&self, table: &str, part: u32) -> i64 {
        self.tables
            .get(table)
            .and_then(|t| t.read().slice(part).map(|s| s.cl_next))
            .unwrap_or(0)
    }

    /// The changelog topic of `table` is missing, or started over: created again if missing, and
    /// the slices whose partition started over written again (their records go to `refill`); at
    /// most every [`REPAIR_EVERY`] per table.
    async fn repair(&self, table: &str, refill: &mut Vec<PendingRow>) {
        {
            let mut last = self.repairs.lock().unwrap_or_else(|e| e.into_inner());
            if last.get(table).is_some_and(|t| t.elapsed() < REPAIR_EVERY) {
                return;
            }
            last.insert(table.to_string(), Instant::now());
        }
        // until it worked: the changelog is where this node's state becomes durable
        let mut backoff = Duration::from_millis(500);
        loop {
            let (tables, changelog, store) = (
                self.tables.clone(),
                self.changelog.clone(),
                self.store.clone(),
            );
            let name = table.to_string();
            let done = tokio::task::spawn_blocking(move || {
                repair::recreate(&tables, &changelog, &store, &name)
            })
            .await;
            match done {
                Ok(repaired) => {
                    let n = repaired.rows.len() as u64;
                    self.metrics.changelog_refilled.inc_by(n);
                    refill.extend(repaired.rows);
                    match repaired.result {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(table, error = %e, "repairing the changelog topic failed; retrying")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(table, error = %e, "changelog repair task failed; retrying")
                }
            }
            self.renew_producer(None).await;
            if self.sleep(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn commit(&self, positions: &HashMap<(String, i32), i64>, mode: CommitMode) {
        self.committer().commit(positions, mode);
    }

    fn committer(&self) -> Committer {
        Committer {
            consumer: self.consumer.clone(),
            metrics: self.metrics.clone(),
            progress: self.progress.clone(),
        }
    }
}

/// What commits the group's offsets (its own value, to commit off the runtime's workers).
struct Committer {
    consumer: Option<Arc<BaseConsumer<SourceContext>>>,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
}

impl Committer {
    fn commit(&self, positions: &HashMap<(String, i32), i64>, mode: CommitMode) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in positions {
            if tpl
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .is_err()
            {
                return;
            }
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                let now = now_ms();
                self.progress.last_commit_ms.store(now, Ordering::Release);
                self.metrics.last_commit_unixtime.set(now as f64 / 1000.0);
            }
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::warn!(error = %e, "committing group offsets failed; the next checkpoint retries");
            }
        }
    }
}

/// Produces the current value of `table/key` in slice `part` (blocking). `Ok(None)` when the
/// slice is not owned here, or the key now lives in another slice.
pub fn resend_current(
    tables: &Tables,
    changelog: &Changelog,
    table: &str,
    part: u32,
    key: &str,
) -> Result<Option<DeliveryFuture>, rdkafka::error::KafkaError> {
    let Some(t) = tables.get(table) else {
        return Ok(None);
    };
    let _order = changelog.ordered();
    let (payload, meta) = {
        let s = t.read();
        let Some(slice) = s.slice(part).filter(|s| s.mode == SliceMode::Owned) else {
            return Ok(None);
        };
        let entry = s.rows.get(key);
        if entry.is_some_and(|e| e.part != part) {
            return Ok(None);
        }
        let off = entry.map_or_else(
            || slice.tombs.get(key).copied().unwrap_or(slice.last_off),
            |e| e.off,
        );
        (
            entry.map(|e| e.row.encode()),
            RecordMeta {
                off,
                count: slice.count,
                acked: slice.acked,
                owner: slice.owner,
                ts_ms: None,
            },
        )
    };
    changelog
        .rows()
        .send(table, part, key, payload.as_deref(), meta)
        .map(Some)
}

#[cfg(test)]
mod tests;
