//! What a token allows: the tables it may read (names or globs), per table the keys (globs) and
//! the rows (`column = claim`), and the topics it may publish to (names or globs). A [`Grant`]
//! turns a client's request into a [`Selector`] that can only narrow it: key patterns become a
//! key set or a key filter, row claims become [`RowFilter`]s, so a row that moves out of a
//! client's rows reaches it as a delete. What it allows to publish is read by `auth::publish`.
//!
//! Everything fails closed: a token without the grants claim reads and publishes nothing, an
//! unknown field in it refuses the token (a typo such as `row` for `rows` must not open a table,
//! nor `publishes` for `publish` a topic), and a row filter whose claim the token does not carry
//! refuses the table.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::glob::Glob;
use crate::cdc::decode::Row;
use crate::fanout::selector::{RowFilter, Selector};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub kind: DenyKind,
    /// Said to the client: which rule refused it.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// No token, or one that does not verify.
    Unauthorized,
    /// The token's `exp` passed.
    Expired,
    /// A valid token that does not allow this.
    Forbidden,
}

impl DenyKind {
    /// The error code clients see (`docs/protocol.md`).
    pub fn code(self) -> &'static str {
        match self {
            DenyKind::Unauthorized => "unauthorized",
            DenyKind::Expired => "token_expired",
            DenyKind::Forbidden => "forbidden",
        }
    }
}

impl Denied {
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Denied {
            kind: DenyKind::Unauthorized,
            reason: reason.into(),
        }
    }
    pub fn expired(reason: impl Into<String>) -> Self {
        Denied {
            kind: DenyKind::Expired,
            reason: reason.into(),
        }
    }
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Denied {
            kind: DenyKind::Forbidden,
            reason: reason.into(),
        }
    }
}

/// The grants claim as it appears in the token.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantClaim {
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    keys: BTreeMap<String, Vec<String>>,
    /// Per table: column -> name of the token claim whose value the column must equal.
    #[serde(default)]
    rows: BTreeMap<String, BTreeMap<String, String>>,
    /// Names or globs of the writable topics the token may publish to; none listed: none.
    #[serde(default)]
    publish: Vec<String>,
}

/// A row condition: `column` equals the value of the token's claim `claim`.
#[derive(Debug, Clone)]
struct RowRule {
    column: String,
    claim: String,
    /// The claim's value as text; `None` when the token does not carry it (the table is refused).
    value: Option<String>,
}

/// What one verified token allows.
#[derive(Debug)]
pub struct Grant {
    pub sub: Option<String>,
    /// Unix seconds.
    pub exp: u64,
    tables: Vec<Glob>,
    keys: Vec<(Glob, Vec<Glob>)>,
    rows: Vec<(Glob, Vec<RowRule>)>,
    /// The topics it may publish to.
    publish: Vec<Glob>,
    /// Every claim of the token, as verified: pinned fields of publishes compare with them.
    claims: Map<String, Value>,
    /// What the token allows to read (`sub`, tables, keys, rows), to tell whether a refreshed
    /// token changes the subscriptions; publishing takes each token's grants as they are.
    fingerprint: String,
}

/// A claim value as text (strings as they are, numbers and booleans printed), for comparing
/// with column values.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Grant {
    /// Reads the grants from verified claims; `claim` names the object holding them.
    pub fn from_claims(claims: &Map<String, Value>, claim: &str) -> Result<Grant, Denied> {
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| Denied::unauthorized("the token has no numeric `exp`"))?;
        let sub = claims.get("sub").and_then(scalar_text);
        let g: GrantClaim = match claims.get(claim) {
            None => GrantClaim::default(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Denied::unauthorized(format!("the `{claim}` claim is not valid: {e}"))
            })?,
        };
        let glob = |p: &str| Glob::new(p);
        let rows: Vec<(Glob, Vec<RowRule>)> = g
            .rows
            .iter()
            .map(|(t, conds)| {
                let rules = conds
                    .iter()
                    .map(|(column, c)| RowRule {
                        column: column.clone(),
                        claim: c.clone(),
                        value: claims.get(c).and_then(scalar_text),
                    })
                    .collect();
                (glob(t), rules)
            })
            .collect();
        let fingerprint = format!(
            "{sub:?}|{:?}|{:?}|{:?}",
            g.tables,
            g.keys,
            rows.iter()
                .map(|(t, rs): &(Glob, Vec<RowRule>)| (t.as_str().to_string(), rs.clone()))
                .collect::<Vec<_>>()
        );
        Ok(Grant {
            fingerprint,
            sub,
            exp,
            tables: g.tables.iter().map(|p| glob(p)).collect(),
            keys: g
                .keys
                .iter()
                .map(|(t, ks)| (glob(t), ks.iter().map(|k| glob(k)).collect()))
                .collect(),
            rows,
            publish: g.publish.iter().map(|p| glob(p)).collect(),
            claims: claims.clone(),
        })
    }

    /// The topics the token may publish to (names or globs; empty: none).
    pub fn publish_topics(&self) -> &[Glob] {
        &self.publish
    }

    /// The token's claims, as verified.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    fn check_table(&self, table: &str) -> Result<(), Denied> {
        if self.tables.iter().any(|p| p.matches(table)) {
            return Ok(());
        }
        let list: Vec<&str> = self.tables.iter().map(Glob::as_str).collect();
        Err(Denied::forbidden(if list.is_empty() {
            format!("the token allows no table (its claim lists none), so not `{table}`")
        } else {
            format!(
                "table `{table}` is not among the tables the token allows: {}",
                list.join(", ")
            )
        }))
    }

    /// `requested` narrowed to what the token allows of `table`.
    fn selector(&self, table: &str, mut req: Selector) -> Result<Selector, Denied> {
        self.check_table(table)?;
        let asked = req.keys.is_some();
        for (_, patterns) in self.keys.iter().filter(|(t, _)| t.matches(table)) {
            if asked {
                if let Some(keys) = &req.keys {
                    let mut refused: Vec<&String> = keys
                        .iter()
                        .filter(|k| !patterns.iter().any(|p| p.matches(k)))
                        .collect();
                    if !refused.is_empty() {
                        refused.sort();
                        refused.truncate(5);
                        return Err(Denied::forbidden(format!(
                            "key(s) {} of `{table}` are not among the keys the token allows: {}",
                            refused
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            patterns
                                .iter()
                                .map(Glob::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            } else if patterns.iter().all(Glob::is_literal) {
                let lits: HashSet<String> = patterns.iter().map(|p| p.as_str().into()).collect();
                req.keys = Some(match req.keys.take() {
                    None => lits,
                    Some(k) => k.intersection(&lits).cloned().collect(),
                });
            } else {
                req.filters.push(Arc::new(KeyPatterns(patterns.clone())));
            }
        }
        for (_, rules) in self.rows.iter().filter(|(t, _)| t.matches(table)) {
            for r in rules {
                let Some(value) = &r.value else {
                    return Err(Denied::forbidden(format!(
                        "rows of `{table}` are limited to `{} = {}`, and the token has no claim `{}`",
                        r.column, r.claim, r.claim
                    )));
                };
                req.filters.push(Arc::new(ColumnEquals {
                    column: r.column.clone(),
                    value: value.clone(),
                }));
            }
        }
        Ok(req)
    }

    /// The rules that apply to `table`, for the explain endpoint.
    fn describe(&self, table: &str) -> Value {
        let keys: Vec<Vec<&str>> = self
            .keys
            .iter()
            .filter(|(t, _)| t.matches(table))
            .map(|(_, ps)| ps.iter().map(Glob::as_str).collect())
            .collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .filter(|(t, _)| t.matches(table))
            .flat_map(|(_, rs)| rs.iter())
            .map(|r| json!({"column": r.column, "claim": r.claim, "value": r.value}))
            .collect();
        json!({
            "tables": self.tables.iter().map(Glob::as_str).collect::<Vec<_>>(),
            "key_patterns": keys,
            "row_filters": rows,
        })
    }
}

/// What a caller may read.
#[derive(Debug, Clone)]
pub enum Access {
    /// `--auth none`: everything.
    Open,
    Token(Arc<Grant>),
}

impl Access {
    /// Whether `table` may be read at all (some of its rows).
    pub fn check_table(&self, table: &str) -> Result<(), Denied> {
        match self {
            Access::Open => Ok(()),
            Access::Token(g) => g.check_table(table),
        }
    }

    /// `requested` narrowed to what may be read of `table`; refused when the table, or a key
    /// asked for, is outside the grants.
    pub fn selector(&self, table: &str, requested: Selector) -> Result<Selector, Denied> {
        match self {
            Access::Open => Ok(requested),
            Access::Token(g) => g.selector(table, requested),
        }
    }

    /// Unix seconds when the token expires (`None`: never).
    pub fn expires(&self) -> Option<u64> {
        match self {
            Access::Open => None,
            Access::Token(g) => Some(g.exp),
        }
    }

    pub fn sub(&self) -> Option<&str> {
        match self {
            Access::Open => None,
            Access::Token(g) => g.sub.as_deref(),
        }
    }

    /// Whether two accesses allow the same (the expiry aside): a refresh with the same grants
    /// leaves the subscriptions alone.
    pub fn same_grants(&self, other: &Access) -> bool {
        match (self, other) {
            (Access::Open, Access::Open) => true,
            (Access::Token(a), Access::Token(b)) => a.fingerprint == b.fingerprint,
            _ => false,
        }
    }

    /// Why `table` (and `keys` of it) may or may not be read: the explain endpoint.
    pub fn explain(&self, table: &str, keys: Option<HashSet<String>>) -> Value {
        let rules = match self {
            Access::Open => json!("auth is off: every table and row may be read"),
            Access::Token(g) => g.describe(table),
        };
        let asked: Option<Vec<String>> = keys.as_ref().map(|k| {
            let mut v: Vec<String> = k.iter().cloned().collect();
            v.sort();
            v
        });
        match self.selector(table, Selector::keys(keys)) {
            Ok(sel) => {
                let mut keys: Option<Vec<String>> =
                    sel.keys.map(|k| k.into_iter().collect::<Vec<_>>());
                if let Some(k) = keys.as_mut() {
                    k.sort();
                }
                json!({
                    "table": table,
                    "allowed": true,
                    "requested_keys": asked,
                    "keys": keys,
                    "filters": sel.filters.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
                    "rules": rules,
                })
            }
            Err(d) => json!({
                "table": table,
                "allowed": false,
                "requested_keys": asked,
                "code": d.kind.code(),
                "reason": d.reason,
                "rules": rules,
            }),
        }
    }
}

/// Keys matching any of the token's patterns.
#[derive(Debug)]
pub struct KeyPatterns(Vec<Glob>);

impl RowFilter for KeyPatterns {
    fn matches(&self, key: &str, _row: &Row) -> bool {
        self.0.iter().any(|p| p.matches(key))
    }

    fn matches_key(&self, key: &str) -> Option<bool> {
        Some(self.0.iter().any(|p| p.matches(key)))
    }
}

/// Rows whose `column` equals a claim's value (compared as text: strings as they are, numbers
/// and booleans printed; a NULL or absent column never matches).
pub struct ColumnEquals {
    column: String,
    value: String,
}

impl std::fmt::Debug for ColumnEquals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {:?}", self.column, self.value)
    }
}

impl RowFilter for ColumnEquals {
    fn matches(&self, _key: &str, row: &Row) -> bool {
        match row.get(&self.column) {
            Some(Value::String(s)) => *s == self.value,
            Some(Value::Number(n)) => n.to_string() == self.value,
            Some(Value::Bool(b)) => (if *b { "true" } else { "false" }) == self.value,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(claims: Value) -> Result<Access, Denied> {
        Grant::from_claims(claims.as_object().unwrap(), "livetable")
            .map(|g| Access::Token(Arc::new(g)))
    }

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tables_by_name_or_glob_and_nothing_without_the_claim() {
        let a = grant(json!({"exp": 1, "livetable": {"tables": ["odds", "game_*"]}})).unwrap();
        assert!(a.check_table("odds").is_ok());
        assert!(a.check_table("game_12").is_ok());
        let e = a.check_table("balances").unwrap_err();
        assert_eq!(e.kind, DenyKind::Forbidden);
        assert!(e.reason.contains("`balances`"), "{}", e.reason);
        let none = grant(json!({"exp": 1})).unwrap();
        assert!(none.check_table("odds").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_types_refuse_the_token() {
        let e = grant(json!({"exp": 1, "livetable": {"tables": ["a"], "row": {}}})).unwrap_err();
        assert_eq!(e.kind, DenyKind::Unauthorized);
        assert!(e.reason.contains("row"), "{}", e.reason);
        assert!(grant(json!({"exp": 1, "livetable": {"tables": "a"}})).is_err());
        assert!(
            grant(json!({"livetable": {"tables": ["a"]}})).is_err(),
            "no exp"
        );
    }

    #[test]
    fn publish_topics_by_name_or_glob_and_none_without_them() {
        let g = Grant::from_claims(
            json!({"exp": 1, "sub": "u1", "livetable": {"publish": ["bets", "game_*"]}})
                .as_object()
                .unwrap(),
            "livetable",
        )
        .unwrap();
        let topics: Vec<&str> = g.publish_topics().iter().map(Glob::as_str).collect();
        assert_eq!(topics, ["bets", "game_*"]);
        assert!(g.publish_topics().iter().any(|p| p.matches("game_7")));
        assert_eq!(g.claims()["sub"], "u1", "the claims are kept for pins");
        // publishing grants nothing to read
        assert!(Access::Token(Arc::new(g)).check_table("bets").is_err());
        // without `publish`, or without the grants claim: no topic
        for claims in [
            json!({"exp": 1, "livetable": {"tables": ["*"]}}),
            json!({"exp": 1}),
        ] {
            let g = Grant::from_claims(claims.as_object().unwrap(), "livetable").unwrap();
            assert!(g.publish_topics().is_empty(), "{claims}");
        }
    }

    #[test]
    fn a_misspelt_or_mistyped_publish_refuses_the_token() {
        for bad in [
            json!({"exp": 1, "livetable": {"publishes": ["bets"]}}),
            json!({"exp": 1, "livetable": {"publish": "bets"}}),
            json!({"exp": 1, "livetable": {"publish": [1]}}),
        ] {
            let e = grant(bad.clone()).unwrap_err();
            assert_eq!(e.kind, DenyKind::Unauthorized, "{bad}");
            assert!(e.reason.contains("`livetable` claim"), "{}", e.reason);
        }
    }

    #[test]
    fn publish_grants_do_not_restart_subscriptions() {
        let a = grant(json!({"exp": 1, "livetable": {"tables": ["t"], "publish": ["a"]}})).unwrap();
        let b = grant(json!({"exp": 2, "livetable": {"tables": ["t"], "publish": ["b"]}})).unwrap();
        assert!(a.same_grants(&b), "the read grants are the same");
    }

    #[test]
    fn key_patterns_narrow_and_refuse_explicitly() {
        let a = grant(json!({"exp": 1, "livetable": {
            "tables": ["t", "u"], "keys": {"t": ["g1", "g2"], "u": ["nba:*"]}}}))
        .unwrap();
        // whole table asked: literal patterns become the key set
        let s = a.selector("t", Selector::default()).unwrap();
        let mut k: Vec<String> = s.keys.unwrap().into_iter().collect();
        k.sort();
        assert_eq!(k, ["g1", "g2"]);
        // keys inside the grant pass, one outside refuses the subscription and says which
        let ok = a
            .selector("t", Selector::keys(Some(["g1".to_string()].into())))
            .unwrap();
        assert_eq!(ok.keys.unwrap().len(), 1);
        let e = a
            .selector("t", Selector::keys(Some(["g1".into(), "g9".into()].into())))
            .unwrap_err();
        assert!(
            e.reason.contains("`g9`") && !e.reason.contains("`g1`"),
            "{}",
            e.reason
        );
        // globs become a filter
        let s = a.selector("u", Selector::default()).unwrap();
        assert!(s.keys.is_none());
        assert!(s.wants("nba:1", Some(&row(json!({})))));
        assert!(!s.wants("nhl:1", Some(&row(json!({})))));
    }

    #[test]
    fn key_patterns_select_rows_held_as_json_without_parsing_them() {
        use crate::table::stored_row::StoredRow;
        let a = grant(
            json!({"exp": 1, "sub": "acct-7", "livetable": {"tables": ["*"],
            "keys": {"u": ["nba:*"], "v": ["nba:*"]}, "rows": {"v": {"account_id": "sub"}}}}),
        )
        .unwrap();
        let stored = || StoredRow::from_json(br#"{"account_id":"acct-7"}"#).unwrap();
        let s = a.selector("u", Selector::default()).unwrap();
        assert!(!s.reads_rows());
        let (inside, outside) = (stored(), stored());
        assert!(s.accepts("nba:1", &inside));
        assert!(!s.accepts("nhl:1", &outside));
        assert!(!inside.is_parsed() && !outside.is_parsed());
        // with a row rule too: a key outside the patterns is refused before the row is parsed
        let s = a.selector("v", Selector::default()).unwrap();
        assert!(s.reads_rows());
        let (inside, outside) = (stored(), stored());
        assert!(s.accepts("nba:1", &inside));
        assert!(!s.accepts("nhl:1", &outside));
        assert!(inside.is_parsed() && !outside.is_parsed());
        let other = StoredRow::from_json(br#"{"account_id":"acct-8"}"#).unwrap();
        assert!(!s.accepts("nba:1", &other));
    }

    #[test]
    fn row_filters_compare_the_column_with_the_claim() {
        let a = grant(json!({"exp": 1, "sub": "acct-7", "tenant": 42, "livetable": {
            "tables": ["*"], "rows": {"balances": {"account_id": "sub"}, "orders": {"tenant_id": "tenant"},
            "other": {"x": "missing"}}}}))
        .unwrap();
        let s = a.selector("balances", Selector::default()).unwrap();
        assert!(s.wants("k", Some(&row(json!({"account_id": "acct-7"})))));
        assert!(!s.wants("k", Some(&row(json!({"account_id": "acct-8"})))));
        assert!(!s.wants("k", Some(&row(json!({"account_id": null})))));
        assert!(!s.wants("k", Some(&row(json!({})))));
        let s = a.selector("orders", Selector::default()).unwrap();
        assert!(s.wants("k", Some(&row(json!({"tenant_id": 42})))));
        assert!(s.wants("k", Some(&row(json!({"tenant_id": "42"})))));
        assert!(!s.wants("k", Some(&row(json!({"tenant_id": 421})))));
        // a filter whose claim is missing refuses the table rather than opening it
        let e = a.selector("other", Selector::default()).unwrap_err();
        assert!(e.reason.contains("no claim `missing`"), "{}", e.reason);
        // tables without rules are whole
        assert!(a.selector("free", Selector::default()).unwrap().is_whole());
    }

    #[test]
    fn explain_says_why() {
        let a =
            grant(json!({"exp": 1, "livetable": {"tables": ["t"], "keys": {"t": ["a"]}}})).unwrap();
        let e = a.explain("t", Some(["b".to_string()].into()));
        assert_eq!(e["allowed"], false);
        assert_eq!(e["code"], "forbidden");
        assert!(e["reason"].as_str().unwrap().contains("`b`"));
        let e = a.explain("t", None);
        assert_eq!(e["allowed"], true);
        assert_eq!(e["keys"], json!(["a"]));
        assert_eq!(Access::Open.explain("x", None)["allowed"], true);
    }
}
