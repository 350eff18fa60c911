//! The publish producer: librdkafka's idempotent producer with the delivery callback, replaced
//! when it fails fatally or gets stuck.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ThreadedProducer};

use super::job::{DeliveryContext, Shared};

pub(super) type PublishProducer = ThreadedProducer<DeliveryContext>;

/// The producer in use, replaced when librdkafka reports a fatal error (as the idempotent
/// producer does when a broker that lost its state answers "unknown producer id").
pub(super) struct Producers {
    current: Mutex<Option<Arc<PublishProducer>>>,
    config: ClientConfig,
    shared: Arc<Shared>,
}

impl Producers {
    pub fn new(config: ClientConfig, shared: Arc<Shared>) -> Result<Self, KafkaError> {
        let p = config.create_with_context(DeliveryContext {
            shared: shared.clone(),
        })?;
        Ok(Producers {
            current: Mutex::new(Some(Arc::new(p))),
            config,
            shared,
        })
    }

    /// Takes the producer out (at shutdown); publishing stops.
    pub fn take(&self) -> Option<Arc<PublishProducer>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The producer, a new one if the current one failed fatally; `None` after shutdown.
    pub async fn healthy(&self) -> Option<Arc<PublishProducer>> {
        let p = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        if let Some((code, reason)) = p.client().fatal_error() {
            tracing::error!(%code, reason, "the publish producer failed; starting a new one");
        } else if self.shared.replace_producer.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "records timed out while the broker answers: starting a new publish producer"
            );
        } else {
            return Some(p);
        }
        let (config, shared) = (self.config.clone(), self.shared.clone());
        let created = tokio::task::spawn_blocking(move || {
            config.create_with_context::<_, PublishProducer>(DeliveryContext { shared })
        })
        .await;
        let fresh = match created {
            Ok(Ok(f)) => Arc::new(f),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot start a new publish producer");
                return Some(p);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a new publish producer");
                return Some(p);
            }
        };
        {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.is_none() {
                return None;
            }
            *current = Some(fresh.clone());
        }
        // dropping librdkafka's producer blocks (it purges and reports what it still held)
        drop(tokio::task::spawn_blocking(move || drop(p)));
        Some(fresh)
    }
}
