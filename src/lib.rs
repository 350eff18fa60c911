//! livetable: Debezium change streams from Kafka -> a materialised table (sled + a compacted
//! changelog topic) -> live WebSocket/SSE screens.
//!
//! [`start`] brings the service up on the configured address (port 0 picks one, for tests) and
//! returns a [`Service`]; cancelling its token shuts it down gracefully.

pub mod cdc;
pub mod config;
pub mod fanout;
pub mod http;
pub mod metrics;
pub mod publish;
pub mod table;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cdc::decode::DecodeSettings;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::changelog::Changelog;
use crate::table::checkpoint::{Checkpoint, Checkpointer, PendingLetter, PendingRow};
use crate::table::ingest::{new_epoch, Ingest, Readiness};
use crate::table::state::Tables;
use crate::table::store::{Loaded, LoadedTable, Store, WriteBatch};

/// Errors that stop the service from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("store in {dir}: {source}")]
    Store {
        dir: String,
        source: table::store::StoreError,
    },
    #[error("restore: {0}")]
    Restore(#[from] table::restore::RestoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("changelog: {0}")]
    Changelog(#[from] table::changelog::ChangelogError),
    #[error("ingest: {0}")]
    Ingest(#[from] table::ingest::IngestError),
    #[error("a background task failed: {0}")]
    Task(String),
}

/// A running livetable.
pub struct Service {
    pub local_addr: SocketAddr,
    pub tables: Arc<Tables>,
    pub readiness: Arc<Readiness>,
    pub hub: Arc<fanout::hub::Hub>,
    cancel: CancellationToken,
    server: JoinHandle<()>,
    pipeline: JoinHandle<Result<(), ServiceError>>,
    grace: Duration,
    /// Dropping the service (e.g. a panicking test) stops it.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl Service {
    /// Asks the service to stop (as SIGTERM does).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until the service stopped (after [`Service::shutdown`] or a fatal error).
    pub async fn wait(self) -> Result<(), ServiceError> {
        let result = match self.pipeline.await {
            Ok(r) => r,
            Err(e) => Err(ServiceError::Task(e.to_string())),
        };
        self.cancel.cancel();
        if tokio::time::timeout(self.grace, self.server).await.is_err() {
            tracing::warn!("http server did not stop within the grace period");
        }
        result
    }
}

/// Starts livetable: the store, HTTP (health, readiness and metrics answer at once; the data routes
/// answer 503 until the state is complete), a restore from the changelog if the data directory is
/// empty, the durability task and the ingest thread.
pub async fn start(config: Config, cancel: CancellationToken) -> Result<Service, ServiceError> {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    readiness.healthy.store(true, Ordering::Release);

    let store = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| ServiceError::Task(e.to_string()))?
            .map_err(|source| ServiceError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            })?
    };
    // HTTP first: health, readiness (503 while restoring) and metrics answer during a restore;
    // the data routes answer 503 until the tables are complete
    let tables = Arc::new(Tables::default());
    let hub = Arc::new(fanout::hub::Hub::new(
        tables.clone(),
        metrics.clone(),
        config.replay_buffer,
        4096,
    ));
    let state = http::AppState {
        tables: tables.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        hub: hub.clone(),
        fanout: Arc::new(fanout::FanoutLimits::from_config(&config)),
        connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServiceError::Bind(config.listen, e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| ServiceError::Bind(config.listen, e))?;
    let server = {
        let cancel = cancel.clone();
        let app = http::router(state);
        tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "http server failed");
            }
        })
    };
    tracing::info!(%local_addr, "http listening");

    // join the consumer group before loading: the broker's join delay (Kafka's
    // group.initial.rebalance.delay.ms, 3 s by default) passes while the store loads
    let positions = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let consumer = cdc::source::subscribe(&config, positions.clone())?;

    let store_err = |source| ServiceError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    };
    let mut loaded = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.load())
            .await
            .map_err(|e| ServiceError::Task(e.to_string()))?
            .map_err(store_err)?
    };
    if !loaded.initialized {
        loaded = match restore(&config, &store, &metrics, &cancel).await {
            Ok(l) => l,
            Err(e) => {
                cancel.cancel();
                return Err(e);
            }
        };
    }
    tables.fill(&mut loaded);
    for info in tables.list() {
        metrics
            .table_rows
            .with_label_values(&[&info.name])
            .set(info.rows as i64);
        metrics
            .table_seq
            .with_label_values(&[&info.name])
            .set(info.seq as i64);
    }
    readiness.restored.store(true, Ordering::Release);

    let changelog = Arc::new(Changelog::new(&config)?);
    // the rebalance callback runs inside the ingest loop's polls, which start below: it seeks the
    // assigned partitions to these positions
    *positions.lock().unwrap_or_else(|e| e.into_inner()) = loaded.positions.clone();
    let (checkpoint_tx, checkpoint_rx) = mpsc::channel::<Checkpoint>(64);
    let checkpointer = Checkpointer {
        store: store.clone(),
        tables: tables.clone(),
        changelog: changelog.clone(),
        consumer: Some(consumer.clone()),
        metrics: metrics.clone(),
    };
    let replay = replay_outbox(&checkpointer, &loaded).await;
    let checkpoint_task = tokio::spawn(checkpointer.run(checkpoint_rx));
    if !replay.rows.is_empty() || !replay.letters.is_empty() {
        tracing::info!(
            rows = replay.rows.len(),
            dead_letters = replay.letters.len(),
            "re-producing the outbox left by the last run"
        );
        let _ = checkpoint_tx.send(replay).await;
    }
    {
        let changelog = changelog.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = changelog.ensure_dlq().await {
                tracing::warn!(error = %e, "cannot create the dead-letter topic; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    let next_letter_id = loaded
        .dead_letters
        .iter()
        .map(|(id, _)| id + 1)
        .max()
        .unwrap_or(0)
        .max(now_micros());
    let ingest = Ingest {
        consumer,
        store: store.clone(),
        tables: tables.clone(),
        changelog,
        metrics: metrics.clone(),
        positions,
        settings: DecodeSettings {
            key_columns: config.key_columns.clone(),
            max_record_bytes: config.max_record_bytes,
        },
        max_batch: config.max_batch,
        max_record_bytes: config.max_record_bytes,
        checkpoint_tx,
        hub: hub.clone(),
        readiness: readiness.clone(),
        runtime: tokio::runtime::Handle::current(),
        cancel: cancel.clone(),
        next_letter_id,
        topics: config.topics.clone(),
    };
    let ingest_thread = std::thread::Builder::new()
        .name("livetable-ingest".into())
        .spawn(move || ingest.run())
        .map_err(|e| ServiceError::Task(e.to_string()))?;

    let pipeline = {
        let cancel = cancel.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let ingest_result = tokio::task::spawn_blocking(move || ingest_thread.join()).await;
            let result = match ingest_result {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(ServiceError::Ingest(e)),
                _ => Err(ServiceError::Task("the ingest thread panicked".into())),
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, "ingest stopped");
                readiness.healthy.store(false, Ordering::Release);
                cancel.cancel();
            }
            if let Err(e) = checkpoint_task.await {
                tracing::error!(error = %e, "durability task failed");
            }
            if let Err(e) = tokio::task::spawn_blocking(move || store.flush_blocking()).await {
                tracing::error!(error = %e, "final flush failed");
            }
            tracing::info!("pipeline stopped");
            result
        })
    };
    let _stop_on_drop = cancel.clone().drop_guard();
    Ok(Service {
        local_addr,
        tables,
        readiness,
        hub,
        cancel,
        server,
        pipeline,
        grace: config.shutdown_grace,
        _stop_on_drop,
    })
}

/// Runs until `cancel` is cancelled or a fatal error.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), ServiceError> {
    start(config, cancel).await?.wait().await
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Rebuilds an empty data directory from the changelog topics, then marks it initialized.
async fn restore(
    config: &Config,
    store: &Store,
    metrics: &Arc<Metrics>,
    cancel: &CancellationToken,
) -> Result<Loaded, ServiceError> {
    let started = Instant::now();
    let (cfg, m, c, s) = (
        config.clone(),
        metrics.clone(),
        cancel.clone(),
        store.clone(),
    );
    let result = tokio::task::spawn_blocking(move || -> Result<Loaded, ServiceError> {
        let dir = cfg.data_dir.display().to_string();
        let store_err = |source| ServiceError::Store {
            dir: dir.clone(),
            source,
        };
        s.clear().map_err(store_err)?;
        let tables = table::restore::read_changelogs(&cfg, &m, Duration::from_secs(600), &|| {
            c.is_cancelled()
        })?;
        // written in chunks (the `initialized` mark comes last: a crash before it restores
        // again); the state is served from what was read, not read back from sled
        let mut rows = 0usize;
        let mut loaded = Loaded {
            initialized: true,
            ..Loaded::default()
        };
        for (name, t) in tables {
            let epoch = new_epoch();
            let mut b = WriteBatch::default();
            for (i, (key, row)) in t.rows.iter().enumerate() {
                if i > 0 && i % 20_000 == 0 {
                    s.apply(std::mem::take(&mut b)).map_err(store_err)?;
                }
                b.put_row(&name, key, &table::store::encode_row(row), 0);
            }
            rows += t.rows.len();
            b.set_seq(&name, t.seq);
            b.set_epoch(&name, &epoch);
            b.set_acked(&name, t.seq);
            s.apply(b).map_err(store_err)?;
            loaded.tables.insert(
                name,
                LoadedTable {
                    seq: t.seq,
                    epoch,
                    rows: t.rows.into_iter().collect(),
                },
            );
        }
        let mut b = WriteBatch::default();
        b.set_initialized();
        s.apply(b).map_err(store_err)?;
        s.flush_blocking().map_err(store_err)?;
        tracing::info!(tables = loaded.tables.len(), rows, "restore finished");
        Ok(loaded)
    })
    .await
    .map_err(|e| ServiceError::Task(e.to_string()))?;
    metrics.restore_seconds.set(started.elapsed().as_secs_f64());
    result
}

/// The outbox a previous run left: produce the current value of each key and each dead letter.
async fn replay_outbox(checkpointer: &Checkpointer, loaded: &Loaded) -> Checkpoint {
    let mut cp = Checkpoint::default();
    for e in &loaded.outbox {
        let delivery = checkpointer.resend_row(&e.table, &e.key).await;
        cp.rows.push(PendingRow {
            table: e.table.clone(),
            key: e.key.clone(),
            seq: e.seq,
            deleted: e.deleted,
            delivery,
        });
    }
    // once re-produced, every table is acknowledged up to the seq it was loaded at
    cp.acked = loaded
        .tables
        .iter()
        .map(|(name, t)| (name.clone(), t.seq))
        .collect();
    for (id, letter) in &loaded.dead_letters {
        cp.letters.push(PendingLetter {
            id: *id,
            letter: letter.clone(),
            delivery: checkpointer.changelog.send_dead_letter(letter).ok(),
        });
    }
    cp
}
