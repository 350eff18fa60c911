//! Clients write back: publishing records to Kafka from WebSocket and HTTP clients, with
//! acknowledgements, validation and exactly-once retries (docs/publish.md).
//!
//! - `config`: the `[publish]` section (writable topics, schemas, limits).
//! - `wire`: the publish message and its ack/nack, the same over WebSocket and HTTP.
//! - `store`: publish ids in sled, so a retry gets the original ack (also after a restart).
//! - `partition`: Kafka's default partitioner (murmur2), so the store knows a record's partition.

pub mod config;
pub mod partition;
pub mod store;
pub mod wire;

pub use config::{PublishConfig, PublishConfigError, PublishSection, TopicPolicy};
pub use wire::{Ack, HttpPublishBody, Nack, NackCode, PublishRequest, Reply};
