//! Live fan-out: the hub with its per-table channels and replay buffers (`hub`), one client's
//! subscriptions (`subscription`, `session`), snapshot frames (`snapshot`), the wire protocol
//! (`protocol`), WebSocket (`ws`) and SSE (`sse`) endpoints. It takes the tables' updates through
//! [`crate::table::state::UpdateSink`] and imports nothing the table layer depends on.

pub mod copies;
pub mod hub;
pub mod protocol;
pub mod route;
pub mod selector;
pub mod session;
pub mod snapshot;
pub mod sse;
pub mod subscription;
pub mod ws;

use axum::extract::ws::Utf8Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::metrics::Metrics;
use protocol::{Format, Outgoing};

/// Limits that protect the server from clients.
#[derive(Debug, Clone)]
pub struct FanoutLimits {
    pub max_connections: usize,
    pub slow_client: Duration,
    pub default_format: Format,
    pub max_subscriptions: usize,
    pub max_message_bytes: usize,
    /// Client messages per second allowed (burst: twice that), as the quota of each
    /// connection's [`crate::net::rate::MessageRate`].
    pub message_quota: crate::net::rate::RateQuota,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How long a WebSocket without a token in its upgrade has to send its `auth` message.
    pub auth_timeout: Duration,
    /// How long a resume waits for this node to reach the client's position.
    pub resume_wait: Duration,
    /// Tables a `format=rows` client on `/` gets (all when `None`).
    pub root_tables: Option<regex::Regex>,
    pub unions: Arc<[crate::config::UnionDef]>,
}

impl FanoutLimits {
    pub fn from_config(c: &Config) -> Self {
        FanoutLimits {
            max_connections: c.max_connections,
            slow_client: c.slow_client,
            default_format: c.default_format,
            max_subscriptions: c.security.limits.max_subscriptions,
            max_message_bytes: c.security.limits.max_frame_bytes,
            message_quota: crate::net::rate::RateQuota::new(
                c.security.limits.max_messages_per_sec,
                c.security.limits.max_messages_per_sec.saturating_mul(2),
            ),
            // pings (WebSocket) and keep-alives (SSE) keep a healthy connection from looking idle
            ping_interval: (c.security.limits.idle_timeout / 4).min(Duration::from_secs(15)),
            idle_timeout: c.security.limits.idle_timeout,
            auth_timeout: c.security.limits.handshake_timeout,
            resume_wait: c.resume_wait,
            root_tables: c.root_tables.clone(),
            unions: c.unions.clone().into(),
        }
    }
}

/// Counts a connection against the global cap for as long as it lives.
pub struct ConnectionSlot {
    count: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl ConnectionSlot {
    /// Takes a slot, or `None` when the cap is reached.
    pub fn acquire(count: &Arc<AtomicUsize>, max: usize, metrics: &Arc<Metrics>) -> Option<Self> {
        let prev = count.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics.connections.inc();
        Some(ConnectionSlot {
            count: count.clone(),
            metrics: metrics.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }
}

/// Observes the latencies of a patch written now: from the database commit (`source.ts_ms`),
/// from the Kafka record's timestamp, and from the ingest loop taking the record (livetable's own
/// share).
pub fn record_latency(
    metrics: &Metrics,
    ts_ms: Option<i64>,
    kafka_ts_ms: Option<i64>,
    polled: Option<std::time::Instant>,
) {
    if let Some(at) = polled {
        metrics
            .ingest_to_socket_seconds
            .observe(at.elapsed().as_secs_f64());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    // the timestamps come from the change events: any i64 (a hostile or broken producer), so
    // one at or before 1970 is not a latency, and the difference saturates
    if let Some(ts) = ts_ms.filter(|ts| *ts > 0) {
        metrics
            .freshness_seconds
            .observe((now.saturating_sub(ts).max(0) as f64) / 1000.0);
    }
    if let Some(ts) = kafka_ts_ms.filter(|ts| *ts > 0) {
        metrics
            .kafka_to_socket_seconds
            .observe((now.saturating_sub(ts).max(0) as f64) / 1000.0);
    }
}

/// Records the metrics of a message about to be written.
pub fn record_sent(metrics: &Metrics, out: &Outgoing, frames: &[Utf8Bytes]) {
    let bytes: usize = frames.iter().map(|f| f.len()).sum();
    let kind = match out {
        Outgoing::Snapshot { rows, .. } => {
            metrics.snapshots_sent.inc();
            metrics.snapshot_rows.inc_by(*rows as u64);
            "snapshot"
        }
        Outgoing::Patch {
            ts_ms,
            kafka_ts_ms,
            polled,
            ..
        } => {
            metrics.patches_sent.inc();
            record_latency(metrics, *ts_ms, *kafka_ts_ms, *polled);
            "patch"
        }
        Outgoing::Row(_) | Outgoing::RowText(_) => {
            metrics.patches_sent.inc();
            "row"
        }
        Outgoing::Waiting { .. } | Outgoing::Status { .. } | Outgoing::UpToDate => "control",
        Outgoing::Error { code, .. } => {
            metrics
                .protocol_errors
                .with_label_values(&[code.as_str()])
                .inc();
            "control"
        }
        Outgoing::Pong | Outgoing::Publish(_) | Outgoing::Authenticated { .. } => "control",
    };
    metrics
        .sent_bytes
        .with_label_values(&[kind])
        .inc_by(bytes as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_of_any_event_timestamp_are_observed_without_overflow() {
        let m = Metrics::new();
        for ts in [i64::MIN, -1, 0, i64::MAX, 1] {
            record_latency(&m, Some(ts), Some(ts), None);
        }
        // one at or before 1970 is no latency; one in the future counts as no delay; 1 ms
        // after 1970 as the ~56 years since
        assert_eq!(m.freshness_seconds.get_sample_count(), 2);
        assert_eq!(m.kafka_to_socket_seconds.get_sample_count(), 2);
        let sum = m.freshness_seconds.get_sample_sum();
        assert!(sum > 1.7e9 && sum < 1.0e10, "{sum}");
    }
}
