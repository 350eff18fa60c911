//! Folding changelog records into a slice: the rules every reader of a changelog partition follows
//! (restores on assignment and the follower of a gateway alike).
//!
//! - A fence record opens the tenure of a new owner: from then on, records of smaller owners are a
//!   former owner's late writes (it had not yet noticed its revoke) and are ignored.
//! - A record whose change is not newer than what the slice already reflects for its key (the row's
//!   last change, or its delete) is ignored: a value never goes back.
//! - Records written by this node's own previous tenure ([`Own`]) of changes up to the slice's
//!   position in its local state are skipped: that state holds them, or something newer. Its later
//!   records are folded like any other: after a kill -9 the store reopens at its last flush, behind
//!   records the broker had already acknowledged, and another owner may have committed the input
//!   past them since, so the input would never bring them back.
//! - The slice's position and change count follow the record headers, so that a reader ends at the
//!   same `seq` and position as the writer.
//! - A fence that says the owner's input partition started over (`input-reset`) makes the reader
//!   forget the slice's position and give its rows offset -1, as the owner did: the next records'
//!   input offsets start from 0 again and must not be taken for older ones than the rows'.

use crate::cdc::decode::Op;
use crate::table::changelog::{ChangelogRecord, FenceKind};
use crate::table::position::Owner;
use crate::table::state::{Delta, RowWrite, Staged};

/// What folding one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    Fence,
    /// A fence that ends an owner's rewrite of a partition that started over (see
    /// [`crate::table::repair`]): a reader that read the partition before it started over reads it
    /// again from its beginning.
    Restarted,
    /// A fence of the slice's current owner that says its input partition started over: the
    /// slice's position, acknowledged offset and deletes are forgotten ([`Delta::reset_input`]).
    InputReset,
    /// A record of an owner older than the partition's latest fence: ignored.
    Fenced,
    /// A record of this node's own earlier tenure that its local state already reflects.
    Own,
    Applied,
    Unchanged,
    /// Older than what the slice reflects for its key.
    Stale,
    /// A record of another table (a topic two tables shared before their topic names were
    /// told apart): skipped.
    OtherTable,
}

/// This node's own earlier tenure of a slice, as its local state reflects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    pub owner: Owner,
    /// The slice's input position in the local state: every change up to it is there.
    pub through: i64,
}

/// Folds one record of slice `rec.part` of `table`'s changelog into `delta` (a record that
/// names another table is skipped: livetable before 2026-12-06 wrote tables whose names differ
/// only in characters Kafka does not accept, `a b` and `a_b`, into one topic).
pub fn fold_into(table: &str, delta: &mut Delta, rec: ChangelogRecord, own: Option<Own>) -> Folded {
    if rec.named && rec.table != table {
        let s = delta.slice(rec.part);
        s.cl_next = s.cl_next.max(rec.cl_offset + 1);
        if crate::cdc::source::throttled(
            "changelog-other-table",
            std::time::Duration::from_secs(60),
        ) {
            tracing::warn!(table, other = %rec.table, "a changelog record of another table in this table's topic (written by a livetable before 2026-12-06); skipped (repeated at most every 60 s)");
        }
        return Folded::OtherTable;
    }
    fold(delta, rec, own)
}

/// Folds one record of slice `rec.part` into `delta`.
pub fn fold(delta: &mut Delta, rec: ChangelogRecord, own: Option<Own>) -> Folded {
    let part = rec.part;
    {
        let s = delta.slice(part);
        s.cl_next = s.cl_next.max(rec.cl_offset + 1);
        if let Some(kind) = rec.fence {
            let current = rec.meta.owner >= s.owner;
            if rec.meta.owner > s.owner {
                s.owner = rec.meta.owner;
            }
            return match kind {
                FenceKind::Open => Folded::Fence,
                FenceKind::Restarted => Folded::Restarted,
                // a former owner's (it had not noticed its revoke): its input offsets are not
                // the slice's
                FenceKind::InputReset if !current => Folded::Fenced,
                // this node's own: its store took the reset before the fence was written, and
                // holds changes of the new offsets after it
                FenceKind::InputReset if own.is_some_and(|o| o.owner == rec.meta.owner) => {
                    Folded::Own
                }
                FenceKind::InputReset => {
                    delta.reset_input(part);
                    Folded::InputReset
                }
            };
        }
        if rec.meta.owner < s.owner {
            return Folded::Fenced;
        }
        // a writer whose fence this reader did not see (compacted away): its tenure began
        s.owner = rec.meta.owner;
        if own.is_some_and(|o| o.owner == rec.meta.owner && rec.meta.off <= o.through) {
            return Folded::Own;
        }
        s.acked = s.acked.max(rec.meta.acked);
    }
    let off = rec.meta.off;
    if off >= 0 && delta.is_stale(&rec.key, part, off) {
        return Folded::Stale;
    }
    let count = rec.meta.count;
    let newest = off >= delta.slice(part).last_off;
    let deleted = rec.row.is_none();
    let staged = delta.stage(RowWrite {
        key: rec.key,
        row: rec.row,
        op: if deleted { Op::Delete } else { Op::Update },
        part,
        off,
        ts_ms: rec.meta.ts_ms,
        kafka_ts_ms: None,
        polled: None,
    });
    if newest && count > 0 {
        // the writer's count is authoritative: every reader ends at the writer's seq
        delta.slice(part).count = count;
    }
    match staged {
        Staged::Applied => Folded::Applied,
        Staged::Unchanged => Folded::Unchanged,
        Staged::Stale => Folded::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::changelog::RecordMeta;
    use crate::table::state::{NoSink, Tables};
    use crate::table::stored_row::StoredRow;
    use serde_json::json;

    fn rec(key: &str, v: Option<i64>, off: i64, owner: (u32, i32), cl: i64) -> ChangelogRecord {
        ChangelogRecord {
            table: "t".into(),
            named: true,
            part: 0,
            cl_offset: cl,
            key: key.into(),
            row: v.map(|v| StoredRow::from_json(json!({"v": v}).to_string().as_bytes()).unwrap()),
            meta: RecordMeta {
                off,
                count: (off + 1) as u64,
                acked: off - 2,
                owner: Owner {
                    epoch: owner.0,
                    generation: owner.1,
                },
                ts_ms: None,
            },
            fence: None,
        }
    }

    fn fence(owner: (u32, i32), cl: i64) -> ChangelogRecord {
        fence_of(FenceKind::Open, owner, cl)
    }

    fn fence_of(kind: FenceKind, owner: (u32, i32), cl: i64) -> ChangelogRecord {
        ChangelogRecord {
            fence: Some(kind),
            ..rec("", None, -1, owner, cl)
        }
    }

    #[test]
    fn a_record_of_another_table_is_skipped_and_read_past() {
        let tables = Tables::default();
        let t = tables.ensure("a_b", "e", "in", 1);
        let mut d = Delta::new(t.clone());
        let other = ChangelogRecord {
            table: "a b".into(),
            ..rec("k", Some(1), 10, (0, 1), 0)
        };
        assert_eq!(fold_into("a_b", &mut d, other, None), Folded::OtherTable);
        assert_eq!(d.slice(0).cl_next, 1, "read past");
        // a record without a table header is the topic's table
        let unnamed = ChangelogRecord {
            table: "whatever".into(),
            named: false,
            ..rec("k", Some(2), 11, (0, 1), 1)
        };
        assert_eq!(fold_into("a_b", &mut d, unnamed, None), Folded::Applied);
        let mine = ChangelogRecord {
            table: "a_b".into(),
            ..rec("j", Some(3), 12, (0, 1), 2)
        };
        assert_eq!(fold_into("a_b", &mut d, mine, None), Folded::Applied);
        tables.commit(d, &NoSink);
        let keys: Vec<String> = t.read().rows.keys().cloned().collect();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, ["j", "k"]);
        assert_eq!(t.read().rows.get("k").map(|e| e.off), Some(11));
    }

    #[test]
    fn a_partition_written_again_reads_the_same_and_its_end_fence_says_so() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 1);
        let mut d = Delta::new(t.clone());
        assert_eq!(fold(&mut d, fence((0, 1), 0), None), Folded::Fence);
        assert_eq!(
            fold(&mut d, rec("a", Some(5), 50, (0, 1), 1), None),
            Folded::Applied
        );
        // the topic deleted and created again: the owner writes the same row at a lower
        // changelog offset (not newer: ignored), then a `restarted` fence of the same owner
        assert_eq!(
            fold(&mut d, rec("a", Some(5), 50, (0, 1), 0), None),
            Folded::Stale
        );
        let end = fence_of(FenceKind::Restarted, (0, 1), 1);
        assert_eq!(fold(&mut d, end, None), Folded::Restarted);
        // still the same owner's tenure: its next records apply
        assert_eq!(
            fold(&mut d, rec("a", Some(6), 51, (0, 1), 2), None),
            Folded::Applied
        );
    }

    #[test]
    fn fences_stop_former_owners_and_values_never_go_back() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 1);
        let mut d = Delta::new(t.clone());
        assert_eq!(
            fold(&mut d, rec("a", Some(1), 10, (0, 1), 0), None),
            Folded::Applied
        );
        assert_eq!(fold(&mut d, fence((0, 2), 1), None), Folded::Fence);
        assert_eq!(
            fold(&mut d, rec("a", Some(2), 12, (0, 2), 2), None),
            Folded::Applied
        );
        // the former owner's late write of a newer input offset: ignored all the same
        assert_eq!(
            fold(&mut d, rec("a", Some(9), 13, (0, 1), 3), None),
            Folded::Fenced
        );
        // an older value of the current owner (a resend that raced): ignored
        assert_eq!(
            fold(&mut d, rec("a", Some(1), 10, (0, 2), 4), None),
            Folded::Stale
        );
        assert_eq!(
            fold(&mut d, rec("b", None, 14, (0, 2), 5), None),
            Folded::Unchanged
        );
        assert_eq!(
            fold(&mut d, rec("c", Some(3), 15, (0, 2), 6), None),
            Folded::Applied
        );
        assert_eq!(
            fold(&mut d, rec("c", None, 16, (0, 2), 7), None),
            Folded::Applied
        );
        assert_eq!(
            fold(&mut d, rec("c", Some(3), 15, (0, 2), 8), None),
            Folded::Stale,
            "deleted at 16"
        );
        tables.commit(d, &NoSink);
        let s = t.read();
        assert_eq!(s.rows["a"].row.get("v"), Some(&json!(2)));
        assert!(!s.rows.contains_key("c"));
        assert_eq!(s.slices[0].cl_next, 9);
        assert_eq!(s.slices[0].last_off, 16);
        assert_eq!(s.seq(), 17, "the writer's count");
        assert_eq!(
            s.slices[0].owner,
            Owner {
                epoch: 0,
                generation: 2
            }
        );
    }

    #[test]
    fn an_input_reset_fence_makes_the_new_offsets_apply_over_the_old_rows() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 1);
        let mut d = Delta::new(t.clone());
        assert_eq!(fold(&mut d, fence((0, 1), 0), None), Folded::Fence);
        for (i, key) in ["a", "b", "gone"].iter().enumerate() {
            let off = 100 + i as i64;
            assert_eq!(
                fold(&mut d, rec(key, Some(1), off, (0, 1), off - 99), None),
                Folded::Applied
            );
        }
        assert_eq!(
            fold(&mut d, rec("gone", None, 103, (0, 1), 4), None),
            Folded::Applied
        );
        tables.commit(d, &NoSink);
        assert_eq!(t.read().slices[0].tombs.get("gone"), Some(&103));
        let mut d = Delta::new(t.clone());
        // a former owner's late fence is not the slice's: nothing forgotten
        let late = fence_of(FenceKind::InputReset, (0, 0), 5);
        assert_eq!(fold(&mut d, late, None), Folded::Fenced);
        assert_eq!(
            fold(&mut d, rec("a", Some(2), 3, (0, 1), 6), None),
            Folded::Stale,
            "without the owner's fence, offset 3 is older than the row's 100"
        );
        let reset = fence_of(FenceKind::InputReset, (0, 1), 7);
        assert_eq!(fold(&mut d, reset, None), Folded::InputReset);
        assert_eq!(d.slice(0).last_off, -1);
        for (key, off, cl) in [("a", 3, 8), ("gone", 4, 9)] {
            assert_eq!(
                fold(&mut d, rec(key, Some(2), off, (0, 1), cl), None),
                Folded::Applied,
                "{key}: a change of the new offsets"
            );
        }
        // within the new offsets, order holds again
        assert_eq!(
            fold(&mut d, rec("a", Some(1), 2, (0, 1), 10), None),
            Folded::Stale
        );
        tables.commit(d, &NoSink);
        let s = t.read();
        assert_eq!(s.rows["a"].row.get("v"), Some(&json!(2)));
        assert_eq!(s.rows["gone"].row.get("v"), Some(&json!(2)));
        assert_eq!(
            s.rows["b"].off, -1,
            "a row the new offsets never changed stays, older than any of them"
        );
        assert_eq!(s.slices[0].last_off, 4, "the position of the new offsets");
        assert_eq!(s.slices[0].acked, 2, "the new offsets' acknowledgement");
        assert!(s.slices[0].tombs.is_empty());
        assert_eq!(s.slices[0].resets, 1);
        assert_eq!(s.slices[0].cl_next, 11);
        drop(s);
        // a re-sent row (offset -1) changes no position; a new change of `b` applies although
        // its offset is below the row's old one
        let mut d = Delta::new(t.clone());
        assert_eq!(
            fold(&mut d, rec("b", Some(1), -1, (0, 1), 11), None),
            Folded::Unchanged
        );
        assert_eq!(d.slice(0).last_off, 4);
        assert_eq!(
            fold(&mut d, rec("b", Some(7), 5, (0, 1), 12), None),
            Folded::Applied
        );
        // this node's own fence, read again by a take-over: its store took the reset already
        let mine = Own {
            owner: Owner {
                epoch: 0,
                generation: 1,
            },
            through: 5,
        };
        let again = fence_of(FenceKind::InputReset, (0, 1), 7);
        assert_eq!(fold(&mut d, again, Some(mine)), Folded::Own);
        assert_eq!(d.slice(0).last_off, 5, "not forgotten again");
    }

    #[test]
    fn own_records_are_skipped_up_to_the_local_position_only() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e", "in", 1);
        let mine = Own {
            owner: Owner {
                epoch: 0,
                generation: 3,
            },
            through: 10,
        };
        let mut d = Delta::new(t);
        assert_eq!(
            fold(&mut d, rec("a", Some(1), 10, (0, 3), 0), Some(mine)),
            Folded::Own
        );
        assert!(d.changes.is_empty());
        // acknowledged by the broker, lost by the store (kill -9 before its flush): folded
        assert_eq!(
            fold(&mut d, rec("a", Some(2), 11, (0, 3), 1), Some(mine)),
            Folded::Applied
        );
        assert_eq!(d.slice(0).acked, 9, "its header counts like anyone's");
        // another owner's records are folded as ever
        assert_eq!(
            fold(&mut d, rec("b", Some(5), 7, (0, 3), 2), None),
            Folded::Applied
        );
    }
}
