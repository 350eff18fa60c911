//! A connection's client-message rate limit in 8 bytes. The quota is the listener's and shared;
//! each connection keeps only its theoretical arrival time (GCRA, as the `governor` crate
//! computes it), so that an idle connection does not hold a 72-byte limiter with its own clock
//! (bench: connections-snapshot).

use std::sync::OnceLock;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

/// So many messages per second, and up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateQuota {
    /// Time one message uses up.
    interval_ns: u64,
    /// How far ahead of now the used-up time may run: `burst` intervals.
    window_ns: u64,
}

impl RateQuota {
    /// `per_second` messages a second (at least 1), `burst` at once (at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval_ns = 1_000_000_000 / u64::from(per_second.max(1));
        RateQuota {
            interval_ns,
            window_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
        }
    }
}

/// One connection's state under a [`RateQuota`].
#[derive(Debug, Default)]
pub struct MessageRate {
    /// When the used-up time runs out, in nanoseconds since [`epoch`].
    tat_ns: u64,
}

impl MessageRate {
    /// Takes one message now; false when it is over the quota (nothing is used up then).
    pub fn check(&mut self, quota: &RateQuota) -> bool {
        self.check_at(quota, now_ns())
    }

    fn check_at(&mut self, quota: &RateQuota, now_ns: u64) -> bool {
        let next = self.tat_ns.max(now_ns).saturating_add(quota.interval_ns);
        if next - now_ns > quota.window_ns {
            return false;
        }
        self.tat_ns = next;
        true
    }
}

/// The process's time origin for [`MessageRate`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// How long after `now_ns` the next message would be allowed (zero: now). For tests.
#[cfg(test)]
fn wait_at(rate: &MessageRate, quota: &RateQuota, now_ns: u64) -> Duration {
    let next = rate.tat_ns.max(now_ns) + quota.interval_ns;
    Duration::from_nanos((next - now_ns).saturating_sub(quota.window_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_passes_then_one_message_per_interval() {
        let q = RateQuota::new(50, 100);
        let mut r = MessageRate::default();
        let t0 = 7 * SEC;
        for i in 0..100 {
            assert!(r.check_at(&q, t0), "message {i} of the burst");
        }
        assert!(!r.check_at(&q, t0), "the 101st at once is refused");
        assert!(
            !r.check_at(&q, t0 + SEC / 50 - 1),
            "not yet an interval later"
        );
        assert!(r.check_at(&q, t0 + SEC / 50), "an interval later, one more");
        assert!(!r.check_at(&q, t0 + SEC / 50));
        assert_eq!(wait_at(&r, &q, t0 + SEC / 50), Duration::from_millis(20));
    }

    #[test]
    fn a_refused_message_uses_nothing_up() {
        let q = RateQuota::new(10, 1);
        let mut r = MessageRate::default();
        assert!(r.check_at(&q, SEC));
        for _ in 0..1000 {
            assert!(!r.check_at(&q, SEC + 1));
        }
        assert!(r.check_at(&q, SEC + SEC / 10));
    }

    #[test]
    fn a_steady_rate_at_the_quota_is_never_refused_and_twice_it_is_halved() {
        let q = RateQuota::new(100, 2);
        let mut r = MessageRate::default();
        let mut t = SEC;
        for _ in 0..10_000 {
            assert!(r.check_at(&q, t));
            t += SEC / 100;
        }
        let mut r = MessageRate::default();
        let (mut ok, mut t) = (0, SEC);
        for _ in 0..10_000 {
            ok += usize::from(r.check_at(&q, t));
            t += SEC / 200;
        }
        // 50 s at 100/s, plus the burst
        assert!((5_000..=5_002).contains(&ok), "{ok}");
    }

    #[test]
    fn the_clock_starts_at_the_first_use_and_a_fresh_state_allows_the_burst() {
        let q = RateQuota::new(1, 3);
        let mut r = MessageRate::default();
        assert!(r.check(&q) && r.check(&q) && r.check(&q));
        assert!(!r.check(&q));
    }
}
