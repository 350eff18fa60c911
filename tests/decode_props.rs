//! Property test of the Debezium decoder over hostile input (issue 13): random schema-enabled and
//! schema-less envelopes, unwrapped rows and tombstones with Decimal/VariableScaleDecimal fields of
//! random (often absurd) scales and sizes, random nesting, random bytes and UTF-8 in keys, values,
//! names and ops, then truncated or corrupted. For every input the decoder
//! - never panics;
//! - never allocates more than `64 x input + 2 MiB` at its peak (measured by a counting
//!   allocator: this test is its own binary so the allocator touches nothing else), and its
//!   output is at most `4 x input + DECIMAL_SLACK_BYTES + 1 KiB`;
//! - and every `Ok` satisfies the invariants the table layer relies on (see `check`).
//!
//! Pure: no broker. The case count keeps the run under ~20 s in a debug build
//! (`PROPTEST_CASES` overrides it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use base64::Engine;
use livetable::cdc::decimal::{MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS};
use livetable::cdc::decode::{
    decode, Change, DecodeOutput, DecodeSettings, Decoded, Op, RawRecord, DECIMAL_SLACK_BYTES,
    MAX_DEPTH, MAX_KEY_BYTES, MAX_NAME_BYTES,
};
use livetable::config::KeyColumns;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// A counting allocator: the peak of live bytes allocated by this thread while `measure` runs.

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // try_with: the thread-locals may be gone while a thread is torn down
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            LIVE.with(|l| {
                let now = l.get() + delta;
                l.set(now);
                PEAK.with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak of bytes it held at once.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get).max(0) as usize)
}

// ---------------------------------------------------------------------------------------------
// Generators.

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A scale: mostly real ones, often at or past the bounds, sometimes absurd.
fn arb_scale() -> impl Strategy<Value = i64> {
    let max_frac = i64::from(MAX_FRACTION_DIGITS);
    let max_int = i64::from(MAX_INTEGER_DIGITS);
    prop_oneof![
        4 => -3i64..40,
        1 => Just(max_frac),
        1 => Just(max_frac + 1),
        1 => Just(-max_int),
        1 => Just(-max_int - 1),
        1 => prop_oneof![Just(i64::from(i32::MAX)), Just(i64::from(i32::MIN)), Just(1 << 40), Just(i64::MIN)],
        1 => any::<i64>(),
    ]
}

/// Unscaled bytes: small, empty, or long (past the 61230-byte bound now and then).
fn arb_unscaled() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 1..12),
        1 => Just(Vec::new()),
        1 => proptest::collection::vec(any::<u8>(), 60..200),
        1 => (1usize..3).prop_map(|k| vec![0x7f; 61_229 + k]),
    ]
}

/// A schema `scale` parameter as Kafka Connect writes it (a string), or odd.
fn arb_schema_scale() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => arb_scale().prop_map(|s| json!(s.to_string())),
        1 => arb_scale().prop_map(|s| json!(s)),
        1 => Just(json!("x")),
        1 => Just(json!(null)),
        1 => Just(json!(1.5)),
    ]
}

/// Text: ASCII, any Unicode (control characters included), odd key material, or long.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_]{0,8}",
        2 => any::<String>(),
        1 => prop_oneof![Just("../..".to_string()), Just("a/b".into()), Just("%2F%00".into()), Just("\u{0}".into()), Just(String::new())],
        1 => (1usize..40_000).prop_map(|n| "k".repeat(n)),
    ]
}

/// Nested arrays/objects around a leaf, `depth` levels deep.
fn nested(depth: usize, object: bool) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = if object {
            json!({ "n": v })
        } else {
            json!([v])
        };
    }
    v
}

#[derive(Debug, Clone)]
enum Column {
    Decimal {
        schema_scale: Value,
        unscaled: Vec<u8>,
    },
    Variable {
        scale: i64,
        unscaled: Vec<u8>,
    },
    Nested {
        depth: usize,
        object: bool,
    },
    Text(String),
    Number(f64),
    Int(i64),
    Null,
}

fn arb_column() -> impl Strategy<Value = Column> {
    prop_oneof![
        3 => (arb_schema_scale(), arb_unscaled()).prop_map(|(schema_scale, unscaled)| Column::Decimal { schema_scale, unscaled }),
        3 => (arb_scale(), arb_unscaled()).prop_map(|(scale, unscaled)| Column::Variable { scale, unscaled }),
        1 => (0usize..(MAX_DEPTH + 8), any::<bool>()).prop_map(|(depth, object)| Column::Nested { depth, object }),
        2 => arb_text().prop_map(Column::Text),
        1 => any::<f64>().prop_map(Column::Number),
        1 => any::<i64>().prop_map(Column::Int),
        1 => Just(Column::Null),
    ]
}

impl Column {
    fn value(&self) -> Value {
        match self {
            Column::Decimal { unscaled, .. } => json!(b64(unscaled)),
            Column::Variable { scale, unscaled } => json!({"scale": scale, "value": b64(unscaled)}),
            Column::Nested { depth, object } => nested(*depth, *object),
            Column::Text(s) => json!(s),
            Column::Number(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
            Column::Int(n) => json!(n),
            Column::Null => Value::Null,
        }
    }

    fn schema(&self, name: &str) -> Value {
        match self {
            Column::Decimal { schema_scale, .. } => json!({"type":"bytes","optional":true,
                "name":"org.apache.kafka.connect.data.Decimal","version":1,
                "parameters":{"scale":schema_scale,"connect.decimal.precision":"10"},"field":name}),
            Column::Variable { .. } => json!({"type":"struct","optional":true,
                "name":"io.debezium.data.VariableScaleDecimal","version":1,"field":name,
                "fields":[{"type":"int32","optional":false,"field":"scale"},{"type":"bytes","optional":false,"field":"value"}]}),
            _ => json!({"type":"string","optional":true,"field":name}),
        }
    }
}

#[derive(Debug, Clone)]
enum Shape {
    Envelope,
    Unwrapped,
    Tombstone,
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// The row side of an envelope (`after`, or `before` of a delete) or `__deleted` of the wrong
    /// type.
    WrongType,
    /// Cut the value at this fraction of its length.
    Truncate(f64),
    /// Overwrite a byte (invalid UTF-8, broken syntax).
    Flip(f64, u8),
}

#[derive(Debug, Clone)]
struct Case {
    topic: String,
    shape: Shape,
    schemas: bool,
    op: Value,
    table: Option<String>,
    schema_name: Option<String>,
    id: Value,
    columns: Vec<(String, Column)>,
    /// A `before` for updates: the key columns with these values.
    before_id: Option<Value>,
    key: Option<Vec<u8>>,
    key_columns: &'static str,
    mutation: Mutation,
}

fn arb_op() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop_oneof![Just("r"), Just("c"), Just("u"), Just("d"), Just("t"), Just("m")].prop_map(|s| json!(s)),
        1 => arb_text().prop_map(|s| json!(s)),
        1 => prop_oneof![Just(json!(42)), Just(json!(null)), Just(json!(["c"])), Just(json!({"op":"c"}))],
    ]
}

fn arb_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[a-z0-9]{1,6}".prop_map(|s| json!(s)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => arb_text().prop_map(|s| json!(s)),
        1 => Just(Value::Null),
    ]
}

fn arb_key(id: Value) -> impl Strategy<Value = Option<Vec<u8>>> {
    let field = json!({ "id": id }).to_string().into_bytes();
    let wrapped = json!({"schema":{"type":"struct","fields":[{"field":"id","type":"string"}]},"payload":{"id":id}})
        .to_string()
        .into_bytes();
    prop_oneof![
        4 => Just(Some(field)),
        2 => Just(Some(wrapped)),
        1 => Just(None),
        1 => proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        1 => arb_text().prop_map(|s| Some(s.into_bytes())),
        1 => (MAX_KEY_BYTES - 2..MAX_KEY_BYTES + 8).prop_map(|n| Some(format!("\"{}\"", "k".repeat(n)).into_bytes())),
    ]
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just("db.public.items"), Just("routed.items"), Just("items"), Just("db.heartbeat.x"), Just("")],
        prop_oneof![5 => Just(Shape::Envelope), 3 => Just(Shape::Unwrapped), 1 => Just(Shape::Tombstone)],
        any::<bool>(),
        arb_op(),
        proptest::option::of(prop_oneof![4 => Just("items".to_string()), 1 => arb_text()]),
        proptest::option::of(prop_oneof![Just("public".to_string()), Just("auth".to_string()), arb_text()]),
        arb_id(),
        proptest::collection::vec(("c[0-9]{1,2}", arb_column()), 0..6),
        proptest::option::of(arb_id()),
        prop_oneof![Just(""), Just("*=id"), Just("*=id+c1"), Just("items=c1")],
        prop_oneof![
            6 => Just(Mutation::None),
            1 => Just(Mutation::WrongType),
            1 => (0.0f64..1.0).prop_map(Mutation::Truncate),
            1 => (0.0f64..1.0, any::<u8>()).prop_map(|(at, b)| Mutation::Flip(at, b)),
        ],
    )
        .prop_flat_map(|(topic, shape, schemas, op, table, schema_name, id, columns, before_id, key_columns, mutation)| {
            arb_key(id.clone()).prop_map(move |key| Case {
                topic: topic.to_string(),
                shape: shape.clone(),
                schemas,
                op: op.clone(),
                table: table.clone(),
                schema_name: schema_name.clone(),
                id: id.clone(),
                columns: columns.clone(),
                before_id: before_id.clone(),
                key,
                key_columns,
                mutation: mutation.clone(),
            })
        })
}

impl Case {
    fn row(&self, id: &Value) -> Value {
        let mut row = Map::new();
        row.insert("id".into(), id.clone());
        for (name, c) in &self.columns {
            row.insert(name.clone(), c.value());
        }
        Value::Object(row)
    }

    fn row_schema(&self) -> Value {
        let mut fields = vec![json!({"type":"string","optional":false,"field":"id"})];
        fields.extend(self.columns.iter().map(|(n, c)| c.schema(n)));
        Value::Array(fields)
    }

    /// The record's value bytes (`None` for a tombstone).
    fn value(&self) -> Option<Vec<u8>> {
        let (payload, schema) = match self.shape {
            Shape::Tombstone => return None,
            Shape::Envelope => {
                let letter = self.op.as_str().unwrap_or("");
                let after = self.row(&self.id);
                let before = match (letter, &self.before_id) {
                    ("d", _) => after.clone(),
                    ("u", Some(old)) => self.row(old),
                    _ => Value::Null,
                };
                let after = if letter == "d" { Value::Null } else { after };
                let (before, after) = match (&self.mutation, letter) {
                    (Mutation::WrongType, "d") => (json!("g1"), after),
                    (Mutation::WrongType, _) => (before, json!(["g1"])),
                    _ => (before, after),
                };
                let mut source = json!({"connector":"postgresql","ts_ms":1});
                if let Some(t) = &self.table {
                    source["table"] = json!(t);
                }
                if let Some(s) = &self.schema_name {
                    source["schema"] = json!(s);
                }
                let payload = json!({"before": before, "after": after, "source": source, "op": self.op, "ts_ms": 2});
                let row = json!({"type":"struct","optional":true,"fields": self.row_schema()});
                let mut before_schema = row.clone();
                before_schema["field"] = json!("before");
                let mut after_schema = row;
                after_schema["field"] = json!("after");
                let schema = json!({"type":"struct","name":"x.Envelope","fields":[before_schema, after_schema,
                    {"type":"string","optional":false,"field":"op"}]});
                (payload, schema)
            }
            Shape::Unwrapped => {
                let mut row = self.row(&self.id);
                row["__op"] = self.op.clone();
                row["__deleted"] = json!(if self.op == json!("d") {
                    "true"
                } else {
                    "false"
                });
                if let Some(t) = &self.table {
                    row["__table"] = json!(t);
                }
                if let Some(s) = &self.schema_name {
                    row["__schema"] = json!(s);
                }
                let schema = json!({"type":"struct","name":"x.Value","fields": self.row_schema()});
                (row, schema)
            }
        };
        let v = if self.schemas {
            json!({"schema": schema, "payload": payload})
        } else {
            payload
        };
        let mut bytes = v.to_string().into_bytes();
        match self.mutation {
            Mutation::None | Mutation::WrongType => {}
            Mutation::Truncate(at) => bytes.truncate((bytes.len() as f64 * at) as usize),
            Mutation::Flip(at, b) => {
                if !bytes.is_empty() {
                    let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
                    bytes[i] = b;
                }
            }
        }
        Some(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants.

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn output_size(out: &DecodeOutput) -> usize {
    let names: usize = out.undecodable_decimals.iter().map(String::len).sum();
    names
        + match &out.decoded {
            Decoded::Skip(_) => 0,
            Decoded::Change(c) => {
                c.table.len()
                    + c.key.len()
                    + c.old_key.as_ref().map_or(0, String::len)
                    + c.schema.as_ref().map_or(0, String::len)
                    + c.row
                        .as_ref()
                        .map_or(0, |r| serde_json::to_string(r).unwrap().len())
            }
        }
}

/// What the table layer relies on for every change the decoder returns.
fn check(c: &Change) {
    assert!(
        !c.table.is_empty() && c.table.len() <= MAX_NAME_BYTES,
        "table {:?}",
        c.table
    );
    assert!(
        !c.table.chars().any(char::is_control),
        "table {:?}",
        c.table
    );
    if let Some(s) = &c.schema {
        assert!(!s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.chars().any(char::is_control));
    }
    assert!(c.key.len() <= MAX_KEY_BYTES);
    match c.op {
        Op::Truncate => {
            assert!(c.key.is_empty() && c.row.is_none() && c.old_key.is_none());
        }
        Op::Delete => {
            assert!(!c.key.is_empty() && c.row.is_none() && c.old_key.is_none());
        }
        Op::Read | Op::Create | Op::Update => {
            assert!(!c.key.is_empty(), "no key for {:?}", c.op);
            let row = c.row.as_ref().expect("a row");
            assert!(
                row.keys().all(|k| !k.starts_with("__")),
                "metadata left in {row:?}"
            );
            assert!(depth(&Value::Object(row.clone())) <= MAX_DEPTH);
            assert!(!c.key_from_message_key, "only deletes fall back");
        }
    }
    if let Some(old) = &c.old_key {
        assert!(
            c.op == Op::Update && !old.is_empty() && *old != c.key && old.len() <= MAX_KEY_BYTES
        );
    }
}

fn settings(key_columns: &str) -> DecodeSettings {
    DecodeSettings {
        key_columns: KeyColumns::parse(key_columns).unwrap(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    }
}

fn run(topic: &str, key: Option<&[u8]>, value: Option<&[u8]>, s: &DecodeSettings) {
    let rec = RawRecord {
        topic,
        key,
        value,
        timestamp_ms: Some(1),
    };
    let input = topic.len() + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
    let (out, peak) = measure(|| decode(&rec, s));
    assert!(
        peak <= 64 * input + (2 << 20),
        "peak allocation {peak} bytes for {input} bytes of input"
    );
    match out {
        Ok(out) => {
            let size = output_size(&out);
            assert!(
                size <= 4 * input + DECIMAL_SLACK_BYTES + 1024,
                "output of {size} bytes for {input} bytes of input"
            );
            if let Decoded::Change(c) = &out.decoded {
                check(c);
            }
        }
        Err(e) => {
            assert!(!e.reason().is_empty());
            assert!(
                e.to_string().len() <= 512,
                "error text of {} bytes",
                e.to_string().len()
            );
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn hostile_change_events(case in arb_case()) {
        let value = case.value();
        run(&case.topic, case.key.as_deref(), value.as_deref(), &settings(case.key_columns));
    }

    #[test]
    fn arbitrary_bytes(topic in "[a-z.]{0,12}", key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
                       value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2000))) {
        run(&topic, key.as_deref(), value.as_deref(), &settings("*=id"));
        run(&topic, key.as_deref(), value.as_deref(), &settings(""));
    }
}

/// The generators reach the interesting outcomes: the property above is not vacuous.
#[test]
fn the_allocation_counter_counts() {
    let (v, peak) = measure(|| vec![1u8; 10 << 20]);
    assert_eq!(v.len(), 10 << 20);
    assert!(peak >= 10 << 20, "{peak}");
    let ((), peak) = measure(|| drop(vec![1u8; 1 << 20]));
    assert!((1 << 20..2 << 20).contains(&peak), "{peak}");
}

#[test]
fn the_generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeSet;
    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..500 {
        let case = arb_case().new_tree(&mut runner).unwrap().current();
        let value = case.value();
        let rec = RawRecord {
            topic: &case.topic,
            key: case.key.as_deref(),
            value: value.as_deref(),
            timestamp_ms: None,
        };
        let label = match decode(&rec, &settings(case.key_columns)) {
            Ok(out) => match out.decoded {
                Decoded::Change(c) => format!("ok_{}", c.op.as_str()),
                Decoded::Skip(r) => format!("skip_{}", r.as_str()),
            },
            Err(e) => e.reason().to_string(),
        };
        seen.insert(label);
    }
    for want in [
        "ok_r",
        "ok_c",
        "ok_u",
        "ok_d",
        "ok_t",
        "skip_message",
        "invalid_json",
        "unknown_op",
        "no_key",
        "decimal_out_of_range",
        "too_deep",
        "key_too_long",
        "bad_name",
        "bad_shape",
    ] {
        assert!(seen.contains(want), "never reached {want}: {seen:?}");
    }
}
