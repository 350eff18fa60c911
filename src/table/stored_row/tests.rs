use std::sync::Arc;

use serde_json::json;

use super::*;

fn row(v: serde_json::Value) -> Row {
    match v {
        serde_json::Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[test]
fn json_is_parsed_on_first_use_into_the_same_row() {
    let text = r#"{"game":"g1","home":"1.50","n":3,"x":{"y":[1,2]}}"#;
    let r = StoredRow::from_json(text.as_bytes()).unwrap();
    assert!(!r.is_parsed());
    assert_eq!(r.json_without_nulls(), Some(text));
    assert_eq!(r.get("home"), Some(&json!("1.50")));
    assert!(r.is_parsed());
    assert_eq!(
        **r.shared(),
        row(json!({"game":"g1","home":"1.50","n":3,"x":{"y":[1,2]}}))
    );
    assert_eq!(r.encode(), text.as_bytes());
}

#[test]
fn what_is_not_one_json_object_is_refused() {
    for bad in [
        &b"[1,2]"[..],
        b"\"s\"",
        b"3",
        b"null",
        b"{\"a\":1",
        b"{\"a\":1} x",
        b"{\"a\":}",
        b"",
        b"{\"a\":\"\xff\"}",
    ] {
        assert!(
            StoredRow::from_json(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        StoredRow::from_json(b"{\"a\":\"\xff\"}").unwrap_err(),
        NotARow::Utf8
    );
    assert_eq!(StoredRow::from_json(b"[]").unwrap_err(), NotARow::Json);
}

#[test]
fn what_passes_the_check_is_exactly_what_parses_into_a_row() {
    let nested = |depth: usize| format!(r#"{{"a":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
    let mut cases: Vec<String> = [
        r#"{"a":1e400}"#,
        r#"{"a":-1e400}"#,
        r#"{"a":1e300,"b":18446744073709551616,"c":-9223372036854775809}"#,
        r#"{"a":"\ud800"}"#,
        r#"{"a":"\ud83d\ude00","b":"\u00e9"}"#,
        r#"{"\ud800":1}"#,
        r#"{"a":"\x"}"#,
        r#"{"a":1,"a":2}"#,
        r#"{"a":[1,{"b":[true,false,null]}],"c":{}}"#,
        r#"{"a":01}"#,
        r#"{"a":1.}"#,
        r#"{"a":tru}"#,
        r#" {"a":1} "#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cases.extend([1, 100, 126, 127, 128, 129, 1_000].map(nested));
    let mut refused = 0;
    for text in &cases {
        let parses = serde_json::from_str::<Row>(text).is_ok();
        assert_eq!(
            StoredRow::from_json(text.as_bytes()).is_ok(),
            parses,
            "{text:.80}"
        );
        refused += usize::from(!parses);
    }
    // the cases do reach both sides of the check
    assert!(
        refused >= 8 && refused < cases.len(),
        "{refused} of {}",
        cases.len()
    );
}

#[test]
fn json_with_a_null_anywhere_is_not_sent_as_it_is() {
    for text in [r#"{"a":null}"#, r#"{"a":{"b":null}}"#, r#"{"nullable":1}"#] {
        let r = StoredRow::from_json(text.as_bytes()).unwrap();
        assert_eq!(r.json_without_nulls(), None, "{text}");
    }
}

#[test]
fn a_row_from_a_change_is_parsed_and_has_no_json() {
    let parsed = Arc::new(row(json!({"a":1})));
    let r = StoredRow::from(parsed.clone());
    assert!(r.is_parsed());
    assert!(Arc::ptr_eq(r.shared(), &parsed));
    assert_eq!(r.json_without_nulls(), None);
    assert_eq!(r.encode(), br#"{"a":1}"#);
}

#[test]
fn rows_compare_by_their_columns_whichever_way_they_are_held() {
    let a = StoredRow::from_json(br#"{"a":1,"b":"x"}"#).unwrap();
    let b = StoredRow::from(Arc::new(row(json!({"a":1,"b":"x"}))));
    let c = StoredRow::from_json(br#"{"a":2,"b":"x"}"#).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(b, c);
    // a clone taken before the parse shares it
    let d = StoredRow::from_json(br#"{"a":1}"#).unwrap();
    let e = d.clone();
    assert!(!e.is_parsed());
    assert_eq!(d.get("a"), Some(&json!(1)));
    assert!(e.is_parsed());
    assert!(Arc::ptr_eq(d.shared(), e.shared()));
}
