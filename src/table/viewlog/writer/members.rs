//! The group side of the views writer: membership of `<group-id>.views` decides which node
//! writes each view's topic (cooperative-sticky: a membership change moves only the views it
//! must, and a view is revoked from its writer before another member is given it).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;

use super::acks::{lock, ProducerCtx, Shared};
use crate::cdc::source;

/// How long a revoke waits for what was sent to be acknowledged.
const REVOKE_FLUSH: Duration = Duration::from_secs(3);

pub struct MembersCtx {
    pub shared: Arc<Shared>,
    /// The writer's producer (replaced when fenced).
    pub producer: Mutex<Arc<BaseProducer<ProducerCtx>>>,
    /// View topics assigned or revoked since the writer last looked.
    pub assigned: Mutex<Vec<String>>,
    pub revoked: Mutex<Vec<String>>,
    /// View name by topic.
    pub by_topic: HashMap<String, String>,
}

impl MembersCtx {
    fn stop_writing(&self, topics: &[String]) {
        for t in topics {
            if let Some(view) = self.by_topic.get(t) {
                if let Some(f) = self.shared.flags.get(view) {
                    f.writes.store(false, Ordering::Release);
                }
                self.shared
                    .metrics
                    .view_log_writer
                    .with_label_values(&[view])
                    .set(0);
            }
        }
        // what was sent reaches the broker before the next member writes
        let producer = lock(&self.producer).clone();
        let _ = producer.flush(REVOKE_FLUSH);
        lock(&self.revoked).extend(topics.iter().cloned());
    }
}

impl ClientContext for MembersCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        source::log_librdkafka(&self.shared.brokers, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        source::error_librdkafka(&self.shared.brokers, error, reason);
    }
}

impl ConsumerContext for MembersCtx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let topics: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| e.topic().to_string())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "views writer: assignment failed");
                    return;
                }
                // membership only: nothing is read
                let _ = consumer.pause(tpl);
                if !topics.is_empty() {
                    tracing::info!(topics = ?topics, "views writer: views assigned");
                }
                lock(&self.assigned).extend(topics);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !topics.is_empty() {
                    tracing::info!(topics = ?topics, "views writer: views revoked");
                }
                self.stop_writing(&topics);
                let _ = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
            }
            other => {
                tracing::error!(error = ?other, "views writer: rebalance error; every view is let go");
                let all: Vec<String> = self.by_topic.keys().cloned().collect();
                self.stop_writing(&all);
                let _ = consumer.unassign();
            }
        }
    }
}
