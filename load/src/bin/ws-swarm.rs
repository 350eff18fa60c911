//! ws-swarm: N live clients (WebSocket, or SSE with `--sse`) in one process. Each keeps its copy of
//! the table by applying the merge patches, and records the time to its snapshot and the freshness
//! of every patch (receipt time - `ts_ms`) in HDR histograms. Connections are spread over several
//! local source addresses (127.0.0.1..N) so N can pass the ephemeral-port limit of one address.
//! A connection the server ends early is reconnected (counted). With `--verify`, each client's
//! final state is compared with `GET /api/tables/{table}`. Progress on stderr, a JSON summary on
//! stdout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use livetable::patch::merge;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ws-swarm",
    about = "Many livetable WebSocket (or SSE) clients, with freshness histograms"
)]
struct Args {
    /// livetable base URL (http://HOST:PORT on loopback).
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
    /// Subscribe to this many random keys of g0..g{key-space - 1} instead of the whole table.
    #[arg(long)]
    keys: Option<usize>,
    /// The key space random keys are drawn from.
    #[arg(long, default_value_t = 1000)]
    key_space: usize,
    /// Use SSE (`/sse`) instead of WebSocket.
    #[arg(long)]
    sse: bool,
    /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.N.
    #[arg(long, default_value_t = 1)]
    local_addrs: u8,
    /// Keep no table copy: count messages and rows, measure freshness, skip parsing snapshots
    /// (for connection and snapshot-storm runs where the client CPU would be the bottleneck).
    #[arg(long)]
    no_state: bool,
    /// At the end, compare every client's state with the HTTP API.
    #[arg(long)]
    verify: bool,
    /// A `where` filter each client subscribes with; `{n}` in it becomes the client's number
    /// modulo `--where-values` (`--where "league = 'L{n}'"`: client i watches league L{i % N}).
    #[arg(long = "where")]
    filter: Option<String>,
    /// How many distinct values `{n}` in `--where` takes.
    #[arg(long, default_value_t = 1)]
    where_values: usize,
    /// A token (`--auth jwt`) every client sends as `access_token=` in its URL.
    #[arg(long)]
    token: Option<String>,
}

#[derive(Default)]
struct Totals {
    connected: u64,
    errors: u64,
    reconnects: u64,
    messages: u64,
    row_updates: u64,
    mismatches: u64,
}

struct Shared {
    a: Args,
    totals: Mutex<Totals>,
    fresh: Mutex<Histogram<u64>>,
    snap: Mutex<Histogram<u64>>,
}

/// Receipt time in microseconds: freshness is `receipt - ts_ms` with the receipt not rounded
/// down to the millisecond (ts_ms is, so a figure is up to 1 ms above the true delay, 0.5 ms on
/// average; the broker-delivery baseline of bench has the same bias).
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Percent-encodes a query parameter's value.
fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A small xorshift for choosing keys.
fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
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

/// What `--no-state` reads of a message: its values are skipped, not built.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<u64>,
    ts_ms: Option<i64>,
    #[serde(borrow)]
    patch: Option<std::collections::HashMap<std::borrow::Cow<'a, str>, serde::de::IgnoredAny>>,
}

/// One client's view: its table copy, seq, counters and freshness histogram.
struct View {
    state: Value,
    seq: u64,
    msgs: u64,
    rows: u64,
    fresh: Histogram<u64>,
    no_state: bool,
    /// Inside a snapshot sent in several frames.
    in_snapshot: bool,
}

impl View {
    fn apply(&mut self, text: &str) {
        self.msgs += 1;
        // a big snapshot is a `snapshot` frame and patch frames, all but the last with `more`
        let starts = text.starts_with(r#"{"type":"snapshot""#);
        let continues = self.in_snapshot && !starts;
        self.in_snapshot = (starts || continues) && text.ends_with(r#","more":true}"#);
        if self.no_state && (starts || continues) {
            return;
        }
        if self.no_state {
            // no table copy: read the type, seq, ts_ms and the patch's keys, skip the values
            if let Ok(h) = serde_json::from_str::<Head<'_>>(text) {
                if h.kind == "patch" {
                    self.rows += h.patch.map_or(0, |p| p.len()) as u64;
                    if let Some(ts) = h.ts_ms {
                        let _ = self.fresh.record((now_us() - ts * 1000).max(0) as u64);
                    }
                }
                self.seq = h.seq.unwrap_or(self.seq);
            }
            return;
        }
        let Ok(m) = serde_json::from_str::<Value>(text) else {
            return;
        };
        match m["type"].as_str() {
            Some("snapshot") => self.state = m["rows"].clone(),
            Some("patch") if continues => merge(&mut self.state, &m["patch"]),
            Some("patch") => {
                self.rows += m["patch"].as_object().map_or(0, |p| p.len()) as u64;
                if let Some(ts) = m["ts_ms"].as_i64() {
                    let _ = self.fresh.record((now_us() - ts * 1000).max(0) as u64);
                }
                if !self.no_state {
                    merge(&mut self.state, &m["patch"]);
                }
            }
            _ => {}
        }
        self.seq = m["seq"].as_u64().unwrap_or(self.seq);
    }
}

/// A stream of text messages from the server, WebSocket or SSE.
enum Conn {
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>),
    Sse {
        body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
        buf: Vec<u8>,
    },
}

impl Conn {
    async fn open(s: &Shared, i: usize, keys: &Option<String>) -> anyhow::Result<Conn> {
        let a = &s.a;
        let mut query = format!("table={}", a.table);
        if let Some(k) = keys {
            query.push_str("&keys=");
            query.push_str(k);
        }
        if let Some(f) = &a.filter {
            let f = f.replace("{n}", &(i % a.where_values.max(1)).to_string());
            query.push_str("&where=");
            query.push_str(&urlencode(&f));
        }
        if let Some(t) = &a.token {
            query.push_str("&access_token=");
            query.push_str(t);
        }
        let host = a.base.trim_start_matches("http://").trim_end_matches('/');
        let local = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % a.local_addrs.max(1) as usize) as u8,
        ));
        if a.sse {
            let client = reqwest::Client::builder().local_address(local).build()?;
            let resp = client
                .get(format!("http://{host}/sse?{query}"))
                .send()
                .await?;
            anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
            return Ok(Conn::Sse {
                body: resp.bytes_stream().boxed(),
                buf: Vec::new(),
            });
        }
        let server: SocketAddr = tokio::net::lookup_host(host)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("cannot resolve {host}"))?;
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(local, 0))?;
        let tcp = sock.connect(server).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{host}/ws?{query}"), tcp).await?;
        Ok(Conn::Ws(Box::new(ws)))
    }

    /// The next text message; None when the server ended the connection.
    async fn next(&mut self) -> Option<String> {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await? {
                    Ok(Message::Text(t)) => return Some(t.as_str().to_owned()),
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {}
                }
            },
            Conn::Sse { body, buf } => loop {
                if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&event);
                    let data: String = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .collect();
                    if !data.is_empty() {
                        return Some(data);
                    }
                    continue;
                }
                match body.next().await? {
                    Ok(chunk) => buf.extend_from_slice(&chunk),
                    Err(_) => return None,
                }
            },
        }
    }
}

async fn client(s: Arc<Shared>, i: usize) {
    let a = &s.a;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    let keys = a.keys.map(|k| {
        (0..k)
            .map(|_| format!("g{}", rand(&mut seed) % a.key_space.max(1) as u64))
            .collect::<Vec<_>>()
            .join(",")
    });
    let started = Instant::now();
    let until = started + Duration::from_secs(a.duration_secs);
    let mut view = View {
        state: Value::Null,
        seq: 0,
        msgs: 0,
        rows: 0,
        fresh: hist(),
        no_state: a.no_state,
        in_snapshot: false,
    };
    let mut first = true;
    let mut conn = None;
    for attempt in 0..4 {
        if attempt > 0 {
            s.totals.lock().map(|mut t| t.reconnects += 1).ok();
        }
        let c = match tokio::time::timeout(Duration::from_secs(10), Conn::open(&s, i, &keys)).await
        {
            Ok(Ok(c)) => c,
            _ => continue,
        };
        let mut c = c;
        while let Ok(Some(text)) = tokio::time::timeout_at(until.into(), c.next()).await {
            // a big snapshot is several frames; it is complete with the first one without `more`
            if first && !text.ends_with(r#","more":true}"#) {
                s.snap
                    .lock()
                    .map(|mut h| h.record(started.elapsed().as_micros().max(1) as u64))
                    .ok();
                s.totals.lock().map(|mut t| t.connected += 1).ok();
                first = false;
            }
            view.apply(&text);
        }
        if Instant::now() >= until {
            conn = Some(c);
            break;
        }
    }
    if first {
        s.totals.lock().map(|mut t| t.errors += 1).ok();
    }
    let mut mismatch = false;
    if let (true, None, false, Some(mut c)) = (a.verify, &a.keys, a.no_state, conn) {
        if let Ok((api, api_seq)) = api_state(&a.base, &a.table).await {
            let until = Instant::now() + Duration::from_secs(10);
            while view.seq < api_seq && Instant::now() < until {
                match tokio::time::timeout(Duration::from_secs(1), c.next()).await {
                    Ok(Some(text)) => view.apply(&text),
                    _ => break,
                }
            }
            mismatch = view.seq != api_seq || view.state != api;
        }
    }
    s.fresh.lock().map(|mut h| h.add(&view.fresh).ok()).ok();
    s.totals
        .lock()
        .map(|mut t| {
            t.messages += view.msgs;
            t.row_updates += view.rows;
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
    let a = Args::parse();
    anyhow::ensure!(
        a.base.starts_with("http://127.") || a.base.starts_with("http://localhost"),
        "ws-swarm only targets loopback servers (http://127.x.x.x:PORT)"
    );
    let s = Arc::new(Shared {
        a,
        totals: Mutex::new(Totals::default()),
        fresh: Mutex::new(hist()),
        snap: Mutex::new(hist()),
    });
    let a = &s.a;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    let progress = {
        let s = s.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Ok(t) = s.totals.lock() {
                    eprintln!(
                        "ws-swarm: {} connected, {} errors, {} reconnects",
                        t.connected, t.errors, t.reconnects
                    );
                }
            }
        })
    };
    for i in 0..a.clients {
        // the ramp: client i starts at i / rate seconds (bursts per timer tick, as the timer
        // cannot sleep less than a millisecond)
        if a.ramp_per_sec > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / a.ramp_per_sec as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        // every client ends by itself: listening time (+ reconnects), then at most 10 s verifying
        let bound = Duration::from_secs(a.duration_secs + 55);
        let c = client(s.clone(), i);
        let s2 = s.clone();
        tasks.push(tokio::spawn(async move {
            if tokio::time::timeout(bound, c).await.is_err() {
                s2.totals.lock().map(|mut t| t.errors += 1).ok();
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    let t = s.totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let fresh = s.fresh.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let snap = s.snap.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let listen = a.duration_secs as f64;
    println!(
        "{}",
        json!({
            "tool": "ws-swarm", "transport": if a.sse { "sse" } else { "ws" }, "clients": a.clients,
            "connected": t.connected, "errors": t.errors, "reconnects": t.reconnects, "seconds": secs,
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
