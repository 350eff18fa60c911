//! The settings as given: one definition per setting, read from the command line, the
//! environment (`LIVETABLE_*`) and a TOML file, merged (flag > environment > file) before
//! validation.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// livetable: Debezium change streams -> a materialised table -> live WebSocket/SSE screens.
#[derive(Debug, Default, Clone, Parser, Serialize, Deserialize)]
#[command(name = "livetable", version, about, long_about = None)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "LIVETABLE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Role of this process: `all` (consume, materialise and serve), `materialiser` (consume and
    /// materialise its share of the partitions; serves health, readiness and metrics only) or
    /// `gateway` (serve every table from the changelog topics) [default: all].
    #[arg(long, env = "LIVETABLE_ROLE", value_name = "ROLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "LIVETABLE_BROKERS", value_name = "HOST:PORT,..")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Debezium topics: comma-separated names, or one regex when it starts with `^` (e.g. `^odds\..*`)
    /// [default: ^odds\..*].
    #[arg(long, env = "LIVETABLE_TOPICS", value_name = "TOPICS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics: Option<String>,
    /// Kafka consumer group id; it also names the deployment (its changelog topics, registry and
    /// dead-letter topic derive from it) [default: livetable].
    #[arg(long, env = "LIVETABLE_GROUP_ID", value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// HTTP listen address for the API, WebSocket and metrics [default: 127.0.0.1:8080].
    #[arg(long, env = "LIVETABLE_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Directory of the sled store [default: ./data].
    #[arg(long, env = "LIVETABLE_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Row key columns per table, `table=col[+col..]` separated by commas; `*` matches every table
    /// (e.g. `game_odds=game_id,*=game_id`). Without an entry the Kafka message key is used.
    #[arg(long, env = "LIVETABLE_KEY_COLUMNS", value_name = "SPEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_columns: Option<String>,
    /// Prefix of the compacted changelog topic of each table [default: <group-id>.table.].
    #[arg(long, env = "LIVETABLE_CHANGELOG_PREFIX", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changelog_prefix: Option<String>,
    /// Dead-letter topic for records that cannot be decoded [default: <group-id>.dlq].
    #[arg(long, env = "LIVETABLE_DLQ_TOPIC", value_name = "TOPIC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
    /// Extra librdkafka property `key=value` for the consumers and producers (repeatable; values
    /// may contain commas). Environment: `LIVETABLE_KAFKA_PROPS`, one property per line (or
    /// comma-separated when no value contains a comma).
    #[arg(long = "kafka-prop", value_name = "KEY=VALUE")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kafka_prop: Vec<String>,
    /// Largest record value accepted, in bytes; larger records go to the dead-letter topic
    /// [default: 1000000, librdkafka's message.max.bytes].
    #[arg(long, env = "LIVETABLE_MAX_RECORD_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_record_bytes: Option<usize>,
    /// What to do with a change that a connector sends again after a crash (Kafka Connect is at
    /// least once), told by a source position below the one its input partition already reached
    /// (PostgreSQL's `source.sequence`): `skip` it, or `apply` it as any change (clients then see
    /// older values for a moment, until the stream catches up again) [default: skip].
    #[arg(long, env = "LIVETABLE_SOURCE_RESENDS", value_name = "skip|apply")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_resends: Option<String>,
    /// Most records applied in one sled batch [default: 5000].
    #[arg(long, env = "LIVETABLE_MAX_BATCH", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// A batch closes once its records' payloads reach this many bytes (so a batch of large rows
    /// stays small for the store, the changelog and the fan-out) [default: 4194304 (4 MiB)].
    #[arg(long, env = "LIVETABLE_MAX_BATCH_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_bytes: Option<usize>,
    /// A node is ready once every partition it consumes or follows is at most this many records
    /// behind its high watermark; it is not ready again while it is further behind [default: 1000].
    #[arg(long, env = "LIVETABLE_MAX_READY_LAG", value_name = "RECORDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ready_lag: Option<i64>,
    /// A restore or registry read gives up when no record arrived for this long (it is retried)
    /// [default: 60].
    #[arg(long, env = "LIVETABLE_RESTORE_STALL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_stall_secs: Option<u64>,
    /// How long the changelog topics keep a tombstone (`delete.retention.ms`, set on the changelog
    /// topics livetable creates; give an existing topic the same): a node whose data directory
    /// was last in use more than half of it ago reads its tables anew from the changelog, since
    /// the deletes made meanwhile may be gone from it [default: 86400].
    #[arg(
        long,
        env = "LIVETABLE_CHANGELOG_TOMBSTONE_RETENTION_SECS",
        value_name = "SECS"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changelog_tombstone_retention_secs: Option<u64>,
    /// A checkpoint whose changelog records wait this long for the broker makes the node not ready
    /// (what it serves is not durable) [default: 30].
    #[arg(long, env = "LIVETABLE_CHECKPOINT_STUCK_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_stuck_secs: Option<u64>,
    /// ... and unhealthy (`/healthz` 503) after this long [default: 600].
    #[arg(long, env = "LIVETABLE_CHECKPOINT_FATAL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_fatal_secs: Option<u64>,
    /// Consumer-group static membership id (`group.instance.id`), e.g. the pod name: a member that
    /// restarts with the same id gets its partitions back without a rebalance where the broker
    /// supports it [default: none].
    #[arg(long, env = "LIVETABLE_INSTANCE_ID", value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Log filter in `tracing` syntax [default: info].
    #[arg(long, env = "LIVETABLE_LOG", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "LIVETABLE_LOG_FORMAT", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Changes kept per table in memory so reconnecting clients resume with a patch [default: 10000].
    #[arg(long, env = "LIVETABLE_REPLAY_BUFFER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_buffer: Option<usize>,
    /// Estimated bytes of updates the hub keeps, all tables together, for resumes (within
    /// `--replay-buffer`) and for subscribers that have not read them yet; over it the oldest
    /// updates of any table go first, and a subscriber behind what it keeps starts again with a
    /// new snapshot [default: 268435456 (256 MiB)].
    #[arg(long, env = "LIVETABLE_FANOUT_BUFFER_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout_buffer_bytes: Option<usize>,
    /// A client resuming from a position this node has not reached yet waits this long for it
    /// before it gets a snapshot instead [default: 2000].
    #[arg(long, env = "LIVETABLE_RESUME_WAIT_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_wait_ms: Option<u64>,
    /// Most open connections on `--listen`, of every kind (HTTP, WebSocket, SSE); more are answered
    /// 503 and closed (over TLS, or beyond 64 being refused at once: closed without an answer)
    /// [default: 10000].
    #[arg(long, env = "LIVETABLE_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Seconds a WebSocket client may stay unable to take its pending output before it is closed
    /// with 1008 (a stalled SSE stream ends at `--idle-timeout-secs`) [default: 10].
    #[arg(long, env = "LIVETABLE_SLOW_CLIENT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_client_secs: Option<u64>,
    /// Format of WebSocket connections on `/` that do not ask for one (`patch` or `rows`) [default: patch].
    #[arg(long, env = "LIVETABLE_DEFAULT_FORMAT", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_format: Option<String>,
    /// Tables a `format=rows` client without `?table=` receives (on `/`, and on `/ws` unless
    /// livetable serves exactly one table): a regex over table names [default: every table].
    #[arg(long, env = "LIVETABLE_ROOT_TABLES", value_name = "REGEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_tables: Option<String>,
    /// Live tables made of every table whose name matches a regex, rows keyed `table/key`:
    /// `name=regex`, comma-separated (e.g. `games=^game_`).
    #[arg(long, env = "LIVETABLE_UNION", value_name = "NAME=REGEX,..")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub union: Option<String>,
    /// Views file (TOML, README "Views"): input topics (`debezium`, `upsert`, `events`) and
    /// declared views (group_by, top_n, max_by, min_by, history, delta), computed on serving nodes.
    #[arg(long, env = "LIVETABLE_VIEWS", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub views: Option<PathBuf>,
    /// The `[publish]` table of the configuration file: writable topics (docs/publish.md). Only in
    /// the file.
    #[arg(skip)]
    #[serde(default, skip_serializing)]
    pub publish: Option<crate::publish::PublishSection>,
    /// Seconds allowed for a graceful shutdown before the process gives up waiting [default: 10].
    #[arg(long, env = "LIVETABLE_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_secs: Option<u64>,

    // --- exposure: authentication, origins, TLS, the admin listener, limits (README, "Deploying on the internet") ---
    /// Client authentication: `none` (anyone who reaches the port reads every table) or `jwt`
    /// (a signed token with the tables, keys and rows it may read) [default: none].
    #[arg(long, env = "LIVETABLE_AUTH", value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// `--auth jwt`: file with the HS256 shared secret (its bytes, a trailing newline removed);
    /// re-read when it changes.
    #[arg(long, env = "LIVETABLE_JWT_SECRET_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    /// `--auth jwt`: PEM file with the RS256 (RSA) or ES256 (P-256) public key; re-read when it
    /// changes.
    #[arg(long, env = "LIVETABLE_JWT_PUBLIC_KEY_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// `--auth jwt`: JWKS file (RS256 and ES256 keys chosen by the token's `kid`); re-read when it
    /// changes.
    #[arg(long, env = "LIVETABLE_JWT_JWKS_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// `--auth jwt`: the `iss` a token must carry (not checked when unset).
    #[arg(long, env = "LIVETABLE_JWT_ISSUER", value_name = "ISS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// `--auth jwt`: the `aud` a token must carry (not checked when unset).
    #[arg(long, env = "LIVETABLE_JWT_AUDIENCE", value_name = "AUD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// `--auth jwt`: the claim holding livetable's grants (`tables`, `keys`, `rows`)
    /// [default: livetable].
    #[arg(long, env = "LIVETABLE_JWT_CLAIM", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_claim: Option<String>,
    /// `--auth jwt`: clock skew tolerated on `exp` and `nbf` at verification, in seconds
    /// [default: 5].
    #[arg(long, env = "LIVETABLE_JWT_LEEWAY_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,
    /// Origins allowed to open WebSocket and SSE connections and to read the HTTP API from a
    /// browser (CORS): comma-separated `scheme://host[:port]`, or `*` for any. A publish (POST)
    /// with an `Origin` of any other site is refused. Requests without an `Origin` header
    /// (non-browser clients) and same-origin requests are always allowed [default: same origin
    /// only].
    #[arg(long, env = "LIVETABLE_ALLOWED_ORIGINS", value_name = "ORIGINS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<String>,
    /// PEM certificate chain: serve HTTPS/WSS on `--listen` (with `--tls-key`); re-read when it
    /// changes.
    #[arg(long, env = "LIVETABLE_TLS_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`; re-read when it changes.
    #[arg(long, env = "LIVETABLE_TLS_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Address for `/metrics`, `/healthz` and `/readyz` (plain HTTP); when set they are not served
    /// on `--listen`.
    #[arg(long, env = "LIVETABLE_ADMIN_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Most open connections from one IP address (an IPv6 client: its /64), of every kind; 0: no
    /// limit [default: 1000].
    #[arg(long, env = "LIVETABLE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// Most subscriptions on one WebSocket connection [default: 64].
    #[arg(long, env = "LIVETABLE_MAX_SUBSCRIPTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<usize>,
    /// Messages per second a WebSocket client may send (bursts of twice that) [default: 50].
    #[arg(long, env = "LIVETABLE_MAX_MESSAGES_PER_SEC", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages_per_sec: Option<u32>,
    /// Largest WebSocket frame or message a client may send, in bytes (larger: close 1009)
    /// [default: 65536].
    #[arg(long, env = "LIVETABLE_MAX_FRAME_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,
    /// Seconds a new connection has for its TLS handshake, and any connection for each request
    /// head (a WebSocket upgrade included) and between requests [default: 10].
    #[arg(long, env = "LIVETABLE_HANDSHAKE_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_secs: Option<u64>,
    /// Seconds without a byte in either direction (or, on a WebSocket, without a frame from the
    /// client) after which a connection is closed [default: 60].
    #[arg(long, env = "LIVETABLE_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds an HTTP API request may take before it is answered 503 [default: 30].
    #[arg(long, env = "LIVETABLE_REQUEST_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_secs: Option<u64>,
    /// HTTP requests handled at once; more are answered 503 at once [default: 512].
    #[arg(long, env = "LIVETABLE_MAX_CONCURRENT_REQUESTS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<usize>,
    /// Copies of tables made for one client held at once: whole-table reads (`GET
    /// /api/tables/{table}`), and snapshots whose rows are scanned (a `where` that cannot be
    /// looked up) or sent in `format=rows`, each until its client took it; more wait up to 5 s,
    /// then are refused (503, or a `busy` error); 0: no limit [default: 8].
    #[arg(long, env = "LIVETABLE_MAX_TABLE_COPIES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_table_copies: Option<usize>,
}

impl Args {
    /// Parses the command line and the environment.
    pub fn from_process() -> Self {
        let mut args = Args::parse();
        if let Ok(env) = std::env::var("LIVETABLE_KAFKA_PROPS") {
            let mut from_env = split_props(&env);
            from_env.append(&mut args.kafka_prop);
            args.kafka_prop = from_env;
        }
        args
    }

    /// `self` over the settings of a TOML file: every setting given here wins.
    pub fn over_file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.into(),
            source,
        })?;
        let file: Args = toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.into(),
            source: Box::new(source),
        })?;
        let invalid = |e: serde_json::Error| ConfigError::Invalid {
            setting: "config",
            reason: e.to_string(),
        };
        let publish = file.publish.clone();
        let mut merged = serde_json::to_value(&file).map_err(invalid)?;
        let over = serde_json::to_value(&self).map_err(invalid)?;
        if let (Some(m), serde_json::Value::Object(o)) = (merged.as_object_mut(), over) {
            for (k, v) in o {
                if k == "kafka_prop" {
                    // the file's properties first, then the ones given here (later ones win)
                    if let (Some(serde_json::Value::Array(a)), serde_json::Value::Array(b)) =
                        (m.get_mut("kafka_prop"), &v)
                    {
                        a.extend(b.iter().cloned());
                        continue;
                    }
                }
                m.insert(k, v);
            }
        }
        let mut out: Args = serde_json::from_value(merged).map_err(invalid)?;
        out.config = self.config;
        out.publish = publish;
        Ok(out)
    }
}

/// `LIVETABLE_KAFKA_PROPS`: one property per line; without newlines, split at commas that start a
/// new `key=` (so `sasl.jaas.config=... a="x",b="y"` keeps its commas when it is the last one).
pub fn split_props(s: &str) -> Vec<String> {
    if s.contains('\n') {
        return s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
    }
    let key_start = |rest: &str| {
        let key: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .collect();
        !key.is_empty() && rest[key.len()..].starts_with('=')
    };
    let mut out = Vec::new();
    let mut current = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(',') {
        current.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if key_start(rest.trim_start()) {
            out.push(std::mem::take(&mut current).trim().to_string());
        } else {
            current.push(',');
        }
    }
    current.push_str(rest);
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_keep_commas_inside_values() {
        assert_eq!(
            split_props("a=1,b.c=2"),
            vec!["a=1".to_string(), "b.c=2".to_string()]
        );
        let jaas = r#"sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="u,1" password="p";"#;
        assert_eq!(
            split_props(&format!("security.protocol=SASL_SSL,{jaas}")),
            vec!["security.protocol=SASL_SSL".to_string(), jaas.to_string()]
        );
        assert_eq!(
            split_props("x=a,b\ny=c\n"),
            vec!["x=a,b".to_string(), "y=c".to_string()]
        );
    }
}
