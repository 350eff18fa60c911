//! What a subscription selects from its table: some keys, and/or the rows a predicate accepts (a
//! token's row claims, a `where=` filter), and maybe only some columns (`columns=`). A row that
//! starts matching reaches the client whole (a move-in); a row that stops matching reaches it as a
//! delete (a move-out); a change of columns the client does not get is no change for it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use crate::cdc::decode::Row;
use crate::filter::{Filter, Projection};
use crate::table::stored_row::StoredRow;

/// A predicate over rows.
pub trait RowFilter: Send + Sync + std::fmt::Debug {
    fn matches(&self, key: &str, row: &Row) -> bool;

    /// The answer from the key alone, for a filter that never reads the row (a token's key
    /// patterns): `Some` for every key, or `None` for every key (the filter reads rows).
    /// [`Selector::accepts`] never parses a row held as JSON for a filter that answers here.
    fn matches_key(&self, _key: &str) -> Option<bool> {
        None
    }
}

/// The rows a subscription wants.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Only these keys (`None`: every key).
    pub keys: Option<HashSet<String>>,
    /// Only the rows this accepts (`None`: every row). Several filters all apply.
    pub filters: Vec<Arc<dyn RowFilter>>,
    /// Only these columns of each row (`None`: every column).
    pub columns: Option<Arc<Projection>>,
    /// The client's `where`, when it has an equality the hub can index (it is in `filters` too):
    /// such a subscription is routed only the changes it may see, see `fanout::route`.
    pub indexed: Option<Arc<Filter>>,
}

impl RowFilter for Filter {
    fn matches(&self, _key: &str, row: &Row) -> bool {
        Filter::matches(self, row)
    }
}

impl Selector {
    pub fn keys(keys: Option<HashSet<String>>) -> Self {
        Selector {
            keys,
            ..Selector::default()
        }
    }

    /// A client's selection: keys, a `where` expression and a `columns` list, each optional. The
    /// error is for the client (it names what is wrong and where).
    pub fn build(
        keys: Option<HashSet<String>>,
        filter: Option<&str>,
        columns: Option<&str>,
    ) -> Result<Self, String> {
        let mut s = Selector::keys(keys);
        if let Some(text) = filter.filter(|t| !t.trim().is_empty()) {
            let f = Arc::new(Filter::parse(text).map_err(|e| format!("where: {e}"))?);
            if crate::filter::FilterIndex::<u64>::indexable(&f) {
                s.indexed = Some(f.clone());
            }
            s.filters.push(f);
        }
        if let Some(spec) = columns {
            let p = Projection::parse(spec).map_err(|e| format!("columns: {e}"))?;
            s.columns = Some(Arc::new(p));
        }
        Ok(s)
    }

    /// Every row of the table, whole: the shared snapshot and frames apply.
    pub fn is_whole(&self) -> bool {
        self.keys.is_none() && self.filters.is_empty() && self.columns.is_none()
    }

    /// The row as this subscription sees it (its columns).
    pub fn project<'a>(&self, row: &'a Row) -> Cow<'a, Row> {
        match &self.columns {
            None => Cow::Borrowed(row),
            Some(p) => Cow::Owned(p.apply(row)),
        }
    }

    /// [`Selector::project`] for a shared row: no copy without a projection.
    pub fn project_arc(&self, row: &Arc<Row>) -> Arc<Row> {
        match &self.columns {
            None => row.clone(),
            Some(p) => Arc::new(p.apply(row)),
        }
    }

    pub fn wants_key(&self, key: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    /// Whether `key` is among the keys and the filters accept its row.
    pub fn selects(&self, key: &str, row: &StoredRow) -> bool {
        self.wants_key(key) && self.accepts(key, row)
    }

    /// Whether the filters accept the row (not the keys: see [`Selector::wants_key`]). A row held
    /// as JSON is parsed only when a filter reads rows and every filter deciding from the key
    /// alone accepts it.
    pub fn accepts(&self, key: &str, row: &StoredRow) -> bool {
        self.accepts_key(key) && self.accepts_row(key, row)
    }

    /// Whether the filters that decide from the key alone accept it (true when there are none).
    pub fn accepts_key(&self, key: &str) -> bool {
        self.filters
            .iter()
            .all(|f| f.matches_key(key) != Some(false))
    }

    /// Whether the filters that read rows accept the row (parsed here if it was not).
    pub fn accepts_row(&self, key: &str, row: &StoredRow) -> bool {
        self.filters
            .iter()
            .all(|f| f.matches_key(key).is_some() || f.matches(key, row))
    }

    /// Whether a filter reads rows (a `where`, a token's row rule), not only keys.
    pub fn filters_read_rows(&self) -> bool {
        self.filters.iter().any(|f| f.matches_key("").is_none())
    }

    /// Whether selecting a row needs its columns: a filter reads rows, or only some columns are
    /// sent. Otherwise a row held as JSON can go out as that JSON, unparsed.
    pub fn reads_rows(&self) -> bool {
        self.columns.is_some() || self.filters_read_rows()
    }

    /// Whether the row (`None`: absent) is selected.
    pub fn wants(&self, key: &str, row: Option<&Row>) -> bool {
        match row {
            None => false,
            Some(r) => self.wants_key(key) && self.filters.iter().all(|f| f.matches(key, r)),
        }
    }
}
