//! The materialised tables in memory (what the API and the fanout serve) and the staging of a
//! batch of decoded changes against them.
//!
//! The ingest task is the only writer: it stages a batch ([`Staged`]), writes it to sled in one
//! atomic batch, then publishes it here with [`Tables::publish`]. Readers take a table's read lock
//! and always see a state that matches the table's `seq` exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::cdc::decode::{Change, Op, Row};
use crate::table::store::{encode_row, DeadLetter, Loaded, WriteBatch};

/// One table: its rows by key, its change counter and the lineage of its state.
#[derive(Debug, Default, Clone)]
pub struct TableState {
    pub seq: u64,
    pub epoch: String,
    pub rows: BTreeMap<String, Row>,
}

/// Summary of one table for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableInfo {
    pub name: String,
    pub rows: usize,
    pub seq: u64,
    pub epoch: String,
}

/// A change as applied: numbered with the table's `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedChange {
    pub seq: u64,
    pub key: String,
    pub op: Op,
    /// The full row after the change; `None` when deleted.
    pub row: Option<Row>,
    pub ts_ms: Option<i64>,
    /// The Kafka timestamp of the record that carried the change.
    pub kafka_ts_ms: Option<i64>,
    /// For a truncate: the keys it removed.
    pub truncated: Vec<String>,
    /// The RFC 7386 patch of this row: the whole row when new, only the changed columns when
    /// updated, `null` when deleted. Computed once, shared by every client.
    pub patch: serde_json::Value,
    /// For a delete: the row as it was (clients of `format=rows` get its columns back).
    pub before: Option<Row>,
}

/// All tables in memory.
#[derive(Default)]
pub struct Tables {
    inner: RwLock<HashMap<String, Arc<RwLock<TableState>>>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // a poisoned lock means a writer panicked mid-update; the data is still the last full state
    lock.read().unwrap_or_else(|e| e.into_inner())
}

impl Tables {
    /// Adds every table the store loaded (start-up, before ingestion begins).
    pub fn fill(&self, loaded: &mut Loaded) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (name, t) in loaded.tables.drain() {
            let rows = t.rows.into_iter().collect();
            map.insert(
                name,
                Arc::new(RwLock::new(TableState {
                    seq: t.seq,
                    epoch: t.epoch,
                    rows,
                })),
            );
        }
    }

    /// The table named `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<RwLock<TableState>>> {
        read(&self.inner).get(name).cloned()
    }

    /// Sorted summaries of every table.
    pub fn list(&self) -> Vec<TableInfo> {
        let map = read(&self.inner);
        let mut out: Vec<TableInfo> = map
            .iter()
            .map(|(name, t)| {
                let t = read(t);
                TableInfo {
                    name: name.clone(),
                    rows: t.rows.len(),
                    seq: t.seq,
                    epoch: t.epoch.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One row, cloned.
    pub fn row(&self, table: &str, key: &str) -> Option<Row> {
        let t = self.get(table)?;
        let t = read(&t);
        t.rows.get(key).cloned()
    }

    /// (seq, epoch) of a table.
    pub fn position(&self, table: &str) -> Option<(u64, String)> {
        let t = self.get(table)?;
        let t = read(&t);
        Some((t.seq, t.epoch.clone()))
    }

    /// Makes a staged batch visible (after it was written to the store).
    /// The staged rows are moved, not copied: call it after everything that reads them.
    pub fn publish(&self, staged: &mut Staged) {
        for (name, delta) in staged.deltas.iter_mut() {
            let table = {
                let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
                map.entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(RwLock::new(TableState {
                            epoch: delta.epoch.clone(),
                            ..Default::default()
                        }))
                    })
                    .clone()
            };
            let mut t = table.write().unwrap_or_else(|e| e.into_inner());
            for (key, (row, _)) in delta.rows.drain() {
                match row {
                    Some(row) => t.rows.insert(key, row),
                    None => t.rows.remove(&key),
                };
            }
            t.seq = delta.seq;
        }
    }
}

/// The changes of one batch to one table.
#[derive(Debug, Default)]
pub struct Delta {
    /// The epoch (set when the table is new in this batch, else its current epoch).
    pub epoch: String,
    pub new_table: bool,
    /// The table's seq after this batch.
    pub seq: u64,
    /// Final state per touched key in this batch, with the seq of the last change to it.
    pub rows: HashMap<String, (Option<Row>, u64)>,
    pub changes: Vec<AppliedChange>,
}

/// One touched row of a staged batch, serialised: `json` is `None` for a delete.
pub struct Encoded<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub json: Option<Vec<u8>>,
    pub seq: u64,
    pub ts_ms: Option<i64>,
}

/// A batch of changes staged against the current tables, not yet durable nor visible.
#[derive(Debug, Default)]
pub struct Staged {
    pub deltas: HashMap<String, Delta>,
    /// Next offset per (topic, partition) after this batch.
    pub positions: HashMap<(String, i32), i64>,
    pub dead_letters: Vec<(u64, DeadLetter)>,
}

impl Staged {
    /// Stages one change. Returns the applied change, or `None` when it changes nothing (a
    /// duplicate delivery, a delete of an absent key, a truncate of an empty table).
    pub fn stage(
        &mut self,
        tables: &Tables,
        change: Change,
        new_epoch: impl FnOnce() -> String,
    ) -> Option<&AppliedChange> {
        let delta = match self.deltas.entry(change.table.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let delta = match tables.position(&change.table) {
                    Some((seq, epoch)) => Delta {
                        epoch,
                        seq,
                        ..Default::default()
                    },
                    None => Delta {
                        epoch: new_epoch(),
                        new_table: true,
                        ..Default::default()
                    },
                };
                v.insert(delta)
            }
        };
        if change.op == Op::Truncate {
            let mut visible: BTreeSet<String> = tables
                .get(&change.table)
                .map(|t| read(&t).rows.keys().cloned().collect())
                .unwrap_or_default();
            for (key, (row, _)) in &delta.rows {
                match row {
                    Some(_) => visible.insert(key.clone()),
                    None => visible.remove(key),
                };
            }
            if visible.is_empty() {
                return None;
            }
            delta.seq += 1;
            for key in &visible {
                delta.rows.insert(key.clone(), (None, delta.seq));
            }
            let visible: Vec<String> = visible.into_iter().collect();
            delta.changes.push(AppliedChange {
                seq: delta.seq,
                key: String::new(),
                op: Op::Truncate,
                row: None,
                ts_ms: change.ts_ms,
                kafka_ts_ms: change.kafka_ts_ms,
                truncated: visible,
                patch: serde_json::Value::Null,
                before: None,
            });
            return delta.changes.last();
        }
        // compare and diff against the current row by reference: no copy of it per change
        let table = tables.get(&change.table);
        let guard = table.as_ref().map(|t| read(t));
        let (patch, before) = {
            let current: Option<&Row> = match delta.rows.get(&change.key) {
                Some((row, _)) => row.as_ref(),
                None => guard.as_ref().and_then(|g| g.rows.get(&change.key)),
            };
            if current == change.row.as_ref() {
                return None;
            }
            let patch = crate::fanout::patch::row_diff(current, change.row.as_ref());
            // a delete keeps the row it removed, for `format=rows` clients
            (
                patch,
                if change.row.is_none() {
                    current.cloned()
                } else {
                    None
                },
            )
        };
        drop(guard);
        delta.seq += 1;
        delta
            .rows
            .insert(change.key.clone(), (change.row.clone(), delta.seq));
        delta.changes.push(AppliedChange {
            seq: delta.seq,
            key: change.key,
            op: change.op,
            row: change.row,
            ts_ms: change.ts_ms,
            kafka_ts_ms: change.kafka_ts_ms,
            truncated: Vec::new(),
            patch,
            before,
        });
        delta.changes.last()
    }

    /// Records that everything up to `offset` of a partition has been handled.
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = offset + 1;
        let slot = self
            .positions
            .entry((topic.to_string(), partition))
            .or_insert(next);
        *slot = (*slot).max(next);
    }

    /// The sled batch that makes this staged batch durable (rows with their seqs, table seqs,
    /// epochs, the outbox of deletes, positions), and every touched row serialised once: the same
    /// bytes go to the changelog.
    pub fn write_batch(&self) -> (WriteBatch, Vec<Encoded<'_>>) {
        let mut b = WriteBatch::default();
        let mut encoded = Vec::new();
        for (table, delta) in &self.deltas {
            if delta.changes.is_empty() && !delta.new_table {
                continue;
            }
            let ts_ms = delta.changes.last().and_then(|c| c.ts_ms);
            for (key, (row, seq)) in &delta.rows {
                let json = row.as_ref().map(encode_row);
                match &json {
                    Some(json) => b.put_row(table, key, json, *seq),
                    None => {
                        b.remove_row(table, key);
                        b.mark_deleted(table, key, *seq);
                    }
                }
                encoded.push(Encoded {
                    table,
                    key,
                    json,
                    seq: *seq,
                    ts_ms,
                });
            }
            b.set_seq(table, delta.seq);
            if delta.new_table {
                b.set_epoch(table, &delta.epoch);
            }
        }
        for ((topic, partition), next) in &self.positions {
            b.set_position(topic, *partition, *next);
        }
        for (id, letter) in &self.dead_letters {
            b.add_dead_letter(*id, letter);
        }
        (b, encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ch(op: Op, key: &str, row: Option<serde_json::Value>) -> Change {
        Change {
            table: "t".into(),
            key: key.into(),
            op,
            row: row.map(|v| v.as_object().unwrap().clone()),
            ts_ms: None,
            kafka_ts_ms: None,
            schema: None,
            old_key: None,
            table_from_topic: false,
            key_from_message_key: false,
        }
    }

    #[test]
    fn stage_numbers_changes_and_skips_no_ops() {
        let tables = Tables::default();
        let mut s = Staged::default();
        assert_eq!(
            s.stage(&tables, ch(Op::Create, "a", Some(json!({"v": 1}))), || "e1"
                .into())
                .unwrap()
                .seq,
            1
        );
        assert!(
            s.stage(
                &tables,
                ch(Op::Update, "a", Some(json!({"v": 1}))),
                || unreachable!()
            )
            .is_none(),
            "duplicate"
        );
        assert!(
            s.stage(&tables, ch(Op::Delete, "zz", None), || unreachable!())
                .is_none(),
            "absent key"
        );
        assert_eq!(
            s.stage(
                &tables,
                ch(Op::Create, "b", Some(json!({"v": 2}))),
                || unreachable!()
            )
            .unwrap()
            .seq,
            2
        );
        tables.publish(&mut s);
        assert_eq!(tables.position("t"), Some((2, "e1".to_string())));

        let mut s = Staged::default();
        let t = s
            .stage(&tables, ch(Op::Truncate, "", None), || unreachable!())
            .unwrap();
        assert_eq!(
            (t.seq, t.truncated.clone()),
            (3, vec!["a".to_string(), "b".to_string()])
        );
        assert!(
            s.stage(&tables, ch(Op::Truncate, "", None), || unreachable!())
                .is_none(),
            "already empty"
        );
        assert_eq!(
            s.stage(
                &tables,
                ch(Op::Create, "c", Some(json!({"v": 3}))),
                || unreachable!()
            )
            .unwrap()
            .seq,
            4
        );
        tables.publish(&mut s);
        let t = tables.get("t").unwrap();
        let t = t.read().unwrap();
        assert_eq!(t.rows.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(t.seq, 4);
    }
}
