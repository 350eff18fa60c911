//! `where` text -> sqlparser's AST -> our [`Expr`], refusing everything outside the subset.
//!
//! `AND`/`OR` chains are flattened without recursion (sqlparser builds them left-deep, so a chain
//! of 500 terms would otherwise be 500 levels deep); every other level counts against
//! [`MAX_DEPTH`]. sqlparser's own recursion limit bounds its stack use while parsing.

use sqlparser::ast::{BinaryOperator, Expr as SqlExpr, InTarget, UnaryOperator, Value as SqlValue};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::{
    CmpOp, Decimal, Expr, FilterError, Literal, Operand, MAX_DEPTH, MAX_IN_LIST, MAX_NODES,
    MAX_WHERE_BYTES,
};

/// sqlparser's recursion budget: each parenthesis or operator level costs it one or two units,
/// so this admits [`MAX_DEPTH`] levels of ours with room to spare and bounds its stack.
const PARSER_RECURSION_LIMIT: usize = 3 * MAX_DEPTH + 8;

pub(super) fn parse_where(text: &str) -> Result<Expr, FilterError> {
    if text.len() > MAX_WHERE_BYTES {
        return Err(FilterError::TooLong {
            len: text.len(),
            max: MAX_WHERE_BYTES,
        });
    }
    if text.trim().is_empty() {
        return Err(FilterError::Empty);
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .map_err(|e| syntax(e.into()))?;
    check_nesting(&tokens)?;
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .with_tokens_with_locations(tokens);
    let ast = parser.parse_expr().map_err(syntax)?;
    parser.expect_token(&Token::EOF).map_err(syntax)?;
    let mut nodes = 0usize;
    convert(&ast, 1, &mut nodes)
}

/// Refuses more than [`MAX_DEPTH`] nested parentheses or consecutive `NOT`s before parsing, so
/// the error says what is wrong (the parser would stop with a less helpful message).
fn check_nesting(tokens: &[TokenWithSpan]) -> Result<(), FilterError> {
    let mut parens = 0usize;
    let mut nots = 0usize;
    for t in tokens {
        match &t.token {
            Token::LParen => parens += 1,
            Token::RParen => parens = parens.saturating_sub(1),
            Token::Whitespace(_) => continue,
            _ => {}
        }
        nots = match &t.token {
            Token::Word(w) if w.keyword == Keyword::NOT => nots + 1,
            _ => 0,
        };
        if parens > MAX_DEPTH || nots > MAX_DEPTH {
            return Err(FilterError::TooDeep { max: MAX_DEPTH });
        }
    }
    Ok(())
}

fn syntax(e: ParserError) -> FilterError {
    match e {
        ParserError::RecursionLimitExceeded => FilterError::TooDeep { max: MAX_DEPTH },
        other => FilterError::Syntax(other),
    }
}

fn unsupported(construct: &'static str, e: &SqlExpr) -> FilterError {
    let mut sql = e.to_string();
    if sql.chars().count() > 80 {
        sql = sql.chars().take(77).collect::<String>() + "...";
    }
    FilterError::Unsupported { construct, sql }
}

fn strip_parens(mut e: &SqlExpr) -> &SqlExpr {
    while let SqlExpr::Nested(inner) = e {
        e = inner;
    }
    e
}

fn convert(e: &SqlExpr, depth: usize, nodes: &mut usize) -> Result<Expr, FilterError> {
    if depth > MAX_DEPTH {
        return Err(FilterError::TooDeep { max: MAX_DEPTH });
    }
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(FilterError::TooManyNodes { max: MAX_NODES });
    }
    let e = strip_parens(e);
    match e {
        SqlExpr::BinaryOp {
            op: op @ (BinaryOperator::And | BinaryOperator::Or),
            ..
        } => {
            let items = flatten(e, op)
                .into_iter()
                .map(|item| convert(item, depth + 1, nodes))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if *op == BinaryOperator::And {
                Expr::And(items)
            } else {
                Expr::Or(items)
            })
        }
        SqlExpr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::NotEq,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::LtEq,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::GtEq,
                BinaryOperator::Plus
                | BinaryOperator::Minus
                | BinaryOperator::Multiply
                | BinaryOperator::Divide
                | BinaryOperator::Modulo => return Err(unsupported("arithmetic", e)),
                BinaryOperator::StringConcat => return Err(unsupported("string concatenation", e)),
                _ => return Err(unsupported("operator", e)),
            };
            Ok(Expr::Compare {
                left: operand(left)?,
                op,
                right: operand(right)?,
            })
        }
        SqlExpr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Expr::Not(Box::new(convert(expr, depth + 1, nodes)?))),
        SqlExpr::IsNull(inner) => Ok(Expr::IsNull {
            operand: operand(inner)?,
            negated: false,
        }),
        SqlExpr::IsNotNull(inner) => Ok(Expr::IsNull {
            operand: operand(inner)?,
            negated: true,
        }),
        SqlExpr::In {
            expr,
            target,
            negated,
            ..
        } => match target {
            InTarget::List(items) => {
                if items.len() > MAX_IN_LIST {
                    return Err(FilterError::InListTooLong {
                        len: items.len(),
                        max: MAX_IN_LIST,
                    });
                }
                let list = items
                    .iter()
                    .map(|item| match operand(item)? {
                        Operand::Literal(l) => Ok(l),
                        Operand::Column(_) => Err(unsupported("a column inside an IN list", item)),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Expr::In {
                    operand: operand(expr)?,
                    list,
                    negated: *negated,
                })
            }
            _ => Err(unsupported("IN with a subquery", e)),
        },
        SqlExpr::Identifier(_) => Ok(Expr::Truth(operand(e)?)),
        SqlExpr::Value(v) => match &v.value {
            SqlValue::Boolean(b) => Ok(Expr::Truth(Operand::Literal(Literal::Bool(*b)))),
            SqlValue::Null => Ok(Expr::Truth(Operand::Literal(Literal::Null))),
            _ => Err(unsupported("a literal that is not a condition", e)),
        },
        other => Err(unsupported(describe(other), other)),
    }
}

/// The operands of a chain of one operator (`a AND (b AND c) AND d` -> `[a, b, c, d]`), found
/// with an explicit stack so a long chain costs no recursion.
fn flatten<'a>(e: &'a SqlExpr, chain: &BinaryOperator) -> Vec<&'a SqlExpr> {
    let mut out = Vec::new();
    let mut stack = vec![e];
    while let Some(top) = stack.pop() {
        match strip_parens(top) {
            SqlExpr::BinaryOp { left, op, right } if op == chain => {
                stack.push(right);
                stack.push(left);
            }
            other => out.push(other),
        }
    }
    out
}

fn operand(e: &SqlExpr) -> Result<Operand, FilterError> {
    let e = strip_parens(e);
    match e {
        SqlExpr::Identifier(ident) => {
            if ident.value.is_empty() {
                return Err(FilterError::EmptyColumn);
            }
            Ok(Operand::Column(ident.value.clone()))
        }
        SqlExpr::Value(v) => literal(&v.value, e).map(Operand::Literal),
        SqlExpr::UnaryOp {
            op: sign @ (UnaryOperator::Minus | UnaryOperator::Plus),
            expr,
        } => match strip_parens(expr) {
            SqlExpr::Value(v) => match literal(&v.value, e)? {
                Literal::Number(n) if *sign == UnaryOperator::Minus => {
                    Ok(Operand::Literal(Literal::Number(Decimal::zero().sub(&n))))
                }
                Literal::Number(n) => Ok(Operand::Literal(Literal::Number(n))),
                _ => Err(unsupported("a sign before a non-number", e)),
            },
            _ => Err(unsupported("arithmetic", e)),
        },
        SqlExpr::BinaryOp { op, .. } => Err(unsupported(
            match op {
                BinaryOperator::Plus
                | BinaryOperator::Minus
                | BinaryOperator::Multiply
                | BinaryOperator::Divide
                | BinaryOperator::Modulo => "arithmetic",
                BinaryOperator::StringConcat => "string concatenation",
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq
                | BinaryOperator::And
                | BinaryOperator::Or => "a condition used as a value",
                _ => "operator",
            },
            e,
        )),
        SqlExpr::UnaryOp {
            op: UnaryOperator::Not,
            ..
        }
        | SqlExpr::IsNull(_)
        | SqlExpr::IsNotNull(_)
        | SqlExpr::In { .. } => Err(unsupported("a condition used as a value", e)),
        other => Err(unsupported(describe(other), other)),
    }
}

fn literal(v: &SqlValue, e: &SqlExpr) -> Result<Literal, FilterError> {
    match v {
        SqlValue::Number(text, _) => Decimal::parse_number(text)
            .map(Literal::Number)
            .ok_or_else(|| FilterError::BadNumber(text.clone())),
        SqlValue::SingleQuotedString(s) => Ok(Literal::String(s.clone())),
        SqlValue::Boolean(b) => Ok(Literal::Bool(*b)),
        SqlValue::Null => Ok(Literal::Null),
        _ => Err(unsupported(
            "this kind of literal (use 'single quotes' for strings)",
            e,
        )),
    }
}

fn describe(e: &SqlExpr) -> &'static str {
    match e {
        SqlExpr::CompoundIdentifier(_) => "a qualified column name (use \"a.b\" in double quotes)",
        SqlExpr::Function(_) => "a function call",
        SqlExpr::Like { .. } | SqlExpr::ILike { .. } => "LIKE",
        SqlExpr::SimilarTo { .. } | SqlExpr::RLike { .. } => "pattern matching",
        SqlExpr::Between { .. } => "BETWEEN (use >= AND <=)",
        SqlExpr::Subquery(_) | SqlExpr::Exists { .. } => "a subquery",
        SqlExpr::Cast { .. } | SqlExpr::Convert { .. } => "a cast",
        SqlExpr::Case { .. } => "CASE",
        SqlExpr::IsTrue(_)
        | SqlExpr::IsFalse(_)
        | SqlExpr::IsNotTrue(_)
        | SqlExpr::IsNotFalse(_)
        | SqlExpr::IsUnknown(_)
        | SqlExpr::IsNotUnknown(_) => "IS TRUE/FALSE/UNKNOWN",
        SqlExpr::IsDistinctFrom(..) | SqlExpr::IsNotDistinctFrom(..) => "IS DISTINCT FROM",
        SqlExpr::AnyOp { .. } | SqlExpr::AllOp { .. } => "ANY/ALL",
        SqlExpr::Tuple(_) => "a tuple",
        SqlExpr::Array(_) => "an array",
        SqlExpr::Interval(_) => "an interval",
        SqlExpr::TypedString(_) => "a typed literal",
        SqlExpr::Wildcard(_) | SqlExpr::QualifiedWildcard(..) => "a wildcard",
        SqlExpr::UnaryOp { .. } => "this unary operator",
        SqlExpr::Collate { .. } => "COLLATE",
        SqlExpr::AtTimeZone { .. } => "AT TIME ZONE",
        _ => "this expression",
    }
}

#[cfg(test)]
mod tests {
    use super::super::Filter;
    use super::*;

    fn parse(s: &str) -> Expr {
        Filter::parse(s).unwrap().expr().clone()
    }

    fn col(c: &str) -> Operand {
        Operand::Column(c.into())
    }

    fn num(s: &str) -> Operand {
        Operand::Literal(Literal::Number(Decimal::parse_number(s).unwrap()))
    }

    #[test]
    fn parses_the_supported_subset() {
        assert_eq!(
            parse("league = 'nba'"),
            Expr::Compare {
                left: col("league"),
                op: CmpOp::Eq,
                right: Operand::Literal(Literal::String("nba".into()))
            }
        );
        assert_eq!(
            parse("odd1 >= -1.50"),
            Expr::Compare {
                left: col("odd1"),
                op: CmpOp::GtEq,
                right: num("-1.5")
            }
        );
        assert_eq!(
            parse("a <> 1"),
            Expr::Compare {
                left: col("a"),
                op: CmpOp::NotEq,
                right: num("1")
            }
        );
        assert_eq!(parse("a != 1"), parse("a <> 1"));
        assert_eq!(
            parse("\"Game Id\" IN ('g1', 2, NULL)"),
            Expr::In {
                operand: col("Game Id"),
                list: vec![
                    Literal::String("g1".into()),
                    Literal::Number(Decimal::from_i64(2)),
                    Literal::Null
                ],
                negated: false
            }
        );
        assert_eq!(
            parse("x NOT IN (1)"),
            Expr::In {
                operand: col("x"),
                list: vec![Literal::Number(Decimal::from_i64(1))],
                negated: true
            }
        );
        assert_eq!(
            parse("x IS NOT NULL"),
            Expr::IsNull {
                operand: col("x"),
                negated: true
            }
        );
        assert_eq!(
            parse("NOT (active)"),
            Expr::Not(Box::new(Expr::Truth(col("active"))))
        );
        assert_eq!(
            parse("TRUE"),
            Expr::Truth(Operand::Literal(Literal::Bool(true)))
        );
        // chains flatten, parentheses included; precedence kept
        match parse("a = 1 AND (b = 2 AND c = 3) AND d = 4 OR e = 5") {
            Expr::Or(items) => {
                assert_eq!(items.len(), 2);
                assert!(matches!(&items[0], Expr::And(v) if v.len() == 4));
            }
            other => panic!("{other:?}"),
        }
        // case of column names is kept (JSON keys are case-sensitive)
        assert_eq!(
            Filter::parse("GameId = 1").unwrap().columns(),
            vec!["GameId"]
        );
    }

    #[test]
    fn refuses_unsupported_constructs_by_name() {
        let cases = [
            ("upper(name) = 'X'", "a function call"),
            ("a + 1 = 2", "arithmetic"),
            ("name LIKE 'a%'", "LIKE"),
            ("a BETWEEN 1 AND 2", "BETWEEN (use >= AND <=)"),
            ("a IN (SELECT b FROM t)", "IN with a subquery"),
            ("EXISTS (SELECT 1)", "a subquery"),
            ("CAST(a AS INT) = 1", "a cast"),
            (
                "t.a = 1",
                "a qualified column name (use \"a.b\" in double quotes)",
            ),
            ("a IN (b)", "a column inside an IN list"),
            ("a = (b = 1)", "a condition used as a value"),
            ("'text'", "a literal that is not a condition"),
            ("a IS TRUE", "IS TRUE/FALSE/UNKNOWN"),
            ("a || 'x' = 'y'", "string concatenation"),
            ("CASE WHEN a THEN 1 END = 1", "CASE"),
        ];
        for (text, construct) in cases {
            match Filter::parse(text) {
                Err(FilterError::Unsupported {
                    construct: got,
                    sql,
                }) => {
                    assert_eq!(got, construct, "{text}");
                    assert!(!sql.is_empty());
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let msg = Filter::parse("upper(name) = 'X'").unwrap_err().to_string();
        assert!(
            msg.contains("function call") && msg.contains("upper(name)"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_bad_syntax_and_enforces_limits() {
        assert!(matches!(Filter::parse(""), Err(FilterError::Empty)));
        assert!(matches!(Filter::parse("   "), Err(FilterError::Empty)));
        assert!(matches!(
            Filter::parse("a = 1 b"),
            Err(FilterError::Syntax(_))
        ));
        assert!(matches!(Filter::parse("a = "), Err(FilterError::Syntax(_))));
        assert!(matches!(
            Filter::parse("a = 1; DROP TABLE t"),
            Err(FilterError::Syntax(_))
        ));
        let long = format!("a = '{}'", "x".repeat(MAX_WHERE_BYTES));
        assert!(matches!(
            Filter::parse(&long),
            Err(FilterError::TooLong { .. })
        ));
        let items = vec!["1"; MAX_IN_LIST + 1].join(",");
        assert!(matches!(
            Filter::parse(&format!("a IN ({items})")),
            Err(FilterError::InListTooLong { len, .. }) if len == MAX_IN_LIST + 1
        ));
        let items = vec!["1"; MAX_IN_LIST].join(",");
        assert!(Filter::parse(&format!("a IN ({items})")).is_ok());
    }

    #[test]
    fn depth_limit_is_ours_not_the_stack() {
        // MAX_DEPTH levels of alternating NOT/AND/OR nesting parse
        let mut ok = "a = 1".to_string();
        for i in 1..MAX_DEPTH {
            ok = match i % 3 {
                0 => format!("NOT ({ok})"),
                1 => format!("b = {i} AND ({ok})"),
                _ => format!("c = {i} OR ({ok})"),
            };
        }
        assert!(Filter::parse(&ok).is_ok(), "{ok}");
        let too_deep = format!("NOT ({ok})");
        assert!(matches!(
            Filter::parse(&too_deep),
            Err(FilterError::TooDeep { .. })
        ));
        // deep parentheses alone: refused by the parser's budget, no stack overflow
        let parens = format!("{}a = 1{}", "(".repeat(1000), ")".repeat(1000));
        assert!(matches!(
            Filter::parse(&parens),
            Err(FilterError::TooDeep { .. })
        ));
        let nots = format!("{}a", "NOT ".repeat(1000));
        let got = Filter::parse(&nots);
        assert!(matches!(got, Err(FilterError::TooDeep { .. })), "{got:?}");
        // a long flat chain is not deep
        let chain = (0..200)
            .map(|i| format!("c{i} = {i}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        assert!(matches!(Filter::parse(&chain).unwrap().expr(), Expr::And(v) if v.len() == 200));
        // but node count is bounded
        let many = (0..600).map(|_| "a").collect::<Vec<_>>().join(" OR ");
        assert!(matches!(
            Filter::parse(&many),
            Err(FilterError::TooManyNodes { .. })
        ));
    }
}
