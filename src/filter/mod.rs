//! Filtered subscriptions and projections (pure: no I/O, no clocks, no globals).
//!
//! A client asks for a subset of a table with `where=<expr>` and `columns=a,b`:
//!
//! - [`Filter::parse`] reads a SQL-like boolean expression with the `sqlparser` crate and keeps a
//!   small typed AST ([`Expr`]): column references (bare or `"quoted"` names, case-sensitive as
//!   JSON keys are), literals (`'strings'`, numbers as exact [`Decimal`]s, `TRUE`, `FALSE`,
//!   `NULL`), `=`, `!=`/`<>`, `<`, `<=`, `>`, `>=`, `[NOT] IN (literal, ...)`, `IS [NOT] NULL`,
//!   `AND`, `OR`, `NOT`, parentheses, and a bare column or literal as a boolean (`active`).
//!   Anything else (functions, arithmetic, `LIKE`, `BETWEEN`, subqueries, casts, `a.b` names, ...)
//!   is refused with [`FilterError::Unsupported`] naming the construct.
//! - [`Filter::matches`] evaluates it against a row with SQL three-valued logic: a comparison
//!   with NULL or with an absent column is unknown, `NOT unknown` is unknown, and a row matches
//!   only when the whole expression is TRUE.
//! - [`Projection`] keeps the listed columns of a row. It never adds the row key: the key travels
//!   beside the row (`{key: row}` on the wire), so the caller always has it.
//! - [`FilterIndex`] holds many subscriptions and tells, for one row change, which of them see a
//!   move-in, a move-out or an update, evaluating only the subscriptions an equality index selects
//!   (plus those without an indexable conjunct).
//!
//! Comparison rules ([`compare_values`]):
//! - numbers (JSON numbers, plain decimal strings such as `"123.450"`, number literals) compare
//!   exactly as decimals: `"1.50" = 1.5` is TRUE;
//! - strings compare as strings (byte order of UTF-8, i.e. code point order);
//! - a string compared with a number compares numerically when the string is a plain decimal
//!   (`-?digits[.digits]`), else the comparison is unknown (`'abc' < 5` is neither TRUE nor FALSE);
//! - booleans compare with booleans (`FALSE < TRUE`); a boolean against anything else, and JSON
//!   arrays or objects against anything, are unknown.
//!
//! Limits (each refused with its own [`FilterError`]): at most [`MAX_WHERE_BYTES`] bytes of
//! text, [`MAX_DEPTH`] levels of nesting (after `a AND b AND c` chains are flattened), at most
//! [`MAX_IN_LIST`] items in one `IN` list and [`MAX_NODES`] nodes in total.

pub mod decimal;
mod eval;
mod index;
mod parse;
mod projection;

pub use decimal::Decimal;
pub use eval::compare_values;
pub use index::{equality, value_keys, FilterIndex, IndexKey, Transition};
pub use projection::{Projection, ProjectionError, MAX_PROJECTED_COLUMNS};

use crate::cdc::decode::Row;

/// Longest `where` text accepted, in bytes.
pub const MAX_WHERE_BYTES: usize = 4096;
/// Deepest nesting of the expression tree (`NOT`, parentheses around a different operator).
pub const MAX_DEPTH: usize = 32;
/// Most items in one `IN (...)` list.
pub const MAX_IN_LIST: usize = 1000;
/// Most nodes (comparisons, `IN`, `IS NULL`, `NOT`, `AND`, `OR`, truth tests) in one expression.
pub const MAX_NODES: usize = 512;

/// Why a `where` expression was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("where expression is empty")]
    Empty,
    #[error("where expression is {len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("where expression nests deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("where expression has more than {max} nodes")]
    TooManyNodes { max: usize },
    #[error("IN list has {len} items, more than the {max} allowed")]
    InListTooLong { len: usize, max: usize },
    #[error("where expression syntax: {0}")]
    Syntax(#[from] sqlparser::parser::ParserError),
    #[error("unsupported in a where expression: {construct} (`{sql}`)")]
    Unsupported {
        /// What kind of construct, e.g. "function call", "LIKE", "arithmetic operator +".
        construct: &'static str,
        /// The offending part of the expression, as SQL (cut to 80 characters).
        sql: String,
    },
    #[error("number literal out of range: {0}")]
    BadNumber(String),
    #[error("empty column name")]
    EmptyColumn,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl CmpOp {
    /// The operator with its operands swapped (`1 < a` is `a > 1`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Eq => CmpOp::Eq,
            CmpOp::NotEq => CmpOp::NotEq,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::LtEq => CmpOp::GtEq,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::GtEq => CmpOp::LtEq,
        }
    }

    /// Whether an ordering satisfies the operator.
    pub fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CmpOp::Eq => ord == Equal,
            CmpOp::NotEq => ord != Equal,
            CmpOp::Lt => ord == Less,
            CmpOp::LtEq => ord != Greater,
            CmpOp::Gt => ord == Greater,
            CmpOp::GtEq => ord != Less,
        }
    }
}

/// A literal value of a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Null,
    Bool(bool),
    Number(Decimal),
    String(String),
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Column(String),
    Literal(Literal),
}

/// The typed AST of a `where` expression. `And`/`Or` are n-ary (chains are flattened).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Compare {
        left: Operand,
        op: CmpOp,
        right: Operand,
    },
    /// `operand [NOT] IN (list)`: SQL semantics, so a NULL in the list makes a miss unknown.
    In {
        operand: Operand,
        list: Vec<Literal>,
        negated: bool,
    },
    /// `operand IS [NOT] NULL` (an absent column is NULL); never unknown.
    IsNull {
        operand: Operand,
        negated: bool,
    },
    /// A bare operand used as a condition: TRUE for JSON `true`, FALSE for `false`, else unknown.
    Truth(Operand),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// A parsed, validated `where` expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    expr: Expr,
    text: String,
}

impl Filter {
    /// Parses and validates a `where` expression.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let expr = parse::parse_where(text)?;
        Ok(Filter {
            expr,
            text: text.to_string(),
        })
    }

    /// The expression as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The typed AST.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// True when the expression is TRUE for `row` (FALSE and unknown do not match).
    pub fn matches(&self, row: &Row) -> bool {
        eval::eval(&self.expr, row) == Some(true)
    }

    /// Three-valued result: `Some(true)`, `Some(false)`, or `None` for unknown.
    pub fn evaluate(&self, row: &Row) -> Option<bool> {
        eval::eval(&self.expr, row)
    }

    /// The columns the expression reads, sorted, without duplicates.
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        collect_columns(&self.expr, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn collect_columns<'a>(expr: &'a Expr, out: &mut Vec<&'a str>) {
    let operand = |o: &'a Operand, out: &mut Vec<&'a str>| {
        if let Operand::Column(c) = o {
            out.push(c.as_str());
        }
    };
    match expr {
        Expr::Compare { left, right, .. } => {
            operand(left, out);
            operand(right, out);
        }
        Expr::In { operand: o, .. } | Expr::IsNull { operand: o, .. } | Expr::Truth(o) => {
            operand(o, out)
        }
        Expr::Not(inner) => collect_columns(inner, out),
        Expr::And(items) | Expr::Or(items) => {
            for item in items {
                collect_columns(item, out);
            }
        }
    }
}
