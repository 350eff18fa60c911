//! Staging one batch of input records into per-table deltas, then committing it: memory first
//! (clients), then one sled batch, then the changelog records and dead letters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::{BorrowedMessage, Message};

use super::partitions::PartState;
use super::{Ingest, IngestError};
use crate::cdc::decode::{self, Change, Decoded, Op, RawRecord};
use crate::table::changelog::RecordMeta;
use crate::table::checkpoint::{Checkpoint, PendingLetter, PendingRow, SliceAck};
use crate::table::position::LastApplied;
use crate::table::state::{Delta, RowWrite, SliceMode, Staged};
use crate::table::store::{encode_row, DeadLetter, SliceMeta, WriteBatch};

type Tp = (String, i32);

/// Connector streams whose source positions one input partition tracks (normally one).
const MAX_STREAMS_PER_PARTITION: usize = 16;

/// A changelog record to produce: table, partition, key, row JSON (`None`: tombstone), headers.
type Record = (String, u32, String, Option<Vec<u8>>, RecordMeta);

/// One batch being staged.
pub struct BatchStage {
    /// Next offset to apply per partition: records below were applied already.
    positions: HashMap<Tp, i64>,
    names: HashMap<(String, String), String>,
    deltas: HashMap<String, Delta>,
    /// Positions this batch moved, with the index in the batch of the record each follows.
    advanced: HashMap<Tp, (i64, usize)>,
    /// The record each moved position follows ([`BatchStage::note_last`]).
    last: HashMap<Tp, LastApplied>,
    letters: Vec<(u64, DeadLetter)>,
    outcomes: HashMap<(String, &'static str), u64>,
    applied: HashMap<(String, &'static str), u64>,
    /// Partitions paused in this batch (a slice is being created), or read again from their
    /// beginning (their topic was created again): their later records wait.
    paused: HashSet<Tp>,
    /// Partitions whose source marks moved in this batch (stored with their positions).
    marks_moved: HashSet<Tp>,
    /// Re-sent changes skipped in this batch, and the first of them (for the log).
    resent: u64,
    first_resent: Option<String>,
    /// When the batch's first record was taken from the consumer.
    polled: Instant,
}

impl BatchStage {
    pub fn new(
        positions: HashMap<Tp, i64>,
        names: HashMap<(String, String), String>,
        polled: Instant,
    ) -> Self {
        BatchStage {
            positions,
            names,
            deltas: HashMap::new(),
            advanced: HashMap::new(),
            last: HashMap::new(),
            letters: Vec::new(),
            outcomes: HashMap::new(),
            applied: HashMap::new(),
            paused: HashSet::new(),
            marks_moved: HashSet::new(),
            resent: 0,
            first_resent: None,
            polled,
        }
    }

    /// The partitions whose records in this batch must not be applied (they are read again).
    pub fn hold(&mut self, tps: HashSet<Tp>) {
        self.paused.extend(tps);
    }

    /// Stages one record, the batch's `index`th.
    pub fn record(
        &mut self,
        ing: &mut Ingest,
        m: &BorrowedMessage<'_>,
        index: usize,
        states: &HashMap<Tp, PartState>,
        warned: &mut HashSet<(String, String)>,
    ) {
        let tp: Tp = (m.topic().to_string(), m.partition());
        if self.paused.contains(&tp) || !matches!(states.get(&tp), Some(PartState::Active { .. })) {
            return;
        }
        if self
            .positions
            .get(&tp)
            .is_some_and(|next| m.offset() < *next)
        {
            self.count(m.topic(), "duplicate");
            return;
        }
        let rec = RawRecord {
            topic: m.topic(),
            key: m.key(),
            value: m.payload(),
            timestamp_ms: m.timestamp().to_millis(),
        };
        let outcome = match decode::decode(&rec, &ing.settings) {
            Ok(out) => {
                if let Decoded::Change(c) = &out.decoded {
                    for column in &out.undecodable_decimals {
                        undecodable_decimal(ing, &c.table, column, warned);
                    }
                }
                match out.decoded {
                    Decoded::Change(change) => match self.stage_change(ing, m, change) {
                        Some(outcome) => outcome,
                        None => return,
                    },
                    Decoded::Skip(reason) => {
                        ing.metrics
                            .skipped
                            .with_label_values(&[reason.as_str()])
                            .inc();
                        "skipped"
                    }
                }
            }
            Err(e) => {
                self.dead_letter(ing, m, &e);
                "dead_lettered"
            }
        };
        self.count(m.topic(), outcome);
        let next = m.offset() + 1;
        self.positions.insert(tp.clone(), next);
        self.advanced.insert(tp, (next, index));
    }

    fn count(&mut self, topic: &str, outcome: &'static str) {
        *self
            .outcomes
            .entry((topic.to_string(), outcome))
            .or_default() += 1;
    }

    /// The table a record of `topic` naming `table` belongs to, if this deployment has it.
    fn resolve(&mut self, ing: &Ingest, topic: &str, table: &str) -> Option<String> {
        if let Some(n) = self.names.get(&(topic.to_string(), table.to_string())) {
            return Some(n.clone());
        }
        let e = ing.registry.get(table)?;
        (e.source == topic).then(|| {
            self.names
                .insert((topic.to_string(), table.to_string()), table.to_string());
            table.to_string()
        })
    }

    /// The table a delete without a table name (a tombstone) belongs to: the one its inferred
    /// name resolves to on this topic, else the only table this topic feeds, else the one of
    /// those holding the key in this partition. `None`: no table has the row (nothing to delete).
    fn resolve_delete(
        &mut self,
        ing: &Ingest,
        topic: &str,
        part: u32,
        c: &Change,
    ) -> Option<String> {
        if let Some(n) = self.resolve(ing, topic, &c.table) {
            return Some(n);
        }
        let mut fed: Vec<String> = ing
            .registry
            .tables_of(topic)
            .into_iter()
            .map(|e| e.table)
            .collect();
        fed.sort();
        fed.dedup();
        if fed.len() == 1 {
            return fed.pop();
        }
        fed.into_iter().find(|name| {
            self.deltas
                .get(name)
                .and_then(|d| {
                    d.rows
                        .get(&c.key)
                        .map(|e| e.as_ref().is_some_and(|e| e.part == part))
                })
                .or_else(|| {
                    ing.tables
                        .get(name)
                        .map(|t| t.read().rows.get(&c.key).is_some_and(|e| e.part == part))
                })
                .unwrap_or(false)
        })
    }

    /// Stages a change; `None` when its partition had to pause for a new slice.
    fn stage_change(
        &mut self,
        ing: &mut Ingest,
        m: &BorrowedMessage<'_>,
        c: Change,
    ) -> Option<&'static str> {
        let (topic, partition, off) = (m.topic(), m.partition(), m.offset());
        let part = u32::try_from(partition).unwrap_or(0);
        let owned = |name: &str| {
            ing.tables.get(name).filter(|t| {
                t.read()
                    .slice(part)
                    .is_some_and(|s| s.mode == SliceMode::Owned)
            })
        };
        let resolved = if c.table_from_topic && c.op == Op::Delete {
            // a tombstone names no table: delete the row its key has on this topic (never
            // create a table for it)
            match self.resolve_delete(ing, topic, part, &c) {
                Some(n) => Some(n),
                None => return Some("unchanged"),
            }
        } else {
            self.resolve(ing, topic, &c.table)
        };
        let table = match resolved.as_deref().and_then(owned) {
            Some(t) => t,
            None => {
                let name = resolved.unwrap_or_else(|| c.table.clone());
                ing.partitions.create_slice(
                    &ing.consumer,
                    topic,
                    partition,
                    &name,
                    c.schema.clone(),
                );
                self.paused.insert((topic.to_string(), partition));
                return None;
            }
        };
        let name = table.read().name.to_string();
        let (acked, last_off) = {
            let delta = self
                .deltas
                .entry(name.clone())
                .or_insert_with(|| Delta::new(table.clone()));
            let s = delta.slice(part);
            (s.acked, s.last_off)
        };
        if off <= acked {
            // the slice's changelog already holds this change (re-read after a takeover)
            return Some("duplicate");
        }
        if self.is_resent(ing, m, &c) {
            return Some("resent");
        }
        let delta = self
            .deltas
            .entry(name.clone())
            .or_insert_with(|| Delta::new(table.clone()));
        let write = |key: String, row| RowWrite {
            key,
            row,
            op: c.op,
            part,
            off,
            ts_ms: c.ts_ms,
            kafka_ts_ms: c.kafka_ts_ms,
            polled: Some(self.polled),
        };
        let mut outcome = "unchanged";
        if c.op == Op::Truncate {
            // a truncate clears the rows this partition holds (the other partitions' owners
            // clear theirs when the truncate reaches them)
            let mut keys: Vec<String> = table
                .read()
                .rows
                .iter()
                .filter(|(_, e)| e.part == part)
                .map(|(k, _)| k.clone())
                .collect();
            for (k, e) in &delta.rows {
                match e {
                    Some(e) if e.part == part => keys.push(k.clone()),
                    _ => {}
                }
            }
            keys.sort();
            keys.dedup();
            for key in keys {
                if off <= last_off && delta.is_stale(&key, part, off) {
                    continue;
                }
                if delta.stage(write(key, None)) == Staged::Applied {
                    outcome = "applied";
                }
            }
        } else {
            if off <= last_off && delta.is_stale(&c.key, part, off) {
                return Some("duplicate");
            }
            let mut key = c.key.clone();
            if c.op == Op::Delete && c.key_from_message_key && delta.current(&key).is_none() {
                // the delete carries the message key, not the key columns (PostgreSQL's default
                // replica identity): find the row of this partition whose columns match it
                match decode::message_key_fields(m.key())
                    .and_then(|fields| find_by_columns(delta, part, &fields))
                {
                    Some(k) => key = k,
                    None => return Some("unchanged"),
                }
            }
            if let Some(old) = c.old_key.as_ref().filter(|o| **o != key) {
                // an update that changed the key: the row under the old key goes
                if delta.current(old).is_some_and(|e| e.part == part)
                    && delta.stage(write(old.clone(), None)) == Staged::Applied
                {
                    outcome = "applied";
                }
            }
            outcome = match delta.stage(write(key, c.row.map(|r| Arc::new(r).into()))) {
                Staged::Applied => "applied",
                Staged::Unchanged => outcome,
                Staged::Stale => "duplicate",
            };
        }
        if outcome == "applied" {
            *self.applied.entry((name, c.op.as_str())).or_default() += 1;
        }
        Some(outcome)
    }

    /// Whether `c` is a copy that its connector sent again: its source position is below the one
    /// its input partition already reached on the same stream (a snapshot read is never one:
    /// incremental snapshots interleave reads at older positions with the stream), or it is the
    /// tombstone that follows such a copy of a delete. Moves the partition's mark otherwise.
    fn is_resent(&mut self, ing: &mut Ingest, m: &BorrowedMessage<'_>, c: &Change) -> bool {
        if !ing.skip_source_resends || (c.source_pos.is_none() && ing.resent_delete.is_empty()) {
            // nothing to compare, nothing to forget (the common case: no allocation)
            return false;
        }
        let tp: Tp = (m.topic().to_string(), m.partition());
        let after_resent_delete = ing.resent_delete.remove(&tp);
        let Some(pos) = c.source_pos.as_ref().filter(|_| c.op != Op::Read) else {
            // Debezium writes a delete's tombstone right after the delete, in its partition
            let tombstone = c.op == Op::Delete && m.payload().is_none();
            return tombstone && after_resent_delete.is_some_and(|k| m.key() == Some(&k[..]));
        };
        let marks = ing.source_marks.entry(tp.clone()).or_default();
        let Some(at) = marks.get(&pos.stream).copied() else {
            if marks.len() < MAX_STREAMS_PER_PARTITION {
                marks.insert(pos.stream.clone(), pos.at);
                self.marks_moved.insert(tp);
            }
            return false;
        };
        if pos.at >= at {
            if pos.at > at {
                marks.insert(pos.stream.clone(), pos.at);
                self.marks_moved.insert(tp);
            }
            return false;
        }
        self.resent += 1;
        if self.first_resent.is_none() {
            self.first_resent = Some(format!(
                "{}/{} offset {} (stream {}, position {:?} < {:?})",
                tp.0,
                tp.1,
                m.offset(),
                pos.stream,
                pos.at,
                at
            ));
        }
        if c.op == Op::Delete {
            ing.resent_delete
                .insert(tp, m.key().map(<[u8]>::to_vec).unwrap_or_default());
        }
        true
    }

    fn dead_letter(&mut self, ing: &mut Ingest, m: &BorrowedMessage<'_>, e: &decode::DecodeError) {
        let id = ing.next_letter_id;
        ing.next_letter_id += 1;
        let limit = ing.max_record_bytes;
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
        ing.metrics
            .decode_errors
            .with_label_values(&[e.reason()])
            .inc();
        ing.metrics.dead_lettered.inc();
        self.letters.push((id, letter));
    }

    /// Identifies, per partition whose position this batch moved, the record the new position
    /// follows (one digest per partition and batch), with the owners this node writes the
    /// partition's slices as (`owners`); stored with the position. Returns them.
    pub fn note_last(
        &mut self,
        batch: &[BorrowedMessage<'_>],
        owners: &HashMap<Tp, u64>,
    ) -> HashMap<Tp, LastApplied> {
        for (tp, (_, at)) in &self.advanced {
            if let (Some(m), Some(owners)) = (batch.get(*at), owners.get(tp)) {
                let record = crate::table::position::RecordId::of(m);
                self.last.insert(
                    tp.clone(),
                    LastApplied {
                        record,
                        owners: *owners,
                    },
                );
            }
        }
        self.last.clone()
    }

    /// Commits the batch: memory (clients see it), then one sled batch, then the changelog
    /// records and dead letters. Returns the checkpoint and the tables touched.
    pub fn finish(self, ing: &Ingest) -> Result<(Checkpoint, Vec<String>), IngestError> {
        let mut wb = WriteBatch::default();
        let mut records: Vec<Record> = Vec::new();
        let mut acked = Vec::new();
        let mut touched = Vec::new();
        for (name, delta) in &self.deltas {
            let mut seen: HashSet<&str> = HashSet::new();
            for c in delta.changes.iter().rev() {
                if !seen.insert(c.key.as_str()) {
                    continue;
                }
                let Some(s) = delta.slices.get(&c.part) else {
                    continue;
                };
                let meta = RecordMeta {
                    off: c.off,
                    count: s.count,
                    acked: s.acked,
                    owner: s.owner,
                    ts_ms: c.ts_ms,
                };
                match &c.row {
                    Some(row) => {
                        let json = encode_row(row);
                        wb.put_row(name, &c.key, c.part, c.off, &json);
                        records.push((name.clone(), c.part, c.key.clone(), Some(json), meta));
                    }
                    None => {
                        wb.remove_row(name, &c.key);
                        wb.mark_deleted(name, &c.key, c.part, c.off);
                        records.push((name.clone(), c.part, c.key.clone(), None, meta));
                    }
                }
            }
            for (part, s) in &delta.slices {
                wb.put_slice(
                    name,
                    *part,
                    &SliceMeta {
                        last_off: s.last_off,
                        count: s.count,
                        owner: s.owner.to_header(),
                        owned: true,
                        kept_ms: None,
                    },
                );
                acked.push(SliceAck {
                    table: name.clone(),
                    part: *part,
                    acked: s.last_off,
                    resets: s.resets,
                });
            }
            if !delta.changes.is_empty() {
                touched.push(name.clone());
            }
        }
        for (tp, (next, _)) in &self.advanced {
            wb.set_position(&tp.0, tp.1, *next);
            if let Some(last) = self.last.get(tp) {
                wb.set_last_record(&tp.0, tp.1, *last);
            }
        }
        for tp in &self.marks_moved {
            if let Some(marks) = ing.source_marks.get(tp) {
                wb.set_source_marks(&tp.0, tp.1, marks);
            }
        }
        if self.resent > 0 {
            ing.metrics.source_resends.inc_by(self.resent);
            if crate::cdc::source::throttled("ingest-resent", std::time::Duration::from_secs(10)) {
                tracing::warn!(
                    skipped = self.resent,
                    first = self.first_resent.as_deref().unwrap_or(""),
                    "skipped changes that the connector sent again (their source position is below what the partition reached; logged at most every 10 s)"
                );
            }
        }
        for (id, letter) in &self.letters {
            wb.add_dead_letter(*id, letter);
        }
        // clients first: a node that crashes before the store holds this batch re-applies the
        // same records to the same state after its restart
        for (_, delta) in self.deltas {
            ing.tables.commit(delta, &*ing.sink);
        }
        ing.store.apply(wb)?;
        let rows: Vec<PendingRow> = {
            let _order = ing.changelog.ordered();
            let mut sender = ing.changelog.rows();
            records
                .into_iter()
                .map(|(table, part, key, payload, meta)| {
                    let delivery =
                        match sender.send(&table, part, &key, payload.as_deref(), meta) {
                            Ok(d) => Some(d),
                            Err(e) => {
                                ing.metrics.changelog_produce_errors.inc();
                                tracing::warn!(table, key, error = %e, "changelog produce failed; will retry");
                                None
                            }
                        };
                    PendingRow {
                        table,
                        part,
                        key,
                        off: meta.off,
                        deleted: payload.is_none(),
                        delivery,
                    }
                })
                .collect()
        };
        let letters = self
            .letters
            .into_iter()
            .map(|(id, letter)| PendingLetter {
                id,
                // (fields are evaluated in this order: the generation before the send)
                generation: ing.changelog.dlq_generation(),
                delivery: ing.changelog.send_dead_letter(&letter).ok(),
                letter,
            })
            .collect();
        for ((topic, outcome), n) in self.outcomes {
            ing.metrics
                .records_consumed
                .with_label_values(&[&topic, outcome])
                .inc_by(n);
        }
        for ((table, op), n) in self.applied {
            ing.metrics
                .changes_applied
                .with_label_values(&[&table, op])
                .inc_by(n);
        }
        Ok((
            Checkpoint {
                rows,
                letters,
                positions: self
                    .advanced
                    .into_iter()
                    .map(|(tp, (next, _))| (tp, next))
                    .collect(),
                acked,
                barrier: None,
            },
            touched,
        ))
    }
}

fn undecodable_decimal(
    ing: &Ingest,
    table: &str,
    column: &str,
    warned: &mut HashSet<(String, String)>,
) {
    ing.metrics
        .undecodable_decimals
        .with_label_values(&[table])
        .inc();
    // warned once per column; the set is bounded (hostile input may invent columns without end)
    const MAX_WARNED: usize = 4096;
    let key = (table.to_string(), column.to_string());
    let first = if warned.len() < MAX_WARNED {
        warned.insert(key)
    } else {
        !warned.contains(&key)
            && crate::cdc::source::throttled(
                "undecodable-decimal",
                std::time::Duration::from_secs(60),
            )
    };
    if first {
        tracing::warn!(
            table,
            column,
            "column looks like a base64 Decimal without a schema; kept as is. Set decimal.handling.mode=string \
             (or double) on the Debezium connector, or enable value.converter.schemas.enable"
        );
    }
}

/// The key of the row of partition `part` whose columns equal every field of `fields` (staged
/// rows first, then the table's). A scan: only deletes that name their row by the message key
/// under `--key-columns` come here.
fn find_by_columns(delta: &Delta, part: u32, fields: &crate::cdc::decode::Row) -> Option<String> {
    let matches = |row: &crate::cdc::decode::Row| fields.iter().all(|(k, v)| row.get(k) == Some(v));
    for (k, e) in &delta.rows {
        if let Some(e) = e {
            if e.part == part && matches(&e.row) {
                return Some(k.clone());
            }
        }
    }
    let t = delta.table.read();
    t.rows
        .iter()
        .find(|(k, e)| e.part == part && !delta.rows.contains_key(*k) && matches(&e.row))
        .map(|(k, _)| k.clone())
}
