//! Reading a view's topic to its end: the last record of each key with its mark, and the last
//! floor ([`LogContent`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};

use super::{Mark, HEADER_DEF, HEADER_FLOOR, HEADER_MARK, HEADER_WRITER};
use crate::cdc::decode::Row;
use crate::cdc::source::Reader;
use crate::table::reader::{read_spans, End, ReadError, Span};

/// The last record of a key: its row (`None`: deleted), its mark and its writer.
pub type LogRow = (Option<Row>, Arc<Mark>, Arc<str>);

/// The headers of a record that [`LogContent::push`] reads: mark, floor, writer, definition.
pub type LogHeaders<'a> = (
    Option<&'a [u8]>,
    Option<&'a [u8]>,
    &'a [u8],
    Option<&'a [u8]>,
);

/// What a view's topic holds, last record per key.
#[derive(Debug, Default)]
pub struct LogContent {
    /// Per key: its row (`None`: deleted), the mark it was written with and its writer.
    pub rows: HashMap<String, LogRow>,
    /// The floor of the last record (`None`: it had none), and that record's writer.
    pub floor: Option<Mark>,
    pub floor_writer: Option<Arc<str>>,
    /// Records read, and records that could not be read (no key, a value that is not a JSON
    /// object, no mark): one such record makes the content unusable for a restore.
    pub records: u64,
    pub bad: u64,
    /// The definition the rows must have been computed by (`None`: any), and the keys whose
    /// last record names another.
    pub expect_def: Option<String>,
    pub other_def: HashSet<String>,
    /// One `Arc` per distinct mark text (the records of a commit share theirs, except marks
    /// that carry a row's state, which are not interned) and writer.
    interned: HashMap<Vec<u8>, Arc<Mark>>,
    writers: HashMap<Vec<u8>, Arc<str>>,
}

impl LogContent {
    /// An empty content whose rows must name definition `def`.
    pub fn expecting(def: Option<&str>) -> Self {
        LogContent {
            expect_def: def.map(str::to_string),
            ..LogContent::default()
        }
    }

    /// Takes one record, in the topic's order.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        (mark, floor, writer, def): LogHeaders<'_>,
    ) {
        self.records += 1;
        let writer = match self.writers.get(writer) {
            Some(w) => w.clone(),
            None => {
                let w: Arc<str> = String::from_utf8_lossy(writer).into();
                self.writers.insert(writer.to_vec(), w.clone());
                w
            }
        };
        self.floor = floor.and_then(|f| serde_json::from_slice(f).ok());
        self.floor_writer = Some(writer.clone());
        let key = key.and_then(|k| std::str::from_utf8(k).ok());
        let mark = mark.and_then(|m| match self.interned.get(m) {
            Some(a) => Some(a.clone()),
            None => {
                let parsed: Mark = serde_json::from_slice(m).ok()?;
                let a = Arc::new(parsed);
                // a mark with a row's state or input change is that record's own: kept only
                // while its row is the key's last
                if a.state.is_none() && a.at.is_none() {
                    self.interned.insert(m.to_vec(), a.clone());
                }
                Some(a)
            }
        });
        let row = match value {
            None => Some(None),
            Some(v) => serde_json::from_slice::<Row>(v).ok().map(Some),
        };
        match (key, mark, row) {
            (Some(k), Some(m), Some(r)) => {
                if let Some(want) = &self.expect_def {
                    if def != Some(want.as_bytes()) {
                        self.other_def.insert(k.to_string());
                    } else {
                        self.other_def.remove(k);
                    }
                }
                self.rows.insert(k.to_string(), (r, m, writer));
            }
            _ => self.bad += 1,
        }
    }

    /// The rows the topic holds (deleted keys left out).
    pub fn live_rows(&self) -> impl Iterator<Item = (&String, &Row)> {
        self.rows
            .iter()
            .filter_map(|(k, (r, _, _))| r.as_ref().map(|r| (k, r)))
    }

    /// How far a key's row holds the events of partition `p`: its mark, or the floor when the
    /// floor's writer wrote the row (that writer had every commit before the floor acknowledged:
    /// an event between the row's mark and the floor that changed the row would have written it
    /// again, so such events changed nothing). A row of another writer (a hand-over) counts only
    /// to its mark.
    fn held(&self, mark: &Mark, writer: &Arc<str>, p: i32) -> i64 {
        match (&self.floor, &self.floor_writer) {
            (Some(f), Some(w)) if w == writer => mark.next(p).max(f.next(p)),
            _ => mark.next(p),
        }
    }

    /// Where events partition `p` must be read from again: the floor, or lower where a row
    /// holds less (nothing below it is read again; no floor: from the beginning).
    pub fn start(&self, p: i32) -> i64 {
        let floor = self.floor.as_ref().map_or(0, |f| f.next(p));
        self.rows
            .values()
            .map(|(_, m, w)| self.held(m, w, p))
            .fold(floor, i64::min)
    }

    /// Whether the event at `offset` of partition `p`, whose output row is `key`, is already in
    /// that row (or changed nothing of it).
    pub fn covers(&self, key: &str, p: i32, offset: i64) -> bool {
        self.rows
            .get(key)
            .is_some_and(|(_, m, w)| offset < self.held(m, w, p))
    }

    /// The highest position the last record of a key or the floor names, per partition: past
    /// it nothing is skipped. Marks of records a later one of their key replaced hold nothing
    /// (after the events topic was created again they name offsets the new topic may never
    /// reach, and the restored view would keep skipping, never saved by a clean stop).
    pub fn ends(&self) -> HashMap<i32, i64> {
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let marks = self.rows.values().map(|(_, m, _)| &**m);
        for (p, n) in marks.chain(&self.floor).flat_map(|m| &m.events) {
            let e = ends.entry(*p).or_insert(*n);
            *e = (*e).max(*n);
        }
        ends
    }
}

/// Reads `topic` (partition 0) to its end with `reader`; `Ok(None)` when the topic does not
/// exist.
pub fn read_log(
    reader: &Reader,
    topic: &str,
    expect_def: Option<&str>,
    stall: Duration,
    brokers: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<LogContent>, ReadError> {
    let md = reader.fetch_metadata(Some(topic), stall.min(Duration::from_secs(10)))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None if !t.partitions().is_empty() => {}
        None | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
        // not authorised, no leader yet, ...: not "no topic" (the caller retries)
        Some(code) => return Err(ReadError::Kafka(KafkaError::MetadataFetch(code))),
    }
    let mut content = LogContent::expecting(expect_def);
    let spans = [Span {
        topic: topic.to_string(),
        partition: 0,
        from: None,
        end: End::HighWatermark,
    }];
    read_spans(reader, &spans, stall, brokers, cancelled, |m| {
        let header = |name: &str| {
            m.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value.map(<[u8]>::to_vec))
            })
        };
        let (mark, floor) = (header(HEADER_MARK), header(HEADER_FLOOR));
        let writer = header(HEADER_WRITER).unwrap_or_default();
        let def = header(HEADER_DEF);
        content.push(
            m.key(),
            m.payload(),
            (mark.as_deref(), floor.as_deref(), &writer, def.as_deref()),
        );
    })?;
    Ok(Some(content))
}

/// The reads of views' topics a node makes at start for its views over tables
/// (`Views::start`): one reader for all; once a read fails (the broker does not answer), the
/// other views are not read (each would wait as long) and start from their input's rows.
pub struct StartReads {
    /// Created at the first read (most nodes have no such view).
    reader: std::cell::OnceCell<Option<Reader>>,
    config: crate::config::Config,
    cancel: tokio_util::sync::CancellationToken,
    failed: std::cell::Cell<bool>,
}

impl StartReads {
    pub fn new(
        config: &crate::config::Config,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Self {
        StartReads {
            reader: std::cell::OnceCell::new(),
            config: config.clone(),
            cancel,
            failed: std::cell::Cell::new(false),
        }
    }

    /// What the topic of view `name` holds, its rows expected of definition `def` (`Ok(None)`:
    /// no topic; `Err`: it could not be read).
    pub fn read(&self, name: &str, def: &str) -> Result<Option<LogContent>, String> {
        if self.failed.get() {
            return Err("an earlier view's topic could not be read".into());
        }
        let reader = self
            .reader
            .get_or_init(|| {
                crate::cdc::source::reader(&self.config)
                    .map_err(|e| tracing::warn!(error = %e, "cannot create a reader for the views' topics"))
                    .ok()
            })
            .as_ref()
            .ok_or("no reader")?;
        let topic = super::topic(&self.config.changelog_prefix, name);
        let cancel = self.cancel.clone();
        match read_log(
            reader,
            &topic,
            Some(def),
            self.config.restore_stall,
            &self.config.brokers,
            &move || cancel.is_cancelled(),
        ) {
            Ok(None) => {
                tracing::info!(
                    view = name,
                    topic,
                    "the view has no changelog topic yet; it is computed from its input"
                );
                Ok(None)
            }
            Ok(content) => Ok(content),
            Err(e) => {
                self.failed.set(true);
                tracing::warn!(view = name, topic, error = %e, "cannot read the view's changelog topic; the view starts from its input's rows and is restored from its topic when this node takes the topic over");
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(events: &[(i32, i64)]) -> Vec<u8> {
        Mark {
            events: events.to_vec(),
            input: None,
            state: None,
            at: None,
            upto: Vec::new(),
        }
        .to_json()
        .into_bytes()
    }

    #[test]
    fn marks_with_a_row_state_are_kept_only_with_their_row() {
        let mut c = LogContent::default();
        let with_state = |n: u64| {
            Mark {
                events: vec![(0, 3 + n as i64)],
                input: None,
                state: Some(serde_json::json!({"m": {"n": n}})),
                at: None,
                upto: Vec::new(),
            }
            .to_json()
            .into_bytes()
        };
        for i in (0..100).rev() {
            let m = with_state(i);
            c.push(
                Some(b"a"),
                Some(br#"{"m":1}"#),
                (Some(&m), None, b"w", None),
            );
        }
        assert!(c.interned.is_empty(), "{} interned", c.interned.len());
        assert_eq!(
            c.rows["a"].1.state,
            Some(serde_json::json!({"m": {"n": 0}}))
        );
        // the skip ends where the key's last record says: the records it replaced hold nothing
        // (their marks may name offsets of an events topic since created again)
        assert_eq!(c.ends()[&0], 3);
        let plain = mark(&[(0, 3)]);
        c.push(
            Some(b"b"),
            Some(br#"{"m":1}"#),
            (Some(&plain), None, b"w", None),
        );
        assert_eq!(c.interned.len(), 1);
    }

    #[test]
    fn the_last_record_of_a_key_wins_with_its_own_mark() {
        let mut c = LogContent::default();
        let (m1, m2) = (mark(&[(0, 3), (1, 2)]), mark(&[(0, 7), (1, 2)]));
        c.push(
            Some(b"a"),
            Some(br#"{"n":1}"#),
            (Some(&m1), None, b"w1", None),
        );
        c.push(
            Some(b"b"),
            Some(br#"{"n":5}"#),
            (Some(&m1), None, b"w1", None),
        );
        c.push(
            Some(b"a"),
            Some(br#"{"n":2}"#),
            (Some(&m2), Some(&m1), b"w1", None),
        );
        c.push(Some(b"b"), None, (Some(&m2), Some(&m1), b"w1", None));
        assert_eq!((c.records, c.bad), (4, 0));
        let live: Vec<_> = c
            .live_rows()
            .map(|(k, r)| (k.clone(), r["n"].clone()))
            .collect();
        assert_eq!(live, vec![("a".to_string(), serde_json::json!(2))]);
        assert!(c.covers("a", 0, 6) && !c.covers("a", 0, 7));
        assert!(c.covers("b", 0, 6), "a delete carries its mark too");
        assert!(
            !c.covers("c", 0, 0),
            "a key the topic never held covers nothing"
        );
        assert!(!c.covers("a", 2, 0), "a partition the mark does not name");
        // the lowest of the floor and every key's mark
        assert_eq!((c.start(0), c.start(1), c.start(2)), (3, 2, 0));
        assert_eq!(c.ends()[&0], 7);
        // the two rows' marks are one Arc
        assert!(Arc::ptr_eq(&c.rows["a"].1, &c.rows["b"].1));
    }

    #[test]
    fn the_floor_covers_only_the_rows_of_its_own_writer() {
        let mut c = LogContent::default();
        let (low, high) = (mark(&[(0, 2)]), mark(&[(0, 9)]));
        // w1 wrote `a` early, then acknowledged everything up to 9 (its floor on `b`)
        c.push(
            Some(b"a"),
            Some(br#"{"n":1}"#),
            (Some(&low), None, b"w1", None),
        );
        c.push(
            Some(b"b"),
            Some(br#"{"n":1}"#),
            (Some(&high), Some(&high), b"w1", None),
        );
        assert_eq!(c.start(0), 9, "a's events between 2 and 9 changed nothing");
        assert!(c.covers("a", 0, 5));
        // a row of another writer (a hand-over) holds only to its own mark
        c.push(
            Some(b"z"),
            Some(br#"{"n":1}"#),
            (Some(&low), Some(&high), b"w2", None),
        );
        assert_eq!(c.floor_writer.as_deref(), Some("w2"));
        assert_eq!(c.start(0), 2);
        assert!(!c.covers("a", 0, 5) && c.covers("a", 0, 1));
        assert_eq!(c.ends()[&0], 9);
    }

    #[test]
    fn rows_of_another_definition_are_told_apart_until_written_again() {
        let mut c = LogContent::expecting(Some("new"));
        let m = mark(&[(0, 1)]);
        c.push(
            Some(b"a"),
            Some(br#"{"n":1}"#),
            (Some(&m), None, b"w1", Some(b"old")),
        );
        c.push(
            Some(b"b"),
            Some(br#"{"n":1}"#),
            (Some(&m), None, b"w1", None),
        );
        assert_eq!(c.other_def.len(), 2);
        c.push(
            Some(b"a"),
            Some(br#"{"n":2}"#),
            (Some(&m), None, b"w1", Some(b"new")),
        );
        c.push(Some(b"b"), None, (Some(&m), None, b"w1", Some(b"new")));
        assert!(
            c.other_def.is_empty(),
            "both keys written again by the new definition"
        );
    }

    #[test]
    fn no_floor_reads_from_the_beginning_and_bad_records_are_counted() {
        let mut c = LogContent::default();
        c.push(
            Some(b"a"),
            Some(br#"{"n":1}"#),
            (Some(&mark(&[(0, 3)])), None, b"w1", None),
        );
        assert_eq!(
            c.start(0),
            0,
            "nothing known to be whole: from the beginning"
        );
        c.push(
            Some(b"x"),
            Some(b"not json"),
            (Some(&mark(&[(0, 4)])), None, b"w1", None),
        );
        c.push(
            None,
            Some(br#"{"n":1}"#),
            (Some(&mark(&[(0, 4)])), None, b"w1", None),
        );
        c.push(Some(b"y"), Some(br#"{"n":1}"#), (None, None, b"w1", None));
        c.push(
            Some(b"z"),
            Some(br#"[1]"#),
            (Some(&mark(&[(0, 4)])), None, b"w1", None),
        );
        assert_eq!((c.records, c.bad), (5, 4));
    }
}
