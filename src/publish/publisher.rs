//! The publisher of a livetable process: one idempotent producer, the id store, the writer,
//! metadata and expiry tasks; [`Publisher::session`] gives each connection its [`Session`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::PublishConfig;
use super::job::{Floors, Ids, Job, Shared};
use super::metadata::Metadata;
use super::producer::Producers;
use super::session::{PublishContext, Session};
use super::store::{IdLog, StoreError};
use super::writer::{now_ms, Writer};
use crate::metrics::{Metrics, PUBLISH_UNLISTED_TOPIC};

/// Errors that stop the publisher from starting.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("id store: {0}")]
    Store(#[from] StoreError),
    #[error("a background task failed: {0}")]
    Task(String),
}

/// Ids expired per sweep call (the sweep repeats until done).
const SWEEP_LIMIT: usize = 100_000;

/// The publisher of a livetable process. Cheap to clone; [`Publisher::close`] it at shutdown.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub config: PublishConfig,
    pub shared: Arc<Shared>,
    pub jobs_tx: mpsc::Sender<Job>,
    /// The process-wide in-flight bound (`max_in_flight_total`).
    pub global: Arc<Semaphore>,
    pub clock: DefaultClock,
    pub round_robin: AtomicU32,
    pub closing: AtomicBool,
    /// Stops the writer once it produced what is queued (close).
    drain: CancellationToken,
    /// Stops every task now (abort, and close once drained).
    cancel: CancellationToken,
    tracker: TaskTracker,
    writer: Mutex<Option<JoinHandle<()>>>,
    producers: Arc<Producers>,
}

impl Publisher {
    /// Starts publishing: the idempotent producer (`base` carries `bootstrap.servers` and the
    /// user's overrides; the settings exactly-once depends on are set over them), the id store
    /// over `tree` (a tree of its own, e.g. `db.open_tree("publish")`), the topics' partition
    /// counts (topics with `partitions` are created when missing), the writer, expiry and
    /// metadata tasks. A broker that is down does not stop the start: publishes are nacked
    /// `unavailable` until it answers.
    pub async fn open(
        config: PublishConfig,
        base: ClientConfig,
        tree: sled::Tree,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PublishError> {
        let (log, index, stored_floors) = tokio::task::spawn_blocking(move || {
            let (log, index) = IdLog::open(tree)?;
            let floors = log.floors()?;
            Ok::<_, StoreError>((log, index, floors))
        })
        .await
        .map_err(|e| PublishError::Task(e.to_string()))??;
        metrics.publish.ids.set(index.len() as i64);
        metrics.publish.init_topic(PUBLISH_UNLISTED_TOPIC);
        for t in config.topics.keys() {
            metrics.publish.init_topic(t);
        }
        let floors: Floors = stored_floors
            .into_iter()
            .map(|((t, p), o)| ((Arc::from(t.as_str()), p), o))
            .collect();
        let shared = Arc::new(Shared {
            log,
            ids: Mutex::new(Ids {
                index,
                ..Ids::default()
            }),
            floors: Mutex::new((floors, HashSet::new())),
            partitions: RwLock::new(HashMap::new()),
            metrics: metrics.clone(),
            stopped: AtomicBool::new(false),
            refresh: Notify::new(),
            producer_suspect: AtomicBool::new(false),
            replace_producer: AtomicBool::new(false),
        });
        let producers = Arc::new(Producers::new(
            producer_config(&base, &config),
            shared.clone(),
        )?);
        // metadata requests must not create topics either (librdkafka's default would)
        let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
            base.clone()
                .set("allow.auto.create.topics", "false")
                .create()?,
        );
        let (jobs_tx, jobs_rx) = mpsc::channel(config.max_in_flight_total);
        let metadata = Metadata {
            shared: shared.clone(),
            admin,
            topics: config
                .topics
                .values()
                .map(|t| (t.name.clone(), t.partitions))
                .collect(),
        };
        // one round before the first publish, so topics of a running broker are known at once
        metadata.refresh().await;
        let writer = Writer {
            shared: shared.clone(),
            producers: producers.clone(),
            scan_config: base,
            ack_timeout: config.ack_timeout,
        };
        let inner = Arc::new(Inner {
            global: Arc::new(Semaphore::new(config.max_in_flight_total)),
            config,
            shared: shared.clone(),
            jobs_tx,
            clock: DefaultClock::default(),
            round_robin: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            drain: CancellationToken::new(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            writer: Mutex::new(None),
            producers,
        });
        let handle =
            inner
                .tracker
                .spawn(writer.run(jobs_rx, inner.drain.clone(), inner.cancel.clone()));
        *inner.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        inner.tracker.spawn(metadata.run(inner.cancel.clone()));
        inner.tracker.spawn(sweep(
            shared,
            inner.config.dedup_window,
            inner.config.dedup_max_entries,
            inner.cancel.clone(),
        ));
        Ok(Publisher { inner })
    }

    /// A session for one connection (or one HTTP principal): its own in-flight bound and rate
    /// limits.
    pub fn session(&self, ctx: PublishContext) -> Session {
        let limiters = self
            .inner
            .config
            .topics
            .values()
            .map(|t| {
                let quota = Quota::per_second(t.rate_per_sec).allow_burst(t.burst);
                // the limiter and the `retry_after_ms` it leads to read one clock
                let clock = self.inner.clock.clone();
                (t.name.clone(), RateLimiter::direct_with_clock(quota, clock))
            })
            .collect();
        Session {
            inner: self.inner.clone(),
            permits: Arc::new(Semaphore::new(self.inner.config.max_in_flight)),
            limiters,
            ctx,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &PublishConfig {
        &self.inner.config
    }

    /// Stops taking publishes, produces what is queued, waits up to the ack timeout for the
    /// broker to acknowledge what is in flight, and makes the id store durable. Idempotent.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.drain.cancel();
        let writer = inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = writer {
            // the writer finishes its queue (bounded by the ack timeout of each publish)
            if tokio::time::timeout(inner.config.ack_timeout * 2, w)
                .await
                .is_err()
            {
                tracing::warn!("the publish writer did not drain in time");
            }
        }
        self.stop_tasks_and_producer(Some(inner.config.ack_timeout))
            .await;
        // the outcomes of the last acknowledgements, then durable
        let changes = std::mem::take(
            &mut inner
                .shared
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .changes,
        );
        let s = inner.shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut batch = sled::Batch::default();
            s.log.stage(&mut batch, now_ms(), &changes);
            s.log.apply(batch)?;
            s.log.flush_blocking()
        })
        .await;
        if let Ok(Err(e)) | Err(e) = r.map_err(|e| StoreError::Task(e.to_string())) {
            tracing::error!(error = %e, "cannot write the last publish outcomes");
        }
    }

    /// Stops at once, as a crash would: queued publishes are dropped, librdkafka's queue is purged
    /// and no outcome is recorded after this point. Ids left `Pending` are resolved when retried.
    pub async fn abort(&self) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.shared.stopped.store(true, Ordering::Release);
        inner.drain.cancel();
        self.stop_tasks_and_producer(None).await;
    }

    async fn stop_tasks_and_producer(&self, flush: Option<Duration>) {
        let inner = &self.inner;
        inner.cancel.cancel();
        inner.tracker.close();
        inner.tracker.wait().await;
        if let Some(p) = inner.producers.take() {
            // flushing and dropping librdkafka's producer block: not on the runtime's threads
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(timeout) = flush {
                    if let Err(e) = p.flush(timeout) {
                        tracing::warn!(error = %e, "publishes still unacknowledged at shutdown");
                    }
                }
                drop(p);
            })
            .await;
        }
    }
}

/// librdkafka settings publishing depends on, set over the user's.
fn producer_config(base: &ClientConfig, c: &PublishConfig) -> ClientConfig {
    let timeout_ms = c.ack_timeout.as_millis().to_string();
    let mut p = base.clone();
    p.set("enable.idempotence", "true")
        .set("acks", "all")
        // nothing lingers past the ack timeout: librdkafka gives a record up by then
        .set("message.timeout.ms", &timeout_ms)
        .set("request.timeout.ms", &timeout_ms)
        .set(
            "queue.buffering.max.messages",
            (c.max_in_flight_total + 1000).to_string(),
        )
        .set("queue.buffering.max.kbytes", "262144")
        .set("linger.ms", "2")
        .set("compression.type", "lz4")
        // writable topics are created by an operator or by `partitions`, never by a typo
        .set("allow.auto.create.topics", "false");
    p
}

/// Expires ids after the window (and beyond the entry cap), every tenth of the window (1-30 s),
/// and deletes the log records nothing remembered refers to.
async fn sweep(
    shared: Arc<Shared>,
    window: Duration,
    max_entries: usize,
    cancel: CancellationToken,
) {
    let every = (window / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = now_ms().saturating_sub(window.as_millis() as u64);
        let mut expired = 0;
        let (oldest, len) = loop {
            // bounded steps, one per lock hold, so publishes are not held up
            let (n, oldest, len) = {
                let mut ids = shared.ids.lock().unwrap_or_else(|e| e.into_inner());
                let n = ids.index.expire(cutoff, max_entries, SWEEP_LIMIT);
                (n, ids.index.oldest_ms(), ids.index.len())
            };
            expired += n;
            if n < SWEEP_LIMIT {
                break (oldest, len);
            }
            tokio::task::yield_now().await;
        };
        shared.metrics.publish.ids.set(len as i64);
        // records older than the oldest id remembered hold nothing remembered (the writer puts
        // its new ids in the index before it writes their record)
        let records_cutoff = oldest.map_or(cutoff, |o| o.max(cutoff));
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            loop {
                let n = s.log.sweep(records_cutoff, SWEEP_LIMIT)?;
                total += n;
                if n < SWEEP_LIMIT {
                    return Ok::<_, StoreError>(total);
                }
            }
        })
        .await;
        match r {
            Ok(Ok(records)) if expired + records > 0 => {
                tracing::debug!(expired, records, "publish ids expired")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot delete old publish id records"),
            _ => {}
        }
    }
}
