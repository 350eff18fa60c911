//! Live fan-out with real clients over real sockets: tokio-tungstenite WebSockets and an SSE
//! stream read with reqwest, against the real broker and service.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use livetable::config::{Config, TopicSelection};
use livetable::patch::merge;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn setup(
    first: usize,
    tweak: impl FnOnce(&mut Config),
) -> (
    livetable::Service,
    String,
    String,
    Vec<FixtureRecord>,
    tempfile::TempDir,
) {
    init_logs();
    let u = unique("fan");
    let topic = format!("{u}.public.game_odds");
    create_topic(&topic, 1).await;
    let records = load_fixture("pg_f_decimal_string.jsonl");
    produce(&producer(), &topic, &records[..first]).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    tweak(&mut c);
    let (svc, base) = start_service(c).await;
    if first > 0 {
        table_at_seq(&base, "game_odds", first as u64).await;
    }
    (svc, base, topic, records, dir)
}

async fn connect(base: &str, path_query: &str) -> Ws {
    let url = format!("{}{path_query}", base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn next_json(ws: &mut Ws) -> Value {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < until,
            "no message but status notices for 60 s"
        );
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .unwrap()
            .unwrap();
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                // freshness notices may come at any time (a burst puts the node behind)
                if v["type"] == "status" {
                    continue;
                }
                return v;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Applies messages until the client's state is at `seq` (a snapshot in parts read to its last
/// part), checking that patches carry only changed columns; returns the state, the messages
/// seen, and how many patch entries of rows it held it checked.
async fn follow_to(
    ws: &mut Ws,
    mut state: Value,
    mut seq: u64,
    target: u64,
) -> (Value, u64, usize, usize) {
    let mut n = 0;
    let mut checked = 0;
    let mut more = false;
    let until = std::time::Instant::now() + Duration::from_secs(240);
    while seq < target || more {
        assert!(
            std::time::Instant::now() < until,
            "the client is at seq {seq} of {target} after 240 s ({n} messages)"
        );
        let m = next_json(ws).await;
        n += 1;
        match m["type"].as_str().unwrap() {
            "snapshot" => state = m["rows"].clone(),
            "patch" => {
                checked += changed_columns_only(&state, &m["patch"]);
                merge(&mut state, &m["patch"]);
            }
            other => panic!("unexpected message {other}: {m}"),
        }
        seq = m["seq"].as_u64().unwrap();
        more = m["more"] == true;
    }
    (state, seq, n, checked)
}

/// Checks that each entry of `patch` for a row `state` holds carries only columns whose value
/// differs from the held one; returns how many such entries it checked.
fn changed_columns_only(state: &Value, patch: &Value) -> usize {
    let mut checked = 0;
    for (key, entry) in patch.as_object().expect("a patch is an object") {
        let (Some(held), Some(cols)) = (state[key].as_object(), entry.as_object()) else {
            continue;
        };
        for (col, v) in cols {
            assert_ne!(
                held.get(col),
                Some(v),
                "a patch of {key} carries its unchanged column {col}: {patch}"
            );
        }
        checked += 1;
    }
    checked
}

/// The API's rows as a client sees them (NULL columns absent).
async fn api_rows(base: &str, keys: Option<&[&str]>) -> (Value, u64) {
    let (_, body) = get_json(&format!("{base}/api/tables/game_odds")).await;
    let mut rows = serde_json::Map::new();
    for (k, row) in body["rows"].as_object().unwrap() {
        if keys.is_none_or(|ks| ks.contains(&k.as_str())) {
            let r: serde_json::Map<String, Value> = row
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect();
            rows.insert(k.clone(), Value::Object(r));
        }
    }
    (Value::Object(rows), body["seq"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_patches_equal_the_api_and_keys_filter() {
    let (svc, base, topic, records, _dir) = setup(5, |_| {}).await;
    let mut all = connect(&base, "/ws?table=game_odds").await;
    let mut some = connect(&base, "/ws?table=game_odds&keys=g1,g5").await;
    let snap = next_json(&mut all).await;
    assert_eq!(
        (snap["type"].as_str(), snap["seq"].as_u64()),
        (Some("snapshot"), Some(5))
    );
    assert_eq!(snap["rows"], api_rows(&base, None).await.0);
    let snap_some = next_json(&mut some).await;
    assert_eq!(
        snap_some["rows"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["g1"],
        "g5 does not exist yet"
    );
    let epoch = snap["epoch"].clone();

    produce(&producer(), &topic, &records[5..]).await;
    let (state, seq, _, checked) = follow_to(&mut all, snap["rows"].clone(), 5, 12).await;
    assert!(checked > 0, "updates of rows the client held were checked");
    assert_eq!(seq, 12);
    assert_eq!(
        state,
        api_rows(&base, None).await.0,
        "snapshot + patches == API at the same seq"
    );

    // the filtered client only ever sees its keys, and ends equal to the filtered API
    let mut fstate = snap_some["rows"].clone();
    loop {
        let m = next_json(&mut some).await;
        assert_eq!(m["type"], "patch");
        assert_eq!(m["epoch"], epoch);
        assert!(
            m["ts_ms"].as_i64().is_some(),
            "patches carry the commit time"
        );
        for k in m["patch"].as_object().unwrap().keys() {
            assert!(k == "g1" || k == "g5", "unsubscribed key {k} in {m}");
        }
        // a changed row carries only its changed columns
        changed_columns_only(&fstate, &m["patch"]);
        merge(&mut fstate, &m["patch"]);
        if fstate == api_rows(&base, Some(&["g1", "g5"])).await.0 {
            break;
        }
    }
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_gets_a_patch_within_the_buffer_and_a_snapshot_outside() {
    let (svc, base, topic, records, _dir) = setup(4, |c| c.replay_buffer = 4).await;
    let mut ws = connect(&base, "/ws?table=game_odds").await;
    let snap = next_json(&mut ws).await;
    let (epoch, seq, pos) = (
        snap["epoch"].as_str().unwrap().to_string(),
        snap["seq"].as_u64().unwrap(),
        snap["pos"].as_str().unwrap().to_string(),
    );
    ws.close(None).await.unwrap();

    // 3 more changes: within a buffer of 4
    produce(&producer(), &topic, &records[4..7]).await;
    table_at_seq(&base, "game_odds", 7).await;
    let mut ws = connect(&base, &format!("/ws?table=game_odds&since={pos}")).await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("patch"), Some(7)),
        "resume hit: one patch, {m}"
    );
    let mut state = snap["rows"].clone();
    merge(&mut state, &m["patch"]);
    assert_eq!(state, api_rows(&base, None).await.0);
    ws.close(None).await.unwrap();

    // 5 more changes: the buffer (4 changes, whole batches) now starts after seq 7, so a client
    // still at the first snapshot's seq cannot resume
    produce(&producer(), &topic, &records[7..]).await;
    table_at_seq(&base, "game_odds", 12).await;
    let mut ws = connect(&base, &format!("/ws?table=game_odds&since={pos}")).await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("snapshot"), Some(12)),
        "resume miss: {m}"
    );
    // a foreign lineage, and a token of protocol version 1 (EPOCH:SEQ), get snapshots
    for since in ["other~3".to_string(), format!("{epoch}:{seq}")] {
        let mut ws2 = connect(&base, &format!("/ws?table=game_odds&since={since}")).await;
        assert_eq!(
            next_json(&mut ws2).await["type"],
            "snapshot",
            "since={since}"
        );
    }
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains(r#"livetable_resumes_total{result="hit"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"livetable_resumes_total{result="miss"} 3"#));
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_others_keep_being_served() {
    let (svc, base, topic, records, _dir) = setup(3, |_| {}).await;
    let mut bad = connect(&base, "/ws?table=game_odds").await;
    let mut good = connect(&base, "/ws?table=game_odds").await;
    next_json(&mut bad).await;
    let snap = next_json(&mut good).await;

    bad.send(Message::text("{not json")).await.unwrap();
    let e = next_json(&mut bad).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_message"))
    );
    // a table that does not exist (yet): the subscription waits for it, and says so
    bad.send(Message::text(r#"{"type":"subscribe","table":"nope"}"#))
        .await
        .unwrap();
    let w = next_json(&mut bad).await;
    assert_eq!(
        (w["type"].as_str(), w["table"].as_str()),
        (Some("waiting"), Some("nope")),
        "{w}"
    );
    bad.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_json(&mut bad).await["code"], "bad_message");
    bad.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert_eq!(
        next_json(&mut bad).await["type"],
        "pong",
        "still usable after errors"
    );
    // an oversized frame: the server closes that connection (1009) and only that one
    let _ = bad.send(Message::text("x".repeat(200_000))).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match bad.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "oversized frame closes the connection");

    produce(&producer(), &topic, &records[3..]).await;
    let (state, _, _, _) = follow_to(&mut good, snap["rows"].clone(), 3, 12).await;
    assert_eq!(state, api_rows(&base, None).await.0);
    // over SSE too, a table that does not exist yet is waited for
    let resp = reqwest::get(format!("{base}/sse?table=nope"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(std::str::from_utf8(&chunk)
        .unwrap()
        .contains("event: waiting"));
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_format_on_the_root_path_like_the_seed_clients() {
    let (svc, base, topic, records, _dir) = setup(3, |c| {
        c.default_format = livetable::fanout::protocol::Format::Rows
    })
    .await;
    let mut ws = connect(&base, "/").await; // one table served: no ?table needed
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let row = next_json(&mut ws).await;
        seen.insert(row["game_id"].as_str().unwrap().to_string(), row);
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["g1", "g2", "g3"]);
    assert_eq!(seen["g1"]["odd1"], "1.500", "a flat row per message");
    produce(&producer(), &topic, &records[3..9]).await; // c g4, u g1, u g2, u g4, d g3, tombstone
    let mut deleted = None;
    for _ in 0..20 {
        let row = next_json(&mut ws).await;
        assert!(
            row.get("type").is_none(),
            "no envelope in rows format: {row}"
        );
        if row["__deleted"] == json!(true) {
            deleted = Some(row);
            break;
        }
        assert!(row["odd1"].is_string(), "changed rows come in full: {row}");
    }
    let deleted = deleted.expect("a delete message");
    assert_eq!(deleted["game_id"], "g3");
    // up_to_date=true: the rows sent on connect, then a marker saying they are complete (a client
    // that reconnects drops what it held and is not among them), then the changes
    let mut marked = connect(&base, "/?up_to_date=true").await;
    let mut initial = std::collections::BTreeSet::new();
    loop {
        let m = next_json(&mut marked).await;
        if m == json!({"__up_to_date": true}) {
            break;
        }
        assert!(m["odd2"].is_string(), "a row before the marker: {m}");
        initial.insert(m["game_id"].as_str().unwrap().to_string());
    }
    assert_eq!(initial.into_iter().collect::<Vec<_>>(), ["g1", "g2", "g4"]);
    let mut one = connect(
        &base,
        "/ws?table=game_odds&format=rows&keys=g1&up_to_date=1",
    )
    .await;
    assert_eq!(next_json(&mut one).await["game_id"], "g1");
    assert_eq!(next_json(&mut one).await, json!({"__up_to_date": true}));
    let mut bad = connect(&base, "/?up_to_date=maybe").await;
    let m = next_json(&mut bad).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{m}"
    );
    produce(&producer(), &topic, &records[9..10]).await; // c g5
    let row = next_json(&mut marked).await;
    assert_eq!(row["game_id"], "g5", "a change after the marker: {row}");
    assert!(row["odd1"].is_null(), "rows keep NULL columns: {row}");
    // --default-format is for `/` only: `/ws` (the live page's endpoint) still speaks patches
    let mut page = connect(&base, "/ws").await;
    assert_eq!(next_json(&mut page).await["type"], "snapshot");
    // and so do its later subscriptions, after it held none (--default-format does not apply)
    page.send(Message::text(
        r#"{"type":"unsubscribe","table":"game_odds"}"#,
    ))
    .await
    .unwrap();
    page.send(Message::text(r#"{"type":"subscribe","table":"game_odds"}"#))
        .await
        .unwrap();
    let m = next_json(&mut page).await;
    assert_eq!(m["type"], "snapshot", "{m}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Change `i` of key `k{i % 100}`: it rewrites a 4 KB column, so 10k changes (~40 MB of
/// patches) overflow the kernel's socket buffers of a client that does not read.
fn big_tick(i: usize) -> FixtureRecord {
    FixtureRecord {
        key: Some(format!(r#"{{"id":"k{}"}}"#, i % 100)),
        value: Some(format!(
            r#"{{"id":"k{}","n":{i},"pad":"{}","__op":"u","__table":"ticks"}}"#,
            i % 100,
            format!("{i:06}").repeat(700)
        )),
        headers: vec![],
    }
}

/// A service on a new one-partition topic `<name>.ticks` with `slow_client`, its table `ticks`
/// at its first 100 changes ([`big_tick`]).
async fn ticks_service(
    name: &str,
    slow_client: Duration,
) -> (livetable::Service, String, String, tempfile::TempDir) {
    init_logs();
    let u = unique(name);
    let topic = format!("{u}.ticks");
    create_topic(&topic, 1).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.slow_client = slow_client;
    c.max_batch = 200;
    // the hub keeps every update a stalled client has not read (10k changes of ~4 KB: more than
    // the default budget), so these tests see the backlog composed; tests/fanout_budget.rs covers
    // a backlog the budget dropped
    c.fanout_buffer_bytes = 1 << 30;
    let (svc, base) = start_service(c).await;
    produce(
        &producer(),
        &topic,
        &(0..100).map(big_tick).collect::<Vec<_>>(),
    )
    .await;
    table_at_seq(&base, "ticks", 100).await;
    (svc, base, topic, dir)
}

/// Changes 100..10_100 ([`big_tick`]) in 50 bursts of 200, 20 ms apart (the pace of a feed, not
/// a wait for anything).
async fn produce_big_ticks(topic: &str) {
    let p = producer();
    for chunk in (100..10_100).collect::<Vec<_>>().chunks(200) {
        produce(
            &p,
            topic,
            &chunk.iter().map(|i| big_tick(*i)).collect::<Vec<_>>(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_conflated_then_gets_the_final_state() {
    // the slow client is stalled far longer than the socket buffers last; it must not be dropped
    let (svc, base, topic, _dir) = ticks_service("slow", Duration::from_secs(120)).await;
    let mut slow = connect(&base, "/ws?table=ticks").await;
    let mut fast = connect(&base, "/ws?table=ticks").await;
    let snap = next_json(&mut slow).await;
    let fsnap = next_json(&mut fast).await;
    // `fast` reads all along; 10k changes flow, in 50 bursts, while `slow` reads nothing
    let fast_reader =
        tokio::spawn(async move { follow_to(&mut fast, fsnap["rows"].clone(), 100, 10_100).await });
    produce_big_ticks(&topic).await;
    let (fstate, _, fast_msgs, _) = fast_reader.await.unwrap();
    let (state, seq, slow_msgs, _) = follow_to(&mut slow, snap["rows"].clone(), 100, 10_100).await;
    let (api, api_seq) = {
        let (_, body) = get_json(&format!("{base}/api/tables/ticks")).await;
        (body["rows"].clone(), body["seq"].as_u64().unwrap())
    };
    assert_eq!((seq, api_seq), (10_100, 10_100));
    assert_eq!(state, api);
    assert_eq!(fstate, api);
    eprintln!(
        "fast client: {fast_msgs} messages, slow client: {slow_msgs} messages for 10000 changes"
    );
    assert!(
        slow_msgs < fast_msgs,
        "the slow client got composed patches ({slow_msgs} vs {fast_msgs} messages)"
    );
    let metrics = metrics_text(&base).await;
    let conflated = metric_value(&metrics, "livetable_conflated_changes_total").unwrap_or(0.0);
    assert!(
        conflated > 0.0,
        "changes were composed into a pending patch"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_past_slow_client_is_closed_and_the_others_go_on() {
    let (svc, base, topic, _dir) = ticks_service("stall", Duration::from_secs(1)).await;
    let mut stalled = connect(&base, "/ws?table=ticks").await;
    let mut fast = connect(&base, "/ws?table=ticks").await;
    assert_eq!(next_json(&mut stalled).await["type"], "snapshot");
    let fsnap = next_json(&mut fast).await;
    let fast_reader =
        tokio::spawn(async move { follow_to(&mut fast, fsnap["rows"].clone(), 100, 10_100).await });
    produce_big_ticks(&topic).await;
    // the reading client is not held back and gets everything
    let (fstate, fseq, _, _) = fast_reader.await.unwrap();
    let (_, body) = get_json(&format!("{base}/api/tables/ticks")).await;
    assert_eq!(fseq, 10_100);
    assert_eq!(fstate, body["rows"]);
    // the one that stopped reading is closed once a write waited longer than slow_client. The
    // disconnect is counted when the write gives up, its close reason once the close frame was
    // tried (up to 1 s later): wait for both (a CI run read the metrics between the two)
    let closed = eventually(
        "a slow-client disconnect",
        Duration::from_secs(30),
        || async {
            let m = metrics_text(&base).await;
            let closed =
                m.contains(r#"livetable_connections_closed_total{reason="slow_client"} 1"#);
            metric_value(&m, "livetable_slow_client_disconnects_total")
                .filter(|v| *v >= 1.0 && closed)
                .map(|_| m)
        },
    )
    .await;
    assert_eq!(
        metric_value(&closed, "livetable_slow_client_disconnects_total"),
        Some(1.0)
    );
    assert!(
        closed.contains(r#"livetable_connections_closed_total{reason="slow_client"} 1"#),
        "{}",
        closed
            .lines()
            .filter(|l| l.contains("connections_closed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // reading again, the client gets what was buffered, then the end of the connection: a close
    // 1008 when the server could still write it, else the socket's end; never a hang
    let (_, code) = read_to_end(&mut stalled, Duration::from_secs(60)).await;
    assert!(matches!(code, None | Some(1008)), "close code {code:?}");
    eprintln!("stalled client: close code {code:?}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_snapshot_patches_and_last_event_id_resume() {
    let (svc, base, topic, records, _dir) = setup(5, |_| {}).await;
    let resp = reqwest::get(format!("{base}/sse?table=game_odds"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events: Vec<(String, String, Value)> = Vec::new();
    let mut state = Value::Null;
    let mut produced = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while state.is_null() || events.last().map(|e| e.2["seq"].as_u64()) != Some(Some(12)) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("sse events in time")
            .unwrap()
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                    ev = v.to_string();
                }
                if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                    id = v.to_string();
                }
                if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            match ev.as_str() {
                "snapshot" => state = v["rows"].clone(),
                "patch" => merge(&mut state, &v["patch"]),
                other => panic!("unexpected event {other}"),
            }
            assert_eq!(
                id,
                v["pos"].as_str().unwrap(),
                "the event id is the resume token"
            );
            assert!(id.starts_with(&format!("{}~", v["epoch"].as_str().unwrap())));
            events.push((ev, id, v));
        }
        if !produced && !state.is_null() {
            produce(&producer(), &topic, &records[5..]).await;
            produced = true;
        }
    }
    assert_eq!(events[0].0, "snapshot");
    assert_eq!(state, api_rows(&base, None).await.0);
    // reconnect with Last-Event-ID from the snapshot: a patch, not a snapshot
    let first_id = events[0].1.clone();
    let resp = reqwest::Client::new()
        .get(format!("{base}/sse?table=game_odds"))
        .header("Last-Event-ID", first_id)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = std::str::from_utf8(&chunk).unwrap().to_string();
    assert!(text.contains("event: patch"), "resume over SSE: {text}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_client_gets_the_shared_snapshot_plus_the_changes_since() {
    let (svc, base, topic, records, _dir) = setup(5, |_| {}).await;
    let mut first = connect(&base, "/ws?table=game_odds").await;
    assert_eq!(next_json(&mut first).await["seq"], 5);
    produce(&producer(), &topic, &records[5..]).await;
    table_at_seq(&base, "game_odds", 12).await;
    // the snapshot built for the first client is reused: at seq 5, then one patch to seq 12
    let mut late = connect(&base, "/ws?table=game_odds").await;
    let snap = next_json(&mut late).await;
    assert_eq!(
        (snap["type"].as_str(), snap["seq"].as_u64()),
        (Some("snapshot"), Some(5))
    );
    let (state, seq, n, _) = follow_to(&mut late, snap["rows"].clone(), 5, 12).await;
    assert_eq!((seq, n), (12, 1), "one catch-up patch");
    assert_eq!(state, api_rows(&base, None).await.0);
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_snapshot_comes_in_bounded_frames_and_equals_the_api() {
    init_logs();
    let u = unique("big");
    let topic = format!("{u}.wide");
    create_topic(&topic, 1).await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c).await;
    // 3000 rows of ~300 bytes: ~1 MB of snapshot, several 128 KiB frames
    let rows: Vec<FixtureRecord> = (0..3000)
        .map(|i| FixtureRecord {
            key: Some(format!(r#"{{"id":"k{i}"}}"#)),
            value: Some(format!(
                r#"{{"id":"k{i}","pad":"{}","__op":"c","__table":"wide"}}"#,
                "x".repeat(280)
            )),
            headers: vec![],
        })
        .collect();
    produce(&producer(), &topic, &rows).await;
    table_at_seq(&base, "wide", 3000).await;
    let (_, api) = get_json(&format!("{base}/api/tables/wide")).await;

    let mut ws = connect(&base, "/ws?table=wide").await;
    let mut state = Value::Null;
    let mut frames = 0;
    loop {
        let m = next_json(&mut ws).await;
        frames += 1;
        assert_eq!(m["seq"], 3000);
        match m["type"].as_str() {
            Some("snapshot") => state = m["rows"].clone(),
            Some("patch") => merge(&mut state, &m["patch"]),
            other => panic!("unexpected {other:?}"),
        }
        if m.get("more").is_none() {
            break;
        }
        assert_eq!(m["more"], true);
    }
    assert!(frames >= 5, "~1 MB in frames of 128 KiB: {frames} frames");
    assert_eq!(state, api["rows"], "the frames together are the table");

    // SSE: the same frames as events; only the last carries the id to resume from, the others
    // an id that names no position (a browser cut off mid-snapshot then starts over)
    let mut resp = reqwest::get(format!("{base}/sse?table=wide"))
        .await
        .unwrap();
    let mut text = String::new();
    let is_position = |l: &str| l.starts_with("id: ") && l != "id: snapshot";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !text.lines().any(is_position) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let ids: Vec<&str> = events
        .iter()
        .map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("id: "))
                .expect("every frame has an id")
        })
        .collect();
    let (last, before) = ids.split_last().unwrap();
    assert!(before.iter().all(|id| *id == "snapshot"), "{ids:?}");
    assert_eq!(
        *last,
        api["pos"].as_str().unwrap(),
        "the last frame's id is the position"
    );
    // a browser cut off after the first frame reconnects with that id: a fresh snapshot, even
    // with a `since` that would resume (the position of the snapshot, from the page's URL)
    let mut again = reqwest::Client::new()
        .get(format!(
            "{base}/sse?table=wide&since={}",
            api["pos"].as_str().unwrap()
        ))
        .header("Last-Event-ID", "snapshot")
        .send()
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(20), again.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&chunk);
    assert!(first.starts_with("event: snapshot"), "{first:.200}");
    assert!(events[0].contains("event: snapshot") && events[1].contains("event: patch"));
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Reads `ws` until its end (at most `within`): its last text message, parsed, and the close
/// code it ended with (`None`: the socket ended without a close frame).
async fn read_to_end<S>(ws: &mut S, within: Duration) -> (Option<Value>, Option<u16>)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut last = None;
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, ws.next())
            .await
            .unwrap_or_else(|_| panic!("the connection ends within {within:?}"))
        {
            Some(Ok(Message::Text(t))) => last = Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => return (last, f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (last, None),
        }
    }
}

/// Rows of the `wide` table: 3,000 distinct keys of ~4 KB each, a 12 MB snapshot: far more
/// than loopback's socket buffers take.
const WIDE_ROWS: usize = 3_000;

/// A service with `slow_client` and `grace`, its table `wide` at its [`WIDE_ROWS`] rows.
async fn wide_service(
    name: &str,
    slow_client: Duration,
    grace: Duration,
) -> (livetable::Service, String, tempfile::TempDir) {
    init_logs();
    let u = unique(name);
    let topic = format!("{u}.wide");
    create_topic(&topic, 1).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    c.slow_client = slow_client;
    c.shutdown_grace = grace;
    let (svc, base) = start_service(c).await;
    let rows: Vec<FixtureRecord> = (0..WIDE_ROWS)
        .map(|i| FixtureRecord {
            key: Some(format!(r#"{{"id":"w{i}"}}"#)),
            value: Some(format!(
                r#"{{"id":"w{i}","pad":"{}","__op":"c","__table":"wide"}}"#,
                format!("{i:06}").repeat(700)
            )),
            headers: vec![],
        })
        .collect();
    produce(&producer(), &topic, &rows).await;
    table_at_seq(&base, "wide", WIDE_ROWS as u64).await;
    (svc, base, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_snapshot_is_closed_as_slow() {
    let (svc, base, _dir) =
        wide_service("snapstall", Duration::from_secs(1), Duration::from_secs(10)).await;
    let stalled = small_buffer_ws(&base, "/ws?table=wide").await;
    // the opening write (the snapshot) is bounded like any other: closed once it waited past
    // slow_client, and its connection slot is given back
    let m = eventually(
        "the stalled opening closed as slow",
        Duration::from_secs(30),
        || async {
            let m = metrics_text(&base).await;
            (metric_value(&m, "livetable_slow_client_disconnects_total") == Some(1.0)
                && m.contains(r#"livetable_connections_closed_total{reason="slow_client"} 1"#))
            .then_some(m)
        },
    )
    .await;
    assert_eq!(
        metric_value(&m, "livetable_connections"),
        Some(0.0),
        "{}",
        m.lines()
            .filter(|l| l.starts_with("livetable_connections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // a reading client still gets the whole table
    let mut reader = connect(&base, "/ws?table=wide").await;
    let mut rows = 0;
    loop {
        let msg = next_json(&mut reader).await;
        rows += msg["rows"]
            .as_object()
            .or(msg["patch"].as_object())
            .map_or(0, |r| r.len());
        if msg["more"] != true {
            break;
        }
    }
    assert_eq!(rows, WIDE_ROWS);
    drop(stalled);
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_for_a_client_that_does_not_read_its_snapshot() {
    // slow_client far beyond the test: only the shutdown can end the stalled write
    let (svc, base, _dir) = wide_service(
        "snapstop",
        Duration::from_secs(300),
        Duration::from_secs(30),
    )
    .await;
    let mut stalled = small_buffer_ws(&base, "/ws?table=wide").await;
    eventually(
        "the snapshot write has started",
        Duration::from_secs(30),
        || async {
            let m = metrics_text(&base).await;
            (metric_value(&m, "livetable_connections") == Some(1.0)
                && metric_value(&m, "livetable_snapshots_sent_total") >= Some(1.0))
            .then_some(())
        },
    )
    .await;
    svc.shutdown();
    svc.wait().await.unwrap();
    // give the connection's task time to end on its own, then read: had it kept waiting, reading
    // now would let it finish the snapshot and send its 1001
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (last, closed_by) = read_to_end(&mut stalled, Duration::from_secs(30)).await;
    let last_more = last.map(|v| v["more"] == true);
    eprintln!("stalled at shutdown: last frame more={last_more:?}, close {closed_by:?}");
    assert_eq!(
        last_more,
        Some(true),
        "the server gave up the snapshot at shutdown (a complete one means it waited for the client)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_for_an_sse_client_that_does_not_read() {
    use tokio::io::AsyncWriteExt;
    // the idle timeout (60 s) and the grace (30 s) are far beyond the bound asserted below: only
    // the shutdown's stall limit can end the stuck response in time
    let grace = Duration::from_secs(30);
    let (svc, base, _dir) = wide_service("ssestop", Duration::from_secs(300), grace).await;
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /sse?table=wide HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    eventually(
        "the SSE snapshot is being written",
        Duration::from_secs(30),
        || async {
            let m = metrics_text(&base).await;
            (metric_value(&m, "livetable_snapshots_sent_total") >= Some(1.0)).then_some(())
        },
    )
    .await;
    // the client reads nothing: the 12 MB snapshot stalls on the socket's buffers
    let started = std::time::Instant::now();
    svc.shutdown();
    svc.wait().await.unwrap();
    let took = started.elapsed();
    eprintln!("shutdown with a stalled SSE client took {took:?}");
    assert!(
        took < grace / 2,
        "the shutdown waited {took:?} for a client that does not read (grace {grace:?})"
    );
    drop(stream);
}
