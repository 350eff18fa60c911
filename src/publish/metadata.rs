//! The metadata task: keeps the writable topics' partition counts, creates the topics configured
//! with `partitions` when they are missing, and tells a stuck producer from a missing broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use super::job::Shared;

/// How long a metadata request may take (the broker may be down).
pub(super) const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the partition counts of the writable topics, creating those configured with
/// `partitions` when they are missing (as after a broker lost its data).
pub(super) struct Metadata {
    pub shared: Arc<Shared>,
    pub admin: Arc<AdminClient<DefaultClientContext>>,
    pub topics: Vec<(String, Option<i32>)>,
}

impl Metadata {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let all_known = {
                let p = self
                    .shared
                    .partitions
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                self.topics.iter().all(|(t, _)| p.contains_key(t))
            };
            let pause = if all_known {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.shared.refresh.notified() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.refresh() => {}
            }
            // at most one round a second, however many publishes ask for one
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One round: every writable topic's partition count, creating missing ones if configured.
    pub async fn refresh(&self) {
        for (topic, create) in &self.topics {
            let admin = self.admin.clone();
            let t = topic.clone();
            let count = tokio::task::spawn_blocking(move || {
                admin
                    .inner()
                    .fetch_metadata(Some(&t), METADATA_TIMEOUT)
                    .map(|m| {
                        m.topics()
                            .iter()
                            .find(|x| x.name() == t && x.error().is_none())
                            .map(|x| x.partitions().len() as i32)
                            .filter(|n| *n > 0)
                    })
            })
            .await;
            let count = match count {
                Ok(Ok(c)) => {
                    // the broker answers: records that timed out meanwhile mean a stuck producer
                    if self.shared.producer_suspect.swap(false, Ordering::AcqRel) {
                        self.shared.replace_producer.store(true, Ordering::Release);
                    }
                    c
                }
                Ok(Err(e)) => {
                    tracing::debug!(topic, error = %e, "no metadata for a writable topic");
                    continue;
                }
                Err(_) => continue,
            };
            if count.is_none() {
                if let Some(n) = create {
                    self.create(topic, *n).await;
                }
            }
            let mut p = self
                .shared
                .partitions
                .write()
                .unwrap_or_else(|e| e.into_inner());
            match count {
                Some(n) => {
                    if p.insert(topic.clone(), n) != Some(n) {
                        tracing::info!(topic, partitions = n, "writable topic available");
                    }
                }
                None => {
                    if p.remove(topic).is_some() {
                        tracing::warn!(topic, "writable topic missing on the broker");
                    }
                }
            }
        }
    }

    async fn create(&self, topic: &str, partitions: i32) {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        match self.admin.create_topics([&new], &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(t) => tracing::info!(topic = t, partitions, "created a writable topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, code)) => {
                            tracing::warn!(topic = t, %code, "cannot create a writable topic")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(topic, error = %e, "cannot create a writable topic"),
        }
        // the next round sees its partitions
        self.shared.refresh.notify_one();
    }
}
