//! What the hub keeps of one table's recent updates.
//!
//! The buffer owns the only strong references to a table's recent [`HubUpdate`]s. Subscribers
//! are sent weak ones (the broadcast channel and the routed queues hold [`std::sync::Weak`]), so
//! what the hub keeps for them is exactly what this buffer holds:
//! - the replay window: the newest updates, at most `--replay-buffer` changes, which resumes are
//!   served from;
//! - before it, older updates that some subscriber has not read yet (an update's weak count says
//!   so).
//!
//! Updates that every subscriber has read and no resume needs are dropped at the next update.
//! The byte budget (`--fanout-buffer-bytes`) is the process's, not a table's: the hub drops the
//! oldest updates of all tables' buffers, read or not, through [`UpdateBuffer::drop_oldest`]
//! (see `hub/budget.rs`). A subscriber that had not read one finds it gone and starts again (a
//! new snapshot), as when it lags behind the channel.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;

use super::{HubUpdate, Mark};
use crate::cdc::decode::Row;
use crate::table::position::{Position, Token};
use crate::table::state::TableUpdate;
use crate::table::stored_row::StoredRow;

/// What the hub keeps of its tables' updates.
#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// Changes in each table's replay window.
    pub changes: usize,
    /// Estimated bytes of all tables' updates kept, together.
    pub bytes: usize,
}

/// An update kept, with its place in the hub's publish order (across tables).
struct Kept {
    stamp: u64,
    update: Arc<HubUpdate>,
}

pub(super) struct UpdateBuffer {
    pub epoch: Arc<str>,
    /// Every update kept, oldest first; the newest `window` of them are the replay window.
    updates: VecDeque<Kept>,
    window: usize,
    window_changes: usize,
    bytes: usize,
    /// Per partition, the offset up to which changes may be missing from the window (evicted, or
    /// older than the buffer).
    pub floor: Position,
    /// The state after the last update published (or when the channel was made).
    pub last: Mark,
}

impl UpdateBuffer {
    pub fn new(epoch: Arc<str>, last: Mark) -> Self {
        UpdateBuffer {
            epoch,
            updates: VecDeque::new(),
            window: 0,
            window_changes: 0,
            bytes: 0,
            floor: last.pos.clone(),
            last,
        }
    }

    /// Whether the window holds every change after `token`: the same lineage, and nothing
    /// evicted past it.
    pub fn reaches(&self, token: &Token) -> bool {
        *self.epoch == *token.epoch && token.pos.covers(&self.floor)
    }

    /// The replay window, oldest first.
    pub fn window(&self) -> impl Iterator<Item = &Arc<HubUpdate>> {
        self.updates
            .iter()
            .skip(self.updates.len() - self.window)
            .map(|k| &k.update)
    }

    /// Estimated bytes of the updates kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A new lineage from `pos`: nothing before it can be resumed, nor is it sent to anyone.
    pub fn reset(&mut self, epoch: Arc<str>, pos: Position) {
        self.epoch = epoch;
        self.updates.clear();
        self.window = 0;
        self.window_changes = 0;
        self.bytes = 0;
        self.floor = pos;
        self.last = Mark {
            useq: 0,
            seq: 0,
            pos: Position::default(),
        };
    }

    /// Keeps `u` (the newest update, `stamp` in the hub's publish order), with a replay window of
    /// at most `window_changes` changes (and at least `u`); drops the older updates that every
    /// subscriber has read and the window no longer holds.
    pub fn push(&mut self, u: Arc<HubUpdate>, stamp: u64, window_changes: usize) {
        if u.update.useq > self.last.useq {
            self.last = Mark {
                useq: u.update.useq,
                seq: u.update.seq,
                pos: u.update.pos.clone(),
            };
        }
        self.bytes += u.bytes;
        self.window += 1;
        self.window_changes += u.update.changes.len();
        self.updates.push_back(Kept { stamp, update: u });
        while self.window > 1 && self.window_changes > window_changes {
            self.shrink_window();
        }
        while self.updates.len() > self.window
            && self
                .updates
                .front()
                .is_some_and(|k| Arc::weak_count(&k.update) == 0)
        {
            if let Some(old) = self.updates.pop_front() {
                self.bytes -= old.update.bytes;
            }
        }
    }

    /// The publish stamp of the oldest update that [`UpdateBuffer::drop_oldest`] would drop
    /// (`None`: only the newest is kept, and it always is).
    pub fn oldest(&self) -> Option<u64> {
        (self.updates.len() > 1)
            .then(|| self.updates.front().map(|k| k.stamp))
            .flatten()
    }

    /// Drops the oldest update but never the newest, shrinking the window past it when it is in
    /// it. `Some(true)`: a subscriber had not read it; `None`: nothing to drop.
    pub fn drop_oldest(&mut self) -> Option<bool> {
        if self.updates.len() <= 1 {
            return None;
        }
        if self.updates.len() == self.window {
            self.shrink_window();
        }
        let old = self.updates.pop_front()?;
        self.bytes -= old.update.bytes;
        Some(Arc::weak_count(&old.update) > 0)
    }

    /// The oldest update of the window leaves it: changes up to it can no longer be resumed.
    fn shrink_window(&mut self) {
        let i = self.updates.len() - self.window;
        if let Some(old) = self.updates.get(i) {
            self.window_changes -= old.update.update.changes.len();
            for c in &old.update.update.changes {
                self.floor.raise(c.part, c.off);
            }
        }
        self.window -= 1;
    }
}

/// Estimated heap bytes of an update and its frame, once, when it is made: rows before and after
/// each change counted whole as they are held then, though the table or a neighbouring update
/// may share them. A row held as JSON and not parsed yet counts its JSON: parsed later, for a
/// subscriber, its columns are shared with the table's row and not counted here.
pub(super) fn update_bytes(update: &TableUpdate, frame: Option<&Utf8Bytes>) -> usize {
    let changes: usize = update
        .changes
        .iter()
        .map(|c| {
            160 + c.key.len()
                + c.row.as_ref().map_or(0, stored_row_bytes)
                + c.before.as_ref().map_or(0, stored_row_bytes)
        })
        .sum();
    256 + changes + frame.map_or(0, |f| f.len())
}

/// A row's JSON and, once parsed, its columns (an unparsed row is not parsed to be counted).
fn stored_row_bytes(row: &StoredRow) -> usize {
    row.json().map_or(0, |j| 32 + j.len()) + row.parsed().map_or(0, row_bytes)
}

fn row_bytes(row: &Row) -> usize {
    48 + row
        .iter()
        .map(|(k, v)| 40 + k.len() + value_bytes(v))
        .sum::<usize>()
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(value_bytes).sum::<usize>(),
        Value::Object(o) => row_bytes(o),
        _ => 16,
    }
}

#[cfg(test)]
mod tests;
