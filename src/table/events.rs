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
use crate::table::ingest::partitions::may_predate;
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

/// How long a position past the partition's end must stay past it before the partition is
/// taken to have started over: a new leader's high watermark (or a follower's, when fetching
/// from one) can lag behind records already read for a while, and starting over re-feeds the
/// whole partition.
const CONFIRM_PAST_END: Duration = Duration::from_secs(10);

/// Per assigned partition: the next offset to read, the end to reach before the first
/// readiness (the high watermark first seen; `None` until a fetch answered), and where it was
/// assigned until the broker's watermarks say that position exists.
struct Part {
    next: i64,
    target: Option<i64>,
    check: Option<StartCheck>,
    /// Assigned to the reader once already (a later assignment of more partitions resumes it
    /// where it is read up to: no check).
    assigned: bool,
}

/// A partition assigned at `start`: some brokers answer a fetch past a partition's end with
/// nothing rather than an out-of-range error, so a position past the end of a topic created
/// again is found by comparing it with the watermarks of a fetch made after the assignment.
#[derive(Debug, Clone, Copy)]
struct StartCheck {
    start: i64,
    /// The client's cached watermarks at the assignment, and when.
    cached: Option<(i64, i64)>,
    since: Instant,
    /// When fresh watermarks first put `start` past the end.
    past_end: Option<Instant>,
}

/// What the watermarks say of a [`StartCheck`]'s position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Maybe from a fetch before the assignment, or past the end for too short a time.
    Wait,
    /// The position exists.
    Exists,
    /// Past the end for [`CONFIRM_PAST_END`]: the partition started over.
    PastEnd,
}

impl StartCheck {
    fn verdict(&mut self, (lo, hi): (i64, i64), now: Instant) -> Verdict {
        if may_predate(self.cached, self.since, (lo, hi), now) {
            return Verdict::Wait;
        }
        if self.start <= hi {
            return Verdict::Exists;
        }
        let first = *self.past_end.get_or_insert(now);
        if now.duration_since(first) < CONFIRM_PAST_END {
            Verdict::Wait
        } else {
            Verdict::PastEnd
        }
    }
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
                    self.assign(&mut parts);
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
            self.check_starts(&mut parts, &by_topic);
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
                            check: None,
                            assigned: false,
                        });
                        added = true;
                    }
                }
            }
        }
        (added, answered)
    }

    fn assign(&self, parts: &mut HashMap<(String, i32), Part>) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), part) in parts.iter_mut() {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(part.next));
            if !part.assigned && part.next > 0 {
                part.check = Some(StartCheck {
                    start: part.next,
                    cached: source::cached_watermarks(&self.reader, topic, *p),
                    since: Instant::now(),
                    past_end: None,
                });
            }
            part.assigned = true;
        }
        if let Err(e) = self.reader.assign(&tpl) {
            tracing::warn!(error = %e, "events reader: assign failed");
        }
    }

    /// Feeds `batch` to the views. A record below its partition's next offset means the
    /// partition's offsets started over (the topic was deleted and created again, and the
    /// reader's position lay past the new end): what was collected is fed first, then the views
    /// take the partition's events anew from there ([`Self::reset`]).
    fn apply(
        &self,
        batch: &[BorrowedMessage<'_>],
        by_topic: &HashMap<&str, &EventsTopic>,
        parts: &mut HashMap<(String, i32), Part>,
    ) {
        // per input name, its events in order; per (input name, partition), the next offset
        let mut events: HashMap<&str, Vec<Event>> = HashMap::new();
        let mut touched: HashMap<(String, i32), i64> = HashMap::new();
        for m in batch {
            let Some(t) = by_topic.get(m.topic()) else {
                continue;
            };
            let key = (m.topic().to_string(), m.partition());
            let Some(part) = parts.get_mut(&key) else {
                continue;
            };
            if m.offset() < part.next {
                // the client delivers a partition's records in order from where it was
                // assigned or moved to: one below the position comes only after it went back to
                // the earliest offset because the broker refused the position as out of range
                self.feed(&mut events, &mut touched);
                self.reset(t, m.partition(), part, m.offset());
            }
            part.check = None;
            part.next = m.offset() + 1;
            touched.insert((t.name.clone(), m.partition()), part.next);
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
        self.feed(&mut events, &mut touched);
    }

    /// Feeds the events collected so far and the positions they reach to the views.
    fn feed(
        &self,
        events: &mut HashMap<&str, Vec<Event>>,
        touched: &mut HashMap<(String, i32), i64>,
    ) {
        for (name, evs) in events.drain() {
            self.views.feed_events(name, &evs);
        }
        if !touched.is_empty() {
            self.views.events_read(touched.drain());
        }
    }

    /// Compares the position of each partition assigned past its start with the watermarks of
    /// fetches made since ([`StartCheck::verdict`]): a position that stays past the end for
    /// [`CONFIRM_PAST_END`] (the topic was created again, and the broker answers such a fetch
    /// with nothing) is moved to the partition's first offset, and the views start over there.
    fn check_starts(
        &self,
        parts: &mut HashMap<(String, i32), Part>,
        by_topic: &HashMap<&str, &EventsTopic>,
    ) {
        for ((topic, p), part) in parts.iter_mut() {
            let Some(check) = part.check.as_mut() else {
                continue;
            };
            let Some((lo, hi)) = source::cached_watermarks(&self.reader, topic, *p) else {
                continue;
            };
            match check.verdict((lo, hi), Instant::now()) {
                Verdict::Wait => continue,
                Verdict::Exists => {
                    part.check = None;
                    continue;
                }
                Verdict::PastEnd => {}
            }
            let Some(t) = by_topic.get(topic.as_str()) else {
                continue;
            };
            // moved first: the views start over only with the reader (a seek that failed is
            // tried again at the next look)
            if let Err(e) = self
                .reader
                .seek(topic, *p, Offset::Offset(lo), Duration::from_secs(5))
            {
                if source::throttled("events-seek", Duration::from_secs(10)) {
                    tracing::warn!(topic = %topic, partition = p, error = %e, "events reader: seek to the start of a partition that started over failed; trying again (repeated at most every 10 s)");
                }
                continue;
            }
            part.check = None;
            self.reset(t, *p, part, lo);
        }
    }

    /// The offsets of partition `p` of `t` started over at `first` (the broker answered the
    /// position as out of range and the reader went on from the earliest offset, or its
    /// watermarks put the position past the end): every event of the old offsets is in the
    /// views, so the new ones are all new to them. Counted in `livetable_offset_resets_total`
    /// and logged for the operator. A topic created again that grew past the old position before
    /// the reader fetched from it is not detected: its first events are then missing from the
    /// views (README, Views).
    fn reset(&self, t: &EventsTopic, p: i32, part: &mut Part, first: i64) {
        self.metrics
            .offset_resets
            .with_label_values(&[&t.topic, &p.to_string()])
            .inc();
        tracing::error!(
            topic = %t.topic,
            partition = p,
            position = part.next,
            first_offset = first,
            "events topic: the partition's offsets started over (the topic was deleted and created again); its views keep what they hold and take its events from the new beginning; see README, Views, 'Restarts and what a view remembers'"
        );
        part.next = first;
        self.views.events_reset(&t.name, p, first);
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
                Some(end) if part.next.max(lo) >= end && part.check.is_none() => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(start: i64, cached: Option<(i64, i64)>, since: Instant) -> StartCheck {
        StartCheck {
            start,
            cached,
            since,
            past_end: None,
        }
    }

    #[test]
    fn a_position_past_the_end_is_a_restart_only_once_it_stays_there() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // watermarks equal to those at the assignment may be an earlier fetch's
        let mut c = check(150, Some((0, 150)), t0);
        assert_eq!(c.verdict((0, 150), at(1)), Verdict::Wait);
        assert_eq!(c.verdict((0, 150), at(6)), Verdict::Exists);
        let mut c = check(150, Some((0, 150)), t0);
        assert_eq!(
            c.verdict((0, 20), at(1)),
            Verdict::Wait,
            "just seen past the end"
        );
        assert_eq!(c.verdict((0, 20), at(10)), Verdict::Wait);
        assert_eq!(c.verdict((0, 21), at(11)), Verdict::PastEnd);
        // a lagging high watermark that catches up within the confirmation
        let mut c = check(150, None, t0);
        assert_eq!(c.verdict((0, 140), at(0)), Verdict::Wait);
        assert_eq!(c.verdict((0, 140), at(9)), Verdict::Wait);
        assert_eq!(c.verdict((0, 150), at(9)), Verdict::Exists);
        // a position at the end exists (nothing written since)
        let mut c = check(150, None, t0);
        assert_eq!(c.verdict((100, 150), at(0)), Verdict::Exists);
    }
}
