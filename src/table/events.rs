//! The reader of `events` topics (views file `format = "events"`): every serving node reads every
//! partition of each such topic, outside any consumer group, and feeds the events to the views
//! that read the topic ([`Views::feed_events`]). It starts where the views' state saved by the
//! last clean stop left off; else it first restores the views from their changelog topics
//! ([`crate::table::viewlog`]) and starts where their rows say; else at the beginning: such a
//! view then covers the events the topic retains (keep such topics' retention as long as the view
//! must remember). The order of
//! events across partitions is the order they are read in, which may differ between nodes and
//! runs (`latest` and ties of `max_by`/`min_by` across partitions may differ; within a partition,
//! hence for one key, the order is the topic's). Until every partition was read to the
//! high watermark first seen, the node is not ready (`/readyz` says `events: ...`).
//!
//! A record that is not a JSON object is skipped and counted
//! (`livetable_decode_errors_total{reason="event_not_an_object"|"event_not_json"}`); an events topic
//! has no table and no dead-letter entry of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::cdc::source::{self, Reader};
use crate::metrics::Metrics;
use crate::table::derived::{Event, Views};
use crate::table::readiness::Readiness;
use crate::table::viewlog::{self, read::read_log};
use crate::views::input::{decode_event, InputError};

/// Most records fed to the views in one commit.
const MAX_BATCH: usize = 2048;
/// How often the topics' partition counts are looked up again.
const METADATA_EVERY: Duration = Duration::from_secs(5);

/// One declared events topic.
#[derive(Debug, Clone)]
pub struct EventsTopic {
    pub topic: String,
    /// The name views use in `from`.
    pub name: String,
    pub key: Option<Vec<String>>,
}

/// Reads the events topics until cancelled.
pub struct EventsReader {
    pub reader: Reader,
    pub topics: Vec<EventsTopic>,
    pub views: Arc<Views>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    pub brokers: String,
    /// The changelog prefix: the views' topics are `<prefix>__view.<name>`.
    pub view_topic_prefix: String,
    pub restore_stall: Duration,
}

/// Per assigned partition: the next offset to read, and the end to reach before the first
/// readiness (the high watermark first seen; `None` until a fetch answered).
struct Part {
    next: i64,
    target: Option<i64>,
}

impl EventsReader {
    pub fn run(self) {
        let by_topic: HashMap<&str, &EventsTopic> =
            self.topics.iter().map(|t| (t.topic.as_str(), t)).collect();
        let mut parts: HashMap<(String, i32), Part> = HashMap::new();
        let mut last_metadata: Option<Instant> = None;
        let mut caught_up = false;
        // every topic's metadata answered once (a topic that does not exist is empty: read)
        let mut known = false;
        self.readiness
            .set_events(false, "restoring views from their changelog topics");
        self.restore_views();
        self.readiness
            .set_events(false, "reading the events topics from their beginning");
        while !self.cancel.is_cancelled() {
            if last_metadata.is_none_or(|t| t.elapsed() > METADATA_EVERY) {
                last_metadata = Some(Instant::now());
                let (added, answered) = self.discover(&mut parts);
                known |= answered;
                if added {
                    self.assign(&parts);
                }
            }
            let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
            match self.reader.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => tracing::debug!(error = %e, "events reader: consumer error"),
                None => {}
            }
            while !batch.is_empty() && batch.len() < MAX_BATCH {
                match self.reader.poll(Duration::ZERO) {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => tracing::debug!(error = %e, "events reader: consumer error"),
                    None => break,
                }
            }
            let idle = batch.is_empty();
            self.apply(&batch, &by_topic, &mut parts);
            drop(batch);
            if idle {
                // after an idle poll nothing fetched waits: the fetch position is what was read
                // (past transaction markers, which are not records)
                self.raise_to_position(&mut parts, &by_topic);
            }
            if !caught_up && known {
                caught_up = self.check_caught_up(&mut parts);
            }
        }
    }

    /// Restores the views over events that nothing saved from their changelog topics, before
    /// the events are read (a view whose topic does not exist or cannot be used is computed from
    /// the events the topic retains). A broker that does not answer is waited for: reading the
    /// events from their beginning instead would lose what the topic no longer retains.
    fn restore_views(&self) {
        for name in self.views.restorable_from_logs() {
            let topic = viewlog::topic(&self.view_topic_prefix, &name);
            let mut backoff = Duration::from_millis(200);
            let content = loop {
                if self.cancel.is_cancelled() {
                    return;
                }
                let cancel = self.cancel.clone();
                let def = self.views.log_def(&name);
                match read_log(
                    &self.reader,
                    &topic,
                    def.as_deref(),
                    self.restore_stall,
                    &self.brokers,
                    &move || cancel.is_cancelled(),
                ) {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(view = %name, topic, error = %e, "cannot read the view's changelog topic yet; retrying");
                        self.readiness
                            .set_events(false, &format!("restoring view {name} from {topic}: {e}"));
                        let until = Instant::now() + backoff;
                        while Instant::now() < until && !self.cancel.is_cancelled() {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let Some(content) = content else {
                tracing::info!(view = %name, topic, "the view has no changelog topic yet; it is computed from the events");
                continue;
            };
            let (records, bad, rows) = (content.records, content.bad, content.rows.len());
            let other_def = content.other_def.len();
            if self.views.restore_from_log(&name, content) {
                tracing::info!(view = %name, topic, records, rows, "view restored from its changelog topic");
            } else if bad > 0 {
                tracing::warn!(view = %name, topic, records, bad, "the view's changelog topic holds records that cannot be read; the view is computed from the events");
            } else if other_def > 0 {
                tracing::warn!(view = %name, topic, rows = other_def, "the view's changelog topic holds rows of another definition of the view; the view is computed from the events");
            }
        }
    }

    /// Looks up each topic's partitions: whether new ones appeared, and whether the broker
    /// answered for every topic.
    fn discover(&self, parts: &mut HashMap<(String, i32), Part>) -> (bool, bool) {
        let mut added = false;
        let mut answered = true;
        for t in &self.topics {
            let md = match self
                .reader
                .fetch_metadata(Some(&t.topic), Duration::from_secs(2))
            {
                Ok(md) => md,
                Err(e) => {
                    answered = false;
                    if source::throttled("events-metadata", Duration::from_secs(10)) {
                        tracing::warn!(topic = %t.topic, error = %e, brokers = %self.brokers, "events topic: no metadata yet");
                    }
                    continue;
                }
            };
            for mt in md.topics() {
                if mt.error().is_some() {
                    if source::throttled("events-topic-missing", Duration::from_secs(30)) {
                        tracing::warn!(topic = %t.topic, "events topic does not exist (yet); its views stay empty until it does");
                    }
                    continue;
                }
                for p in mt.partitions() {
                    let key = (t.topic.clone(), p.id());
                    if let std::collections::hash_map::Entry::Vacant(e) = parts.entry(key) {
                        // where the views' saved state left off (0: the beginning)
                        e.insert(Part {
                            next: self.views.events_start(&t.name, p.id()),
                            target: None,
                        });
                        added = true;
                    }
                }
            }
        }
        (added, answered)
    }

    fn assign(&self, parts: &HashMap<(String, i32), Part>) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), part) in parts {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(part.next));
        }
        if let Err(e) = self.reader.assign(&tpl) {
            tracing::warn!(error = %e, "events reader: assign failed");
        }
    }

    fn apply(
        &self,
        batch: &[BorrowedMessage<'_>],
        by_topic: &HashMap<&str, &EventsTopic>,
        parts: &mut HashMap<(String, i32), Part>,
    ) {
        // per input name, its events in order
        let mut events: HashMap<&str, Vec<Event>> = HashMap::new();
        for m in batch {
            let Some(t) = by_topic.get(m.topic()) else {
                continue;
            };
            let key = (m.topic().to_string(), m.partition());
            let Some(part) = parts.get_mut(&key) else {
                continue;
            };
            if m.offset() < part.next {
                continue;
            }
            part.next = m.offset() + 1;
            let outcome = match decode_event(m.key(), m.payload(), t.key.as_deref()) {
                Ok(Some(e)) => {
                    events.entry(t.name.as_str()).or_default().push(Event {
                        key: e.key,
                        row: e.row,
                        kafka_ts_ms: m.timestamp().to_millis(),
                        polled: Some(std::time::Instant::now()),
                        part: m.partition(),
                        offset: m.offset(),
                    });
                    "applied"
                }
                Ok(None) => "skipped",
                Err(e) => {
                    let reason = match e {
                        InputError::NotJson => "event_not_json",
                        InputError::NotAnObject | InputError::NoKey => "event_not_an_object",
                    };
                    self.metrics
                        .decode_errors
                        .with_label_values(&[reason])
                        .inc();
                    if source::throttled("events-decode", Duration::from_secs(10)) {
                        tracing::warn!(topic = %m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "events topic: record skipped (repeated at most every 10 s)");
                    }
                    "skipped"
                }
            };
            self.metrics
                .records_consumed
                .with_label_values(&[m.topic(), outcome])
                .inc();
        }
        let mut touched: HashMap<(String, i32), i64> = HashMap::new();
        for m in batch {
            let (Some(t), Some(part)) = (
                by_topic.get(m.topic()),
                parts.get(&(m.topic().to_string(), m.partition())),
            ) else {
                continue;
            };
            touched.insert((t.name.clone(), m.partition()), part.next);
        }
        for (name, evs) in events {
            self.views.feed_events(name, &evs);
        }
        self.views.events_read(touched.into_iter());
    }

    fn raise_to_position(
        &self,
        parts: &mut HashMap<(String, i32), Part>,
        by_topic: &HashMap<&str, &EventsTopic>,
    ) {
        let Ok(tpl) = self.reader.position() else {
            return;
        };
        let mut raised: Vec<((String, i32), i64)> = Vec::new();
        for e in tpl.elements() {
            if let (Offset::Offset(o), Some(part)) = (
                e.offset(),
                parts.get_mut(&(e.topic().to_string(), e.partition())),
            ) {
                if o > part.next {
                    part.next = o;
                    if let Some(t) = by_topic.get(e.topic()) {
                        raised.push(((t.name.clone(), e.partition()), o));
                    }
                }
            }
        }
        // nothing before these positions waits to be fed: the views hold everything before
        if !raised.is_empty() {
            self.views.events_read(raised.into_iter());
        }
    }

    /// Whether every partition was read to the high watermark first seen for it.
    fn check_caught_up(&self, parts: &mut HashMap<(String, i32), Part>) -> bool {
        let mut behind = None;
        for ((topic, p), part) in parts.iter_mut() {
            if part.target.is_none() {
                part.target = source::cached_high_watermark(&self.reader, topic, *p);
            }
            // records before the low watermark are gone (retention): nothing to wait for
            let lo = source::cached_watermarks(&self.reader, topic, *p).map_or(0, |(lo, _)| lo);
            match part.target {
                Some(end) if part.next.max(lo) >= end => {}
                _ => {
                    behind = Some(format!("{topic}[{p}] at {}", part.next));
                }
            }
        }
        match behind {
            None => {
                self.readiness.set_events(true, "");
                true
            }
            Some(why) => {
                self.readiness
                    .set_events(false, &format!("reading events: {why}"));
                false
            }
        }
    }
}
