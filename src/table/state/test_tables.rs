//! Tables for the tests of the whole-table passes (`index`, `parse`).

use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::{Entry, Table, TableState, Tables};
use crate::table::stored_row::StoredRow;

/// A table of `n` rows held as their JSON (as loaded from the store), every third in `epl`.
pub(crate) fn loaded(tables: &Tables, n: usize) -> Arc<Table> {
    let mut state = TableState::new("t", "e1", "topic", 1);
    for i in 0..n {
        let league = if i % 3 == 0 { "epl" } else { "nba" };
        let json = format!(r#"{{"id":"k{i}","league":"{league}"}}"#);
        let entry = Entry {
            row: StoredRow::from_json(json.as_bytes()).unwrap(),
            part: 0,
            off: i as i64,
        };
        state.rows.insert(format!("k{i}"), entry);
    }
    tables.insert(state)
}

/// Runs `client` on 8 threads that arrive while a whole-table pass of `t` holds its lock, and
/// returns their results once it is released. The 50 ms before the release only lets them reach
/// the lock, so that a test can catch a pass that does not take it; with one that does, what they
/// return does not depend on it.
pub(crate) fn arriving_during_a_pass<T: Send>(t: &Table, client: impl Fn() -> T + Sync) -> Vec<T> {
    let start = Barrier::new(9);
    std::thread::scope(|s| {
        let held = t.indexing.lock().unwrap();
        let clients: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    client()
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    })
}
