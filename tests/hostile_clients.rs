//! Hostile clients while a well-behaved one watches a table with changes flowing, against the real
//! binary (its own process, so its memory is its own): garbage and binary frames, 5,000
//! subscribes on one connection, a 10 MB frame, a text frame that is not UTF-8, 1 MB query
//! strings, `since` garbage, 500 slowloris handshakes, 2,000 idle sockets, silent WebSockets,
//! junk keys in HTTP paths. Checked: the limits answer with their documented codes, idle and
//! half-sent connections are closed within the documented timeouts (short ones set here), the
//! server's RSS stays bounded, and the well-behaved client's freshness p99 under attack is within
//! 2x of its baseline (measured before and after the attack, in the same test).
//!
//! A second test fills the connection caps (in total and per address) and checks the 503. Two
//! more stall clients that each hold a copy of a table of their own (whole-table reads, scanned
//! and `format=rows` snapshots) and check that `--max-table-copies` bounds them.

mod common;
mod secure;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::Node;
use common::*;
use futures::{SinkExt, StreamExt};
use secure::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const HANDSHAKE_SECS: u64 = 2;
const IDLE_SECS: u64 = 4;
/// How far the good client's freshness p99 under attack may exceed twice its baseline before
/// the test calls it starved (see the assertion).
const STARVED_SLACK_MS: f64 = 100.0;

/// A masked client frame (`opcode`: 1 text, 2 binary, 8 close) announcing `len` bytes, with
/// `payload` (which may be shorter: the rest is never sent).
fn frame(opcode: u8, len: usize, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= 0xffff {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A WebSocket by hand (so it can send what a library refuses to): the upgrade, then the socket.
async fn raw_ws(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The text frames the server sends until its close frame, and the close code.
async fn frames_until_close(s: &mut TcpStream, within: Duration) -> (Vec<String>, Option<u16>) {
    let until = tokio::time::Instant::now() + within;
    let mut texts = Vec::new();
    loop {
        let mut h = [0u8; 2];
        if !matches!(
            tokio::time::timeout_at(until, s.read_exact(&mut h)).await,
            Ok(Ok(_))
        ) {
            return (texts, None);
        }
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut l = [0u8; 2];
            if s.read_exact(&mut l).await.is_err() {
                return (texts, None);
            }
            len = u16::from_be_bytes(l) as u64;
        } else if len == 127 {
            let mut l = [0u8; 8];
            if s.read_exact(&mut l).await.is_err() {
                return (texts, None);
            }
            len = u64::from_be_bytes(l);
        }
        let mut payload = vec![0u8; len as usize];
        if s.read_exact(&mut payload).await.is_err() {
            return (texts, None);
        }
        match h[0] & 0x0f {
            8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return (texts, code);
            }
            1 => texts.push(String::from_utf8_lossy(&payload).into_owned()),
            _ => {}
        }
    }
}

/// Reads server frames until a close frame: its code (`None`: the socket ended without one).
async fn close_code(s: &mut TcpStream, within: Duration) -> Option<u16> {
    frames_until_close(s, within).await.1
}

/// Waits until the server closes `s` (EOF or reset); the time it took, or `None` past `within`.
async fn closed_after(mut s: TcpStream, since: Instant, within: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn attack_started_or_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_bounded_while_a_good_client_keeps_its_freshness() {
    init_logs();
    let u = unique("hostile");
    let topic = format!("{u}.public.hot");
    create_topic(&topic, 1).await;
    let p = producer();
    produce(
        &p,
        &topic,
        &(0..50)
            .map(|i| row_record(json!({"id": format!("k{i}"), "n": 0})))
            .collect::<Vec<_>>(),
    )
    .await;
    let data = tempdir();
    let logs = tempdir();
    let hs = HANDSHAKE_SECS.to_string();
    let idle = IDLE_SECS.to_string();
    let mut node = Node::spawn(
        "hostile",
        "all",
        &format!("livetable-{u}"),
        &topic,
        data.path(),
        logs.path(),
        &[
            "--changelog-prefix",
            &format!("lt.{u}.table."),
            "--dlq-topic",
            &format!("lt.{u}.dlq"),
            "--handshake-timeout-secs",
            &hs,
            "--idle-timeout-secs",
            &idle,
            "--max-connections",
            "8000",
            "--max-connections-per-ip",
            "0",
        ],
    );
    node.wait_ready(Duration::from_secs(60)).await;
    let base = node.base.clone();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let pid = node.child.as_ref().unwrap().id();
    table_at_seq(&base, "hot", 50).await;

    // the well-behaved client, and changes flowing at ~40/s for the whole test
    let phase = Arc::new(AtomicUsize::new(0));
    let samples: Arc<Mutex<Vec<(usize, f64)>>> = Arc::default();
    let (mut good, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?table=hot"))
        .await
        .unwrap();
    let snap: Value = match good.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        m => panic!("{m:?}"),
    };
    let good_state = Arc::new(Mutex::new(snap["rows"].clone()));
    let good_task = {
        let (phase, samples, state) = (phase.clone(), samples.clone(), good_state.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = good.next().await {
                if let Message::Text(t) = m {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if let Some(ts) = v["ts_ms"].as_i64() {
                        let f = (now_ms() - ts) as f64;
                        samples
                            .lock()
                            .unwrap()
                            .push((phase.load(Ordering::Relaxed), f));
                    }
                    livetable::patch::merge(&mut state.lock().unwrap(), &v["patch"]);
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let (stop, sent, topic) = (stop.clone(), sent.clone(), topic.clone());
        tokio::spawn(async move {
            let p = producer();
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let rec = row_record(json!({"id": format!("k{}", i % 50), "n": i}));
                produce(&p, &topic, &[rec]).await;
                sent.store(i, Ordering::Relaxed);
            }
        })
    };
    let rss_before = rss_bytes(pid);
    tokio::time::sleep(Duration::from_secs(8)).await; // phase 0: the baseline, measured
    phase.store(1, Ordering::Relaxed);
    let attack_started = Instant::now();
    let peak_rss = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid) as usize, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    eprintln!(
        "hostile step: idle+slowloris at {:?}",
        attack_started_or_now()
    );
    // 2,000 idle sockets and 500 slowloris handshakes: closed within the handshake timeout
    let mut idle_conns = Vec::new();
    for _ in 0..2000 {
        let s = TcpStream::connect(addr).await.unwrap();
        idle_conns.push(tokio::spawn(closed_after(
            s,
            Instant::now(),
            Duration::from_secs(20),
        )));
    }
    let mut slowloris = Vec::new();
    for i in 0..500 {
        slowloris.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let head = format!("GET /ws?table=hot&c={i} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            let (mut r, mut w) = s.split();
            let mut buf = [0u8; 1024];
            let writer = async {
                for b in head.bytes().chain(std::iter::repeat(b'a')) {
                    if w.write_all(&[b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                std::future::pending::<()>().await
            };
            let reader = async {
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            tokio::select! {
                _ = writer => None,
                _ = reader => Some(started.elapsed()),
                _ = tokio::time::sleep(Duration::from_secs(20)) => None,
            }
        }));
    }
    eprintln!("hostile step: silent at {:?}", attack_started_or_now());
    // silent WebSockets: upgraded, then nothing (no pong): closed with 1001 at the idle timeout
    let mut silent = Vec::new();
    for _ in 0..20 {
        let s = raw_ws(addr, "/ws?table=hot").await;
        silent.push(tokio::spawn(closed_after(
            s,
            Instant::now(),
            Duration::from_secs(30),
        )));
    }

    eprintln!("hostile step: frames at {:?}", attack_started_or_now());
    // frames: garbage and binary get errors and the connection stays; invalid UTF-8 closes
    // with 1007, a 10 MB frame with 1009
    let (mut junk, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?table=hot"))
        .await
        .unwrap();
    let _ = next_msg(&mut junk, Duration::from_secs(10)).await; // snapshot
    junk.send(Message::text("{\"type\":\"subscribe\""))
        .await
        .unwrap();
    junk.send(Message::text("\u{0}\u{1}garbage")).await.unwrap();
    junk.send(Message::binary(vec![0xffu8; 1000]))
        .await
        .unwrap();
    junk.send(Message::text(r#"{"type":"ping"}"#))
        .await
        .unwrap();
    let mut codes = Vec::new();
    loop {
        let m = next_msg(&mut junk, Duration::from_secs(10)).await;
        if m["type"] == "pong" {
            break;
        }
        if let Some(c) = m["code"].as_str() {
            codes.push(c.to_string());
        }
    }
    assert_eq!(
        codes,
        ["bad_message", "bad_message", "bad_message"],
        "still open after garbage"
    );
    let mut bad_utf8 = raw_ws(addr, "/ws?table=hot").await;
    bad_utf8
        .write_all(&frame(1, 4, &[0xff, 0xfe, 0xc3, 0x28]))
        .await
        .unwrap();
    assert_eq!(
        close_code(&mut bad_utf8, Duration::from_secs(10)).await,
        Some(1007)
    );
    let mut big = raw_ws(addr, "/ws?table=hot").await;
    let _ = big
        .write_all(&frame(1, 10 * 1024 * 1024, &vec![b'x'; 64 * 1024]))
        .await;
    assert_eq!(
        close_code(&mut big, Duration::from_secs(10)).await,
        Some(1009)
    );

    eprintln!("hostile step: greedy at {:?}", attack_started_or_now());
    // 5,000 subscribes on one connection: 64 subscriptions at most, then the rate limit, then
    // a close with 1008 after 100 messages over it
    let mut greedy = raw_ws(addr, "/ws").await;
    let mut burst = Vec::new();
    for i in 0..5000 {
        let msg = format!(r#"{{"type":"subscribe","table":"nope{i}"}}"#);
        burst.extend(frame(1, msg.len(), msg.as_bytes()));
    }
    let _ = greedy.write_all(&burst).await;
    let (texts, greedy_close) = frames_until_close(&mut greedy, Duration::from_secs(20)).await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for t in &texts {
        let v: Value = serde_json::from_str(t).unwrap();
        let k = v["code"]
            .as_str()
            .or(v["type"].as_str())
            .unwrap_or("?")
            .to_string();
        *seen.entry(k).or_default() += 1;
    }
    assert_eq!(
        greedy_close,
        Some(1008),
        "rate limit exceeded: 1008 ({seen:?})"
    );
    assert_eq!(
        seen.get("waiting").unwrap_or(&0) + seen.get("snapshot").unwrap_or(&0),
        64,
        "64 subscriptions at most: {seen:?}"
    );
    assert!(
        seen.get("too_many_subscriptions").is_some_and(|n| *n > 0),
        "{seen:?}"
    );
    assert_eq!(seen.get("rate_limited"), Some(&100), "{seen:?}");

    eprintln!("hostile step: query at {:?}", attack_started_or_now());
    // 1 MB query strings: refused at the head limit (431), the connection closed
    let long = "k".repeat(1024 * 1024);
    let (status, _, _) = raw_http(
        addr,
        format!("GET /api/tables/hot?keys={long} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 431);
    let (status, _, _) = raw_http(
        addr,
        format!("GET /ws?table=hot&keys={long} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 431);

    eprintln!("hostile step: since at {:?}", attack_started_or_now());
    // `since` garbage: a snapshot, nothing else
    for since in [
        "garbage",
        "%ZZ",
        "x~",
        "e~0:99999999999999999999999",
        &"9".repeat(4000),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/ws?table=hot&since={}",
            since.replace('%', "%25")
        ))
        .await
        .unwrap();
        let m = next_msg(&mut ws, Duration::from_secs(10)).await;
        assert_eq!(m["type"], "snapshot", "since={since}: {m}");
        // an SSE response never ends: its status and first event only
        let mut resp = reqwest::Client::new()
            .get(format!("{base}/sse?table=hot"))
            .header("last-event-id", since)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "sse since={since}");
        let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("an sse event within 10 s")
            .unwrap()
            .unwrap_or_default();
        let first = String::from_utf8_lossy(&first);
        assert!(
            first.contains("event: snapshot"),
            "sse since={since}: {first}"
        );
    }

    eprintln!("hostile step: junk at {:?}", attack_started_or_now());
    // junk keys in HTTP paths: JSON errors, never a 5xx (no junk queries on /api/tables[/T]:
    // those routes read no query parameter and ignore any)
    for path in [
        "/api/tables/hot/rows/%FF%FE",
        "/api/tables/hot/rows/%zz",
        "/api/tables/hot/rows/%",
        "/api/tables/%00/rows/x",
        "/api/tables/hot/rows/..%2F..%2Fetc%2Fpasswd",
        "/api/tables/hot/rows/a%00b",
        "/api/tables/hot/rows/k1/extra",
        "/ws?table=a&table=b",
        "/sse?table=a&table=b",
        // a format an event stream would ignore is refused, not served as patches
        "/sse?table=hot&format=rows",
        "/sse?table=hot&format=csv",
    ] {
        let (status, head, body) = raw_http(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        assert!(
            head.to_lowercase()
                .contains("content-type: application/json"),
            "{path}: {head}"
        );
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    let key = "k".repeat(30_000);
    let (s, v) = get_json(&format!("{base}/api/tables/hot/rows/{key}")).await;
    assert_eq!((s, v["error"].is_string()), (404, true));

    eprintln!("hostile step: closes at {:?}", attack_started_or_now());
    // every idle and half-sent connection was closed, within the handshake timeout
    let limit = Duration::from_secs(HANDSHAKE_SECS + 3);
    let mut worst = Duration::ZERO;
    for (what, handles) in [("idle", idle_conns), ("slowloris", slowloris)] {
        let n = handles.len();
        let mut closed = 0;
        for h in handles {
            if let Some(d) = h.await.unwrap() {
                closed += 1;
                worst = worst.max(d);
            }
        }
        assert_eq!(closed, n, "{what}: {closed} of {n} closed");
    }
    assert!(worst <= limit, "slowest close {worst:?} > {limit:?}");
    let mut worst_ws = Duration::ZERO;
    for h in silent {
        let d = h.await.unwrap().expect("a silent WebSocket is closed");
        worst_ws = worst_ws.max(d);
    }
    assert!(
        worst_ws <= Duration::from_secs(IDLE_SECS + 3),
        "silent WebSockets closed after {worst_ws:?}"
    );
    let attack = attack_started.elapsed();
    sampler.abort();
    let peak = peak_rss.load(Ordering::Relaxed) as u64;
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(8)).await; // phase 2: the baseline again
    stop.store(true, Ordering::Relaxed);
    feeder.await.unwrap();

    eprintln!("hostile step: final at {:?}", attack_started_or_now());
    // the good client got every change, and stayed fresh
    let last = sent.load(Ordering::Relaxed);
    let want = api_state_rows(&base).await;
    eventually(
        "the good client has the final state",
        Duration::from_secs(20),
        || {
            let st = good_state.lock().unwrap().clone();
            let want = want.clone();
            async move { (st == want).then_some(()) }
        },
    )
    .await;
    good_task.abort();
    let s = samples.lock().unwrap().clone();
    let mut by_phase: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for (ph, f) in s {
        by_phase[ph].push(f);
    }
    let (n0, n1, n2) = (by_phase[0].len(), by_phase[1].len(), by_phase[2].len());
    assert!(n0 > 100 && n1 > 100 && n2 > 100, "samples {n0} {n1} {n2}");
    let base_p99 = p99(&mut by_phase[0]).max(p99(&mut by_phase[2]));
    let attack_p99 = p99(&mut by_phase[1]);
    let metrics = metrics_text(&base).await;
    let m = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    eprintln!(
        "hostile: {last} changes; attack {attack:?}; freshness p99 baseline {base_p99} ms, under attack {attack_p99} ms (samples {n0}/{n1}/{n2}); RSS before {} MB, peak {} MB; slowest idle/slowloris close {worst:?}, silent ws {worst_ws:?}; {} | {} | {}",
        rss_before / 1_000_000,
        peak / 1_000_000,
        m(r#"livetable_tcp_timeouts_total{phase="handshake"}"#),
        m(r#"livetable_tcp_timeouts_total{phase="idle"}"#),
        m(r#"livetable_connections_closed_total{reason="idle"}"#),
    );
    // A starved client lags by seconds; scheduling noise on a loaded 2-core CI machine moves a
    // ~15 ms p99 by tens of ms. The slack separates the two without timing the service: the
    // figure itself belongs to the bench, not to this test.
    assert!(
        attack_p99 <= 2.0 * base_p99 + STARVED_SLACK_MS,
        "freshness p99 under attack {attack_p99} ms > 2 x baseline {base_p99} ms + {STARVED_SLACK_MS} ms"
    );
    assert!(
        peak < rss_before + 200_000_000,
        "RSS grew from {} MB to {} MB",
        rss_before / 1_000_000,
        peak / 1_000_000
    );
    assert!(node.exited().is_none(), "the server is up");
    assert!(metrics.contains(r#"livetable_protocol_errors_total{code="too_many_subscriptions"}"#));
    node.stop();
}

/// `{key: row}` of `hot` as a patch client holds it.
async fn api_state_rows(base: &str) -> Value {
    let (_, body) = get_json(&format!("{base}/api/tables/hot")).await;
    body["rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_in_total_and_per_address_with_a_503() {
    init_logs();
    let u = unique("caps");
    let dir = tempdir();
    let mut c = test_config(
        livetable::config::TopicSelection::Names(vec![format!("{u}.t")]),
        dir.path(),
        &u,
    );
    c.max_connections = 12;
    c.security.limits.max_connections_per_ip = 5;
    let (svc, _base) = start_service(c).await;
    let port = svc.local_addr.port();
    let a: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    // the listener is on 127.0.0.1: a second source address reaches it too
    let from = |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        sock
    };
    let _ = b;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(from("127.0.0.1").connect(a).await.unwrap());
    }
    let refused = |mut s: TcpStream| async move {
        s.write_all(b"GET /api/tables HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    };
    let answer = refused(from("127.0.0.1").connect(a).await.unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("too many connections from this address"),
        "{answer}"
    );
    // another address still gets in, up to the total
    for _ in 0..5 {
        held.push(from("127.0.0.2").connect(a).await.unwrap());
    }
    let mut ok = from("127.0.0.3").connect(a).await.unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    ok.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    held.push(ok);
    held.push(from("127.0.0.4").connect(a).await.unwrap());
    let answer = refused(from("127.0.0.5").connect(a).await.unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"too many connections\""), "{answer}");
    // slots come back when connections close
    held.truncate(0);
    // The server may see a probe before it sees the closes: a probe refused
    // for its address is one more per-address refusal, counted here.
    let probes_refused_per_ip = std::sync::atomic::AtomicU64::new(0);
    eventually("slots freed", Duration::from_secs(10), || async {
        let answer = refused(from("127.0.0.1").connect(a).await.unwrap()).await;
        if answer.contains("too many connections from this address") {
            probes_refused_per_ip.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    let m = metrics_text(&format!("http://{a}")).await;
    let per_ip = 1 + probes_refused_per_ip.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        m.contains(&format!(
            r#"livetable_tcp_refused_total{{reason="per_ip"}} {per_ip}"#
        )),
        "expected {per_ip} per-address refusals: {m}"
    );
    let refused_total: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix(r#"livetable_tcp_refused_total{reason="max_connections"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused_total >= 1.0, "{m}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Whole-table reads that stop reading hold their places (`--max-table-copies`), not their
/// bodies: a read beyond the limit waits, then gets a 503 with `Retry-After`; a row lookup is
/// not held up; the stalled reads, read at last, are whole and exact; their places come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_table_reads_are_bounded_and_stalled_readers_get_their_bodies_whole() {
    let (svc, base, want, _dir) = two_copies_node("reads", Duration::from_secs(10)).await;
    // two reads that take their answers' heads and stop reading
    let client = reqwest::Client::builder().build().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let r = client
            .get(format!("{base}/api/tables/t"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        stalled.push(r);
    }
    let m = metrics_text(&base).await;
    assert_eq!(metric_value(&m, "livetable_table_copies"), Some(2.0), "{m}");
    // a third waits for a place, then is refused
    let started = Instant::now();
    let r = client
        .get(format!("{base}/api/tables/t"))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(r.headers()["retry-after"], "1");
    no_place(r).await;
    assert!(waited >= Duration::from_secs(4), "it waited {waited:?}");
    // a row, or rows looked up by keys, copy no table: not held up
    let started = Instant::now();
    let (status, row) = get_json(&format!("{base}/api/tables/t/rows/k7")).await;
    assert_eq!((status, row["n"].as_i64()), (200, Some(7)));
    let (status, some) = get_json(&format!("{base}/api/tables/t?keys=k1,k2")).await;
    assert_eq!(status, 200);
    assert_eq!(some["rows"]["k2"]["n"], 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // the stalled reads, read at last: whole and exact
    for r in stalled {
        let body: Value = r.json().await.unwrap();
        let got: std::collections::BTreeMap<String, i64> = body["rows"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v["n"].as_i64().unwrap()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(body["table"], "t");
        assert!(body["pos"].as_str().is_some_and(|p| !p.is_empty()));
    }
    // their places came back
    eventually("places back", Duration::from_secs(10), || async {
        let m = metrics_text(&base).await;
        (metric_value(&m, "livetable_table_copies") == Some(0.0)).then_some(())
    })
    .await;
    common::procs::until_api_state(&base, "t", &want, Duration::from_secs(10), "a read after")
        .await;
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Live snapshots of a client's own (a scanned `where`, `format=rows`) take places among the
/// copies too: two WebSocket clients that subscribe with a `where` matching every row and read
/// nothing hold both; a third scanned subscription gets a non-fatal `busy` error after 5 s, an
/// SSE stream a 503, a `format=rows` connection `busy`; subscriptions by keys are not held up;
/// once the stalled clients go, the scanned subscription gets every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanned_and_rows_snapshots_are_bounded_and_lookups_are_not_held_up() {
    // the stalled clients are not closed as slow while the test runs
    let (svc, base, want, _dir) = two_copies_node("copies", Duration::from_secs(120)).await;
    let copies = || async {
        metric_value(&metrics_text(&base).await, "livetable_table_copies").unwrap_or(-1.0)
    };
    assert_eq!(copies().await, 0.0);
    // ~24 MB of frames each: more than the sockets hold
    let scan = "/ws?table=t&where=n%20%3E%3D%200";
    let stalled = vec![
        small_buffer_ws(&base, scan).await,
        small_buffer_ws(&base, scan).await,
    ];
    eventually("both places taken", Duration::from_secs(30), || async {
        (copies().await == 2.0).then_some(())
    })
    .await;
    let ws_url = format!("ws://{}/ws", base.trim_start_matches("http://"));
    // a subscription by keys takes no place: answered at once
    let started = Instant::now();
    let (mut client, _) = tokio_tungstenite::connect_async(format!("{ws_url}?table=t&keys=k7"))
        .await
        .unwrap();
    let m = next_json_of(&mut client).await;
    assert_eq!(m["type"], "snapshot");
    assert_eq!(m["rows"]["k7"]["n"], 7);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // a scanned one on the same connection waits for a place, then is refused (not fatal)
    let started = Instant::now();
    client
        .send(Message::text(
            json!({"type": "subscribe", "table": "t", "where": "n >= 0"}).to_string(),
        ))
        .await
        .unwrap();
    let m = next_json_of(&mut client).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_str()),
        (Some("error"), Some("busy")),
        "{}",
        m["type"]
    );
    assert_eq!(m["fatal"], false);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // an SSE stream with a scanned where: 503 before the stream starts
    let r = http()
        .get(format!("{base}/sse?table=t&where=n%20%3E%3D%200"))
        .send()
        .await
        .unwrap();
    no_place(r).await;
    // format=rows of the whole table: busy
    let (mut rows, _) = tokio_tungstenite::connect_async(format!("{ws_url}?table=t&format=rows"))
        .await
        .unwrap();
    let m = next_json_of(&mut rows).await;
    assert_eq!(m["code"], "busy", "{}", m["type"]);
    drop(rows);
    // the stalled clients go: their places come back
    drop(stalled);
    eventually("places back", Duration::from_secs(30), || async {
        (copies().await == 0.0).then_some(())
    })
    .await;
    // the scanned subscription again: every row, exact
    client
        .send(Message::text(
            json!({"type": "subscribe", "table": "t", "where": "n >= 0"}).to_string(),
        ))
        .await
        .unwrap();
    let mut got = std::collections::BTreeMap::new();
    loop {
        let m = next_json_of(&mut client).await;
        let part = match m["type"].as_str() {
            Some("snapshot") => &m["rows"],
            Some("patch") => &m["patch"],
            _ => continue,
        };
        for (k, v) in part.as_object().unwrap() {
            got.insert(k.clone(), v["n"].as_i64().unwrap());
        }
        if m["more"] != true {
            break;
        }
    }
    assert_eq!(got, want);
    eventually("its place back", Duration::from_secs(10), || async {
        (copies().await == 0.0).then_some(())
    })
    .await;
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// The next text message of `ws` as JSON (pings passed over), within 30 s each.
async fn next_json_of(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Value {
    for _ in 0..100 {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("not a text message: {other:?}"),
        }
    }
    panic!("100 pings in a row")
}

/// A node with `--max-table-copies 2` and `slow_client` serving table `t` of 40,000 rows of
/// ~540 bytes (~24 MB of JSON: more than loopback's socket buffers hold, so a client that stops
/// reading stalls the server's writes), on a 3-partition topic; its rows (`{key: n}`) and data
/// directory.
async fn two_copies_node(
    prefix: &str,
    slow_client: Duration,
) -> (
    livetable::Service,
    String,
    std::collections::BTreeMap<String, i64>,
    tempfile::TempDir,
) {
    init_logs();
    let u = unique(prefix);
    let topic = format!("{u}.public.t");
    create_topic(&topic, 3).await;
    let dir = tempdir();
    let mut c = test_config(
        livetable::config::TopicSelection::Names(vec![topic.clone()]),
        dir.path(),
        &u,
    );
    c.security.limits.max_table_copies = 2;
    c.slow_client = slow_client;
    let (svc, base) = start_service(c).await;
    let keys = 40_000;
    let mut want = std::collections::BTreeMap::new();
    produce_n_updates(&producer(), &topic, "t", (keys, 500), 0..keys, &mut want).await;
    common::procs::until_api_state(&base, "t", &want, Duration::from_secs(120), "every row").await;
    (svc, base, want, dir)
}

/// `r` is the 503 of a request that found no place among the copies.
async fn no_place(r: reqwest::Response) {
    assert_eq!(r.status(), 503);
    let err: Value = r.json().await.unwrap();
    let text = err["error"].as_str().unwrap_or_default();
    assert!(text.contains("--max-table-copies"), "{err}");
}
