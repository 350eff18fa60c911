//! The materialised state: the sled store (rows + positions + outbox, atomic), the in-memory
//! tables served to clients, the changelog topic and the restore from it.

pub mod changelog;
pub mod checkpoint;
pub mod ingest;
pub mod restore;
pub mod state;
pub mod store;
