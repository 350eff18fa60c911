//! Clients write back: publishing records to Kafka from WebSocket and HTTP clients, with
//! acknowledgements, validation and exactly-once retries (docs/publish.md).
//!
//! - `config`: the `[publish]` section (writable topics, schemas, limits).
//! - `wire`: the publish message and its ack/nack, the same over WebSocket and HTTP.
//! - `publisher` / `session`: the publisher of the process and the per-connection handle.
//! - `writer`, `job`, `producer`, `metadata` (private): the writer task, a publish in flight and
//!   the delivery callback, the idempotent producer, the writable topics' partitions.
//! - `store`: publish ids in memory and in a log in sled, so a retry gets the original ack (also
//!   after a restart).
//! - `recover`: reading a partition back to settle an id whose outcome a crash left unknown.
//! - `partition`: Kafka's default partitioner (murmur2), so the store knows a record's partition.
//!
//! Invariants: an id's `Pending` entry is durable before its record can reach the broker; a
//! session's records reach the producer in the order of its `submit` calls (one key: one
//! partition, written in that order); memory is bounded per connection and per process, and no
//! publish waits for a missing broker longer than the ack timeout.

pub mod config;
mod job;
mod metadata;
pub mod partition;
mod producer;
pub mod publisher;
pub mod recover;
pub mod session;
pub mod store;
pub mod wire;
mod writer;

pub use config::{Pin, PublishConfig, PublishConfigError, PublishSection, TopicPolicy};
pub use publisher::{PublishError, Publisher};
pub use session::{PublishContext, PublishFuture, Session};
pub use wire::{Ack, HttpPublishBody, Nack, NackCode, PublishRequest, Reply};

/// The sled crate whose `Tree` [`Publisher::open`] takes (tools outside the service open one).
pub use sled;
