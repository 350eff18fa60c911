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
use crate::table::state::{Slice, SliceMode};
use crate::table::store::{Loaded, Store, StoreError};

/// How often a running process marks its store as in use: every minute, or more often when the
/// retention is short (an eighth of it), so that a kill -9 leaves a recent mark.
pub fn mark_every(tombstone_retention: Duration) -> Duration {
    (tombstone_retention / 8).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Forgets every owned or followed slice of what was `loaded`, in memory and in `store` (rows,
/// outbox marks, positions in the changelog), and every input position and source mark (they were
/// written with rows and outbox marks that are now gone): each slice is then taken over or
/// followed from its changelog's beginning, like a slice this node never held (its owner too:
/// what is read again from the beginning must not look fenced by an owner read before), and the
/// input starts where the changelog ends. Returns how many slices were forgotten.
pub fn forget(loaded: &mut Loaded, store: &Store) -> Result<usize, StoreError> {
    // positions first: a crash part-way leaves no position over a slice already forgotten (the
    // alive mark is written after, so the next start forgets again)
    store.clear_input_positions()?;
    loaded.positions.clear();
    loaded.last_records.clear();
    loaded.source_marks.clear();
    let mut forgotten = 0;
    for t in loaded.tables.iter_mut() {
        let mut parts = Vec::new();
        for (part, s) in t.slices.iter_mut().enumerate() {
            if matches!(s.mode, SliceMode::Owned | SliceMode::Followed) {
                *s = Slice::empty(SliceMode::Absent);
                parts.push(u32::try_from(part).unwrap_or(u32::MAX));
            }
        }
        if parts.is_empty() {
            continue;
        }
        t.rows.retain(|_, e| !parts.contains(&e.part));
        store.clear_slices(&t.name, &parts)?;
        forgotten += parts.len();
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
    use crate::table::position::{LastApplied, Owner, RecordId};
    use crate::table::store::{AckMeta, SliceMeta, SourceMarks, TableMeta, WriteBatch};

    #[test]
    fn a_short_retention_is_marked_more_often() {
        assert_eq!(
            mark_every(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(mark_every(Duration::from_secs(16)), Duration::from_secs(2));
    }

    /// Forgetting, from a store as a run left it: the held slices' rows and changelog positions
    /// go (in memory and in the store), and every input position and source mark with them; a
    /// slice not held is left alone.
    #[test]
    fn forgetting_drops_held_slices_and_every_input_position() {
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
        for part in 0..3u32 {
            b.put_row("t", &format!("k{part}"), part, 9, b"{}");
            b.set_position("cdc.t", part as i32, 120);
            b.set_last_record(
                "cdc.t",
                part as i32,
                LastApplied {
                    record: RecordId::new(119, None, None, Some(b"{}")),
                    owners: 1,
                },
            );
            let marks: SourceMarks = [("s".to_string(), (1, 2))].into_iter().collect();
            b.set_source_marks("cdc.t", part as i32, &marks);
        }
        for (part, owned) in [(0, true), (1, false)] {
            let meta = SliceMeta {
                last_off: 9,
                count: 10,
                owner: "7.3".into(),
                owned,
                kept_ms: None,
            };
            b.put_slice("t", part, &meta);
            b.put_acks(
                "t",
                part,
                &AckMeta {
                    acked: 5,
                    cl_next: 40,
                },
            );
        }
        store.apply(b).unwrap();
        let mut loaded = store.load().unwrap();
        assert_eq!((loaded.positions.len(), loaded.last_records.len()), (3, 3));
        assert_eq!(forget(&mut loaded, &store).unwrap(), 2);
        assert!(loaded.positions.is_empty() && loaded.source_marks.is_empty());
        assert!(loaded.last_records.is_empty());
        let t = &loaded.tables[0];
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
        let keys: Vec<&String> = t.rows.keys().collect();
        assert_eq!(keys, vec!["k2"]);
        // and so it is read back at the next start
        let again = store.load().unwrap();
        assert!(again.positions.is_empty() && again.source_marks.is_empty());
        assert!(again.last_records.is_empty());
        let t = &again.tables[0];
        assert!(t.slices.iter().all(|s| s.mode == SliceMode::Absent));
        assert_eq!(t.rows.keys().collect::<Vec<_>>(), vec!["k2"]);
    }
}
