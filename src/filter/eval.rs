//! Three-valued evaluation of a [`Expr`] against a row (`None` is SQL's unknown).

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Number, Value};

use super::{Decimal, Expr, Literal, Operand};
use crate::cdc::decode::Row;

/// A value as the comparison rules see it.
#[derive(Debug)]
pub(super) enum Val<'a> {
    Null,
    Bool(bool),
    Num(Cow<'a, Decimal>),
    JsonNum(&'a Number),
    Str(&'a str),
    /// A JSON array or object: comparisons with it are unknown.
    Other,
}

impl<'a> Val<'a> {
    fn of_json(v: Option<&'a Value>) -> Val<'a> {
        match v {
            None | Some(Value::Null) => Val::Null,
            Some(Value::Bool(b)) => Val::Bool(*b),
            Some(Value::Number(n)) => Val::JsonNum(n),
            Some(Value::String(s)) => Val::Str(s),
            Some(Value::Array(_)) | Some(Value::Object(_)) => Val::Other,
        }
    }

    fn of_literal(l: &'a Literal) -> Val<'a> {
        match l {
            Literal::Null => Val::Null,
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Number(d) => Val::Num(Cow::Borrowed(d)),
            Literal::String(s) => Val::Str(s),
        }
    }

    fn of_operand(o: &'a Operand, row: &'a Row) -> Val<'a> {
        match o {
            Operand::Column(c) => Val::of_json(row.get(c)),
            Operand::Literal(l) => Val::of_literal(l),
        }
    }

    fn decimal(&self) -> Option<Cow<'a, Decimal>> {
        match self {
            Val::Num(d) => Some(d.clone()),
            Val::JsonNum(n) => Decimal::from_json_number(n).map(Cow::Owned),
            Val::Str(s) => Decimal::parse_plain(s).map(Cow::Owned),
            _ => None,
        }
    }
}

/// Compares two values by the filter rules (module doc of [`crate::filter`]); `None` when the
/// comparison is unknown (a NULL, an absent value, a non-decimal string against a number, a
/// boolean against a non-boolean, an array or object).
pub fn compare_values(a: Option<&Value>, b: Option<&Value>) -> Option<Ordering> {
    compare(&Val::of_json(a), &Val::of_json(b))
}

pub(super) fn compare(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Null, _) | (_, Val::Null) | (Val::Other, _) | (_, Val::Other) => None,
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Bool(_), _) | (_, Val::Bool(_)) => None,
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::JsonNum(x), Val::JsonNum(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                return Some(x.cmp(&y));
            }
            Some(a.decimal()?.cmp(&b.decimal()?))
        }
        _ => Some(a.decimal()?.cmp(&b.decimal()?)),
    }
}

pub(super) fn eval(expr: &Expr, row: &Row) -> Option<bool> {
    match expr {
        Expr::Compare { left, op, right } => {
            let ord = compare(&Val::of_operand(left, row), &Val::of_operand(right, row))?;
            Some(op.holds(ord))
        }
        Expr::In {
            operand,
            list,
            negated,
        } => {
            let v = Val::of_operand(operand, row);
            // the row's value read as a decimal once for the whole list, not once per number
            // in it (the same comparison: a number literal compares as a decimal)
            let number = match v {
                Val::JsonNum(_) | Val::Str(_) => v.decimal().map(Val::Num),
                _ => None,
            };
            let mut unknown = false;
            for item in list {
                let literal = Val::of_literal(item);
                let compared = match (&literal, &number) {
                    (Val::Num(_), Some(n)) => compare(n, &literal),
                    _ => compare(&v, &literal),
                };
                match compared {
                    Some(Ordering::Equal) => return Some(!negated),
                    Some(_) => {}
                    None => unknown = true,
                }
            }
            if unknown {
                None
            } else {
                Some(*negated)
            }
        }
        Expr::IsNull { operand, negated } => {
            let is_null = matches!(Val::of_operand(operand, row), Val::Null);
            Some(is_null != *negated)
        }
        Expr::Truth(operand) => match Val::of_operand(operand, row) {
            Val::Bool(b) => Some(b),
            _ => None,
        },
        Expr::Not(inner) => eval(inner, row).map(|b| !b),
        Expr::And(items) => {
            let mut unknown = false;
            for item in items {
                match eval(item, row) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => unknown = true,
                }
            }
            if unknown {
                None
            } else {
                Some(true)
            }
        }
        Expr::Or(items) => {
            let mut unknown = false;
            for item in items {
                match eval(item, row) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => unknown = true,
                }
            }
            if unknown {
                None
            } else {
                Some(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Filter;
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn check(expr: &str, r: &Value) -> Option<bool> {
        Filter::parse(expr).unwrap().evaluate(&row(r.clone()))
    }

    #[test]
    fn decimals_compare_exactly_across_forms() {
        let r = json!({"odd": "1.50", "n": 1.5, "i": 42, "big": "123456789012345678901234.5"});
        assert_eq!(check("odd = 1.5", &r), Some(true));
        assert_eq!(check("odd = '1.5'", &r), Some(false)); // strings compare as strings
        assert_eq!(check("n = '1.50'", &r), Some(true)); // number vs decimal string
        assert_eq!(check("odd = n", &r), Some(true));
        assert_eq!(check("i > 41.999", &r), Some(true));
        assert_eq!(check("i >= 42.000", &r), Some(true));
        assert_eq!(check("big > 123456789012345678901234.49", &r), Some(true));
        assert_eq!(check("big < 123456789012345678901234.51", &r), Some(true));
        assert_eq!(check("odd < 1.500000000000000000001", &r), Some(true));
    }

    #[test]
    fn three_valued_logic() {
        let r = json!({"a": 1, "s": "abc", "nul": null, "t": true, "f": false, "arr": [1]});
        assert_eq!(check("missing = 1", &r), None);
        assert_eq!(check("nul = 1", &r), None);
        assert_eq!(check("a = NULL", &r), None);
        assert_eq!(check("NOT (missing = 1)", &r), None);
        assert_eq!(check("missing = 1 AND a = 2", &r), Some(false));
        assert_eq!(check("missing = 1 AND a = 1", &r), None);
        assert_eq!(check("missing = 1 OR a = 1", &r), Some(true));
        assert_eq!(check("missing = 1 OR a = 2", &r), None);
        assert_eq!(check("s < 5", &r), None); // non-decimal string vs number
        assert_eq!(check("s > 'abb'", &r), Some(true));
        assert_eq!(check("t", &r), Some(true));
        assert_eq!(check("NOT f", &r), Some(true));
        assert_eq!(check("a", &r), None);
        assert_eq!(check("t = 1", &r), None);
        assert_eq!(check("t = TRUE", &r), Some(true));
        assert_eq!(check("f < t", &r), Some(true));
        assert_eq!(check("arr = 1", &r), None);
        assert_eq!(check("missing IS NULL", &r), Some(true));
        assert_eq!(check("nul IS NULL", &r), Some(true));
        assert_eq!(check("a IS NOT NULL", &r), Some(true));
        assert_eq!(check("a IN (2, 1)", &r), Some(true));
        assert_eq!(check("a IN (2, 3)", &r), Some(false));
        assert_eq!(check("a IN (2, NULL)", &r), None);
        assert_eq!(check("a NOT IN (2, NULL)", &r), None);
        assert_eq!(check("a NOT IN (2, 3)", &r), Some(true));
        assert_eq!(check("a IN (1, NULL)", &r), Some(true));
        assert_eq!(check("missing IN (1)", &r), None);
        // matches only on TRUE
        let f = Filter::parse("missing = 1 OR a = 2").unwrap();
        assert!(!f.matches(&row(r.clone())));
        assert!(!Filter::parse("NOT (missing = 1)").unwrap().matches(&row(r)));
    }

    #[test]
    fn compare_values_is_symmetric() {
        let values = [
            json!(null),
            json!(true),
            json!(1),
            json!(1.5),
            json!("1.50"),
            json!("abc"),
            json!("2"),
            json!([1]),
        ];
        for a in &values {
            for b in &values {
                let ab = compare_values(Some(a), Some(b));
                let ba = compare_values(Some(b), Some(a));
                assert_eq!(ab, ba.map(Ordering::reverse), "{a} vs {b}");
            }
        }
    }
}
