//! Routed subscriptions: a subscription that selects rows by an indexable `where` (an equality,
//! `IN`, a boolean column) or by a list of keys does not listen on its table's broadcast channel,
//! where every update would wake it. The hub looks each change up in an index instead and queues
//! the update only for the subscriptions it may concern, so a change costs about the number of
//! subscriptions it matches, not the number of subscriptions (10,000 screens each watching one
//! league). A routed subscription that lets its queue fill is told it lagged and re-snapshots, as
//! a broadcast receiver that lags does.
//!
//! What a routed subscription is not sent concerns none of its rows: its position is that of the
//! last update it was sent, and every update between it and the next one changed nothing it
//! selects, so a token built from it resumes exactly.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use super::hub::{HubUpdate, Missed, Sent};
use super::selector::Selector;
use crate::filter::{Filter, FilterIndex, Transition};

/// How a subscription is routed.
#[derive(Debug, Clone)]
pub enum RouteSpec {
    /// The changes of these keys.
    Keys(HashSet<String>),
    /// The changes this filter sees before or after (its equality conjunct indexed).
    Filter(Arc<Filter>),
}

impl RouteSpec {
    /// The route of a selector, when it can be routed: a key list, else an indexable `where`.
    pub fn of(selector: &Selector) -> Option<RouteSpec> {
        match (&selector.keys, &selector.indexed) {
            (Some(keys), _) => Some(RouteSpec::Keys(keys.clone())),
            (None, Some(f)) => Some(RouteSpec::Filter(f.clone())),
            (None, None) => None,
        }
    }
}

struct Sink {
    tx: mpsc::Sender<Sent>,
    lagged: Arc<AtomicBool>,
    keys: Option<HashSet<String>>,
}

/// The routed subscriptions of one table.
#[derive(Default)]
pub struct Router {
    /// `livetable_routed_subscriptions` and `livetable_routed_updates_total`, when counted.
    metrics: Option<(prometheus::IntGauge, prometheus::IntCounter)>,
    filters: FilterIndex<u64>,
    keys: HashMap<String, HashSet<u64>>,
    sinks: HashMap<u64, Sink>,
    /// Reused per update: the subscriptions it concerns.
    hits: HashSet<u64>,
    transitions: Vec<(u64, Transition)>,
}

impl Router {
    /// A router counted in `livetable_routed_subscriptions` and `livetable_routed_updates_total`.
    pub fn counted(metrics: &crate::metrics::Metrics) -> Self {
        Router {
            metrics: Some((
                metrics.routed_subscriptions.clone(),
                metrics.routed_updates.clone(),
            )),
            ..Router::default()
        }
    }

    /// True when no subscription is routed.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Number of routed subscriptions.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    fn insert(&mut self, id: u64, spec: RouteSpec, sink: Sink) {
        if let Some((gauge, _)) = &self.metrics {
            gauge.inc();
        }
        match spec {
            RouteSpec::Keys(keys) => {
                for k in &keys {
                    self.keys.entry(k.clone()).or_default().insert(id);
                }
                self.sinks.insert(
                    id,
                    Sink {
                        keys: Some(keys),
                        ..sink
                    },
                );
            }
            RouteSpec::Filter(f) => {
                self.filters.insert(id, (*f).clone());
                self.sinks.insert(id, sink);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(sink) = self.sinks.remove(&id) else {
            return;
        };
        if let Some((gauge, _)) = &self.metrics {
            gauge.dec();
        }
        match sink.keys {
            Some(keys) => {
                for k in keys {
                    if let Some(set) = self.keys.get_mut(&k) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.keys.remove(&k);
                        }
                    }
                }
            }
            None => {
                self.filters.remove(id);
            }
        }
    }

    /// Queues `update` for the subscriptions it concerns (`all`: for every one, e.g. a new
    /// lineage that each must see), as `weak` (the hub's buffer keeps the update). A full queue
    /// marks its subscription lagged.
    pub fn route(&mut self, sent: &Sent, update: &HubUpdate, all: bool) {
        if self.sinks.is_empty() {
            return;
        }
        let mut hits = std::mem::take(&mut self.hits);
        hits.clear();
        if all {
            hits.extend(self.sinks.keys().copied());
        } else {
            for c in &update.update.changes {
                if let Some(ids) = self.keys.get(&c.key) {
                    hits.extend(ids.iter().copied());
                }
                if !self.filters.is_empty() {
                    self.transitions.clear();
                    self.filters.route_into(
                        c.before.as_deref(),
                        c.row.as_deref(),
                        &mut self.transitions,
                    );
                    hits.extend(self.transitions.iter().map(|(id, _)| *id));
                }
            }
        }
        if let Some((_, counter)) = &self.metrics {
            counter.inc_by(hits.len() as u64);
        }
        let mut closed = Vec::new();
        for id in &hits {
            let Some(sink) = self.sinks.get(id) else {
                continue;
            };
            match sink.tx.try_send(sent.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sink.lagged.store(true, Ordering::Release)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed.push(*id),
            }
        }
        for id in closed {
            self.remove(id);
        }
        self.hits = hits;
    }
}

/// A routed subscription's registration: removed from its router when dropped.
struct Registration {
    router: Weak<Mutex<Router>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.router.upgrade() {
            r.lock().unwrap_or_else(|e| e.into_inner()).remove(self.id);
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The updates routed to one subscription, as a stream like a broadcast receiver's: `Lagged`
/// once its queue overflowed, or an update in it was dropped by the hub's byte budget before it
/// was read (then it should re-snapshot).
pub struct RoutedFeed {
    rx: mpsc::Receiver<Sent>,
    lagged: Arc<AtomicBool>,
    _registration: Registration,
}

impl RoutedFeed {
    /// Registers a subscription routed by `spec` with `router`; `capacity` updates may wait.
    pub fn register(router: &Arc<Mutex<Router>>, spec: RouteSpec, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        router.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            spec,
            Sink {
                tx,
                lagged: lagged.clone(),
                keys: None,
            },
        );
        RoutedFeed {
            rx,
            lagged,
            _registration: Registration {
                router: Arc::downgrade(router),
                id,
            },
        }
    }
}

impl Stream for RoutedFeed {
    type Item = Result<Arc<HubUpdate>, Missed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Some(Err(Missed::Lagged)));
        }
        self.rx.poll_recv(cx).map(|o| o.map(Sent::take))
    }
}

#[cfg(test)]
mod tests;
