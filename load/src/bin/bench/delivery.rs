//! The broker's own delivery time: a plain consumer of the input topic, in the bench process (on
//! the tools' core), timing each record as ws-swarm times a patch: receipt (µs) - `source.ts_ms`.
//! It uses livetable's consumer settings for fetching (`fetch.wait.max.ms`, the same as
//! livetable's in the run, and `fetch.queue.backoff.ms` = 1), so the difference to the clients' figure is livetable's own
//! pipeline: decode, apply, fan-out, WebSocket, client parse.

use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::{json, Value};

pub struct Delivery {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<anyhow::Result<Value>>,
}

/// Starts consuming `topic` from the beginning under a fresh group; records stamped before
/// `from_ms` (the prefill) are read but not timed. Waits (at most 30 s) until the group gave it
/// the partitions, so records produced after this returns are timed.
pub fn start(
    brokers: &str,
    topic: &str,
    from_ms: i64,
    fetch_wait_ms: u32,
) -> anyhow::Result<Delivery> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-delivery-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.queue.backoff.ms", "1")
        .create()?;
    consumer.subscribe(&[topic])?;
    let until = Instant::now() + Duration::from_secs(30);
    while consumer.assignment()?.count() == 0 {
        anyhow::ensure!(
            Instant::now() < until,
            "delivery probe: no assignment in 30 s"
        );
        let _ = consumer.poll(Duration::from_millis(100));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        // the worst delivery of each second of the run (ms), to tell a start-up stall from a
        // broker that slows down as its log grows
        let began = Instant::now();
        let mut worst: Vec<f64> = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let now = now_us();
            let Some(ts) = m.payload().and_then(source_ts_ms) else {
                continue;
            };
            if ts >= from_ms {
                let us = (now - ts * 1000).max(0);
                let _ = h.record(us as u64);
                let sec = began.elapsed().as_secs() as usize;
                if sec < 3_600 {
                    worst.resize(worst.len().max(sec + 1), 0.0);
                    worst[sec] = worst[sec].max(us as f64 / 1000.0);
                }
            }
        }
        if h.is_empty() {
            return Ok(Value::Null);
        }
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        Ok(
            json!({"p50": q(0.5), "p99": q(0.99), "max": h.max() as f64 / 1000.0, "count": h.len(), "worst_by_second_ms": worst}),
        )
    });
    Ok(Delivery { stop, thread })
}

impl Delivery {
    /// Stops the consumer; the percentiles in ms (`p50`, `p99`, `max`, `count`), or null.
    pub fn finish(self) -> anyhow::Result<Value> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("delivery probe panicked"))?
    }
}

/// `source.ts_ms` of a Debezium envelope (with or without the schema wrapper).
fn source_ts_ms(payload: &[u8]) -> Option<i64> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let env = if v.get("payload").is_some() {
        &v["payload"]
    } else {
        &v
    };
    env["source"]["ts_ms"].as_i64()
}

pub fn now_ms() -> i64 {
    now_us() / 1000
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
