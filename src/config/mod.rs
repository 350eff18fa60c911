//! Configuration: each setting is defined once in [`args::Args`] (a flag, its `LIVETABLE_*`
//! environment variable and its TOML key), merged with precedence flag > environment > file >
//! default, then validated here into a [`Config`]. Every error names the setting at fault.

pub mod args;
pub mod security;
mod topics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use args::Args;
pub use security::SecurityConfig;
pub use topics::{check_topic_chars, parse_topics, KeyColumns, TopicSelection};

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

pub(crate) fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// What a process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Consumes (as a member of the group), materialises, serves every table.
    #[default]
    All,
    /// Consumes and materialises its share of the partitions; serves health, readiness, metrics.
    Materialiser,
    /// Serves every table from the changelog topics; consumes no input.
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Materialiser => "materialiser",
            Role::Gateway => "gateway",
        }
    }
    pub fn ingests(self) -> bool {
        self != Role::Gateway
    }
    pub fn serves(self) -> bool {
        self != Role::Materialiser
    }
}

/// Output formats of live clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Snapshot, then merge patches.
    #[default]
    Patch,
    /// One flat row object per message (drop-in for the seed system's clients).
    Rows,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "patch" => Some(Format::Patch),
            "rows" => Some(Format::Rows),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Patch => "patch",
            Format::Rows => "rows",
        }
    }
}

/// A live table made of every table whose name matches a pattern.
#[derive(Debug, Clone)]
pub struct UnionDef {
    pub name: String,
    pub pattern: regex::Regex,
}

/// Validated configuration of one livetable process.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
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
    /// Payload bytes that close a batch (ingest and follower).
    pub max_batch_bytes: usize,
    pub max_ready_lag: i64,
    /// Skip changes that a connector sent again (`--source-resends skip`).
    pub skip_source_resends: bool,
    pub restore_stall: Duration,
    /// The changelog topics' `delete.retention.ms`: a store last in use more than half of it ago
    /// is read anew.
    pub changelog_tombstone_retention: Duration,
    pub checkpoint_stuck: Duration,
    pub checkpoint_fatal: Duration,
    pub instance_id: Option<String>,
    pub log: String,
    pub log_json: bool,
    pub shutdown_grace: Duration,
    pub replay_buffer: usize,
    /// Estimated bytes of updates the hub keeps, all tables together.
    pub fanout_buffer_bytes: usize,
    pub resume_wait: Duration,
    pub max_connections: usize,
    pub slow_client: Duration,
    pub default_format: Format,
    pub root_tables: Option<regex::Regex>,
    pub unions: Vec<UnionDef>,
    /// Writable topics (the `[publish]` table of the configuration file).
    pub publish: Option<crate::publish::PublishConfig>,
    /// Topics read as row states (`upsert` in the views file), by topic.
    pub upsert: Arc<HashMap<String, crate::cdc::decode::UpsertInput>>,
    /// Declared views (`--views`), in the file's order: computed on serving nodes.
    pub views: Arc<Vec<crate::views::ViewDef>>,
    /// `events` topics of the views file: read whole by every serving node for its views.
    pub events: Arc<Vec<crate::table::events::EventsTopic>>,
    /// Authentication, origins, TLS, the admin listener and client limits.
    pub security: SecurityConfig,
}

impl Config {
    /// Parses the process arguments and environment, reads `--config` if given, validates.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::from_process())
    }

    /// The deployment's table registry topic.
    pub fn registry_topic(&self) -> String {
        format!("{}__registry", self.changelog_prefix)
    }

    /// Builds a configuration from already-parsed arguments (reads `--config` if given).
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let a = match args.config.clone() {
            Some(path) => args.over_file(&path)?,
            None => args,
        };
        let security = SecurityConfig::from_args(&a)?;
        let role = match a.role.as_deref() {
            None | Some("all") => Role::All,
            Some("materialiser" | "materializer") => Role::Materialiser,
            Some("gateway") => Role::Gateway,
            Some(other) => {
                return Err(invalid(
                    "role",
                    format!("`{other}` is not `all`, `materialiser` or `gateway`"),
                ))
            }
        };
        let brokers = a.brokers.unwrap_or_else(|| "127.0.0.1:9092".into());
        if brokers.trim().is_empty() {
            return Err(invalid("brokers", "must not be empty"));
        }
        let mut topics = parse_topics(a.topics.as_deref().unwrap_or(r"^odds\..*"))?;
        let ViewsInputs {
            upsert,
            events,
            views,
        } = match &a.views {
            None => ViewsInputs {
                upsert: HashMap::new(),
                events: Vec::new(),
                views: Vec::new(),
            },
            Some(path) => views_inputs(path)?,
        };
        events_outside_ingest(&topics, &events)?;
        topics = topics.with_topics(upsert.keys());
        let group_id = a.group_id.unwrap_or_else(|| "livetable".into());
        if group_id.trim().is_empty() {
            return Err(invalid("group-id", "must not be empty"));
        }
        let listen_text = a.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text.parse().map_err(|e| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080: {e}"),
            )
        })?;
        let data_dir = a.data_dir.unwrap_or_else(|| PathBuf::from("./data"));
        let key_columns = KeyColumns::parse(a.key_columns.as_deref().unwrap_or_default())?;
        let changelog_prefix = a
            .changelog_prefix
            .unwrap_or_else(|| format!("{group_id}.table."));
        check_topic_chars("changelog-prefix", &changelog_prefix)
            .map_err(|_| invalid("changelog-prefix", format!("`{changelog_prefix}` may only contain ASCII letters, digits, `.`, `_`, `-` (a default derived from a group id with other characters needs an explicit --changelog-prefix)")))?;
        let dlq_topic = a.dlq_topic.unwrap_or_else(|| format!("{group_id}.dlq"));
        if dlq_topic.is_empty() {
            return Err(invalid("dlq-topic", "must not be empty"));
        }
        check_topic_chars("dlq-topic", &dlq_topic)?;
        let mut kafka_props = Vec::new();
        for prop in &a.kafka_prop {
            let (k, v) = prop
                .split_once('=')
                .ok_or_else(|| invalid("kafka-prop", format!("`{prop}` is not `key=value`")))?;
            if k.trim().is_empty() {
                return Err(invalid("kafka-prop", format!("`{prop}` has an empty key")));
            }
            kafka_props.push((k.trim().to_string(), v.trim().to_string()));
        }
        let max_record_bytes = a.max_record_bytes.unwrap_or(1_000_000);
        if !(1024..=100_000_000).contains(&max_record_bytes) {
            return Err(invalid(
                "max-record-bytes",
                "must be between 1024 and 100000000",
            ));
        }
        let max_batch = a.max_batch.unwrap_or(5000);
        if !(1..=1_000_000).contains(&max_batch) {
            return Err(invalid("max-batch", "must be between 1 and 1000000"));
        }
        let max_batch_bytes = a.max_batch_bytes.unwrap_or(4 << 20);
        if !(1024..=1 << 30).contains(&max_batch_bytes) {
            return Err(invalid(
                "max-batch-bytes",
                "must be between 1024 and 1073741824 (1 GiB)",
            ));
        }
        let max_ready_lag = a.max_ready_lag.unwrap_or(1000);
        if max_ready_lag < 0 {
            return Err(invalid("max-ready-lag", "must not be negative"));
        }
        let skip_source_resends = match a.source_resends.as_deref().unwrap_or("skip") {
            "skip" => true,
            "apply" => false,
            _ => return Err(invalid("source-resends", "must be `skip` or `apply`")),
        };
        let restore_stall_secs = a.restore_stall_secs.unwrap_or(60);
        if restore_stall_secs == 0 {
            return Err(invalid("restore-stall-secs", "must be at least 1"));
        }
        let tombstone_retention_secs = a.changelog_tombstone_retention_secs.unwrap_or(86_400);
        if !(2..=u64::from(u32::MAX)).contains(&tombstone_retention_secs) {
            return Err(invalid(
                "changelog-tombstone-retention-secs",
                "must be between 2 and 4294967295",
            ));
        }
        let checkpoint_stuck = a.checkpoint_stuck_secs.unwrap_or(30);
        let checkpoint_fatal = a.checkpoint_fatal_secs.unwrap_or(600);
        if checkpoint_stuck == 0 || checkpoint_fatal < checkpoint_stuck {
            return Err(invalid(
                "checkpoint-fatal-secs",
                "must be at least --checkpoint-stuck-secs, which must be at least 1",
            ));
        }
        let instance_id = a.instance_id.filter(|s| !s.trim().is_empty());
        let log = a.log.unwrap_or_else(|| "info".into());
        let log_json = match a.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(invalid(
                    "log-format",
                    format!("`{other}` is not `text` or `json`"),
                ))
            }
        };
        let grace = a.shutdown_grace_secs.unwrap_or(10);
        let replay_buffer = a.replay_buffer.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&replay_buffer) {
            return Err(invalid("replay-buffer", "must be between 1 and 10000000"));
        }
        let fanout_buffer_bytes = a.fanout_buffer_bytes.unwrap_or(256 << 20);
        if !(64 << 10..=1 << 40).contains(&fanout_buffer_bytes) {
            return Err(invalid(
                "fanout-buffer-bytes",
                "must be between 65536 (64 KiB) and 1099511627776 (1 TiB)",
            ));
        }
        let resume_wait_ms = a.resume_wait_ms.unwrap_or(2000);
        if resume_wait_ms > 60_000 {
            return Err(invalid("resume-wait-ms", "must be at most 60000"));
        }
        let max_connections = a.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        let slow_client_secs = a.slow_client_secs.unwrap_or(10);
        if slow_client_secs == 0 {
            return Err(invalid("slow-client-secs", "must be at least 1"));
        }
        let format_text = a.default_format.unwrap_or_else(|| "patch".into());
        let default_format = Format::parse(&format_text).ok_or_else(|| {
            invalid(
                "default-format",
                format!("`{format_text}` is not `patch` or `rows`"),
            )
        })?;
        let root_tables =
            match a.root_tables.as_deref() {
                None | Some("") => None,
                Some(p) => Some(regex::Regex::new(p).map_err(|e| {
                    invalid("root-tables", format!("`{p}` is not a valid regex: {e}"))
                })?),
            };
        let publish = match a.publish.clone() {
            None => None,
            Some(section) => {
                // schema paths are relative to the configuration file
                let base = a
                    .config
                    .as_deref()
                    .and_then(std::path::Path::parent)
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default();
                Some(
                    crate::publish::PublishConfig::from_section(section, &base)
                        .map_err(|e| invalid("publish", e.to_string()))?,
                )
            }
        };
        let mut unions = Vec::new();
        for entry in a
            .union
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (name, pattern) = entry
                .split_once('=')
                .ok_or_else(|| invalid("union", format!("`{entry}` is not `name=regex`")))?;
            if name.trim().is_empty() {
                return Err(invalid("union", format!("`{entry}` has an empty name")));
            }
            let pattern = regex::Regex::new(pattern.trim())
                .map_err(|e| invalid("union", format!("`{pattern}` is not a valid regex: {e}")))?;
            unions.push(UnionDef {
                name: name.trim().to_string(),
                pattern,
            });
        }
        Ok(Config {
            role,
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
            max_batch_bytes,
            max_ready_lag,
            skip_source_resends,
            restore_stall: Duration::from_secs(restore_stall_secs),
            changelog_tombstone_retention: Duration::from_secs(tombstone_retention_secs),
            checkpoint_stuck: Duration::from_secs(checkpoint_stuck),
            checkpoint_fatal: Duration::from_secs(checkpoint_fatal),
            instance_id,
            log,
            log_json,
            shutdown_grace: Duration::from_secs(grace),
            replay_buffer,
            fanout_buffer_bytes,
            resume_wait: Duration::from_millis(resume_wait_ms),
            max_connections,
            slow_client: Duration::from_secs(slow_client_secs),
            default_format,
            root_tables,
            unions,
            publish,
            upsert: Arc::new(upsert),
            views: Arc::new(views),
            events: Arc::new(events),
            security,
        })
    }

    /// The defaults, with what tests must choose: a unique group (hence unique topic names), a
    /// free port.
    pub fn for_tests(brokers: &str, topics: TopicSelection, data_dir: &Path, unique: &str) -> Self {
        let mut c = Config::from_args(Args {
            brokers: Some(brokers.to_string()),
            group_id: Some(format!("livetable-{unique}")),
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(data_dir.to_path_buf()),
            changelog_prefix: Some(format!("lt.{unique}.table.")),
            dlq_topic: Some(format!("lt.{unique}.dlq")),
            ..Args::default()
        })
        .unwrap_or_else(|e| panic!("test configuration: {e}"));
        c.topics = topics;
        c
    }
}

/// What a views file declares: the `upsert` input topics, the `events` topics and the views (in
/// the file's order, inputs first).
struct ViewsInputs {
    upsert: HashMap<String, crate::cdc::decode::UpsertInput>,
    events: Vec<crate::table::events::EventsTopic>,
    views: Vec<crate::views::ViewDef>,
}

fn views_inputs(path: &std::path::Path) -> Result<ViewsInputs, ConfigError> {
    use crate::views::config::{TopicFormat, ViewsFile};
    let file = ViewsFile::load(path).map_err(|e| invalid("views", e.to_string()))?;
    let mut out = ViewsInputs {
        upsert: HashMap::new(),
        events: Vec::new(),
        views: file.views,
    };
    for t in file.topics {
        match t.format {
            TopicFormat::Debezium => {}
            TopicFormat::Upsert => {
                out.upsert.insert(
                    t.topic.clone(),
                    crate::cdc::decode::UpsertInput {
                        table: t.name,
                        key: t.key,
                    },
                );
            }
            TopicFormat::Events => out.events.push(crate::table::events::EventsTopic {
                topic: t.topic,
                name: t.name,
                key: t.key,
            }),
        }
    }
    Ok(out)
}

/// An events topic is read by the events reader only: the table ingest must not take it for a
/// Debezium topic.
fn events_outside_ingest(
    topics: &TopicSelection,
    events: &[crate::table::events::EventsTopic],
) -> Result<(), ConfigError> {
    for e in events {
        let matched = match topics {
            TopicSelection::Names(names) => names.contains(&e.topic),
            TopicSelection::Pattern(p) => {
                regex::Regex::new(p).is_ok_and(|re| re.is_match(&e.topic))
            }
        };
        if matched {
            return Err(invalid(
                "views",
                format!(
                    "events topic `{}` is also selected by --topics, which would read it as a table; narrow --topics",
                    e.topic
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(list: &[&str]) -> Args {
        let mut v = vec!["livetable"];
        v.extend_from_slice(list);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_are_sensible() {
        let c = Config::from_args(Args::default()).unwrap();
        assert_eq!(c.role, Role::All);
        assert_eq!(c.brokers, "127.0.0.1:9092");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.topics, TopicSelection::Pattern(r"^odds\..*".into()));
        assert_eq!(c.changelog_prefix, "livetable.table.");
        assert_eq!(c.registry_topic(), "livetable.table.__registry");
        assert_eq!(c.dlq_topic, "livetable.dlq");
        assert_eq!(c.max_record_bytes, 1_000_000);
    }

    #[test]
    fn topic_names_derive_from_the_group() {
        let c = Config::from_args(args(&["--group-id", "prod-odds"])).unwrap();
        assert_eq!(c.changelog_prefix, "prod-odds.table.");
        assert_eq!(c.dlq_topic, "prod-odds.dlq");
        let err = Config::from_args(args(&["--group-id", "a b"])).unwrap_err();
        assert!(err.to_string().contains("`changelog-prefix`"), "{err}");
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
            ("--role", "boss", "`role`"),
            ("--root-tables", "((", "`root-tables`"),
            ("--union", "games", "`union`"),
            ("--source-resends", "drop", "`source-resends`"),
        ] {
            let err = Config::from_args(args(&[flag, value]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{flag}: {err}");
        }
    }

    #[test]
    fn source_resends_are_skipped_unless_asked() {
        assert!(Config::from_args(args(&[])).unwrap().skip_source_resends);
        let c = Config::from_args(args(&["--source-resends", "apply"])).unwrap();
        assert!(!c.skip_source_resends);
    }

    #[test]
    fn kafka_props_may_contain_commas() {
        let c = Config::from_args(args(&[
            "--kafka-prop",
            "sasl.jaas.config=x required a=\"1,2\";",
            "--kafka-prop",
            "security.protocol=SASL_SSL",
        ]))
        .unwrap();
        assert_eq!(
            c.kafka_props,
            vec![
                (
                    "sasl.jaas.config".to_string(),
                    "x required a=\"1,2\";".to_string()
                ),
                ("security.protocol".to_string(), "SASL_SSL".to_string())
            ]
        );
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
        std::fs::write(&path, "brokers = \"k1:9092\"\ngroup_id = \"from-file\"\nrole = \"gateway\"\nkafka_prop = [\"fetch.wait.max.ms=5\"]\n").unwrap();
        let c = Config::from_args(args(&[
            "--config",
            path.to_str().unwrap(),
            "--group-id",
            "from-flag",
            "--kafka-prop",
            "linger.ms=1",
        ]))
        .unwrap();
        assert_eq!(c.brokers, "k1:9092");
        assert_eq!(c.group_id, "from-flag");
        assert_eq!(c.role, Role::Gateway);
        assert_eq!(
            c.kafka_props,
            vec![
                ("fetch.wait.max.ms".to_string(), "5".to_string()),
                ("linger.ms".to_string(), "1".to_string())
            ]
        );
        std::fs::write(&path, "nonsense = 1\n").unwrap();
        let err = Config::from_args(args(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn the_publish_table_of_the_file_configures_writable_topics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bet.json"),
            r#"{"type":"object","required":["stake"]}"#,
        )
        .unwrap();
        let path = dir.path().join("lt.toml");
        std::fs::write(
            &path,
            "brokers = \"k1:9092\"\n[publish]\nmax_in_flight = 8\n[[publish.topic]]\nname = \"bets\"\nschema = \"bet.json\"\n",
        )
        .unwrap();
        let c = Config::from_args(args(&["--config", path.to_str().unwrap()])).unwrap();
        let p = c.publish.expect("publishing configured");
        assert_eq!(p.max_in_flight, 8);
        let bets = &p.topics["bets"];
        assert!(bets.check_schema(&serde_json::json!({"stake": 1})).is_ok());
        assert!(bets.check_schema(&serde_json::json!({})).is_err());
        // a schema that does not exist is refused at start, naming the setting
        std::fs::write(
            &path,
            "[publish]\n[[publish.topic]]\nname = \"bets\"\nschema = \"missing.json\"\n",
        )
        .unwrap();
        let err = Config::from_args(args(&["--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish") && err.contains("schema"), "{err}");
        assert!(Config::from_args(Args::default())
            .unwrap()
            .publish
            .is_none());
    }
}
