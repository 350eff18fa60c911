//! Which input partitions this node owns, and the handover of their slices on rebalances.
//!
//! Assigned partitions start paused and `Restoring`: a restore worker takes over their slices
//! (see [`crate::table::restore`]) and the ingest loop resumes them at the start offset it
//! returns. A record of a table whose slice this node does not own yet (a new table, or one first
//! seen in this partition) pauses its partition the same way while the slice is created.
//! On revoke, everything applied from the partition is made durable and its offsets committed
//! before the partition is let go; its slices go to the follower (all-in-one) or are dropped.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::cdc::source::{self, RebalanceListener, SourceContext};
use crate::table::checkpoint::{Barrier, Checkpoint, PendingRow, SliceAck};
use crate::table::position::{owners_digest, LastApplied, RecordId};
use crate::table::read_last::ReadLast;
use crate::table::restore::{RestoreError, Restorer};
use crate::table::state::{SliceMode, Tables};
use crate::table::store::{AckMeta, SliceMeta, Store, WriteBatch};

/// Takes slices over from the follower, and gives them back.
pub trait FollowControl: Send + Sync {
    /// Starts following (`table`, `part`) from the slice's changelog position.
    fn follow(&self, table: &str, part: u32);
}

/// State of an assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartState {
    /// Paused while restore job `job` takes its slices over.
    Restoring {
        generation: i32,
        job: u64,
    },
    Active {
        generation: i32,
    },
}

/// Work for the restore workers.
pub enum Job {
    /// Take over every slice of an assigned input partition.
    Take {
        id: u64,
        topic: String,
        partition: i32,
        generation: i32,
        stored: Option<i64>,
    },
    /// Create (or take over) the slice of a table first seen in an owned partition.
    Slice {
        id: u64,
        topic: String,
        partition: i32,
        generation: i32,
        table: String,
        schema: Option<String>,
    },
}

/// A finished job.
pub struct Done {
    pub id: u64,
    pub topic: String,
    pub partition: i32,
    pub result: Result<Taken, RestoreError>,
}

/// What a job took over.
pub struct Taken {
    /// Where the partition starts (`None`: the beginning); only for `Job::Take`.
    pub start: Option<i64>,
    /// The group's committed offset when it is past `start`: a former owner applied the records
    /// in between.
    pub committed: Option<i64>,
    pub replay: Vec<PendingRow>,
    /// `(short name, chosen name)` of a `Job::Slice`.
    pub named: Option<(String, String)>,
    /// Slices taken over, with their acknowledged offsets.
    pub slices: Vec<(String, u32, i64)>,
    /// Nobody wrote any slice of the partition since this node read it
    /// ([`crate::table::restore::SliceTaken::quiet`]), and `owners_before` are the owners of
    /// their last records ([`crate::table::position::owners_digest`]; 0 for a `Job::Slice`).
    pub quiet: bool,
    pub owners_before: u64,
}

/// The partition set, shared by the rebalance callbacks and the ingest loop (same thread).
pub struct Partitions {
    inner: Mutex<Inner>,
    tables: Arc<Tables>,
    store: Store,
    restorer: Arc<Restorer>,
    jobs: super::jobs::Jobs<Job>,
    /// Taken away at shutdown, so the durability task sees its queue close.
    checkpoint_tx: Mutex<Option<mpsc::Sender<Checkpoint>>>,
    follow: Option<Arc<dyn FollowControl>>,
    revoke_timeout: Duration,
    /// Set at shutdown: revokes no longer wait for the durability task (it settles everything).
    closing: std::sync::atomic::AtomicBool,
}

pub struct Inner {
    pub states: HashMap<(String, i32), PartState>,
    /// Next input offset to apply per owned partition (initially from the store).
    pub positions: HashMap<(String, i32), i64>,
    /// The record each position follows (the last one applied), where known.
    pub last: HashMap<(String, i32), LastApplied>,
    /// Per owned partition, the digest of the owners this node writes its slices as.
    pub owners: HashMap<(String, i32), u64>,
    /// Partitions resumed one record early, to read the record their position follows again and
    /// tell whether the topic is still the one they were applied from (see
    /// [`crate::table::position::RecordId`]).
    pub verify: HashMap<(String, i32), (RecordId, std::time::Instant)>,
    /// Partitions whose offsets restarted: the source positions reached in them are forgotten
    /// before the next batch is staged (a new topic is a new stream).
    pub marks_forgotten: Vec<(String, i32)>,
    pub assigned_once: bool,
    /// Owned slices loaded from the store and not yet confirmed by an assignment.
    pub unconfirmed: HashSet<(String, u32)>,
    pub next_job: u64,
    /// Resolved table names per (topic, name in the records).
    pub names: HashMap<(String, String), String>,
    /// Partitions just resumed at a known offset: once the broker told their watermarks, an
    /// offset that no longer exists there (retention passed, topic recreated) is reported.
    pub check_start: HashMap<(String, i32), StartCheck>,
}

/// Where a partition resumed, to check against the broker's watermarks.
#[derive(Debug, Clone, Copy)]
pub struct StartCheck {
    pub start: i64,
    /// The group's committed offset when a take-over started below it ([`Taken::committed`]): a
    /// start removed by retention below it is not a loss this node can know of.
    pub covered: Option<i64>,
    /// The client's cached watermarks of the partition when it resumed, and when. A process
    /// that fetched the partition before (it owned it earlier) keeps that fetch's watermarks
    /// until a new fetch answers: taken for the partition's, a start past that old end read as
    /// a recreated topic, and the partition was applied again from its beginning.
    pub cached: Option<(i64, i64)>,
    pub since: std::time::Instant,
    /// The offset read again before `start` ([`Inner::verify`]): that record, coming, is not a
    /// reset (also once the check was given up).
    pub early: Option<i64>,
}

/// How long watermarks equal to those cached at the resume are taken for old ones; after it a
/// fetch has answered (the client fetches continuously), so they are the partition's.
pub const FRESH_WATERMARKS: Duration = Duration::from_secs(5);

impl StartCheck {
    /// Whether watermarks `now` (the client's cache) may be from before the resume.
    pub fn stale(&self, now: (i64, i64), at: std::time::Instant) -> bool {
        may_predate(self.cached, self.since, now, at)
    }
}

/// Whether watermarks `now` (a client's cache) at `at` may be those it had cached (`cached`) when
/// a partition was resumed at `since`, from a fetch before the resume.
pub fn may_predate(
    cached: Option<(i64, i64)>,
    since: std::time::Instant,
    now: (i64, i64),
    at: std::time::Instant,
) -> bool {
    cached == Some(now) && at.duration_since(since) < FRESH_WATERMARKS
}

impl Partitions {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tables: Arc<Tables>,
        store: Store,
        restorer: Arc<Restorer>,
        jobs_tx: SyncSender<Job>,
        checkpoint_tx: mpsc::Sender<Checkpoint>,
        follow: Option<Arc<dyn FollowControl>>,
        positions: HashMap<(String, i32), i64>,
        last_records: HashMap<(String, i32), LastApplied>,
        revoke_timeout: Duration,
    ) -> Self {
        // the slices of the last run, until the first assignment says which come back: those
        // owned, and a materialiser's (no follower) that it let go of
        let mut unconfirmed = HashSet::new();
        for name in tables.names() {
            if let Some(t) = tables.get(&name) {
                let t = t.read();
                for (p, s) in t.slices.iter().enumerate() {
                    if s.mode == SliceMode::Owned
                        || (s.mode == SliceMode::Followed && follow.is_none())
                    {
                        unconfirmed.insert((name.clone(), p as u32));
                    }
                }
            }
        }
        Partitions {
            inner: Mutex::new(Inner {
                states: HashMap::new(),
                positions,
                last: last_records,
                owners: HashMap::new(),
                verify: HashMap::new(),
                marks_forgotten: Vec::new(),
                assigned_once: false,
                unconfirmed,
                next_job: 1,
                names: HashMap::new(),
                check_start: HashMap::new(),
            }),
            tables,
            store,
            restorer,
            jobs: super::jobs::Jobs::new(jobs_tx),
            checkpoint_tx: Mutex::new(Some(checkpoint_tx)),
            follow,
            revoke_timeout,
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The node is shutting down: revokes release their slices without waiting.
    pub fn closing(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.checkpoint_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job; never waits (see [`super::jobs`]).
    fn submit(&self, job: Job) {
        self.jobs.submit(job);
    }

    /// Hands queued jobs on to the workers as far as they take them (each turn of the ingest loop).
    pub fn pump_jobs(&self) {
        self.jobs.pump();
    }

    /// Pauses `tp` and creates the slice of `table` in it; the partition resumes at its position.
    pub fn create_slice(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        topic: &str,
        partition: i32,
        table: &str,
        schema: Option<String>,
    ) {
        let id = {
            let mut inner = self.lock();
            let tp = (topic.to_string(), partition);
            let Some(PartState::Active { generation }) = inner.states.get(&tp).copied() else {
                return;
            };
            let id = inner.next_job;
            inner.next_job += 1;
            inner.states.insert(
                tp,
                PartState::Restoring {
                    generation,
                    job: id,
                },
            );
            (id, generation)
        };
        pause(consumer, topic, partition);
        self.submit(Job::Slice {
            id: id.0,
            topic: topic.to_string(),
            partition,
            generation: id.1,
            table: table.to_string(),
            schema,
        });
    }

    /// Installs a finished job: resumes its partition at the right offset. Returns the replay
    /// checkpoint to settle, or the error when the job failed for good.
    pub fn finish(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        done: Done,
    ) -> Result<Option<Checkpoint>, RestoreError> {
        let tp = (done.topic.clone(), done.partition);
        let current = {
            let inner = self.lock();
            matches!(inner.states.get(&tp), Some(PartState::Restoring { job, .. }) if *job == done.id)
        };
        let taken = match done.result {
            Ok(t) => t,
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                if current {
                    self.restorer.metrics.restore_retries.inc();
                    tracing::warn!(topic = %done.topic, partition = done.partition, error = %e, "taking the partition over failed; retrying");
                    self.retry(consumer, &tp);
                }
                return Ok(None);
            }
        };
        if !current {
            // revoked while the job ran: let its slices go again, unless the partition was
            // assigned again meanwhile (a newer job or the ingest holds its slices now)
            let held = self.lock().states.contains_key(&tp);
            if !held {
                for (table, part, _) in &taken.slices {
                    self.release_slice(table, *part);
                }
            }
            return Ok(None);
        }
        // whom this node writes the partition's slices as now, stored with each record id (read
        // before the partition set is locked: no table lock is taken under it)
        let owners_now = self.owners_of(&tp);
        let (start, early) = {
            let mut inner = self.lock();
            if let Some((short, name)) = &taken.named {
                inner
                    .names
                    .insert((done.topic.clone(), short.clone()), name.clone());
            }
            for (table, part, _) in &taken.slices {
                inner.unconfirmed.remove(&(table.clone(), *part));
            }
            let generation = match inner.states.get(&tp) {
                Some(PartState::Restoring { generation, .. }) => *generation,
                _ => -1,
            };
            inner
                .states
                .insert(tp.clone(), PartState::Active { generation });
            let start = match taken.start {
                Some(s) => {
                    inner.positions.insert(tp.clone(), s);
                    Some(s)
                }
                None => inner.positions.get(&tp).copied(),
            };
            // resumed one record early when that record is known: read again, it tells whether
            // the topic is the one the position was reached in
            // (only where every slice was this node's and nobody wrote it since: an id from before
            // another owner's tenure, in which the topic may have been created again, proves
            // nothing about the partition now)
            let early = start
                .filter(|s| *s > 0 && taken.quiet)
                .and_then(|s| {
                    inner
                        .last
                        .get(&tp)
                        .copied()
                        .filter(|l| l.record.offset == s - 1 && l.owners == taken.owners_before)
                })
                .map(|l| l.record);
            match early {
                Some(last) => {
                    inner
                        .verify
                        .insert(tp.clone(), (last, std::time::Instant::now()));
                    // the slices are written as the new owners from now: the id goes on naming
                    // the record the position follows for the next take-over, even if no record
                    // comes before it
                    let moved = LastApplied {
                        record: last,
                        owners: owners_now,
                    };
                    inner.last.insert(tp.clone(), moved);
                    let mut b = WriteBatch::default();
                    b.set_last_record(&tp.0, tp.1, moved);
                    if let Err(e) = self.store.apply(b) {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "storing the record an input position follows failed");
                    }
                }
                None => {
                    inner.verify.remove(&tp);
                }
            };
            inner.owners.insert(tp.clone(), owners_now);
            if let Some(s) = start {
                // a slice of a new table keeps what the partition's take-over found covered
                let covered = match taken.named {
                    Some(_) => inner.check_start.get(&tp).and_then(|c| c.covered),
                    None => taken.committed,
                };
                let cached = source::cached_watermarks(consumer, &tp.0, tp.1);
                inner.check_start.insert(
                    tp.clone(),
                    StartCheck {
                        start: s,
                        covered,
                        cached,
                        since: std::time::Instant::now(),
                        early: early.map(|l| l.offset),
                    },
                );
            }
            (start, early)
        };
        let offset = match early {
            Some(last) => Offset::Offset(last.offset),
            None => start.map_or(Offset::Beginning, Offset::Offset),
        };
        // resumed first, then moved: librdkafka's broker thread is woken by the seek, not by the
        // resume, so a resume last could leave a paused decision standing until its next wakeup
        // (~0.9 s in some restarts). Nothing fetched between the two reaches this thread: the seek
        // makes it outdated, and this thread polls only after
        resume(consumer, &done.topic, done.partition);
        if let Err(e) = consumer.seek(&done.topic, done.partition, offset, Duration::from_secs(5)) {
            tracing::warn!(topic = %done.topic, partition = done.partition, error = %e, "seek failed");
        }
        tracing::info!(topic = %done.topic, partition = done.partition, start = ?start, reads_again = ?early.map(|l| l.offset), slices = taken.slices.len(), "partition active");
        let acked = taken
            .slices
            .iter()
            .map(|(table, part, acked)| SliceAck {
                table: table.clone(),
                part: *part,
                acked: *acked,
                resets: self
                    .tables
                    .get(table)
                    .and_then(|t| t.read().slice(*part).map(|s| s.resets))
                    .unwrap_or(0),
            })
            .collect();
        Ok(Some(Checkpoint {
            rows: taken.replay,
            acked,
            ..Default::default()
        }))
    }

    /// The digest of the owners of `tp`'s slices held here (every table of its topic).
    fn owners_of(&self, tp: &(String, i32)) -> u64 {
        let part = u32::try_from(tp.1).unwrap_or(0);
        let owners: Vec<(String, crate::table::position::Owner)> = self
            .restorer
            .registry
            .tables_of(&tp.0)
            .into_iter()
            .map(|e| {
                let owner = self
                    .tables
                    .get(&e.table)
                    .and_then(|t| t.read().slice(part).map(|s| s.owner))
                    .unwrap_or_default();
                (e.table, owner)
            })
            .collect();
        owners_digest(owners.iter().map(|(t, o)| (t.as_str(), *o)))
    }

    fn retry(&self, _consumer: &BaseConsumer<SourceContext>, tp: &(String, i32)) {
        let job = {
            let mut inner = self.lock();
            let Some(PartState::Restoring { generation, .. }) = inner.states.get(tp).copied()
            else {
                return;
            };
            let id = inner.next_job;
            inner.next_job += 1;
            inner.states.insert(
                tp.clone(),
                PartState::Restoring {
                    generation,
                    job: id,
                },
            );
            Job::Take {
                id,
                topic: tp.0.clone(),
                partition: tp.1,
                generation,
                stored: inner.positions.get(tp).copied(),
            }
        };
        self.submit(job);
    }

    /// A slice this node no longer owns: the follower takes it (all-in-one), or it leaves memory.
    fn release_slice(&self, table: &str, part: u32) {
        let Some(t) = self.tables.get(table) else {
            return;
        };
        // the changelog position of a slice this node owned follows a record of its own tenure:
        // stored with the slice, it is read again where the slice is followed or taken next
        // (`crate::table::read_last`)
        let written = |s: &crate::table::state::Slice| {
            (s.mode == SliceMode::Owned && s.cl_next > 0)
                .then_some(ReadLast::Owner(s.cl_next - 1, s.owner))
        };
        let cl_topic = self.restorer.changelog.topic_for(table);
        let cl_part = i32::try_from(part).unwrap_or(0);
        let mut meta = None;
        match &self.follow {
            Some(_) => t.update_slices(|s| {
                let slice = s.slice_mut(part);
                let last = written(slice);
                slice.mode = SliceMode::Followed;
                meta = Some((SliceMeta::of(slice), last));
            }),
            None => {
                // the rows leave memory. At a clean stop (everything of the slice settles before
                // the process exits) the store keeps them as a followed slice, read up to its
                // changelog position, for this node's next start, which then reads only the
                // changelog's tail. Let go of while running, or not held here (absent: a restore
                // that did not end), the slice is forgotten as before: the next start or take
                // rebuilds it from the changelog
                let closing = self.closing.load(std::sync::atomic::Ordering::Acquire);
                let kept = t
                    .read()
                    .slice(part)
                    .filter(|s| closing && s.mode != SliceMode::Absent)
                    .map(|s| {
                        let mut m = SliceMeta::of(s);
                        m.owned = false;
                        m.kept_ms = Some(crate::table::checkpoint::now_ms());
                        (m, AckMeta::of(s), written(s))
                    });
                t.drop_slice(part);
                let mut b = WriteBatch::default();
                match kept {
                    Some((m, a, last)) => {
                        b.put_slice(table, part, &m);
                        b.put_acks(table, part, &a);
                        if let Some(last) = last {
                            b.set_changelog_read(&cl_topic, cl_part, last);
                        }
                    }
                    None => {
                        if let Some(s) = t.read().slice(part) {
                            b.put_slice(table, part, &SliceMeta::of(s));
                        }
                    }
                }
                if let Err(e) = self.store.apply(b) {
                    tracing::error!(table, part, error = %e, "recording a released slice failed");
                }
                let t = t.read();
                self.restorer
                    .metrics
                    .table_size(table, t.rows.len(), t.seq());
            }
        }
        if let Some((m, last)) = meta {
            let mut b = WriteBatch::default();
            b.put_slice(table, part, &m);
            if let Some(last) = last {
                b.set_changelog_read(&cl_topic, cl_part, last);
            }
            if let Err(e) = self.store.apply(b) {
                tracing::error!(table, part, error = %e, "recording a released slice failed");
            }
        }
        if let Some(f) = &self.follow {
            f.follow(table, part);
        }
    }

    /// The slices of tables fed by `topic` in `partition` that this node owns.
    fn owned_slices(&self, topic: &str, partition: i32) -> Vec<(String, u32)> {
        let part = u32::try_from(partition).unwrap_or(0);
        self.restorer
            .registry
            .tables_of(topic)
            .into_iter()
            .filter(|e| {
                self.tables.get(&e.table).is_some_and(|t| {
                    t.read()
                        .slice(part)
                        .is_some_and(|s| s.mode == SliceMode::Owned)
                })
            })
            .map(|e| (e.table, part))
            .collect()
    }
}

impl RebalanceListener for Partitions {
    fn start_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lock()
            .positions
            .get(&(topic.to_string(), partition))
            .copied()
    }

    fn assigned(
        &self,
        _consumer: &BaseConsumer<SourceContext>,
        parts: &[(String, i32)],
        generation: i32,
    ) {
        let (jobs, released) = {
            let mut inner = self.lock();
            let mut jobs = Vec::new();
            for tp in parts {
                let id = inner.next_job;
                inner.next_job += 1;
                inner.states.insert(
                    tp.clone(),
                    PartState::Restoring {
                        generation,
                        job: id,
                    },
                );
                jobs.push(Job::Take {
                    id,
                    topic: tp.0.clone(),
                    partition: tp.1,
                    generation,
                    stored: inner.positions.get(tp).copied(),
                });
            }
            let mut released = Vec::new();
            if !inner.assigned_once {
                inner.assigned_once = true;
                // slices of the last run whose partitions went elsewhere. Told by the tables'
                // own input topic: the registry may not be read yet at the first assignment
                // (it was asked here, found nothing, and every slice of the last run was let go
                // of, so a materialiser read its changelog from the beginning at each restart)
                let assigned: HashSet<(String, u32)> = inner
                    .unconfirmed
                    .iter()
                    .filter(|(table, part)| {
                        self.tables.get(table).is_some_and(|t| {
                            let source = t.read().source.clone();
                            let part = i32::try_from(*part).unwrap_or(i32::MAX);
                            parts
                                .iter()
                                .any(|(topic, p)| *topic == *source && *p == part)
                        })
                    })
                    .cloned()
                    .collect();
                let unconfirmed = std::mem::take(&mut inner.unconfirmed);
                for s in unconfirmed {
                    if assigned.contains(&s) {
                        inner.unconfirmed.insert(s);
                    } else {
                        released.push(s);
                    }
                }
            }
            (jobs, released)
        };
        for (table, part) in released {
            self.release_slice(&table, part);
        }
        for job in jobs {
            self.submit(job);
        }
    }

    fn revoking(&self, _consumer: &BaseConsumer<SourceContext>, parts: &[(String, i32)]) {
        let commit: Vec<(String, i32)> = {
            let mut inner = self.lock();
            // `last` stays: a take-over in this run checks it as at a restart (the owners it
            // was written as tell whether another node wrote the slices since)
            for tp in parts {
                inner.verify.remove(tp);
                inner.owners.remove(tp);
                inner.check_start.remove(tp);
            }
            parts
                .iter()
                .filter(|tp| matches!(inner.states.remove(*tp), Some(PartState::Active { .. })))
                .cloned()
                .collect()
        };
        // everything applied from these partitions becomes durable and committed first
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let positions = {
            let inner = self.lock();
            commit
                .iter()
                .filter_map(|tp| inner.positions.get(tp).map(|p| (tp.clone(), *p)))
                .collect()
        };
        let barrier = Checkpoint {
            positions,
            barrier: Some(Barrier {
                commit: commit.clone(),
                done: done_tx,
            }),
            ..Default::default()
        };
        let tx = self
            .checkpoint_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !self.closing.load(std::sync::atomic::Ordering::Acquire)
            && tx.is_some_and(|tx| tx.blocking_send(barrier).is_ok())
        {
            let deadline = std::time::Instant::now() + self.revoke_timeout;
            let mut done_rx = done_rx;
            loop {
                match done_rx.try_recv() {
                    Ok(()) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                        if std::time::Instant::now() > deadline {
                            tracing::warn!(partitions = ?commit, "revoked partitions not durable within the timeout; their outbox is produced again by the next owner's restore");
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        }
        for (topic, partition) in parts {
            for (table, part) in self.owned_slices(topic, *partition) {
                self.release_slice(&table, part);
            }
        }
    }
}

/// Runs restore jobs until the job channel closes; `workers` threads share the queue.
pub fn spawn_workers(
    restorer: Arc<Restorer>,
    consumer: Arc<BaseConsumer<SourceContext>>,
    jobs_rx: Receiver<Job>,
    done_tx: SyncSender<Done>,
    workers: usize,
    cancel: tokio_util::sync::CancellationToken,
) -> Vec<std::thread::JoinHandle<()>> {
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    (0..workers)
        .filter_map(|i| {
            let (restorer, consumer, jobs_rx, done_tx, cancel) = (
                restorer.clone(),
                consumer.clone(),
                jobs_rx.clone(),
                done_tx.clone(),
                cancel.clone(),
            );
            std::thread::Builder::new()
                .name(format!("livetable-restore-{i}"))
                .spawn(move || {
                    // connected before the first job: a restore at start-up does not wait for it
                    let mut reader = restorer.reader().ok();
                    loop {
                        let job = {
                            let rx = jobs_rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv_timeout(Duration::from_millis(200))
                        };
                        let job = match job {
                            Ok(j) => j,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                if cancel.is_cancelled() {
                                    return;
                                }
                                continue;
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        };
                        if reader.is_none() {
                            match restorer.reader() {
                                Ok(r) => reader = Some(r),
                                Err(e) => tracing::error!(error = %e, "cannot create a reader"),
                            }
                        }
                        let cancelled = || cancel.is_cancelled();
                        let done = match reader.as_ref() {
                            Some(r) => guarded_job(&restorer, &consumer, r, job, &cancelled),
                            // answered, so the ingest retries it (a job dropped here left its
                            // partition paused and restoring for good)
                            None => job.failed(RestoreError::Kafka(
                                rdkafka::error::KafkaError::ClientCreation(
                                    "cannot create a changelog reader".into(),
                                ),
                            )),
                        };
                        if done.result.is_err() && !cancel.is_cancelled() {
                            // a broker that is not there yet: do not spin
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        if done_tx.send(done).is_err() {
                            return;
                        }
                    }
                })
                .ok()
        })
        .collect()
}

/// [`run_job`], a panic in it answered as a fatal error: the node stops and says why (it left the
/// partition restoring for good, the node serving it frozen).
fn guarded_job(
    restorer: &Restorer,
    consumer: &BaseConsumer<SourceContext>,
    reader: &crate::cdc::source::Reader,
    job: Job,
    cancelled: &dyn Fn() -> bool,
) -> Done {
    let ids = job.failed(RestoreError::Panicked(String::new()));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_job(restorer, consumer, reader, job, cancelled)
    })) {
        Ok(done) => done,
        Err(panic) => Done {
            result: Err(RestoreError::Panicked(panic_message(&*panic))),
            ..ids
        },
    }
}

/// The text of a panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Job {
    /// This job answered with `error`.
    fn failed(&self, error: RestoreError) -> Done {
        let (id, topic, partition) = match self {
            Job::Take {
                id,
                topic,
                partition,
                ..
            }
            | Job::Slice {
                id,
                topic,
                partition,
                ..
            } => (*id, topic.clone(), *partition),
        };
        Done {
            id,
            topic,
            partition,
            result: Err(error),
        }
    }
}

fn run_job(
    restorer: &Restorer,
    consumer: &BaseConsumer<SourceContext>,
    reader: &crate::cdc::source::Reader,
    job: Job,
    cancelled: &dyn Fn() -> bool,
) -> Done {
    match job {
        Job::Take {
            id,
            topic,
            partition,
            generation,
            stored,
        } => {
            let result = take_partition(
                restorer, consumer, reader, &topic, partition, generation, stored, cancelled,
            );
            Done {
                id,
                topic,
                partition,
                result,
            }
        }
        Job::Slice {
            id,
            topic,
            partition,
            generation,
            table,
            schema,
        } => {
            let part = u32::try_from(partition).unwrap_or(0);
            let result = (|| {
                restorer.catch_up_registry(reader, cancelled)?;
                let entry = match restorer.entry_for(reader, &table, &topic, cancelled) {
                    Err(RestoreError::SourceConflict { .. }) if schema.is_some() => {
                        let qualified =
                            format!("{}.{}", schema.as_deref().unwrap_or_default(), table);
                        restorer.entry_for(reader, &qualified, &topic, cancelled)?
                    }
                    other => other?,
                };
                let taken = restorer.take_slice(reader, &entry, part, generation, cancelled)?;
                Ok(Taken {
                    start: None,
                    committed: None,
                    replay: taken.replay,
                    named: Some((table.clone(), entry.table.clone())),
                    slices: vec![(entry.table, part, taken.acked)],
                    // a partition paused in this run for a new table: nothing to check
                    quiet: false,
                    owners_before: 0,
                })
            })();
            Done {
                id,
                topic,
                partition,
                result,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn take_partition(
    restorer: &Restorer,
    consumer: &BaseConsumer<SourceContext>,
    reader: &crate::cdc::source::Reader,
    topic: &str,
    partition: i32,
    generation: i32,
    stored: Option<i64>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Taken, RestoreError> {
    restorer.catch_up_registry(reader, cancelled)?;
    let part = u32::try_from(partition).unwrap_or(0);
    let mut floor: Option<i64> = None;
    let mut replay = Vec::new();
    let mut slices = Vec::new();
    let mut rebuilt = false;
    let mut quiet = true;
    let mut before = Vec::new();
    for entry in restorer.registry.tables_of(topic) {
        let taken = restorer.take_slice(reader, &entry, part, generation, cancelled)?;
        rebuilt |= taken.rebuilt;
        quiet &= taken.quiet;
        before.push((entry.table.clone(), taken.before));
        floor = Some(floor.map_or(taken.acked + 1, |f: i64| f.min(taken.acked + 1)));
        replay.extend(taken.replay);
        slices.push((entry.table, part, taken.acked));
    }
    let committed = committed_offset(consumer, topic, partition);
    if rebuilt && stored.is_some() {
        tracing::info!(
            topic,
            partition,
            ?stored,
            ?floor,
            "a slice was rebuilt from the changelog alone: the stored input position is not used"
        );
    }
    let start = input_start(stored, committed, floor, rebuilt);
    tracing::info!(
        topic,
        partition,
        ?stored,
        ?committed,
        ?floor,
        ?start,
        "input start chosen"
    );
    Ok(Taken {
        start,
        committed: committed.filter(|&c| start.is_some_and(|s| c > s)),
        replay,
        named: None,
        quiet: quiet && !slices.is_empty() && !rebuilt,
        owners_before: owners_digest(before.iter().map(|(t, o)| (t.as_str(), *o))),
        slices,
    })
}

/// Where the input of a partition just taken over starts: this node's own position (`stored`) or
/// the lowest `acked + 1` of the slices restored from the changelog (`floor`), whichever is
/// further. The group's committed offset counts only when no slice of the partition exists yet:
/// a former owner that has not noticed its revoke (paused, cut off) may still commit past
/// changes whose changelog records landed after this node's fence, which every reader ignores,
/// and a broker may accept it (an older generation while the group re-forms). Starting there
/// would lose those changes for good; input below the committed offset is re-applied only where
/// newer than what the slices hold, so starting lower costs a re-read, never a value.
///
/// `rebuilt`: a slice was rebuilt from the changelog alone (this node's store held none of it: a
/// lost data directory, or a slice it let go of and took back in the same run): the stored position then promises nothing, since the changes
/// up to it whose records never reached the changelog went with the outbox.
fn input_start(
    stored: Option<i64>,
    committed: Option<i64>,
    floor: Option<i64>,
    rebuilt: bool,
) -> Option<i64> {
    let stored = stored.filter(|_| !rebuilt);
    match floor {
        Some(f) => Some(stored.map_or(f, |s| s.max(f))),
        None => [stored, committed].into_iter().flatten().max(),
    }
}

/// The group's committed offset of a partition (`None` when there is none or it cannot be read).
fn committed_offset(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    for _ in 0..5 {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(list) => {
                return list.elements().first().and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
            }
            Err(e) => {
                tracing::debug!(topic, partition, error = %e, "reading the committed offset failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    None
}

fn pause(consumer: &BaseConsumer<SourceContext>, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(topic, partition, error = %e, "pause failed");
    }
}

fn resume(consumer: &BaseConsumer<SourceContext>, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(topic, partition, error = %e, "resume failed");
    }
}

#[cfg(test)]
mod tests {
    use super::{input_start, StartCheck, FRESH_WATERMARKS};

    #[test]
    fn watermarks_cached_before_the_resume_are_not_taken_for_the_partitions() {
        let t0 = std::time::Instant::now();
        // this process fetched the partition long ago (its end was 1000); another owner took
        // it to 5001 since: resumed at 5001, the unchanged cache is not a recreated topic
        let check = StartCheck {
            start: 5001,
            covered: None,
            cached: Some((0, 1000)),
            since: t0,
            early: None,
        };
        assert!(check.stale((0, 1000), t0 + std::time::Duration::from_millis(300)));
        // a fetch answered: the new watermarks are the partition's
        assert!(!check.stale((0, 5001), t0 + std::time::Duration::from_millis(300)));
        // unchanged after a while of fetching: they are the partition's (a recreated topic
        // whose new end happens to equal the old cached one is still found)
        assert!(!check.stale((0, 1000), t0 + FRESH_WATERMARKS));
        // nothing cached at the resume: anything cached later comes from a fetch after it
        let fresh = StartCheck {
            cached: None,
            ..check
        };
        assert!(!fresh.stale((0, 1000), t0));
    }

    #[test]
    fn the_committed_offset_never_starts_a_partition_past_what_the_changelog_holds() {
        // a former owner committed 900 after writes this node's fence made everyone ignore
        assert_eq!(input_start(None, Some(900), Some(501), false), Some(501));
        assert_eq!(
            input_start(Some(700), Some(900), Some(501), false),
            Some(700)
        );
        assert_eq!(
            input_start(Some(300), Some(900), Some(501), false),
            Some(501)
        );
        // no slice yet (a table not registered): the group's offset is all there is
        assert_eq!(input_start(Some(10), Some(900), None, false), Some(900));
        assert_eq!(input_start(None, None, None, false), None);
    }

    #[test]
    fn a_slice_rebuilt_from_the_changelog_alone_starts_where_the_changelog_ends() {
        // a materialiser killed after storing position 3492 but before the changelog acknowledged
        // change 3489 restarts with no table state: starting at 3492 lost 3489 for good (chaos
        // seed 367300705, key k922)
        assert_eq!(
            input_start(Some(3492), Some(3488), Some(3485), true),
            Some(3485)
        );
        assert_eq!(
            input_start(Some(3492), Some(3488), Some(3485), false),
            Some(3492)
        );
    }
}
