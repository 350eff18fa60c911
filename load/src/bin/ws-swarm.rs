//! ws-swarm: N live WebSocket clients in one process. Each keeps its copy of the table by applying
//! the merge patches, and records the time to its snapshot and the freshness of every patch
//! (receipt time - `ts_ms`) in HDR histograms. With `--verify`, each client's final state is
//! compared with `GET /api/tables/{table}`. Progress on stderr, a JSON summary on stdout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use livetable::fanout::patch::merge;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ws-swarm",
    about = "Many livetable WebSocket clients, with freshness histograms"
)]
struct Args {
    /// livetable base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base: String,
    #[arg(long, default_value = "game_odds")]
    table: String,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Connections opened per second (0 = all at once).
    #[arg(long, default_value_t = 0)]
    ramp_per_sec: u64,
    /// How long each client listens after connecting.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Subscribe to this many keys (g0..) instead of the whole table.
    #[arg(long)]
    keys: Option<usize>,
    /// At the end, compare every client's state with the HTTP API.
    #[arg(long)]
    verify: bool,
}

#[derive(Default)]
struct Totals {
    connected: u64,
    errors: u64,
    messages: u64,
    row_updates: u64,
    mismatches: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn api_state(base: &str, table: &str) -> anyhow::Result<(Value, u64)> {
    let body: Value = reqwest::get(format!("{base}/api/tables/{table}"))
        .await?
        .json()
        .await?;
    let mut rows = serde_json::Map::new();
    for (k, r) in body["rows"].as_object().cloned().unwrap_or_default() {
        let r: serde_json::Map<String, Value> = r
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .collect();
        rows.insert(k, Value::Object(r));
    }
    Ok((Value::Object(rows), body["seq"].as_u64().unwrap_or(0)))
}

async fn client(
    a: Arc<Args>,
    totals: Arc<Mutex<Totals>>,
    fresh: Arc<Mutex<Histogram<u64>>>,
    snap: Arc<Mutex<Histogram<u64>>>,
) {
    let mut url = format!("{}/ws?table={}", a.base.replacen("http", "ws", 1), a.table);
    if let Some(k) = a.keys {
        url.push_str("&keys=");
        url.push_str(
            &(0..k)
                .map(|i| format!("g{i}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    let started = Instant::now();
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    else {
        totals.lock().map(|mut t| t.errors += 1).ok();
        return;
    };
    let mut local_fresh = hist();
    let (mut state, mut seq, mut msgs, mut rows) = (Value::Null, 0u64, 0u64, 0u64);
    let until = started + Duration::from_secs(a.duration_secs);
    let mut apply = |m: Value, state: &mut Value, seq: &mut u64| {
        match m["type"].as_str() {
            Some("snapshot") => *state = m["rows"].clone(),
            Some("patch") => {
                let n = m["patch"].as_object().map_or(0, |p| p.len()) as u64;
                rows += n;
                if let Some(ts) = m["ts_ms"].as_i64() {
                    let _ = local_fresh.record((now_ms() - ts).max(0) as u64 * 1000);
                }
                merge(state, &m["patch"]);
            }
            _ => {}
        }
        *seq = m["seq"].as_u64().unwrap_or(*seq);
    };
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until.into(), ws.next()).await {
        if let Message::Text(t) = msg {
            let Ok(m) = serde_json::from_str::<Value>(t.as_str()) else {
                continue;
            };
            if msgs == 0 {
                snap.lock()
                    .map(|mut h| h.record(started.elapsed().as_micros().max(1) as u64))
                    .ok();
                totals.lock().map(|mut t| t.connected += 1).ok();
            }
            msgs += 1;
            apply(m, &mut state, &mut seq);
        }
    }
    let mut mismatch = false;
    if a.verify && a.keys.is_none() {
        if let Ok((api, api_seq)) = api_state(&a.base, &a.table).await {
            let until = Instant::now() + Duration::from_secs(10);
            while seq < api_seq && Instant::now() < until {
                match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if let Ok(m) = serde_json::from_str::<Value>(t.as_str()) {
                            apply(m, &mut state, &mut seq);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            mismatch = seq != api_seq || state != api;
        }
    }
    fresh.lock().map(|mut h| h.add(&local_fresh).ok()).ok();
    totals
        .lock()
        .map(|mut t| {
            t.messages += msgs;
            t.row_updates += rows;
            t.mismatches += u64::from(mismatch);
        })
        .ok();
}

fn pct(h: &Histogram<u64>, unit: f64) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({"p50": h.value_at_quantile(0.5) as f64 / unit, "p90": h.value_at_quantile(0.9) as f64 / unit, "p99": h.value_at_quantile(0.99) as f64 / unit,
           "p99_9": h.value_at_quantile(0.999) as f64 / unit, "max": h.max() as f64 / unit, "count": h.len()})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(Args::parse());
    let totals = Arc::new(Mutex::new(Totals::default()));
    let fresh = Arc::new(Mutex::new(hist()));
    let snap = Arc::new(Mutex::new(hist()));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        if a.ramp_per_sec > 0 && i > 0 {
            tokio::time::sleep(Duration::from_secs_f64(1.0 / a.ramp_per_sec as f64)).await;
        }
        // every client ends by itself: listening time, then at most 10 s of verification
        let bound = Duration::from_secs(a.duration_secs + 25);
        let c = client(a.clone(), totals.clone(), fresh.clone(), snap.clone());
        let totals = totals.clone();
        tasks.push(tokio::spawn(async move {
            if tokio::time::timeout(bound, c).await.is_err() {
                totals.lock().map(|mut t| t.errors += 1).ok();
            }
        }));
    }
    let progress = {
        let totals = totals.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Ok(t) = totals.lock() {
                    eprintln!("ws-swarm: {} connected, {} errors", t.connected, t.errors);
                }
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    let t = totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let fresh = fresh.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let snap = snap.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let listen = a.duration_secs as f64;
    println!(
        "{}",
        json!({
            "tool": "ws-swarm", "clients": a.clients, "connected": t.connected, "errors": t.errors, "seconds": secs,
            "messages": t.messages, "row_updates": t.row_updates,
            "row_updates_per_sec": t.row_updates as f64 / listen, "messages_per_sec": t.messages as f64 / listen,
            "freshness_ms": pct(&fresh, 1000.0), "time_to_snapshot_ms": pct(&snap, 1000.0),
            "verified": a.verify, "mismatches": t.mismatches,
        })
    );
    anyhow::ensure!(t.connected > 0, "no client connected");
    anyhow::ensure!(
        t.mismatches == 0,
        "{} clients ended with a state different from the API",
        t.mismatches
    );
    Ok(())
}
