//! Tokens (`--auth jwt`) with real clients over real sockets: a token scoped to one table and a
//! few keys, and one with a row filter (`account_id = sub`), receive nothing outside their claims
//! through any route (HTTP API and listing, WebSocket patch and rows formats, the every-table mode
//! on `/`, unions, SSE, resumes); `exp` is enforced during a connection and a `refresh` message
//! extends it; keys come from files (HS256, RS256/ES256 PEM, JWKS) and are read again when the
//! files change.

mod common;
mod secure;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use livetable::config::security::{AuthConfig, JwtConfig, KeySource};
use livetable::config::{Config, TopicSelection, UnionDef};
use secure::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

struct Env {
    svc: livetable::Service,
    base: String,
    secret: String,
    balances: String,
    odds: String,
    _dir: tempfile::TempDir,
}

fn jwt(keys: KeySource) -> AuthConfig {
    AuthConfig::Jwt(JwtConfig {
        keys,
        issuer: None,
        audience: None,
        claim: "livetable".into(),
        leeway: Duration::ZERO,
    })
}

/// A service with two tables, `balances` (rows of two accounts) and `game_odds` (g1..g4), a union
/// `all` of both, and HS256 tokens.
async fn setup(tweak: impl FnOnce(&mut Config)) -> Env {
    init_logs();
    let u = unique("auth");
    let balances = format!("{u}.public.balances");
    let odds = format!("{u}.public.game_odds");
    create_topic(&balances, 1).await;
    create_topic(&odds, 1).await;
    let p = producer();
    produce(
        &p,
        &balances,
        &[
            row_record(json!({"id": "b1", "account_id": "acct-1", "amount": "10"})),
            row_record(json!({"id": "b2", "account_id": "acct-2", "amount": "20"})),
            row_record(json!({"id": "b3", "account_id": "acct-1", "amount": "30"})),
            row_record(json!({"id": "b4", "account_id": "acct-2", "amount": "40"})),
        ],
    )
    .await;
    produce(
        &p,
        &odds,
        &(1..=4)
            .map(|i| row_record(json!({"id": format!("g{i}"), "odd": format!("1.{i}")})))
            .collect::<Vec<_>>(),
    )
    .await;
    let dir = tempdir();
    let (secret, path) = secret_file(dir.path());
    let mut c = test_config(
        TopicSelection::Names(vec![balances.clone(), odds.clone()]),
        dir.path(),
        &u,
    );
    c.security.auth = jwt(KeySource::Secret(path));
    c.unions = vec![UnionDef {
        name: "all".into(),
        pattern: regex::Regex::new("^(balances|game_odds)$").unwrap(),
    }];
    tweak(&mut c);
    let (svc, base) = start_service(c).await;
    let env = Env {
        svc,
        base,
        secret,
        balances,
        odds,
        _dir: dir,
    };
    let admin = env.token(json!({"livetable": {"tables": ["*"]}}), 600);
    for (t, n) in [("balances", 4), ("game_odds", 4)] {
        eventually(&format!("{t} loaded"), Duration::from_secs(30), || {
            let url = format!("{}/api/tables/{t}", env.base);
            let h = bearer(&admin);
            async move {
                let (s, b) = get_with(&url, &[("authorization", &h)]).await;
                (s == 200 && b["rows"].as_object().is_some_and(|r| r.len() == n)).then_some(())
            }
        })
        .await;
    }
    env
}

impl Env {
    fn token(&self, claims: Value, ttl: i64) -> String {
        hs256(&self.secret, claims, ttl)
    }
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let h = token.map(bearer);
        let headers: Vec<(&str, &str)> = h.iter().map(|h| ("authorization", h.as_str())).collect();
        get_with(&format!("{}{path}", self.base), &headers).await
    }
    async fn stop(self) {
        self.svc.shutdown();
        self.svc.wait().await.unwrap();
    }
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// Every key a message mentions (patch, snapshot rows, a flat row's id).
fn mentioned(m: &Value) -> BTreeSet<String> {
    let mut out = keys_of(&m["rows"]);
    out.extend(keys_of(&m["patch"]));
    if let Some(id) = m["id"].as_str() {
        out.insert(id.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_filter_token_receives_only_its_rows_through_every_route() {
    let env = setup(|_| {}).await;
    let a = env.token(
        json!({"sub": "acct-1", "livetable": {"tables": ["balances"], "rows": {"balances": {"account_id": "sub"}}}}),
        600,
    );
    let auth = bearer(&a);
    let h = [("authorization", auth.as_str())];

    // HTTP API and listing
    let (s, list) = env.get("/api/tables", Some(&a)).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["balances"],
        "the listing shows only what the token reads"
    );
    let (s, t) = env.get("/api/tables/balances", Some(&a)).await;
    assert_eq!(s, 200);
    assert_eq!(keys_of(&t["rows"]), set(&["b1", "b3"]));
    assert_eq!(
        env.get("/api/tables/balances/rows/b1", Some(&a)).await.0,
        200
    );
    let (s, e) = env.get("/api/tables/balances/rows/b2", Some(&a)).await;
    assert_eq!(
        s, 404,
        "another account's row is as if it did not exist: {e}"
    );
    let (s, e) = env.get("/api/tables/game_odds", Some(&a)).await;
    assert_eq!((s, e["code"].as_str()), (403, Some("forbidden")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("game_odds"), "{e}");
    let (_, u) = env.get("/api/tables/all", Some(&a)).await;
    assert_eq!(keys_of(&u["rows"]), set(&["balances/b1", "balances/b3"]));

    // live clients, each through another route
    let mut patch = ws_with(&env.base, "/ws?table=balances", &h).await.unwrap();
    let snap = next_msg(&mut patch, Duration::from_secs(20)).await;
    assert_eq!(keys_of(&snap["rows"]), set(&["b1", "b3"]), "{snap}");
    let mut resumer = ws_with(&env.base, "/ws?table=balances", &h).await.unwrap();
    let rsnap = next_msg(&mut resumer, Duration::from_secs(20)).await;
    let since = rsnap["pos"].as_str().unwrap().to_string();
    resumer.close(None).await.unwrap();
    let mut rows = ws_with(&env.base, &format!("/?format=rows&access_token={a}"), &[])
        .await
        .unwrap();
    let mut union = ws_with(&env.base, "/ws?table=all", &h).await.unwrap();
    let usnap = next_msg(&mut union, Duration::from_secs(20)).await;
    assert_eq!(
        keys_of(&usnap["rows"]),
        set(&["balances/b1", "balances/b3"]),
        "{usnap}"
    );
    let sse = reqwest::Client::new()
        .get(format!("{}/sse?table=balances&access_token={a}", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse_body = sse.bytes_stream();
    let mut rows_seen = Vec::new();
    for _ in 0..2 {
        rows_seen.push(next_msg(&mut rows, Duration::from_secs(20)).await);
    }
    assert_eq!(
        rows_seen
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>(),
        set(&["b1", "b3"]),
        "the every-table rows mode: only the token's rows of its tables"
    );

    // changes: acct-2's rows change (invisible), b1 moves to acct-2 (a delete), b4 moves to
    // acct-1 (whole), b3 changes, b5 (acct-2) and b6 (acct-1) appear; a game changes
    let p = producer();
    produce(
        &p,
        &env.balances,
        &[
            row_record(json!({"id": "b2", "account_id": "acct-2", "amount": "21"})),
            row_record(json!({"id": "b1", "account_id": "acct-2", "amount": "11"})),
            row_record(json!({"id": "b4", "account_id": "acct-1", "amount": "41"})),
            row_record(json!({"id": "b3", "account_id": "acct-1", "amount": "31"})),
            row_record(json!({"id": "b5", "account_id": "acct-2", "amount": "50"})),
            row_record(json!({"id": "b6", "account_id": "acct-1", "amount": "60"})),
        ],
    )
    .await;
    produce(
        &p,
        &env.odds,
        &[row_record(json!({"id": "g1", "odd": "9.9"}))],
    )
    .await;
    let want = json!({
        "b3": {"id": "b3", "account_id": "acct-1", "amount": "31"},
        "b4": {"id": "b4", "account_id": "acct-1", "amount": "41"},
        "b6": {"id": "b6", "account_id": "acct-1", "amount": "60"},
    });
    let state = follow(
        &mut patch,
        snap["rows"].clone(),
        Duration::from_secs(30),
        |s| *s == want,
    )
    .await;
    assert_eq!(state, want);
    let ustate = follow(
        &mut union,
        usnap["rows"].clone(),
        Duration::from_secs(30),
        |s| {
            keys_of(s) == set(&["balances/b3", "balances/b4", "balances/b6"])
                && s["balances/b4"]["amount"] == "41"
                && s["balances/b3"]["amount"] == "31"
        },
    )
    .await;
    assert_eq!(ustate["balances/b6"], want["b6"]);
    // the resume: one patch from the buffer, only the token's rows
    let mut resumed = ws_with(&env.base, &format!("/ws?table=balances&since={since}"), &h)
        .await
        .unwrap();
    let r = next_msg(&mut resumed, Duration::from_secs(20)).await;
    assert_eq!(r["type"], "patch", "a resume hit: {r}");
    assert_eq!(keys_of(&r["patch"]), set(&["b1", "b3", "b4", "b6"]), "{r}");
    assert_eq!(r["patch"]["b1"], Value::Null, "b1 moved out: a delete");
    // rows format: b1 leaves as a deleted row (its columns as the client knew them)
    let mut rows_after = Vec::new();
    while rows_after.len() < 4 {
        rows_after.push(next_msg(&mut rows, Duration::from_secs(20)).await);
    }
    for m in &rows_after {
        assert_ne!(
            m["account_id"], "acct-2",
            "nothing of acct-2 in rows format: {m}"
        );
    }
    let b1 = rows_after.iter().find(|m| m["id"] == "b1").unwrap();
    assert_eq!(b1["__deleted"], true, "{b1}");
    // SSE: snapshot then the same changes
    let mut sse_text = String::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !sse_text.contains("\"b6\"") {
        let chunk = tokio::time::timeout_at(until, sse_body.next())
            .await
            .expect("sse in time")
            .unwrap()
            .unwrap();
        sse_text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(sse_text.contains("event: snapshot"), "{sse_text}");
    // nothing outside the claims, on any route
    for (route, text) in [
        ("sse", sse_text.clone()),
        ("patch", format!("{state}")),
        ("resume", format!("{r}")),
    ] {
        assert!(!text.contains("acct-2"), "{route} leaked acct-2: {text}");
        assert!(
            !text.contains("\"b2\"") && !text.contains("\"b5\""),
            "{route}: {text}"
        );
        assert!(!text.contains("9.9"), "{route} leaked game_odds: {text}");
    }
    for m in rows_seen.iter().chain(&rows_after) {
        assert!(
            mentioned(m).is_subset(&set(&["b1", "b3", "b4", "b6"])),
            "rows mode: {m}"
        );
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_scoped_token_receives_only_its_keys_and_refusals_say_why() {
    let env = setup(|_| {}).await;
    let b = env.token(
        json!({"sub": "desk", "livetable": {"tables": ["game_odds"], "keys": {"game_odds": ["g1", "g2"]}}}),
        600,
    );
    let (_, t) = env.get("/api/tables/game_odds", Some(&b)).await;
    assert_eq!(keys_of(&t["rows"]), set(&["g1", "g2"]));
    let (s, e) = env.get("/api/tables/game_odds/rows/g3", Some(&b)).await;
    assert_eq!(s, 403, "{e}");
    assert!(e["error"].as_str().unwrap().contains("`g3`"), "{e}");
    let (s, e) = env.get("/api/tables/balances", Some(&b)).await;
    assert_eq!(s, 403, "{e}");

    // explain: before subscribing, the client learns what it may read and why not
    let (s, x) = env
        .get("/api/explain?table=game_odds&keys=g1,g3", Some(&b))
        .await;
    assert_eq!(s, 200);
    let x0 = &x["tables"][0];
    assert_eq!(x0["allowed"], false, "{x}");
    assert!(x0["reason"].as_str().unwrap().contains("`g3`"), "{x}");
    let (_, x) = env.get("/api/explain", Some(&b)).await;
    let verdicts: Vec<(String, bool)> = x["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().into(),
                t["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("balances".to_string(), false),
            ("game_odds".to_string(), true)
        ]
    );
    assert_eq!(x["token"]["sub"], "desk");

    // a WebSocket that authenticates with its first message
    let mut ws = ws_with(&env.base, "/ws?table=game_odds", &[])
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type": "auth", "token": b}).to_string(),
    ))
    .await
    .unwrap();
    let ok = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        (ok["type"].as_str(), ok["exp"].is_u64()),
        (Some("authenticated"), true),
        "{ok}"
    );
    let first = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(keys_of(&first["rows"]), set(&["g1", "g2"]), "{first}");
    ws.send(Message::text(
        r#"{"type":"subscribe","table":"game_odds","keys":["g3"]}"#,
    ))
    .await
    .unwrap();
    let e = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        (e["code"].as_str(), e["fatal"].as_bool()),
        (Some("forbidden"), Some(false)),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("`g3`"), "{e}");
    ws.send(Message::text(r#"{"type":"subscribe","table":"balances"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["code"],
        "forbidden"
    );
    ws.send(Message::text(r#"{"type":"subscribe","table":"game_odds"}"#))
        .await
        .unwrap();
    let snap = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(keys_of(&snap["rows"]), set(&["g1", "g2"]), "{snap}");
    // SSE refuses a key outside the claims before streaming
    let resp = reqwest::get(format!(
        "{}/sse?table=game_odds&keys=g3&access_token={b}",
        env.base
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 403);
    let mut sse = reqwest::get(format!("{}/sse?table=game_odds&access_token={b}", env.base))
        .await
        .unwrap()
        .bytes_stream();

    produce(
        &producer(),
        &env.odds,
        &[
            row_record(json!({"id": "g3", "odd": "3.33"})),
            row_record(json!({"id": "g4", "odd": "4.44"})),
            row_record(json!({"id": "g2", "odd": "2.22"})),
        ],
    )
    .await;
    let state = follow(
        &mut ws,
        snap["rows"].clone(),
        Duration::from_secs(30),
        |s| s["g2"]["odd"] == "2.22",
    )
    .await;
    assert_eq!(keys_of(&state), set(&["g1", "g2"]));
    let mut text = String::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !text.contains("2.22") {
        let chunk = tokio::time::timeout_at(until, sse.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!text.contains("3.33") && !text.contains("4.44"), "{text}");
    // nothing else arrives on the WebSocket (a ping answers in order after what is pending)
    ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "pong"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_exp_is_enforced_during_the_connection() {
    let env = setup(|c| c.security.limits.handshake_timeout = Duration::from_secs(2)).await;
    let all = json!({"livetable": {"tables": ["*"]}});
    // no token, a forged one, an expired one
    let (s, e) = env.get("/api/tables", None).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")), "{e}");
    let forged = hs256(&"y".repeat(48), all.clone(), 600);
    let (s, e) = env.get("/api/tables", Some(&forged)).await;
    assert_eq!(s, 401, "{e}");
    assert!(e["error"].as_str().unwrap().contains("signature"), "{e}");
    let expired = env.token(all.clone(), -10);
    let (s, e) = env.get("/api/tables", Some(&expired)).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("token_expired")), "{e}");
    // an HTTP publish without a token is refused before anything else (401, not 404)
    let resp = reqwest::Client::new()
        .post(format!("{}/api/topics/any.topic", env.base))
        .body(r#"{"key":"k","value":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let typo = env.token(json!({"livetable": {"tables": ["*"], "row": {}}}), 600);
    let (s, e) = env.get("/api/tables", Some(&typo)).await;
    assert_eq!(s, 401, "a misspelt claim refuses the token: {e}");
    let err = ws_with(
        &env.base,
        "/ws?table=balances",
        &[("authorization", &bearer(&forged))],
    )
    .await
    .expect_err("a forged token is refused at the upgrade");
    assert_eq!(err.0, 401, "{err:?}");
    // no auth message within the handshake timeout: 4401
    let mut silent = ws_with(&env.base, "/ws?table=balances", &[]).await.unwrap();
    let e = next_msg(&mut silent, Duration::from_secs(10)).await;
    assert_eq!(
        (e["code"].as_str(), e["fatal"].as_bool()),
        (Some("unauthorized"), Some(true)),
        "the connection closes: fatal {e}"
    );
    assert_eq!(
        next_msg(&mut silent, Duration::from_secs(10)).await["close"],
        4401
    );
    // a first message that is not auth: 4401
    let mut rude = ws_with(&env.base, "/ws", &[]).await.unwrap();
    rude.send(Message::text(r#"{"type":"subscribe","table":"balances"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut rude, Duration::from_secs(10)).await["code"],
        "unauthorized"
    );
    assert_eq!(
        next_msg(&mut rude, Duration::from_secs(10)).await["close"],
        4401
    );

    // exp during the connection: closed with 4408 when it passes
    let short = env.token(all.clone(), 3);
    let started = tokio::time::Instant::now();
    let mut ws = ws_with(
        &env.base,
        "/ws?table=balances",
        &[("authorization", &bearer(&short))],
    )
    .await
    .unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "snapshot"
    );
    let e = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        (e["code"].as_str(), e["fatal"].as_bool()),
        (Some("token_expired"), Some(true)),
        "{e}"
    );
    let c = next_msg(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(
        (c["close"].as_u64(), c["reason"].as_str()),
        (Some(4408), Some("token expired"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // SSE: the stream ends with an error event
    let short = env.token(all.clone(), 2);
    let resp = reqwest::get(format!(
        "{}/sse?table=balances&access_token={short}",
        env.base
    ))
    .await
    .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the stream ends at exp")
        .unwrap();
    assert!(
        body.contains("event: error") && body.contains("token_expired"),
        "{body}"
    );

    // refresh before exp: the connection lives on, without a new snapshot
    let short = env.token(all.clone(), 3);
    let mut ws = ws_with(
        &env.base,
        "/ws?table=balances",
        &[("authorization", &bearer(&short))],
    )
    .await
    .unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "snapshot"
    );
    let longer = env.token(all.clone(), 600);
    ws.send(Message::text(
        json!({"type": "refresh", "token": longer}).to_string(),
    ))
    .await
    .unwrap();
    let ok = next_msg(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(ok["type"], "authenticated", "{ok}");
    tokio::time::sleep(Duration::from_secs(5)).await; // past the first token's exp, on purpose
    ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "pong"
    );
    // a refresh that narrows the grants: game_odds goes, balances stays
    ws.send(Message::text(r#"{"type":"subscribe","table":"game_odds"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["type"],
        "snapshot"
    );
    let narrow = env.token(json!({"livetable": {"tables": ["balances"]}}), 600);
    ws.send(Message::text(
        json!({"type": "refresh", "token": narrow}).to_string(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_msg(&mut ws, Duration::from_secs(10)).await);
    }
    assert_eq!(got[0]["type"], "authenticated");
    let forbidden: Vec<&Value> = got.iter().filter(|m| m["code"] == "forbidden").collect();
    assert_eq!(forbidden.len(), 1, "{got:?}");
    assert!(forbidden[0]["message"]
        .as_str()
        .unwrap()
        .contains("game_odds"));
    assert!(
        got.iter()
            .any(|m| m["type"] == "snapshot" && m["table"] == "balances"),
        "{got:?}"
    );
    produce(
        &producer(),
        &env.odds,
        &[row_record(json!({"id": "g1", "odd": "7.77"}))],
    )
    .await;
    produce(
        &producer(),
        &env.balances,
        &[row_record(
            json!({"id": "b2", "account_id": "acct-2", "amount": "22"}),
        )],
    )
    .await;
    let m = next_msg(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(
        (m["table"].as_str(), m["type"].as_str()),
        (Some("balances"), Some("patch")),
        "{m}"
    );
    // a refresh with a bad token is refused and the connection keeps its token
    ws.send(Message::text(
        json!({"type": "refresh", "token": forged}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_msg(&mut ws, Duration::from_secs(10)).await["code"],
        "unauthorized"
    );
    // format=rows has no message that takes rows back: a refresh that changes the grants closes
    // the connection (4409) rather than leave rows the new grants may not allow
    let mut rows = ws_with(
        &env.base,
        "/ws?table=balances&format=rows",
        &[("authorization", &bearer(&env.token(all.clone(), 600)))],
    )
    .await
    .unwrap();
    let first = next_msg(&mut rows, Duration::from_secs(10)).await;
    assert!(first["account_id"].is_string(), "a balances row: {first}");
    rows.send(Message::text(
        json!({"type": "refresh", "token": narrow}).to_string(),
    ))
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = rows.next().await {
            if let Ok(Message::Close(f)) = m {
                return f.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("the rows connection is closed after the refresh");
    assert_eq!(closed, Some(4409));
    env.stop().await;
}

fn write(path: &Path, text: &str) {
    // replace, as a deployment tool does (a new file renamed over the old one)
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn explain_status(base: &str, token: &str) -> u16 {
    get_with(
        &format!("{base}/api/explain"),
        &[("authorization", &bearer(token))],
    )
    .await
    .0
}

async fn until_status(base: &str, token: &str, want: u16, what: &str) {
    eventually(what, Duration::from_secs(15), || async {
        (explain_status(base, token).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_pem_jwks_and_secret_files_are_read_again_when_they_change() {
    init_logs();
    let claims = json!({"exp": now_secs() + 600, "livetable": {"tables": ["*"]}});
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rs_token = signed(
        jsonwebtoken::Algorithm::RS256,
        &rsa.serialize_pem(),
        None,
        &claims,
    );
    let es_token = signed(
        jsonwebtoken::Algorithm::ES256,
        &ec.serialize_pem(),
        None,
        &claims,
    );

    // a PEM public key: RS256, then replaced by an EC key (ES256)
    let dir = tempdir();
    let pem = dir.path().join("key.pem");
    write(&pem, &rsa.public_key_pem());
    let u = unique("authkeys");
    let mut c = test_config(
        TopicSelection::Names(vec![format!("{u}.t")]),
        dir.path(),
        &u,
    );
    c.security.auth = jwt(KeySource::PublicKey(pem.clone()));
    let (svc, base) = start_service(c).await;
    assert_eq!(explain_status(&base, &rs_token).await, 200);
    assert_eq!(explain_status(&base, &es_token).await, 401);
    // the algorithm-confusion attack: an HS256 token whose secret is the public key's text
    let confused = hs256(&rsa.public_key_pem(), claims.clone(), 600);
    assert_eq!(explain_status(&base, &confused).await, 401);
    write(&pem, &ec.public_key_pem());
    until_status(&base, &es_token, 200, "the EC key replaces the RSA key").await;
    assert_eq!(explain_status(&base, &rs_token).await, 401);
    // a file that does not parse keeps the key in use
    write(&pem, "not a key");
    tokio::time::sleep(Duration::from_secs(3)).await; // several reload rounds, on purpose
    assert_eq!(explain_status(&base, &es_token).await, 200);
    let m = metrics_text(&base).await;
    assert!(
        m.contains(r#"livetable_reloads_total{file="jwt_keys",result="error"} 1"#),
        "{m}"
    );
    svc.shutdown();
    svc.wait().await.unwrap();

    // a JWKS: keys by kid
    let jwk = |k: &rcgen::KeyPair, kid: &str| {
        use base64::Engine;
        let raw = k.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid, "alg": "ES256", "use": "sig"})
    };
    let jwks = dir.path().join("jwks.json");
    write(
        &jwks,
        &json!({"keys": [jwk(&ec, "k1"), jwk(&ec2, "k2")]}).to_string(),
    );
    let u = unique("authjwks");
    let data = tempdir();
    let mut c = test_config(
        TopicSelection::Names(vec![format!("{u}.t")]),
        data.path(),
        &u,
    );
    c.security.auth = jwt(KeySource::Jwks(jwks.clone()));
    let (svc, base) = start_service(c).await;
    let k1 = signed(
        jsonwebtoken::Algorithm::ES256,
        &ec.serialize_pem(),
        Some("k1"),
        &claims,
    );
    let k2 = signed(
        jsonwebtoken::Algorithm::ES256,
        &ec2.serialize_pem(),
        Some("k2"),
        &claims,
    );
    let k2_signed_by_ec = signed(
        jsonwebtoken::Algorithm::ES256,
        &ec.serialize_pem(),
        Some("k2"),
        &claims,
    );
    let no_kid = signed(
        jsonwebtoken::Algorithm::ES256,
        &ec.serialize_pem(),
        None,
        &claims,
    );
    assert_eq!(explain_status(&base, &k1).await, 200);
    assert_eq!(explain_status(&base, &k2).await, 200);
    assert_eq!(explain_status(&base, &k2_signed_by_ec).await, 401);
    assert_eq!(explain_status(&base, &no_kid).await, 401);
    // k1 retired
    write(&jwks, &json!({"keys": [jwk(&ec2, "k2")]}).to_string());
    until_status(&base, &k1, 401, "k1 is retired").await;
    assert_eq!(explain_status(&base, &k2).await, 200);
    svc.shutdown();
    svc.wait().await.unwrap();

    // an HS256 secret, rotated
    let secret_dir = tempdir();
    let (secret, path) = secret_file(secret_dir.path());
    let u = unique("authsecret");
    let mut c = test_config(
        TopicSelection::Names(vec![format!("{u}.t")]),
        secret_dir.path(),
        &u,
    );
    c.security.auth = jwt(KeySource::Secret(path.clone()));
    let (svc, base) = start_service(c).await;
    let old = hs256(&secret, claims.clone(), 600);
    assert_eq!(explain_status(&base, &old).await, 200);
    let rotated = "z".repeat(40);
    write(&path, &rotated);
    let new = hs256(&rotated, claims.clone(), 600);
    until_status(&base, &new, 200, "the rotated secret").await;
    assert_eq!(explain_status(&base, &old).await, 401);
    svc.shutdown();
    svc.wait().await.unwrap();
}
