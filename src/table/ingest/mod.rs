//! The ingest loop: the one writer of the slices this node owns. Runs on its own thread
//! (librdkafka's poll and sled's batch apply are blocking calls) and, per batch of records:
//! poll -> skip what the slices already reflect -> decode -> stage per table -> commit to memory
//! (clients see it) -> ONE sled batch (rows, slices, outbox, positions) -> produce the changelog
//! records and dead letters -> hand the checkpoint to the durability task.
//!
//! Clients may see a batch before sled and the changelog hold it: positions are Kafka offsets,
//! so a node that restarts after kill -9 re-applies the same records to the same state and a
//! client's resume token stays valid (see `table::position`).

mod jobs;
pub mod partitions;
mod stage;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::Offset;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cdc::decode::DecodeSettings;
use crate::cdc::source::{self, SourceContext};
use crate::config::TopicSelection;
use crate::metrics::Metrics;
use crate::table::changelog::{Changelog, FenceKind};
use crate::table::checkpoint::Checkpoint;
use crate::table::position::{Owner, RecordId};
use crate::table::readiness::Readiness;
use crate::table::registry::Registry;
use crate::table::restore::RestoreError;
use crate::table::state::{SliceMode, Table, Tables, UpdateSink};
use crate::table::store::{AckMeta, SliceMeta, SourceMarks, Store, StoreError, WriteBatch};
use partitions::{Done, PartState, Partitions, StartCheck};
use stage::BatchStage;

/// Errors that stop ingestion.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the durability task stopped")]
    CheckpointerGone,
    #[error("{0}")]
    Restore(#[from] RestoreError),
}

/// Everything the loop needs.
pub struct Ingest {
    pub consumer: Arc<BaseConsumer<SourceContext>>,
    pub partitions: Arc<Partitions>,
    pub done_rx: Receiver<Done>,
    pub store: Store,
    pub tables: Arc<Tables>,
    pub registry: Arc<Registry>,
    pub changelog: Arc<Changelog>,
    pub sink: Arc<dyn UpdateSink>,
    pub metrics: Arc<Metrics>,
    pub settings: DecodeSettings,
    pub max_batch: usize,
    /// Payload bytes that close a batch.
    pub max_batch_bytes: usize,
    pub max_record_bytes: usize,
    pub checkpoint_tx: mpsc::Sender<Checkpoint>,
    pub readiness: Arc<Readiness>,
    pub cancel: CancellationToken,
    pub next_letter_id: u64,
    pub topics: TopicSelection,
    pub max_ready_lag: i64,
    /// Named in errors.
    pub brokers: String,
    /// After an unclean stop: per owned partition, the end offset first seen, which the ingest
    /// must reach again before new subscriptions are served (see [`Readiness::set_recovering`]).
    pub recover_targets: HashMap<(String, i32), i64>,
    /// After an unclean stop: the slices (table, part, owner) this node owned before it. Each
    /// must be assigned here again (and applied up to its target) or taken over by another
    /// member before new subscriptions are served: until the group gives back the partitions of
    /// the dead process, a partial assignment would let them serve the older stored state.
    pub recover_slices: Vec<(String, u32, crate::table::position::Owner)>,
    pub started: Instant,
    /// `--source-resends skip`.
    pub skip_source_resends: bool,
    /// Per input partition, the source position each connector stream reached (stored with the
    /// partition's position).
    pub source_marks: HashMap<(String, i32), SourceMarks>,
    /// Per input partition, the message key of a re-sent delete just skipped: its tombstone,
    /// next in the partition, is skipped too.
    pub resent_delete: HashMap<(String, i32), Vec<u8>>,
}

/// After an unclean stop, how long new subscriptions are held at most while the ingest re-applies
/// the input.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// How long a partition resumed one record early waits for that record before it is not checked.
const VERIFY_WAIT: Duration = Duration::from_secs(30);

/// Tries of the `input-reset` fence ([`Ingest::announce_reset`]) before the ingest goes on
/// without it.
const RESET_FENCE_TRIES: u32 = 3;

impl Ingest {
    /// Runs until cancelled. Returns an error only when the store, the durability task or a
    /// restore fails for good.
    pub fn run(mut self) -> Result<(), IngestError> {
        let consumer = self.consumer.clone();
        let mut last_lag_check = Instant::now();
        let mut warned_decimals = HashSet::new();
        while !self.cancel.is_cancelled() {
            let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => self.consumer_error(&e),
                None => {}
            }
            // when the batch's first record was taken (the start of livetable's share)
            let polled = Instant::now();
            let mut bytes = batch.first().map_or(0, |m| m.payload_len());
            while !batch.is_empty() && batch.len() < self.max_batch && bytes < self.max_batch_bytes
            {
                match consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        bytes += m.payload_len();
                        batch.push(m)
                    }
                    Some(Err(e)) => self.consumer_error(&e),
                    None => break,
                }
            }
            self.partitions.pump_jobs();
            while let Ok(done) = self.done_rx.try_recv() {
                if let Some(cp) = self.partitions.finish(&consumer, done)? {
                    self.checkpoint_tx
                        .blocking_send(cp)
                        .map_err(|_| IngestError::CheckpointerGone)?;
                }
            }
            let idle = batch.is_empty();
            if !idle {
                self.apply(&batch, polled, &mut warned_decimals)?;
            }
            drop(batch);
            if idle || last_lag_check.elapsed() > Duration::from_millis(250) {
                last_lag_check = Instant::now();
                self.check_lag(idle);
            }
        }
        Ok(())
    }

    /// A consumer error: a broker that is down is reported by the client's log already; others are
    /// warned about at most every 10 s.
    fn consumer_error(&self, e: &rdkafka::error::KafkaError) {
        use rdkafka::types::RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(C::BrokerTransportFailure | C::AllBrokersDown) => {
                tracing::debug!(error = %e, "consumer error")
            }
            _ if source::throttled("ingest-consumer-error", Duration::from_secs(10)) => {
                tracing::warn!(error = %e, brokers = %self.brokers, "consumer error (repeated at most every 10 s)")
            }
            _ => {}
        }
    }

    fn apply(
        &mut self,
        batch: &[BorrowedMessage<'_>],
        polled: Instant,
        warned: &mut HashSet<(String, String)>,
    ) -> Result<(), IngestError> {
        let started = Instant::now();
        let restarted = self.detect_resets(batch);
        let (states, positions, names, owners) = {
            let mut inner = self.partitions.lock();
            for tp in inner.marks_forgotten.drain(..) {
                self.source_marks.remove(&tp);
            }
            (
                inner.states.clone(),
                inner.positions.clone(),
                inner.names.clone(),
                inner.owners.clone(),
            )
        };
        let mut st = BatchStage::new(positions, names, polled);
        st.hold(restarted);
        for (i, m) in batch.iter().enumerate() {
            st.record(self, m, i, &states, warned);
        }
        let last = st.note_last(batch, &owners);
        let (checkpoint, touched) = st.finish(self)?;
        {
            let mut inner = self.partitions.lock();
            for (tp, next) in &checkpoint.positions {
                // still assigned (a partition this batch paused for a new slice is `Restoring`
                // and resumes from here, so records before the pause are not read again)
                if inner.states.contains_key(tp) {
                    let slot = inner.positions.entry(tp.clone()).or_insert(*next);
                    *slot = (*slot).max(*next);
                    if *slot == *next {
                        match last.get(tp) {
                            Some(l) => inner.last.insert(tp.clone(), *l),
                            None => inner.last.remove(tp),
                        };
                    }
                }
            }
        }
        self.checkpoint_tx
            .blocking_send(checkpoint)
            .map_err(|_| IngestError::CheckpointerGone)?;
        for table in touched {
            if let Some(t) = self.tables.get(&table) {
                let t = t.read();
                self.metrics.table_size(&table, t.rows.len(), t.seq());
            }
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.last_record_unixtime.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        Ok(())
    }

    /// A partition just resumed at a known position that delivers a record below it was reset by
    /// the client (the position was past the end: the topic was recreated). A partition resumed
    /// one record early ([`partitions::Inner::verify`]) whose first record is not the one its
    /// position follows was created again too, with at least as many records as the position.
    /// Handled before the batch is staged, or its records would be taken for ones the slices
    /// already reflect. Returns the partitions read again from their beginning: their records in
    /// this batch are not applied.
    fn detect_resets(&self, batch: &[BorrowedMessage<'_>]) -> HashSet<(String, i32)> {
        let mut found: Vec<((String, i32), StartCheck, i64)> = Vec::new();
        let mut replaced: Vec<((String, i32), RecordId, RecordId)> = Vec::new();
        {
            let mut inner = self.partitions.lock();
            if inner.check_start.is_empty() && inner.verify.is_empty() {
                return HashSet::new();
            }
            // the few partitions watched: no key is built for the records of the others
            let watched: Vec<(String, i32)> = inner
                .verify
                .keys()
                .chain(inner.check_start.keys())
                .cloned()
                .collect();
            for m in batch {
                if !watched
                    .iter()
                    .any(|(t, p)| *p == m.partition() && t == m.topic())
                {
                    continue;
                }
                let tp = (m.topic().to_string(), m.partition());
                if let Some((last, _)) = inner.verify.remove(&tp) {
                    if m.offset() == last.offset {
                        let read = RecordId::of(m);
                        if read != last {
                            inner.check_start.remove(&tp);
                            replaced.push((tp, last, read));
                        }
                        // the record the position follows: the slices reflect it
                        continue;
                    }
                    // above it: that record is gone (compaction, retention, a transaction's
                    // marker), nothing to compare; below it: the client reset the partition
                    // (checked next)
                    tracing::debug!(topic = %tp.0, partition = tp.1, expected = last.offset, got = m.offset(), "the record an input position follows was not read again");
                }
                if let Some(&check) = inner.check_start.get(&tp) {
                    if m.offset() < check.start && Some(m.offset()) != check.early {
                        inner.check_start.remove(&tp);
                        found.push((tp, check, m.offset()));
                    }
                }
            }
        }
        for (tp, check, offset) in found {
            let (lo, hi) = source::cached_watermarks(&self.consumer, &tp.0, tp.1)
                .filter(|&(lo, hi)| lo <= offset && hi < check.start)
                .unwrap_or((offset, offset));
            self.check_reset(&tp, check, lo, hi);
        }
        let mut restarted = HashSet::new();
        for (tp, last, read) in replaced {
            self.count_reset(&tp);
            tracing::error!(
                topic = %tp.0,
                partition = tp.1,
                offset = last.offset,
                applied_timestamp_ms = last.timestamp_ms,
                found_timestamp_ms = read.timestamp_ms,
                "the input record this partition's position follows is not the one applied there: the topic was deleted and created again; reading the partition from its beginning. Rows the new topic never mentions stay; see README, Operations, 'Input offsets out of range'"
            );
            self.restart_offsets(&tp, 0);
            if let Err(e) =
                self.consumer
                    .seek(&tp.0, tp.1, Offset::Beginning, Duration::from_secs(5))
            {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seek failed");
            }
            restarted.insert(tp);
        }
        restarted
    }

    /// Updates lag gauges and readiness: every assigned partition restored and within
    /// `max_ready_lag` records of its high watermark.
    fn check_lag(&mut self, idle: bool) {
        if let Some(join) = self.consumer.context().group_join_time() {
            self.metrics.group_join_seconds.set(join.as_secs_f64());
        }
        let Some(assignment) = self.consumer.context().assignment() else {
            // no group assignment yet: if the subscription matches no topic at all, there is
            // nothing to catch up with (some brokers never complete a join for an empty match)
            match self.subscription_matches_any() {
                Some(false) => {
                    // after an unclean stop with nothing owned before it, nothing can come back:
                    // new subscriptions (of views over events, say) need not wait
                    if !self.readiness.is_recovered() && self.recover_slices.is_empty() {
                        tracing::info!("recovered from the unclean stop: no input partition was owned before it and none matches now");
                        self.readiness.set_recovered();
                    }
                    self.readiness
                        .set_ingest(true, "no topic matches the subscription yet")
                }
                Some(true) => self
                    .readiness
                    .set_ingest(false, "waiting for the consumer group's assignment"),
                None => self.readiness.set_ingest(
                    false,
                    &format!("cannot reach the broker at {}", self.brokers),
                ),
            }
            return;
        };
        let (states, positions, checks) = {
            let inner = self.partitions.lock();
            (
                inner.states.clone(),
                inner.positions.clone(),
                inner.check_start.clone(),
            )
        };
        self.forget_unread_checks();
        for (tp, check) in checks {
            if !matches!(states.get(&tp), Some(PartState::Active { .. })) {
                // paused for a new slice (checked once it resumes); a revoke drops the check
                continue;
            }
            if let Some((lo, hi)) = source::cached_watermarks(&self.consumer, &tp.0, tp.1) {
                if check.stale((lo, hi), Instant::now()) {
                    // maybe an earlier fetch's: wait for one after the resume
                    continue;
                }
                self.partitions.lock().check_start.remove(&tp);
                if check.start < lo || check.start > hi {
                    self.check_reset(&tp, check, lo, hi);
                }
                if check.start > hi {
                    // some brokers answer a fetch past the end with nothing rather than an
                    // out-of-range error: go to the start of the (new) partition ourselves
                    if let Err(e) =
                        self.consumer
                            .seek(&tp.0, tp.1, Offset::Offset(lo), Duration::from_secs(5))
                    {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seek failed");
                    }
                }
            }
        }
        // after an idle poll nothing fetched is waiting: the fetch position is the applied position
        let fetched: HashMap<(String, i32), i64> = if idle {
            self.consumer
                .position()
                .map(|tpl| {
                    tpl.elements()
                        .iter()
                        .filter_map(|e| match e.offset() {
                            Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        } else {
            HashMap::new()
        };
        let mut ready = true;
        let mut why = String::new();
        let recovering = !self.readiness.is_recovered();
        let mut reached = true;
        for tp in &assignment {
            if !matches!(states.get(tp), Some(PartState::Active { .. })) {
                ready = false;
                reached = false;
                why = format!("restoring {}/{}", tp.0, tp.1);
                continue;
            }
            let applied = positions.get(tp).copied().max(fetched.get(tp).copied());
            let hi = source::cached_watermarks(&self.consumer, &tp.0, tp.1);
            match (hi, applied) {
                (Some((lo, hi)), applied) => {
                    let applied = applied.unwrap_or(lo).max(lo);
                    let lag = (hi - applied).max(0);
                    if recovering {
                        let target = *self.recover_targets.entry(tp.clone()).or_insert(hi);
                        reached &= applied >= target;
                    }
                    let labels = [tp.0.as_str(), &tp.1.to_string()];
                    self.metrics
                        .consumer_lag
                        .with_label_values(&labels)
                        .set(lag);
                    // every owned partition has a reset series (0 until one happens), so that
                    // alerts on increase() see the first reset
                    self.metrics.offset_resets.with_label_values(&labels);
                    if lag > self.max_ready_lag {
                        ready = false;
                        why = format!("{}/{} is {lag} records behind", tp.0, tp.1);
                    }
                }
                (None, _) => {
                    ready = false;
                    reached = false;
                    why = format!("no fetch response yet for {}/{}", tp.0, tp.1);
                }
            }
        }
        if recovering && reached {
            if let Some(why_not) = self.slice_not_recovered(&assignment) {
                reached = false;
                tracing::debug!(slice = %why_not, "unclean-stop hold: a slice owned before the stop is not back yet");
            }
        }
        if recovering {
            if reached {
                tracing::info!(partitions = assignment.len(), after_ms = self.started.elapsed().as_millis() as u64, "recovered from the unclean stop: the input is applied again up to where it ended");
                self.readiness.set_recovered();
            } else if self.started.elapsed() > RECOVERY_LIMIT {
                tracing::warn!(limit_secs = RECOVERY_LIMIT.as_secs(), "still behind the input's end after an unclean stop; serving new subscriptions anyway (they may show older values than clients saw before the stop)");
                self.readiness.set_recovered();
            }
        }
        self.readiness.set_ingest(ready, &why);
    }

    /// A partition resumed one record early whose record does not come (gone by retention from a
    /// partition with nothing newer, or a seek that failed) is not checked: once the partition
    /// starts above it, or after [`VERIFY_WAIT`].
    fn forget_unread_checks(&self) {
        let mut inner = self.partitions.lock();
        if inner.verify.is_empty() {
            return;
        }
        let consumer = &self.consumer;
        inner.verify.retain(|tp, (last, since)| {
            let gone = source::cached_watermarks(consumer, &tp.0, tp.1)
                .is_some_and(|(lo, _)| lo > last.offset);
            let keep = !gone && since.elapsed() < VERIFY_WAIT;
            if !keep {
                tracing::info!(topic = %tp.0, partition = tp.1, offset = last.offset, "the record an input position follows was not read again: the topic is not checked");
            }
            keep
        });
    }

    /// After an unclean stop: the first slice owned before it that is neither assigned here again
    /// nor taken over by another member (a newer owner in its changelog), if any.
    fn slice_not_recovered(
        &self,
        assignment: &std::collections::BTreeSet<(String, i32)>,
    ) -> Option<String> {
        self.recover_slices
            .iter()
            .find_map(|(table, part, before)| {
                let t = self.tables.get(table)?;
                let t = t.read();
                let tp = (
                    t.source.to_string(),
                    i32::try_from(*part).unwrap_or(i32::MAX),
                );
                let back = match t.slice(*part) {
                    Some(s) if s.mode == SliceMode::Owned => assignment.contains(&tp),
                    Some(s) if s.mode == SliceMode::Followed => s.owner > *before,
                    _ => false,
                };
                (!back).then(|| format!("{table}/{part}"))
            })
    }

    /// A partition's position is gone from the broker: below its first offset (retention passed
    /// while this node was away) or past its end (the topic was recreated). Consumption goes on from
    /// the earliest offset; what was in between is lost, deletes included: counted and logged for
    /// the operator (README, "Operations").
    pub fn check_reset(&self, tp: &(String, i32), check: StartCheck, lo: i64, hi: i64) {
        let expected = check.start;
        let (lost, why) = match classify_reset(expected, lo, hi, check.covered) {
            Reset::None => return,
            Reset::Covered(c) => {
                tracing::warn!(
                    topic = %tp.0,
                    partition = tp.1,
                    position = expected,
                    first_offset = lo,
                    committed = c,
                    "input records a former owner applied and committed are gone by retention; not re-read"
                );
                return;
            }
            Reset::Lost(lost, why) => (lost, why),
        };
        self.count_reset(tp);
        tracing::error!(
            topic = %tp.0,
            partition = tp.1,
            position = expected,
            first_offset = lo,
            end_offset = hi,
            records = lost,
            "input position no longer exists: {why}; consuming from the earliest offset. Changes in between are lost; see README, Operations, 'Input offsets out of range'"
        );
        if expected > hi {
            self.restart_offsets(tp, lo);
        }
    }

    fn count_reset(&self, tp: &(String, i32)) {
        self.metrics
            .offset_resets
            .with_label_values(&[&tp.0, &tp.1.to_string()])
            .inc();
    }

    /// The offsets of an input partition restarted (its topic was created again): the slices
    /// must not take the new records for ones they reflect, and the partition goes on from `lo`.
    fn restart_offsets(&self, tp: &(String, i32), lo: i64) {
        if !matches!(
            self.partitions.lock().states.get(tp),
            Some(PartState::Active { .. })
        ) {
            // a partition this node no longer applies: its slices are another's (or being taken
            // over again, which reads where they stand)
            tracing::debug!(topic = %tp.0, partition = tp.1, "input reset of a partition no longer active here: left to its owner");
            return;
        }
        let part = u32::try_from(tp.1).unwrap_or(0);
        for e in self.registry.tables_of(&tp.0) {
            if let Some(t) = self.tables.get(&e.table) {
                let mut owner = None;
                // no re-send of a row between the renumbering and the fence (it would carry an
                // old offset past the fence, where readers take it for a new one)
                let _order = self.changelog.ordered();
                t.update_slices(|s| {
                    // the rows take offset -1: older than any change of the new offsets, here and
                    // (by the fence below) on every other copy; a row still to be re-sent to the
                    // changelog goes with -1 too, not with an old offset readers would take for
                    // one of the new offsets
                    s.rows.set_offsets(part, -1);
                    let mut b = WriteBatch::default();
                    for (key, row) in s.rows.iter().filter(|(_, r)| r.part == part) {
                        crate::table::restore::put_entry(&mut b, &e.table, key, Some(row));
                    }
                    let slice = s.slice_mut(part);
                    owner = Some(slice.owner);
                    slice.last_off = -1;
                    slice.acked = -1;
                    // and the stored deletes: read back at a start, their old offsets would make
                    // new changes of their keys look stale (and re-send them with those offsets)
                    for key in slice.tombs.keys() {
                        b.unmark_deleted(&e.table, key);
                    }
                    slice.tombs.clear();
                    slice.resets = slice.resets.wrapping_add(1);
                    // stored now, under the table's lock (as acknowledgements are), before
                    // the first batch of the new offsets, whose flush makes it durable too:
                    // after a kill -9 the old acknowledged and applied offsets must not make the
                    // new records look applied (the position below is stored too)
                    b.put_slice(&e.table, part, &SliceMeta::of(slice));
                    b.put_acks(&e.table, part, &AckMeta::of(slice));
                    if let Err(err) = self.store.apply(b) {
                        tracing::error!(error = %err, "recording the reset slice failed");
                    }
                });
                if let Some(owner) = owner {
                    self.announce_reset(&t, &e.table, part, owner);
                }
            }
        }
        // stored after the acknowledgements (a crash between keeps the old position, checked
        // again at the next start; the other order could start the new offsets past the old
        // acknowledged one): a stop before the first batch of the new offsets must not find the
        // old position and take the partition for one created again once more
        let mut b = WriteBatch::default();
        b.restart_position(&tp.0, tp.1, lo);
        if let Err(err) = self.store.apply(b) {
            tracing::error!(error = %err, "recording the restarted input position failed");
        }
        let mut inner = self.partitions.lock();
        inner.positions.insert(tp.clone(), lo);
        inner.marks_forgotten.push(tp.clone());
        inner.last.remove(tp);
        inner.verify.remove(tp);
    }

    /// Tells the readers of a slice's changelog that its input offsets started over (an
    /// `input-reset` fence, before any record of the new offsets: the rows sent so far were queued
    /// before it on the same producer), so that they forget its position as this node did instead
    /// of taking the new records for older ones. Blocking (as the seek beside it): tried up to
    /// [`RESET_FENCE_TRIES`] times (each within the producer's `message.timeout.ms`, together
    /// below the consumer's `max.poll.interval.ms`), as the records of the new offsets must not
    /// reach the changelog without it. The slice's changelog position moves past it once it is
    /// there (every record sent before it is settled by then): a take-over after a kill -9, or
    /// this node's follower after a revoke, must not read the records before it again, nor fold
    /// the fence again over changes made since.
    fn announce_reset(&self, t: &Table, table: &str, part: u32, owner: Owner) {
        let mut failed = String::new();
        for attempt in 0..RESET_FENCE_TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            match self.changelog.write_fence(
                table,
                part,
                owner,
                "input-reset",
                FenceKind::InputReset,
            ) {
                Ok(at) => {
                    t.update_slices(|s| {
                        let slice = s.slice_mut(part);
                        if slice.cl_next <= at {
                            slice.cl_next = at + 1;
                            if let Err(err) = self.store.put_acks(table, part, &AckMeta::of(slice))
                            {
                                tracing::error!(error = %err, "recording the changelog position past the input-reset fence failed");
                            }
                        }
                    });
                    return;
                }
                Err(why) => failed = why,
            }
        }
        tracing::error!(table, partition = part, error = %failed, "the changelog did not take the fence that says the input's offsets started over: other nodes' copies of the slice may take the new offsets' records for old ones and keep old values (reset the table); see README, Operations, 'Input offsets out of range'");
    }

    /// Whether any topic matches the subscription (`None`: the broker did not answer).
    fn subscription_matches_any(&self) -> Option<bool> {
        let metadata = self
            .consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .ok()?;
        let names: Vec<&str> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name())
            .collect();
        Some(match &self.topics {
            TopicSelection::Names(wanted) => wanted.iter().any(|w| names.contains(&w.as_str())),
            TopicSelection::Pattern(p) => regex::Regex::new(p)
                .map(|re| names.iter().any(|n| re.is_match(n)))
                .unwrap_or(true),
        })
    }
}

/// What a start position the broker no longer has means.
#[derive(Debug, PartialEq, Eq)]
enum Reset {
    /// The position exists.
    None,
    /// Below the first offset, but that offset is at or below the group's committed offset when
    /// the partition was taken over (`Taken::committed`): the start was chosen below it because
    /// the changelog's mark lags the former owner's last records, and retention removed only
    /// records that owner had applied and committed. Its changelog records hold them unless it
    /// had missed its revoke (RELIABILITY.md, SPLIT-1); nothing livetable could know of is lost.
    Covered(i64),
    /// Records lost, and why.
    Lost(i64, &'static str),
}

fn classify_reset(expected: i64, lo: i64, hi: i64, covered: Option<i64>) -> Reset {
    if expected < lo {
        if let Some(c) = covered.filter(|&c| lo <= c) {
            return Reset::Covered(c);
        }
        Reset::Lost(
            lo - expected,
            "the records were removed by retention before they were applied",
        )
    } else if expected > hi {
        Reset::Lost(
            expected - hi,
            "the partition ends before this position: the topic was recreated or truncated",
        )
    } else {
        Reset::None
    }
}

#[cfg(test)]
mod reset_tests {
    use super::{classify_reset, Reset};

    #[test]
    fn a_start_gone_by_retention_is_lost_unless_a_former_owner_committed_past_it() {
        assert_eq!(classify_reset(5, 0, 10, None), Reset::None);
        assert_eq!(classify_reset(10, 0, 10, None), Reset::None);
        assert!(matches!(classify_reset(2, 7, 10, None), Reset::Lost(5, _)));
        // a takeover started at 2, below the committed 8; retention removed 2..7
        assert_eq!(classify_reset(2, 7, 10, Some(8)), Reset::Covered(8));
        assert_eq!(classify_reset(2, 8, 10, Some(8)), Reset::Covered(8));
        // retention removed records nobody applied (past the committed offset): lost
        assert!(matches!(
            classify_reset(2, 9, 10, Some(8)),
            Reset::Lost(7, _)
        ));
        // past the end (a recreated topic) is never covered
        assert!(matches!(
            classify_reset(12, 0, 3, Some(20)),
            Reset::Lost(9, _)
        ));
    }
}
