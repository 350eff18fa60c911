//! livetable: Debezium change streams from Kafka -> a materialised table (sled + a compacted
//! changelog topic per table, partitioned like its input) -> live WebSocket/SSE screens.
//!
//! Data flows one way: `cdc` (consumer, pure decoding) -> `table` (state, store, changelog,
//! restore, follower) -> `fanout` (hub, subscriptions, WebSocket/SSE) -> clients. [`start`] wires
//! the parts a role needs and returns a [`Service`]; cancelling its token shuts it down.

pub mod auth;
pub mod cdc;
pub mod config;
pub mod digest;
pub mod fanout;
pub mod filter;
pub mod http;
pub mod metrics;
pub mod net;
pub mod patch;
pub mod publish;
pub mod table;
pub mod views;

mod node;

pub use node::{run, start, Service, ServiceError};
