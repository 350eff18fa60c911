//! The ingest loop: the one owner of the tables' writes. Runs on its own thread (librdkafka's poll
//! and sled's batch apply are blocking calls) and, per batch of records:
//! poll -> skip what the store already applied -> decode -> stage -> ONE sled batch (rows, seqs,
//! outbox, positions) -> publish to memory -> produce changelog/dead letters -> hand the
//! checkpoint to the durability task. It also tracks lag and start-up readiness.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::Offset;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cdc::decode::{self, DecodeSettings, Decoded, RawRecord};
use crate::cdc::source::{self, Positions, SourceContext};
use crate::config::TopicSelection;
use crate::metrics::Metrics;
use crate::table::changelog::Changelog;
use crate::table::checkpoint::{Checkpoint, PendingLetter, PendingRow};
use crate::table::state::{AppliedChange, Encoded, Staged, Tables};
use crate::table::store::{DeadLetter, Store, StoreError};

/// Changes applied to one table in one batch, published to live subscribers.
#[derive(Debug, Clone)]
pub struct TableUpdate {
    pub table: String,
    pub epoch: String,
    pub changes: Vec<AppliedChange>,
    /// The whole-table patch frame of these changes, serialised once by the hub and shared by
    /// every up-to-date whole-table subscriber (`None` when nobody listened).
    pub frame: Option<axum::extract::ws::Utf8Bytes>,
}

/// Errors that stop ingestion.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the durability task stopped")]
    CheckpointerGone,
}

/// Readiness of the service: restored, and caught up with the stream as it was at start-up.
#[derive(Default)]
pub struct Readiness {
    pub restored: AtomicBool,
    pub caught_up: AtomicBool,
    pub healthy: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.restored.load(Ordering::Acquire) && self.caught_up.load(Ordering::Acquire)
    }
}

/// Everything the loop needs.
pub struct Ingest {
    pub consumer: Arc<BaseConsumer<SourceContext>>,
    pub store: Store,
    pub tables: Arc<Tables>,
    pub changelog: Arc<Changelog>,
    pub metrics: Arc<Metrics>,
    pub positions: Positions,
    pub settings: DecodeSettings,
    pub max_batch: usize,
    pub max_record_bytes: usize,
    pub checkpoint_tx: mpsc::Sender<Checkpoint>,
    pub hub: Arc<crate::fanout::hub::Hub>,
    pub readiness: Arc<Readiness>,
    pub runtime: tokio::runtime::Handle,
    pub cancel: CancellationToken,
    pub next_letter_id: u64,
    pub topics: TopicSelection,
}

struct LoopState {
    warned_decimals: HashSet<(String, String)>,
    targets: HashMap<(String, i32), i64>,
    /// Committed group offsets of partitions that have no position in the store.
    committed: HashMap<(String, i32), i64>,
    last_lag_check: Instant,
}

impl Ingest {
    /// Runs until cancelled. Returns an error only when the store or the durability task fails.
    pub fn run(mut self) -> Result<(), IngestError> {
        let mut st = LoopState {
            warned_decimals: HashSet::new(),
            targets: HashMap::new(),
            committed: HashMap::new(),
            last_lag_check: Instant::now(),
        };
        let consumer = self.consumer.clone();
        while !self.cancel.is_cancelled() {
            let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            while !batch.is_empty() && batch.len() < self.max_batch {
                match consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                    None => break,
                }
            }
            let idle = batch.is_empty();
            if !idle {
                self.apply(&batch, &mut st)?;
            }
            drop(batch);
            if idle || st.last_lag_check.elapsed() > Duration::from_millis(250) {
                self.check_lag(&mut st, idle);
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        batch: &[BorrowedMessage<'_>],
        st: &mut LoopState,
    ) -> Result<(), IngestError> {
        let started = Instant::now();
        let known: HashMap<(String, i32), i64> = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut staged = Staged::default();
        let mut outcomes: HashMap<(String, &'static str), u64> = HashMap::new();
        let mut applied_by: HashMap<(String, &'static str), u64> = HashMap::new();
        for m in batch {
            let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
            if known
                .get(&(topic.to_string(), partition))
                .is_some_and(|next| offset < *next)
            {
                *outcomes
                    .entry((topic.to_string(), "duplicate"))
                    .or_default() += 1;
                continue;
            }
            let rec = RawRecord {
                topic,
                key: m.key(),
                value: m.payload(),
                timestamp_ms: m.timestamp().to_millis(),
            };
            let outcome = match decode::decode(&rec, &self.settings) {
                Ok(out) => {
                    for column in &out.undecodable_decimals {
                        self.undecodable_decimal(&out.decoded, column, st);
                    }
                    match out.decoded {
                        Decoded::Change(change) => {
                            let op = change.op.as_str();
                            let table = change.table.clone();
                            match staged.stage(&self.tables, change, new_epoch) {
                                Some(_) => {
                                    *applied_by.entry((table, op)).or_default() += 1;
                                    "applied"
                                }
                                None => "unchanged",
                            }
                        }
                        Decoded::Skip(reason) => {
                            self.metrics
                                .skipped
                                .with_label_values(&[reason.as_str()])
                                .inc();
                            "skipped"
                        }
                    }
                }
                Err(e) => {
                    self.dead_letter(&mut staged, m, &e);
                    "dead_lettered"
                }
            };
            *outcomes.entry((topic.to_string(), outcome)).or_default() += 1;
            staged.advance(topic, partition, offset);
        }
        self.ensure_topics(&staged);
        let (write, encoded) = staged.write_batch();
        self.store.apply(write)?;
        // the changelog gets the bytes sled got; publish then moves the rows into the tables
        let checkpoint = self.produce(&staged, encoded);
        self.tables.publish(&mut staged);
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(staged.positions.iter().map(|(k, v)| (k.clone(), *v)));
        for (table, d) in staged
            .deltas
            .iter_mut()
            .filter(|(_, d)| !d.changes.is_empty())
        {
            let update = TableUpdate {
                table: table.clone(),
                epoch: d.epoch.clone(),
                changes: std::mem::take(&mut d.changes),
                frame: None,
            };
            self.hub.publish(update);
            self.metrics
                .table_seq
                .with_label_values(&[table])
                .set(i64::try_from(d.seq).unwrap_or(i64::MAX));
            if let Some(t) = self.tables.get(table) {
                let rows = t.read().map(|t| t.rows.len()).unwrap_or(0);
                self.metrics
                    .table_rows
                    .with_label_values(&[table])
                    .set(i64::try_from(rows).unwrap_or(i64::MAX));
            }
        }
        self.checkpoint_tx
            .blocking_send(checkpoint)
            .map_err(|_| IngestError::CheckpointerGone)?;
        for ((topic, outcome), n) in outcomes {
            self.metrics
                .records_consumed
                .with_label_values(&[&topic, outcome])
                .inc_by(n);
        }
        for ((table, op), n) in applied_by {
            self.metrics
                .changes_applied
                .with_label_values(&[&table, op])
                .inc_by(n);
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

    /// Creates the changelog topics of tables new in this batch; retries until the broker answers.
    fn ensure_topics(&self, staged: &Staged) {
        for (table, _) in staged.deltas.iter().filter(|(_, d)| d.new_table) {
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = self.runtime.block_on(self.changelog.ensure_table(table)) {
                tracing::warn!(table, error = %e, "cannot create the changelog topic; retrying");
                if self.cancel.is_cancelled() {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    fn produce(&self, staged: &Staged, encoded: Vec<Encoded<'_>>) -> Checkpoint {
        let mut cp = Checkpoint {
            positions: staged.positions.clone(),
            acked: staged
                .deltas
                .iter()
                .filter(|(_, d)| !d.changes.is_empty())
                .map(|(t, d)| (t.clone(), d.seq))
                .collect(),
            ..Default::default()
        };
        for e in encoded {
            let delivery = match self.changelog.send_row_json(
                e.table,
                e.key,
                e.json.as_deref(),
                e.seq,
                e.ts_ms,
            ) {
                Ok(d) => Some(d),
                Err(err) => {
                    self.metrics.changelog_produce_errors.inc();
                    tracing::warn!(table = e.table, key = e.key, error = %err, "changelog produce failed; will retry");
                    None
                }
            };
            cp.rows.push(PendingRow {
                table: e.table.to_string(),
                key: e.key.to_string(),
                seq: e.seq,
                deleted: e.json.is_none(),
                delivery,
            });
        }
        for (id, letter) in &staged.dead_letters {
            let delivery = self.changelog.send_dead_letter(letter).ok();
            cp.letters.push(PendingLetter {
                id: *id,
                letter: letter.clone(),
                delivery,
            });
        }
        cp
    }

    fn dead_letter(
        &mut self,
        staged: &mut Staged,
        m: &BorrowedMessage<'_>,
        e: &decode::DecodeError,
    ) {
        let id = self.next_letter_id;
        self.next_letter_id += 1;
        let limit = self.max_record_bytes;
        let truncated = m.payload().is_some_and(|p| p.len() > limit);
        let letter = DeadLetter {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| k[..k.len().min(limit)].to_vec()),
            value: m.payload().map(|p| p[..p.len().min(limit)].to_vec()),
            reason: e.reason().to_string(),
            error: e.to_string(),
            truncated,
        };
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), reason = e.reason(), error = %e, "record dead-lettered");
        self.metrics
            .decode_errors
            .with_label_values(&[e.reason()])
            .inc();
        self.metrics.dead_lettered.inc();
        staged.dead_letters.push((id, letter));
    }

    fn undecodable_decimal(&self, decoded: &Decoded, column: &str, st: &mut LoopState) {
        let Decoded::Change(c) = decoded else { return };
        self.metrics
            .undecodable_decimals
            .with_label_values(&[&c.table])
            .inc();
        if st
            .warned_decimals
            .insert((c.table.clone(), column.to_string()))
        {
            tracing::warn!(
                table = %c.table,
                column,
                "column looks like a base64 Decimal without a schema; kept as is. Set decimal.handling.mode=string \
                 (or double) on the Debezium connector, or enable value.converter.schemas.enable"
            );
        }
    }

    /// Updates lag gauges and, until it is true once, start-up readiness: every assigned partition
    /// has been applied up to the high watermark first seen for it.
    fn check_lag(&self, st: &mut LoopState, idle: bool) {
        st.last_lag_check = Instant::now();
        let Some(assignment) = self.consumer.context().assignment() else {
            // no group assignment yet: if the subscription matches no topic at all, there is
            // nothing to catch up with (some brokers never complete a join for an empty match)
            if !self.readiness.caught_up.load(Ordering::Acquire)
                && idle
                && !self.subscription_matches_any()
            {
                self.readiness.caught_up.store(true, Ordering::Release);
                tracing::info!("no topic matches the subscription yet; ready");
            }
            return;
        };
        let positions = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
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
        if !self.readiness.caught_up.load(Ordering::Acquire) {
            self.learn_committed(&assignment, &positions, st);
        }
        let mut caught_up = true;
        for tp in &assignment {
            let applied = positions
                .get(tp)
                .copied()
                .max(fetched.get(tp).copied())
                .max(st.committed.get(tp).copied());
            let hi = source::cached_high_watermark(&self.consumer, &tp.0, tp.1);
            if let (Some(hi), Some(applied)) = (hi, applied) {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&tp.0, &tp.1.to_string()])
                    .set((hi - applied).max(0));
            }
            if let Some(hi) = hi {
                st.targets.entry(tp.clone()).or_insert(hi);
            }
            match (st.targets.get(tp), applied) {
                (Some(target), Some(applied)) if applied >= *target => {}
                (Some(0), None) => {}
                _ => caught_up = false,
            }
        }
        if caught_up && !self.readiness.caught_up.swap(true, Ordering::AcqRel) {
            tracing::info!(
                partitions = assignment.len(),
                "caught up with the stream as it was at start-up"
            );
        }
    }
}

impl Ingest {
    /// A partition with no position in the store starts at its committed group offset (e.g. after
    /// a restore): everything before it is already reflected in the state.
    fn learn_committed(
        &self,
        assignment: &std::collections::BTreeSet<(String, i32)>,
        positions: &HashMap<(String, i32), i64>,
        st: &mut LoopState,
    ) {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (topic, partition) in assignment
            .iter()
            .filter(|tp| !positions.contains_key(*tp) && !st.committed.contains_key(*tp))
        {
            tpl.add_partition(topic, *partition);
        }
        if tpl.count() == 0 {
            return;
        }
        match self.consumer.committed_offsets(tpl, Duration::from_secs(2)) {
            Ok(list) => {
                for e in list.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        st.committed
                            .insert((e.topic().to_string(), e.partition()), o);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read committed offsets yet"),
        }
    }

    fn subscription_matches_any(&self) -> bool {
        let Ok(metadata) = self.consumer.fetch_metadata(None, Duration::from_secs(2)) else {
            return true;
        };
        let names: Vec<&str> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name())
            .collect();
        match &self.topics {
            TopicSelection::Names(wanted) => wanted.iter().any(|w| names.contains(&w.as_str())),
            TopicSelection::Pattern(p) => regex::Regex::new(p)
                .map(|re| names.iter().any(|n| re.is_match(n)))
                .unwrap_or(true),
        }
    }
}

/// A new epoch: names a lineage of a table's state.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
