//! One livetable process: the parts its role needs, started in order, stopped together.
//!
//! - all-in-one: HTTP + store + ingest (group member) + follower of the slices it does not own;
//! - materialiser: HTTP (health, readiness, metrics) + store + ingest;
//! - gateway: HTTP + store (a cache) + follower of every slice.
//!
//! Nothing here waits for the broker: a broker that starts late leaves the node unready (and says
//! why on `/readyz`) until it answers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cdc::decode::DecodeSettings;
use crate::cdc::source;
use crate::config::{Config, Role};
use crate::fanout::hub::Hub;
use crate::metrics::Metrics;
use crate::table::changelog::Changelog;
use crate::table::checkpoint::{Checkpoint, Checkpointer, PendingLetter, Progress};
use crate::table::derived::Views;
use crate::table::events::EventsReader;
use crate::table::follower::{Follower, FollowerHandle, Scope};
use crate::table::ingest::partitions::{self, FollowControl, Partitions};
use crate::table::ingest::Ingest;
use crate::table::readiness::Readiness;
use crate::table::registry::Registry;
use crate::table::restore::{Restorer, SliceHandover};
use crate::table::state::{NoSink, SliceMode, Tables, UpdateSink};
use crate::table::store::{Loaded, Store};
use crate::{fanout, http, table};

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
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("changelog: {0}")]
    Changelog(#[from] table::changelog::ChangelogError),
    #[error("ingest: {0}")]
    Ingest(#[from] table::ingest::IngestError),
    #[error("follower: {0}")]
    Follower(#[from] table::follower::FollowerError),
    #[error("a background task failed: {0}")]
    Task(String),
    #[error("publishing: {0}")]
    Publish(#[from] crate::publish::PublishError),
    #[error("token keys: {0}")]
    AuthKeys(#[from] crate::auth::keys::KeyError),
    #[error("tls: {0}")]
    Tls(#[from] crate::net::tls::TlsError),
    #[error("views: {0}")]
    Views(String),
}

/// A running livetable.
pub struct Service {
    pub local_addr: SocketAddr,
    /// The admin listener's address (`--admin-listen`).
    pub admin_addr: Option<SocketAddr>,
    pub tables: Arc<Tables>,
    pub readiness: Arc<Readiness>,
    pub hub: Arc<Hub>,
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

    /// Waits until the service stopped (after [`Service::shutdown`] or a fatal error), at most
    /// the grace period after the stop was asked.
    pub async fn wait(self) -> Result<(), ServiceError> {
        let cancel = self.cancel.clone();
        let grace = self.grace;
        let mut pipeline = self.pipeline;
        let result = tokio::select! {
            r = &mut pipeline => r,
            _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("the pipeline did not stop within the grace period");
                pipeline.abort();
                return Err(ServiceError::Task("shutdown grace period exceeded".into()));
            }
        };
        let result = match result {
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

/// Runs until `cancel` is cancelled or a fatal error.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), ServiceError> {
    start(config, cancel).await?.wait().await
}

/// Runs a part of the pipeline on its thread: an error or a panic stops the whole service (the
/// other parts are cancelled, and the pipeline reports it), never a node that goes on serving
/// what the failed part froze.
fn guarded(
    name: &str,
    stop: &CancellationToken,
    part: impl FnOnce() -> Result<(), ServiceError>,
) -> Result<(), ServiceError> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(part)).unwrap_or_else(|panic| {
        Err(ServiceError::Task(format!(
            "the {name} thread panicked: {}",
            table::ingest::partitions::panic_message(&*panic)
        )))
    });
    if r.is_err() {
        stop.cancel();
    }
    r
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Task(e.to_string()))
}

/// Starts livetable in its role: HTTP first (health, readiness and metrics answer at once), then
/// the store, then the parts that talk to the broker.
pub async fn start(config: Config, cancel: CancellationToken) -> Result<Service, ServiceError> {
    let role = config.role;
    let metrics = Arc::new(Metrics::new());
    metrics.role.with_label_values(&[role.as_str()]).set(1);
    let readiness = Arc::new(Readiness::new(role.ingests(), role != Role::Materialiser));
    let store_err = |dir: &std::path::Path| {
        let dir = dir.display().to_string();
        move |source| ServiceError::Store { dir, source }
    };
    let store = {
        let dir = config.data_dir.clone();
        blocking(move || Store::open(&dir))
            .await?
            .map_err(store_err(&config.data_dir))?
    };
    let tables = Arc::new(Tables::default());
    let hub = Arc::new(Hub::new(
        tables.clone(),
        metrics.clone(),
        fanout::hub::BufferLimits {
            changes: config.replay_buffer,
            bytes: config.fanout_buffer_bytes,
        },
        4096,
    ));
    let sink: Arc<dyn UpdateSink> = if role.serves() {
        hub.clone()
    } else {
        Arc::new(NoSink)
    };
    // writable topics: a serving node opens the publisher (its ids in a tree of the store)
    let publisher = match (&config.publish, role.serves()) {
        (Some(pc), true) => {
            let tree = {
                let s = store.clone();
                blocking(move || s.db().open_tree("publish"))
                    .await?
                    .map_err(|e| store_err(&config.data_dir)(e.into()))?
            };
            Some(Arc::new(
                crate::publish::Publisher::open(
                    pc.clone(),
                    crate::cdc::source::client_config(&config),
                    tree,
                    metrics.clone(),
                )
                .await?,
            ))
        }
        _ => None,
    };
    let auth = Arc::new(crate::auth::Auth::from_config(
        &config.security.auth,
        metrics.clone(),
    )?);
    let tls = match &config.security.tls {
        Some(files) => Some(Arc::new(crate::net::tls::Tls::load(files)?)),
        None => None,
    };
    let limits = Arc::new(fanout::FanoutLimits::from_config(&config));
    let copies = Arc::new(fanout::copies::Copies::new(
        config.security.limits.max_table_copies,
        metrics.table_copies.clone(),
    ));
    let state = http::AppState::new(http::AppShared {
        publisher: publisher.clone(),
        writable: Arc::new(http::WritableTopic::list(&config)),
        role,
        tables: tables.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        hub: hub.clone(),
        fanout: limits.clone(),
        sessions: Arc::new(fanout::session::SessionEnv {
            hub: hub.clone(),
            metrics: metrics.clone(),
            resume_wait: limits.resume_wait,
            unions: limits.unions.clone(),
            copies: copies.clone(),
        }),
        connections: Arc::new(AtomicUsize::new(0)),
        copies: copies.clone(),
        shutdown: cancel.clone(),
        auth: auth.clone(),
        origins: Arc::new(config.security.origins.clone()),
        admin_separate: config.security.admin_listen.is_some(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServiceError::Bind(config.listen, e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| ServiceError::Bind(config.listen, e))?;
    let admin = match config.security.admin_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServiceError::Bind(addr, e))?;
            let a = l.local_addr().map_err(|e| ServiceError::Bind(addr, e))?;
            Some((l, a))
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(|(_, a)| *a);
    let server = {
        let limits = &config.security.limits;
        let app = crate::net::http_layers(
            http::router(state.clone()),
            limits.request_timeout,
            limits.max_concurrent_requests,
            metrics.clone(),
        );
        let public = crate::net::serve(
            listener,
            app,
            crate::net::ListenerOptions::public(config.max_connections, limits, tls.clone()),
            metrics.clone(),
            cancel.clone(),
        );
        let admin = admin.map(|(l, _)| {
            crate::net::serve(
                l,
                crate::net::http_layers(
                    http::admin_router(state.clone()),
                    limits.request_timeout,
                    64,
                    metrics.clone(),
                ),
                crate::net::ListenerOptions::admin(limits),
                metrics.clone(),
                cancel.clone(),
            )
        });
        tokio::spawn(async move {
            match admin {
                Some(admin) => {
                    tokio::join!(public, admin);
                }
                None => public.await,
            }
            // no new publishes: produce what is queued, wait for the acks, flush the ids
            if let Some(p) = publisher {
                p.close().await;
            }
        })
    };
    auth.watch(RELOAD_EVERY, cancel.clone());
    if let Some(tls) = &tls {
        tls.watch(RELOAD_EVERY, cancel.clone(), metrics.clone());
    }
    crate::net::warn_if_exposed(
        local_addr,
        auth.enabled(),
        tls.is_some(),
        admin_addr.is_some(),
    );
    tracing::info!(%local_addr, ?admin_addr, tls = tls.is_some(), auth = auth.enabled(), role = role.as_str(), "http listening");

    // the input consumer joins its group while the store loads: a broker holds a new member for
    // seconds (Kafka's group.initial.rebalance.delay.ms, Tansu's join), which then overlaps the
    // load instead of following it. Nothing is taken before the ingest thread polls: the
    // rebalance callbacks run in its poll.
    let early_consumer = if role.ingests() {
        let c = source::consumer(&config)?;
        source::subscribe(&c, &config)?;
        Some(c)
    } else {
        None
    };
    let load_started = std::time::Instant::now();
    let mut loaded = {
        let s = store.clone();
        let r = readiness.clone();
        let tombstone_retention = config.changelog_tombstone_retention;
        blocking(move || -> Result<Loaded, table::store::StoreError> {
            let clean = s.begin_run()?;
            s.stamp()?;
            if !clean && role.serves() {
                // all-in-one: the ingest ends the hold; gateway: the follower
                tracing::warn!("the last run did not stop cleanly: new subscriptions wait until the input (or the changelog) is applied again up to its end (clients may have seen changes that were not durable yet)");
                r.set_recovering();
            }
            let mut loaded = s.load()?;
            let now = table::checkpoint::now_ms();
            // the changelog may no longer hold the deletes made since the store was last in use
            if !loaded.tables.is_empty() && loaded.unused_since(now, tombstone_retention / 2) {
                let forgotten = table::alive::forget(&mut loaded, &s)?;
                tracing::warn!(
                    last_in_use_secs_ago = loaded.alive_ms.map(|ms| now.saturating_sub(ms) / 1000),
                    slices = forgotten,
                    "the data directory was last in use half the changelog's tombstone retention ago or longer (or it is not known when): the deletes made since may be gone from the changelog, so its tables are read anew"
                );
            }
            s.mark_alive(now)?;
            s.flush_blocking()?;
            Ok(loaded)
        })
        .await?
        .map_err(store_err(&config.data_dir))?
    };
    metrics
        .store_load_seconds
        .set(load_started.elapsed().as_secs_f64());
    tracing::info!(
        tables = loaded.tables.len(),
        rows = loaded.tables.iter().map(|t| t.rows.len()).sum::<usize>(),
        elapsed_ms = load_started.elapsed().as_millis() as u64,
        "store loaded"
    );
    if loaded.ignored_old_layout {
        tracing::warn!("the data directory holds a store of an older layout; it is ignored and the tables are read from the changelog topics");
    }
    let next_letter_id = loaded
        .dead_letters
        .iter()
        .map(|(id, _)| id + 1)
        .max()
        .unwrap_or(0)
        .max(now_micros());
    let positions = loaded.positions.clone();
    let last_records = std::mem::take(&mut loaded.last_records);
    let source_marks = std::mem::take(&mut loaded.source_marks);
    // after an unclean stop: the slices this node owned, whose clients may have seen changes the
    // store lost (new subscriptions wait until each is applied again here or taken over elsewhere)
    let mut recover_slices = Vec::new();
    // half the changelog's tombstone retention: a slice kept longer is read anew
    let kept = loaded.kept_since(
        table::checkpoint::now_ms(),
        config.changelog_tombstone_retention / 2,
    );
    for mut t in loaded.tables {
        if !readiness.is_recovered() {
            for (p, s) in t.slices.iter().enumerate() {
                if s.mode == SliceMode::Owned {
                    recover_slices.push((t.name.to_string(), p as u32, s.owner));
                }
            }
        }
        for (p, s) in t.slices.iter_mut().enumerate() {
            match (role, s.mode) {
                // a gateway owns nothing
                (Role::Gateway, SliceMode::Owned) => s.mode = SliceMode::Followed,
                // a materialiser follows nothing. It keeps what it let go of at its last clean
                // stop until its first assignment (those it gets back are taken over from where
                // their changelog was read, the others leave memory then), unless that was so
                // long ago that the changelog may no longer hold the deletes since; anything
                // else of another tenure is read anew
                (Role::Materialiser, SliceMode::Followed) => {
                    let part = p as u32;
                    if !kept.contains(&(t.name.to_string(), part)) {
                        s.mode = SliceMode::Absent;
                        t.rows.retain(|_, e| e.part != part);
                    }
                }
                _ => {}
            }
        }
        let name = t.name.to_string();
        metrics.table_size(&name, t.rows.len(), t.seq());
        metrics.subscriptions.with_label_values(&[&name]).set(0);
        tables.insert(t);
        if role.serves() {
            hub.open(&name);
        }
    }
    // declared views: computed here from the tables as loaded, then from every update of them
    let mut views = None;
    let mut views_tree = None;
    let sink: Arc<dyn UpdateSink> = if role.serves() && !config.views.is_empty() {
        // what the last clean stop kept of the views
        let (tree, saved) = {
            let s = store.clone();
            blocking(move || {
                let tree = s.db().open_tree("views")?;
                let saved: std::collections::HashMap<String, Vec<u8>> = tree
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                    .collect();
                Ok::<_, sled::Error>((tree, saved))
            })
            .await?
            .map_err(|e| store_err(&config.data_dir)(e.into()))?
        };
        // loading saved states and computing views from whole tables is CPU work: not on a
        // runtime worker
        let was_saved = !saved.is_empty();
        let (defs, events, t, m) = (
            config.views.clone(),
            config.events.clone(),
            tables.clone(),
            metrics.clone(),
        );
        let reads = table::viewlog::read::StartReads::new(&config, cancel.clone());
        let v = blocking(move || {
            Views::start(&defs, &events, t, sink, m, &saved, &|name, def| {
                reads.read(name, def)
            })
        })
        .await?
        .map_err(ServiceError::Views)?;
        // what was saved is used once: after an unclean stop nothing saved is left to load
        if was_saved {
            let t = tree.clone();
            blocking(move || t.clear().and_then(|()| t.flush().map(|_| ())))
                .await?
                .map_err(|e| store_err(&config.data_dir)(e.into()))?;
        }
        views_tree = Some(tree);
        for name in v.names() {
            hub.open(&name);
        }
        tracing::info!(views = config.views.len(), "declared views computed");
        views = Some(v.clone());
        v
    } else {
        sink
    };
    if views.is_some() && !config.events.is_empty() {
        // not ready until the events topics were read once to their ends
        readiness.events.store(false, Ordering::Release);
    }
    readiness.loaded.store(true, Ordering::Release);
    readiness.publish();

    let registry = Arc::new(Registry::new(&config.group_id, &config.registry_topic()));
    let changelog = Arc::new(Changelog::new(&config)?);
    // the registry (and, for nodes that consume, the dead-letter topic) exist before anything
    // reads them; a broker that is not there yet is retried
    {
        let changelog = changelog.clone();
        let cancel = cancel.clone();
        let dlq = role.ingests();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let c = changelog.clone();
                let r = tokio::task::spawn_blocking(move || {
                    c.ensure_registry()?;
                    if dlq {
                        c.ensure_dlq()?;
                    }
                    Ok::<(), table::changelog::ChangelogError>(())
                })
                .await;
                match r {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot create the registry or dead-letter topic; retrying")
                    }
                    Err(_) => return,
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
    if let Some(views) = views.clone() {
        // a `latest` that read its topic at start places again by it the rows its input is
        // restored with or reads again (`table::derived`, `order.rs`)
        tokio::spawn(every_second(cancel.clone(), move || {
            let v = views.clone();
            async move {
                if let Err(e) = tokio::task::spawn_blocking(move || v.tick()).await {
                    // a panic in one tick: the next one runs all the same
                    tracing::error!(error = %e, "placing views by their topics failed");
                }
            }
        }));
    }
    let mut threads: Vec<(
        &'static str,
        std::thread::JoinHandle<Result<(), ServiceError>>,
    )> = Vec::new();
    if let Some(views) = views.clone() {
        // the views' changelog topics: this node writes those the group `<group-id>.views`
        // assigns it
        let (tx, rx) = std::sync::mpsc::sync_channel(table::viewlog::writer::QUEUE);
        views.set_log(tx);
        let writer = table::viewlog::writer::ViewLogWriter {
            config: config.clone(),
            views,
            changelog: changelog.clone(),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            rx,
            cancel: cancel.clone(),
            writer_id: config.instance_id.clone().unwrap_or_else(table::new_epoch),
        };
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("livetable-viewlog".into())
            .spawn(move || {
                guarded("views writer", &stop, || {
                    writer.run();
                    Ok(())
                })
            })
            .map_err(|e| ServiceError::Task(e.to_string()))?;
        threads.push(("views writer", thread));
    }
    if let Some(views) = views.clone().filter(|_| !config.events.is_empty()) {
        let reader = EventsReader {
            reader: source::reader(&config)?,
            topics: config.events.to_vec(),
            views,
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            cancel: cancel.clone(),
            brokers: config.brokers.clone(),
            view_topic_prefix: config.changelog_prefix.clone(),
            restore_stall: config.restore_stall,
        };
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("livetable-events".into())
            .spawn(move || {
                guarded("events", &stop, || {
                    reader.run();
                    Ok(())
                })
            })
            .map_err(|e| ServiceError::Task(e.to_string()))?;
        threads.push(("events", thread));
    }
    let follower = if role != Role::Materialiser {
        let f = Follower {
            config: config.clone(),
            registry: registry.clone(),
            tables: tables.clone(),
            sink: sink.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            cancel: cancel.clone(),
            scope: if role == Role::Gateway {
                Scope::All
            } else {
                Scope::NotOwned
            },
        };
        let (handle, thread) = f.spawn().map_err(|e| ServiceError::Task(e.to_string()))?;
        let stop = cancel.clone();
        let thread = std::thread::spawn(move || {
            let r = match thread.join() {
                Ok(r) => r.map_err(ServiceError::from),
                Err(_) => Err(ServiceError::Task("the follower thread panicked".into())),
            };
            if r.is_err() {
                stop.cancel();
            }
            r
        });
        threads.push(("follower", thread));
        Some(handle)
    } else {
        None
    };

    let mut checkpoint_task = None;
    let mut workers = Vec::new();
    let mut consumer = None;
    let mut partitions_set = None;
    if let Some(c) = early_consumer {
        let (checkpoint_tx, checkpoint_rx) = mpsc::channel::<Checkpoint>(64);
        let progress = Arc::new(Progress::default());
        let checkpointer = Checkpointer {
            store: store.clone(),
            tables: tables.clone(),
            changelog: changelog.clone(),
            consumer: Some(c.clone()),
            metrics: metrics.clone(),
            cancel: cancel.clone(),
            progress: progress.clone(),
            repairs: Default::default(),
            dead_letters_acked: Default::default(),
        };
        watch_checkpoints(
            progress,
            readiness.clone(),
            metrics.clone(),
            config.checkpoint_stuck,
            config.checkpoint_fatal,
            cancel.clone(),
        );
        checkpoint_task = Some(tokio::spawn(checkpointer.run(checkpoint_rx)));
        let handover: Option<Arc<dyn SliceHandover>> = follower
            .clone()
            .map(|h: FollowerHandle| Arc::new(h) as Arc<dyn SliceHandover>);
        let follow: Option<Arc<dyn FollowControl>> = follower
            .clone()
            .map(|h: FollowerHandle| Arc::new(h) as Arc<dyn FollowControl>);
        let restorer = Arc::new(Restorer {
            changelog: changelog.clone(),
            registry: registry.clone(),
            tables: tables.clone(),
            sink: sink.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            handover,
            member: format!("{}-{}", config.group_id, &table::new_epoch()[..8]),
            deployment: config.group_id.clone(),
            brokers: config.brokers.clone(),
            stall: config.restore_stall,
            config: config.clone(),
        });
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(256);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(256);
        let parts = Arc::new(Partitions::new(
            tables.clone(),
            store.clone(),
            restorer.clone(),
            jobs_tx,
            checkpoint_tx.clone(),
            follow,
            positions,
            last_records,
            config.shutdown_grace,
        ));
        c.context().set_listener(parts.clone());
        workers =
            partitions::spawn_workers(restorer, c.clone(), jobs_rx, done_tx, 4, cancel.clone());
        // dead letters the last run left in the outbox
        if !loaded.dead_letters.is_empty() {
            let letters = loaded
                .dead_letters
                .iter()
                .map(|(id, letter)| PendingLetter {
                    id: *id,
                    letter: letter.clone(),
                    // (fields are evaluated in this order: the generation before the send)
                    generation: changelog.dlq_generation(),
                    delivery: changelog.send_dead_letter(letter).ok(),
                })
                .collect();
            let _ = checkpoint_tx
                .send(Checkpoint {
                    letters,
                    ..Default::default()
                })
                .await;
        }
        let ingest = Ingest {
            consumer: c.clone(),
            partitions: parts.clone(),
            done_rx,
            store: store.clone(),
            tables: tables.clone(),
            registry: registry.clone(),
            changelog,
            sink: sink.clone(),
            metrics: metrics.clone(),
            settings: DecodeSettings {
                key_columns: config.key_columns.clone(),
                max_record_bytes: config.max_record_bytes,
                upsert: config.upsert.clone(),
            },
            max_batch: config.max_batch,
            max_batch_bytes: config.max_batch_bytes,
            max_record_bytes: config.max_record_bytes,
            checkpoint_tx,
            readiness: readiness.clone(),
            cancel: cancel.clone(),
            next_letter_id,
            topics: config.topics.clone(),
            max_ready_lag: config.max_ready_lag,
            brokers: config.brokers.clone(),
            recover_targets: std::collections::HashMap::new(),
            recover_slices,
            started: std::time::Instant::now(),
            skip_source_resends: config.skip_source_resends,
            source_marks,
            resent_delete: std::collections::HashMap::new(),
        };
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("livetable-ingest".into())
            .spawn(move || guarded("ingest", &stop, || ingest.run().map_err(ServiceError::from)))
            .map_err(|e| ServiceError::Task(e.to_string()))?;
        threads.push(("ingest", thread));
        consumer = Some(c);
        partitions_set = Some(parts);
    }

    // marks the store as in use (at start it was marked with the load); stopped by the pipeline before its final flush (it holds the store)
    let marker_stop = cancel.child_token();
    let marker = table::alive::spawn_marker(
        store.clone(),
        table::alive::mark_every(config.changelog_tombstone_retention),
        marker_stop.clone(),
    );
    let pipeline = {
        let cancel = cancel.clone();
        let readiness = readiness.clone();
        let data_dir = config.data_dir.clone();
        tokio::spawn(async move {
            let mut result = Ok(());
            // the first part to stop (an error, or shutdown) stops the others
            let mut pending = threads;
            while !pending.is_empty() {
                let (name, thread) = pending.remove(0);
                let r = blocking(move || thread.join()).await;
                let r = match r {
                    Ok(Ok(r)) => r,
                    _ => Err(ServiceError::Task(format!("the {name} thread panicked"))),
                };
                if let Err(e) = r {
                    tracing::error!(part = name, error = %e, "stopped with an error");
                    readiness.healthy.store(false, Ordering::Release);
                    cancel.cancel();
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
            if let Some(parts) = &partitions_set {
                parts.closing();
            }
            // the restore workers stop within a moment of the cancellation
            let _ = blocking(move || {
                for w in workers {
                    let _ = w.join();
                }
            })
            .await;
            if let Some(task) = checkpoint_task {
                match task.await {
                    Ok(Ok(())) => {}
                    // the cause of the stop (the ingest's error, if any, followed from it)
                    Ok(Err(e)) => {
                        readiness.healthy.store(false, Ordering::Release);
                        result = Err(ServiceError::Store {
                            dir: data_dir.display().to_string(),
                            source: e.0,
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "durability task failed"),
                }
            }
            if let (Some(c), Some(_parts)) = (consumer, partitions_set) {
                // leave the group now that every offset is committed
                let _ = blocking(move || {
                    c.unsubscribe();
                    for _ in 0..10 {
                        let _ = c.poll(Duration::from_millis(20));
                    }
                })
                .await;
            }
            let ok = result.is_ok();
            // a clean stop keeps the views (nothing writes the tables any more)
            if let (true, Some(v), Some(tree)) = (ok, views.clone(), views_tree) {
                let r = blocking(move || -> Result<usize, sled::Error> {
                    let saved = v.save();
                    tree.clear()?;
                    for (name, bytes) in &saved {
                        tree.insert(name.as_bytes(), bytes.as_slice())?;
                    }
                    Ok(saved.len())
                })
                .await;
                match r {
                    Ok(Ok(n)) => tracing::info!(views = n, "views saved for the next start"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "views not saved"),
                    Err(e) => tracing::warn!(error = %e, "views not saved"),
                }
            }
            marker_stop.cancel();
            let _ = marker.await;
            match blocking(move || {
                store
                    .flush_blocking()
                    .and_then(|()| if ok { store.end_run() } else { Ok(()) })
            })
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
                Err(e) => tracing::error!(error = %e, "final flush failed"),
            }
            tracing::info!("pipeline stopped");
            result
        })
    };
    let _stop_on_drop = cancel.clone().drop_guard();
    Ok(Service {
        local_addr,
        admin_addr,
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

/// Readiness, health and metrics from the durability task's progress: a checkpoint waiting for the
/// broker past `stuck` makes the node not ready, past `fatal` unhealthy.
fn watch_checkpoints(
    progress: Arc<Progress>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    stuck: Duration,
    fatal: Duration,
    cancel: CancellationToken,
) {
    tokio::spawn(every_second(cancel, move || {
        let waiting = progress.pending_for();
        metrics
            .checkpoint_pending_seconds
            .set(waiting.as_secs_f64());
        readiness.set_checkpoint(
            waiting < stuck,
            &format!(
                "the changelog has not acknowledged a checkpoint for {} s",
                waiting.as_secs()
            ),
        );
        if waiting >= fatal && readiness.is_healthy() {
            tracing::error!(
                waiting_secs = waiting.as_secs(),
                "the changelog has not acknowledged a checkpoint for too long: unhealthy"
            );
            readiness.healthy.store(false, Ordering::Release);
        }
        std::future::ready(())
    }));
}

/// Runs `f` about once a second (the first at once) until `cancel`.
async fn every_second<F: std::future::Future<Output = ()>>(
    cancel: CancellationToken,
    mut f: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        f().await;
    }
}

/// How often certificate and key files are looked at for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_that_panics_stops_the_service_with_why() {
        let stop = CancellationToken::new();
        let r = guarded("ingest", &stop, || panic!("boom"));
        assert!(stop.is_cancelled(), "the other parts are stopped");
        let e = r.unwrap_err().to_string();
        assert!(e.contains("ingest") && e.contains("boom"), "{e}");
        let stop = CancellationToken::new();
        guarded("events", &stop, || Ok(())).unwrap();
        assert!(!stop.is_cancelled());
    }
}
