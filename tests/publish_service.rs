//! Publishing through the running service (issue 16): WebSocket `publish` messages and
//! `POST /api/topics/{topic}`, against the real broker, with ids that survive a restart.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;
use livetable::config::{Config, TopicSelection};
use livetable::publish::PublishConfig;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A service whose `[publish]` table lists `topic` (created with 2 partitions when missing).
fn config_with(topic: &str, dir: &std::path::Path, u: &str, rate: u32) -> Config {
    let mut c = test_config(TopicSelection::Names(vec![format!("{u}.in")]), dir, u);
    let text = format!(
        "[publish]\nack_timeout_ms = 10000\n[[publish.topic]]\nname = \"{topic}\"\npartitions = 2\nrate_per_sec = {rate}\n"
    );
    c.publish = PublishConfig::from_toml(&text, dir).unwrap();
    assert!(c.publish.is_some());
    c
}

async fn connect(base: &str) -> Ws {
    let url = format!("{}/ws", base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// Reads frames until the answers (`ack`/`nack`) of `n` publishes arrived, by id.
async fn answers(ws: &mut Ws, n: usize) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        let msg = tokio::time::timeout_at(until, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} answers after 60 s", out.len()))
            .expect("the connection stays open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if matches!(v["type"].as_str(), Some("ack" | "nack")) {
                let id = v["id"].as_str().unwrap().to_string();
                assert!(out.insert(id.clone(), v).is_none(), "{id} answered twice");
            }
        }
    }
    out
}

async fn publish(ws: &mut Ws, topic: &str, key: &str, value: Value, id: &str) {
    let m = json!({"type": "publish", "topic": topic, "key": key, "value": value, "id": id});
    ws.send(Message::Text(m.to_string().into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_http_publishes_are_acknowledged_once_across_a_restart() {
    let u = unique("pubsvc");
    let topic = format!("{u}.bets");
    let dir = tempdir();
    let c = config_with(&topic, dir.path(), &u, 1000);
    let (svc, base) = start_service(c.clone()).await;

    // WebSocket: ack with a position, a retry of the id gets the same position, an unlisted topic
    // is forbidden, a bad publish is a bad_request; the connection stays usable after nacks
    let mut ws = connect(&base).await;
    // the topic was just created: until its metadata arrives a publish is `unavailable`, and a
    // client retries with the same id (docs/publish.md)
    let first = {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            publish(&mut ws, &topic, "g1", json!({"stake": 5}), "w-1").await;
            let a = answers(&mut ws, 1).await.remove("w-1").unwrap();
            if a["code"] != "unavailable" || tokio::time::Instant::now() > until {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    publish(&mut ws, &topic, "g1", json!({"stake": 5}), "w-1").await;
    publish(&mut ws, "not.listed", "g1", json!({"stake": 5}), "w-2").await;
    ws.send(Message::Text(
        json!({"type": "publish", "topic": topic, "id": "w-3"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let a = answers(&mut ws, 3).await;
    assert_eq!(first["type"], "ack", "{first}");
    assert_eq!(a["w-1"]["type"], "ack", "{:?}", a["w-1"]);
    assert_eq!(a["w-1"]["offset"], first["offset"]);
    assert_eq!(a["w-1"]["topic"], topic.as_str());
    assert_eq!(a["w-2"]["code"], "forbidden", "{:?}", a["w-2"]);
    assert_eq!(a["w-3"]["code"], "bad_request", "{:?}", a["w-3"]);
    publish(&mut ws, &topic, "g1", json!({"stake": 5}), "w-1").await;
    let again = answers(&mut ws, 1).await;
    assert_eq!(again["w-1"]["duplicate"], true, "{:?}", again["w-1"]);
    assert_eq!(again["w-1"]["offset"], a["w-1"]["offset"]);
    assert_eq!(again["w-1"]["partition"], a["w-1"]["partition"]);

    // HTTP: the Idempotency-Key is the id; a bad body is a 400 with a nack
    let url = format!("{base}/api/topics/{topic}");
    let post = |key: &'static str| {
        http()
            .post(&url)
            .header("Idempotency-Key", key)
            .json(&json!({"key": "g2", "value": {"stake": 7}}))
            .send()
    };
    let r1 = post("h-1").await.unwrap();
    assert_eq!(r1.status().as_u16(), 200);
    let r1: Value = r1.json().await.unwrap();
    let r2: Value = post("h-1").await.unwrap().json().await.unwrap();
    assert_eq!(r1["type"], "ack", "{r1}");
    assert_eq!(r2["duplicate"], true, "{r2}");
    assert_eq!(r1["offset"], r2["offset"]);
    let bad = http().post(&url).body("not json").send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["code"], "bad_request", "{bad}");
    let unlisted = http()
        .post(format!("{base}/api/topics/nope"))
        .json(&json!({"key": "k", "value": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(unlisted.status().as_u16(), 403);
    drop(ws);
    svc.shutdown();
    svc.wait().await.unwrap();

    // restarted on the same data directory: the ids are remembered
    let (svc, base) = start_service(c).await;
    let mut ws = connect(&base).await;
    publish(&mut ws, &topic, "g1", json!({"stake": 5}), "w-1").await;
    let after = answers(&mut ws, 1).await;
    assert_eq!(after["w-1"]["duplicate"], true, "{:?}", after["w-1"]);
    assert_eq!(after["w-1"]["offset"], a["w-1"]["offset"]);

    // the topic holds each record once, with its id in a header
    let brokers = brokers();
    let records = tokio::task::spawn_blocking(move || {
        read_to_end(&brokers, &topic, 2, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let ids: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "livetable.publish_id")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(ids.len(), 2, "records: {ids:?}");
    assert!(ids.contains(&"\"w-1\"".to_string()) && ids.contains(&"\"h-1\"".to_string()));
    let w1 = records
        .iter()
        .find(|r| r.headers.iter().any(|(_, v)| v == "\"w-1\""))
        .unwrap();
    assert_eq!(w1.key.as_deref(), Some("g1"));
    assert_eq!(
        serde_json::from_str::<Value>(w1.value.as_deref().unwrap()).unwrap(),
        json!({"stake": 5})
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// A client that floods publishes faster than they are answered is slowed down (the socket is not
/// read past a bound) and gets exactly one answer per publish; nothing grows without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_gets_one_answer_per_publish() {
    let u = unique("pubflood");
    let topic = format!("{u}.bets");
    let dir = tempdir();
    let (svc, base) = start_service(config_with(&topic, dir.path(), &u, 50)).await;
    let ws = connect(&base).await;
    let (mut tx, mut rx) = ws.split();
    let n = 3000usize;
    let t = topic.clone();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let m = json!({"type": "publish", "topic": t, "key": format!("k{}", i % 7), "value": {"i": i}, "id": format!("f-{i}")});
            tx.send(Message::Text(m.to_string().into())).await.unwrap();
        }
        tx
    });
    let mut codes: HashMap<String, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < n {
        let msg = tokio::time::timeout_at(until, rx.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} answers", seen.len()))
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if let Some(kind @ ("ack" | "nack")) = v["type"].as_str() {
                assert!(seen.insert(v["id"].as_str().unwrap().to_string()));
                let label = if kind == "ack" {
                    "ack".to_string()
                } else {
                    v["code"].as_str().unwrap().to_string()
                };
                *codes.entry(label).or_default() += 1;
            }
        }
    }
    let _tx = writer.await.unwrap();
    eprintln!("answers to {n} publishes: {codes:?}");
    assert!(codes.get("ack").copied().unwrap_or(0) >= 50, "{codes:?}");
    assert!(
        codes
            .keys()
            .all(|c| matches!(c.as_str(), "ack" | "rate_limited" | "too_many_in_flight")),
        "{codes:?}"
    );
    let m = metrics_text(&base).await;
    assert!(
        m.contains("livetable_publishes_total{"),
        "publish metrics exist"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

/// Without `[publish]`, a publish is refused clearly and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_publish_topics_a_publish_is_refused() {
    let u = unique("nopub");
    let dir = tempdir();
    let c = test_config(
        TopicSelection::Names(vec![format!("{u}.in")]),
        dir.path(),
        &u,
    );
    let (svc, base) = start_service(c).await;
    let mut ws = connect(&base).await;
    publish(&mut ws, "anything", "k", json!({}), "n-1").await;
    let a = answers(&mut ws, 1).await;
    assert_eq!(a["n-1"]["type"], "nack");
    assert_eq!(a["n-1"]["code"], "forbidden");
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    let r = http()
        .post(format!("{base}/api/topics/anything"))
        .json(&json!({"key": "k", "value": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    svc.shutdown();
    svc.wait().await.unwrap();
}
