//! The materialised state, partitioned like the input topics: the sled store (rows, slices,
//! positions, outbox; atomic per batch), the in-memory tables served to clients, the changelog
//! topics and the deployment's registry, the ingest loop of the partitions this node owns, the
//! restore of a slice when its partition is assigned, and the follower of the changelog slices
//! this node does not own.

pub mod alive;
pub mod changelog;
pub mod checkpoint;
pub mod derived;
pub mod events;
pub mod fold;
pub mod follower;
pub mod ingest;
pub mod position;
pub mod read_last;
pub mod reader;
pub mod readiness;
pub mod registry;
pub mod repair;
pub mod restore;
pub mod rows;
pub mod state;
pub mod store;
pub mod stored_row;
pub mod viewlog;

/// A new lineage id for a table (12 hex digits).
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
