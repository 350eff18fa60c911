//! `top_n`: the first `limit` rows by `order_by`, optionally per group; table input only.
//!
//! Output key: the input row key. Output row: the input row plus the rank column (1-based within
//! its group; `rank = ""` in the views file for none). A row entering the top arrives whole, a row
//! leaving it is deleted, a row whose rank shifts is re-sent with its new rank (so one change can
//! emit up to `limit + 1` output changes; without a rank column only the rows that enter, leave or
//! change are sent).
//!
//! Order: the `order_by` columns in turn ([`super::value::SortCell`]: NULL/absent last in both directions),
//! ties broken by the row key, ascending. Rows whose group columns are NULL are not ranked.
//!
//! Cost: every row lives in an ordered set per group (`BTreeSet`), so a change costs O(log n)
//! to move the row, plus O(limit) when it touches the top (the new top is read off the set's
//! start and diffed against the previous one); a change below the top costs O(log n) only.
//! Deleting the current first row simply lets the next one in: the set holds every row. A set
//! element is one byte string, the order-preserving encoding of the row's sort cells followed by
//! its key ([`write_cell_bytes`]), so a comparison is one `memcmp`.
//!
//! State: every input row (the rows below the top are needed when the top shrinks). Not
//! rebuildable from the output; rebuild by replaying the input table's rows as inserts, or persist
//! [`TopNState`].

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::TopNSpec;
use super::value::{group_key, write_cell_bytes, SortValue};
use super::OutChange;
use crate::cdc::decode::Row;

/// A row's place in the order: its sort cells' bytes, then its key (from `key_at`). The first
/// 16 bytes are also kept inline (`prefix`, zero-padded), so most comparisons in the set touch no
/// other memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    prefix: u128,
    bytes: Box<[u8]>,
    key_at: u32,
}

impl Entry {
    fn new(bytes: Vec<u8>, key_at: u32) -> Entry {
        let mut head = [0u8; 16];
        let n = bytes.len().min(16);
        head[..n].copy_from_slice(&bytes[..n]);
        Entry {
            prefix: u128::from_be_bytes(head),
            bytes: bytes.into_boxed_slice(),
            key_at,
        }
    }

    fn key(&self) -> &str {
        let at = (self.key_at as usize).min(self.bytes.len());
        std::str::from_utf8(&self.bytes[at..]).unwrap_or_default()
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // zero padding keeps this the order of `bytes`: a shorter string is smaller than its
        // extensions, and an extension by zero bytes ties here and is decided by `bytes`
        self.prefix
            .cmp(&other.prefix)
            .then_with(|| self.bytes.cmp(&other.bytes))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TopGroup {
    set: BTreeSet<Entry>,
    /// Keys currently in the output, in rank order.
    top: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    group: String,
    entry: Entry,
    row: Row,
}

/// The persisted state of a [`TopN`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopNState {
    groups: HashMap<String, TopGroup>,
    members: HashMap<String, Member>,
}

/// The `top_n` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct TopN {
    spec: TopNSpec,
    state: TopNState,
}

impl TopN {
    pub fn new(spec: TopNSpec) -> Self {
        TopN {
            spec,
            state: TopNState::default(),
        }
    }

    pub(super) fn with_state(spec: TopNSpec, state: TopNState) -> Self {
        TopN { spec, state }
    }

    pub(super) fn state(&self) -> &TopNState {
        &self.state
    }

    /// Rows held (all groups).
    pub fn len(&self) -> usize {
        self.state.members.len()
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.state.members.is_empty()
    }

    fn entry(&self, row: &Row, key: &str) -> Entry {
        let mut bytes = Vec::with_capacity(16 + key.len());
        for c in &self.spec.order_by {
            let value = SortValue::of_column(row, &c.column);
            write_cell_bytes(&mut bytes, value.as_ref(), c.descending);
        }
        let key_at = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(key.as_bytes());
        Entry::new(bytes, key_at)
    }

    fn group_of(&self, row: &Row) -> Option<String> {
        if self.spec.group_by.is_empty() {
            Some(String::new())
        } else {
            group_key(row, &self.spec.group_by)
        }
    }

    fn output_row(&self, member: &Member, rank: usize) -> Row {
        let mut row = member.row.clone();
        if let Some(column) = &self.spec.rank {
            row.insert(column.clone(), Value::from(rank as u64));
        }
        row
    }

    /// A table change of row `key` (`old`/`new` `None` = absent). `old` is not needed: the
    /// operator remembers each row.
    pub fn apply_change(
        &mut self,
        key: &str,
        _old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        let limit = self.spec.limit;
        let mut touched: Vec<String> = Vec::with_capacity(2);
        if let Some(member) = self.state.members.remove(key) {
            if let Some(group) = self.state.groups.get_mut(&member.group) {
                group.set.remove(&member.entry);
                if group.top.iter().any(|k| k == key) {
                    touched.push(member.group);
                }
            }
        }
        if let Some(row) = new {
            if let Some(group_name) = self.group_of(row) {
                let entry = self.entry(row, key);
                let group = self.state.groups.entry(group_name.clone()).or_default();
                let enters_top = group.top.len() < limit
                    || match group.top.last().and_then(|k| self.state.members.get(k)) {
                        Some(last) => entry < last.entry,
                        None => true,
                    };
                group.set.insert(entry.clone());
                if enters_top && !touched.contains(&group_name) {
                    touched.push(group_name.clone());
                }
                self.state.members.insert(
                    key.to_string(),
                    Member {
                        group: group_name,
                        entry,
                        row: row.clone(),
                    },
                );
            }
        }
        let mut out = Vec::new();
        for group_name in touched {
            self.refresh(&group_name, key, &mut out);
        }
        out
    }

    /// Recomputes a group's top from its set and emits the differences with the previous top.
    fn refresh(&mut self, group_name: &str, changed_key: &str, out: &mut Vec<OutChange>) {
        let Some(group) = self.state.groups.get(group_name) else {
            return;
        };
        let new_top: Vec<String> = group
            .set
            .iter()
            .take(self.spec.limit)
            .map(|e| e.key().to_string())
            .collect();
        let old_rank: HashMap<&str, usize> = group
            .top
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let new_keys: HashMap<&str, usize> = new_top
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        for k in &group.top {
            if !new_keys.contains_key(k.as_str()) {
                out.push((k.clone(), None));
            }
        }
        for (i, k) in new_top.iter().enumerate() {
            let was = old_rank.get(k.as_str()).copied();
            let resend = match was {
                None => true,
                Some(_) if k == changed_key => true,
                Some(r) => r != i && self.spec.rank.is_some(),
            };
            if resend {
                if let Some(member) = self.state.members.get(k) {
                    out.push((k.clone(), Some(self.output_row(member, i + 1))));
                }
            }
        }
        let empty = group.set.is_empty();
        if empty {
            self.state.groups.remove(group_name);
        } else if let Some(group) = self.state.groups.get_mut(group_name) {
            group.top = new_top;
        }
    }
}
