//! What a subscription selects from its table: some keys, and/or the rows a predicate accepts (a
//! token's row claims, a `where=` filter). A row that starts matching reaches the client whole (a
//! move-in); a row that stops matching reaches it as a delete (a move-out).

use std::collections::HashSet;
use std::sync::Arc;

use crate::cdc::decode::Row;

/// A predicate over rows.
pub trait RowFilter: Send + Sync + std::fmt::Debug {
    fn matches(&self, key: &str, row: &Row) -> bool;
}

/// The rows a subscription wants.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Only these keys (`None`: every key).
    pub keys: Option<HashSet<String>>,
    /// Only the rows this accepts (`None`: every row). Several filters all apply.
    pub filters: Vec<Arc<dyn RowFilter>>,
}

impl Selector {
    pub fn keys(keys: Option<HashSet<String>>) -> Self {
        Selector {
            keys,
            filters: Vec::new(),
        }
    }

    /// Every row of the table: the shared snapshot and frames apply.
    pub fn is_whole(&self) -> bool {
        self.keys.is_none() && self.filters.is_empty()
    }

    pub fn wants_key(&self, key: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    /// Whether the row (`None`: absent) is selected.
    pub fn wants(&self, key: &str, row: Option<&Row>) -> bool {
        match row {
            None => false,
            Some(r) => self.wants_key(key) && self.filters.iter().all(|f| f.matches(key, r)),
        }
    }
}
