//! The views' changelog topics: one compacted topic of one partition per declared view,
//! `<changelog-prefix>__view.<name>`, holding the view's rows (key = view row key, value = the
//! row as JSON, a tombstone when the row goes), so that other systems can read a view like any
//! KTable and a node that lost its data directory gets its views back.
//!
//! # Who writes
//! Every serving node computes every view; exactly one writes each view's topic: the member of
//! the consumer group `<group-id>.views` (every serving node with views joins it, subscribed to
//! the views' topics) that is assigned the topic's partition ([`writer`]). A node that takes a
//! view over first reads its topic, then writes the whole view (every row, and a tombstone for
//! each key the topic holds that the view does not), then every change after it. A revoke stops
//! the writer, after it flushed what it sent (up to 3 s), before the group gives the view to
//! another member (cooperative-sticky: a membership change moves only the views it must). Records
//! a revoked writer still had in flight may land after the next writer's first ones; each row
//! still carries its own mark, so a restore stays exact.
//!
//! # What a record says ([`Mark`])
//! Every record carries, in header [`HEADER_MARK`], where the view's input stood when the row was
//! computed: for a view over an events topic, the next offset of each partition of that topic;
//! for a view over a table, the table's resume token and change count (informative only); and
//! for a row whose operator keeps more than the row shows (`avg`: the exact sum and count), that
//! state, so that a restore goes on from it. Header
//! [`HEADER_FLOOR`] carries the positions up to which the writer knew every output to be in the
//! topic (acknowledged by the broker). A row and its mark always go together, whatever writer
//! wrote them, so records from a writer that stopped part-way through a commit, or from two
//! writers around a hand-over, or a topic the broker compacted, still give a consistent row per
//! key.
//!
//! # Restore ([`read`], `Views::restore_from_logs`)
//! A node that starts without a usable saved state of the views over an events topic (a new or
//! lost data directory, an unclean stop) reads their topics: each restorable view (plan
//! `FromOutput`: its rows are its whole state, or `FromOutputAndRowState`: its rows with the
//! state their marks carry; rows of another definition of the view, or lacking that state, are
//! refused) is rebuilt from its rows. Its position on each partition starts at the lowest of the
//! last floor and every row's mark (a row of the floor's own writer counts up to the floor), and
//! an event at or after that point whose output row already holds it is skipped (each event of
//! such a view changes exactly one output row); events below the view's position are skipped
//! too (the reader starts at the lowest position any view of the topic needs: 0 when one of them
//! is computed from the beginning). So no event is counted twice or lost, and events the topic
//! no longer retains are not needed unless a view of the topic could not be restored.
//! `history` and `delta` without `key` over a table are read at start too (their marks name the
//! input change each row holds: `table::derived`'s `reconcile.rs`), and so are a keyed `history`
//! and a `group_by` with `latest` over a table (their marks name how far the view had taken each
//! input partition: `reconcile.rs`, `order.rs`); other views over tables are computed from the
//! table.

pub mod read;
pub mod writer;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cdc::decode::Row;

/// Header naming the view a record belongs to.
pub const HEADER_VIEW: &str = "livetable.view";
/// Header with the record's [`Mark`] (JSON).
pub const HEADER_MARK: &str = "livetable.view.mark";
/// Header with the writer's floor when it sent the record ([`Mark`] JSON; absent: none yet).
pub const HEADER_FLOOR: &str = "livetable.view.floor";
/// Header naming the view's definition the row was computed by (a hash of its input, operator,
/// options and its events topic's declaration): a restore refuses rows of another definition.
pub const HEADER_DEF: &str = "livetable.view.def";
/// Header naming the process that wrote the record.
pub const HEADER_WRITER: &str = "livetable.view.writer";

/// The topic of view `name`: `<prefix>__view.<name>`, with characters Kafka does not accept in
/// topic names replaced by `_`.
pub fn topic(prefix: &str, name: &str) -> String {
    let mut t = format!("{prefix}__view.");
    t.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        }
    }));
    t.truncate(249);
    t
}

/// A short stable id of a view's definition text (FNV-1a, 64 bits, hex): the same on every node
/// and version that computes the same text.
pub fn def_id(text: &str) -> String {
    format!("{:016x}", crate::digest::Fnv1a::of(text.as_bytes()))
}

/// Where a view's input stood when a row of it was computed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    /// Views over events: the next offset of each partition of the events topic, by partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<(i32, i64)>,
    /// Views over tables: the input table's resume token and change count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// What the row does not show and a restore needs, kept with the row
    /// ([`crate::views::ViewOperator::row_state`]: an `avg`'s exact sum and count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
    /// Views over a table whose rows are its input rows' (`history`, `delta` without `key`):
    /// the input partition and offset of the change of the row's input key the row last took
    /// (the lineage is `input`'s epoch). A restore skips what the row already holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<(u32, i64)>,
    /// Views over a table with several input rows per output row whose output depends on the
    /// order of their changes (`history` with `key` columns, `group_by` with `latest`): per
    /// input partition, the last offset up to which the view took the input's changes when the
    /// record was written (the lineage is `input`'s epoch). A restore holds an input row whose
    /// change is at or below the position of its output row's record (a `latest` places it
    /// before the rows changed since).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upto: Vec<(u32, i64)>,
}

impl Mark {
    /// The next offset of events partition `p` this mark covers (0: none of it).
    pub fn next(&self, p: i32) -> i64 {
        self.events
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(0, |(_, n)| *n)
    }

    /// The input table's lineage named by `input` (views over tables).
    pub fn input_epoch(&self) -> Option<&str> {
        self.input
            .as_deref()
            .and_then(|i| i.split_once('#'))
            .map(|(e, _)| e)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One commit of a view's output, for its topic.
#[derive(Debug)]
pub struct Commit {
    pub view: Arc<str>,
    /// The view table's position after this commit (orders commits against a full rewrite).
    pub off: i64,
    /// Each changed row with its mark.
    pub changes: Vec<(String, Option<Arc<Row>>, Arc<Mark>)>,
    /// Where the input stood after the commit (a restored view's rows may carry higher marks):
    /// the writer's floor once the commit is acknowledged.
    pub base: Arc<Mark>,
}

/// Shared between a view and the writer.
#[derive(Debug, Default)]
pub struct LogFlags {
    /// This node writes the view's topic: its commits are sent to the writer.
    pub writes: AtomicBool,
    /// The topic may lack some of the view's changes (a commit could not be queued or produced):
    /// the writer writes the whole view again.
    pub dirty: AtomicBool,
    /// The view's events input started over (its topic was created again): the writer's floor
    /// names the old offsets and is dropped before the next record, until a whole rewrite with
    /// marks of the new offsets is acknowledged (set before any commit of the new offsets).
    pub input_reset: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_legal_and_apart_from_tables() {
        assert_eq!(topic("g.table.", "balances"), "g.table.__view.balances");
        assert_eq!(topic("p.", "a b/ä"), "p.__view.a_b__");
        assert_eq!(topic("p.", &"x".repeat(400)).len(), 249);
        // a table's changelog topic never starts with `__` after the prefix
        assert_ne!(
            crate::table::changelog::topic_name("p.", "__view.x"),
            topic("p.", "x")
        );
    }

    #[test]
    fn definition_ids_are_stable_and_tell_definitions_apart() {
        assert_eq!(def_id(""), "cbf29ce484222325");
        assert_eq!(def_id("a"), "af63dc4c8601ec8c");
        assert_ne!(def_id("scores|Events|x"), def_id("scores|Events|y"));
    }

    #[test]
    fn a_mark_reads_back_and_covers_only_its_partitions() {
        let m = Mark {
            events: vec![(0, 5), (2, 9)],
            input: None,
            state: None,
            at: None,
            upto: vec![(1, 7)],
        };
        let back: Mark = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!((m.next(0), m.next(1), m.next(2)), (5, 0, 9));
        assert_eq!(Mark::default().to_json(), "{}");
    }
}
