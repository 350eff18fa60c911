//! Values as views order and group them.
//!
//! Ordering ([`SortValue`]): booleans < numbers < strings; numbers are JSON numbers and plain
//! decimal strings (`"123.450"`), compared exactly; other strings compare as strings. NULL, absent
//! columns, arrays and objects have no sort value: aggregates skip them, `top_n` puts them last
//! whatever the direction, `max_by`/`min_by` never pick them.
//!
//! Grouping ([`group_key`]): the values of the key columns joined with `:`, each as the table keys
//! render them (a string as it is, anything else as its JSON text), so a view's key for
//! `league = "nba", season = 2024` is `nba:2024`, as in the CDC tables. A NULL or absent key column
//! puts the row in no group (a row without a key has no place in a table). Rows whose values render
//! the same key (`1` and `"1"`) share a group.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cdc::decode::Row;
use crate::filter::Decimal;

/// A value with a total order (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SortValue {
    Bool(bool),
    Num(Decimal),
    Str(String),
}

impl SortValue {
    /// The sort value of a JSON value; `None` for NULL, arrays and objects.
    pub fn of(v: &Value) -> Option<SortValue> {
        match v {
            Value::Bool(b) => Some(SortValue::Bool(*b)),
            Value::Number(n) => Decimal::from_json_number(n).map(SortValue::Num),
            Value::String(s) => Some(match Decimal::parse_plain(s) {
                Some(d) => SortValue::Num(d),
                None => SortValue::Str(s.clone()),
            }),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }

    /// The sort value of a row's column.
    pub fn of_column(row: &Row, column: &str) -> Option<SortValue> {
        row.get(column).and_then(SortValue::of)
    }
}

/// One column of a sort key: its value (`None` sorts last) and direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SortCell {
    pub value: Option<SortValue>,
    pub descending: bool,
}

impl Ord for SortCell {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.value, &other.value) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => {
                if self.descending {
                    b.cmp(a)
                } else {
                    a.cmp(b)
                }
            }
        }
    }
}

impl PartialOrd for SortCell {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A row's position in an ordering: one cell per `order_by` column (compared in order).
pub type SortKey = Vec<SortCell>;

/// One key part as the table keys render it; `None` for NULL or absent.
pub fn key_part(v: Option<&Value>) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

/// The group key of `row` for `columns` (see the module doc); `None` when a part is NULL/absent.
pub fn group_key(row: &Row, columns: &[String]) -> Option<String> {
    match columns {
        [single] => key_part(row.get(single)),
        _ => {
            let mut out = String::new();
            for (i, c) in columns.iter().enumerate() {
                if i > 0 {
                    out.push(':');
                }
                out.push_str(&key_part(row.get(c))?);
            }
            Some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sv(v: Value) -> Option<SortValue> {
        SortValue::of(&v)
    }

    #[test]
    fn order_across_types_and_decimals() {
        assert!(sv(json!(false)) < sv(json!(true)));
        assert!(sv(json!(true)) < sv(json!(-5)));
        assert!(sv(json!("9.99")) < sv(json!(10)));
        assert!(sv(json!("10.5")) > sv(json!("9.1")));
        assert_eq!(sv(json!("1.50")), sv(json!(1.5)));
        assert!(sv(json!(1e30)) < sv(json!("abc")));
        assert!(sv(json!("abc")) < sv(json!("abd")));
        assert_eq!(sv(json!(null)), None);
        assert_eq!(sv(json!([1])), None);
    }

    #[test]
    fn cells_put_missing_last_both_ways() {
        let cell = |v: Option<i64>, descending| SortCell {
            value: v.map(|i| SortValue::Num(Decimal::from_i64(i))),
            descending,
        };
        assert!(cell(Some(1), false) < cell(Some(2), false));
        assert!(cell(Some(2), true) < cell(Some(1), true));
        assert!(cell(Some(1), false) < cell(None, false));
        assert!(cell(Some(1), true) < cell(None, true));
    }

    #[test]
    fn group_keys_render_like_table_keys() {
        let row = json!({"league": "nba", "season": 2024, "x": null});
        let row = row.as_object().unwrap();
        assert_eq!(group_key(row, &["league".into()]).as_deref(), Some("nba"));
        assert_eq!(
            group_key(row, &["league".into(), "season".into()]).as_deref(),
            Some("nba:2024")
        );
        assert_eq!(group_key(row, &["league".into(), "x".into()]), None);
        assert_eq!(group_key(row, &["missing".into()]), None);
    }
}
