//! When a data directory was last in use, and what a node does when that was too long ago.
//!
//! A node resumes each changelog partition where its store had read it. Once the broker compacted
//! a changelog partition it keeps a tombstone only for `delete.retention.ms` (set from
//! `--changelog-tombstone-retention-secs`): a node away longer can miss the deletes made
//! meanwhile, and would then serve their rows for good. So the store is marked while a process
//! uses it ([`Store::mark_alive`]: at start, every [`mark_every`], at a clean stop), and a store
//! last in use half the retention ago or longer has every slice forgotten at start and read anew.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::table::checkpoint::now_ms;
use crate::table::state::{Slice, SliceMode, TableState};
use crate::table::store::{Store, StoreError};

/// How often a running process marks its store as in use: every minute, or more often when the
/// retention is short (an eighth of it), so that a kill -9 leaves a recent mark.
pub fn mark_every(tombstone_retention: Duration) -> Duration {
    (tombstone_retention / 8).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Forgets every owned or followed slice of `tables`, in memory and in `store` (rows, outbox
/// marks, positions in the changelog): each is then taken over or followed from its changelog's
/// beginning, like a slice this node never held (its owner too: what is read again from the
/// beginning must not look fenced by an owner read before). Returns how many slices were
/// forgotten.
pub fn forget_slices(tables: &mut [TableState], store: &Store) -> Result<usize, StoreError> {
    let mut forgotten = 0;
    for t in tables.iter_mut() {
        for part in 0..t.slices.len() {
            let s = &mut t.slices[part];
            if !matches!(s.mode, SliceMode::Owned | SliceMode::Followed) {
                continue;
            }
            *s = Slice::empty(SliceMode::Absent);
            let part = u32::try_from(part).unwrap_or(u32::MAX);
            t.rows.retain(|_, e| e.part != part);
            store.clear_slice(&t.name, part)?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// Marks `store` as in use every `period` until `cancel` (a clean stop marks it itself); the
/// task holds the store until then.
pub fn spawn_marker(
    store: Store,
    period: Duration,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let s = store.clone();
            let marked = tokio::task::spawn_blocking(move || s.mark_alive(now_ms())).await;
            if let Ok(Err(e)) = marked {
                tracing::warn!(error = %e, "marking the store as in use failed");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::position::Owner;
    use crate::table::state::Entry;
    use std::sync::Arc;

    #[test]
    fn a_short_retention_is_marked_more_often() {
        assert_eq!(
            mark_every(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(mark_every(Duration::from_secs(16)), Duration::from_secs(2));
    }

    #[test]
    fn forgetting_drops_the_rows_positions_and_owner_of_held_slices() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t = TableState::new("t", "ep", "cdc.t", 3);
        let owner = Owner::parse("7.3").unwrap();
        for (part, mode) in [
            (0, SliceMode::Owned),
            (1, SliceMode::Followed),
            (2, SliceMode::Absent),
        ] {
            let s = t.slice_mut(part);
            s.mode = mode;
            s.owner = owner;
            s.cl_next = 40;
            s.last_off = 9;
            s.count = 10;
            t.rows.insert(
                format!("k{part}"),
                Entry {
                    row: Arc::new(serde_json::Map::new()),
                    part,
                    off: 9,
                },
            );
        }
        let mut tables = vec![t];
        assert_eq!(forget_slices(&mut tables, &store).unwrap(), 2);
        let t = &tables[0];
        for part in [0, 1] {
            let s = t.slice(part).unwrap();
            assert_eq!(s.mode, SliceMode::Absent);
            assert_eq!((s.cl_next, s.last_off, s.count), (0, -1, 0));
            assert_eq!(
                s.owner,
                Owner::default(),
                "read again from the beginning, an earlier owner's records are not fenced"
            );
        }
        assert_eq!(t.slice(2).unwrap().cl_next, 40, "not held: untouched");
        let keys: Vec<&String> = t.rows.keys().collect();
        assert_eq!(keys, vec!["k2"]);
    }
}
