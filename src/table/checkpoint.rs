//! Checkpoints: after a batch is applied, make it durable and tell Kafka.
//!
//! For each checkpoint, in order: flush sled (the batch and its positions become durable), wait
//! until the broker acknowledged its changelog and dead-letter records (re-producing the current
//! value of a key whose record failed), record how far each table's changelog is acknowledged
//! (and clear the outbox marks of deletes), then commit the positions as
//! the consumer group's offsets. A node that lost its data directory restores from the changelog
//! and resumes from those offsets, so nothing acknowledged is lost and nothing is skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::cdc::source::SourceContext;
use crate::metrics::Metrics;
use crate::table::changelog::Changelog;
use crate::table::state::Tables;
use crate::table::store::{DeadLetter, Store};

/// A changelog record in flight for (table, key) at `seq`.
pub struct PendingRow {
    pub table: String,
    pub key: String,
    pub seq: u64,
    /// A tombstone: its outbox mark is cleared once acknowledged.
    pub deleted: bool,
    pub delivery: Option<DeliveryFuture>,
}

/// A dead letter in flight.
pub struct PendingLetter {
    pub id: u64,
    pub letter: DeadLetter,
    pub delivery: Option<DeliveryFuture>,
}

/// What one applied batch still needs before its offsets can be committed.
#[derive(Default)]
pub struct Checkpoint {
    pub rows: Vec<PendingRow>,
    pub letters: Vec<PendingLetter>,
    pub positions: HashMap<(String, i32), i64>,
    /// Per table, the seq up to which the changelog holds every change once `rows` are settled.
    pub acked: Vec<(String, u64)>,
}

/// The durability task's dependencies.
pub struct Checkpointer {
    pub store: Store,
    pub tables: Arc<Tables>,
    pub changelog: Arc<Changelog>,
    pub consumer: Option<Arc<BaseConsumer<SourceContext>>>,
    pub metrics: Arc<Metrics>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Checkpointer {
    /// Runs until the sender side is dropped and every checkpoint is done, then commits synchronously.
    pub async fn run(self, mut rx: mpsc::Receiver<Checkpoint>) {
        let mut committed: HashMap<(String, i32), i64> = HashMap::new();
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < 64 {
                match rx.try_recv() {
                    Ok(cp) => group.push(cp),
                    Err(_) => break,
                }
            }
            self.flush().await;
            let started = Instant::now();
            let mut positions = HashMap::new();
            for cp in group {
                self.settle(cp.rows, cp.letters).await;
                // checkpoints settle in order: everything up to this batch is in the changelog
                for (table, seq) in cp.acked {
                    if let Err(e) = self.store.set_acked(&table, seq) {
                        tracing::error!(error = %e, "recording the changelog acknowledgement failed; rows will be produced again");
                    }
                }
                for (tp, next) in cp.positions {
                    let slot = positions.entry(tp).or_insert(next);
                    *slot = (*slot).max(next);
                }
            }
            self.metrics
                .changelog_produce_seconds
                .observe(started.elapsed().as_secs_f64());
            self.commit(&positions, CommitMode::Async);
            committed.extend(positions);
            self.metrics
                .store_bytes
                .set(i64::try_from(self.store.size_on_disk()).unwrap_or(i64::MAX));
        }
        self.commit(&committed, CommitMode::Sync);
    }

    async fn flush(&self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match self.store.flush().await {
                Ok(()) => {
                    self.metrics
                        .flush_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "sled flush failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Waits for every delivery; re-produces what failed until the broker takes it; clears the outbox.
    async fn settle(&self, rows: Vec<PendingRow>, letters: Vec<PendingLetter>) {
        for row in rows {
            let what = || format!("changelog record {}/{}", row.table, row.key);
            self.until_acknowledged(row.delivery, what, || self.resend_row(&row.table, &row.key))
                .await;
            if row.deleted {
                if let Err(e) = self.store.clear_deleted(&row.table, &row.key, row.seq) {
                    tracing::error!(error = %e, "clearing the outbox failed; the key will be produced again");
                }
            }
        }
        for letter in letters {
            let what = || {
                format!(
                    "dead letter {}/{}/{}",
                    letter.letter.topic, letter.letter.partition, letter.letter.offset
                )
            };
            let resend = || {
                let changelog = self.changelog.clone();
                let l = letter.letter.clone();
                async move {
                    tokio::task::spawn_blocking(move || changelog.send_dead_letter(&l).ok())
                        .await
                        .ok()
                        .flatten()
                }
            };
            self.until_acknowledged(letter.delivery, what, resend).await;
            if let Err(e) = self.store.clear_dead_letter(letter.id) {
                tracing::error!(error = %e, "clearing a dead letter from the outbox failed; it will be produced again");
            }
        }
    }

    /// Waits until the broker acknowledges `delivery`; while it does not, backs off and asks
    /// `resend` for a new delivery (a missing one is produced at once). `what` names the record in
    /// logs; it is only built when something goes wrong.
    async fn until_acknowledged<F, Fut>(
        &self,
        mut delivery: Option<DeliveryFuture>,
        what: impl Fn() -> String,
        mut resend: F,
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<DeliveryFuture>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some(d) = delivery.take() {
                match d.await {
                    Ok(Ok(_)) => return,
                    Ok(Err((e, _))) => {
                        tracing::warn!(what = %what(), error = %e, "not acknowledged by the broker; retrying")
                    }
                    Err(_) => tracing::warn!(what = %what(), "delivery cancelled; retrying"),
                }
                self.metrics.changelog_produce_errors.inc();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            delivery = resend().await;
            if delivery.is_none() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Produces the current value of a key (the newest, whatever seq failed).
    pub async fn resend_row(&self, table: &str, key: &str) -> Option<DeliveryFuture> {
        let row = self.tables.row(table, key);
        let seq = self.tables.position(table).map_or(0, |(s, _)| s);
        let changelog = self.changelog.clone();
        let (table, key) = (table.to_string(), key.to_string());
        let sent = tokio::task::spawn_blocking(move || {
            if let Err(e) = futures::executor::block_on(changelog.ensure_table(&table)) {
                tracing::warn!(table, error = %e, "cannot create the changelog topic");
            }
            changelog.send_row(&table, &key, row.as_ref(), seq, None)
        })
        .await;
        match sent {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                self.metrics.changelog_produce_errors.inc();
                tracing::warn!(error = %e, "changelog produce failed");
                None
            }
            Err(_) => None,
        }
    }

    fn commit(&self, positions: &HashMap<(String, i32), i64>, mode: CommitMode) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in positions {
            if tpl
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .is_err()
            {
                return;
            }
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            self.metrics.commit_errors.inc();
            tracing::warn!(error = %e, "committing group offsets failed; the next checkpoint retries");
        }
    }
}
