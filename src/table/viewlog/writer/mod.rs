//! The writer of the views' topics: one thread per serving node with views. It joins the group
//! `<group-id>.views` (subscribed to every view's topic, one partition each), writes the views
//! whose partition it is assigned and stops writing a view when the group takes it away (see the
//! module doc of [`crate::table::viewlog`]). Its errors do not stop the node: a view it cannot
//! write is logged and counted, and the node serves on.

mod acks;
mod members;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use super::read::read_log;
use super::{
    topic, Commit, Mark, HEADER_DEF, HEADER_FLOOR, HEADER_MARK, HEADER_VIEW, HEADER_WRITER,
};
use crate::cdc::decode::Row;
use crate::cdc::source;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::changelog::{Changelog, ChangelogError};
use crate::table::checkpoint::is_permanent;
use crate::table::derived::{LogChange, Views};
use crate::table::readiness::Readiness;
use acks::{lock, Ack, ProducerCtx, Shared};
use members::MembersCtx;

/// Commits waiting for the writer; a view whose commit finds it full is written whole again.
pub const QUEUE: usize = 1024;
/// How long a record waits for room in the producer's queue before the view is marked for a
/// rewrite.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);
/// How long a view's topic sees no record before its newest floor is written.
const FLOOR_IDLE: Duration = Duration::from_millis(500);
/// A view is written whole at most this often (a view that keeps failing does not keep the
/// writer busy).
const REWRITE_EVERY: Duration = Duration::from_secs(1);
/// A take-over that could not read the view's topic is tried again after this long.
const TAKE_OVER_RETRY: Duration = Duration::from_secs(2);
/// Attempts to create a view's topic that the broker refuses before the view is left unwritten.
const CREATE_ATTEMPTS: u32 = 20;
/// How often the writer looks whether a view's topic was deleted (also after every revoke).
const TOPICS_CHECK_EVERY: Duration = Duration::from_secs(30);
/// Waits between replacements of a producer that keeps failing for good.
const RENEW_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RENEW_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a producer being replaced may take to end its requests.
const RENEW_FLUSH: Duration = Duration::from_secs(5);

/// What the writer keeps of a view it writes.
struct Writing {
    topic: String,
    /// Keys the topic holds a row for (as far as this writer sent).
    present: HashSet<String>,
    /// Tombstones read at the take-over whose mark names the change their key went with (a
    /// delta's, `table::derived`'s `reconcile.rs`): a whole rewrite sends them again with that
    /// mark, not the view's (until this writer sends the key again).
    tombs: HashMap<String, Arc<Mark>>,
    /// Commits up to this view position are in the last whole rewrite.
    synced: i64,
    /// The generation of this writing: a whole rewrite starts the next one ([`acks`]).
    gen: u64,
    last_rewrite: Option<Instant>,
    /// The floor the last record carried, the key it was for and when it was sent: once the
    /// view is idle and the floor moved on, that key's row is sent again with the new floor (a
    /// restore reads the floor of the topic's last record).
    floor_sent: Option<Arc<Mark>>,
    last_key: Option<String>,
    /// When that record was a tombstone, its mark (it is sent again with it).
    last_tomb: Option<Arc<Mark>>,
    last_sent: Instant,
}

/// The writer thread.
pub struct ViewLogWriter {
    pub config: Config,
    pub views: Arc<Views>,
    pub changelog: Arc<Changelog>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub rx: Receiver<Commit>,
    pub cancel: CancellationToken,
    /// Names this process in the records' writer header.
    pub writer_id: String,
}

impl ViewLogWriter {
    /// Runs until cancelled; an error is logged (the views' topics are then not written by this
    /// node) and never stops the node.
    pub fn run(self) {
        if let Err(e) = self.write() {
            tracing::error!(error = %e, "views writer stopped: this node writes no view's changelog topic until it restarts");
        }
    }

    fn write(&self) -> Result<(), KafkaError> {
        let views = self.views.log_views();
        let defs: HashMap<String, String> = views
            .iter()
            .map(|(name, _, def)| (name.clone(), def.clone()))
            .collect();
        let mut by_topic: HashMap<String, String> = views
            .iter()
            .map(|(name, _, _)| (topic(&self.config.changelog_prefix, name), name.clone()))
            .collect();
        let shared = Arc::new(Shared {
            flags: views.into_iter().map(|(n, f, _)| (n, f)).collect(),
            acked: Mutex::new(HashMap::new()),
            metrics: self.metrics.clone(),
            brokers: self.config.brokers.clone(),
            producer_gen: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
        });
        for name in shared.flags.keys() {
            self.metrics
                .view_log_writer
                .with_label_values(&[name])
                .set(0);
            self.metrics.view_log_rewrites.with_label_values(&[name]);
            self.metrics.view_log_recreated.with_label_values(&[name]);
            for outcome in ["sent", "failed"] {
                self.metrics
                    .view_log_records
                    .with_label_values(&[name, outcome]);
            }
        }
        let mut producer: Arc<BaseProducer<ProducerCtx>> = Arc::new(
            source::producer_config(&self.config)
                .create_with_context(ProducerCtx(shared.clone()))?,
        );
        // the topics exist before anyone subscribes; a broker not there yet is retried
        if !self.ensure_topics(&mut by_topic) {
            return Ok(());
        }
        // a node joins once it is ready: a writer that takes a view over writes it whole, and
        // should not write one far behind
        while !self.readiness.is_ready() {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let ctx = MembersCtx {
            shared: shared.clone(),
            producer: Mutex::new(producer.clone()),
            assigned: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
            by_topic: by_topic.clone(),
        };
        let members: BaseConsumer<MembersCtx> = self.members_config().create_with_context(ctx)?;
        let topics: Vec<&str> = by_topic.keys().map(String::as_str).collect();
        members.subscribe(&topics)?;
        let mut writing: HashMap<String, Writing> = HashMap::new();
        let mut retry: Vec<(String, Instant)> = Vec::new();
        let mut gen: u64 = 0;
        let mut topics_checked = Instant::now();
        // when the producer may be replaced next, and the wait after that
        let mut renew = (Instant::now(), RENEW_BACKOFF_MIN);
        while !self.cancel.is_cancelled() {
            let _ = members.poll(Duration::ZERO);
            producer.poll(Duration::ZERO);
            let revoked = std::mem::take(&mut *lock(&members.context().revoked));
            for t in &revoked {
                retry.retain(|(r, _)| r != t);
                if let Some(view) = by_topic.get(t) {
                    writing.remove(view);
                }
            }
            // a view's topic deleted under the group leaves its view unwritten: create it
            // again, and the group gives it to a member, which writes the whole view. A view
            // whose topic started over under this writer (deleted and created again, by this
            // node or another, before the group noticed) is taken over again: its floor and
            // keys were the old topic's
            let mut again: Vec<String> = {
                let acked = lock(&shared.acked);
                writing
                    .keys()
                    .filter(|v| acked.get(*v).is_some_and(|a| a.restarted))
                    .cloned()
                    .collect()
            };
            if !revoked.is_empty() || topics_checked.elapsed() >= TOPICS_CHECK_EVERY {
                topics_checked = Instant::now();
                for t in self.recreate_deleted(&by_topic, &producer) {
                    again.extend(by_topic.get(&t).cloned());
                }
            }
            let fenced = shared.fenced.swap(false, Ordering::AcqRel)
                || producer.client().fatal_error().is_some();
            if fenced && Instant::now() >= renew.0 {
                // the old producer's requests end first (delivered or failed): two producers
                // writing one partition at once is what some brokers refuse (Tansu)
                let _ = producer.flush(RENEW_FLUSH);
                match self.renew_producer(&shared) {
                    Some(p) => {
                        producer = p;
                        *lock(&members.context().producer) = producer.clone();
                        // fences the old producer reported while it was flushed are its own
                        shared.fenced.store(false, Ordering::Release);
                        // what the old one had not delivered failed (a failure holds the
                        // floor until a whole rewrite): every view it wrote is written whole
                        // again; a topic that started over is taken over again (above)
                        for (view, w) in writing.iter_mut() {
                            if let Some(f) = shared.flags.get(view) {
                                f.dirty.store(true, Ordering::Release);
                            }
                            w.last_rewrite = None;
                        }
                    }
                    None => shared.fenced.store(true, Ordering::Release),
                }
                // a producer that keeps failing is not replaced in a loop (the wait starts
                // again from its least after ten quiet minutes)
                if renew.0 + Duration::from_secs(600) < Instant::now() {
                    renew.1 = RENEW_BACKOFF_MIN;
                }
                renew.0 = Instant::now() + renew.1;
                renew.1 = (renew.1 * 2).min(RENEW_BACKOFF_MAX);
            } else if fenced {
                shared.fenced.store(true, Ordering::Release);
            }
            for view in again {
                if let Some(w) = writing.remove(&view) {
                    tracing::warn!(view = %view, topic = %w.topic, "views writer: the view's topic started over or its producer was replaced; taking the view over again");
                    // not at once: a broker that misreports offsets must not make the writer
                    // rewrite the view in a loop
                    retry.retain(|(t, _)| *t != w.topic);
                    retry.push((w.topic, Instant::now() + TAKE_OVER_RETRY));
                }
            }
            let now = Instant::now();
            let mut due: Vec<String> = std::mem::take(&mut *lock(&members.context().assigned));
            retry.retain(|(t, at)| {
                if *at <= now {
                    due.push(t.clone());
                    false
                } else {
                    true
                }
            });
            for t in due {
                let Some(view) = by_topic.get(&t) else {
                    continue;
                };
                gen += 1;
                match self.take_over(view, &t, &shared, gen) {
                    Some(w) => {
                        writing.insert(view.clone(), w);
                    }
                    None => retry.push((t, now + TAKE_OVER_RETRY)),
                }
            }
            for (view, w) in writing.iter_mut() {
                let def = defs.get(view).map_or("", String::as_str);
                let dirty = shared
                    .flags
                    .get(view)
                    .is_some_and(|f| f.dirty.load(Ordering::Acquire));
                let due = w.last_rewrite.is_none_or(|t| t.elapsed() >= REWRITE_EVERY);
                if dirty && due {
                    if let Some(f) = shared.flags.get(view) {
                        f.dirty.store(false, Ordering::Release);
                    }
                    gen += 1;
                    w.gen = gen;
                    self.rewrite(view, def, w, &producer, &shared);
                } else if !dirty {
                    self.carry_floor(view, def, w, &producer, &shared);
                }
            }
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(first) => {
                    let mut commits = vec![first];
                    while commits.len() < 256 {
                        match self.rx.try_recv() {
                            Ok(c) => commits.push(c),
                            Err(_) => break,
                        }
                    }
                    for c in commits {
                        let Some(w) = writing.get_mut(&*c.view) else {
                            continue; // not (or no longer) this node's
                        };
                        if c.off <= w.synced {
                            continue; // in the rewrite already
                        }
                        let def = defs.get(&*c.view).map_or("", String::as_str);
                        let n = c.changes.len();
                        for (i, change) in c.changes.into_iter().enumerate() {
                            let end = (i + 1 == n).then(|| c.base.clone());
                            if !self.send(&c.view, def, w, change, end, &producer, &shared) {
                                break;
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // leave the group now so that another node takes the views over at once
        members.unsubscribe();
        for _ in 0..10 {
            let _ = members.poll(Duration::from_millis(20));
        }
        let _ = producer.flush(Duration::from_secs(2));
        Ok(())
    }

    fn members_config(&self) -> ClientConfig {
        let mut c = source::client_config(&self.config);
        // the group's own settings win over `--kafka-prop` (given for the input's consumer)
        c.set("group.id", format!("{}.views", self.config.group_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "5000");
        c.remove("group.instance.id");
        c
    }

    /// Creates the views' topics, retrying until the broker answers; a topic the broker refuses
    /// [`CREATE_ATTEMPTS`] times (a name that collides with another topic, no permission) is
    /// dropped from `by_topic` with an error: its view is not written. False when cancelled.
    fn ensure_topics(&self, by_topic: &mut HashMap<String, String>) -> bool {
        let mut backoff = Duration::from_millis(100);
        let mut refused: HashMap<String, u32> = HashMap::new();
        let mut todo: Vec<String> = by_topic.keys().cloned().collect();
        todo.sort();
        while !todo.is_empty() {
            todo.retain(|t| match self.changelog.ensure_view(t) {
                Ok(()) => false,
                Err(e) => {
                    if matches!(e, ChangelogError::CreateTopic { .. }) {
                        let n = refused.entry(t.clone()).or_default();
                        *n += 1;
                        if *n >= CREATE_ATTEMPTS {
                            tracing::error!(topic = %t, error = %e, "the broker refuses to create a view's changelog topic; that view is not written (create the topic yourself: one partition, compacted)");
                            by_topic.remove(t);
                            return false;
                        }
                    }
                    if source::throttled("view-topics", Duration::from_secs(10)) {
                        tracing::warn!(topic = %t, error = %e, "cannot create a view's changelog topic yet; retrying");
                    }
                    true
                }
            });
            if todo.is_empty() {
                break;
            }
            if !self.pause(backoff) {
                return false;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        !by_topic.is_empty()
    }

    /// A new producer in place of one that failed for good (fenced, or a fatal error);
    /// `None` (tried again at the next turn) when it cannot be created.
    fn renew_producer(&self, shared: &Arc<Shared>) -> Option<Arc<BaseProducer<ProducerCtx>>> {
        match source::producer_config(&self.config).create_with_context(ProducerCtx(shared.clone()))
        {
            Ok(p) => {
                let gen = shared.producer_gen.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::warn!(generation = gen, "views writer: the producer was fenced or failed for good; replaced by a new one (the views it wrote are written whole again)");
                Some(Arc::new(p))
            }
            Err(e) => {
                if source::throttled("view-log-producer", Duration::from_secs(30)) {
                    tracing::error!(error = %e, "views writer: a new producer could not be created; retrying");
                }
                None
            }
        }
    }

    /// Creates again each view topic the broker's metadata (of all topics: asking for one
    /// topic could make a broker auto-create it with the wrong settings) no longer lists;
    /// returns the topics created (or found created meanwhile by another node).
    fn recreate_deleted(
        &self,
        by_topic: &HashMap<String, String>,
        producer: &BaseProducer<ProducerCtx>,
    ) -> Vec<String> {
        let Ok(md) = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
        else {
            return Vec::new(); // the broker does not answer now: looked at again later
        };
        let listed: HashSet<&str> = md.topics().iter().map(|t| t.name()).collect();
        let mut created = Vec::new();
        for (t, view) in by_topic {
            if listed.contains(t.as_str()) {
                continue;
            }
            self.changelog.forget(t);
            match self.changelog.ensure_view(t) {
                Ok(()) => {
                    tracing::warn!(view = %view, topic = %t, "a view's changelog topic was deleted: created again (the member given it writes the whole view)");
                    self.metrics
                        .view_log_recreated
                        .with_label_values(&[view])
                        .inc();
                    created.push(t.clone());
                }
                Err(e) => {
                    if source::throttled("view-topic-recreate", Duration::from_secs(30)) {
                        tracing::warn!(view = %view, topic = %t, error = %e, "a view's changelog topic was deleted and cannot be created yet; retrying");
                    }
                }
            }
        }
        created
    }

    /// Sleeps `d` unless cancelled first (false).
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.cancel.is_cancelled() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Reads what the topic holds and starts writing the view: whole first. `None` when the
    /// topic could not be read (tried again shortly).
    fn take_over(&self, view: &str, topic: &str, shared: &Shared, gen: u64) -> Option<Writing> {
        let reader = match source::reader(&self.config) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(view, error = %e, "views writer: no reader; trying again");
                return None;
            }
        };
        let cancel = self.cancel.clone();
        // rows of another definition are told apart (a view restored here refuses them)
        let def = self.views.log_def(view);
        let content = match read_log(
            &reader,
            topic,
            def.as_deref(),
            self.config.restore_stall,
            &self.config.brokers,
            &move || cancel.is_cancelled(),
        ) {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(view, error = %e, "views writer: the view's topic could not be read; trying again");
                return None;
            }
        };
        {
            let mut acked = lock(&shared.acked);
            // this writer's own floor starts with its first acknowledged rewrite: a floor
            // names what its writer had acknowledged, and rows of another writer count only to
            // their own marks; a late acknowledgement of this node's earlier tenure (an older
            // generation) moves nothing
            acked.insert(
                view.to_string(),
                acks::Acked {
                    failed: Some(gen),
                    since_gen: gen,
                    ..Default::default()
                },
            );
        }
        // a view whose topic could not be read at start is restored from it now, before the
        // whole rewrite below replaces what the topic holds
        self.views.restore_unread(view, &content);
        // tombstones included: a key the topic deleted is sent its tombstone again if a rewrite
        // finds it gone (harmless), and a tombstone another writer had in flight is not lost
        let present = content.rows.keys().cloned().collect();
        let tombs = content
            .rows
            .iter()
            .filter(|(k, (row, mark, _))| {
                row.is_none() && mark.at.is_some() && !content.other_def.contains(*k)
            })
            .map(|(k, (_, mark, _))| (k.clone(), mark.clone()))
            .collect();
        if let Some(f) = shared.flags.get(view) {
            // writes first, then the rewrite's snapshot: a commit between the two is in both
            // and dropped from the queue as older than the rewrite
            f.writes.store(true, Ordering::Release);
            f.dirty.store(true, Ordering::Release);
        }
        self.metrics
            .view_log_writer
            .with_label_values(&[view])
            .set(1);
        tracing::info!(
            view,
            topic,
            rows = content.rows.len(),
            "views writer: writing the view"
        );
        Some(Writing {
            topic: topic.to_string(),
            present,
            tombs,
            synced: i64::MIN,
            gen,
            last_rewrite: None,
            floor_sent: None,
            last_key: None,
            last_tomb: None,
            last_sent: Instant::now(),
        })
    }

    /// Once the view was idle for [`FLOOR_IDLE`] and its floor moved past the one its last
    /// record carried, sends the current row of the last key written again, with the new floor.
    fn carry_floor(
        &self,
        view: &str,
        def: &str,
        w: &mut Writing,
        producer: &BaseProducer<ProducerCtx>,
        shared: &Shared,
    ) {
        if w.last_sent.elapsed() < FLOOR_IDLE {
            return;
        }
        let Some(key) = w.last_key.clone() else {
            return;
        };
        let floor = shared.floor(view);
        if floor.as_deref() == w.floor_sent.as_deref() {
            return;
        }
        let Some(mut change) = self.views.log_row(view, &key) else {
            return;
        };
        if let (None, None, Some(m)) = (&change.1, change.2.at, &w.last_tomb) {
            // a tombstone again: with the mark it was sent with when the view no longer names
            // the change its key went with (a delta's, forgotten once the input passed it)
            change.2 = m.clone();
        }
        let view: Arc<str> = view.into();
        self.send(&view, def, w, change, None, producer, shared);
    }

    /// Writes the whole view: every row, and a tombstone for each key the topic holds (or whose
    /// tombstone was not acknowledged) that the view does not.
    fn rewrite(
        &self,
        view: &str,
        def: &str,
        w: &mut Writing,
        producer: &BaseProducer<ProducerCtx>,
        shared: &Shared,
    ) {
        w.last_rewrite = Some(Instant::now());
        let Some((off, base, rows)) = self.views.log_snapshot(view) else {
            // a view over a table not fed yet: try again later
            if let Some(f) = shared.flags.get(view) {
                f.dirty.store(true, Ordering::Release);
            }
            return;
        };
        let unacked: HashMap<String, Arc<Mark>> = lock(&shared.acked)
            .get(view)
            .map(|a| a.gone_unacked.clone())
            .unwrap_or_default();
        let gone = tombstones(&rows, w, &unacked, &base);
        let mut all = rows;
        all.extend(gone);
        if all.is_empty() {
            w.synced = off;
            return;
        }
        self.metrics
            .view_log_rewrites
            .with_label_values(&[view])
            .inc();
        let n = all.len();
        let view: Arc<str> = view.into();
        let mut ok = true;
        for (i, change) in all.into_iter().enumerate() {
            if self.cancel.is_cancelled() {
                ok = false;
                break;
            }
            let end = (i + 1 == n).then(|| base.clone());
            if !self.send(&view, def, w, change, end, producer, shared) {
                ok = false;
                break;
            }
        }
        if ok {
            w.synced = off;
        }
    }

    /// Drops the floor of `view` when its input started over since the last record (the flag
    /// is set, under the view's lock, before any mark of the new offsets exists: a record whose
    /// mark names them finds it set), and asks for a rewrite in a later generation, whose
    /// acknowledgement gives the floor of the new offsets.
    fn take_input_reset(view: &str, w: &Writing, shared: &Shared) {
        let Some(flags) = shared.flags.get(view) else {
            return;
        };
        if flags.input_reset.swap(false, Ordering::AcqRel) {
            shared.drop_floor(view, w.gen);
            flags.dirty.store(true, Ordering::Release);
        }
    }

    /// Produces one record. False (and the view marked for a rewrite) when the producer's queue
    /// stayed full or refused it for now; a record that can never be produced (too large) is
    /// left out (counted, logged, the floor stops) and true is returned.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        view: &Arc<str>,
        def: &str,
        w: &mut Writing,
        (key, row, mark): LogChange,
        last: Option<Arc<Mark>>,
        producer: &BaseProducer<ProducerCtx>,
        shared: &Shared,
    ) -> bool {
        let value: Option<Vec<u8>> = row
            .as_deref()
            .map(|r: &Row| serde_json::to_vec(r).unwrap_or_default());
        let mark_json = mark.to_json();
        Self::take_input_reset(view, w, shared);
        let floor_mark = shared.floor(view);
        let floor = floor_mark.as_ref().map(|f| f.to_json());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_VIEW,
                value: Some(view.as_bytes()),
            })
            .insert(Header {
                key: HEADER_MARK,
                value: Some(mark_json.as_bytes()),
            })
            .insert(Header {
                key: HEADER_DEF,
                value: Some(def.as_bytes()),
            })
            .insert(Header {
                key: HEADER_WRITER,
                value: Some(self.writer_id.as_bytes()),
            });
        if let Some(f) = &floor {
            headers = headers.insert(Header {
                key: HEADER_FLOOR,
                value: Some(f.as_bytes()),
            });
        }
        let gone = value.is_none().then(|| (key.clone(), mark.clone()));
        if let Some((k, m)) = &gone {
            lock(&shared.acked)
                .entry(view.to_string())
                .or_default()
                .gone_unacked
                .insert(k.clone(), m.clone());
        }
        let mut ack = Box::new(Ack {
            view: view.clone(),
            gen: w.gen,
            last,
            gone,
            producer_gen: shared.producer_gen.load(Ordering::Acquire),
        });
        let started = Instant::now();
        loop {
            let mut record = BaseRecord::with_opaque_to(&w.topic, ack)
                .key(key.as_bytes())
                .partition(0)
                .headers(headers.clone());
            if let Some(v) = &value {
                record = record.payload(v);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if started.elapsed() < QUEUE_FULL_WAIT && !self.cancel.is_cancelled() =>
                {
                    ack = r.delivery_opaque;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => {
                    let permanent = is_permanent(&e);
                    self.metrics
                        .view_log_records
                        .with_label_values(&[view, "failed"])
                        .inc();
                    shared.failed(
                        view,
                        w.gen,
                        permanent,
                        value.is_none().then_some((key.as_str(), &mark)),
                    );
                    if source::throttled("view-log-produce", Duration::from_secs(10)) {
                        tracing::warn!(view = %view, key, error = %e, permanent, "a view's changelog record could not be produced (a record too large is left out; otherwise the view is written whole again)");
                    }
                    return permanent;
                }
            }
        }
        if value.is_some() {
            w.present.insert(key.clone());
        } else {
            w.present.remove(&key);
        }
        w.tombs.remove(&key);
        w.floor_sent = floor_mark;
        w.last_tomb = value.is_none().then_some(mark);
        w.last_key = Some(key);
        w.last_sent = Instant::now();
        true
    }
}

/// The tombstones of a whole rewrite whose rows are `rows`: one for each key the topic holds (as
/// far as `w` knows) or whose tombstone was not acknowledged (`unacked`, with the mark it was
/// sent with) that `rows` lacks. Each has the mark its last tombstone had when known (sent, or
/// read at the take-over naming the change its key went with), else the view's mark `base`.
fn tombstones(
    rows: &[LogChange],
    w: &Writing,
    unacked: &HashMap<String, Arc<Mark>>,
    base: &Arc<Mark>,
) -> Vec<LogChange> {
    let keys: HashSet<&String> = rows.iter().map(|(k, _, _)| k).collect();
    let mut marks: HashMap<&String, &Arc<Mark>> = HashMap::new();
    for k in w.present.iter().filter(|k| !keys.contains(k)) {
        marks.insert(k, w.tombs.get(k).unwrap_or(base));
    }
    for (k, m) in unacked.iter().filter(|(k, _)| !keys.contains(k)) {
        marks.insert(k, m);
    }
    let mut gone: Vec<LogChange> = marks
        .into_iter()
        .map(|(k, m)| (k.clone(), None, m.clone()))
        .collect();
    gone.sort_by(|a, b| a.0.cmp(&b.0));
    gone
}

#[cfg(test)]
mod tests;
