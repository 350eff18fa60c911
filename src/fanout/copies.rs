//! Copies of a table's rows made for one client, bounded (`--max-table-copies`). A whole-table
//! read (`GET /api/tables/{table}`), a live snapshot whose rows are found by a scan (a `where`
//! that cannot be looked up) and a `format=rows` snapshot are each built for one client and held
//! until that client has taken them: on a 1M-row table, ~46 MB for a read sent in pieces, ~250 MB
//! for a scanned snapshot's frames, ~1.7 GB for a `format=rows` snapshot's rows. Each takes a
//! place first; at most `--max-table-copies` places are taken at once, and a client that finds
//! none within [`WAIT`] is refused (HTTP 503, or a `busy` error for a subscription). Whole-table
//! snapshots shared by their clients and copies looked up by keys or by an indexed equality take
//! no place. A connection holds one place at most, shared by the snapshots it is sent together (a
//! `format=rows` connection to every table, a union): it never waits on itself. A snapshot the
//! connection starts on its own (a restart after falling behind, a table that appeared) takes a
//! free place when it holds none, and is never refused. A place is given back when its client has
//! taken what it holds (or nothing is left to send), or goes.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::fanout::protocol::Format;
use crate::fanout::selector::Selector;

/// How long a client waits for a place before it is refused.
pub const WAIT: Duration = Duration::from_secs(5);

/// The places for copies.
pub struct Copies {
    places: Arc<Semaphore>,
    /// 0: no limit.
    max: usize,
    in_flight: IntGauge,
}

/// A copy's place: given back when dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// No place came free in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub max: usize,
    pub waited: Duration,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "busy: {} copies of tables are being sent to clients (--max-table-copies) and none ended within {} s; retry later",
            self.max,
            self.waited.as_secs()
        )
    }
}

impl Copies {
    /// `max` copies at once (0: no limit); `in_flight` counts them.
    pub fn new(max: usize, in_flight: IntGauge) -> Self {
        let permits = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Copies {
            places: Arc::new(Semaphore::new(permits)),
            max,
            in_flight,
        }
    }

    /// A place, waiting up to `wait`.
    pub async fn enter(&self, wait: Duration) -> Result<Place, Busy> {
        match tokio::time::timeout(wait, self.places.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.place(permit)),
            // the semaphore is never closed; a timeout or a close both mean no place
            _ => Err(Busy {
                max: self.max,
                waited: wait,
            }),
        }
    }

    /// A place if one is free now.
    pub fn try_enter(&self) -> Option<Place> {
        let permit = self.places.clone().try_acquire_owned().ok()?;
        Some(self.place(permit))
    }

    /// The place `permit` holds, counted.
    fn place(&self, permit: OwnedSemaphorePermit) -> Place {
        self.in_flight.inc();
        Place {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        }
    }

    /// Copies being built or sent.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }
}

/// Whether a copy for `selector` may hold the whole table: its rows are not looked up (neither
/// keys nor an indexed equality).
pub fn scans(selector: &Selector) -> bool {
    selector.keys.is_none() && selector.indexed.is_none()
}

/// Whether a subscription's snapshot is a copy of its own that may hold the whole table: one
/// that [`scans`], sent in `format=rows`, or in patches with a filter or a projection (only the
/// whole table in patches is built once and shared).
pub fn needs_place(selector: &Selector, format: Format) -> bool {
    scans(selector) && (format == Format::Rows || !selector.is_whole())
}

#[cfg(test)]
mod tests;
