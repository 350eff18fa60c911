//! livetable: Debezium change streams from Kafka -> a materialised table (sled + a compacted
//! changelog topic) -> live WebSocket/SSE screens.

pub mod cdc;
pub mod config;
