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

/// Appends the order-preserving bytes of one sort cell: comparing the concatenated bytes of two
/// rows' cells (memcmp) gives the order of their [`SortCell`]s, one heap string per row instead of
/// a pointer per cell, which keeps an ordered set of a million rows cache-friendly.
///
/// Layout: NULL is `0xFF` in both directions; otherwise a type tag (`0x10` bool, `0x20` number,
/// `0x30` string) and a prefix-free body (a bool as 1/2, a number by
/// [`Decimal::write_order_bytes`], a string with `0x00` escaped as `0x00 0xFF` and ended by
/// `0x00 0x01`), every byte inverted for a descending column.
pub fn write_cell_bytes(out: &mut Vec<u8>, value: Option<&SortValue>, descending: bool) {
    let Some(value) = value else {
        out.push(0xFF);
        return;
    };
    let start = out.len();
    match value {
        SortValue::Bool(b) => {
            out.push(0x10);
            out.push(if *b { 2 } else { 1 });
        }
        SortValue::Num(d) => {
            out.push(0x20);
            d.write_order_bytes(out);
        }
        SortValue::Str(s) => {
            out.push(0x30);
            for b in s.bytes() {
                out.push(b);
                if b == 0 {
                    out.push(0xFF);
                }
            }
            out.extend_from_slice(&[0, 1]);
        }
    }
    if descending {
        for b in &mut out[start..] {
            *b = !*b;
        }
    }
}

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
    use proptest::prelude::*;
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

    fn arb_sort_value() -> impl Strategy<Value = Option<SortValue>> {
        // the same numbers in several scales: trailing zeros must not change the order
        let decimal = (-100_000i64..100_000, 0usize..6, 0u32..3).prop_map(|(u, scale, zeros)| {
            let digits = (u.unsigned_abs() * 10u64.pow(zeros)).to_string();
            let padded = format!("{digits:0>width$}", width = scale + 1);
            let (int, frac) = padded.split_at(padded.len() - scale);
            let sign = if u < 0 { "-" } else { "" };
            let text = if scale == 0 {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            };
            Decimal::parse_plain(&text).map(SortValue::Num)
        });
        prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(SortValue::Bool(b))),
            decimal,
            "[a\\x00\\x01b]{0,4}".prop_map(|s| Some(SortValue::Str(s))),
        ]
    }

    proptest! {
        #[test]
        fn cell_bytes_order_equals_cell_order(
            a in proptest::collection::vec(arb_sort_value(), 1..3),
            b in proptest::collection::vec(arb_sort_value(), 1..3),
            desc in proptest::collection::vec(any::<bool>(), 2),
        ) {
            let n = a.len().min(b.len());
            let cells = |v: &[Option<SortValue>]| -> Vec<SortCell> {
                v[..n].iter().zip(&desc).map(|(v, d)| SortCell { value: v.clone(), descending: *d }).collect()
            };
            let bytes = |v: &[Option<SortValue>]| -> Vec<u8> {
                let mut out = Vec::new();
                for (v, d) in v[..n].iter().zip(&desc) {
                    write_cell_bytes(&mut out, v.as_ref(), *d);
                }
                out
            };
            prop_assert_eq!(cells(&a).cmp(&cells(&b)), bytes(&a).cmp(&bytes(&b)), "{:?} vs {:?}", a, b);
        }
    }

    #[test]
    fn number_bytes_order_examples() {
        let enc = |s: &str| {
            let mut out = Vec::new();
            Decimal::parse_number(s)
                .unwrap()
                .write_order_bytes(&mut out);
            out
        };
        let sorted = [
            "-1e10", "-123.5", "-123.45", "-1", "-0.001", "0", "0.00001", "0.1", "0.12", "1",
            "1.5", "9.99", "10", "123.45", "1e10",
        ];
        for pair in sorted.windows(2) {
            assert!(enc(pair[0]) < enc(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(enc("1.50"), enc("1.5"));
        assert_eq!(enc("-0.0"), enc("0"));
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
