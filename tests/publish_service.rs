//! Publishing through the running service (issue 16): WebSocket `publish` messages and
//! `POST /api/topics/{topic}`, against the real broker, with ids that survive a restart; with
//! tokens (`--auth jwt`), only to the topics a token's `publish` list allows, with pinned fields
//! checked against its claims and ids scoped by its `sub`.

mod common;
mod secure;

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;
use livetable::config::security::{AuthConfig, JwtConfig, KeySource};
use livetable::config::{Config, TopicSelection};
use livetable::publish::PublishConfig;
use secure::{bearer, hs256, next_msg, secret_file, ws_with};

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

/// The names of the topics `GET /api/topics` lists for `token`, sorted.
async fn listed_topics(base: &str, token: &str) -> Vec<String> {
    let v: Value = http()
        .get(format!("{base}/api/topics"))
        .header("authorization", bearer(token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<String> = v["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
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
    // no id: refused (its answer could not be matched, its retry would write it twice)
    ws.send(Message::Text(
        json!({"type": "publish", "topic": topic, "key": "g1", "value": {"stake": 1}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let no_id = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer")
            .expect("the connection stays open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if matches!(v["type"].as_str(), Some("ack" | "nack")) {
                break v;
            }
        }
    };
    assert_eq!(
        (&no_id["type"], &no_id["code"], &no_id["id"]),
        (&json!("nack"), &json!("bad_request"), &Value::Null),
        "{no_id}"
    );
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
    // a body over the request limit is a nack too (before: axum's plain-text 413), with its id
    let huge = format!(
        r#"{{"key":"g2","value":{{"note":"{}"}}}}"#,
        "x".repeat(3 << 20)
    );
    let huge = http()
        .post(&url)
        .header("Idempotency-Key", "h-huge")
        .header("Content-Type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    let huge: Value = huge.json().await.unwrap();
    assert_eq!(
        (&huge["type"], &huge["code"], &huge["id"]),
        (&json!("nack"), &json!("too_large"), &json!("h-huge")),
        "{huge}"
    );
    let m = common::metrics_text(&base).await;
    for outcome in ["too_large", "bad_request"] {
        let name = format!("livetable_publishes_total{{outcome=\"{outcome}\",topic=\"{topic}\"}}");
        assert!(
            common::metric_value(&m, &name).unwrap_or(0.0) >= 1.0,
            "{name} not counted"
        );
    }
    // an id that is not visible ASCII is refused, not published without it
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"bestellung-\xe4").unwrap();
    let odd = http()
        .post(&url)
        .header("Idempotency-Key", latin1)
        .json(&json!({"key": "g2", "value": {"stake": 9}}))
        .send()
        .await
        .unwrap();
    assert_eq!(odd.status().as_u16(), 400);
    let odd: Value = odd.json().await.unwrap();
    assert_eq!(odd["code"], "bad_request", "{odd}");
    // a page of another origin cannot publish through a visitor's browser (no preflight for a
    // text/plain POST): refused like its WebSocket would be
    let cross = http()
        .post(&url)
        .header("Origin", "http://evil.example")
        .header("Content-Type", "text/plain")
        .body(r#"{"key":"g2","value":{"stake":666}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status().as_u16(), 403);
    let cross: Value = cross.json().await.unwrap();
    assert_eq!(cross["code"], "origin_not_allowed", "{cross}");
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

/// A service with tokens (HS256) and two writable topics: `bets`, whose `user_id` is pinned to
/// the token's `sub`, and `other`. Returns the config, the secret, and the two topic names.
fn token_config(dir: &std::path::Path, u: &str) -> (Config, String, String, String) {
    let bets = format!("{u}.bets");
    let other = format!("{u}.other");
    let mut c = test_config(TopicSelection::Names(vec![format!("{u}.in")]), dir, u);
    let text = format!(
        "[publish]\nack_timeout_ms = 10000\n\
         [[publish.topic]]\nname = \"{bets}\"\npartitions = 2\npin = {{ field = \"user_id\", claim = \"sub\" }}\n\
         [[publish.topic]]\nname = \"{other}\"\npartitions = 2\n"
    );
    c.publish = PublishConfig::from_toml(&text, dir).unwrap();
    let (secret, path) = secret_file(dir);
    c.security.auth = AuthConfig::Jwt(JwtConfig {
        keys: KeySource::Secret(path),
        issuer: None,
        audience: None,
        claim: "livetable".into(),
        leeway: Duration::ZERO,
    });
    (c, secret, bets, other)
}

/// A WebSocket on `/ws` with `token` in the `Authorization` header.
async fn connect_with(base: &str, token: &str) -> Ws {
    let h = bearer(token);
    ws_with(base, "/ws", &[("authorization", h.as_str())])
        .await
        .unwrap()
}

/// Publishes until the answer is not `unavailable` (a topic just created has no metadata yet:
/// clients retry with the same id, docs/publish.md).
async fn publish_when_available(
    ws: &mut Ws,
    topic: &str,
    key: &str,
    value: Value,
    id: &str,
) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        publish(ws, topic, key, value.clone(), id).await;
        let a = answers(ws, 1).await.remove(id).unwrap();
        if a["code"] != "unavailable" || tokio::time::Instant::now() > until {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The records of `topic` (2 partitions) as (publish id, principal, value).
async fn published(topic: &str) -> Vec<(String, Option<String>, Value)> {
    let (brokers, topic) = (brokers(), topic.to_string());
    let records = tokio::task::spawn_blocking(move || {
        read_to_end(&brokers, &topic, 2, Duration::from_secs(30))
    })
    .await
    .unwrap();
    records
        .into_iter()
        .map(|r| {
            let header = |name: &str| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            (
                header("livetable.publish_id").unwrap_or_default(),
                header("livetable.principal"),
                serde_json::from_str(r.value.as_deref().unwrap_or("null")).unwrap(),
            )
        })
        .collect()
}

/// Reads until the `authenticated` answer of an `auth` or `refresh` message.
async fn authenticated(ws: &mut Ws) {
    loop {
        let m = next_msg(ws, Duration::from_secs(10)).await;
        match m["type"].as_str() {
            Some("authenticated") => return,
            Some("ack" | "nack" | "error") | None => panic!("before `authenticated`: {m}"),
            _ => {}
        }
    }
}

fn bet(user: &str, stake: u32) -> Value {
    json!({"user_id": user, "stake": stake})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_publishes_only_where_its_token_allows() {
    let u = unique("pubtok");
    let dir = tempdir();
    let (c, secret, bets, other) = token_config(dir.path(), &u);
    let (svc, base) = start_service(c).await;
    let token = |claims: Value| hs256(&secret, claims, 600);

    // `publish: [bets]`: bets is acknowledged with a position; the other writable topic and a
    // pinned field that is not the token's `sub` are forbidden, each saying which rule
    let u1 = token(json!({"sub": "u1", "livetable": {"publish": [bets]}}));
    let mut ws1 = connect_with(&base, &u1).await;
    let first = publish_when_available(&mut ws1, &bets, "g1", bet("u1", 5), "p-1").await;
    assert_eq!(first["type"], "ack", "{first}");
    assert_eq!(first["topic"], bets.as_str());
    assert!(
        first["partition"].is_i64() && first["offset"].is_i64(),
        "{first}"
    );
    publish(&mut ws1, &other, "g1", json!({"stake": 5}), "p-2").await;
    publish(&mut ws1, &bets, "g1", bet("u2", 5), "p-3").await;
    let a = answers(&mut ws1, 2).await;
    assert_eq!(a["p-2"]["code"], "forbidden", "{:?}", a["p-2"]);
    let why = a["p-2"]["message"].as_str().unwrap();
    assert!(why.contains(&other) && why.contains("`publish`"), "{why}");
    assert_eq!(a["p-3"]["code"], "forbidden", "{:?}", a["p-3"]);
    assert!(
        a["p-3"]["message"].as_str().unwrap().contains("user_id"),
        "{:?}",
        a["p-3"]
    );

    // the listing of writable topics shows each token only what it may publish to
    assert_eq!(listed_topics(&base, &u1).await, vec![bets.clone()]);
    let reader = token(json!({"sub": "u2", "livetable": {"tables": ["*"]}}));
    assert!(listed_topics(&base, &reader).await.is_empty());
    // a token without `publish` may publish nothing
    let mut ws2 = connect_with(&base, &reader).await;
    publish(&mut ws2, &bets, "g1", bet("u2", 7), "p-1").await;
    let a = answers(&mut ws2, 1).await;
    assert_eq!(a["p-1"]["code"], "forbidden", "{:?}", a["p-1"]);
    assert!(
        a["p-1"]["message"]
            .as_str()
            .unwrap()
            .contains("no `publish` list"),
        "{:?}",
        a["p-1"]
    );

    // a refresh that grants bets (by a glob) lets the same connection publish; u2's id `p-1` is
    // not u1's: its own record and position, not u1's answer
    let grant = token(json!({"sub": "u2", "livetable": {"publish": [format!("{u}.b*")]}}));
    ws2.send(Message::Text(
        json!({"type": "refresh", "token": grant})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    authenticated(&mut ws2).await;
    publish(&mut ws2, &bets, "g1", bet("u2", 7), "p-1").await;
    let a = answers(&mut ws2, 1).await;
    let own = &a["p-1"];
    assert_eq!(own["type"], "ack", "{own}");
    assert!(own.get("duplicate").is_none(), "{own}");
    assert!(
        (own["partition"].clone(), own["offset"].clone())
            != (first["partition"].clone(), first["offset"].clone()),
        "{own} {first}"
    );
    // and a refresh that takes it away again stops it
    ws2.send(Message::Text(
        json!({"type": "refresh", "token": reader})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    authenticated(&mut ws2).await;
    publish(&mut ws2, &bets, "g1", bet("u2", 8), "p-4").await;
    let a = answers(&mut ws2, 1).await;
    assert_eq!(a["p-4"]["code"], "forbidden", "{:?}", a["p-4"]);

    // u1's retry of `p-1` is still u1's original answer
    publish(&mut ws1, &bets, "g1", bet("u1", 5), "p-1").await;
    let again = answers(&mut ws1, 1).await;
    assert_eq!(again["p-1"]["duplicate"], true, "{:?}", again["p-1"]);
    assert_eq!(again["p-1"]["offset"], first["offset"]);

    // bets holds the two acknowledged records, one per principal; nothing reached `other`
    let mut records = published(&bets).await;
    records.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        records,
        vec![
            ("\"p-1\"".to_string(), Some("u1".to_string()), bet("u1", 5)),
            ("\"p-1\"".to_string(), Some("u2".to_string()), bet("u2", 7)),
        ]
    );
    assert!(published(&other).await.is_empty());
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_publish_goes_only_where_its_token_allows() {
    let u = unique("pubtokh");
    let dir = tempdir();
    let (c, secret, bets, other) = token_config(dir.path(), &u);
    let (svc, base) = start_service(c).await;
    let token = |claims: Value| hs256(&secret, claims, 600);
    let post = |topic: &str, token: Option<&str>, id: &str, value: Value| {
        let mut r = http()
            .post(format!("{base}/api/topics/{topic}"))
            .header("Idempotency-Key", id)
            .json(&json!({"key": "g1", "value": value}));
        if let Some(t) = token {
            r = r.header("authorization", bearer(t));
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let u1 = token(json!({"sub": "u1", "livetable": {"publish": [bets]}}));
    // the topic was just created: `unavailable` until its metadata arrives
    let first = {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (s, a) = post(&bets, Some(&u1), "h-1", bet("u1", 5)).await;
            if s != 503 || tokio::time::Instant::now() > until {
                break (s, a);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(first.0, 200, "{}", first.1);
    let first = first.1;
    assert_eq!(first["type"], "ack", "{first}");
    assert!(first["offset"].is_i64(), "{first}");

    let (s, a) = post(&other, Some(&u1), "h-2", json!({"stake": 1})).await;
    assert_eq!((s, a["code"].as_str()), (403, Some("forbidden")), "{a}");
    assert!(a["message"].as_str().unwrap().contains("`publish`"), "{a}");
    let (s, a) = post(&bets, Some(&u1), "h-3", bet("u2", 1)).await;
    assert_eq!((s, a["code"].as_str()), (403, Some("forbidden")), "{a}");
    assert!(a["message"].as_str().unwrap().contains("user_id"), "{a}");
    // the listing of writable topics shows each token only what it may publish to
    assert_eq!(listed_topics(&base, &u1).await, vec![bets.clone()]);
    let reader = token(json!({"sub": "u2", "livetable": {"tables": ["*"]}}));
    assert!(listed_topics(&base, &reader).await.is_empty());
    let (s, a) = post(&bets, Some(&reader), "h-4", bet("u2", 1)).await;
    assert_eq!((s, a["code"].as_str()), (403, Some("forbidden")), "{a}");
    assert!(
        a["message"].as_str().unwrap().contains("no `publish` list"),
        "{a}"
    );
    let (s, _) = post(&bets, None, "h-5", bet("u2", 1)).await;
    assert_eq!(s, 401, "no token");

    // another principal's `h-1` is its own record; u1's retry is u1's original answer
    let u2 = token(json!({"sub": "u2", "livetable": {"publish": [format!("{u}.b*")]}}));
    let (s, own) = post(&bets, Some(&u2), "h-1", bet("u2", 7)).await;
    assert_eq!(s, 200, "{own}");
    assert!(own.get("duplicate").is_none(), "{own}");
    let (_, again) = post(&bets, Some(&u1), "h-1", bet("u1", 5)).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["offset"], first["offset"]);
    assert_eq!(again["partition"], first["partition"]);

    // the explain endpoint says what a token may publish to
    let h = bearer(&u2);
    let (s, x) = secure::get_with(
        &format!("{base}/api/explain"),
        &[("authorization", h.as_str())],
    )
    .await;
    assert_eq!(s, 200, "{x}");
    assert_eq!(x["token"]["publish"], json!([format!("{u}.b*")]), "{x}");

    let mut records = published(&bets).await;
    records.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        records,
        vec![
            ("\"h-1\"".to_string(), Some("u1".to_string()), bet("u1", 5)),
            ("\"h-1\"".to_string(), Some("u2".to_string()), bet("u2", 7)),
        ]
    );
    assert!(published(&other).await.is_empty());
    svc.shutdown();
    svc.wait().await.unwrap();
}
