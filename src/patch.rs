//! RFC 7386 JSON Merge Patch: apply, compose, and the diff of two rows (pure). Used by the table
//! layer (the patch of each change) and the fan-out (composing patches for slow clients).
//!
//! The state of a table is `{key: row}`; every diff sent to clients is a merge patch against it,
//! so a client keeps its copy with `state = merge(state, patch)`. A slow client gets one patch for
//! many changes: the diff between the row it holds and the row it should hold.
//!
//! Limits of merge patches, and how livetable lives with them: a `null` means "remove", so NULL
//! columns are absent on the wire, and so are `null` values inside object columns; an object
//! column is diffed recursively (a key removed inside it arrives as `null`), never sent as a new
//! object that the client would merge into the old one.

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

/// The patch that turns row `old` into row `new` (`None` = absent): a new row in full, only the
/// changed columns of an updated row (a column that became NULL or disappeared is `null`; an
/// object column that changed is diffed recursively), `null` for a deleted row.
pub fn row_diff(old: Option<&Map<String, Value>>, new: Option<&Map<String, Value>>) -> Value {
    match (old, new) {
        (_, None) => Value::Null,
        (None, Some(new)) => Value::Object(without_nulls(new)),
        (Some(old), Some(new)) => Value::Object(map_diff(old, new)),
    }
}

fn map_diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut d = Map::new();
    for (k, v) in new {
        let before = old.get(k).filter(|o| !o.is_null());
        match (before, v) {
            (None, Value::Null) => {}
            (Some(_), Value::Null) => {
                d.insert(k.clone(), Value::Null);
            }
            (Some(Value::Object(a)), Value::Object(b)) => {
                let inner = map_diff(a, b);
                if !inner.is_empty() {
                    d.insert(k.clone(), Value::Object(inner));
                }
            }
            (Some(o), v) if o == v => {}
            (_, v) => {
                d.insert(k.clone(), strip_nulls(v.clone()));
            }
        }
    }
    for (k, o) in old {
        if !new.contains_key(k) && !o.is_null() {
            d.insert(k.clone(), Value::Null);
        }
    }
    d
}

fn without_nulls(row: &Map<String, Value>) -> Map<String, Value> {
    row.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), strip_nulls(v.clone())))
        .collect()
}

/// A value as a merge patch carries it: `null`s inside objects mean "remove", so they are dropped.
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

#[cfg(test)]
mod tests {
    /// A row as clients see it: NULL columns (and nulls inside objects) are absent.
    fn client_row(row: &Map<String, Value>) -> Value {
        super::strip_nulls(Value::Object(row.clone()))
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

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            (0i64..4).prop_map(|n| json!(n)),
            Just(json!({"n": 1, "m": null})),
            Just(json!({"n": 2, "o": {"p": 1}})),
            Just(json!({"o": {"q": 2}})),
            Just(json!([1, {"a": null}])),
        ]
    }

    fn arb_row() -> impl Strategy<Value = Option<Map<String, Value>>> {
        proptest::option::of(proptest::collection::btree_map("[a-d]", arb_value(), 0..4))
            .prop_map(|o| o.map(|m| m.into_iter().collect()))
    }

    proptest! {
        /// From any state, the diffs of a sequence of row states applied one by one, and the one
        /// diff from the first to the last state, both give the last state as clients see it.
        #[test]
        fn diffs_take_any_state_to_any_state(steps in proptest::collection::vec((0usize..3, arb_row()), 1..12), start in proptest::collection::vec(arb_row(), 3)) {
            let keys = ["k0", "k1", "k2"];
            let mut truth = start.clone();
            let client = |rows: &[Option<Map<String, Value>>]| -> Value {
                Value::Object(rows.iter().enumerate()
                    .filter_map(|(i, r)| r.as_ref().map(|r| (keys[i].to_string(), client_row(r)))).collect())
            };
            let mut state = client(&start);
            for (k, row) in steps {
                let patch = json!({keys[k]: row_diff(truth[k].as_ref(), row.as_ref())});
                merge(&mut state, &patch);
                truth[k] = row;
            }
            prop_assert_eq!(&state, &client(&truth));
            let mut once = client(&start);
            for k in 0..3 {
                if start[k].is_some() || truth[k].is_some() {
                    merge(&mut once, &json!({keys[k]: row_diff(start[k].as_ref(), truth[k].as_ref())}));
                }
            }
            prop_assert_eq!(once, client(&truth));
        }
    }

    #[test]
    fn object_columns_are_diffed_not_merged() {
        let old = json!({"id": 1, "meta": {"a": 1, "b": 2}});
        let new = json!({"id": 1, "meta": {"a": 1, "c": 3}});
        let d = row_diff(old.as_object(), new.as_object());
        assert_eq!(d, json!({"meta": {"b": null, "c": 3}}));
        let mut state = old.clone();
        merge(&mut state, &d);
        assert_eq!(
            state, new,
            "a key removed inside an object column is removed on the client"
        );
    }
}
