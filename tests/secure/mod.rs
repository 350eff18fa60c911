//! Helpers of the exposure tests (tokens, clients that send headers, raw sockets, unwrapped rows):
//! real keys made by the test (rcgen), real clients, real sockets.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::FixtureRecord;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An HS256 secret (48 bytes of text) and its file.
pub fn secret_file(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let secret = format!("test-secret-{}", "x".repeat(36));
    let path = dir.join("jwt.secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    (secret, path)
}

/// A token signed with an HS256 secret; `claims` gets `exp` (now + `ttl` seconds) unless set.
pub fn hs256(secret: &str, mut claims: Value, ttl: i64) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!((now_secs() as i64 + ttl).max(0));
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token signed with a private key in PEM.
pub fn signed(
    alg: jsonwebtoken::Algorithm,
    private_pem: &str,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => {
            jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap()
        }
        _ => jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
    };
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

/// A WebSocket to `base` + `path_query` with extra request headers; the handshake error (an
/// HTTP refusal) as `Err((status, body))`.
pub async fn ws_with(
    base: &str,
    path_query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, String)> {
    let url = format!("{}{path_query}", base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => panic!("websocket connect: {e}"),
    }
}

/// What the server sends next: a JSON message, or its close frame as `{"close": code, "reason"}`.
pub async fn next_msg(ws: &mut Ws, within: Duration) -> Value {
    loop {
        let msg = tokio::time::timeout(within, ws.next())
            .await
            .expect("a message in time");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(f))) => {
                return json!({
                    "close": f.as_ref().map(|f| u16::from(f.code)),
                    "reason": f.as_ref().map(|f| f.reason.to_string()),
                })
            }
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(e)) => return json!({"close": null, "error": e.to_string()}),
            None => return json!({"close": null, "reason": "eof"}),
        }
    }
}

/// Applies snapshots and patches until `done(state)` holds or the deadline passes; a message
/// of another type fails.
pub async fn follow(
    ws: &mut Ws,
    mut state: Value,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = tokio::time::Instant::now() + within;
    while !done(&state) {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "timed out; state {state}");
        let m = next_msg(ws, left).await;
        match m["type"].as_str() {
            Some("snapshot") => state = m["rows"].clone(),
            Some("patch") => livetable::patch::merge(&mut state, &m["patch"]),
            _ => panic!("unexpected {m}"),
        }
    }
    state
}

/// An unwrapped (ExtractNewRecordState) row keyed by its `id`, stamped with the send time.
pub fn row_record(row: Value) -> FixtureRecord {
    let id = row["id"].as_str().unwrap().to_string();
    let mut v = row;
    v["__source_ts_ms"] = json!(now_ms());
    FixtureRecord {
        key: Some(json!({ "id": id }).to_string()),
        value: Some(v.to_string()),
        headers: Vec::new(),
    }
}

/// A tombstone for `id`.
pub fn delete_record(id: &str) -> FixtureRecord {
    FixtureRecord {
        key: Some(json!({ "id": id }).to_string()),
        value: None,
        headers: Vec::new(),
    }
}

/// One HTTP/1.1 request on a fresh socket, read to the end: (status, headers, body).
pub async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// `GET path` with headers: (status, JSON body or Null).
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
