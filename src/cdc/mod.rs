//! The Kafka side of the input: the consumer and its positions (`source`) and the pure Debezium
//! decoding (`decode`, `decimal`).

pub mod decimal;
pub mod decode;
pub mod source;
