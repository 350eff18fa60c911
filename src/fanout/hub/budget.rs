//! The hub's byte budget (`--fanout-buffer-bytes`), across all tables.
//!
//! Every table's [`UpdateBuffer`] keeps its replay window and what its subscribers have not read.
//! Together they hold at most the budget (estimated bytes), plus the newest update of each table,
//! which is always kept. Over it, the oldest updates of the whole process go first, whichever
//! table they belong to, read or not: a quiet table holding a stalled client's backlog gives way
//! to a busy one, and a busy table does not take a quiet table's replay window unless that is
//! the oldest.
//!
//! The budget is kept by the thread that publishes: it holds its own table's buffer and only
//! tries the others' locks (it never waits for one), so two publishers never wait for each other.
//! A buffer that is busy is passed over, and the next publish catches up (until then the hub
//! can hold more than the budget).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use super::buffer::UpdateBuffer;
use super::Channel;

pub(super) struct Budget {
    limit: usize,
    used: AtomicUsize,
    stamps: AtomicU64,
}

/// The lock of another table's buffer, unless someone holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            stamps: AtomicU64::new(0),
        }
    }

    /// The next place in the publish order.
    pub fn stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed)
    }

    /// Estimated bytes all buffers hold.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A buffer went from `before` to `after` bytes (called under that buffer's lock).
    pub fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Whether the buffers hold more than the budget.
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Drops the oldest updates of all tables until the hub is within the budget (or nothing more
    /// can be dropped now). `own` is the publishing table's channel, whose buffer the caller holds
    /// as `buf`; `all` is every channel. Returns how many updates were dropped unread.
    pub fn enforce(&self, own: &Channel, buf: &mut UpdateBuffer, all: &[Arc<Channel>]) -> u64 {
        let mut unread = 0;
        let mut busy: Vec<*const Channel> = Vec::new();
        while self.over() {
            // the buffer whose oldest droppable update is the oldest of all, and the runner-up
            let mut best: Option<(u64, Option<&Arc<Channel>>)> = buf.oldest().map(|s| (s, None));
            let mut next = u64::MAX;
            for c in all {
                let p: *const Channel = &**c;
                if std::ptr::eq(p, own) || busy.contains(&p) {
                    continue;
                }
                let Some(stamp) = try_lock(&c.buffer).and_then(|b| b.oldest()) else {
                    continue;
                };
                match best {
                    Some((s, _)) if s < stamp => next = next.min(stamp),
                    _ => {
                        next = next.min(best.map_or(u64::MAX, |b| b.0));
                        best = Some((stamp, Some(c)));
                    }
                }
            }
            match best {
                None => break,
                Some((_, None)) => unread += self.drop_from(buf, own, next),
                Some((_, Some(c))) => match try_lock(&c.buffer) {
                    Some(mut b) => unread += self.drop_from(&mut b, c, next),
                    None => busy.push(&**c),
                },
            }
        }
        unread
    }

    /// Drops `b`'s oldest updates while over the budget and older than `next` (at least one);
    /// returns how many were unread.
    fn drop_from(&self, b: &mut UpdateBuffer, c: &Channel, next: u64) -> u64 {
        let before = b.bytes();
        let mut unread = 0;
        while let Some(was_unread) = b.drop_oldest() {
            unread += u64::from(was_unread);
            if !self.over_after(before, b.bytes()) || b.oldest().is_none_or(|s| s > next) {
                break;
            }
        }
        self.account(before, b.bytes());
        c.buffer_bytes.set(b.bytes() as i64);
        unread
    }

    /// Whether the hub would still be over the budget once a buffer that held `before` bytes
    /// holds `after` (not accounted yet).
    fn over_after(&self, before: usize, after: usize) -> bool {
        self.used().saturating_sub(before - after) > self.limit
    }
}

#[cfg(test)]
mod tests;
