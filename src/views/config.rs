//! `views.toml`: loading and validation (the format is documented in [`crate::views`]).
//!
//! Loading is all or nothing: the first problem is returned, naming the line, and no view is
//! built from a file that has one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

/// Largest views file accepted, in bytes.
pub const MAX_VIEWS_FILE_BYTES: usize = 1 << 20;
/// Most views (and, separately, most topics) in one file.
pub const MAX_VIEWS: usize = 256;
/// Largest `top_n` limit.
pub const MAX_TOP_N_LIMIT: usize = 10_000;
/// Largest `history` limit (the whole list is sent on each change of its key).
pub const MAX_HISTORY_LIMIT: usize = 1_000;
/// Longest view, topic or column name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Most columns in one list (`by`, `order_by`, `columns`, `key`) and aggregates in one view.
pub const MAX_COLUMNS: usize = 64;

/// Why a views file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    #[error("cannot read views file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("views file is {0} bytes, more than the {MAX_VIEWS_FILE_BYTES} allowed")]
    TooLarge(usize),
    #[error("views file: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("views file line {line}: {problem}")]
    Invalid { line: usize, problem: ViewProblem },
}

/// A problem in a well-formed TOML views file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewProblem {
    #[error("name {0:?} is not 1 to {MAX_NAME_BYTES} letters, digits, '_', '-' or '.'")]
    BadName(String),
    #[error("view {0:?} has no operator (one of group_by, top_n, max_by, min_by, history, delta)")]
    NoOperator(String),
    #[error("view {0:?} has more than one operator (one view, one operator: chain views instead)")]
    SeveralOperators(String),
    #[error("view {0:?} reads from itself")]
    SelfInput(String),
    #[error("view {0:?} is part of a cycle of views")]
    Cycle(String),
    #[error("{0:?} names both a topic and a view")]
    NameClash(String),
    #[error("two topics have the name {0:?}")]
    DuplicateTopicName(String),
    #[error("{what} is {value}, not between 1 and {max}")]
    OutOfRange {
        what: &'static str,
        value: i64,
        max: usize,
    },
    #[error("{0} must list at least one column")]
    EmptyList(&'static str),
    #[error("{what} lists more than {MAX_COLUMNS} entries")]
    TooManyColumns { what: &'static str },
    #[error("{what} has a bad column name {name:?}")]
    BadColumn { what: &'static str, name: String },
    #[error("order_by entry {0:?} is not `column`, `column asc` or `column desc`")]
    BadOrderBy(String),
    #[error(
        "aggregate {0:?} is not count(), count(col), sum(col), min(col), max(col), avg(col) or latest(col)"
    )]
    BadAggregate(String),
    #[error("aggregate name {0:?} is also a group_by column")]
    AggregateNameClash(String),
    #[error("view {view:?}: {operator} needs a table input, and {from:?} is an events topic (put max_by, min_by or group_by before it)")]
    NeedsTable {
        view: String,
        operator: &'static str,
        from: String,
    },
    #[error("more than {MAX_VIEWS} views or topics")]
    TooMany,
}

/// How the records of a topic are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TopicFormat {
    /// Debezium change events (the default): a table.
    #[default]
    Debezium,
    /// The value is the row JSON, the key the row key, a null value deletes: a table.
    Upsert,
    /// Each record is an event, not a row state: usable only as the input of a view.
    Events,
}

/// A declared input topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDef {
    /// The Kafka topic.
    pub topic: String,
    /// The name views use in `from` (default: the topic's last dot-separated segment).
    pub name: String,
    pub format: TopicFormat,
    /// Columns that make the row or event key (default: the Kafka message key).
    pub key: Option<Vec<String>>,
    pub line: usize,
}

/// What a view reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Row states (insert/update/delete): a CDC table, an upsert topic or another view.
    Table,
    /// Events, add only.
    Events,
}

/// A validated view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewDef {
    /// The view's table name.
    pub name: String,
    /// Its input: a table, a declared topic's name, or another view.
    pub from: String,
    pub input: InputKind,
    pub operator: OperatorDef,
    /// Line of the view's `from` in the file.
    pub line: usize,
}

/// A view's operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorDef {
    GroupBy(GroupBySpec),
    TopN(TopNSpec),
    /// `max_by` (`max: true`) or `min_by`.
    Extreme(ExtremeSpec),
    History(HistorySpec),
    Delta(DeltaSpec),
}

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    Latest,
}

/// `name = "fn(column)"` of a group_by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateSpec {
    /// The output column.
    pub name: String,
    pub kind: AggKind,
    /// `None` only for `count()` / `count(*)` (rows).
    pub column: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBySpec {
    pub by: Vec<String>,
    pub aggregates: Vec<AggregateSpec>,
}

/// One `order_by` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortColumn {
    pub column: String,
    pub descending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopNSpec {
    pub order_by: Vec<SortColumn>,
    pub limit: usize,
    /// Rank separately within each group of these columns (empty: one ranking).
    pub group_by: Vec<String>,
    /// Column that carries the 1-based rank (`None`: no rank column).
    pub rank: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtremeSpec {
    /// `true` for `max_by`.
    pub max: bool,
    /// Group columns (default: the input key).
    pub key: Option<Vec<String>>,
    /// The compared column.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySpec {
    /// Key columns (default: the input key).
    pub key: Option<Vec<String>>,
    pub limit: usize,
    /// Columns kept in each entry (default: the whole row).
    pub columns: Option<Vec<String>>,
    /// Output column holding the list.
    pub field: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaSpec {
    /// Key columns (default: the input key).
    pub key: Option<Vec<String>>,
    pub columns: Vec<String>,
}

/// A validated views file: topics, and views in dependency order (a view after its input view).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ViewsFile {
    pub topics: Vec<TopicDef>,
    pub views: Vec<ViewDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    topics: BTreeMap<String, Spanned<RawTopic>>,
    #[serde(default)]
    views: BTreeMap<String, Spanned<RawView>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    #[serde(default)]
    format: TopicFormat,
    name: Option<Spanned<String>>,
    key: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    from: Spanned<String>,
    group_by: Option<Spanned<RawGroupBy>>,
    top_n: Option<Spanned<RawTopN>>,
    max_by: Option<Spanned<RawExtreme>>,
    min_by: Option<Spanned<RawExtreme>>,
    history: Option<Spanned<RawHistory>>,
    delta: Option<Spanned<RawDelta>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroupBy {
    by: Vec<String>,
    aggregates: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopN {
    order_by: Vec<String>,
    limit: i64,
    #[serde(default)]
    group_by: Vec<String>,
    rank: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtreme {
    key: Option<Vec<String>>,
    by: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    key: Option<Vec<String>>,
    limit: i64,
    columns: Option<Vec<String>>,
    field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelta {
    key: Option<Vec<String>>,
    columns: Vec<String>,
}

struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.0.len());
        self.0.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err<T>(&self, span: std::ops::Range<usize>, problem: ViewProblem) -> Result<T, ViewsError> {
        Err(ViewsError::Invalid {
            line: self.line(span.start),
            problem,
        })
    }
}

impl ViewsFile {
    /// Reads and validates a views file.
    pub fn load(path: &Path) -> Result<ViewsFile, ViewsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ViewsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ViewsFile::parse(&text)
    }

    /// Validates the text of a views file.
    pub fn parse(text: &str) -> Result<ViewsFile, ViewsError> {
        if text.len() > MAX_VIEWS_FILE_BYTES {
            return Err(ViewsError::TooLarge(text.len()));
        }
        let raw: RawFile = toml::from_str(text)?;
        let lines = Lines(text);
        if raw.topics.len() > MAX_VIEWS || raw.views.len() > MAX_VIEWS {
            return lines.err(0..0, ViewProblem::TooMany);
        }
        let mut topics = Vec::new();
        let mut topic_names: BTreeMap<String, TopicFormat> = BTreeMap::new();
        for (topic, spanned) in &raw.topics {
            let span = spanned.span();
            let t = spanned.get_ref();
            let (name, name_span) = match &t.name {
                Some(n) => (n.get_ref().clone(), n.span()),
                None => (
                    topic.rsplit('.').next().unwrap_or(topic).to_string(),
                    span.clone(),
                ),
            };
            if !valid_name(&name) {
                return lines.err(name_span, ViewProblem::BadName(name));
            }
            if topic_names.insert(name.clone(), t.format).is_some() {
                return lines.err(name_span, ViewProblem::DuplicateTopicName(name));
            }
            let key = match &t.key {
                Some(k) => Some(columns(&lines, k.span(), k.get_ref(), "topic key")?),
                None => None,
            };
            topics.push(TopicDef {
                topic: topic.clone(),
                name,
                format: t.format,
                key,
                line: lines.line(span.start),
            });
        }
        let mut views: BTreeMap<String, ViewDef> = BTreeMap::new();
        for (name, spanned) in &raw.views {
            let v = spanned.get_ref();
            let from_span = v.from.span();
            if !valid_name(name) {
                return lines.err(from_span, ViewProblem::BadName(name.clone()));
            }
            if topic_names.contains_key(name) {
                return lines.err(from_span, ViewProblem::NameClash(name.clone()));
            }
            let from = v.from.get_ref().clone();
            if &from == name {
                return lines.err(from_span, ViewProblem::SelfInput(name.clone()));
            }
            let input = match topic_names.get(&from) {
                Some(TopicFormat::Events) => InputKind::Events,
                _ => InputKind::Table,
            };
            let operator = operator(&lines, name, v, from_span.clone())?;
            if matches!(operator, OperatorDef::TopN(_)) && input == InputKind::Events {
                return lines.err(
                    from_span,
                    ViewProblem::NeedsTable {
                        view: name.clone(),
                        operator: "top_n",
                        from,
                    },
                );
            }
            views.insert(
                name.clone(),
                ViewDef {
                    name: name.clone(),
                    from,
                    input,
                    operator,
                    line: lines.line(from_span.start),
                },
            );
        }
        let order = dependency_order(&views).map_err(|name| ViewsError::Invalid {
            line: views.get(&name).map_or(1, |v| v.line),
            problem: ViewProblem::Cycle(name),
        })?;
        let views = order
            .into_iter()
            .filter_map(|n| views.get(&n).cloned())
            .collect();
        Ok(ViewsFile { topics, views })
    }
}

/// Views ordered so that a view comes after the view it reads; `Err(name)` names a view on a cycle.
fn dependency_order(views: &BTreeMap<String, ViewDef>) -> Result<Vec<String>, String> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    for start in views.keys() {
        // walk up the `from` chain (each view has one input, so the graph is a forest of chains)
        let mut chain: Vec<&str> = Vec::new();
        let mut at = start.as_str();
        loop {
            if done.contains(at) {
                break;
            }
            if chain.contains(&at) {
                return Err(at.to_string());
            }
            chain.push(at);
            match views.get(at) {
                Some(v) if views.contains_key(&v.from) => at = v.from.as_str(),
                _ => break,
            }
        }
        for name in chain.into_iter().rev() {
            if done.insert(name) {
                order.push(name.to_string());
            }
        }
    }
    Ok(order)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn columns(
    lines: &Lines<'_>,
    span: std::ops::Range<usize>,
    list: &[String],
    what: &'static str,
) -> Result<Vec<String>, ViewsError> {
    if list.is_empty() {
        return lines.err(span, ViewProblem::EmptyList(what));
    }
    if list.len() > MAX_COLUMNS {
        return lines.err(span, ViewProblem::TooManyColumns { what });
    }
    for c in list {
        column(lines, span.clone(), c, what)?;
    }
    Ok(list.to_vec())
}

fn column(
    lines: &Lines<'_>,
    span: std::ops::Range<usize>,
    name: &str,
    what: &'static str,
) -> Result<String, ViewsError> {
    if name.trim().is_empty() || name.trim() != name || name.len() > MAX_NAME_BYTES {
        return lines.err(
            span,
            ViewProblem::BadColumn {
                what,
                name: name.to_string(),
            },
        );
    }
    Ok(name.to_string())
}

fn limit(
    lines: &Lines<'_>,
    span: std::ops::Range<usize>,
    value: i64,
    max: usize,
    what: &'static str,
) -> Result<usize, ViewsError> {
    match usize::try_from(value) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => lines.err(span, ViewProblem::OutOfRange { what, value, max }),
    }
}

fn optional_columns(
    lines: &Lines<'_>,
    span: std::ops::Range<usize>,
    list: &Option<Vec<String>>,
    what: &'static str,
) -> Result<Option<Vec<String>>, ViewsError> {
    list.as_ref()
        .map(|l| columns(lines, span, l, what))
        .transpose()
}

fn operator(
    lines: &Lines<'_>,
    view: &str,
    v: &RawView,
    from_span: std::ops::Range<usize>,
) -> Result<OperatorDef, ViewsError> {
    let present = [
        v.group_by.is_some(),
        v.top_n.is_some(),
        v.max_by.is_some(),
        v.min_by.is_some(),
        v.history.is_some(),
        v.delta.is_some(),
    ]
    .iter()
    .filter(|p| **p)
    .count();
    if present == 0 {
        return lines.err(from_span, ViewProblem::NoOperator(view.to_string()));
    }
    if present > 1 {
        return lines.err(from_span, ViewProblem::SeveralOperators(view.to_string()));
    }
    if let Some(g) = &v.group_by {
        let span = g.span();
        let g = g.get_ref();
        let by = columns(lines, span.clone(), &g.by, "group_by.by")?;
        if g.aggregates.is_empty() {
            return lines.err(span, ViewProblem::EmptyList("group_by.aggregates"));
        }
        if g.aggregates.len() > MAX_COLUMNS {
            return lines.err(
                span,
                ViewProblem::TooManyColumns {
                    what: "group_by.aggregates",
                },
            );
        }
        let mut aggregates = Vec::new();
        for (name, spec) in &g.aggregates {
            column(lines, span.clone(), name, "aggregate name")?;
            if by.contains(name) {
                return lines.err(span, ViewProblem::AggregateNameClash(name.clone()));
            }
            let Some((kind, column)) = parse_aggregate(spec) else {
                return lines.err(span, ViewProblem::BadAggregate(spec.clone()));
            };
            aggregates.push(AggregateSpec {
                name: name.clone(),
                kind,
                column,
            });
        }
        return Ok(OperatorDef::GroupBy(GroupBySpec { by, aggregates }));
    }
    if let Some(t) = &v.top_n {
        let span = t.span();
        let t = t.get_ref();
        if t.order_by.is_empty() {
            return lines.err(span, ViewProblem::EmptyList("top_n.order_by"));
        }
        if t.order_by.len() > MAX_COLUMNS || t.group_by.len() > MAX_COLUMNS {
            return lines.err(span, ViewProblem::TooManyColumns { what: "top_n" });
        }
        let mut order_by = Vec::new();
        for entry in &t.order_by {
            let parts: Vec<&str> = entry.split_whitespace().collect();
            let descending = match parts.as_slice() {
                [_] => false,
                [_, dir] if dir.eq_ignore_ascii_case("asc") => false,
                [_, dir] if dir.eq_ignore_ascii_case("desc") => true,
                _ => return lines.err(span, ViewProblem::BadOrderBy(entry.clone())),
            };
            let column = column(lines, span.clone(), parts[0], "top_n.order_by")?;
            order_by.push(SortColumn { column, descending });
        }
        let group_by = if t.group_by.is_empty() {
            Vec::new()
        } else {
            columns(lines, span.clone(), &t.group_by, "top_n.group_by")?
        };
        let rank = match &t.rank {
            Some(r) if r.is_empty() => None,
            Some(r) => Some(column(lines, span.clone(), r, "top_n.rank")?),
            None => Some("rank".to_string()),
        };
        return Ok(OperatorDef::TopN(TopNSpec {
            order_by,
            limit: limit(lines, span, t.limit, MAX_TOP_N_LIMIT, "top_n.limit")?,
            group_by,
            rank,
        }));
    }
    for (raw, max) in [(&v.max_by, true), (&v.min_by, false)] {
        if let Some(e) = raw {
            let span = e.span();
            let e = e.get_ref();
            let what = if max { "max_by" } else { "min_by" };
            return Ok(OperatorDef::Extreme(ExtremeSpec {
                max,
                key: optional_columns(lines, span.clone(), &e.key, "key")?,
                by: column(lines, span, &e.by, what)?,
            }));
        }
    }
    if let Some(h) = &v.history {
        let span = h.span();
        let h = h.get_ref();
        return Ok(OperatorDef::History(HistorySpec {
            key: optional_columns(lines, span.clone(), &h.key, "history.key")?,
            limit: limit(
                lines,
                span.clone(),
                h.limit,
                MAX_HISTORY_LIMIT,
                "history.limit",
            )?,
            columns: optional_columns(lines, span.clone(), &h.columns, "history.columns")?,
            field: match &h.field {
                Some(f) => column(lines, span, f, "history.field")?,
                None => "history".to_string(),
            },
        }));
    }
    if let Some(d) = &v.delta {
        let span = d.span();
        let d = d.get_ref();
        return Ok(OperatorDef::Delta(DeltaSpec {
            key: optional_columns(lines, span.clone(), &d.key, "delta.key")?,
            columns: columns(lines, span, &d.columns, "delta.columns")?,
        }));
    }
    lines.err(from_span, ViewProblem::NoOperator(view.to_string()))
}

/// `count()`, `count(*)`, `count(col)`, `sum(col)`, `min(col)`, `max(col)`, `avg(col)`,
/// `latest(col)` (function names in any case, spaces allowed around parts).
pub fn parse_aggregate(spec: &str) -> Option<(AggKind, Option<String>)> {
    let spec = spec.trim();
    let open = spec.find('(')?;
    let inner = spec.strip_suffix(')')?.get(open + 1..)?.trim();
    let kind = match spec[..open].trim().to_ascii_lowercase().as_str() {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "avg" => AggKind::Avg,
        "latest" => AggKind::Latest,
        _ => return None,
    };
    if inner.contains(['(', ')', ',']) || inner.len() > MAX_NAME_BYTES {
        return None;
    }
    match (kind, inner) {
        (AggKind::Count, "" | "*") => Some((kind, None)),
        (_, "" | "*") => None,
        (_, column) => Some((kind, Some(column.to_string()))),
    }
}

#[cfg(test)]
mod tests;
