//! The producer side of the views writer: its delivery reports, which move each view's floor.
//!
//! Records of one partition are acknowledged in the order they were sent (an idempotent
//! producer). Every record carries the generation of its view's writing: a whole rewrite starts a
//! new one. The floor moves to a commit's (or rewrite's) base when its last record is
//! acknowledged, unless a record of the same generation or a later one failed: a failure is
//! mended only by the next whole rewrite (which writes every row again, and a tombstone for every
//! key whose tombstone was not acknowledged), so the floor waits for that rewrite.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::Message;

use crate::cdc::source;
use crate::metrics::Metrics;
use crate::table::checkpoint::is_permanent;
use crate::table::viewlog::{LogFlags, Mark};

/// What the delivery reports tell of one view.
#[derive(Default)]
pub struct Acked {
    /// The base of the last commit or rewrite whose records were all acknowledged with nothing
    /// failed in its generation (`None`: none yet in this tenure).
    pub floor: Option<Arc<Mark>>,
    /// The highest generation in which a record failed.
    pub failed: Option<u64>,
    /// Keys whose tombstone was sent and not yet acknowledged, with its mark: a rewrite sends
    /// them again (with it: a delta's names the change its key went with).
    pub gone_unacked: HashMap<String, Arc<Mark>>,
    /// The writing generation this tenure started with (its take-over): only its records'
    /// offsets are compared.
    pub since_gen: u64,
    /// The offset of the tenure's last acknowledged record.
    pub last_offset: Option<i64>,
    /// A record was acknowledged below the one before it: the topic was deleted and created
    /// again (by any node) under this writer, which must take the view over again.
    pub restarted: bool,
}

/// Shared by the writer loop, the delivery reports and the group callbacks.
pub struct Shared {
    pub flags: HashMap<String, Arc<LogFlags>>,
    pub acked: Mutex<HashMap<String, Acked>>,
    pub metrics: Arc<Metrics>,
    pub brokers: String,
    /// The generation of the producer in use (the writer replaces a fenced one).
    pub producer_gen: AtomicU64,
    /// A record of the producer in use was refused as fenced (Tansu fences an idempotent
    /// producer that wrote to a topic deleted and created again): every later record would
    /// fail, so the writer replaces it.
    pub fenced: AtomicBool,
}

impl Shared {
    pub fn floor(&self, view: &str) -> Option<Arc<Mark>> {
        lock(&self.acked).get(view).and_then(|a| a.floor.clone())
    }

    /// A record of `view` in generation `gen` failed; unless `permanent` (it can never be
    /// written: a rewrite would fail again), the view is written whole again.
    pub fn failed(&self, view: &str, gen: u64, permanent: bool, gone: Option<(&str, &Arc<Mark>)>) {
        let mut all = lock(&self.acked);
        let a = all.entry(view.to_string()).or_default();
        a.failed = Some(a.failed.map_or(gen, |f| f.max(gen)));
        // a failed tombstone is sent again by the next rewrite (an earlier tombstone of the key
        // acknowledged meanwhile took it out of the set)
        if let Some((k, mark)) = gone {
            a.gone_unacked.insert(k.to_string(), mark.clone());
        }
        if !permanent {
            if let Some(f) = self.flags.get(view) {
                f.dirty.store(true, Ordering::Release);
            }
        }
    }
}

impl Shared {
    /// The input of `view` started over (its events topic was created again): its floor names
    /// the old offsets. No floor is sent until a record of a generation after `gen` (the
    /// whole rewrite that follows) sets it again.
    pub fn drop_floor(&self, view: &str, gen: u64) {
        let mut all = lock(&self.acked);
        let a = all.entry(view.to_string()).or_default();
        a.floor = None;
        a.failed = Some(a.failed.map_or(gen, |f| f.max(gen)));
    }

    /// A record was acknowledged at `offset`.
    pub fn delivered(&self, ack: &Ack, offset: i64) {
        let mut all = lock(&self.acked);
        let a = all.entry(ack.view.to_string()).or_default();
        // (a broker that reports no offset, -1, is not compared)
        if ack.gen >= a.since_gen && offset >= 0 {
            // records of one partition are acknowledged in order: one below the last is in a
            // partition that started over
            if a.last_offset.is_some_and(|last| offset < last) {
                a.restarted = true;
            }
            a.last_offset = Some(offset);
        }
        if let Some((k, _)) = &ack.gone {
            a.gone_unacked.remove(k);
        }
        if let Some(mark) = &ack.last {
            if a.failed.is_none_or(|f| f < ack.gen) {
                a.floor = Some(mark.clone());
            }
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The delivery report's opaque.
pub struct Ack {
    pub view: Arc<str>,
    pub gen: u64,
    /// On the last record of a commit or rewrite: its base (the floor once acknowledged).
    pub last: Option<Arc<Mark>>,
    /// A tombstone's key, with its mark.
    pub gone: Option<(String, Arc<Mark>)>,
    /// The generation of the producer that sent it.
    pub producer_gen: u64,
}

pub struct ProducerCtx(pub Arc<Shared>);

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
        if let Err((e, _)) = result {
            let fenced = matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
            );
            // a replaced producer's records keep failing for a while: they replace nothing
            if fenced && ack.producer_gen == self.0.producer_gen.load(Ordering::Acquire) {
                self.0.fenced.store(true, Ordering::Release);
            }
            let permanent = is_permanent(e);
            self.0.failed(
                &ack.view,
                ack.gen,
                permanent,
                ack.gone.as_ref().map(|(k, m)| (k.as_str(), m)),
            );
            if source::throttled("view-log-delivery", Duration::from_secs(10)) {
                tracing::warn!(view = %ack.view, error = %e, permanent, "a view's changelog record was not delivered (a record too large is left out; otherwise the view is written whole again)");
            }
            return;
        }
        let offset = result.as_ref().map_or(-1, |m| m.offset());
        self.0.delivered(&ack, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            flags: HashMap::from([("v".to_string(), Arc::new(LogFlags::default()))]),
            acked: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::new()),
            brokers: "b".into(),
            producer_gen: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
        }
    }

    fn mark(n: i64) -> Arc<Mark> {
        Arc::new(Mark {
            events: vec![(0, n)],
            input: None,
            state: None,
            at: None,
            upto: Vec::new(),
        })
    }

    /// What `delivery` does with each outcome (a transient failure, or an acknowledgement).
    fn deliver(s: &Shared, gen: u64, last: Option<i64>, ok: bool) {
        if !ok {
            s.failed("v", gen, false, None);
            return;
        }
        s.delivered(
            &Ack {
                view: "v".into(),
                gen,
                last: last.map(mark),
                gone: None,
                producer_gen: 0,
            },
            0,
        );
    }

    #[test]
    fn a_failure_holds_the_floor_until_the_next_rewrite_is_acknowledged_whole() {
        let s = shared();
        deliver(&s, 1, Some(5), true);
        assert_eq!(s.floor("v"), Some(mark(5)));
        // rewrite 2: its first record fails, its last one is acknowledged
        deliver(&s, 2, None, false);
        assert!(
            s.flags["v"].dirty.load(Ordering::Acquire),
            "written whole again"
        );
        deliver(&s, 2, Some(9), true);
        assert_eq!(s.floor("v"), Some(mark(5)), "the floor waits");
        // a commit of the same generation does not move it either
        deliver(&s, 2, Some(11), true);
        assert_eq!(s.floor("v"), Some(mark(5)));
        // rewrite 3 acknowledged whole; a late failure of generation 2 changes nothing
        deliver(&s, 3, Some(12), true);
        assert_eq!(s.floor("v"), Some(mark(12)));
        deliver(&s, 2, None, false);
        deliver(&s, 3, Some(13), true);
        assert_eq!(s.floor("v"), Some(mark(13)));
    }

    #[test]
    fn an_input_that_started_over_drops_the_floor_until_the_next_rewrite() {
        let s = shared();
        deliver(&s, 1, Some(150), true);
        assert_eq!(s.floor("v"), Some(mark(150)));
        s.drop_floor("v", 1);
        assert_eq!(
            s.floor("v"),
            None,
            "no record carries the old offsets' floor"
        );
        // commits of the same generation, from before or after the reset, do not set it again
        deliver(&s, 1, Some(151), true);
        deliver(&s, 1, Some(6), true);
        assert_eq!(s.floor("v"), None);
        // the rewrite (a new generation) acknowledged: the floor of the new offsets
        deliver(&s, 2, Some(7), true);
        assert_eq!(s.floor("v"), Some(mark(7)));
    }

    #[test]
    fn a_record_too_large_does_not_ask_for_a_rewrite() {
        let s = shared();
        s.failed("v", 1, true, None);
        assert!(!s.flags["v"].dirty.load(Ordering::Acquire));
        deliver(&s, 1, Some(4), true);
        assert_eq!(s.floor("v"), None, "but the floor stays");
    }

    #[test]
    fn an_acknowledged_tombstone_is_not_sent_again() {
        let s = shared();
        let mark = Arc::new(Mark {
            at: Some((0, 4)),
            ..Mark::default()
        });
        lock(&s.acked)
            .entry("v".into())
            .or_default()
            .gone_unacked
            .extend([
                ("a".to_string(), mark.clone()),
                ("b".to_string(), mark.clone()),
            ]);
        s.delivered(
            &Ack {
                view: "v".into(),
                gen: 1,
                last: None,
                gone: Some(("a".into(), mark.clone())),
                producer_gen: 0,
            },
            0,
        );
        let unacked = |s: &Shared| {
            let mut keys: Vec<String> = lock(&s.acked)["v"].gone_unacked.keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(unacked(&s), ["b"]);
        // a later tombstone of `a` fails after the earlier one was acknowledged: sent again,
        // with its mark
        s.failed("v", 1, false, Some(("a", &mark)));
        assert_eq!(unacked(&s), ["a", "b"]);
        assert_eq!(lock(&s.acked)["v"].gone_unacked["a"].at, Some((0, 4)));
    }

    #[test]
    fn an_acknowledgement_below_the_last_says_the_topic_started_over() {
        let s = shared();
        let ack = |gen: u64| Ack {
            view: "v".into(),
            gen,
            last: None,
            gone: None,
            producer_gen: 0,
        };
        lock(&s.acked).insert(
            "v".into(),
            Acked {
                since_gen: 2,
                ..Default::default()
            },
        );
        // a late acknowledgement of an earlier tenure is not compared
        s.delivered(&ack(1), 900);
        s.delivered(&ack(2), 5);
        s.delivered(&ack(3), 6);
        assert!(!lock(&s.acked)["v"].restarted);
        s.delivered(&ack(1), 1000);
        assert!(!lock(&s.acked)["v"].restarted);
        s.delivered(&ack(3), 0);
        assert!(lock(&s.acked)["v"].restarted);
    }
}
