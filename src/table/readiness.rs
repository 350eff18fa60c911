//! Health and readiness of a node.
//!
//! Ready = the local store is loaded, and every part this node's role needs is caught up: the
//! ingest loop (every assigned input partition restored and within `--max-ready-lag` records of
//! its high watermark) and the changelog follower (the registry and every followed changelog
//! partition within that lag). Readiness is re-evaluated continuously: a node that falls behind
//! (a broker outage, a burst it cannot keep up with) says so again.
//! Healthy = nothing failed for good (the store, a fatal configuration conflict).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

/// Whether what the node serves is current: sent to live clients when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Freshness {
    pub caught_up: bool,
    pub reason: String,
}

/// The parts of readiness.
#[derive(Debug)]
pub struct Readiness {
    pub loaded: AtomicBool,
    pub healthy: AtomicBool,
    pub ingest: AtomicBool,
    pub follower: AtomicBool,
    /// The events topics were read to their ends as first seen (true when there are none).
    pub events: AtomicBool,
    /// The durability task keeps up (no checkpoint waits past the stuck threshold).
    pub checkpoint: AtomicBool,
    pub needs_ingest: bool,
    pub needs_follower: bool,
    /// Why the node is not ready (for `/readyz`).
    pub reason: Mutex<String>,
    /// The readiness as live clients see it.
    freshness: watch::Sender<Freshness>,
    /// False after an unclean stop until the ingest re-applied what clients may have been sent
    /// before it (every owned partition up to its end as first seen): new subscriptions wait.
    recovered: watch::Sender<bool>,
}

impl Readiness {
    pub fn new(needs_ingest: bool, needs_follower: bool) -> Self {
        let r = Readiness {
            loaded: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            ingest: AtomicBool::new(false),
            follower: AtomicBool::new(false),
            events: AtomicBool::new(true),
            checkpoint: AtomicBool::new(false),
            needs_ingest,
            needs_follower,
            reason: Mutex::new(String::new()),
            freshness: watch::Sender::new(Freshness::default()),
            recovered: watch::Sender::new(true),
        };
        r.healthy.store(true, Ordering::Release);
        r.checkpoint.store(true, Ordering::Release);
        r
    }

    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
            && self.healthy.load(Ordering::Acquire)
            && self.parts_ready()
            && self.is_recovered()
    }

    /// Ingest (with durability), follower and events, each where this node needs it.
    fn parts_ready(&self) -> bool {
        (!self.needs_ingest
            || (self.ingest.load(Ordering::Acquire) && self.checkpoint.load(Ordering::Acquire)))
            && (!self.needs_follower || self.follower.load(Ordering::Acquire))
            && self.events.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets the ingest part; logs transitions.
    pub fn set_ingest(&self, ready: bool, why: &str) {
        self.set(&self.ingest, ready, "ingest", why);
    }

    /// Sets the durability part; logs transitions.
    pub fn set_checkpoint(&self, ok: bool, why: &str) {
        self.set(&self.checkpoint, ok, "checkpoint", why);
    }

    /// Sets the follower part; logs transitions.
    pub fn set_follower(&self, ready: bool, why: &str) {
        self.set(&self.follower, ready, "follower", why);
    }

    /// Sets the events part (views over events topics); logs transitions.
    pub fn set_events(&self, ready: bool, why: &str) {
        self.set(&self.events, ready, "events", why);
    }

    fn set(&self, flag: &AtomicBool, ready: bool, part: &str, why: &str) {
        let was = flag.swap(ready, Ordering::AcqRel);
        if !ready {
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = format!("{part}: {why}");
        }
        if was != ready {
            if ready {
                tracing::info!(part, "caught up");
            } else {
                tracing::warn!(part, reason = why, "not caught up");
            }
        }
        self.publish();
    }

    /// Tells live clients when the node becomes current or stops being so.
    pub fn publish(&self) {
        let now = Freshness {
            caught_up: self.is_ready(),
            reason: self.reason(),
        };
        self.freshness.send_if_modified(|f| {
            if f.caught_up != now.caught_up {
                *f = now;
                true
            } else {
                false
            }
        });
    }

    /// After an unclean stop: clients may have been sent changes that were not durable yet; until
    /// the ingest applied them again, a snapshot would show older values than they saw.
    /// Not ready meanwhile: new subscriptions are held, so a load balancer should send clients
    /// elsewhere.
    pub fn set_recovering(&self) {
        self.recovered.send_replace(false);
        self.publish();
    }

    pub fn set_recovered(&self) {
        self.recovered.send_replace(true);
        self.publish();
    }

    pub fn is_recovered(&self) -> bool {
        *self.recovered.borrow()
    }

    /// Waits until the node recovered from an unclean stop, at most `max`.
    pub async fn wait_recovered(&self, max: std::time::Duration) {
        let mut rx = self.recovered.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|r| *r)).await;
    }

    /// A receiver of freshness changes (for a live connection).
    pub fn freshness(&self) -> watch::Receiver<Freshness> {
        self.freshness.subscribe()
    }

    /// The last reason the node was not ready.
    pub fn reason(&self) -> String {
        if self.is_ready() {
            return String::new();
        }
        if !self.loaded.load(Ordering::Acquire) {
            return "loading the local store".into();
        }
        if !self.healthy.load(Ordering::Acquire) {
            return "failed: see the log".into();
        }
        if self.parts_ready() && !self.is_recovered() {
            return "recovering from an unclean stop: new subscriptions wait until what clients may \
                    have been sent before it is applied again"
                .into();
        }
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_holding_new_subscriptions_is_not_ready() {
        let r = Readiness::new(true, false);
        r.loaded.store(true, Ordering::Release);
        r.set_ingest(true, "");
        assert!(r.is_ready());
        let fresh = r.freshness();
        r.set_recovering();
        assert!(!r.is_ready());
        assert!(r.reason().contains("unclean stop"), "{}", r.reason());
        assert!(!fresh.borrow().caught_up, "live clients are told");
        // another part's reason comes first while it is not ready
        r.set_ingest(false, "t/0 is 5000 records behind");
        assert_eq!(r.reason(), "ingest: t/0 is 5000 records behind");
        r.set_ingest(true, "");
        r.set_recovered();
        assert!(r.is_ready());
        assert_eq!(r.reason(), "");
        assert!(fresh.borrow().caught_up);
    }
}
