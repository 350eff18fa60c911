//! Reading livetable from outside: its API, readiness, metrics, and raw snapshot timings.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

/// One blocking client for every probe (each client owns a runtime thread and a connection pool:
/// building one per poll was needless work on the tools' core).
pub fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|_| reqwest::blocking::Client::new())
    })
}

/// `seq` and `rows` of a table from `GET /api/tables` (None before it exists).
pub fn table_seq(base: &str, table: &str) -> Option<(u64, u64)> {
    let v: Value = client()
        .get(format!("{base}/api/tables"))
        .send()
        .ok()?
        .json()
        .ok()?;
    let t = v["tables"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == table)?;
    Some((t["seq"].as_u64()?, t["rows"].as_u64()?))
}

/// Per key, the `updated_at` column of every row of `table` from `GET /api/tables/{table}`, and
/// the table's `seq` then.
pub fn table_stamps(
    base: &str,
    table: &str,
) -> Option<(u64, std::collections::HashMap<String, String>)> {
    let v: Value = client()
        .get(format!("{base}/api/tables/{table}"))
        .send()
        .ok()?
        .json()
        .ok()?;
    let rows = v["rows"]
        .as_object()?
        .iter()
        .filter_map(|(k, r)| Some((k.clone(), r["updated_at"].as_str()?.to_string())))
        .collect();
    Some((v["seq"].as_u64()?, rows))
}

pub fn ready(base: &str) -> bool {
    client()
        .get(format!("{base}/readyz"))
        .send()
        .map(|r| r.status().as_u16() == 200)
        .unwrap_or(false)
}

/// Polls until the table reaches `seq`, or no progress for `stall`; returns
/// (time of the first seq > 0, time of the last progress, seq then) from `t0`.
pub fn until_seq(
    base: &str,
    table: &str,
    seq: u64,
    stall: Duration,
    t0: Instant,
) -> (f64, f64, u64) {
    let (mut first, mut last, mut cur) = (None, t0, 0);
    loop {
        if let Some((s, _)) = table_seq(base, table) {
            if s > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if s != cur {
                cur = s;
                last = Instant::now();
            }
            if s >= seq {
                break;
            }
        }
        if last.elapsed() > stall && (first.is_some() || t0.elapsed() > stall * 3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = first.map_or(f64::NAN, |f| (f - t0).as_secs_f64());
    (f, (last - t0).as_secs_f64(), cur)
}

/// Seconds until `/readyz` answers 200 (polled every 10 ms), at most `limit`.
pub fn time_to_ready(base: &str, t0: Instant, limit: Duration) -> anyhow::Result<f64> {
    while !ready(base) {
        anyhow::ensure!(t0.elapsed() < limit, "not ready within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Publishes to `topic` over HTTP (`POST /api/topics/{topic}`, a new `Idempotency-Key` each try)
/// until a publish is acknowledged: a topic livetable has just created answers `unavailable`
/// until its metadata arrives. Returns the ack.
pub fn until_publishable(base: &str, topic: &str, limit: Duration) -> anyhow::Result<Value> {
    let until = Instant::now() + limit;
    let mut i = 0u64;
    loop {
        i += 1;
        let r = client()
            .post(format!("{base}/api/topics/{topic}"))
            .header("idempotency-key", format!("bench-probe-{i}"))
            .json(&serde_json::json!({"key": "probe", "value": {"probe": i}}))
            .send()
            .and_then(|r| r.json::<Value>());
        let last = match r {
            Ok(v) if v["type"] == "ack" => return Ok(v),
            Ok(v) => v,
            Err(e) => Value::String(e.to_string()),
        };
        anyhow::ensure!(
            Instant::now() < until,
            "{topic} not writable after {limit:?}: last answer {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The metrics text.
pub fn metrics(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

/// Sum of a counter or gauge over all its label sets.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of a counter or gauge over the label sets that contain `label` (e.g. `result="hit"`).
pub fn metric_where(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') && r.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Cumulative buckets (le, count) of a histogram, summed over label sets.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some(le) = l.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let n: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += n,
            None => out.push((le, n)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket holding quantile q of the observations between two scrapes.
pub fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, n - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// One raw SSE request: (first body byte, end of the snapshot) in ms. The snapshot is the first
/// event, or several (a big one comes in frames); only its last frame carries an `id:` line.
pub fn sse_snapshot_timing(base: &str, table: &str) -> anyhow::Result<(f64, f64)> {
    let addr = base.trim_start_matches("http://");
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET /sse?table={table} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 1 << 16];
    let mut seen: Vec<u8> = Vec::new();
    let mut first_body = None;
    loop {
        let n = s.read(&mut buf)?;
        anyhow::ensure!(n > 0, "connection closed before the snapshot ended");
        seen.extend_from_slice(&buf[..n]);
        let Some(h) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let body = &seen[h + 4..];
        if first_body.is_none() && !body.is_empty() {
            first_body = Some(t0.elapsed());
        }
        // the snapshot's last frame carries the id; search the newest bytes plus a small overlap
        let from = body.len().saturating_sub(n + 8);
        if body[from..].windows(5).any(|w| w == b"\nid: ") {
            let first = first_body.context("no body")?;
            return Ok((
                first.as_secs_f64() * 1000.0,
                t0.elapsed().as_secs_f64() * 1000.0,
            ));
        }
    }
}
