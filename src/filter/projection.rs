//! `columns=a,b`: the columns a subscription keeps.
//!
//! The row key is not a column here: it travels beside the row (`{key: row}` on the wire), so the
//! caller keeps it whatever the projection says. A projected row holds the listed columns that the
//! row has, in the order of the list; a change that touches none of them is no change for the
//! subscription ([`Projection::changed`]).

use crate::cdc::decode::Row;

/// Most columns in one projection.
pub const MAX_PROJECTED_COLUMNS: usize = 256;
/// Longest column name in a projection, in bytes.
pub const MAX_COLUMN_NAME_BYTES: usize = 256;

/// Why a `columns=` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectionError {
    #[error("columns list is empty")]
    Empty,
    #[error("columns list has an empty name at position {0}")]
    EmptyName(usize),
    #[error("column name at position {0} is longer than {MAX_COLUMN_NAME_BYTES} bytes")]
    NameTooLong(usize),
    #[error("columns list has more than {MAX_PROJECTED_COLUMNS} columns")]
    TooMany,
}

/// The columns a subscription keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    columns: Vec<String>,
}

impl Projection {
    /// Parses `a,b,c` (spaces around names are trimmed; a repeated name counts once).
    pub fn parse(spec: &str) -> Result<Projection, ProjectionError> {
        if spec.trim().is_empty() {
            return Err(ProjectionError::Empty);
        }
        let mut columns: Vec<String> = Vec::new();
        for (i, name) in spec.split(',').map(str::trim).enumerate() {
            if name.is_empty() {
                return Err(ProjectionError::EmptyName(i + 1));
            }
            if name.len() > MAX_COLUMN_NAME_BYTES {
                return Err(ProjectionError::NameTooLong(i + 1));
            }
            if !columns.iter().any(|c| c == name) {
                if columns.len() == MAX_PROJECTED_COLUMNS {
                    return Err(ProjectionError::TooMany);
                }
                columns.push(name.to_string());
            }
        }
        Ok(Projection { columns })
    }

    /// The kept columns, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// True when `column` is kept.
    pub fn contains(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }

    /// The kept columns of `row` (absent ones stay absent).
    pub fn apply(&self, row: &Row) -> Row {
        let mut out = Row::new();
        for c in &self.columns {
            if let Some(v) = row.get(c) {
                out.insert(c.clone(), v.clone());
            }
        }
        out
    }

    /// True when a kept column differs between `old` and `new` (appeared, vanished or changed).
    pub fn changed(&self, old: &Row, new: &Row) -> bool {
        self.columns.iter().any(|c| old.get(c) != new.get(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: serde_json::Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn keeps_listed_columns_in_order() {
        let p = Projection::parse(" odd2 , game_id,odd2").unwrap();
        assert_eq!(p.columns(), ["odd2", "game_id"]);
        let r = row(json!({"game_id": "g1", "odd1": "1.5", "odd2": "2.25"}));
        let out = p.apply(&r);
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"odd2":"2.25","game_id":"g1"}"#
        );
        let sparse = p.apply(&row(json!({"odd1": 1})));
        assert!(sparse.is_empty());
    }

    #[test]
    fn change_detection_looks_only_at_kept_columns() {
        let p = Projection::parse("a,b").unwrap();
        let old = row(json!({"a": 1, "b": 2, "c": 3}));
        assert!(!p.changed(&old, &row(json!({"a": 1, "b": 2, "c": 4}))));
        assert!(p.changed(&old, &row(json!({"a": 1, "b": 3, "c": 3}))));
        assert!(p.changed(&old, &row(json!({"a": 1, "c": 3}))));
    }

    #[test]
    fn refuses_bad_lists() {
        assert_eq!(Projection::parse(""), Err(ProjectionError::Empty));
        assert_eq!(
            Projection::parse("a,,b"),
            Err(ProjectionError::EmptyName(2))
        );
        let many = (0..=MAX_PROJECTED_COLUMNS)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(Projection::parse(&many), Err(ProjectionError::TooMany));
        let long = "x".repeat(MAX_COLUMN_NAME_BYTES + 1);
        assert_eq!(
            Projection::parse(&long),
            Err(ProjectionError::NameTooLong(1))
        );
    }
}
