//! Column values: binary decimals (`Decimal` with the scale from the schema,
//! `VariableScaleDecimal` with its own) become exact decimal strings.

use serde_json::Value;

use super::Row;
use crate::cdc::decimal;

/// The `fields` of a struct schema; with `side`, of the named field (`after`/`before`).
pub(super) fn struct_fields<'a>(schema: &'a Value, side: Option<&str>) -> Option<&'a Vec<Value>> {
    let fields = schema.get("fields")?.as_array()?;
    match side {
        None => Some(fields),
        Some(side) => fields
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(side))
            .and_then(|f| f.get("fields"))
            .and_then(Value::as_array),
    }
}

const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";

/// Turns binary decimals into exact decimal strings in place; returns the columns that look like
/// base64 decimals but cannot be decoded (no schema tells their scale).
pub(super) fn decode_columns(row: &mut Row, fields: Option<&Vec<Value>>) -> Vec<String> {
    let mut undecodable = Vec::new();
    for (column, value) in row.iter_mut() {
        if let Some(text) = variable_scale(value) {
            *value = Value::String(text);
            continue;
        }
        let Value::String(b64) = value else { continue };
        let field = fields.and_then(|fs| {
            fs.iter()
                .find(|f| f.get("field").and_then(Value::as_str) == Some(column))
        });
        match field {
            Some(f) if f.get("name").and_then(Value::as_str) == Some(DECIMAL) => {
                let scale = f
                    .get("parameters")
                    .and_then(|p| p.get("scale"))
                    .and_then(|s| {
                        s.as_str()
                            .and_then(|t| t.parse().ok())
                            .or_else(|| s.as_i64().map(|n| n as i32))
                    });
                match scale.and_then(|scale| decimal::decode_base64(b64, scale)) {
                    Some(text) => *value = Value::String(text),
                    None => undecodable.push(column.clone()),
                }
            }
            Some(_) => {}
            None if fields.is_none() && decimal::looks_like_base64_decimal(b64) => {
                undecodable.push(column.clone())
            }
            None => {}
        }
    }
    undecodable
}

/// `{"scale": n, "value": base64}` (VariableScaleDecimal) -> decimal string.
fn variable_scale(value: &Value) -> Option<String> {
    let obj = value.as_object()?;
    if obj.len() != 2 {
        return None;
    }
    let scale = i32::try_from(obj.get("scale")?.as_i64()?).ok()?;
    decimal::decode_base64(obj.get("value")?.as_str()?, scale)
}
