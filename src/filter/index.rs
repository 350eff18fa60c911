//! Many subscriptions, one row change: who sees a move-in, a move-out, an update.
//!
//! Each subscription's filter is looked at once, when added: if its top-level `AND` (or the whole
//! expression) has an equality conjunct on a column (`col = literal`, `col IN (literals)`, a bare
//! boolean column `active` or `NOT active`), the subscription is filed under that column and each
//! literal (the conjunct with the fewest literals wins). A row can only match it when the row's
//! value of that column is one of them, so a change looks up the old and the new row's values of
//! the indexed columns and evaluates only the subscriptions found (plus the unindexed ones, which
//! are evaluated every time). With 10,000 subscriptions on distinct `league = X`, a change costs
//! about the subscriptions it matches, not 10,000 evaluations.
//!
//! The index only narrows: every candidate's whole filter is evaluated, so a false candidate
//! (e.g. the string `"5.0"` probing the number 5 for a `x = '5'` filter) costs time, never a wrong
//! answer. Invariant (property-tested): [`FilterIndex::route`] == evaluating every filter on the old
//! and the new row.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use serde_json::Value;

use super::{CmpOp, Decimal, Expr, Filter, Literal, Operand};
use crate::cdc::decode::Row;

/// What one row change means for one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// The row matches now and did not before (or was inserted): send it whole.
    MoveIn,
    /// The row matched and no longer does (or was deleted): send a delete.
    MoveOut,
    /// The row matched before and after: send the change.
    Update,
}

/// A value as an equality index files it: a literal of a filter, or a row's column value (see
/// [`value_keys`]); a row can equal a literal only when they share a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexKey {
    Str(String),
    Num(Decimal),
    Bool(bool),
}

struct Subscription {
    filter: Filter,
    /// The indexed column and its literals; `None` = evaluated for every change.
    indexed: Option<(String, Vec<IndexKey>)>,
}

struct ColumnIndex<I> {
    strings: HashMap<String, HashSet<I>>,
    numbers: HashMap<Decimal, HashSet<I>>,
    bools: [HashSet<I>; 2],
}

impl<I: Copy + Eq + Hash> ColumnIndex<I> {
    fn new() -> Self {
        ColumnIndex {
            strings: HashMap::new(),
            numbers: HashMap::new(),
            bools: [HashSet::new(), HashSet::new()],
        }
    }

    fn is_empty(&self) -> bool {
        self.strings.is_empty()
            && self.numbers.is_empty()
            && self.bools.iter().all(HashSet::is_empty)
    }

    fn insert(&mut self, key: &IndexKey, id: I) {
        match key {
            IndexKey::Str(s) => self.strings.entry(s.clone()).or_default().insert(id),
            IndexKey::Num(d) => self.numbers.entry(d.clone()).or_default().insert(id),
            IndexKey::Bool(b) => self.bools[usize::from(*b)].insert(id),
        };
    }

    fn remove(&mut self, key: &IndexKey, id: I) {
        match key {
            IndexKey::Str(s) => {
                if let Some(set) = self.strings.get_mut(s) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.strings.remove(s);
                    }
                }
            }
            IndexKey::Num(d) => {
                if let Some(set) = self.numbers.get_mut(d) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.numbers.remove(d);
                    }
                }
            }
            IndexKey::Bool(b) => {
                self.bools[usize::from(*b)].remove(&id);
            }
        }
    }

    /// Calls `f` for every subscription whose literal may equal `value`.
    fn probe(&self, value: Option<&Value>, mut f: impl FnMut(I)) {
        match value {
            Some(Value::String(s)) => {
                if let Some(set) = self.strings.get(s.as_str()) {
                    set.iter().copied().for_each(&mut f);
                }
                if !self.numbers.is_empty() {
                    if let Some(set) = Decimal::parse_plain(s).and_then(|d| self.numbers.get(&d)) {
                        set.iter().copied().for_each(&mut f);
                    }
                }
            }
            Some(Value::Number(n)) if !self.numbers.is_empty() => {
                if let Some(set) = Decimal::from_json_number(n).and_then(|d| self.numbers.get(&d)) {
                    set.iter().copied().for_each(&mut f);
                }
            }
            Some(Value::Bool(b)) => self.bools[usize::from(*b)].iter().copied().for_each(f),
            _ => {}
        }
    }
}

/// Subscriptions (`id -> filter`) with an equality index; see the module doc.
pub struct FilterIndex<I> {
    subscriptions: HashMap<I, Subscription>,
    columns: HashMap<String, ColumnIndex<I>>,
    unindexed: HashSet<I>,
}

impl<I: Copy + Eq + Hash> Default for FilterIndex<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I: Copy + Eq + Hash> FilterIndex<I> {
    pub fn new() -> Self {
        FilterIndex {
            subscriptions: HashMap::new(),
            columns: HashMap::new(),
            unindexed: HashSet::new(),
        }
    }

    /// Adds (or replaces) the subscription `id`.
    pub fn insert(&mut self, id: I, filter: Filter) {
        self.remove(id);
        let indexed = indexable_conjunct(filter.expr());
        match &indexed {
            Some((column, keys)) => {
                let index = self
                    .columns
                    .entry(column.clone())
                    .or_insert_with(ColumnIndex::new);
                for key in keys {
                    index.insert(key, id);
                }
            }
            None => {
                self.unindexed.insert(id);
            }
        }
        self.subscriptions
            .insert(id, Subscription { filter, indexed });
    }

    /// Removes the subscription `id`, returning its filter.
    pub fn remove(&mut self, id: I) -> Option<Filter> {
        let sub = self.subscriptions.remove(&id)?;
        match &sub.indexed {
            Some((column, keys)) => {
                if let Some(index) = self.columns.get_mut(column) {
                    for key in keys {
                        index.remove(key, id);
                    }
                    if index.is_empty() {
                        self.columns.remove(column);
                    }
                }
            }
            None => {
                self.unindexed.remove(&id);
            }
        }
        Some(sub.filter)
    }

    /// The filter of `id`.
    pub fn get(&self, id: I) -> Option<&Filter> {
        self.subscriptions.get(&id).map(|s| &s.filter)
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.subscriptions.len()
    }

    /// True when there is no subscription.
    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// Whether `filter` has a conjunct the index files it under (else it would be evaluated on
    /// every change).
    pub fn indexable(filter: &Filter) -> bool {
        indexable_conjunct(filter.expr()).is_some()
    }

    /// Number of subscriptions evaluated on every change (no indexable conjunct).
    pub fn unindexed_len(&self) -> usize {
        self.unindexed.len()
    }

    /// The subscriptions that `row` matches (e.g. to route a snapshot row).
    pub fn matching(&self, row: &Row) -> Vec<I> {
        let mut candidates = HashSet::new();
        for (column, index) in &self.columns {
            index.probe(row.get(column), |id| {
                candidates.insert(id);
            });
        }
        candidates
            .into_iter()
            .chain(self.unindexed.iter().copied())
            .filter(|id| {
                self.subscriptions
                    .get(id)
                    .is_some_and(|s| s.filter.matches(row))
            })
            .collect()
    }

    /// For a change from `old` to `new` (`None` = absent: an insert or a delete), the
    /// subscriptions that see it and how; subscriptions that see nothing are not listed. Order is
    /// unspecified.
    pub fn route(&self, old: Option<&Row>, new: Option<&Row>) -> Vec<(I, Transition)> {
        let mut out = Vec::new();
        self.route_into(old, new, &mut out);
        out
    }

    /// [`FilterIndex::route`] appending to `out` (reuse a buffer across changes).
    pub fn route_into(&self, old: Option<&Row>, new: Option<&Row>, out: &mut Vec<(I, Transition)>) {
        // (candidate for old, candidate for new)
        let mut candidates: HashMap<I, (bool, bool)> = HashMap::new();
        for (column, index) in &self.columns {
            if let Some(old) = old {
                index.probe(old.get(column), |id| {
                    candidates.entry(id).or_default().0 = true;
                });
            }
            if let Some(new) = new {
                index.probe(new.get(column), |id| {
                    candidates.entry(id).or_default().1 = true;
                });
            }
        }
        let unindexed = self.unindexed.iter().map(|id| (*id, (true, true)));
        for (id, (old_candidate, new_candidate)) in candidates.into_iter().chain(unindexed) {
            let Some(sub) = self.subscriptions.get(&id) else {
                continue;
            };
            let was = old_candidate && old.is_some_and(|r| sub.filter.matches(r));
            let now = new_candidate && new.is_some_and(|r| sub.filter.matches(r));
            let transition = match (was, now) {
                (false, true) => Transition::MoveIn,
                (true, false) => Transition::MoveOut,
                (true, true) => Transition::Update,
                (false, false) => continue,
            };
            out.push((id, transition));
        }
    }
}

/// The keys a row's column value is found under: a string under itself and, when it reads as a
/// number, under that number (`"2.50"` = `2.5`); a number and a boolean under themselves. The
/// same lookups [`FilterIndex`] makes for a change.
pub fn value_keys(value: Option<&Value>) -> Vec<IndexKey> {
    match value {
        Some(Value::String(s)) => {
            let mut v = vec![IndexKey::Str(s.clone())];
            if let Some(d) = Decimal::parse_plain(s) {
                v.push(IndexKey::Num(d));
            }
            v
        }
        Some(Value::Number(n)) => Decimal::from_json_number(n)
            .map(IndexKey::Num)
            .into_iter()
            .collect(),
        Some(Value::Bool(b)) => vec![IndexKey::Bool(*b)],
        _ => Vec::new(),
    }
}

/// The equality `filter` can be looked up by: a column and the keys of its literals (a row it
/// accepts has that column under one of them). `None`: no such conjunct at the top level.
pub fn equality(filter: &Filter) -> Option<(String, Vec<IndexKey>)> {
    indexable_conjunct(filter.expr())
}

/// The conjunct to index: an equality on a column with the fewest literals.
fn indexable_conjunct(expr: &Expr) -> Option<(String, Vec<IndexKey>)> {
    let conjuncts: &[Expr] = match expr {
        Expr::And(items) => items,
        single => std::slice::from_ref(single),
    };
    conjuncts
        .iter()
        .filter_map(index_keys)
        .min_by_key(|(_, keys)| keys.len())
}

fn index_keys(expr: &Expr) -> Option<(String, Vec<IndexKey>)> {
    let (column, literals): (&String, Vec<&Literal>) = match expr {
        Expr::Compare {
            left: Operand::Column(c),
            op: CmpOp::Eq,
            right: Operand::Literal(l),
        }
        | Expr::Compare {
            left: Operand::Literal(l),
            op: CmpOp::Eq,
            right: Operand::Column(c),
        } => (c, vec![l]),
        Expr::In {
            operand: Operand::Column(c),
            list,
            negated: false,
        } => (c, list.iter().collect()),
        Expr::Truth(Operand::Column(c)) => return Some((c.clone(), vec![IndexKey::Bool(true)])),
        Expr::Not(inner) => match inner.as_ref() {
            Expr::Truth(Operand::Column(c)) => {
                return Some((c.clone(), vec![IndexKey::Bool(false)]))
            }
            _ => return None,
        },
        _ => return None,
    };
    let mut keys: Vec<IndexKey> = Vec::new();
    let mut seen: HashSet<IndexKey> = HashSet::new();
    for literal in literals {
        let found = match literal {
            // `= NULL` is never TRUE: no key, the subscription is never a candidate
            Literal::Null => vec![],
            Literal::Bool(b) => vec![IndexKey::Bool(*b)],
            Literal::Number(d) => vec![IndexKey::Num(d.clone())],
            Literal::String(s) => {
                let mut v = vec![IndexKey::Str(s.clone())];
                if let Some(d) = Decimal::parse_plain(s) {
                    v.push(IndexKey::Num(d));
                }
                v
            }
        };
        for key in found {
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
    }
    Some((column.clone(), keys))
}

#[cfg(test)]
mod tests;
