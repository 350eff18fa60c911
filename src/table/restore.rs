//! Restore on assignment: before this node applies records of an input partition it was just
//! assigned, it takes over the slices of that partition (one per table fed by the topic).
//!
//! For each slice:
//! 1. the changelog partition is read from where this node's copy ends (`cl_next` of the local
//!    store or of the follower that held it; the beginning when it holds nothing) to its high
//!    watermark, folding every record (see [`crate::table::fold`]);
//! 2. a fence record with an owner greater than any seen is written and the partition is read up
//!    to it: from then on a former owner's late writes are ignored by every reader;
//! 3. the slice becomes owned, and the keys of the local store's outbox (changes this node applied
//!    but whose records were never acknowledged) are produced again; every key of the slice when
//!    the fence landed below where this node had read (the topic was deleted and created again:
//!    see [`crate::table::repair`]), after that new partition was read from its beginning.
//!
//! The input partition then starts at the larger of the position in the local store and the
//! lowest `acked + 1` of its slices (the group's committed offset only when it has no slice yet:
//! a former owner that missed its revoke can commit past writes every reader ignores). Records
//! between that start and a slice's last offset are re-applied only when they are newer than what
//! the slice holds for their key, so nothing goes back and a gap the former owner left in the
//! changelog is filled.

use std::sync::Arc;
use std::time::Duration;

use crate::cdc::source::Reader;

use crate::cdc::source;
use crate::metrics::Metrics;
use crate::table::changelog::{self, Changelog, ChangelogError, FenceKind, RegistryEntry};
use crate::table::checkpoint::PendingRow;
use crate::table::fold::{fold_into, Folded, Own};
use crate::table::position::Owner;
use crate::table::read_last::{ReadAgain, ReadLast};
use crate::table::reader::{self, End, ReadError, Span};
use crate::table::registry::{Registry, RegistryError};
use crate::table::repair;
use crate::table::state::{Delta, SliceMode, Table, Tables, UpdateSink};
use crate::table::store::{AckMeta, SliceMeta, Store, StoreError, WriteBatch};

mod writer;

pub use writer::put_entry;

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Changelog(#[from] ChangelogError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("starting the restore's store writer: {0}")]
    Spawn(std::io::Error),
    #[error("the fence of {0}/{1} was not acknowledged: {2}")]
    Fence(String, u32, String),
    #[error("{0}/{1} was fenced by a newer owner while this node took it over")]
    Superseded(String, u32),
    #[error("a restore worker panicked: {0}")]
    Panicked(String),
    #[error("table `{table}` is fed by topic {registered}, not {topic}: pass table names that differ (schema-qualified) or route the topics apart")]
    SourceConflict {
        table: String,
        registered: String,
        topic: String,
    },
}

impl RestoreError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        match self {
            RestoreError::Changelog(e) => e.is_fatal(),
            RestoreError::Registry(RegistryError::OtherDeployment { .. }) => true,
            // sled fails every write after an I/O error until it is opened again (a restart)
            RestoreError::Store(_) => true,
            // a bug: retried, it would panic again; the node stops and says so
            RestoreError::Panicked(_) => true,
            _ => false,
        }
    }
}

/// Lets a restore take a slice over from the changelog follower (all-in-one nodes).
pub trait SliceHandover: Send + Sync {
    /// Stops following (`table`, `part`); returns once the follower let go of it.
    fn release(&self, table: &str, part: u32);
}

/// A slice marked as being taken over ([`crate::table::state::Slice::taking`]) until dropped.
struct Taking<'a> {
    table: &'a Table,
    part: u32,
}

impl<'a> Taking<'a> {
    /// Marks slice `part` of `table`; returns the mode it had.
    fn begin(table: &'a Table, part: u32) -> (SliceMode, Taking<'a>) {
        let mut mode = SliceMode::Absent;
        table.update_slices(|s| {
            let slice = s.slice_mut(part);
            mode = slice.mode;
            slice.taking = true;
        });
        (mode, Taking { table, part })
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        let part = self.part;
        self.table.update_slices(|s| {
            if let Some(slice) = s.slices.get_mut(part as usize) {
                slice.taking = false;
            }
        });
    }
}

/// A restored slice.
pub struct SliceTaken {
    pub table: String,
    pub acked: i64,
    /// Outbox records produced again.
    pub replay: Vec<PendingRow>,
    /// The slice was rebuilt from the changelog alone: this node held no state of it (its store
    /// had none, as after a lost data directory, or it was cleared). Its input position from
    /// an earlier run is then no promise: the changes up to it whose records never reached the
    /// changelog are gone with the outbox, and must be applied again from the input.
    pub rebuilt: bool,
    /// The fence landed right where this node's reading of the changelog ended: nothing was
    /// written to the slice since, and `before` is the owner of its last records.
    pub quiet: bool,
    /// The slice's owner before this take-over.
    pub before: Owner,
}

/// Everything a restore needs.
pub struct Restorer {
    pub changelog: Arc<Changelog>,
    pub registry: Arc<Registry>,
    pub tables: Arc<Tables>,
    pub sink: Arc<dyn UpdateSink>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub handover: Option<Arc<dyn SliceHandover>>,
    /// Names this node in fence records.
    pub member: String,
    pub deployment: String,
    pub brokers: String,
    pub stall: Duration,
    pub config: crate::config::Config,
}

/// Records folded per commit while reading a changelog partition.
const FOLD_CHUNK: usize = 20_000;

impl Restorer {
    /// A consumer for reading changelog and registry partitions (one per restore thread).
    pub fn reader(&self) -> Result<Reader, RestoreError> {
        Ok(source::reader(&self.config)?)
    }

    /// Reads the registry to its end.
    pub fn catch_up_registry(
        &self,
        reader: &Reader,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), RestoreError> {
        self.registry
            .catch_up(reader, self.stall, &self.brokers, cancelled)?;
        Ok(())
    }

    /// The registry entry of `table` fed by `topic`, registering the table when it is new.
    pub fn entry_for(
        &self,
        reader: &Reader,
        table: &str,
        topic: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RegistryEntry, RestoreError> {
        let entry = match self.registry.get(table) {
            Some(e) => e,
            None => {
                self.changelog.ensure_registry()?;
                let partitions = self.changelog.partition_count(topic)?;
                let candidate = RegistryEntry {
                    table: table.to_string(),
                    source: topic.to_string(),
                    partitions: u32::try_from(partitions).unwrap_or(u32::MAX),
                    epoch: crate::table::new_epoch(),
                    deployment: self.deployment.clone(),
                    changelog: self.changelog.topic_for(table),
                };
                self.registry.register(
                    &self.changelog,
                    reader,
                    candidate,
                    self.stall,
                    &self.brokers,
                    cancelled,
                )?
            }
        };
        if entry.source != topic {
            return Err(RestoreError::SourceConflict {
                table: table.to_string(),
                registered: entry.source,
                topic: topic.to_string(),
            });
        }
        Ok(entry)
    }

    /// Takes over slice `part` of `entry`'s table for a member of group generation `generation`.
    pub fn take_slice(
        &self,
        reader: &Reader,
        entry: &RegistryEntry,
        part: u32,
        generation: i32,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<SliceTaken, RestoreError> {
        let entered = std::time::Instant::now();
        self.changelog
            .ensure_table(&entry.table, &entry.source, entry.partitions as usize)?;
        let table = self
            .tables
            .ensure(&entry.table, &entry.epoch, &entry.source, entry.partitions);
        // the store loads a table's rows and slices only with its entry (a follower records it
        // for the tables it follows; a materialiser has none): without it a materialiser's next
        // start found nothing and read every changelog partition from its beginning
        self.store.put_table(&entry.table, &entry.meta())?;
        // marked under the table's lock before anything else: the follower of an all-in-one node
        // may see the table's registry entry only now, and must not take the slice up while it
        // is taken over (it would then fold this node's own changelog beside the ingest, and a
        // record staged before an ingest commit took keys back to older values)
        let (mode, _taking) = Taking::begin(&table, part);
        if mode == SliceMode::Followed {
            if let Some(h) = &self.handover {
                h.release(&entry.table, part);
            }
        }
        let (from, own) = {
            let t = table.read();
            let s = t.slice(part);
            match mode {
                SliceMode::Owned => (
                    s.map_or(0, |s| s.cl_next),
                    s.map(|s| Own {
                        owner: s.owner,
                        through: s.last_off,
                    }),
                ),
                SliceMode::Followed => (s.map_or(0, |s| s.cl_next), None),
                SliceMode::Absent | SliceMode::Derived => (0, None),
            }
        };
        if mode == SliceMode::Absent {
            // whatever the store holds of this slice is from an earlier tenure: read it anew
            self.store.clear_slice(&entry.table, part)?;
        }
        let topic = self.changelog.topic_for(&entry.table);
        // the record at `from - 1` is read again and compared (the topic may have been deleted,
        // refilled and written past `from` meanwhile: a fence below `from` and a `restarted`
        // fence above it, the signs below, are then both missing): a followed slice's is the one
        // its follower read last, an owned slice's one of this node's own tenure
        let mut check = match (mode, own) {
            _ if from <= 0 => None,
            (SliceMode::Followed, _) => self
                .store
                .changelog_read(&topic, i32::try_from(part).unwrap_or(0))
                .filter(|r| r.offset() == from - 1),
            (SliceMode::Owned, Some(own)) => Some(ReadLast::Owner(from - 1, own.owner)),
            _ => None,
        };
        let started = std::time::Instant::now();
        // the fence first (with an owner above every one this node knows), then one read up to it;
        // an owner above it found on the way means a newer fence is due (bounded)
        let mut next = from;
        let before = table
            .read()
            .slice(part)
            .map(|s| s.owner)
            .unwrap_or_default();
        let mut owner = Owner::next(before, generation);
        let mut fence_off = -1;
        // a `restarted` fence read: the partition was written again by an owner after it started
        // over; what this node read before may lack records below it
        let mut rewritten = false;
        // where the take-over's time goes, for its log line
        let mut fence_wait = std::time::Duration::ZERO;
        let mut read_time = std::time::Duration::ZERO;
        for attempt in 0..3 {
            let t = std::time::Instant::now();
            // a producer failed for good is replaced before the take-over is retried
            fence_off = self
                .changelog
                .write_fence(&entry.table, part, owner, &self.member, FenceKind::Open)
                .map_err(|why| RestoreError::Fence(entry.table.clone(), part, why))?;
            fence_wait += t.elapsed();
            let t = std::time::Instant::now();
            let (n, restarted) = self.fold_span(
                reader,
                &table,
                &topic,
                part,
                next,
                End::Through(fence_off),
                own,
                Begin::Resume(check.take()),
                cancelled,
            )?;
            read_time += t.elapsed();
            next = n;
            rewritten |= restarted && from > 0;
            let seen = table
                .read()
                .slice(part)
                .map(|s| s.owner)
                .unwrap_or_default();
            if seen <= owner {
                break;
            }
            if attempt == 2 {
                return Err(RestoreError::Superseded(entry.table.clone(), part));
            }
            owner = Owner::next(seen, generation);
        }
        // a fence below where this node had read: the partition started over (the topic was
        // deleted and created again); what it holds now is read from its beginning, and every row
        // of the slice is written into it again
        let started_over = fence_off < from;
        if started_over || rewritten {
            tracing::warn!(
                %topic,
                partition = part,
                fence_offset = fence_off,
                read_up_to = from,
                rewritten_by_another_owner = rewritten,
                "changelog partition started over (topic deleted and created again?): reading it from the beginning (and producing every row of the slice again unless its previous owner did)"
            );
            // a stop before this read ends reads the partition from its beginning next time (the
            // position stored by the read up to the fence is past what it must read again)
            if let Some(s) = table.read().slice(part) {
                let mut m = SliceMeta::of(s);
                m.owner = Owner::default().to_header();
                let a = AckMeta {
                    acked: s.acked,
                    cl_next: 0,
                };
                let mut b = WriteBatch::default();
                b.put_slice(&entry.table, part, &m);
                b.put_acks(&entry.table, part, &a);
                self.store.apply(b)?;
            }
            self.fold_span(
                reader,
                &table,
                &topic,
                part,
                0,
                End::Through(fence_off),
                own,
                Begin::Scratch,
                cancelled,
            )?;
        }
        let mut superseded = false;
        let mut metas = None;
        table.update_slices(|s| {
            let slice = s.slice_mut(part);
            if slice.owner > owner {
                superseded = true;
                return;
            }
            slice.owner = owner;
            slice.mode = SliceMode::Owned;
            slice.cl_next = if started_over {
                fence_off + 1
            } else {
                slice.cl_next.max(fence_off + 1)
            };
            metas = Some((SliceMeta::of(slice), AckMeta::of(slice)));
        });
        if superseded {
            return Err(RestoreError::Superseded(entry.table.clone(), part));
        }
        if let Some((s, a)) = metas {
            let mut b = WriteBatch::default();
            b.put_slice(&entry.table, part, &s);
            b.put_acks(&entry.table, part, &a);
            self.store.apply(b)?;
        }
        self.metrics.fences_written.inc();
        self.metrics
            .restore_seconds
            .set(started.elapsed().as_secs_f64());
        // what this node applied to the slice and the changelog never acknowledged: its own
        // slice, or one it let go of and held since as a followed slice (a materialiser keeps it
        // at a clean stop; an all-in-one node's follower takes up, at the first assignment after
        // a restart, every slice of the last run the group did not give back yet, outbox and
        // all). The input then starts at the stored position, past those changes: without this
        // their records never reached the changelog (chaos seed 31415001, OUTBOX-1). A followed
        // slice another node wrote is read up to the fence first, so what is produced again is
        // each key's current value, at worst a duplicate of that owner's last record
        let kept = mode == SliceMode::Followed;
        let replay = if started_over || own.is_some() || kept {
            self.replay(&table, part, started_over)?
        } else {
            Vec::new()
        };
        if started_over {
            self.metrics.changelog_refilled.inc_by(replay.len() as u64);
            // after the rows: a reader that read the partition before it started over reads it
            // again from its beginning when it meets this fence
            let end = self.changelog.write_fence(
                &entry.table,
                part,
                owner,
                &self.member,
                FenceKind::Restarted,
            );
            if end.is_err() {
                tracing::warn!(table = %entry.table, partition = part, "the fence that ends the rewrite was not acknowledged; readers find the restart by the partition's end");
            }
        }
        let acked = table.read().slice(part).map_or(-1, |s| s.acked);
        tracing::info!(
            table = %entry.table,
            partition = part,
            owner = %owner.to_header(),
            from_changelog_offset = from,
            fence_offset = fence_off,
            replayed = replay.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            prepare_ms = started.duration_since(entered).as_millis() as u64,
            fence_ms = fence_wait.as_millis() as u64,
            read_ms = read_time.as_millis() as u64,
            "slice taken over"
        );
        Ok(SliceTaken {
            table: entry.table.clone(),
            acked,
            replay,
            rebuilt: mode == SliceMode::Absent,
            quiet: mode != SliceMode::Absent && !started_over && !rewritten && fence_off == from,
            before,
        })
    }

    /// Reads changelog partition `part` of `topic` from `from` to `end`, folding into `table`;
    /// returns the next changelog offset, and whether a `restarted` fence was read or the
    /// partition is not the one read before (see [`Begin`]).
    #[allow(clippy::too_many_arguments)]
    fn fold_span(
        &self,
        reader: &Reader,
        table: &Arc<Table>,
        topic: &str,
        part: u32,
        from: i64,
        end: End,
        own: Option<Own>,
        begin: Begin,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(i64, bool), RestoreError> {
        let check = match begin {
            Begin::Resume(check) => check,
            Begin::Scratch => None,
        };
        let prefix = self.changelog.topic_for("");
        let name = table.read().name.clone();
        let span = Span {
            topic: topic.to_string(),
            partition: i32::try_from(part).unwrap_or(0),
            from: Some(check.map_or(from, |c| c.offset())),
            end,
        };
        writer::with_writer(&self.store, |chunks| {
            let mut restarted = false;
            let mut pending = check;
            // read from scratch: the slice's owner and changelog position as the records read so
            // far make them (the slice's own are past records this read must not fence out)
            let mut scratch = matches!(begin, Begin::Scratch).then_some((Owner::default(), 0));
            let fresh = |scratch: Option<(Owner, i64)>| {
                let mut d = Delta::new(table.clone());
                if let Some((owner, cl_next)) = scratch {
                    let s = d.slice(part);
                    (s.owner, s.cl_next) = (owner, cl_next);
                }
                d
            };
            let mut delta = fresh(scratch);
            let mut folded = 0usize;
            // the writer stopped on a store error (which `with_writer` returns): stop reading
            let stopped = std::cell::Cell::new(false);
            let stop = || stopped.get() || cancelled();
            let next = reader::read_spans(
                reader,
                &[span],
                self.stall,
                &self.brokers,
                &stop,
                |m| {
                    if stopped.get() {
                        return;
                    }
                    let at = rdkafka::Message::offset(m);
                    if let Some(want) = pending.filter(|w| at >= w.offset()) {
                        pending = None;
                        match want.read_again(m, &prefix) {
                            // read already: not folded again
                            ReadAgain::Same => return,
                            ReadAgain::Replaced => {
                                tracing::warn!(topic, offset = want.offset(), "the changelog record this node read last is not the one there now (topic deleted and created again)");
                                restarted = true;
                                return;
                            }
                            ReadAgain::Gone => {}
                        }
                    }
                    self.metrics.restore_records.inc();
                    match changelog::parse_record(&prefix, m) {
                        Ok(rec) => match fold_into(&name, &mut delta, rec, own) {
                            Folded::Fenced => self.metrics.fenced_records.inc(),
                            Folded::Restarted => restarted = true,
                            Folded::InputReset => {
                                tracing::info!(table = %name, partition = part, "restore: the input partition started over here (an input-reset fence): its position was forgotten")
                            }
                            _ => {}
                        },
                        Err(e) => {
                            tracing::warn!(topic, offset = rdkafka::Message::offset(m), error = ?e, "restore: not a changelog record; skipped")
                        }
                    }
                    folded += 1;
                    if folded.is_multiple_of(FOLD_CHUNK) {
                        if let Some(at) = scratch.as_mut() {
                            let s = delta.slice(part);
                            *at = (s.owner, s.cl_next);
                        }
                        let full = std::mem::replace(&mut delta, fresh(scratch));
                        if !self.commit(full, chunks) {
                            stopped.set(true);
                        }
                    }
                },
            )?;
            self.commit(delta, chunks);
            let next = next
                .get(&(topic.to_string(), i32::try_from(part).unwrap_or(0)))
                .copied()
                .unwrap_or(from);
            Ok((next, restarted))
        })
    }

    /// Makes folded records visible, and hands their store writes to the writer (not yet owned:
    /// a crash restores again); false when the writer stopped on an error. A row is stored as
    /// the JSON its record carried ([`writer::put_entry`]).
    fn commit(&self, delta: Delta, chunks: &writer::Chunks<'_>) -> bool {
        let name = delta.table.read().name.to_string();
        let chunk = writer::ChunkWrite {
            rest: slices_batch(&name, &delta, false),
            rows: delta
                .rows
                .iter()
                .map(|(k, e)| writer::ChunkRow {
                    key: k.clone(),
                    entry: e.clone(),
                })
                .collect(),
            table: name,
        };
        let sent = chunks.send(chunk);
        let table = delta.table.clone();
        self.tables.commit(delta, &*self.sink);
        let t = table.read();
        self.metrics.table_size(&t.name, t.rows.len(), t.seq());
        sent
    }

    /// Produces again every key of slice `part` (`all`), or those this node changed but whose
    /// changelog record was never acknowledged (its outbox).
    fn replay(
        &self,
        table: &Arc<Table>,
        part: u32,
        all: bool,
    ) -> Result<Vec<PendingRow>, RestoreError> {
        let (name, keys) = {
            let t = table.read();
            (t.name.to_string(), repair::slice_keys(&t, part, all))
        };
        Ok(repair::produce_keys(
            &self.tables,
            &self.changelog,
            &name,
            part,
            keys,
        )?)
    }
}

/// The sled batch of a delta: its rows and the bookkeeping of its slices.
pub fn delta_batch(table: &str, delta: &Delta, owned: bool) -> WriteBatch {
    let mut b = slices_batch(table, delta, owned);
    for (key, entry) in &delta.rows {
        writer::put_entry(&mut b, table, key, entry.as_ref());
    }
    b
}

/// The bookkeeping of a delta's slices, as a sled batch.
fn slices_batch(table: &str, delta: &Delta, owned: bool) -> WriteBatch {
    let mut b = WriteBatch::default();
    for (part, s) in &delta.slices {
        b.put_slice(
            table,
            *part,
            &SliceMeta {
                last_off: s.last_off,
                count: s.count,
                owner: s.owner.to_header(),
                owned,
                kept_ms: None,
            },
        );
        if !owned {
            b.put_acks(
                table,
                *part,
                &AckMeta {
                    acked: s.acked,
                    cl_next: s.cl_next,
                },
            );
        }
    }
    b
}

/// How a span read begins.
#[derive(Debug, Clone, Copy)]
enum Begin {
    /// Where this node's copy ends; the record before it, when known, is read first and compared
    /// ([`ReadLast`]).
    Resume(Option<ReadLast>),
    /// From the partition's beginning, as a restore from nothing: records fold by the owners and
    /// position they make, not by the slice's (which may be past them).
    Scratch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_marked_taken_over_until_the_take_ends() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 2);
        t.update_slices(|s| s.slice_mut(1).mode = SliceMode::Followed);
        {
            let (mode, _taking) = Taking::begin(&t, 1);
            assert_eq!(mode, SliceMode::Followed);
            assert!(t.read().slice(1).is_some_and(|s| s.taking));
            assert!(!t.read().slice(0).is_some_and(|s| s.taking));
        }
        assert!(
            !t.read().slice(1).is_some_and(|s| s.taking),
            "cleared when the take ends, whichever way"
        );
    }
}
