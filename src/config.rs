//! Configuration: command-line flags, each also readable from a `LIVETABLE_*` environment variable,
//! and an optional TOML file (`--config`). Precedence: flag > environment > file > default.
//! `Config::load` returns a validated [`Config`]; every error names the setting at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use regex::Regex;
use serde::Deserialize;

/// Errors found while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// livetable: Debezium change streams -> a materialised table -> live WebSocket/SSE screens.
#[derive(Debug, Default, Parser)]
#[command(name = "livetable", version, about, long_about = None)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "LIVETABLE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "LIVETABLE_BROKERS", value_name = "HOST:PORT,..")]
    pub brokers: Option<String>,
    /// Debezium topics: comma-separated names, or one regex when it starts with `^` (e.g. `^odds\..*`)
    /// [default: ^odds\..*].
    #[arg(long, env = "LIVETABLE_TOPICS", value_name = "TOPICS")]
    pub topics: Option<String>,
    /// Kafka consumer group id [default: livetable].
    #[arg(long, env = "LIVETABLE_GROUP_ID", value_name = "ID")]
    pub group_id: Option<String>,
    /// HTTP listen address for the API, WebSocket and metrics [default: 127.0.0.1:8080].
    #[arg(long, env = "LIVETABLE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the sled store [default: ./data].
    #[arg(long, env = "LIVETABLE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Row key columns per table, `table=col[+col..]` separated by commas; `*` matches every table
    /// (e.g. `game_odds=game_id,*=game_id`). Without an entry the Kafka message key is used.
    #[arg(long, env = "LIVETABLE_KEY_COLUMNS", value_name = "SPEC")]
    pub key_columns: Option<String>,
    /// Prefix of the compacted changelog topic of each table [default: livetable.table.].
    #[arg(long, env = "LIVETABLE_CHANGELOG_PREFIX", value_name = "PREFIX")]
    pub changelog_prefix: Option<String>,
    /// Dead-letter topic for records that cannot be decoded [default: livetable.dlq].
    #[arg(long, env = "LIVETABLE_DLQ_TOPIC", value_name = "TOPIC")]
    pub dlq_topic: Option<String>,
    /// Extra librdkafka property `key=value` for the consumer and producers (repeatable;
    /// environment: comma-separated).
    #[arg(
        long = "kafka-prop",
        env = "LIVETABLE_KAFKA_PROPS",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub kafka_prop: Vec<String>,
    /// Largest record value accepted, in bytes; larger records go to the dead-letter topic
    /// [default: 1048576].
    #[arg(long, env = "LIVETABLE_MAX_RECORD_BYTES", value_name = "BYTES")]
    pub max_record_bytes: Option<usize>,
    /// Most records applied in one sled batch [default: 5000].
    #[arg(long, env = "LIVETABLE_MAX_BATCH", value_name = "N")]
    pub max_batch: Option<usize>,
    /// Log filter in `tracing` syntax [default: info].
    #[arg(long, env = "LIVETABLE_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "LIVETABLE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Changes kept per table in memory so reconnecting clients resume with a patch [default: 10000].
    #[arg(long, env = "LIVETABLE_REPLAY_BUFFER", value_name = "N")]
    pub replay_buffer: Option<usize>,
    /// Most concurrent WebSocket and SSE connections [default: 10000].
    #[arg(long, env = "LIVETABLE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a client may stay unable to take its pending patch before it is closed [default: 10].
    #[arg(long, env = "LIVETABLE_SLOW_CLIENT_SECS", value_name = "SECS")]
    pub slow_client_secs: Option<u64>,
    /// Format of WebSocket connections that do not ask for one (`patch` or `rows`) [default: patch].
    #[arg(long, env = "LIVETABLE_DEFAULT_FORMAT", value_name = "FORMAT")]
    pub default_format: Option<String>,
    /// Seconds allowed for a graceful shutdown before the process gives up waiting [default: 10].
    #[arg(long, env = "LIVETABLE_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

/// The same settings, as read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    brokers: Option<String>,
    topics: Option<String>,
    group_id: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    key_columns: Option<String>,
    changelog_prefix: Option<String>,
    dlq_topic: Option<String>,
    #[serde(default)]
    kafka_prop: Vec<String>,
    max_record_bytes: Option<usize>,
    max_batch: Option<usize>,
    log: Option<String>,
    log_format: Option<String>,
    shutdown_grace_secs: Option<u64>,
    replay_buffer: Option<usize>,
    max_connections: Option<usize>,
    slow_client_secs: Option<u64>,
    default_format: Option<String>,
}

/// Which Debezium topics to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicSelection {
    /// Exact topic names.
    Names(Vec<String>),
    /// One regex (librdkafka subscribes to every matching topic, including ones created later).
    Pattern(String),
}

impl TopicSelection {
    /// The list given to `Consumer::subscribe`.
    pub fn subscription(&self) -> Vec<&str> {
        match self {
            TopicSelection::Names(names) => names.iter().map(String::as_str).collect(),
            TopicSelection::Pattern(p) => vec![p.as_str()],
        }
    }
}

/// Key columns per table, with an optional `*` fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyColumns {
    per_table: BTreeMap<String, Vec<String>>,
    fallback: Option<Vec<String>>,
}

impl KeyColumns {
    /// Parses `table=col[+col..],*=col`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut out = KeyColumns::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (table, cols) = entry.split_once('=').ok_or_else(|| {
                invalid("key-columns", format!("`{entry}` is not `table=column`"))
            })?;
            let cols: Vec<String> = cols.split('+').map(|c| c.trim().to_string()).collect();
            if table.trim().is_empty() || cols.iter().any(String::is_empty) {
                return Err(invalid(
                    "key-columns",
                    format!("`{entry}` has an empty table or column"),
                ));
            }
            if table.trim() == "*" {
                out.fallback = Some(cols);
            } else {
                out.per_table.insert(table.trim().to_string(), cols);
            }
        }
        Ok(out)
    }

    /// The configured key columns of `table`, if any.
    pub fn for_table(&self, table: &str) -> Option<&[String]> {
        self.per_table
            .get(table)
            .or(self.fallback.as_ref())
            .map(Vec::as_slice)
    }
}

/// Validated configuration of one livetable process.
#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub topics: TopicSelection,
    pub group_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub key_columns: KeyColumns,
    pub changelog_prefix: String,
    pub dlq_topic: String,
    pub kafka_props: Vec<(String, String)>,
    pub max_record_bytes: usize,
    pub max_batch: usize,
    pub log: String,
    pub log_json: bool,
    pub shutdown_grace: Duration,
    pub replay_buffer: usize,
    pub max_connections: usize,
    pub slow_client: Duration,
    pub default_format: crate::fanout::protocol::Format,
}

impl Config {
    /// Parses the process arguments and environment, reads `--config` if given, validates.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::parse())
    }

    /// Builds a configuration from already-parsed arguments (reads `--config` if given).
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let brokers = args
            .brokers
            .or(file.brokers)
            .unwrap_or_else(|| "127.0.0.1:9092".into());
        if brokers.trim().is_empty() {
            return Err(invalid("brokers", "must not be empty"));
        }
        let topics = parse_topics(
            &args
                .topics
                .or(file.topics)
                .unwrap_or_else(|| r"^odds\..*".into()),
        )?;
        let group_id = args
            .group_id
            .or(file.group_id)
            .unwrap_or_else(|| "livetable".into());
        if group_id.trim().is_empty() {
            return Err(invalid("group-id", "must not be empty"));
        }
        let listen_text = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text.parse().map_err(|e| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080: {e}"),
            )
        })?;
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        let key_columns =
            KeyColumns::parse(&args.key_columns.or(file.key_columns).unwrap_or_default())?;
        let changelog_prefix = args
            .changelog_prefix
            .or(file.changelog_prefix)
            .unwrap_or_else(|| "livetable.table.".into());
        check_topic_chars("changelog-prefix", &changelog_prefix)?;
        let dlq_topic = args
            .dlq_topic
            .or(file.dlq_topic)
            .unwrap_or_else(|| "livetable.dlq".into());
        if dlq_topic.is_empty() {
            return Err(invalid("dlq-topic", "must not be empty"));
        }
        check_topic_chars("dlq-topic", &dlq_topic)?;
        let mut kafka_props = Vec::new();
        for prop in file.kafka_prop.iter().chain(args.kafka_prop.iter()) {
            let (k, v) = prop
                .split_once('=')
                .ok_or_else(|| invalid("kafka-prop", format!("`{prop}` is not `key=value`")))?;
            if k.trim().is_empty() {
                return Err(invalid("kafka-prop", format!("`{prop}` has an empty key")));
            }
            kafka_props.push((k.trim().to_string(), v.trim().to_string()));
        }
        let max_record_bytes = args
            .max_record_bytes
            .or(file.max_record_bytes)
            .unwrap_or(1 << 20);
        if max_record_bytes < 1024 {
            return Err(invalid("max-record-bytes", "must be at least 1024"));
        }
        let max_batch = args.max_batch.or(file.max_batch).unwrap_or(5000);
        if !(1..=1_000_000).contains(&max_batch) {
            return Err(invalid("max-batch", "must be between 1 and 1000000"));
        }
        let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
        let log_json = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(invalid(
                    "log-format",
                    format!("`{other}` is not `text` or `json`"),
                ))
            }
        };
        let grace = args
            .shutdown_grace_secs
            .or(file.shutdown_grace_secs)
            .unwrap_or(10);
        let replay_buffer = args.replay_buffer.or(file.replay_buffer).unwrap_or(10_000);
        if !(1..=10_000_000).contains(&replay_buffer) {
            return Err(invalid("replay-buffer", "must be between 1 and 10000000"));
        }
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        let slow_client_secs = args
            .slow_client_secs
            .or(file.slow_client_secs)
            .unwrap_or(10);
        if slow_client_secs == 0 {
            return Err(invalid("slow-client-secs", "must be at least 1"));
        }
        let format_text = args
            .default_format
            .or(file.default_format)
            .unwrap_or_else(|| "patch".into());
        let default_format =
            crate::fanout::protocol::Format::parse(&format_text).ok_or_else(|| {
                invalid(
                    "default-format",
                    format!("`{format_text}` is not `patch` or `rows`"),
                )
            })?;
        Ok(Config {
            brokers,
            topics,
            group_id,
            listen,
            data_dir,
            key_columns,
            changelog_prefix,
            dlq_topic,
            kafka_props,
            max_record_bytes,
            max_batch,
            log,
            log_json,
            shutdown_grace: Duration::from_secs(grace),
            replay_buffer,
            max_connections,
            slow_client: Duration::from_secs(slow_client_secs),
            default_format,
        })
    }

    /// A configuration with defaults for everything but what tests must choose.
    pub fn for_tests(brokers: &str, topics: TopicSelection, data_dir: &Path, unique: &str) -> Self {
        Config {
            brokers: brokers.to_string(),
            topics,
            group_id: format!("livetable-{unique}"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            key_columns: KeyColumns::default(),
            changelog_prefix: format!("lt.{unique}.table."),
            dlq_topic: format!("lt.{unique}.dlq"),
            kafka_props: Vec::new(),
            max_record_bytes: 1 << 20,
            max_batch: 5000,
            log: "info".into(),
            log_json: false,
            shutdown_grace: Duration::from_secs(10),
            replay_buffer: 10_000,
            max_connections: 10_000,
            slow_client: Duration::from_secs(10),
            default_format: crate::fanout::protocol::Format::Patch,
        }
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.into(),
        source: Box::new(source),
    })
}

fn parse_topics(spec: &str) -> Result<TopicSelection, ConfigError> {
    let spec = spec.trim();
    if spec.starts_with('^') {
        Regex::new(spec)
            .map_err(|e| invalid("topics", format!("`{spec}` is not a valid regex: {e}")))?;
        return Ok(TopicSelection::Pattern(spec.to_string()));
    }
    let names: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(invalid("topics", "no topic given"));
    }
    for name in &names {
        check_topic_chars("topics", name)?;
    }
    Ok(TopicSelection::Names(names))
}

fn check_topic_chars(setting: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            setting,
            format!("`{name}` may only contain ASCII letters, digits, `.`, `_`, `-` (at most 200)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        let mut v = vec!["livetable"];
        v.extend_from_slice(list);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_are_sensible() {
        let c = Config::from_args(Args::default()).unwrap();
        assert_eq!(c.brokers, "127.0.0.1:9092");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.topics, TopicSelection::Pattern(r"^odds\..*".into()));
        assert_eq!(c.changelog_prefix, "livetable.table.");
        assert_eq!(c.dlq_topic, "livetable.dlq");
    }

    #[test]
    fn topics_names_or_regex() {
        let c = Config::from_args(args(&["--topics", "a.b, c"])).unwrap();
        assert_eq!(
            c.topics,
            TopicSelection::Names(vec!["a.b".into(), "c".into()])
        );
        let c = Config::from_args(args(&["--topics", r"^odds\.game_\d+$"])).unwrap();
        assert!(matches!(c.topics, TopicSelection::Pattern(_)));
        let err = Config::from_args(args(&["--topics", "^odds(("])).unwrap_err();
        assert!(err.to_string().contains("`topics`"), "{err}");
        let err = Config::from_args(args(&["--topics", "bad topic"])).unwrap_err();
        assert!(err.to_string().contains("`topics`"), "{err}");
    }

    #[test]
    fn invalid_settings_are_named() {
        for (flag, value, name) in [
            ("--listen", "nope", "`listen`"),
            ("--key-columns", "game_odds", "`key-columns`"),
            ("--kafka-prop", "novalue", "`kafka-prop`"),
            ("--max-record-bytes", "10", "`max-record-bytes`"),
            ("--log-format", "xml", "`log-format`"),
            ("--dlq-topic", "a b", "`dlq-topic`"),
        ] {
            let err = Config::from_args(args(&[flag, value]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{flag}: {err}");
        }
    }

    #[test]
    fn key_columns_per_table_and_fallback() {
        let k = KeyColumns::parse("game_odds=game_id, multi=a+b ,*=id").unwrap();
        assert_eq!(k.for_table("game_odds").unwrap(), ["game_id"]);
        assert_eq!(k.for_table("multi").unwrap(), ["a", "b"]);
        assert_eq!(k.for_table("other").unwrap(), ["id"]);
        assert!(KeyColumns::parse("").unwrap().for_table("x").is_none());
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lt.toml");
        std::fs::write(&path, "brokers = \"k1:9092\"\ngroup_id = \"from-file\"\nkafka_prop = [\"fetch.wait.max.ms=5\"]\n").unwrap();
        let c = Config::from_args(args(&[
            "--config",
            path.to_str().unwrap(),
            "--group-id",
            "from-flag",
        ]))
        .unwrap();
        assert_eq!(c.brokers, "k1:9092");
        assert_eq!(c.group_id, "from-flag");
        assert_eq!(
            c.kafka_props,
            vec![("fetch.wait.max.ms".to_string(), "5".to_string())]
        );
        std::fs::write(&path, "nonsense = 1\n").unwrap();
        let err = Config::from_args(args(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nonsense"), "{err}");
    }
}
