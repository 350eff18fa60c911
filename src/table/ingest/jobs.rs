//! The queue of restore jobs between the ingest thread and the restore workers.
//!
//! The ingest thread must never wait on it: it submits jobs from the consumer's rebalance callback
//! (one per partition assigned, all at once), and it is also the only thread that takes the
//! workers' results. A full channel that made it wait left it waiting forever once the results
//! filled up too (more than 516 partitions assigned at once: 256 queued + 4 running + 256 done).
//! So jobs the channel cannot take wait in an overflow, in order, and move on at each turn of the
//! ingest loop ([`Jobs::pump`]). The overflow is bounded by the assignment: a job per partition
//! assigned or slice created.

use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Mutex;

pub struct Jobs<T> {
    tx: SyncSender<T>,
    overflow: Mutex<VecDeque<T>>,
}

impl<T> Jobs<T> {
    pub fn new(tx: SyncSender<T>) -> Self {
        Jobs {
            tx,
            overflow: Mutex::new(VecDeque::new()),
        }
    }

    /// Queues `job` after those waiting, without waiting (dropped once the workers are gone).
    pub fn submit(&self, job: T) {
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        overflow.push_back(job);
        Self::move_on(&self.tx, &mut overflow);
    }

    /// Hands the waiting jobs on as far as the channel takes them.
    pub fn pump(&self) {
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        Self::move_on(&self.tx, &mut overflow);
    }

    /// Jobs waiting for room in the channel.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.overflow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn move_on(tx: &SyncSender<T>, overflow: &mut VecDeque<T>) {
        while let Some(job) = overflow.pop_front() {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    overflow.push_front(job);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    overflow.clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn more_jobs_than_the_channel_holds_never_wait_and_keep_their_order() {
        let (tx, rx) = sync_channel(2);
        let jobs = Jobs::new(tx);
        // 600 at once (an assignment of 600 partitions) returns at once
        for i in 0..600 {
            jobs.submit(i);
        }
        assert_eq!(jobs.waiting(), 598);
        let mut got = Vec::new();
        for _ in 0..1000 {
            while let Ok(j) = rx.try_recv() {
                got.push(j);
            }
            if got.len() == 600 {
                break;
            }
            jobs.pump();
        }
        assert_eq!(got, (0..600).collect::<Vec<_>>());
        assert_eq!(jobs.waiting(), 0);
        // workers gone: jobs are dropped, nothing waits
        drop(rx);
        jobs.submit(1);
        assert_eq!(jobs.waiting(), 0);
    }
}
