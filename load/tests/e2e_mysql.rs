//! End to end with real parts, MySQL flavour (the seed system's layout): a private MariaDB
//! (dev/mariadb) -> real Debezium's MySQL connector on Kafka Connect (dev/connect, unwrap +
//! RegexRouter) -> the broker -> livetable -> a `format=rows` WebSocket client and the live page in
//! headless Chromium. Two games are created through the odds feed's API while livetable runs (each
//! a new `game_<id>` table, so a new topic that livetable's pattern subscription must pick up), odds
//! are sent to both, and the client and the page show both games with the latest odds. Then it
//! reports commit -> WebSocket latency over 200 commits (p50, p90, p99, max) and fails on a wrong
//! value or on a commit that takes 5 s or more (a stall, not jitter).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use livetable::config::TopicSelection;
use livetable::fanout::protocol::Format;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const MARIADB_PORT: &str = "33319";
/// One commit slower than this to reach the client is a stall no user would accept: the test fails.
const STALL: Duration = Duration::from_secs(5);
/// How long the latency loop waits for one commit at most.
const GIVE_UP: Duration = Duration::from_secs(60);

/// `2026-11-30T17:15:13.695654Z`: an ISO-8601 UTC timestamp, as a string.
fn iso_timestamp(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    b.len() >= 20
        && digits.iter().all(|&i| b[i].is_ascii_digit())
        && (b[4], b[7], b[10], b[13], b[16]) == (b'-', b'-', b'T', b':', b':')
        && s.ends_with('Z')
}

/// Wall-clock time of day (UTC, as in the service's logs) of `t`.
fn utc_time_of_day(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// Prints the distribution of (commit, latency, commit time); fails only when some commit took
/// `STALL` or more, naming each such commit with its wall-clock time (to find it in the logs).
fn report_latency(what: &str, lat: &mut [(usize, Duration, std::time::SystemTime)]) {
    lat.sort_by_key(|(_, d, _)| *d);
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize].1;
    let (worst_commit, worst, _) = lat[lat.len() - 1];
    eprintln!(
        "{what} over {} commits: p50 {:?}, p90 {:?}, p99 {:?}, max {worst:?} (commit {worst_commit})",
        lat.len(),
        at(0.5),
        at(0.9),
        at(0.99)
    );
    let stalls: Vec<String> = lat
        .iter()
        .filter(|(_, d, _)| *d >= STALL)
        .map(|(i, d, t)| format!("commit {i} at {}: {d:?}", utc_time_of_day(*t)))
        .collect();
    assert!(
        stalls.is_empty(),
        "{what}: a stall of {STALL:?} or more per commit, which no user would accept: {}",
        stalls.join(", ")
    );
}

fn dev(script: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut all = vec![("MARIADB_PORT", MARIADB_PORT)];
    all.extend_from_slice(envs);
    dev_script(script, args, &all)
}

fn sql(q: &str) -> String {
    dev("mariadb", &["sql", "-N", "-B", "-e", q], &[])
}

/// Stops the feed process when the test ends, also on a failed assertion.
struct Feed(std::process::Child);
impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the test's Connect worker when the test ends, also on a failed assertion.
struct Connect(Vec<(&'static str, String)>);
impl Connect {
    fn env(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}
impl Drop for Connect {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("dev/connect"))
            .arg("stop")
            .envs(self.env())
            .output();
    }
}

async fn post(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match http.post(url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                return (status, r.json().await.unwrap_or(Value::Null));
            }
            Err(e) => {
                assert!(Instant::now() < until, "odds-feed did not answer: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads flat rows (format=rows) until every game shows `want`'s odds.
async fn rows_until(ws: &mut Ws, seen: &mut HashMap<String, Value>, want: &HashMap<String, Value>) {
    let until = Instant::now() + Duration::from_secs(60);
    let odds = |r: &Value| {
        json!([
            r["game_id"],
            r["odd1"],
            r["odd2"],
            r["odd3"],
            r["odd4"],
            r["odd5"]
        ])
    };
    while want
        .iter()
        .any(|(g, w)| seen.get(g).map(odds) != Some(odds(w)))
    {
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "rows client saw {seen:?}, the feed returned {want:?}"
        );
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(left, ws.next()).await {
            let row: Value = serde_json::from_str(t.as_str()).unwrap();
            assert!(row.get("type").is_none(), "a flat row, no envelope: {row}");
            if let Some(g) = row["game_id"].as_str() {
                seen.insert(g.to_string(), row.clone());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn games_created_through_the_feed_show_on_a_rows_client_and_the_page() {
    let driver_dir = repo_root().join("tests/browser");
    assert!(
        driver_dir.join("node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "this test needs Debian's chromium and `npm ci` in tests/browser: run ./dev/test, which installs both"
    );
    dev("mariadb", &["start"], &[]);
    // games of earlier runs against this test database: the seed layout has one table per game
    let old = sql("select table_name from information_schema.tables where table_schema = 'gameodds' and table_name like 'game\\_%'");
    for t in old.lines().filter(|t| !t.is_empty()) {
        sql(&format!("drop table `{t}`"));
    }
    sql("delete from available_games");

    let u = unique("my");
    let prefix = format!("e2e{}", u.replace('x', ""));
    let name = format!("e2emy{}", u.replace('x', ""));
    let server_id = (6000 + std::process::id() % 50_000).to_string();
    let connect = Connect(vec![
        ("CONNECT_SOURCE", "mysql".into()),
        ("CONNECT_NAME", name),
        ("TOPIC_PREFIX", prefix.clone()),
        ("DBZ_SERVER_ID", server_id),
        // games are created below right after the start: a table created during the connector's
        // snapshot would be missed by Debezium (dev/connect)
        ("CONNECT_WAIT_STREAMING", "1".into()),
    ]);
    let dir = tempdir();
    let mut c = test_config(
        TopicSelection::Pattern(format!(r"^{prefix}\..*")),
        dir.path(),
        &u,
    );
    // the seed's clients connect to ws://host/ and expect flat rows
    c.default_format = Format::Rows;
    // the seed broadcast the game rows (not available_games) to every client on `/`
    c.root_tables = Some(regex::Regex::new("^game_").unwrap());
    c.unions = vec![livetable::config::UnionDef {
        name: "games".into(),
        pattern: regex::Regex::new("^game_").unwrap(),
    }];
    let (svc, base) = start_service(c).await;
    dev("connect", &["start"], &connect.env());
    // the seed's own client: connects to `/` with no query before any game exists, and keeps a map
    // by game_id of the flat rows it receives
    let (mut seed, _) = tokio_tungstenite::connect_async(base.replace("http://", "ws://") + "/")
        .await
        .unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _feed = Feed(
        Command::new(env!("CARGO_BIN_EXE_odds-feed"))
            .args([
                "--mysql",
                &format!("mysql://root@127.0.0.1:{MARIADB_PORT}/gameodds"),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let feed = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    // game one, while livetable runs: a new table game_alpha, a new topic
    let (status, _) = post(&http, &format!("{feed}/games/alpha")).await;
    assert_eq!(status, 201);
    assert_eq!(
        sql("select game_id from available_games"),
        "alpha",
        "created as the seed did"
    );
    table_at_seq(&base, "game_alpha", 1).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(base.replace("http://", "ws://") + "/?table=game_alpha")
            .await
            .unwrap();

    // game two, and new odds for both
    let (status, _) = post(&http, &format!("{feed}/games/beta")).await;
    assert_eq!(status, 201);
    let mut latest = HashMap::new();
    for game in ["alpha", "beta", "alpha", "beta"] {
        let (status, odds) = post(&http, &format!("{feed}/sendodd/{game}")).await;
        assert_eq!(status, 200, "{odds}");
        latest.insert(game.to_string(), odds);
    }
    // unknown games and hostile ids touch nothing
    assert_eq!(post(&http, &format!("{feed}/sendodd/gamma")).await.0, 404);
    // every game's row reaches the seed's client, each message one flat row
    let mut seed_seen = HashMap::new();
    let want_games: HashMap<String, Value> = latest
        .iter()
        .map(|(g, o)| {
            let mut row = o.clone();
            row["game_id"] = json!(g);
            (g.clone(), row)
        })
        .collect();
    rows_until(&mut seed, &mut seed_seen, &want_games).await;
    let hostile = format!("{feed}/games/x%60%3B%20drop%20table%20available_games%3B--");
    assert_eq!(post(&http, &hostile).await.0, 400);
    assert_eq!(
        sql("select group_concat(game_id order by game_id) from available_games"),
        "alpha,beta"
    );
    assert_eq!(
        sql("select count(*) from information_schema.tables where table_schema = 'gameodds'"),
        "3"
    );
    // the API has both games' latest odds (create + 2 updates each: seq 3, 2 updates may be equal)
    let odds = |r: &Value| json!([r["odd1"], r["odd2"], r["odd3"], r["odd4"], r["odd5"]]);
    for g in ["alpha", "beta"] {
        assert!(
            latest[g]["odd5"].is_string(),
            "a game created by the feed has every odd column of the seed: {}",
            latest[g]
        );
        let want = odds(&latest[g]);
        eventually(
            &format!("game_{g} with the latest odds on the API"),
            Duration::from_secs(30),
            || async {
                let (_, t) = get_json(&format!("{base}/api/tables/game_{g}")).await;
                (odds(&t["rows"][g]) == want).then_some(())
            },
        )
        .await;
    }
    ws.send(Message::text(
        json!({"type": "subscribe", "table": "game_beta"}).to_string(),
    ))
    .await
    .unwrap();
    let mut seen = HashMap::new();
    rows_until(&mut ws, &mut seen, &latest).await;
    // DATETIME(6) columns arrive as ISO-8601 strings (time.precision.mode=isostring), not as
    // Debezium's MicroTimestamp numbers
    for g in ["alpha", "beta"] {
        let ts = &seen[g]["updated_at"];
        assert!(
            iso_timestamp(ts),
            "game_{g}.updated_at is an ISO-8601 string: {ts}"
        );
    }
    let created_at = eventually(
        "alpha in available_games on the API",
        Duration::from_secs(30),
        || async {
            let (_, games) = get_json(&format!("{base}/api/tables/available_games")).await;
            let ts = games["rows"]["alpha"]["created_at"].clone();
            (!ts.is_null()).then_some(ts)
        },
    )
    .await;
    assert!(
        iso_timestamp(&created_at),
        "available_games.created_at is an ISO-8601 string: {created_at}"
    );

    // the page: both games in one live table (the union of every game_ table), each row showing
    // its game's latest odds; then one game's own table
    let mut spec: Vec<Value> = ["alpha", "beta"]
        .iter()
        .map(|g| {
            let o = &latest[*g];
            json!({"table": "games", "key": format!("game_{g}/{g}"),
                   "cells": {"odd1": o["odd1"], "odd2": o["odd2"], "odd3": o["odd3"], "odd4": o["odd4"], "odd5": o["odd5"]}})
        })
        .collect();
    let o = &latest["beta"];
    spec.push(json!({"table": "game_beta", "key": "beta",
        "cells": {"odd1": o["odd1"], "odd2": o["odd2"], "odd3": o["odd3"], "odd4": o["odd4"], "odd5": o["odd5"]}}));
    let artifacts = repo_root().join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = tokio::task::spawn_blocking({
        let (base, driver_dir) = (base.clone(), driver_dir.clone());
        let shots = artifacts.join("mysql-games");
        move || {
            Command::new("node")
                .arg(driver_dir.join("shows.mjs"))
                .arg(&base)
                .arg(&shots)
                .arg(serde_json::to_string(&spec).unwrap())
                .current_dir(&driver_dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK games") && stdout.contains("OK game_beta"),
        "page: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // commit -> WebSocket receipt over 200 single-row commits: reported; fails only on a wrong value
    // or a stall no user would accept. MySQL's source.ts_ms has whole seconds, so the clock starts
    // when the client's commit returned
    let mut lat = Vec::with_capacity(200);
    let mut previous = latest["alpha"]["odd4"].clone();
    for i in 0..200 {
        let value = format!("7.{i:03}");
        sql(&format!(
            "update game_alpha set odd4 = {value} where game_id = 'alpha'"
        ));
        let committed = Instant::now();
        let committed_at = std::time::SystemTime::now();
        loop {
            let left = GIVE_UP.saturating_sub(committed.elapsed());
            // the server pings every 15 s (docs/protocol.md): a ping is not the end of the stream
            let t = match tokio::time::timeout(left, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("commit {i}: the WebSocket stream ended: {other:?}"),
                Err(_) => panic!("no row for commit {i} within {GIVE_UP:?}"),
            };
            let row: Value = serde_json::from_str(t.as_str()).unwrap();
            if row["game_id"] != "alpha" {
                continue;
            }
            assert!(
                row["odd4"] == json!(value) || row["odd4"] == previous,
                "commit {i}: alpha's odd4 is {}, the database has {value} (before: {previous})",
                row["odd4"]
            );
            if row["odd4"] == json!(value) {
                break;
            }
        }
        lat.push((i, committed.elapsed(), committed_at));
        previous = json!(value);
    }
    report_latency(
        "MariaDB commit -> WebSocket row (format=rows, after the client returned)",
        &mut lat,
    );

    drop(connect);
    svc.shutdown();
    svc.wait().await.unwrap();
}
