//! WebSocket clients inside bench, for the scenarios that need to know exactly what one client saw
//! and when: a watcher in a thread of its own (when each key changed again after a mark), and a
//! resume (connect with `since`, time to the first message). bench's own process is not pinned.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn ws_url(base: &str, table: &str, since: Option<&str>) -> String {
    let mut u = format!("{}/ws?table={table}", base.replacen("http://", "ws://", 1));
    if let Some(p) = since {
        u.push_str("&since=");
        u.push_str(p);
    }
    u
}

/// What the scenarios read of a server message.
struct Msg {
    kind: String,
    pos: Option<String>,
    seq: Option<u64>,
    /// A frame of a snapshot that more frames follow.
    more: bool,
    /// The keys of a patch (or of a snapshot's rows).
    keys: Vec<String>,
    /// Per key, the row's `updated_at` (cdc-gen's produce time in ms, which never goes back for a
    /// key) when the message carries it; None for a delete.
    stamps: Vec<(String, Option<String>)>,
}

fn parse(text: &str) -> anyhow::Result<Msg> {
    let v: Value = serde_json::from_str(text).context("a message that is not JSON")?;
    let field = match v["type"].as_str() {
        Some("patch") => "patch",
        _ => "rows",
    };
    let rows = v[field].as_object();
    Ok(Msg {
        kind: v["type"].as_str().unwrap_or_default().to_string(),
        pos: v["pos"].as_str().map(str::to_string),
        seq: v["seq"].as_u64(),
        more: v["more"].as_bool().unwrap_or(false),
        keys: rows
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
        stamps: rows
            .map(|o| {
                o.iter()
                    .filter_map(|(k, row)| match &row["updated_at"] {
                        Value::String(t) => Some((k.clone(), Some(t.clone()))),
                        _ if row.is_null() => Some((k.clone(), None)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The next text message, or None when none arrives within `wait`.
async fn next_msg(ws: &mut Ws, wait: Duration) -> anyhow::Result<Option<Msg>> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => bail!("the server closed the connection"),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Text(t)))) => return parse(t.as_str()).map(Some),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Reads until the snapshot is complete (its last frame); returns the snapshot's position.
async fn snapshot(ws: &mut Ws) -> anyhow::Result<Option<String>> {
    snapshot_into(ws, &mut HashMap::new()).await
}

/// `snapshot`, keeping every row's `updated_at` in `stamps`.
async fn snapshot_into(
    ws: &mut Ws,
    stamps: &mut HashMap<String, String>,
) -> anyhow::Result<Option<String>> {
    let mut started = false;
    loop {
        let m = next_msg(ws, Duration::from_secs(30))
            .await?
            .context("no snapshot within 30 s")?;
        started |= m.kind == "snapshot";
        if started {
            for (k, t) in m.stamps {
                if let Some(t) = t {
                    stamps.insert(k, t);
                }
            }
        }
        if started && !m.more {
            return Ok(m.pos);
        }
    }
}

/// What a watcher saw.
#[derive(Default)]
struct Seen {
    /// Patches received before this instant are not recorded in `first_after`.
    mark: Option<Instant>,
    /// Per key, when the first patch that changed it at or after `mark` arrived.
    first_after: HashMap<String, Instant>,
    /// Per key, when its last patch arrived (the mark when none since).
    last: HashMap<String, Instant>,
    /// Since the mark, the longest time a key went without a patch (to its next patch).
    max_gap: Duration,
    /// The client's state: per key, the `updated_at` it holds.
    stamps: HashMap<String, String>,
    /// Since the start: a key's `updated_at` went back (a change older than one already seen),
    /// `seq` went back, snapshots after the first.
    went_back: u64,
    seq_back: u64,
    resnapshots: u64,
    seq: u64,
    error: Option<String>,
}

/// What a watcher saw of gaps and order since its start (and, for `max_gap`, since its mark).
#[derive(Debug, Clone, Copy)]
pub struct Order {
    pub max_gap: Duration,
    pub went_back: u64,
    pub seq_back: u64,
    pub resnapshots: u64,
}

/// A client of one table on a thread of its own, recording when each key changes.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Connects to `base` for `table` and returns once the snapshot is complete.
    pub fn start(base: &str, table: &str) -> anyhow::Result<Watcher> {
        let url = ws_url(base, table, None);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let run = async {
                    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
                    let mut stamps = HashMap::new();
                    snapshot_into(&mut ws, &mut stamps).await?;
                    if let Ok(mut s) = seen.lock() {
                        s.stamps = stamps;
                    }
                    let _ = ready_tx.send(Ok(()));
                    while !stop.load(Ordering::Relaxed) {
                        let Some(m) = next_msg(&mut ws, Duration::from_millis(100)).await? else {
                            continue;
                        };
                        let mut s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        if m.kind == "snapshot" {
                            // a new snapshot replaces the client's state
                            s.resnapshots += 1;
                            s.stamps.clear();
                        }
                        if m.kind != "patch" && m.kind != "snapshot" {
                            continue;
                        }
                        if let Some(q) = m.seq {
                            if q < s.seq {
                                s.seq_back += 1;
                            }
                            s.seq = q;
                        }
                        for (k, t) in m.stamps {
                            match t {
                                // fixed-width ms timestamps: the string order is the time order
                                Some(t) => {
                                    let old = s.stamps.insert(k, t.clone());
                                    if old.is_some_and(|o| o.len() == t.len() && o > t) {
                                        s.went_back += 1;
                                    }
                                }
                                None => {
                                    s.stamps.remove(&k);
                                }
                            }
                        }
                        if m.kind != "patch" || m.more {
                            continue;
                        }
                        let now = Instant::now();
                        if let Some(mark) = s.mark.filter(|mark| now >= *mark) {
                            for k in m.keys {
                                let since = s.last.get(&k).copied().unwrap_or(mark).max(mark);
                                s.max_gap = s.max_gap.max(now - since);
                                s.last.insert(k.clone(), now);
                                s.first_after.entry(k).or_insert(now);
                            }
                        }
                    }
                    let _ = ws.close(None).await;
                    anyhow::Ok(())
                };
                let result = runtime().and_then(|rt| rt.block_on(run));
                if let Err(e) = result {
                    if let Ok(mut s) = seen.lock() {
                        s.error = Some(format!("{e:#}"));
                    }
                    let _ = ready_tx.send(Err(e));
                }
            })
        };
        let w = Watcher {
            stop,
            seen,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(40))
            .map_err(|_| anyhow::anyhow!("the watcher did not get its snapshot within 40 s"))??;
        Ok(w)
    }

    /// From `at` on, record the first patch of every key (earlier records are forgotten).
    pub fn mark(&self, at: Instant) {
        if let Ok(mut s) = self.seen.lock() {
            s.mark = Some(at);
            s.first_after.clear();
            s.last.clear();
            s.max_gap = Duration::ZERO;
        }
    }

    /// How many keys changed at or after `at` (and after the mark).
    pub fn updated_since(&self, at: Instant) -> anyhow::Result<usize> {
        let s = self.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(s.last.values().filter(|t| **t >= at).count())
    }

    /// Gaps and order (see `Order`).
    pub fn order(&self) -> anyhow::Result<Order> {
        let s = self.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(Order {
            max_gap: s.max_gap,
            went_back: s.went_back,
            seq_back: s.seq_back,
            resnapshots: s.resnapshots,
        })
    }

    /// The client's state: per key, the `updated_at` it holds.
    pub fn stamps(&self) -> anyhow::Result<HashMap<String, String>> {
        let s = self.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if let Some(e) = &s.error {
            bail!("watcher: {e}");
        }
        Ok(s.stamps.clone())
    }

    /// Per key, when it first changed at or after the mark.
    pub fn first_after(&self) -> anyhow::Result<HashMap<String, Instant>> {
        let s = self.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if let Some(e) = &s.error {
            bail!("watcher: {e}");
        }
        Ok(s.first_after.clone())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client that takes `table`'s snapshot on `base`, reads until nothing arrived for `idle`, and
/// disconnects; returns its resume token (the position of the last message it read).
pub fn position(base: &str, table: &str, idle: Duration) -> anyhow::Result<String> {
    runtime()?.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(base, table, None)).await?;
        let mut pos = snapshot(&mut ws).await?;
        while let Some(m) = next_msg(&mut ws, idle).await? {
            if !m.more && m.pos.is_some() {
                pos = m.pos;
            }
        }
        let _ = ws.close(None).await;
        pos.context("no position in the snapshot")
    })
}

/// What a client that resumed saw.
pub struct Resumed {
    /// From the start of the connection to the first message, in ms.
    pub first_ms: f64,
    pub first_kind: String,
    /// Snapshot messages received (a resume hit sends none).
    pub snapshots: u64,
    /// Distinct keys in the patches received until nothing arrived for `idle`.
    pub keys: usize,
}

/// Connects to `base` with `since=pos` and times the first message; then reads until nothing
/// arrived for `idle`.
pub fn resume(base: &str, table: &str, pos: &str, idle: Duration) -> anyhow::Result<Resumed> {
    let url = ws_url(base, table, Some(pos));
    runtime()?.block_on(async {
        let t0 = Instant::now();
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
        let first = next_msg(&mut ws, Duration::from_secs(10))
            .await?
            .context("nothing within 10 s of the resume")?;
        let first_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let first_kind = first.kind.clone();
        let mut snapshots = 0;
        let mut keys = HashSet::new();
        let mut m = Some(first);
        while let Some(msg) = m {
            if msg.kind == "snapshot" {
                snapshots += 1;
            } else if msg.kind == "patch" {
                keys.extend(msg.keys);
            }
            m = next_msg(&mut ws, idle).await?;
        }
        let _ = ws.close(None).await;
        Ok(Resumed {
            first_ms,
            first_kind,
            snapshots,
            keys: keys.len(),
        })
    })
}

/// Opens `n` WebSocket connections one after another to `/ws?{query}` and times each from the
/// TCP connect to the last frame of its snapshot (ms); each is closed before the next opens.
pub fn connect_times(base: &str, query: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let url = format!("{}/ws?{query}", base.replacen("http://", "ws://", 1));
    runtime()?.block_on(async {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
            let mut started = false;
            loop {
                let m = next_msg(&mut ws, Duration::from_secs(10))
                    .await?
                    .context("no snapshot within 10 s of connecting")?;
                anyhow::ensure!(m.kind != "error", "the server refused the subscription");
                started |= m.kind == "snapshot";
                if started && !m.more {
                    break;
                }
            }
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
            let _ = ws.close(None).await;
        }
        Ok(times)
    })
}
