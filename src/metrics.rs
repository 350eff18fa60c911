//! Every metric livetable exports, defined once with its help text, in one registry.
//! Labels come only from small sets: table, topic, partition, op, outcome, reason.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics of one livetable process.
pub struct Metrics {
    registry: Registry,
    pub records_consumed: IntCounterVec,
    pub changes_applied: IntCounterVec,
    pub dead_lettered: IntCounter,
    pub decode_errors: IntCounterVec,
    pub skipped: IntCounterVec,
    pub undecodable_decimals: IntCounterVec,
    pub batch_size: Histogram,
    pub apply_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub last_record_unixtime: Gauge,
    pub changelog_produce_errors: IntCounter,
    pub source_resends: IntCounter,
    pub changelog_produce_seconds: Histogram,
    pub commit_errors: IntCounter,
    pub flush_seconds: Histogram,
    pub restore_records: IntCounter,
    pub restore_retries: IntCounter,
    pub restore_seconds: Gauge,
    pub group_join_seconds: Gauge,
    pub store_load_seconds: Gauge,
    pub table_rows: IntGaugeVec,
    pub table_seq: IntGaugeVec,
    pub store_bytes: IntGauge,
    pub ready: IntGauge,
    pub connections: IntGauge,
    pub table_copies: IntGauge,
    pub connections_opened: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub snapshots_sent: IntCounter,
    pub snapshot_rows: IntCounter,
    pub patches_sent: IntCounter,
    pub sent_bytes: IntCounterVec,
    pub subscriptions: IntGaugeVec,
    pub snapshot_seconds: Histogram,
    pub slow_client_disconnects: IntCounter,
    pub kafka_to_socket_seconds: Histogram,
    pub resumes: IntCounterVec,
    pub conflated_changes: IntCounter,
    pub resnapshots: IntCounter,
    pub fanout_buffer_bytes: IntGaugeVec,
    pub fanout_buffer_evictions: IntCounter,
    pub routed_subscriptions: IntGauge,
    pub view_rebuilds: IntCounterVec,
    pub view_changes: IntCounterVec,
    pub view_log_restores: IntCounterVec,
    pub view_log_records: IntCounterVec,
    pub view_log_rewrites: IntCounterVec,
    pub view_log_recreated: IntCounterVec,
    pub view_log_writer: IntGaugeVec,
    pub routed_updates: IntCounter,
    pub protocol_errors: IntCounterVec,
    pub freshness_seconds: Histogram,
    pub ingest_to_socket_seconds: Histogram,
    pub http_requests: IntCounterVec,
    pub http_refused: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub role: IntGaugeVec,
    pub fences_written: IntCounter,
    pub fenced_records: IntCounter,
    pub follower_lag: IntGaugeVec,
    pub follower_records: IntCounter,
    pub changelog_rejected: IntCounter,
    pub changelog_refilled: IntCounter,
    pub changelog_rewound: IntCounter,
    pub dead_letters_dropped: IntCounter,
    pub last_commit_unixtime: Gauge,
    pub checkpoint_pending_seconds: Gauge,
    pub offset_resets: IntCounterVec,
    /// Publishing (src/publish), defined in its own block below.
    pub publish: PublishMetrics,
    /// Connections, authentication and reloads (`net`, `auth`).
    pub security: SecurityMetrics,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    m
}

/// Buckets of the delivery latencies (commit, Kafka record or poll -> socket): fine between 1 and
/// 25 ms, where the freshness goals lie.
fn delivery_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ]
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric. Panics only on a programming error (duplicate name),
    /// which the unit test below catches.
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let dead_lettered = counter(
            "livetable_dead_lettered_total",
            "Records sent to the dead-letter topic.",
        );
        let changelog_produce_errors = counter(
            "livetable_changelog_produce_errors_total",
            "Changelog or dead-letter records the broker did not acknowledge (retried).",
        );
        let source_resends = counter(
            "livetable_source_resends_skipped_total",
            "Changes skipped because their connector sent them again (a source position below what their input partition reached; --source-resends).",
        );
        let commit_errors = counter(
            "livetable_offset_commit_errors_total",
            "Failed commits of consumer group offsets (retried with the next checkpoint).",
        );
        let restore_records = counter(
            "livetable_restore_records_total",
            "Changelog records read while taking slices over (restores on assignment).",
        );
        let restore_retries = counter(
            "livetable_restore_retries_total",
            "Slice takeovers that failed for now (broker unreachable, no progress within --restore-stall-secs) and were started again.",
        );
        let gauge = |name: &str, help: &str| {
            let m = Gauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let last_record_unixtime = gauge(
            "livetable_last_record_timestamp_seconds",
            "Unix time when the last record was consumed.",
        );
        let restore_seconds = gauge(
            "livetable_restore_duration_seconds",
            "Duration of the last restore from the changelog (0 if none).",
        );
        let group_join_seconds = gauge(
            "livetable_group_join_seconds",
            "From the input consumer's creation (before the store loads) to its first partitions (taken once the store is loaded): the consumer group's join, which the broker may delay, or the load when longer (0 until then).",
        );
        let store_load_seconds = gauge(
            "livetable_store_load_seconds",
            "Seconds the start spent reading the local store into memory.",
        );
        let int_gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let store_bytes = int_gauge(
            "livetable_store_size_bytes",
            "Size of the sled store on disk.",
        );
        let ready = int_gauge(
            "livetable_ready",
            "1 when every partition this node consumes or follows is restored and caught up.",
        );
        let fences_written = counter(
            "livetable_fences_written_total",
            "Fence records written when this node took a changelog partition over.",
        );
        let follower_records = counter(
            "livetable_follower_records_total",
            "Changelog records read by the follower (a gateway restarted from its cache reads only the tail).",
        );
        let changelog_rejected = counter(
            "livetable_changelog_rejected_total",
            "Changelog records the broker refused for good (too large, not allowed): dead-lettered; the changelog keeps the previous value of the key.",
        );
        let changelog_refilled = counter(
            "livetable_changelog_refilled_total",
            "Rows produced again into a changelog partition that started over (its topic deleted and created again), by the slice's owner.",
        );
        let changelog_rewound = counter(
            "livetable_changelog_rewound_total",
            "Changelog partitions a reader read again from the beginning because the partition ended below its position (the topic deleted and created again).",
        );
        let dead_letters_dropped = counter(
            "livetable_dead_letters_dropped_total",
            "Dead letters the dead-letter topic refused for good (even shortened): dropped, logged as errors.",
        );
        let last_commit_unixtime = gauge(
            "livetable_last_commit_timestamp_seconds",
            "Unix time of the last successful commit of consumer-group offsets (time() - x: its age).",
        );
        let checkpoint_pending_seconds = gauge(
            "livetable_checkpoint_pending_seconds",
            "How long the oldest checkpoint has waited for the broker's acknowledgements (0: none waits).",
        );
        let fenced_records = counter(
            "livetable_fenced_records_total",
            "Changelog records ignored because a newer owner had fenced their partition (a former owner's late writes).",
        );
        let m = Metrics {
            records_consumed: counter_vec(&r, "livetable_records_consumed_total", "Kafka records consumed, by topic and outcome (applied, unchanged, skipped, dead_lettered, duplicate, resent).", &["topic", "outcome"]),
            changes_applied: counter_vec(&r, "livetable_changes_applied_total", "Row changes applied to a table, by table and op.", &["table", "op"]),
            decode_errors: counter_vec(&r, "livetable_decode_errors_total", "Records that could not be decoded, by reason.", &["reason"]),
            skipped: counter_vec(&r, "livetable_records_skipped_total", "Well-formed records that carry no row change, by reason.", &["reason"]),
            undecodable_decimals: counter_vec(&r, "livetable_undecodable_decimals_total", "Column values that look like base64 decimals without a schema to decode them, by table.", &["table"]),
            batch_size: histogram(&r, "livetable_apply_batch_records", "Records per applied batch.", vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0]),
            apply_seconds: histogram(&r, "livetable_apply_seconds", "Time to decode, stage and write one batch to sled.", latency_buckets()),
            consumer_lag: gauge_vec(&r, "livetable_consumer_lag", "High watermark minus the next offset to apply, by topic and partition.", &["topic", "partition"]),
            last_record_unixtime,
            changelog_produce_errors,
            source_resends,
            changelog_produce_seconds: histogram(&r, "livetable_changelog_ack_seconds", "Time from a checkpoint to the broker's acknowledgement of all its changelog records.", latency_buckets()),
            commit_errors,
            flush_seconds: histogram(&r, "livetable_store_flush_seconds", "Time of a sled flush that makes a checkpoint durable.", latency_buckets()),
            restore_records,
            restore_retries,
            restore_seconds,
            group_join_seconds,
            store_load_seconds,
            table_rows: gauge_vec(&r, "livetable_table_rows", "Rows per table.", &["table"]),
            table_seq: gauge_vec(&r, "livetable_table_seq", "The change sequence number per table.", &["table"]),
            store_bytes,
            ready,
            connections: int_gauge("livetable_connections", "Open WebSocket and SSE connections."),
            table_copies: int_gauge("livetable_table_copies", "Copies of tables made for one client, being built or sent (--max-table-copies): whole-table reads, scanned and format=rows snapshots."),
            connections_opened: counter_vec(&r, "livetable_connections_opened_total", "Connections opened, by kind (ws, sse).", &["kind"]),
            connections_closed: counter_vec(&r, "livetable_connections_closed_total", "Connections closed, by reason.", &["reason"]),
            snapshots_sent: counter("livetable_snapshots_sent_total", "Snapshots sent to clients."),
            snapshot_rows: counter("livetable_snapshot_rows_total", "Rows sent in snapshots."),
            patches_sent: counter("livetable_patches_sent_total", "Patch (or row) messages sent to clients."),
            sent_bytes: counter_vec(&r, "livetable_fanout_sent_bytes_total", "Bytes of messages sent to clients, by type (snapshot, patch, row, control).", &["type"]),
            subscriptions: gauge_vec(&r, "livetable_subscriptions", "Live subscriptions (WebSocket and SSE), by table.", &["table"]),
            snapshot_seconds: histogram(&r, "livetable_snapshot_seconds", "Time to build a snapshot (or a resume patch) under the table's read lock.", latency_buckets()),
            slow_client_disconnects: counter("livetable_slow_client_disconnects_total", "Clients closed (1008) because they did not take their pending changes in time."),
            kafka_to_socket_seconds: histogram(&r, "livetable_kafka_to_socket_seconds", "Time from the Kafka record's timestamp to the patch being written to a socket.", delivery_buckets()),
            resumes: counter_vec(&r, "livetable_resumes_total", "Resume requests, by result (hit: one patch from the replay buffer; miss: a snapshot).", &["result"]),
            conflated_changes: counter("livetable_conflated_changes_total", "Row changes composed into an already pending patch of a client."),
            resnapshots: counter("livetable_resnapshots_total", "Subscriptions started again because a client fell behind the update channel or the epoch changed (a new snapshot; format=rows: continued from the replay buffer, or the connection closed)."),
            fanout_buffer_bytes: gauge_vec(&r, "livetable_fanout_buffer_bytes", "Estimated bytes of the updates the hub keeps per table (the replay window and what subscribers have not read yet); all tables together at most --fanout-buffer-bytes.", &["table"]),
            fanout_buffer_evictions: counter("livetable_fanout_buffer_evictions_total", "Updates the hub dropped for its byte budget before every subscriber had read them (those subscribers start again with a new snapshot)."),
            routed_subscriptions: int_gauge("livetable_routed_subscriptions", "Live subscriptions routed by their keys or an indexed where (sent only the updates that may concern them)."),
            view_rebuilds: counter_vec(&r, "livetable_view_rebuilds_total", "Declared views recomputed from their input's rows (at start, and when the input's updates did not follow on), by view.", &["view"]),
            view_changes: counter_vec(&r, "livetable_view_changes_total", "Output row changes of declared views, by view.", &["view"]),
            view_log_restores: counter_vec(&r, "livetable_view_log_restores_total", "Views restored from their changelog topic at start (what their rows hold is then skipped: events, or input changes of a view over a table; a latest over a table takes its input rows' order from it), by view.", &["view"]),
            view_log_records: counter_vec(&r, "livetable_view_log_records_total", "Records this node produced to views' changelog topics (it writes the views it is assigned), by view and outcome (sent, failed).", &["view", "outcome"]),
            view_log_rewrites: counter_vec(&r, "livetable_view_log_rewrites_total", "Whole views written to their changelog topic: on taking a view over, or after changes could not be queued or produced, by view.", &["view"]),
            view_log_recreated: counter_vec(&r, "livetable_view_log_topic_recreated_total", "Views' changelog topics this node created again after they were deleted (the member given the topic then writes the whole view), by view.", &["view"]),
            view_log_writer: gauge_vec(&r, "livetable_view_log_writer", "1 when this node writes the view's changelog topic, else 0, by view.", &["view"]),
            routed_updates: counter("livetable_routed_updates_total", "Updates queued for routed subscriptions (one per subscription an update may concern)."),
            protocol_errors: counter_vec(&r, "livetable_protocol_errors_total", "Errors sent to clients, by code.", &["code"]),
            ingest_to_socket_seconds: histogram(&r, "livetable_ingest_to_socket_seconds", "Time from the ingest loop taking the record from the consumer to the patch being written to a socket: livetable's own share of the freshness (the rest is the source, the broker and the fetch).", delivery_buckets()),
            freshness_seconds: histogram(&r, "livetable_freshness_seconds", "Time from the database commit (source.ts_ms) to the patch being written to a socket.", delivery_buckets()),
            http_requests: counter_vec(&r, "livetable_http_requests_total", "HTTP requests by route and status.", &["route", "status"]),
            http_refused: counter_vec(&r, "livetable_http_refused_total", "HTTP requests answered 503 before or instead of their route, by reason (server_busy: --max-concurrent-requests in flight; timeout: not answered within --request-timeout-secs); not in livetable_http_requests_total.", &["reason"]),
            http_seconds: {
                let m = HistogramVec::new(HistogramOpts::new("livetable_http_request_seconds", "HTTP request durations by route.").buckets(latency_buckets()), &["route"])
                    .unwrap_or_else(|e| panic!("metric http: {e}"));
                r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric http: {e}"));
                m
            },
            dead_lettered,
            role: gauge_vec(&r, "livetable_role", "1 for the role of this process (all, materialiser, gateway).", &["role"]),
            fences_written,
            fenced_records,
            follower_records,
            changelog_rejected,
            changelog_refilled,
            changelog_rewound,
            dead_letters_dropped,
            last_commit_unixtime,
            checkpoint_pending_seconds,
            offset_resets: counter_vec(&r, "livetable_offset_resets_total", "Input partitions whose position no longer existed on the broker (retention passed, topic recreated): consumption went on from the earliest offset; changes in between were lost. Also events topics' partitions whose offsets started over.", &["topic", "partition"]),
            follower_lag: gauge_vec(&r, "livetable_follower_lag", "Largest changelog lag (records) of the partitions the follower reads, by table.", &["table"]),
            publish: PublishMetrics::register(&r),
            security: SecurityMetrics::register(&r),
            registry: r,
        };
        // series of the fixed label sets exist from the start, so rate() and alerts see zeros
        let init = |v: &IntCounterVec, values: &[&str]| {
            for x in values {
                v.with_label_values(&[x]);
            }
        };
        init(
            &m.decode_errors,
            &[
                "oversized",
                "invalid_json",
                "not_an_object",
                "bad_shape",
                "unknown_op",
                "no_key",
                "no_table",
                "decimal_out_of_range",
                "decimals_too_large",
                "too_deep",
                "key_too_long",
                "bad_name",
            ],
        );
        init(
            &m.skipped,
            &["schema_change", "heartbeat", "transaction", "message"],
        );
        init(&m.resumes, &["hit", "miss"]);
        init(
            &m.protocol_errors,
            &[
                "bad_request",
                "bad_message",
                "unknown_table",
                "too_many_subscriptions",
                "rate_limited",
                "slow_consumer",
                "server_busy",
                "busy",
                "unauthorized",
                "token_expired",
                "forbidden",
            ],
        );
        init(&m.http_refused, &["server_busy", "timeout"]);
        init(&m.connections_opened, &["ws", "sse"]);
        init(
            &m.connections_closed,
            &[
                "client_closed",
                "read_error",
                "write_error",
                "slow_client",
                "idle",
                "shutdown",
                "rate_limited",
                "invalid_utf8",
                "too_big",
                "unauthorized",
                "token_expired",
                "rows_resync",
            ],
        );
        init(&m.sent_bytes, &["snapshot", "patch", "row", "control"]);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// The text exposition format of every metric.
    /// Sets the rows and seq gauges of table `name` (after ingest, a restore or the follower
    /// changed it).
    pub fn table_size(&self, name: &str, rows: usize, seq: u64) {
        self.table_rows
            .with_label_values(&[name])
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
        self.table_seq
            .with_label_values(&[name])
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The metrics of the listeners and of authentication.
pub struct SecurityMetrics {
    pub tcp_connections: IntGauge,
    pub tcp_refused: IntCounterVec,
    pub tcp_timeouts: IntCounterVec,
    pub tls_handshake_errors: IntCounter,
    pub access_denied: IntCounterVec,
    pub reloads: IntCounterVec,
}

impl SecurityMetrics {
    fn register(r: &Registry) -> Self {
        let tcp_connections = IntGauge::new(
            "livetable_tcp_connections",
            "Open connections of the public listener, of every kind (HTTP, WebSocket, SSE).",
        )
        .unwrap_or_else(|e| panic!("metric tcp_connections: {e}"));
        r.register(Box::new(tcp_connections.clone()))
            .unwrap_or_else(|e| panic!("metric tcp_connections: {e}"));
        let tls_handshake_errors = IntCounter::new(
            "livetable_tls_handshake_errors_total",
            "TLS handshakes that failed (not TLS, no common cipher, reset).",
        )
        .unwrap_or_else(|e| panic!("metric tls_handshake_errors: {e}"));
        r.register(Box::new(tls_handshake_errors.clone()))
            .unwrap_or_else(|e| panic!("metric tls_handshake_errors: {e}"));
        let m = SecurityMetrics {
            tcp_connections,
            tcp_refused: counter_vec(r, "livetable_tcp_refused_total", "Connections refused at accept, by reason (max_connections, per_ip).", &["reason"]),
            tcp_timeouts: counter_vec(r, "livetable_tcp_timeouts_total", "Connections closed by a timeout, by phase (handshake: TLS or a request head too slow; idle: no byte for the idle timeout; shutdown: no byte for 1 s once the server shuts down).", &["phase"]),
            tls_handshake_errors,
            access_denied: counter_vec(r, "livetable_access_denied_total", "Requests, connections or subscriptions refused, by reason (unauthorized, token_expired, forbidden, origin).", &["reason"]),
            reloads: counter_vec(r, "livetable_reloads_total", "Reloads of files that changed, by file (tls, jwt_keys) and result (ok, error).", &["file", "result"]),
        };
        for x in ["max_connections", "per_ip"] {
            m.tcp_refused.with_label_values(&[x]);
        }
        for x in ["handshake", "idle", "shutdown"] {
            m.tcp_timeouts.with_label_values(&[x]);
        }
        for x in ["unauthorized", "token_expired", "forbidden", "origin"] {
            m.access_denied.with_label_values(&[x]);
        }
        for f in ["tls", "jwt_keys"] {
            for x in ["ok", "error"] {
                m.reloads.with_label_values(&[f, x]);
            }
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing (src/publish): clients writing records to Kafka. Documented in docs/publish.md.

/// Outcomes of `livetable_publishes_total`: the answer a client got.
pub const PUBLISH_OUTCOMES: [&str; 9] = [
    "ack",
    "duplicate",
    "invalid",
    "forbidden",
    "too_large",
    "rate_limited",
    "unavailable",
    "bad_request",
    "too_many_in_flight",
];
/// Results of `livetable_publish_duplicates_total`.
pub const PUBLISH_DUPLICATE_RESULTS: [&str; 3] = ["stored", "concurrent", "recovered"];
/// Results of `livetable_publish_recovery_scans_total`.
pub const PUBLISH_SCAN_RESULTS: [&str; 3] = ["found", "not_found", "error"];
/// The `topic` label of publishes to a topic that is not writable (never the client's string).
pub const PUBLISH_UNLISTED_TOPIC: &str = "_unlisted";

/// The metrics of publishing.
pub struct PublishMetrics {
    pub publishes: IntCounterVec,
    pub ack_seconds: HistogramVec,
    pub duplicates: IntCounterVec,
    pub recovery_scans: IntCounterVec,
    pub in_flight: IntGauge,
    pub ids: IntGauge,
}

impl PublishMetrics {
    fn register(r: &Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(m.clone()))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            m
        };
        let ack_seconds = HistogramVec::new(
            HistogramOpts::new(
                "livetable_publish_ack_seconds",
                "Time from a publish to the broker's acknowledgement, by topic (first answers only, not duplicates).",
            )
            .buckets(latency_buckets()),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("metric livetable_publish_ack_seconds: {e}"));
        r.register(Box::new(ack_seconds.clone()))
            .unwrap_or_else(|e| panic!("metric livetable_publish_ack_seconds: {e}"));
        let m = PublishMetrics {
            publishes: counter_vec(r, "livetable_publishes_total", "Publishes answered, by topic and outcome (ack, duplicate, or the nack code).", &["topic", "outcome"]),
            ack_seconds,
            duplicates: counter_vec(r, "livetable_publish_duplicates_total", "Publishes answered with the ack of an earlier publish of the same id, by topic and result (stored, concurrent, recovered).", &["topic", "result"]),
            recovery_scans: counter_vec(r, "livetable_publish_recovery_scans_total", "Partitions read back to resolve publishes whose outcome was unknown (after a crash or an unconfirmed delivery), by result.", &["result"]),
            in_flight: gauge("livetable_publish_in_flight", "Publishes handed to the producer or waiting for it, not yet answered by the broker."),
            ids: gauge("livetable_publish_ids", "Publish ids remembered for exactly-once retries."),
        };
        for x in PUBLISH_SCAN_RESULTS {
            m.recovery_scans.with_label_values(&[x]);
        }
        // every publishing series exists from start-up, with or without writable topics
        m.init_topic(PUBLISH_UNLISTED_TOPIC);
        m
    }

    /// Creates the series of a writable topic (and of unlisted topics) with value 0.
    pub fn init_topic(&self, topic: &str) {
        for o in PUBLISH_OUTCOMES {
            self.publishes.with_label_values(&[topic, o]);
        }
        for x in PUBLISH_DUPLICATE_RESULTS {
            self.duplicates.with_label_values(&[topic, x]);
        }
        self.ack_seconds.with_label_values(&[topic]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn registers_and_renders() {
        let m = super::Metrics::new();
        m.records_consumed
            .with_label_values(&["t", "applied"])
            .inc();
        let text = m.render();
        assert!(
            text.contains("livetable_records_consumed_total{outcome=\"applied\",topic=\"t\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
