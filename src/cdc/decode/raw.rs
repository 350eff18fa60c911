//! Borrowed, lazy JSON: an object's members with their values left as `&RawValue` (validated,
//! not built), so the decoder builds `serde_json::Value`s only for what it uses (issue 14: building
//! a `Value` of the whole envelope, schema, `before`, `source` and all, was 13 % of ingest CPU).
//!
//! Duplicate keys resolve as `serde_json::Map` does, so the result is the one a `Value` parse
//! gives: the last value wins, at the position of the first (see [`Fields`]). Values that are skipped are checked
//! for syntax and UTF-8 but, as serde_json's own skipping does, not for numbers out of `f64`'s
//! range or lone surrogate escapes: such a record was invalid JSON to the `Value` decoder and is
//! accepted when the odd value sits in a part that is not used.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::DecodeError;

/// The members of a JSON object, in order, values unparsed. Duplicate keys are kept as they
/// came; lookups see the last one, as a `Map` does.
#[derive(Debug, Default)]
pub(super) struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The members by name (the last of a name, as [`Fields::get`] gives): for many lookups.
    pub(super) fn index(&self) -> std::collections::HashMap<&str, &'a RawValue> {
        self.0.iter().map(|(k, v)| (k.as_ref(), *v)).collect()
    }

    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The number of distinct keys (a `Map`'s length).
    pub(super) fn len(&self) -> usize {
        let n = self.0.len();
        if n <= SCAN_LIMIT {
            (0..n)
                .filter(|&i| !self.0[..i].iter().any(|(k, _)| *k == self.0[i].0))
                .count()
        } else {
            self.0
                .iter()
                .map(|(k, _)| k.as_ref())
                .collect::<HashSet<&str>>()
                .len()
        }
    }

    /// The keys, duplicates included.
    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_ref())
    }

    /// The members in order, duplicates included: inserted into a `Map` in this order they give
    /// what a `Value` parse gives.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// The member's value, parsed; `None` when absent.
    pub(super) fn value(&self, key: &str) -> Result<Option<Value>, DecodeError> {
        self.get(key).map(value).transpose()
    }

    /// The member's value when it is a JSON string.
    pub(super) fn str(&self, key: &str) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self.get(key) {
            Some(raw) if is_string(raw) => Ok(Some(
                serde_json::from_str::<Text<'a>>(raw.get())
                    .map_err(invalid)?
                    .0,
            )),
            _ => Ok(None),
        }
    }

    /// The member's value when it is an integer that fits `i64` (`Value::as_i64`).
    pub(super) fn i64(&self, key: &str) -> Result<Option<i64>, DecodeError> {
        Ok(self.value(key)?.and_then(|v| v.as_i64()))
    }
}

/// A JSON text as the decoder first sees it.
pub(super) enum Json<'a> {
    Object(Fields<'a>),
    Null,
    /// An array, string, number or boolean (validated, not built).
    Other,
}

/// Parses a whole JSON text (trailing whitespace only) one level deep.
pub(super) fn parse(text: &str) -> Result<Json<'_>, DecodeError> {
    serde_json::from_str::<JsonSeed<'_>>(text)
        .map(|s| s.0)
        .map_err(invalid)
}

/// The members of `raw` when it is an object.
pub(super) fn object<'a>(raw: &'a RawValue) -> Result<Option<Fields<'a>>, DecodeError> {
    if !is_object(raw) {
        return Ok(None);
    }
    match parse(raw.get())? {
        Json::Object(fields) => Ok(Some(fields)),
        Json::Null | Json::Other => Ok(None),
    }
}

/// `raw` built into a `Value`.
pub(super) fn value(raw: &RawValue) -> Result<Value, DecodeError> {
    serde_json::from_str(raw.get()).map_err(invalid)
}

// A RawValue starts at its first byte (serde_json skips the whitespace before it).
pub(super) fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

pub(super) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

pub(super) fn is_string(raw: &RawValue) -> bool {
    raw.get().starts_with('"')
}

fn invalid(e: serde_json::Error) -> DecodeError {
    DecodeError::InvalidJson(e.to_string())
}

/// A string, borrowed when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Above this many members, distinct keys are counted through a hash set instead of a scan.
const SCAN_LIMIT: usize = 32;

struct JsonSeed<'a>(Json<'a>);

impl<'de> Deserialize<'de> for JsonSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor).map(JsonSeed)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            members.push((key, map.next_value::<&'de RawValue>()?));
        }
        Ok(Json::Object(Fields(members)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Json::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }

    fn visit_borrowed_str<E: de::Error>(self, _: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Fields<'_> {
        match parse(text).unwrap() {
            Json::Object(f) => f,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn duplicates_resolve_as_a_value_map_does() {
        let text = r#"{"a":1,"b":2,"a":3}"#;
        let f = fields(text);
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.value("a").unwrap(), Some(v["a"].clone()));
        // past the scan limit too
        let mut members: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
        members.push("\"k7\":\"last\"".into());
        let text = format!("{{{}}}", members.join(","));
        let f = fields(&text);
        assert_eq!(f.len(), 100);
        assert_eq!(f.value("k7").unwrap(), Some(Value::from("last")));
        // a Map built in member order: the last value, at the first position
        let mut row = serde_json::Map::new();
        for (k, v) in f.iter() {
            row.insert(k.to_string(), value(v).unwrap());
        }
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(Value::Object(row.clone()), parsed);
        assert_eq!(row.keys().nth(7).map(String::as_str), Some("k7"));
    }

    #[test]
    fn kinds_and_errors() {
        assert!(matches!(parse(" null ").unwrap(), Json::Null));
        assert!(matches!(parse("[1,[2]]").unwrap(), Json::Other));
        assert!(matches!(parse("\"s\"").unwrap(), Json::Other));
        for bad in [
            "[1,",
            "{\"a\":}",
            "{} x",
            "{\"a\":\"\u{1}\"}",
            "\"\\ud800\"",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let f = fields(r#"{"s":"a\"b","n":-5,"o":{"x":1}, "z": null}"#);
        assert_eq!(f.str("s").unwrap().as_deref(), Some("a\"b"));
        assert_eq!(f.i64("n").unwrap(), Some(-5));
        assert_eq!(f.str("n").unwrap(), None);
        assert!(is_object(f.get("o").unwrap()) && is_null(f.get("z").unwrap()));
        assert_eq!(object(f.get("o").unwrap()).unwrap().unwrap().len(), 1);
    }
}
