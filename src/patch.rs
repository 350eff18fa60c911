//! RFC 7386 JSON Merge Patch: apply, compose, and the diff of two rows (pure). Used by the table
//! layer (the patch of each change) and the fan-out (composing patches for slow clients).
//!
//! The state of a table is `{key: row}`; every diff sent to clients is a merge patch against it,
//! so a client keeps its copy with `state = merge(state, patch)`. Patches compose:
//! `merge(merge(s, a), b) == merge(s, compose(a, b))`, which is what lets a slow client receive
//! one patch for many changes.

use serde_json::{Map, Value};

/// Applies `patch` to `target` in place (RFC 7386).
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Composes `next` onto `first` so that applying the result equals applying both in order.
pub fn compose(first: &mut Value, next: &Value) {
    match (first, next) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    // a nested object patch onto an existing object patch: compose deeper
                    Some(existing @ Value::Object(_)) if v.is_object() => compose(existing, v),
                    // onto a replacement value (or null = delete): the result is that value patched
                    Some(existing) if v.is_object() => {
                        let mut base = if existing.is_null() {
                            Value::Object(Map::new())
                        } else {
                            existing.clone()
                        };
                        merge(&mut base, v);
                        *existing = strip_nulls(base);
                    }
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (first, next) => *first = next.clone(),
    }
}

/// Adds the patch of one row (`value` for `key`) to a table-level patch, composing with what the
/// patch already holds for that key.
pub fn compose_row(patch: &mut Map<String, Value>, key: &str, value: Value) {
    match patch.get_mut(key) {
        Some(existing) => compose(existing, &value),
        None => {
            patch.insert(key.to_string(), value);
        }
    }
}

/// A merged value never contains nulls; when a patch replaces a value by an object, nulls inside
/// it would mean "delete" to the client, so they are removed.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// The patch that turns row `old` into row `new` (`None` = absent): a new row in full, only the
/// changed columns of an updated row (a column that became NULL or disappeared is `null`), `null`
/// for a deleted row.
pub fn row_diff(old: Option<&Map<String, Value>>, new: Option<&Map<String, Value>>) -> Value {
    match (old, new) {
        (_, None) => Value::Null,
        (None, Some(new)) => Value::Object(
            new.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        (Some(old), Some(new)) => {
            let mut d = Map::new();
            for (k, v) in new {
                if v.is_null() {
                    if old.get(k).is_some_and(|o| !o.is_null()) {
                        d.insert(k.clone(), Value::Null);
                    }
                } else if old.get(k) != Some(v) {
                    d.insert(k.clone(), v.clone());
                }
            }
            for k in old.keys() {
                if !new.contains_key(k) {
                    d.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(d)
        }
    }
}

#[cfg(test)]
mod tests {
    /// A row as clients see it: NULL columns are absent (merge patches cannot carry a null value).
    fn client_row(row: &Map<String, Value>) -> Value {
        Value::Object(
            row.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn rfc7386_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut t, p, want) in cases {
            merge(&mut t, &p);
            assert_eq!(t, want);
        }
    }

    #[test]
    fn row_diffs() {
        let old = json!({"id": "g1", "odd1": "1.5", "odd2": "2.0", "x": 1});
        let new = json!({"id": "g1", "odd1": "1.75", "odd2": null, "y": 2});
        let d = row_diff(old.as_object(), new.as_object());
        assert_eq!(d, json!({"odd1": "1.75", "odd2": null, "y": 2, "x": null}));
        assert_eq!(
            row_diff(None, new.as_object()),
            json!({"id": "g1", "odd1": "1.75", "y": 2})
        );
        assert_eq!(row_diff(old.as_object(), None), Value::Null);
        let mut state = json!({"g1": client_row(old.as_object().unwrap())});
        merge(&mut state, &json!({"g1": d}));
        assert_eq!(state, json!({"g1": client_row(new.as_object().unwrap())}));
    }

    fn arb_row() -> impl Strategy<Value = Option<Map<String, Value>>> {
        proptest::option::of(proptest::collection::btree_map(
            "[a-d]",
            prop_oneof![
                Just(Value::Null),
                (0i64..4).prop_map(|n| json!(n)),
                Just(json!({"n": 1, "m": null}))
            ],
            0..4,
        ))
        .prop_map(|o| o.map(|m| m.into_iter().collect()))
    }

    proptest! {
        /// Composed patches applied once == the patches applied one by one, from any state.
        #[test]
        fn composition_equals_sequential_application(rows in proptest::collection::vec((0usize..3, arb_row()), 1..12)) {
            let keys = ["k0", "k1", "k2"];
            let mut truth: Vec<Option<Map<String, Value>>> = vec![None, None, None];
            let mut state = json!({});
            let mut composed = json!({});
            let start = state.clone();
            for (k, row) in rows {
                let patch = json!({keys[k]: row_diff(truth[k].as_ref(), row.as_ref())});
                merge(&mut state, &patch);
                compose(&mut composed, &patch);
                truth[k] = row;
            }
            let mut via_composed = start;
            merge(&mut via_composed, &composed);
            prop_assert_eq!(&via_composed, &state);
            let expected: Map<String, Value> = truth.iter().enumerate()
                .filter_map(|(i, r)| r.as_ref().map(|r| (keys[i].to_string(), client_row(r)))).collect();
            prop_assert_eq!(state, strip_nulls(Value::Object(expected)));
        }
    }
}
