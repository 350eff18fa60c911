//! The writer of the views' topics: one thread per serving node with views. It joins the group
//! `<group-id>.views` (subscribed to every view's topic, one partition each, spread over the
//! members round-robin), writes the views whose partition it is assigned and stops writing a
//! view when the group takes it away (see the module doc of [`crate::table::viewlog`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::read::read_log;
use super::{topic, Commit, LogFlags, Mark, HEADER_FLOOR, HEADER_MARK, HEADER_VIEW, HEADER_WRITER};
use crate::cdc::decode::Row;
use crate::cdc::source;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::changelog::Changelog;
use crate::table::derived::{LogChange, Views};
use crate::table::readiness::Readiness;

/// Commits waiting for the writer; a view whose commit finds it full is written whole again.
pub const QUEUE: usize = 1024;
/// How long a revoke waits for what was sent to be acknowledged.
const REVOKE_FLUSH: Duration = Duration::from_secs(5);
/// How long a record waits for room in the producer's queue before the view is marked for a
/// rewrite.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);
/// How long a view's topic sees no record before its newest floor is written.
const FLOOR_IDLE: Duration = Duration::from_millis(500);

/// What the delivery callbacks know of each view.
#[derive(Default)]
struct Acked {
    /// The mark of the last commit whose records were all acknowledged (records of a partition
    /// are acknowledged in order), while nothing failed since the last whole rewrite.
    floor: Option<Arc<Mark>>,
    broken: bool,
}

struct Shared {
    flags: HashMap<String, Arc<LogFlags>>,
    acked: Mutex<HashMap<String, Acked>>,
    metrics: Arc<Metrics>,
    brokers: String,
}

impl Shared {
    fn floor(&self, view: &str) -> Option<Arc<Mark>> {
        lock(&self.acked).get(view).and_then(|a| a.floor.clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The delivery report's opaque: the view, and on the last record of a commit its mark.
struct Ack {
    view: Arc<str>,
    last: Option<Arc<Mark>>,
    rewrite: bool,
}

struct ProducerCtx(Arc<Shared>);

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        source::log_librdkafka(&self.0.brokers, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        source::error_librdkafka(&self.0.brokers, error, reason);
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        let ok = result.is_ok();
        self.0
            .metrics
            .view_log_records
            .with_label_values(&[&*ack.view, if ok { "sent" } else { "failed" }])
            .inc();
        let mut all = lock(&self.0.acked);
        let a = all.entry(ack.view.to_string()).or_default();
        if !ok {
            a.broken = true;
            if let Some(f) = self.0.flags.get(&*ack.view) {
                f.dirty.store(true, Ordering::Release);
            }
            if source::throttled("view-log-delivery", Duration::from_secs(10)) {
                if let Err((e, _)) = result {
                    tracing::warn!(view = %ack.view, error = %e, "a view's changelog record was not delivered; the view is written whole again");
                }
            }
            return;
        }
        if let Some(mark) = &ack.last {
            if ack.rewrite {
                a.broken = false;
            }
            if !a.broken {
                a.floor = Some(mark.clone());
            }
        }
    }
}

struct MembersCtx {
    shared: Arc<Shared>,
    producer: Arc<BaseProducer<ProducerCtx>>,
    /// View topics assigned since the writer last looked, by topic.
    assigned: Mutex<Vec<String>>,
    revoked: Mutex<Vec<String>>,
    by_topic: HashMap<String, String>,
}

impl MembersCtx {
    fn stop_writing(&self, topics: &[String]) {
        for t in topics {
            if let Some(view) = self.by_topic.get(t) {
                if let Some(f) = self.shared.flags.get(view) {
                    f.writes.store(false, Ordering::Release);
                }
                self.shared
                    .metrics
                    .view_log_writer
                    .with_label_values(&[view])
                    .set(0);
            }
        }
        // what was sent reaches the broker before the next member writes
        let _ = self.producer.flush(REVOKE_FLUSH);
        lock(&self.revoked).extend(topics.iter().cloned());
    }
}

impl ClientContext for MembersCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        source::log_librdkafka(&self.shared.brokers, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        source::error_librdkafka(&self.shared.brokers, error, reason);
    }
}

impl ConsumerContext for MembersCtx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let topics: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| e.topic().to_string())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "views writer: assignment failed");
                    return;
                }
                // membership only: nothing is read
                let _ = consumer.pause(tpl);
                tracing::info!(topics = ?topics, "views writer: views assigned");
                lock(&self.assigned).extend(topics);
            }
            _ => {
                let all: Vec<String> = match err {
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => topics,
                    _ => self.by_topic.keys().cloned().collect(),
                };
                tracing::info!(topics = ?all, "views writer: views revoked");
                self.stop_writing(&all);
                let _ = consumer.unassign();
            }
        }
    }
}

/// What the writer keeps of a view it writes.
struct Writing {
    topic: String,
    /// Keys the topic holds a row for (as far as this writer knows).
    present: HashSet<String>,
    /// Commits up to this view position are in the last whole rewrite.
    synced: i64,
    /// The floor the last record carried, the key it was for and when it was sent: once the
    /// view is idle and the floor moved on, that key's row is sent again with the new floor (a
    /// restore reads the floor of the topic's last record).
    floor_sent: Option<Arc<Mark>>,
    last_key: Option<String>,
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
    pub fn run(self) -> Result<(), KafkaError> {
        let views = self.views.log_views();
        let by_topic: HashMap<String, String> = views
            .iter()
            .map(|(name, _)| (topic(&self.config.changelog_prefix, name), name.clone()))
            .collect();
        let shared = Arc::new(Shared {
            flags: views.into_iter().collect(),
            acked: Mutex::new(HashMap::new()),
            metrics: self.metrics.clone(),
            brokers: self.config.brokers.clone(),
        });
        for name in shared.flags.keys() {
            self.metrics
                .view_log_writer
                .with_label_values(&[name])
                .set(0);
            self.metrics.view_log_rewrites.with_label_values(&[name]);
            for outcome in ["sent", "failed"] {
                self.metrics
                    .view_log_records
                    .with_label_values(&[name, outcome]);
            }
        }
        let producer: Arc<BaseProducer<ProducerCtx>> = Arc::new(
            source::producer_config(&self.config)
                .create_with_context(ProducerCtx(shared.clone()))?,
        );
        // the topics exist before anyone subscribes; a broker not there yet is retried
        if !self.ensure_topics(by_topic.keys()) {
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
            producer: producer.clone(),
            assigned: Mutex::new(Vec::new()),
            revoked: Mutex::new(Vec::new()),
            by_topic: by_topic.clone(),
        };
        let members: BaseConsumer<MembersCtx> = self.members_config().create_with_context(ctx)?;
        let topics: Vec<&str> = by_topic.keys().map(String::as_str).collect();
        members.subscribe(&topics)?;
        let mut writing: HashMap<String, Writing> = HashMap::new();
        while !self.cancel.is_cancelled() {
            let _ = members.poll(Duration::ZERO);
            producer.poll(Duration::ZERO);
            for t in std::mem::take(&mut *lock(&members.context().revoked)) {
                if let Some(view) = by_topic.get(&t) {
                    writing.remove(view);
                }
            }
            for t in std::mem::take(&mut *lock(&members.context().assigned)) {
                let Some(view) = by_topic.get(&t) else {
                    continue;
                };
                if let Some(w) = self.take_over(view, &t, &shared) {
                    writing.insert(view.clone(), w);
                }
            }
            for (view, w) in writing.iter_mut() {
                let dirty = shared
                    .flags
                    .get(view)
                    .is_some_and(|f| f.dirty.swap(false, Ordering::AcqRel));
                if dirty {
                    self.rewrite(view, w, &producer, &shared);
                } else {
                    self.carry_floor(view, w, &producer, &shared);
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
                        let n = c.changes.len();
                        for (i, change) in c.changes.into_iter().enumerate() {
                            let end = (i + 1 == n).then(|| c.base.clone());
                            if !self.send(&c.view, w, change, end, false, &producer, &shared) {
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
        let _ = producer.flush(Duration::from_secs(3));
        Ok(())
    }

    fn members_config(&self) -> ClientConfig {
        let mut c = source::client_config(&self.config);
        c.set("group.id", format!("{}.views", self.config.group_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "roundrobin")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "5000");
        for (k, v) in &self.config.kafka_props {
            c.set(k, v);
        }
        c
    }

    /// Creates the views' topics, retrying until the broker answers; false when cancelled.
    fn ensure_topics<'a>(&self, topics: impl Iterator<Item = &'a String> + Clone) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let r: Result<(), _> = topics
                .clone()
                .try_for_each(|t| self.changelog.ensure_view(t));
            match r {
                Ok(()) => return true,
                Err(e) => {
                    if source::throttled("view-topics", Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "cannot create the views' changelog topics; retrying");
                    }
                }
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if self.cancel.is_cancelled() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Reads what the topic holds and starts writing the view: whole first.
    fn take_over(&self, view: &str, topic: &str, shared: &Shared) -> Option<Writing> {
        let reader = match source::reader(&self.config) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(view, error = %e, "views writer: no reader; the view is not written");
                return None;
            }
        };
        let cancel = self.cancel.clone();
        let content = match read_log(
            &reader,
            topic,
            self.config.restore_stall,
            &self.config.brokers,
            &move || cancel.is_cancelled(),
        ) {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(view, error = %e, "views writer: the view's topic could not be read; the view is not written until it is assigned again");
                return None;
            }
        };
        {
            let mut acked = lock(&shared.acked);
            let a = acked.entry(view.to_string()).or_default();
            // this writer's own floor starts with its first acknowledged rewrite: a floor
            // names what its writer had acknowledged, and rows of another writer count only to
            // their own marks
            a.floor = None;
            a.broken = false;
        }
        let present = content.live_rows().map(|(k, _)| k.clone()).collect();
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
            synced: i64::MIN,
            floor_sent: None,
            last_key: None,
            last_sent: Instant::now(),
        })
    }

    /// Once the view was idle for [`FLOOR_IDLE`] and its floor moved past the one its last
    /// record carried, sends the current row of the last key written again, with the new floor.
    fn carry_floor(
        &self,
        view: &str,
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
        let Some(change) = self.views.log_row(view, &key) else {
            return;
        };
        let view: Arc<str> = view.into();
        self.send(&view, w, change, None, false, producer, shared);
    }

    /// Writes the whole view: every row, and a tombstone for each key the topic holds that the
    /// view does not.
    fn rewrite(
        &self,
        view: &str,
        w: &mut Writing,
        producer: &BaseProducer<ProducerCtx>,
        shared: &Shared,
    ) {
        let Some((off, base, rows)) = self.views.log_snapshot(view) else {
            // a view over a table not fed yet: try again later
            if let Some(f) = shared.flags.get(view) {
                f.dirty.store(true, Ordering::Release);
            }
            return;
        };
        let keys: HashSet<&String> = rows.iter().map(|(k, _, _)| k).collect();
        let mut gone: Vec<LogChange> = w
            .present
            .iter()
            .filter(|k| !keys.contains(k))
            .map(|k| (k.clone(), None, base.clone()))
            .collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
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
            let end = (i + 1 == n).then(|| base.clone());
            if !self.send(&view, w, change, end, true, producer, shared) {
                ok = false;
                break;
            }
        }
        if ok {
            w.synced = off;
        }
    }

    /// Produces one record; false (and the view marked for a rewrite) when the producer's queue
    /// stayed full.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        view: &Arc<str>,
        w: &mut Writing,
        (key, row, mark): LogChange,
        last: Option<Arc<Mark>>,
        rewrite: bool,
        producer: &BaseProducer<ProducerCtx>,
        shared: &Shared,
    ) -> bool {
        let value: Option<Vec<u8>> = row
            .as_deref()
            .map(|r: &Row| serde_json::to_vec(r).unwrap_or_default());
        let mark_json = mark.to_json();
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
                key: HEADER_WRITER,
                value: Some(self.writer_id.as_bytes()),
            });
        if let Some(f) = &floor {
            headers = headers.insert(Header {
                key: HEADER_FLOOR,
                value: Some(f.as_bytes()),
            });
        }
        let mut ack = Box::new(Ack {
            view: view.clone(),
            last,
            rewrite,
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
                    tracing::warn!(view = %view, error = %e, "a view's changelog record could not be produced; the view is written whole again");
                    if let Some(f) = shared.flags.get(&**view) {
                        f.dirty.store(true, Ordering::Release);
                    }
                    lock(&shared.acked)
                        .entry(view.to_string())
                        .or_default()
                        .broken = true;
                    return false;
                }
            }
        }
        if value.is_some() {
            w.present.insert(key.clone());
        } else {
            w.present.remove(&key);
        }
        w.floor_sent = floor_mark;
        w.last_key = Some(key);
        w.last_sent = Instant::now();
        true
    }
}
