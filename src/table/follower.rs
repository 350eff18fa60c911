//! The changelog follower: keeps slices this node does not own up to date by reading their
//! changelog partitions (a GlobalKTable). A gateway follows every slice of every table of its
//! deployment; an all-in-one node follows the slices whose input partitions other members own, so
//! it can serve whole tables too, and hands a slice to its ingest loop when it is assigned.
//!
//! It also reads the deployment's registry, so that new tables appear without a restart. Folded
//! records are written to the local store with their changelog position, so a restart reads only
//! the tail. Records are folded by the rules of [`crate::table::fold`]: a former owner's late
//! writes and stale values are ignored.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::cdc::source::{self, Reader};
use crate::config::{Config, TopicSelection};
use crate::metrics::Metrics;
use crate::table::changelog::{parse_record, RegistryEntry};
use crate::table::fold::{fold_into, Folded};
use crate::table::ingest::partitions::FollowControl;
use crate::table::ingest::RECOVERY_LIMIT;
use crate::table::position::RecordId;
use crate::table::read_last::{ReadAgain, ReadLast};
use crate::table::readiness::Readiness;
use crate::table::registry::{Registry, RegistryError};
use crate::table::restore::{delta_batch, SliceHandover};
use crate::table::state::{Delta, Slice, SliceMode, Table, Tables, UpdateSink};
use crate::table::store::{AckMeta, Store};

enum Command {
    Follow {
        table: String,
        part: u32,
    },
    Release {
        table: String,
        part: u32,
        done: SyncSender<()>,
    },
}

/// Controls a running follower.
#[derive(Clone)]
pub struct FollowerHandle {
    tx: SyncSender<Command>,
}

impl FollowControl for FollowerHandle {
    fn follow(&self, table: &str, part: u32) {
        let _ = self.tx.send(Command::Follow {
            table: table.to_string(),
            part,
        });
    }
}

impl SliceHandover for FollowerHandle {
    fn release(&self, table: &str, part: u32) {
        let (done, wait) = sync_channel(1);
        if self
            .tx
            .send(Command::Release {
                table: table.to_string(),
                part,
                done,
            })
            .is_ok()
        {
            let _ = wait.recv_timeout(Duration::from_secs(30));
        }
    }
}

/// Errors that stop the follower.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
}

/// Which slices to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every slice (gateway).
    All,
    /// The slices that are not owned here (all-in-one).
    NotOwned,
}

/// The follower's dependencies.
pub struct Follower {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub tables: Arc<Tables>,
    pub sink: Arc<dyn UpdateSink>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub cancel: CancellationToken,
    pub scope: Scope,
}

/// A changelog topic and partition.
type Tp = (String, i32);

/// One followed changelog partition.
struct Followed {
    table: String,
    next: i64,
    since: Instant,
    /// Since when every fetch response put the partition's end below `next` (see
    /// [`Follower::rewind_restarted`]).
    behind: Option<Instant>,
    /// The offset of the `restarted` fence this follower last read the partition again for.
    rewound_at: Option<i64>,
    /// The record at `next - 1` as this node read or wrote it, until it is read again and
    /// compared ([`crate::table::read_last`]).
    check: Option<ReadLast>,
}

/// How long a partition's end must stay below a follower's position before it is read again from
/// the beginning: longer than a cached end from before an assignment lives.
const RESTARTED_AFTER: Duration = Duration::from_secs(1);

/// Logged when the follower of an all-in-one node finds a slice it follows owned by the ingest
/// (a bug: two writers; the tests look for it).
pub const SECOND_WRITER: &str = "the follower held a slice this node's ingest owns";

/// Records folded per commit.
const MAX_BATCH: usize = 5000;

/// A gateway after an unclean stop: its store may be older than what its clients were sent, so
/// new subscriptions wait until every followed changelog partition (and the registry) is read
/// again up to the end first seen after the restart; at most [`RECOVERY_LIMIT`].
struct Recovery {
    started: Instant,
    /// The end of each partition when first seen (the registry's included).
    ends: HashMap<(String, i32), i64>,
}

impl Recovery {
    /// Whether `(topic, p)`, read up to `next`, has reached its first-seen end; `None`: no
    /// watermarks yet.
    fn reached(&mut self, reader: &Reader, topic: &str, p: i32, next: i64) -> Option<bool> {
        let (lo, hi) = source::cached_watermarks(reader, topic, p)?;
        let end = *self.ends.entry((topic.to_string(), p)).or_insert(hi);
        Some(next.max(lo) >= end)
    }
}

impl Follower {
    /// Starts the follower thread.
    pub fn spawn(
        self,
    ) -> std::io::Result<(
        FollowerHandle,
        std::thread::JoinHandle<Result<(), FollowerError>>,
    )> {
        let (tx, rx) = sync_channel(1024);
        let handle = std::thread::Builder::new()
            .name("livetable-follower".into())
            .spawn(move || self.run(rx))?;
        Ok((FollowerHandle { tx }, handle))
    }

    fn run(self, rx: Receiver<Command>) -> Result<(), FollowerError> {
        let reader = source::reader(&self.config)?;
        let prefix = self.config.changelog_prefix.clone();
        let registry_topic = self.registry.topic().to_string();
        let mut followed: HashMap<(String, i32), Followed> = HashMap::new();
        let mut registry_next = self.registry.next_offset();
        // tables of the registry this follower has set up
        let mut considered: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut registry_changed = true;
        let mut assigned: BTreeSet<(String, i32, i64)> = BTreeSet::new();
        let mut last_check = Instant::now();
        // until the first time it is caught up, every followed partition must have answered
        let mut starting = true;
        let mut recovery =
            (self.scope == Scope::All && !self.readiness.is_recovered()).then(|| Recovery {
                started: Instant::now(),
                ends: HashMap::new(),
            });
        while !self.cancel.is_cancelled() {
            if registry_changed {
                registry_changed = false;
                for entry in self.registry.all() {
                    if considered.insert(entry.table.clone()) {
                        self.add_table(&entry, &mut followed);
                    }
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd, &mut followed);
            }
            self.reassign(
                &reader,
                &registry_topic,
                registry_next,
                &followed,
                &mut assigned,
            );
            let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
            if let Some(r) = reader.poll(Duration::from_millis(20)) {
                match r {
                    Ok(m) => batch.push(m),
                    Err(e) => tracing::debug!(error = %e, "follower: consumer error"),
                }
            }
            let mut bytes = batch.first().map_or(0, |m| m.payload_len());
            while !batch.is_empty()
                && batch.len() < MAX_BATCH
                && bytes < self.config.max_batch_bytes
            {
                match reader.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        bytes += m.payload_len();
                        batch.push(m)
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "follower: consumer error"),
                    None => break,
                }
            }
            let mut deltas: HashMap<String, Delta> = HashMap::new();
            let mut let_go: Vec<(String, i32)> = Vec::new();
            let mut writers: HashMap<(String, i32), Writer> = HashMap::new();
            let mut restarted: Vec<((String, i32), i64)> = Vec::new();
            let mut replaced: Vec<((String, i32), i64)> = Vec::new();
            // per partition, the last record folded (its id is stored with the position)
            let mut last_read: HashMap<(String, i32), usize> = HashMap::new();
            for (i, m) in batch.iter().enumerate() {
                if m.topic() == registry_topic {
                    registry_next = registry_next.max(m.offset() + 1);
                    match self.registry.absorb(m.offset(), m.payload()) {
                        Ok(_) => registry_changed = true,
                        Err(e) => {
                            tracing::error!(error = %e, "registry conflict");
                            self.readiness
                                .healthy
                                .store(false, std::sync::atomic::Ordering::Release);
                            return Err(e.into());
                        }
                    }
                    continue;
                }
                let key = (m.topic().to_string(), m.partition());
                let Some(f) = followed.get_mut(&key) else {
                    continue;
                };
                if let Some(want) = f.check.filter(|w| m.offset() >= w.offset()) {
                    f.check = None;
                    // only where the follower writes the slice (a restore or the ingest reads it
                    // from the slice's position itself)
                    let follows = self.scope != Scope::NotOwned
                        || self.tables.get(&f.table).is_some_and(|t| {
                            *writers
                                .entry(key.clone())
                                .or_insert_with(|| writer(&t, m.partition()))
                                == Writer::Follower
                        });
                    if follows && want.read_again(m, &prefix) == ReadAgain::Replaced {
                        // the rest of the partition's batch waits for the read from the start
                        f.next = i64::MAX;
                        replaced.push((key, want.offset()));
                        continue;
                    }
                }
                if m.offset() < f.next {
                    continue;
                }
                f.next = m.offset() + 1;
                self.metrics.follower_records.inc();
                let Some(table) = self.tables.get(&f.table) else {
                    continue;
                };
                if self.scope == Scope::NotOwned {
                    // once per partition and round: the round commits after all its records
                    let w = *writers
                        .entry(key.clone())
                        .or_insert_with(|| writer(&table, m.partition()));
                    match w {
                        Writer::Follower => {}
                        // its Release is on the way; the restore reads from the slice's position
                        Writer::Restore => continue,
                        Writer::Ingest => {
                            // a second writer beside the ingest could take keys back
                            let_go.push(key);
                            continue;
                        }
                    }
                }
                match parse_record(&prefix, m) {
                    Ok(rec) => {
                        let delta = deltas
                            .entry(f.table.clone())
                            .or_insert_with(|| Delta::new(table));
                        last_read.insert(key.clone(), i);
                        match fold_into(&f.table, delta, rec, None) {
                            Folded::Fenced => self.metrics.fenced_records.inc(),
                            Folded::Restarted => restarted.push((key, m.offset())),
                            Folded::InputReset => {
                                tracing::warn!(table = %f.table, partition = m.partition(), offset = m.offset(), "the slice's owner says its input partition started over (topic created again): forgetting the slice's input position")
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(topic = m.topic(), offset = m.offset(), error = ?e, "follower: not a changelog record; skipped")
                    }
                }
            }
            let mut read_ids: HashMap<String, Vec<(Tp, RecordId)>> = HashMap::new();
            for (key, i) in last_read {
                if let (Some(f), Some(m)) = (followed.get(&key), batch.get(i)) {
                    let id = RecordId::of(m);
                    read_ids.entry(f.table.clone()).or_default().push((key, id));
                }
            }
            drop(batch);
            for key in let_go {
                if followed.remove(&key).is_some() {
                    tracing::error!(topic = %key.0, partition = key.1, "{SECOND_WRITER}; let go of it");
                }
            }
            for (name, delta) in deltas {
                let mut b = delta_batch(&name, &delta, false);
                for ((topic, p), id) in read_ids.remove(&name).unwrap_or_default() {
                    b.set_changelog_read(&topic, p, ReadLast::Record(id));
                }
                if let Err(e) = self.store.apply(b) {
                    tracing::error!(error = %e, "follower: writing the local cache failed");
                }
                let table = delta.table.clone();
                self.tables.commit(delta, &*self.sink);
                let t = table.read();
                self.metrics.table_size(&name, t.rows.len(), t.seq());
            }
            // after the commit: a delta of the batch must not raise the position again
            for (key, at) in replaced {
                if let Some(f) = followed.get_mut(&key) {
                    tracing::warn!(topic = %key.0, partition = key.1, offset = at, "the changelog record this node read last is not the one there now (topic deleted and created again): reading the partition again from the beginning");
                    // a `restarted` fence up to the end known now is read again with the rest
                    let end = source::cached_watermarks(&reader, &key.0, key.1).map(|(_, hi)| hi);
                    self.rewind(&key, f, end.map_or(at, |hi| (hi - 1).max(at)));
                    assigned.clear();
                }
            }
            for (key, at) in restarted {
                if let Some(f) = followed.get_mut(&key) {
                    if f.rewound_at.is_none_or(|o| at > o) {
                        self.rewind(&key, f, at);
                        assigned.clear();
                    }
                }
            }
            // (tables announced by records just read are followed from the next round on)
            if !registry_changed && last_check.elapsed() > Duration::from_millis(250) {
                last_check = Instant::now();
                if self.rewind_restarted(&reader, &mut followed) {
                    assigned.clear();
                }
                if self.check_lag(&reader, &registry_topic, registry_next, &followed, starting) {
                    starting = false;
                }
                if let Some(r) = recovery.as_mut() {
                    if self.recovered(r, &reader, &registry_topic, registry_next, &followed) {
                        recovery = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn command(&self, cmd: Command, followed: &mut HashMap<(String, i32), Followed>) {
        match cmd {
            Command::Follow { table, part } => {
                if let Some(entry) = self.registry.get(&table) {
                    self.follow_slice(&entry, part, followed);
                }
            }
            Command::Release { table, part, done } => {
                let topic =
                    crate::table::changelog::topic_name(&self.config.changelog_prefix, &table);
                followed.remove(&(topic, i32::try_from(part).unwrap_or(0)));
                let _ = done.send(());
            }
        }
    }

    /// Follows the slices of a table that this node should follow.
    fn add_table(&self, entry: &RegistryEntry, followed: &mut HashMap<(String, i32), Followed>) {
        if !covered(&self.config.topics, &entry.source) {
            return;
        }
        self.tables
            .ensure(&entry.table, &entry.epoch, &entry.source, entry.partitions);
        if let Err(e) = self.store.put_table(&entry.table, &entry.meta()) {
            tracing::error!(table = %entry.table, error = %e, "follower: recording the table in the local cache failed");
        }
        self.metrics
            .follower_lag
            .with_label_values(&[&entry.table])
            .set(0);
        for part in 0..entry.partitions {
            self.follow_slice(entry, part, followed);
        }
    }

    fn follow_slice(
        &self,
        entry: &RegistryEntry,
        part: u32,
        followed: &mut HashMap<(String, i32), Followed>,
    ) {
        let Some(t) = self.tables.get(&entry.table) else {
            return;
        };
        let mut next = None;
        let scope = self.scope;
        t.update_slices(|s| {
            let slice = s.slice_mut(part);
            if takes_up(slice, scope) {
                // a slice this node owned: its position follows its own last record
                let owned = (slice.mode == SliceMode::Owned).then_some(slice.owner);
                slice.mode = SliceMode::Followed;
                next = Some((slice.cl_next, owned));
            }
        });
        if let Some((next, owned)) = next {
            let topic =
                crate::table::changelog::topic_name(&self.config.changelog_prefix, &entry.table);
            let p = i32::try_from(part).unwrap_or(0);
            // read again (from one record early): where this node owned the slice, one of its own
            // tenure; else the record stored as the one at `next - 1`, where it is
            let check = (next > 0)
                .then(|| {
                    owned.map(|o| ReadLast::Owner(next - 1, o)).or_else(|| {
                        self.store
                            .changelog_read(&topic, p)
                            .filter(|r| r.offset() == next - 1)
                    })
                })
                .flatten();
            followed.insert(
                (topic, p),
                Followed {
                    table: entry.table.clone(),
                    next,
                    since: Instant::now(),
                    behind: None,
                    rewound_at: None,
                    check,
                },
            );
        }
    }

    /// Assigns the registry and every followed partition at its position, when the set changed.
    fn reassign(
        &self,
        reader: &Reader,
        registry_topic: &str,
        registry_next: i64,
        followed: &HashMap<(String, i32), Followed>,
        assigned: &mut BTreeSet<(String, i32, i64)>,
    ) {
        let wanted: BTreeSet<(String, i32)> = followed
            .keys()
            .cloned()
            .chain(std::iter::once((registry_topic.to_string(), 0)))
            .collect();
        let current: BTreeSet<(String, i32)> =
            assigned.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        if wanted == current {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let mut next = BTreeSet::new();
        for (topic, p) in &wanted {
            let offset = if topic == registry_topic {
                registry_next
            } else {
                followed
                    .get(&(topic.clone(), *p))
                    .map_or(0, |f| f.check.map_or(f.next, |c| c.offset()))
            };
            if tpl
                .add_partition_offset(topic, *p, Offset::Offset(offset))
                .is_ok()
            {
                next.insert((topic.clone(), *p, offset));
            }
        }
        // topics not assigned before: their leaders first, or their first fetch waits for a
        // metadata refresh (see `reader::learn_leaders`); bounded, as commands wait meanwhile
        crate::table::reader::learn_leaders(
            reader,
            wanted
                .iter()
                .filter(|tp| !current.contains(*tp))
                .map(|(t, _)| t.as_str()),
            Duration::from_secs(2),
        );
        match reader.assign(&tpl) {
            Ok(()) => *assigned = next,
            Err(e) => tracing::warn!(error = %e, "follower: assign failed"),
        }
    }

    /// After an unclean stop: whether the registry, then every followed partition, is read up to
    /// its end first seen after the restart (or the limit passed); then ends the hold.
    fn recovered(
        &self,
        r: &mut Recovery,
        reader: &Reader,
        registry_topic: &str,
        registry_next: i64,
        followed: &HashMap<(String, i32), Followed>,
    ) -> bool {
        let mut done = r.reached(reader, registry_topic, 0, registry_next) == Some(true);
        // only once the registry is read again is every table followed
        if done {
            for ((topic, p), f) in followed {
                if r.reached(reader, topic, *p, f.next) != Some(true) {
                    done = false;
                }
            }
        }
        if done {
            tracing::info!(
                partitions = followed.len(),
                after_ms = r.started.elapsed().as_millis() as u64,
                "recovered from the unclean stop: the changelog is read again up to where it ended"
            );
        } else if r.started.elapsed() > RECOVERY_LIMIT {
            tracing::warn!(limit_secs = RECOVERY_LIMIT.as_secs(), "still behind the changelog's end after an unclean stop; serving new subscriptions anyway (they may show older values than clients saw before the stop)");
        } else {
            return false;
        }
        self.readiness.set_recovered();
        true
    }

    /// A followed partition whose end stays below this follower's position started over (the
    /// changelog topic was deleted and created again, see [`crate::table::repair`]): it is read
    /// again from its beginning (records fold only where newer). True when one was.
    fn rewind_restarted(
        &self,
        reader: &Reader,
        followed: &mut HashMap<(String, i32), Followed>,
    ) -> bool {
        let mut rewound = false;
        for ((topic, p), f) in followed.iter_mut() {
            let end = source::cached_watermarks(reader, topic, *p).map(|(_, hi)| hi);
            let Some(end) = end.filter(|hi| *hi < f.next) else {
                f.behind = None;
                continue;
            };
            let behind = *f.behind.get_or_insert_with(Instant::now);
            if behind.elapsed() < RESTARTED_AFTER || f.since.elapsed() < RESTARTED_AFTER {
                continue;
            }
            tracing::warn!(%topic, partition = p, end, position = f.next, "changelog partition ends below what this node read (topic deleted and created again?): reading it again from the beginning");
            // a `restarted` fence below the end is read again with the rest
            self.rewind(&(topic.clone(), *p), f, end - 1);
            rewound = true;
        }
        rewound
    }

    /// Reads followed partition `key` again from its beginning (it started over; a `restarted`
    /// fence up to offset `covered` is read again with it, not for itself), with the slice's
    /// changelog position (memory and store).
    fn rewind(&self, key: &(String, i32), f: &mut Followed, covered: i64) {
        tracing::info!(topic = %key.0, partition = key.1, covered, "changelog partition read again from the beginning");
        self.metrics.changelog_rewound.inc();
        (f.next, f.behind, f.since, f.check) = (0, None, Instant::now(), None);
        f.rewound_at = Some(covered);
        let Some(t) = self.tables.get(&f.table) else {
            return;
        };
        let part = u32::try_from(key.1).unwrap_or(0);
        let mut meta = None;
        t.update_slices(|s| {
            if let Some(slice) = s.slices.get_mut(part as usize) {
                slice.cl_next = 0;
                meta = Some(AckMeta::of(slice));
            }
        });
        if let Some(meta) = meta {
            if let Err(e) = self.store.put_acks(&f.table, part, &meta) {
                tracing::error!(error = %e, "follower: recording the changelog position failed");
            }
        }
    }

    /// Lag per followed partition and readiness: the registry and every followed partition read
    /// to within the ready lag of their high watermarks. Returns the readiness.
    fn check_lag(
        &self,
        reader: &Reader,
        registry_topic: &str,
        registry_next: i64,
        followed: &HashMap<(String, i32), Followed>,
        starting: bool,
    ) -> bool {
        let mut ready = true;
        let mut why = String::new();
        match source::cached_watermarks(reader, registry_topic, 0) {
            Some((lo, hi)) if registry_next.max(lo) >= hi => {}
            Some(_) => {
                ready = false;
                why = "reading the table registry".into();
            }
            None => {
                ready = false;
                why = format!(
                    "no answer yet from the broker at {} for the registry",
                    self.config.brokers
                );
            }
        }
        let mut max_lag: HashMap<&str, i64> = HashMap::new();
        for ((topic, p), f) in followed {
            match source::cached_watermarks(reader, topic, *p) {
                Some((lo, hi)) => {
                    let lag = (hi - f.next.max(lo)).max(0);
                    let slot = max_lag.entry(f.table.as_str()).or_insert(0);
                    *slot = (*slot).max(lag);
                    if lag > self.config.max_ready_lag {
                        ready = false;
                        why = format!("{topic}/{p} is {lag} records behind");
                    }
                }
                // a partition added to a running node gets its first fetch response in milliseconds
                None if !starting && f.since.elapsed() < Duration::from_secs(2) => {}
                None => {
                    ready = false;
                    why = format!("no fetch response yet for {topic}/{p}");
                }
            }
        }
        for (table, lag) in max_lag {
            self.metrics
                .follower_lag
                .with_label_values(&[table])
                .set(lag);
        }
        self.readiness.set_follower(ready, &why);
        ready
    }
}

/// Whether the follower takes slice `s` up: never one a restore is taking over, nor (all-in-one)
/// one this node's ingest owns.
fn takes_up(s: &Slice, scope: Scope) -> bool {
    s.mode != SliceMode::Derived
        && match writer_of(s) {
            Writer::Follower => true,
            Writer::Restore => false,
            Writer::Ingest => scope == Scope::All,
        }
}

/// Who writes a slice of an all-in-one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Follower,
    /// A restore is taking it over.
    Restore,
    /// This node's ingest owns it.
    Ingest,
}

fn writer_of(s: &Slice) -> Writer {
    if s.mode == SliceMode::Owned {
        Writer::Ingest
    } else if s.taking {
        Writer::Restore
    } else {
        Writer::Follower
    }
}

/// Who writes slice `part` of `table` now.
fn writer(table: &Table, part: i32) -> Writer {
    let part = u32::try_from(part).unwrap_or(0);
    table.read().slice(part).map_or(Writer::Follower, writer_of)
}

/// Whether a table fed by `topic` belongs to this node's subscription.
pub fn covered(topics: &TopicSelection, topic: &str) -> bool {
    match topics {
        TopicSelection::Names(names) => names.iter().any(|n| n == topic),
        TopicSelection::Pattern(p) => regex::Regex::new(p).is_ok_and(|re| re.is_match(topic)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_follower_never_takes_up_a_slice_being_taken_over_or_owned() {
        let mut s = Slice::empty(SliceMode::Absent);
        assert!(takes_up(&s, Scope::NotOwned));
        s.taking = true;
        assert!(
            !takes_up(&s, Scope::NotOwned),
            "a restore is taking it over"
        );
        assert!(!takes_up(&s, Scope::All));
        s.taking = false;
        s.mode = SliceMode::Followed;
        assert!(takes_up(&s, Scope::NotOwned));
        s.mode = SliceMode::Owned;
        assert!(!takes_up(&s, Scope::NotOwned), "the ingest owns it");
        assert!(takes_up(&s, Scope::All), "a gateway follows every slice");
        s.mode = SliceMode::Derived;
        assert!(!takes_up(&s, Scope::All));
    }

    #[test]
    fn a_slice_is_the_followers_only_while_nobody_else_writes_it() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 2);
        t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Followed);
        assert_eq!(writer(&t, 0), Writer::Follower);
        t.update_slices(|s| s.slice_mut(0).taking = true);
        assert_eq!(writer(&t, 0), Writer::Restore);
        t.update_slices(|s| s.slice_mut(0).mode = SliceMode::Owned);
        assert_eq!(writer(&t, 0), Writer::Ingest);
        t.update_slices(|s| s.slice_mut(0).taking = false);
        assert_eq!(writer(&t, 0), Writer::Ingest);
        assert_eq!(writer(&t, 1), Writer::Follower);
    }
}
