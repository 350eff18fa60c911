//! The sled store: rows, slices, Kafka positions and the outbox, all in one tree so that one
//! `apply_batch` makes a whole applied batch durable atomically.
//!
//! Key layout (one byte of kind, then the parts; `\0` separates strings; integers big-endian):
//! - `m version`              -> `2`
//! - `t table`                -> table meta JSON (lineage `epoch`, `source` topic, `partitions`)
//! - `r table \0 key`         -> partition (u32) + input offset (i64) of the row's last change + row JSON
//! - `s table \0 partition`   -> slice meta JSON (last offset, count, owner, owned or followed):
//!   written with the rows by the slice's writer
//! - `a table \0 partition`   -> acknowledgement JSON (every change up to `acked` is in the changelog;
//!   the changelog partition is folded up to `cl_next`): written once records are acknowledged
//! - `p topic \0 partition`   -> next input offset to consume (i64; partitions this node owns)
//! - `o table \0 key`         -> outbox of deletes: partition + offset of a delete whose tombstone
//!   is not yet acknowledged by the changelog
//! - `d id`                   -> outbox: a dead letter not yet acknowledged by the broker (JSON)
//! - `mseq topic \0 partition` -> the source positions the partition's changes reached, per
//!   connector stream (JSON `{stream: [commit, lsn]}`, see [`SourceMarks`]): written with the
//!   position. Under the `m` kind, which earlier versions skip, so a downgrade still opens the store.
//!
//! Invariant: a position is stored in the same batch as the rows, slices and outbox entries of the
//! records before it, so after any crash the store is a prefix of the applied stream. A row whose
//! offset is above its slice's acknowledged offset is in the outbox: its current value is produced
//! to the changelog again after a restart.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cdc::decode::Row;
use crate::table::position::LastApplied;
use crate::table::read_last::ReadLast;
use crate::table::state::{Slice, SliceMode, TableState};

mod load;

/// Errors of the sled store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt entry {key:?} in the store: {reason}")]
    Corrupt { key: String, reason: &'static str },
}

const TREE: &str = "state.v2";
const VERSION_KEY: &[u8] = b"mversion";
/// Present while no process runs on the store after a clean stop.
const CLEAN_KEY: &[u8] = b"mclean";
/// When (ms since the epoch, big-endian) a process last used the store: written at start, about
/// every minute while it runs, and at a clean stop.
const ALIVE_KEY: &[u8] = b"malive";

/// The source position each connector stream reached in one input partition (see
/// [`crate::cdc::decode::SourcePos`]): a later change below it is a re-sent copy.
pub type SourceMarks = std::collections::BTreeMap<String, (u64, u64)>;

/// A record that could not be decoded, waiting in the outbox for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
    pub error: String,
    pub truncated: bool,
}

/// What the store keeps about a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    pub epoch: String,
    pub source: String,
    pub partitions: u32,
}

/// What the store keeps about a slice, written with its rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceMeta {
    pub last_off: i64,
    pub count: u64,
    pub owner: String,
    pub owned: bool,
    /// When (ms since the epoch) a node without a follower (a materialiser) let the slice go at
    /// a clean stop, everything of it settled: the store keeps it for that node's next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_ms: Option<i64>,
}

/// How far a slice's changelog is acknowledged and folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMeta {
    pub acked: i64,
    pub cl_next: i64,
}

impl SliceMeta {
    pub fn of(s: &Slice) -> Self {
        SliceMeta {
            last_off: s.last_off,
            count: s.count,
            owner: s.owner.to_header(),
            owned: s.mode == SliceMode::Owned,
            kept_ms: None,
        }
    }
}

impl AckMeta {
    pub fn of(s: &Slice) -> Self {
        AckMeta {
            acked: s.acked,
            cl_next: s.cl_next,
        }
    }
}

/// A delete whose tombstone was not acknowledged by the changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelete {
    pub table: String,
    pub key: String,
    pub part: u32,
    pub off: i64,
}

/// Everything read back from the store at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Tables with their rows and slices; slice modes are `Owned` for slices this node owned,
    /// `Followed` for the others it held.
    pub tables: Vec<TableState>,
    pub positions: HashMap<(String, i32), i64>,
    /// The record each position follows, where it was stored (not by versions before it).
    pub last_records: HashMap<(String, i32), LastApplied>,
    pub deletes: Vec<PendingDelete>,
    pub dead_letters: Vec<(u64, DeadLetter)>,
    pub source_marks: HashMap<(String, i32), SourceMarks>,
    /// The store was written by an older layout and ignored.
    pub ignored_old_layout: bool,
    /// Slices let go of at a clean stop by a node without a follower, with when
    /// ([`SliceMeta::kept_ms`]).
    pub kept: HashMap<(String, u32), i64>,
    /// When a process last used the store ([`Store::mark_alive`]); `None` for a store that was
    /// never marked (written by a version before the mark, or never run).
    pub alive_ms: Option<i64>,
}

impl Loaded {
    /// Whether the store was last in use `within` or longer before `now_ms` (or is not known to
    /// have been in use at all): what it holds of the changelog may then miss deletes whose
    /// tombstones the broker has dropped since.
    pub fn unused_since(&self, now_ms: i64, within: std::time::Duration) -> bool {
        let within = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        self.alive_ms
            .is_none_or(|ms| now_ms.saturating_sub(ms) >= within)
    }

    /// The slices let go of at a clean stop within `within` before `now_ms`.
    pub fn kept_since(
        &self,
        now_ms: i64,
        within: std::time::Duration,
    ) -> std::collections::HashSet<(String, u32)> {
        let within = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        self.kept
            .iter()
            .filter(|(_, ms)| now_ms.saturating_sub(**ms) < within)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The durable store. Cheap to clone (sled handles are reference-counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

impl Store {
    /// The sled database, for trees of other modules (publishing's id store).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// One atomic write: build it with the methods, then [`Store::apply`].
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    len: usize,
}

impl WriteBatch {
    /// `json`: the row serialised (see [`encode_row`]).
    pub fn put_row(&mut self, table: &str, key: &str, part: u32, off: i64, json: &[u8]) {
        let mut v = Vec::with_capacity(12 + json.len());
        v.extend_from_slice(&part.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(json);
        self.batch.insert(two(b'r', table, key), v);
        self.len += 1;
    }
    pub fn remove_row(&mut self, table: &str, key: &str) {
        self.batch.remove(two(b'r', table, key));
        self.len += 1;
    }
    /// Forgets the pending delete of `key` (see [`WriteBatch::mark_deleted`]).
    pub fn unmark_deleted(&mut self, table: &str, key: &str) {
        self.batch.remove(two(b'o', table, key));
        self.len += 1;
    }
    pub fn put_table(&mut self, table: &str, meta: &TableMeta) {
        self.batch.insert(
            one(b't', table),
            serde_json::to_vec(meta).unwrap_or_default(),
        );
        self.len += 1;
    }
    pub fn put_slice(&mut self, table: &str, part: u32, meta: &SliceMeta) {
        self.batch.insert(
            slice_key(b's', table, part),
            serde_json::to_vec(meta).unwrap_or_default(),
        );
        self.len += 1;
    }
    pub fn put_acks(&mut self, table: &str, part: u32, meta: &AckMeta) {
        self.batch.insert(
            slice_key(b'a', table, part),
            serde_json::to_vec(meta).unwrap_or_default(),
        );
        self.len += 1;
    }
    pub fn set_position(&mut self, topic: &str, partition: i32, next_offset: i64) {
        self.batch.insert(
            position_key(topic, partition),
            next_offset.to_be_bytes().to_vec(),
        );
        self.len += 1;
    }
    pub fn remove_position(&mut self, topic: &str, partition: i32) {
        self.batch.remove(position_key(topic, partition));
        self.batch.remove(meta_key(LAST_PREFIX, topic, partition));
        self.len += 1;
    }
    /// An input partition whose offsets restarted goes on from `next_offset`, following no known
    /// record and no source positions (a new topic is a new stream).
    pub fn restart_position(&mut self, topic: &str, partition: i32, next_offset: i64) {
        self.batch.remove(meta_key(LAST_PREFIX, topic, partition));
        self.batch.remove(marks_key(topic, partition));
        self.set_position(topic, partition, next_offset);
    }
    /// The record an input partition's position follows (the last one applied), stored with it.
    pub fn set_last_record(&mut self, topic: &str, partition: i32, last: LastApplied) {
        self.batch.insert(
            meta_key(LAST_PREFIX, topic, partition),
            last.to_bytes().to_vec(),
        );
        self.len += 1;
    }
    /// The changelog record a slice's position in `topic`/`partition` follows (the one its
    /// follower read last, or one its owner wrote), stored with that position.
    pub fn set_changelog_read(&mut self, topic: &str, partition: i32, last: ReadLast) {
        self.batch
            .insert(meta_key(CL_READ_PREFIX, topic, partition), last.to_bytes());
        self.len += 1;
    }
    /// The source positions reached in an input partition, stored with its position.
    pub fn set_source_marks(&mut self, topic: &str, partition: i32, marks: &SourceMarks) {
        self.batch.insert(
            marks_key(topic, partition),
            serde_json::to_vec(marks).unwrap_or_default(),
        );
        self.len += 1;
    }
    /// A deleted key whose tombstone is not yet acknowledged by the changelog.
    pub fn mark_deleted(&mut self, table: &str, key: &str, part: u32, off: i64) {
        self.batch
            .insert(two(b'o', table, key), part_off(part, off));
        self.len += 1;
    }
    pub fn add_dead_letter(&mut self, id: u64, letter: &DeadLetter) {
        let bytes = serde_json::to_vec(letter).unwrap_or_default();
        self.batch.insert(dead_letter_key(id), bytes);
        self.len += 1;
    }
    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A row as stored and as produced to the changelog: its JSON.
pub fn encode_row(row: &Row) -> Vec<u8> {
    // serialising a Map of Values cannot fail
    serde_json::to_vec(row).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()?;
        let tree = db.open_tree(TREE)?;
        Ok(Store { db, tree })
    }

    /// Applies a batch atomically (not yet flushed: see [`Store::flush`]).
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.len > 0 {
            self.tree.apply_batch(batch.batch)?;
        }
        Ok(())
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Blocking flush, for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Removes the outbox mark of a deleted `table/key` if it still names `off` (a newer delete
    /// keeps it).
    pub fn clear_deleted(
        &self,
        table: &str,
        key: &str,
        part: u32,
        off: i64,
    ) -> Result<(), StoreError> {
        let _ = self.tree.compare_and_swap(
            two(b'o', table, key),
            Some(part_off(part, off)),
            None as Option<Vec<u8>>,
        )?;
        Ok(())
    }

    /// Records a table (its lineage, input topic and partition count), so a restart knows it.
    pub fn put_table(&self, table: &str, meta: &TableMeta) -> Result<(), StoreError> {
        self.tree.insert(
            one(b't', table),
            serde_json::to_vec(meta).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Records how far a slice's changelog is acknowledged (the checkpointer's part).
    pub fn put_acks(&self, table: &str, part: u32, meta: &AckMeta) -> Result<(), StoreError> {
        self.tree.insert(
            slice_key(b'a', table, part),
            serde_json::to_vec(meta).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// The changelog record a position in `topic`/`partition` follows, if one is stored
    /// ([`WriteBatch::set_changelog_read`]); a malformed one reads as none.
    pub fn changelog_read(&self, topic: &str, partition: i32) -> Option<ReadLast> {
        let v = self
            .tree
            .get(meta_key(CL_READ_PREFIX, topic, partition))
            .ok()??;
        ReadLast::from_bytes(&v)
    }

    /// Removes an acknowledged dead letter from the outbox.
    pub fn clear_dead_letter(&self, id: u64) -> Result<(), StoreError> {
        self.tree.remove(dead_letter_key(id))?;
        Ok(())
    }

    /// Removes every row, the slice and the outbox marks of one slice (before reading it again).
    pub fn clear_slice(&self, table: &str, part: u32) -> Result<(), StoreError> {
        self.clear_slices(table, &[part])
    }

    /// [`Store::clear_slice`] for several slices of `table`, in one pass over its rows.
    pub fn clear_slices(&self, table: &str, parts: &[u32]) -> Result<(), StoreError> {
        let of_parts = |v: &[u8]| v.len() >= 4 && parts.iter().any(|p| v[..4] == p.to_be_bytes());
        let mut b = sled::Batch::default();
        for kind in [b'r', b'o'] {
            for item in self.tree.scan_prefix(prefix(kind, table)) {
                let (k, v) = item?;
                if of_parts(&v) {
                    b.remove(k);
                }
            }
        }
        for part in parts {
            b.remove(slice_key(b's', table, *part));
            b.remove(slice_key(b'a', table, *part));
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    /// Removes every stored input position and source mark (before the slices are read anew:
    /// both were written with rows and outbox marks that are gone, so the input must start where
    /// the changelog ends, and a change applied again must not look re-sent).
    pub fn clear_input_positions(&self) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for item in self
            .tree
            .scan_prefix(b"p")
            .chain(self.tree.scan_prefix(MARKS_PREFIX))
            .chain(self.tree.scan_prefix(LAST_PREFIX))
        {
            b.remove(item?.0);
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    /// Bytes on disk, as sled reports them.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Marks the store with its layout version.
    pub fn stamp(&self) -> Result<(), StoreError> {
        self.tree.insert(VERSION_KEY, b"2".to_vec())?;
        Ok(())
    }

    /// Starts a run: whether the previous one stopped cleanly (a store that never ran counts as
    /// clean). The mark is removed durably, so a crash from here on is an unclean stop.
    pub fn begin_run(&self) -> Result<bool, StoreError> {
        let never_ran = self.tree.get(VERSION_KEY)?.is_none();
        let clean = self.tree.remove(CLEAN_KEY)?.is_some();
        self.tree.flush()?;
        Ok(never_ran || clean)
    }

    /// Records that a process uses the store at `now_ms` (made durable with the next flush).
    pub fn mark_alive(&self, now_ms: i64) -> Result<(), StoreError> {
        self.tree.insert(ALIVE_KEY, now_ms.to_be_bytes().to_vec())?;
        Ok(())
    }

    /// Ends a run cleanly: everything applied is flushed (call after the final flush).
    pub fn end_run(&self) -> Result<(), StoreError> {
        self.mark_alive(crate::table::checkpoint::now_ms())?;
        self.tree.insert(CLEAN_KEY, b"1".to_vec())?;
        self.tree.flush()?;
        Ok(())
    }
}

fn one(kind: u8, a: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + a.len());
    k.push(kind);
    k.extend_from_slice(a.as_bytes());
    k
}

fn prefix(kind: u8, table: &str) -> Vec<u8> {
    let mut k = one(kind, table);
    k.push(0);
    k
}

fn two(kind: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len() + b.len());
    k.push(kind);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn slice_key(kind: u8, table: &str, part: u32) -> Vec<u8> {
    let mut k = prefix(kind, table);
    k.extend_from_slice(&part.to_be_bytes());
    k
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = prefix(b'p', topic);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

const MARKS_PREFIX: &[u8] = b"mseq";
/// The record an input partition's position follows ([`RecordId`]). Under `m`, so that a version
/// that does not know it skips it.
const LAST_PREFIX: &[u8] = b"mlast";

/// The changelog record a slice's position follows ([`ReadLast`]), by changelog topic and
/// partition.
const CL_READ_PREFIX: &[u8] = b"mclread";

fn marks_key(topic: &str, partition: i32) -> Vec<u8> {
    meta_key(MARKS_PREFIX, topic, partition)
}

fn meta_key(prefix: &[u8], topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + topic.len() + 5);
    k.extend_from_slice(prefix);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// `topic \0 partition` (big-endian i32).
fn split_topic_partition(rest: &[u8]) -> Option<(String, i32)> {
    let split = rest.len().checked_sub(5)?;
    if rest[split] != 0 {
        return None;
    }
    let topic = utf8(&rest[..split])?;
    let partition = i32::from_be_bytes(rest[split + 1..].try_into().ok()?);
    Some((topic, partition))
}

fn dead_letter_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'd'];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn part_off(part: u32, off: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&part.to_be_bytes());
    v.extend_from_slice(&off.to_be_bytes());
    v
}

fn read_part_off(v: &[u8]) -> Option<(u32, i64)> {
    Some((
        u32::from_be_bytes(v.get(..4)?.try_into().ok()?),
        i64::from_be_bytes(v.get(4..12)?.try_into().ok()?),
    ))
}

fn utf8(b: &[u8]) -> Option<String> {
    std::str::from_utf8(b).ok().map(String::from)
}

fn split_at_nul(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == 0)?;
    Some((&b[..i], &b[i + 1..]))
}

fn split_two(b: &[u8]) -> Option<(String, String)> {
    let (a, b) = split_at_nul(b)?;
    Some((utf8(a)?, utf8(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: serde_json::Value) -> Row {
        v.as_object().unwrap().clone()
    }

    /// sled's background flusher may hold the directory's lock for a moment after a drop.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Store::open(dir).unwrap()
    }

    #[test]
    fn a_restarted_position_follows_no_record_and_no_source_positions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let last = LastApplied {
            record: crate::table::position::RecordId::new(99, Some(1), None, Some(b"{}")),
            owners: 3,
        };
        let marks: SourceMarks = [("s".to_string(), (1, 2))].into_iter().collect();
        let mut b = WriteBatch::default();
        for part in [0, 1] {
            b.set_position("cdc.t", part, 100);
            b.set_last_record("cdc.t", part, last);
            b.set_source_marks("cdc.t", part, &marks);
        }
        store.apply(b).unwrap();
        let mut b = WriteBatch::default();
        b.restart_position("cdc.t", 1, 0);
        store.apply(b).unwrap();
        let l = store.load().unwrap();
        let tp = |p: i32| ("cdc.t".to_string(), p);
        assert_eq!((l.positions[&tp(0)], l.positions[&tp(1)]), (100, 0));
        assert_eq!(l.last_records.get(&tp(0)), Some(&last));
        assert!(l.source_marks.contains_key(&tp(0)));
        assert_eq!(l.last_records.get(&tp(1)), None);
        assert!(!l.source_marks.contains_key(&tp(1)));
    }

    #[test]
    fn the_changelog_record_read_last_round_trips_by_topic_and_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = ReadLast::Record(crate::table::position::RecordId::new(
            12,
            Some(5),
            Some(b"k"),
            Some(b"{}"),
        ));
        let mut b = WriteBatch::default();
        b.set_changelog_read("g.table.t", 1, id);
        store.apply(b).unwrap();
        assert_eq!(store.changelog_read("g.table.t", 1), Some(id));
        assert_eq!(store.changelog_read("g.table.t", 0), None);
        assert_eq!(store.changelog_read("g.table.u", 1), None);
        // a malformed value reads as none; a load skips the key
        store
            .tree
            .insert(meta_key(CL_READ_PREFIX, "g.table.t", 0), &b"short"[..])
            .unwrap();
        assert_eq!(store.changelog_read("g.table.t", 0), None);
        assert!(store.load().is_ok());
    }

    #[test]
    fn batch_round_trips_with_slices_positions_and_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        b.put_table(
            "odds",
            &TableMeta {
                epoch: "ep1".into(),
                source: "cdc.odds".into(),
                partitions: 2,
            },
        );
        let g1 = row(json!({"game_id": "g1", "odd1": "1.5"}));
        b.put_row("odds", "g1", 0, 41, &encode_row(&g1));
        b.put_row(
            "odds",
            "g2",
            1,
            7,
            &encode_row(&row(json!({"game_id": "g2"}))),
        );
        let s0 = SliceMeta {
            last_off: 41,
            count: 30,
            owner: "0.3".into(),
            owned: true,
            kept_ms: None,
        };
        b.put_slice("odds", 0, &s0);
        b.put_acks(
            "odds",
            0,
            &AckMeta {
                acked: 40,
                cl_next: 12,
            },
        );
        b.put_slice(
            "odds",
            1,
            &SliceMeta {
                owned: false,
                ..s0.clone()
            },
        );
        b.set_position("cdc.odds", 0, 42);
        let last = LastApplied {
            record: crate::table::position::RecordId::new(41, Some(1), Some(b"k"), Some(b"{}")),
            owners: 7,
        };
        b.set_last_record("cdc.odds", 0, last);
        b.mark_deleted("odds", "g8", 0, 39);
        b.mark_deleted("odds", "g9", 0, 41);
        let letter = DeadLetter {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: None,
            value: Some(b"x".to_vec()),
            reason: "invalid_json".into(),
            error: "e".into(),
            truncated: false,
        };
        b.add_dead_letter(9, &letter);
        store.apply(b).unwrap();
        store.clear_deleted("odds", "g8", 0, 39).unwrap();
        store.clear_deleted("odds", "g9", 0, 40).unwrap(); // another offset: kept
        store.flush_blocking().unwrap();
        drop(store);

        let store = reopen(dir.path());
        let l = store.load().unwrap();
        assert!(!l.ignored_old_layout);
        assert_eq!(l.tables.len(), 1);
        let t = &l.tables[0];
        assert_eq!(
            (&*t.epoch, &*t.source, t.slices.len()),
            ("ep1", "cdc.odds", 2)
        );
        assert_eq!(*t.rows["g1"].row, g1);
        assert_eq!((t.rows["g1"].part, t.rows["g1"].off), (0, 41));
        assert_eq!(t.slices[0].mode, SliceMode::Owned);
        assert_eq!(t.slices[1].mode, SliceMode::Followed);
        assert_eq!((t.slices[0].count, t.slices[0].acked), (30, 40));
        assert_eq!(t.slices[0].tombs.get("g9"), Some(&41));
        assert_eq!(l.positions[&("cdc.odds".to_string(), 0)], 42);
        assert_eq!(l.last_records[&("cdc.odds".to_string(), 0)], last);
        assert_eq!(l.deletes.len(), 1);
        assert_eq!(l.dead_letters, vec![(9, letter)]);
        store.clear_dead_letter(9).unwrap();
        store.clear_slice("odds", 0).unwrap();
        let l = store.load().unwrap();
        assert!(l.dead_letters.is_empty());
        assert_eq!(l.tables[0].rows.len(), 1, "only partition 1's row is left");
        assert_eq!(l.tables[0].slices[0].mode, SliceMode::Absent);
        assert!(l.deletes.is_empty());
    }

    /// A slice let go of at a clean stop is loaded as kept, with when; one written by a follower
    /// or by a restore (no time) is not, nor is an owned one.
    #[test]
    fn a_slice_let_go_of_at_a_clean_stop_is_loaded_as_kept_while_recent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        b.put_table(
            "t",
            &TableMeta {
                epoch: "ep".into(),
                source: "cdc.t".into(),
                partitions: 3,
            },
        );
        let meta = |owned, kept_ms| SliceMeta {
            last_off: 9,
            count: 10,
            owner: "1.0".into(),
            owned,
            kept_ms,
        };
        b.put_slice("t", 0, &meta(false, Some(1_000)));
        b.put_slice("t", 1, &meta(false, None));
        b.put_slice("t", 2, &meta(true, Some(1_000)));
        store.apply(b).unwrap();
        let l = store.load().unwrap();
        assert_eq!(l.kept.len(), 1);
        let day = std::time::Duration::from_secs(86_400);
        let kept = l.kept_since(1_000 + 3_600_000, day);
        assert!(kept.contains(&("t".to_string(), 0)));
        assert_eq!(kept.len(), 1, "followed without a time, or owned: not kept");
        assert!(
            l.kept_since(1_000 + 86_400_000, day).is_empty(),
            "kept a day ago: read anew"
        );
    }

    /// The alive mark: none on a store never marked (read anew), the last mark otherwise, and a
    /// clean stop marks it too.
    #[test]
    fn the_store_says_when_it_was_last_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let day = std::time::Duration::from_secs(86_400);
        {
            let store = Store::open(dir.path()).unwrap();
            let l = store.load().unwrap();
            assert_eq!(l.alive_ms, None);
            assert!(
                l.unused_since(0, day),
                "never marked: not known to be recent"
            );
            store.mark_alive(5_000).unwrap();
            store.mark_alive(7_000).unwrap();
            let l = store.load().unwrap();
            assert_eq!(l.alive_ms, Some(7_000));
            assert!(!l.unused_since(7_000 + 86_399_999, day));
            assert!(l.unused_since(7_000 + 86_400_000, day));
            let before = crate::table::checkpoint::now_ms();
            store.end_run().unwrap();
            assert!(store.load().unwrap().alive_ms.unwrap() >= before);
        }
        let l = reopen(dir.path()).load().unwrap();
        assert!(
            l.alive_ms.unwrap() > 7_000,
            "the stop's mark is durable: {:?}",
            l.alive_ms
        );
    }

    /// Tables whose names prefix one another keep their own rows, every key once.
    #[test]
    fn load_groups_rows_by_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = ["odds", "odds2", "od", "odds.x"];
        let mut b = WriteBatch::default();
        for (i, name) in names.iter().enumerate() {
            b.put_table(
                name,
                &TableMeta {
                    epoch: format!("ep{i}"),
                    source: format!("cdc.{name}"),
                    partitions: 1,
                },
            );
            // keys in no order, some of them prefixes of others
            for n in (0..300).rev() {
                let key = format!("k{}", (n * 7919) % 300);
                let r = row(json!({"t": name, "k": key}));
                b.put_row(name, &key, 0, n, &encode_row(&r));
            }
        }
        store.apply(b).unwrap();
        let l = store.load().unwrap();
        assert_eq!(l.tables.len(), names.len());
        for t in &l.tables {
            assert_eq!(t.rows.len(), 300, "{}", t.name);
            for (k, e) in &t.rows {
                assert_eq!(e.row["t"], json!(*t.name));
                assert_eq!(e.row["k"], json!(k));
            }
        }
    }
}
