//! Which topics to consume and how rows are keyed.

use std::collections::BTreeMap;

use regex::Regex;

use super::{invalid, ConfigError};

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

    /// The selection plus these exact topics (a pattern that does not match them gets them as
    /// alternatives: `^(pattern|t1$|t2$)`; Kafka topic names need only `.` escaped).
    pub fn with_topics<'a>(self, extra: impl Iterator<Item = &'a String>) -> Self {
        let mut extra: Vec<&String> = extra.collect();
        extra.sort();
        match self {
            TopicSelection::Names(mut names) => {
                for t in extra {
                    if !names.contains(t) {
                        names.push(t.clone());
                    }
                }
                TopicSelection::Names(names)
            }
            TopicSelection::Pattern(p) => {
                let re = Regex::new(&p).ok();
                let missing: Vec<String> = extra
                    .into_iter()
                    .filter(|t| !re.as_ref().is_some_and(|re| re.is_match(t)))
                    .map(|t| format!("{}$", t.replace('.', "\\.")))
                    .collect();
                if missing.is_empty() {
                    return TopicSelection::Pattern(p);
                }
                let rest = p.strip_prefix('^').unwrap_or(&p);
                TopicSelection::Pattern(format!("^({rest}|{})", missing.join("|")))
            }
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

/// Parses `--topics`: one regex when it starts with `^`, else comma-separated names.
pub fn parse_topics(spec: &str) -> Result<TopicSelection, ConfigError> {
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

/// Topic names Kafka accepts.
pub fn check_topic_chars(setting: &'static str, name: &str) -> Result<(), ConfigError> {
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
