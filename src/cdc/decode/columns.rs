//! Column values: binary decimals (`Decimal` with the scale from the schema,
//! `VariableScaleDecimal` with its own) become exact decimal strings.

use serde_json::Value;

use super::limits::quote;
use super::schema::FieldList;
use super::{DecodeError, Row, DECIMAL_SLACK_BYTES};
use crate::cdc::decimal;

/// Turns binary decimals into exact decimal strings in place; returns the columns that look like
/// base64 decimals but cannot be decoded (no schema tells their scale). A decimal past the bounds
/// of [`decimal`], or decimals that together would pass `decimal_budget` bytes, are errors.
pub(super) fn decode_columns(
    row: &mut Row,
    fields: Option<&FieldList<'_>>,
    decimal_budget: &mut usize,
) -> Result<Vec<String>, DecodeError> {
    let mut undecodable = Vec::new();
    let fields = fields.map(FieldList::finder);
    for (column, value) in row.iter_mut() {
        let out_of_range = |error| DecodeError::DecimalOutOfRange {
            column: quote(column),
            error,
        };
        if let Some((scale, b64)) = variable_scale(value) {
            match decimal::decode_base64(b64, scale) {
                Ok(text) => {
                    spend(decimal_budget, &text)?;
                    *value = Value::String(text);
                }
                Err(e) if e.out_of_range() => return Err(out_of_range(e)),
                // not base64: not a decimal, kept as it is
                Err(_) => {}
            }
            continue;
        }
        let Value::String(b64) = value else { continue };
        match fields.as_ref().map(|fs| fs.find(column)) {
            Some(Some(f)) if f.decimal_scale().is_some() => {
                match f
                    .decimal_scale()
                    .flatten()
                    .map(|scale| decimal::decode_base64(b64, scale))
                {
                    Some(Ok(text)) => {
                        spend(decimal_budget, &text)?;
                        *value = Value::String(text);
                    }
                    Some(Err(e)) if e.out_of_range() => return Err(out_of_range(e)),
                    Some(Err(_)) | None => undecodable.push(column.clone()),
                }
            }
            Some(_) => {}
            None if decimal::looks_like_base64_decimal(b64) => undecodable.push(column.clone()),
            None => {}
        }
    }
    Ok(undecodable)
}

/// Takes a decoded decimal's size from the record's budget.
fn spend(budget: &mut usize, text: &str) -> Result<(), DecodeError> {
    *budget = budget
        .checked_sub(text.len())
        .ok_or(DecodeError::DecimalsTooLarge {
            slack: DECIMAL_SLACK_BYTES,
        })?;
    Ok(())
}

/// `{"scale": n, "value": base64}` (VariableScaleDecimal) -> (scale, base64).
fn variable_scale(value: &Value) -> Option<(i64, &str)> {
    let obj = value.as_object()?;
    if obj.len() != 2 {
        return None;
    }
    Some((obj.get("scale")?.as_i64()?, obj.get("value")?.as_str()?))
}
