//! Micro-benchmark of the Debezium decoder (issue 14: decoding was 13 % of ingest CPU). Ignored by
//! default; run it in release on one core:
//!
//! ```sh
//! cargo test --release --test decode_bench -- --ignored --nocapture   # builds
//! taskset -c 1 target/release/deps/decode_bench-* --ignored --nocapture
//! ```
//!
//! It decodes the real captures of `tests/fixtures/debezium/` (tombstones left out) over and over:
//! full envelopes without and with schemas, ExtractNewRecordState rows, and the mix of the three;
//! each kind 3 times, printing the median and each round in records per second of the thread's
//! CPU time (steady on a machine shared with other work) and of wall time.

mod common;

use std::hint::black_box;
use std::time::Instant;

use livetable::cdc::decode::{decode, DecodeSettings, RawRecord};
use livetable::config::KeyColumns;

const RECORDS: usize = 200_000;

fn records(files: &[&str]) -> Vec<(String, Option<String>, String)> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(common::fixtures_dir().join(f)).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(value) = v["value"].as_str() {
                out.push((
                    v["topic"].as_str().unwrap().to_string(),
                    v["key"].as_str().map(String::from),
                    value.to_string(),
                ));
            }
        }
    }
    out
}

/// This thread's CPU time, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Records per CPU second and per wall second of `RECORDS` decodes cycling through `set`.
fn round(set: &[(String, Option<String>, String)], settings: &DecodeSettings) -> (f64, f64) {
    let started = Instant::now();
    let cpu = thread_cpu_secs();
    for i in 0..RECORDS {
        let (topic, key, value) = &set[i % set.len()];
        let rec = RawRecord {
            topic,
            key: key.as_deref().map(str::as_bytes),
            value: Some(value.as_bytes()),
            timestamp_ms: Some(1),
        };
        black_box(decode(black_box(&rec), settings).unwrap());
    }
    let n = RECORDS as f64;
    (
        n / (thread_cpu_secs() - cpu),
        n / started.elapsed().as_secs_f64(),
    )
}

#[test]
#[ignore = "a benchmark: run in release, see the module comment"]
fn decode_throughput() {
    let settings = DecodeSettings {
        key_columns: KeyColumns::default(),
        max_record_bytes: 1 << 20,
        upsert: Default::default(),
    };
    let kinds: [(&str, &[&str]); 4] = [
        (
            "envelope, no schema",
            &["pg_a_envelope_noschema.jsonl", "pg_f_decimal_string.jsonl"],
        ),
        ("envelope, schema", &["pg_b_envelope_schema.jsonl"]),
        (
            "unwrapped",
            &[
                "pg_c_unwrap_rewrite.jsonl",
                "mysql_on_mariadb_seedlike_unwrap_route.jsonl",
            ],
        ),
        (
            "mix",
            &[
                "pg_a_envelope_noschema.jsonl",
                "pg_b_envelope_schema.jsonl",
                "pg_c_unwrap_rewrite.jsonl",
            ],
        ),
    ];
    for (name, files) in kinds {
        let set = records(files);
        let bytes: usize = set.iter().map(|r| r.2.len()).sum::<usize>() / set.len();
        let _ = round(&set, &settings); // warm-up
        let rounds: Vec<(f64, f64)> = (0..3).map(|_| round(&set, &settings)).collect();
        let median = |pick: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let each: Vec<String> = rounds
            .iter()
            .map(|(cpu, wall)| format!("{cpu:.0}/{wall:.0}"))
            .collect();
        println!(
            "decode {name:<20} ({bytes:>5} B/record): median {:>8.0} records/CPU-s, {:>8.0} records/s wall  (rounds cpu/wall: {})",
            median(|r| r.0),
            median(|r| r.1),
            each.join(", ")
        );
    }
}
