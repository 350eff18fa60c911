//! What the decoder needs of a Kafka Connect schema (`schemas.enable`), read lazily: whether it
//! is one (a string `type`), and per field its name, whether it is a `Decimal`, its `scale`
//! parameter and its own nested `fields`, left unparsed until a side (`after`, `before`) is asked
//! for; everything else is skipped.
//!
//! Lenient like `serde_json::Value` lookups: a member of an unexpected type counts as absent (a
//! `fields` that is not an array is no field list), and of duplicate keys the last one counts.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::DecodeError;

const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";

/// A Kafka Connect schema.
#[derive(Debug, Default)]
pub(super) struct Schema<'a> {
    /// `type` is a string: this is a Connect schema (a `{"schema", "payload"}` wrapper).
    pub(super) typed: bool,
    /// The `fields` array, when it is one, unparsed.
    fields: Option<&'a RawValue>,
    /// `fields` read, once asked for (an update asks for `after` and `before`).
    list: OnceCell<Option<FieldList<'a>>>,
}

/// The elements of a `fields` array; `None` for an element that is not an object.
#[derive(Debug, Default)]
pub(super) struct FieldList<'a>(Vec<Option<Field<'a>>>);

/// One element of a `fields` array.
#[derive(Debug, Default)]
pub(super) struct Field<'a> {
    /// `field`, when a string.
    name: Option<Cow<'a, str>>,
    /// `name` is Kafka Connect's Decimal.
    decimal: bool,
    /// `parameters.scale`, when `parameters` is an object that has one.
    scale: Option<Value>,
    /// The field's own `fields` (a struct's), when an array, unparsed.
    nested: Option<&'a RawValue>,
}

impl<'a> Schema<'a> {
    /// Reads `raw` (an object, else no schema).
    pub(super) fn read(raw: &'a RawValue) -> Result<Option<Schema<'a>>, DecodeError> {
        read::<SchemaVisitor>(raw)
    }

    /// The field list of the struct; with `side`, of the first field named so (`after`/`before`).
    pub(super) fn struct_fields(
        &self,
        side: Option<&str>,
    ) -> Result<Option<FieldList<'a>>, DecodeError> {
        let Some(fields) = self.fields else {
            return Ok(None);
        };
        let Some(side) = side else {
            return read::<FieldsVisitor>(fields);
        };
        if self.list.get().is_none() {
            let _ = self.list.set(read::<FieldsVisitor>(fields)?);
        }
        match self
            .list
            .get()
            .and_then(Option::as_ref)
            .and_then(|list| list.find(side))
            .and_then(|f| f.nested)
        {
            Some(nested) => read::<FieldsVisitor>(nested),
            None => Ok(None),
        }
    }
}

fn read<'a, E: Expected<'a>>(raw: &'a RawValue) -> Result<E::Out, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Lenient::<E>::deserialize(&mut de)
        .map(|l| l.0)
        .map_err(|e| DecodeError::InvalidJson(e.to_string()))
}

impl<'a> FieldList<'a> {
    /// The first field named `name`.
    pub(super) fn find(&self, name: &str) -> Option<&Field<'a>> {
        self.0
            .iter()
            .flatten()
            .find(|f| f.name.as_deref() == Some(name))
    }

    /// A finder of fields by name: the list itself when short, else an index of it (a record
    /// with many columns looked up one by one must not cost columns x fields).
    pub(super) fn finder(&self) -> FieldFinder<'_, 'a> {
        if self.0.len() <= 16 {
            return FieldFinder::List(self);
        }
        let mut index = std::collections::HashMap::with_capacity(self.0.len());
        for f in self.0.iter().flatten() {
            if let Some(name) = f.name.as_deref() {
                // the first field of a name, as `find` gives
                index.entry(name).or_insert(f);
            }
        }
        FieldFinder::Index(index)
    }
}

/// Fields by name ([`FieldList::finder`]).
pub(super) enum FieldFinder<'l, 'a> {
    List(&'l FieldList<'a>),
    Index(std::collections::HashMap<&'l str, &'l Field<'a>>),
}

impl<'a> FieldFinder<'_, 'a> {
    /// The first field named `name`.
    pub(super) fn find(&self, name: &str) -> Option<&Field<'a>> {
        match self {
            FieldFinder::List(l) => l.find(name),
            FieldFinder::Index(i) => i.get(name).copied(),
        }
    }
}

impl Field<'_> {
    /// For a Decimal field, its scale (a string, as Kafka Connect writes it, or a number):
    /// `Some(None)` when it has none that reads as an integer.
    pub(super) fn decimal_scale(&self) -> Option<Option<i64>> {
        if !self.decimal {
            return None;
        }
        Some(self.scale.as_ref().and_then(|s| {
            s.as_str()
                .and_then(|t| t.parse().ok())
                .or_else(|| s.as_i64())
        }))
    }
}

/// A reader of the expected kind of value; any other kind gives `Out::default()` (skipped).
trait Expected<'de> {
    type Out: Default;
    fn map<A: MapAccess<'de>>(map: A) -> Result<Self::Out, A::Error>;
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self::Out, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::Out::default())
    }
    fn string(_s: &str) -> Self::Out {
        Self::Out::default()
    }
    fn borrowed_string(s: &'de str) -> Self::Out {
        Self::string(s)
    }
}

/// Deserializes any JSON value through `E`, never failing on its kind.
struct Lenient<'de, E: Expected<'de>>(E::Out);

impl<'de, E: Expected<'de>> Deserialize<'de> for Lenient<'de, E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor::<E>(PhantomData))
            .map(Lenient)
    }
}

struct LenientVisitor<E>(PhantomData<E>);

impl<'de, E: Expected<'de>> Visitor<'de> for LenientVisitor<E> {
    type Value = E::Out;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<E::Out, A::Error> {
        E::map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<E::Out, A::Error> {
        E::seq(seq)
    }
    fn visit_str<Er: de::Error>(self, s: &str) -> Result<E::Out, Er> {
        Ok(E::string(s))
    }
    fn visit_borrowed_str<Er: de::Error>(self, s: &'de str) -> Result<E::Out, Er> {
        Ok(E::borrowed_string(s))
    }
    fn visit_unit<Er: de::Error>(self) -> Result<E::Out, Er> {
        Ok(E::Out::default())
    }
    fn visit_bool<Er: de::Error>(self, _: bool) -> Result<E::Out, Er> {
        Ok(E::Out::default())
    }
    fn visit_i64<Er: de::Error>(self, _: i64) -> Result<E::Out, Er> {
        Ok(E::Out::default())
    }
    fn visit_u64<Er: de::Error>(self, _: u64) -> Result<E::Out, Er> {
        Ok(E::Out::default())
    }
    fn visit_f64<Er: de::Error>(self, _: f64) -> Result<E::Out, Er> {
        Ok(E::Out::default())
    }
}

/// Skips a map's members.
fn drain<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A `fields` member: kept unparsed when it is an array.
fn array_or_none<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<&'de RawValue>, A::Error> {
    let raw: &'de RawValue = map.next_value()?;
    Ok(raw.get().starts_with('[').then_some(raw))
}

struct SchemaVisitor;

impl<'de> Expected<'de> for SchemaVisitor {
    type Out = Option<Schema<'de>>;
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
        let mut schema = Schema::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Type => schema.typed = map.next_value::<Lenient<IsString>>()?.0,
                Key::Fields => schema.fields = array_or_none(&mut map)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(schema))
    }
}

struct FieldsVisitor;

impl<'de> Expected<'de> for FieldsVisitor {
    type Out = Option<FieldList<'de>>;
    fn map<A: MapAccess<'de>>(map: A) -> Result<Self::Out, A::Error> {
        drain(map)?;
        Ok(None)
    }
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self::Out, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(8).min(64));
        while let Some(field) = seq.next_element::<Lenient<FieldVisitor>>()? {
            out.push(field.0);
        }
        Ok(Some(FieldList(out)))
    }
}

struct FieldVisitor;

impl<'de> Expected<'de> for FieldVisitor {
    type Out = Option<Field<'de>>;
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
        let mut field = Field::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Field => field.name = map.next_value::<Lenient<StringVisitor>>()?.0,
                Key::Name => {
                    field.decimal =
                        map.next_value::<Lenient<StringVisitor>>()?.0.as_deref() == Some(DECIMAL)
                }
                Key::Parameters => field.scale = map.next_value::<Lenient<ScaleVisitor>>()?.0,
                Key::Fields => field.nested = array_or_none(&mut map)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(field))
    }
}

/// `parameters`: its `scale`, as a `Value`.
struct ScaleVisitor;

impl<'de> Expected<'de> for ScaleVisitor {
    type Out = Option<Value>;
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
        let mut scale = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Scale => scale = Some(map.next_value::<Value>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(scale)
    }
}

struct StringVisitor;

impl<'de> Expected<'de> for StringVisitor {
    type Out = Option<Cow<'de, str>>;
    fn map<A: MapAccess<'de>>(map: A) -> Result<Self::Out, A::Error> {
        drain(map)?;
        Ok(None)
    }
    fn string(s: &str) -> Self::Out {
        Some(Cow::Owned(s.to_string()))
    }
    fn borrowed_string(s: &'de str) -> Self::Out {
        Some(Cow::Borrowed(s))
    }
}

struct IsString;

impl<'de> Expected<'de> for IsString {
    type Out = bool;
    fn map<A: MapAccess<'de>>(map: A) -> Result<bool, A::Error> {
        drain(map)?;
        Ok(false)
    }
    fn string(_: &str) -> bool {
        true
    }
}

/// The member names the schema readers look at; the rest are skipped.
enum Key {
    Type,
    Fields,
    Field,
    Name,
    Parameters,
    Scale,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "type" => Key::Type,
                    "fields" => Key::Fields,
                    "field" => Key::Field,
                    "name" => Key::Name,
                    "parameters" => Key::Parameters,
                    "scale" => Key::Scale,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Option<Schema<'_>> {
        let raw: &RawValue = serde_json::from_str(text).unwrap();
        Schema::read(raw).unwrap()
    }

    #[test]
    fn reads_what_the_decoder_needs() {
        let s = read(
            r#"{"type":"struct","fields":[{"field":"before","fields":[{"field":"p","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"3"}}]},{"field":"after","fields":[{"field":"p","type":"bytes"}]}, 5]}"#,
        )
        .unwrap();
        assert!(s.typed);
        let before = s.struct_fields(Some("before")).unwrap().unwrap();
        assert_eq!(before.find("p").unwrap().decimal_scale(), Some(Some(3)));
        let after = s.struct_fields(Some("after")).unwrap().unwrap();
        assert_eq!(after.find("p").unwrap().decimal_scale(), None);
        assert!(s.struct_fields(Some("source")).unwrap().is_none());
        assert_eq!(s.struct_fields(None).unwrap().unwrap().0.len(), 3);
    }

    #[test]
    fn unexpected_kinds_are_absent_and_the_last_duplicate_counts() {
        let s = read(r#"{"type":1,"fields":{"a":1}}"#).unwrap();
        assert!(!s.typed && s.struct_fields(None).unwrap().is_none());
        let s = read(r#"{"type":"struct","type":[1],"fields":[[1],"x",{"field":1},{"field":"a","field":"b"}]}"#).unwrap();
        assert!(!s.typed);
        let fields = s.struct_fields(None).unwrap().unwrap();
        assert!(fields.find("a").is_none() && fields.find("b").is_some());
        assert!(read("[1]").is_none() && read("null").is_none() && read("\"s\"").is_none());
        let s = read(r#"{"fields":[{"field":"p","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":7}},{"field":"q","name":"org.apache.kafka.connect.data.Decimal","parameters":[1]}]}"#).unwrap();
        let f = s.struct_fields(None).unwrap().unwrap();
        assert_eq!(f.find("p").unwrap().decimal_scale(), Some(Some(7)));
        assert_eq!(f.find("q").unwrap().decimal_scale(), Some(None));
    }
}
