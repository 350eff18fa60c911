//! The number of open connections, in total and per client address. A slot is taken at accept,
//! before a byte is read, and given back when the socket closes (the slot lives in the socket's
//! wrapper, so an upgraded WebSocket keeps it).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerIp => "per_ip",
        }
    }
}

struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts the open connections of one listener.
pub struct ConnLimiter {
    max_total: usize,
    /// 0: no limit.
    max_per_ip: usize,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

/// What one client is counted as: `::ffff:1.2.3.4` as `1.2.3.4`, an IPv6 address as its /64 (a
/// host is commonly given a whole /64: one address each would let it take every slot).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts {
                total: 0,
                per_ip: HashMap::new(),
            }),
            metrics,
        })
    }

    /// Takes a slot for a connection from `ip`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let ip = canonical(ip);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        c.total += 1;
        self.metrics.security.tcp_connections.inc();
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        self.limiter.metrics.security.tcp_connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_ip_slots_come_back() {
        let l = ConnLimiter::new(3, 2, Arc::new(Metrics::new()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let g1 = l.acquire(a).unwrap();
        let _g2 = l.acquire(mapped).unwrap();
        assert_eq!(l.acquire(a).err(), Some(Refusal::PerIp));
        let _g3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).err(), Some(Refusal::Total));
        drop(g1);
        assert_eq!(l.open(), 2);
        let _g4 = l.acquire(a).unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn an_ipv6_client_counts_as_its_64() {
        let l = ConnLimiter::new(10, 2, Arc::new(Metrics::new()));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _a = l.acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = l.acquire(ip("2001:db8:1:2:ffff::7")).unwrap();
        assert_eq!(
            l.acquire(ip("2001:db8:1:2:dead:beef:0:1")).err(),
            Some(Refusal::PerIp),
            "another address of the same /64"
        );
        let _c = l.acquire(ip("2001:db8:1:3::1")).unwrap();
    }
}
