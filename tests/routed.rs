//! Routed subscriptions (issue 15, "equality predicates are indexed"): clients selecting rows by
//! `keys=` or by a `where` with an equality (`=`, `IN`, a boolean column) are sent only the
//! updates that may concern them, beside clients on the broadcast channel (a whole table, a
//! `where` with no equality). Against the real broker on a 3-partition topic: every client holds
//! exactly its rows through league moves, deletes and re-creates, a routed client resumes across a
//! disconnect, and `livetable_routed_updates_total` grows by at most the number of
//! (change, concerned subscription) pairs, far below changes x routed subscriptions.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;
use livetable::config::TopicSelection;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const LEAGUES: usize = 8;
const GAMES: usize = 48;

#[derive(Debug, Clone, PartialEq)]
struct Game {
    league: usize,
    /// hundredths
    odds: u32,
    live: bool,
}

/// What one client selects: its query string and the same predicate in Rust.
struct Want {
    query: String,
    keys: Option<Vec<String>>,
    pred: fn(&Game) -> bool,
    routed: bool,
}

fn game_row(key: &str, g: &Game) -> Value {
    json!({"id": key, "league": format!("L{}", g.league), "odds": format!("{}.{:02}", g.odds / 100, g.odds % 100), "live": g.live})
}

/// A Debezium change of one `games` row (`None`: a delete).
fn change(key: &str, g: Option<&Game>) -> FixtureRecord {
    debezium_change("games", "id", key, g.map(|g| game_row(key, g)))
}

fn wants() -> Vec<Want> {
    let mut w = Vec::new();
    fn l(n: usize) -> fn(&Game) -> bool {
        // one function per league (a fn pointer cannot capture)
        const F: [fn(&Game) -> bool; LEAGUES] = [
            |g| g.league == 0,
            |g| g.league == 1,
            |g| g.league == 2,
            |g| g.league == 3,
            |g| g.league == 4,
            |g| g.league == 5,
            |g| g.league == 6,
            |g| g.league == 7,
        ];
        F[n]
    }
    for n in 0..LEAGUES {
        w.push(Want {
            query: format!("where=league = 'L{n}'"),
            keys: None,
            pred: l(n),
            routed: true,
        });
    }
    w.push(Want {
        query: "where=league IN ('L0', 'L1') AND odds > 2".into(),
        keys: None,
        pred: |g| g.league <= 1 && g.odds > 200,
        routed: true,
    });
    w.push(Want {
        query: "where=live".into(),
        keys: None,
        pred: |g| g.live,
        routed: true,
    });
    w.push(Want {
        query: "keys=g1,g2,g40".into(),
        keys: Some(vec!["g1".into(), "g2".into(), "g40".into()]),
        pred: |_| true,
        routed: true,
    });
    // on the broadcast channel: no equality to index, and the whole table
    w.push(Want {
        query: "where=odds > 3".into(),
        keys: None,
        pred: |g| g.odds > 300,
        routed: false,
    });
    w.push(Want {
        query: String::new(),
        keys: None,
        pred: |_| true,
        routed: false,
    });
    w
}

fn concerned(w: &Want, key: &str, before: Option<&Game>, after: Option<&Game>) -> bool {
    match &w.keys {
        Some(k) => k.iter().any(|x| x == key),
        None => before.is_some_and(w.pred) || after.is_some_and(w.pred),
    }
}

fn expected(w: &Want, table: &BTreeMap<String, Game>) -> BTreeMap<String, Value> {
    table
        .iter()
        .filter(|(k, g)| w.keys.as_ref().is_none_or(|ks| ks.contains(k)) && (w.pred)(g))
        .map(|(k, g)| (k.clone(), game_row(k, g)))
        .collect()
}

struct Client {
    ws: Ws,
    state: BTreeMap<String, Value>,
    pos: Option<String>,
}

async fn connect(base: &str, w: &Want, since: Option<&str>) -> Client {
    let mut url = reqwest::Url::parse(&format!("{}/ws", base.replace("http://", "ws://"))).unwrap();
    url.query_pairs_mut().append_pair("table", "games");
    for pair in w.query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap();
        url.query_pairs_mut().append_pair(k, v);
    }
    if let Some(s) = since {
        url.query_pairs_mut().append_pair("since", s);
    }
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    Client {
        ws,
        state: BTreeMap::new(),
        pos: None,
    }
}

/// Reads the client's messages until its rows equal `want` (bounded).
async fn converge(c: &mut Client, want: &BTreeMap<String, Value>, what: &str) -> Vec<String> {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut types = Vec::new();
    while c.state != *want {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let msg = match tokio::time::timeout(left, c.ws.next()).await {
            Ok(Some(Ok(m))) => m,
            other => panic!(
                "{what}: no convergence ({other:?}):\n has  {:?}\n want {want:?}",
                c.state
            ),
        };
        let Message::Text(t) = msg else { continue };
        let m: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_ne!(m["type"], "error", "{what}: {m}");
        let Some(kind) = absorb(&mut c.state, &m) else {
            continue;
        };
        if let Some(p) = m["pos"].as_str() {
            c.pos = Some(p.to_string());
        }
        types.push(kind);
    }
    types
}

async fn metric(base: &str, name: &str) -> f64 {
    metric_value(&metrics_text(base).await, name)
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_clients_get_only_what_concerns_them_and_hold_exactly_their_rows() {
    let u = unique("routed");
    let topic = format!("{u}.public.games");
    create_topic(&topic, 3).await;
    let p = producer();
    let mut seed: u64 = std::env::var("ROUTED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0007_0be5_eed5);
    eprintln!("ROUTED_SEED={seed}");
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut table: BTreeMap<String, Game> = BTreeMap::new();
    let mut first = Vec::new();
    for i in 0..GAMES {
        let g = Game {
            league: i % LEAGUES,
            odds: 101 + next(500) as u32,
            live: i % 3 == 0,
        };
        first.push(change(&format!("g{i}"), Some(&g)));
        table.insert(format!("g{i}"), g);
    }
    produce_keyed(&p, &topic, &first).await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "games", GAMES as u64).await;

    let wants = wants();
    let mut clients = Vec::new();
    for (i, w) in wants.iter().enumerate() {
        let mut c = connect(&base, w, None).await;
        converge(
            &mut c,
            &expected(w, &table),
            &format!("client {i} at start"),
        )
        .await;
        clients.push(c);
    }
    let routed = wants.iter().filter(|w| w.routed).count();
    assert_eq!(
        metric(&base, "livetable_routed_subscriptions").await,
        routed as f64,
        "the clients with keys or an indexed where are routed, the others are not"
    );
    let routed_before = metric(&base, "livetable_routed_updates_total").await;

    // random changes (odds, league moves, live flips, deletes and re-creates) in two halves; one
    // routed client is away during the second half and resumes with its last position
    let mut bound = 0usize;
    let mut changes = 0usize;
    for half in 0..2 {
        if half == 1 {
            let away = &mut clients[3];
            away.ws.close(None).await.ok();
        }
        let mut recs = Vec::new();
        for _ in 0..300 {
            let key = format!("g{}", next(GAMES as u64 + 4));
            let before = table.get(&key).cloned();
            let after = if next(12) == 0 {
                None
            } else {
                let mut g = before.clone().unwrap_or(Game {
                    league: 0,
                    odds: 150,
                    live: false,
                });
                match next(3) {
                    0 => g.league = next(LEAGUES as u64) as usize,
                    1 => g.odds = 101 + next(500) as u32,
                    _ => g.live = !g.live,
                }
                Some(g)
            };
            bound += wants
                .iter()
                .filter(|w| w.routed && concerned(w, &key, before.as_ref(), after.as_ref()))
                .count();
            changes += 1;
            recs.push(change(&key, after.as_ref()));
            match after {
                Some(g) => table.insert(key, g),
                None => table.remove(&key),
            };
        }
        for chunk in recs.chunks(60) {
            produce_keyed(&p, &topic, chunk).await;
        }
        for (i, (w, c)) in wants.iter().zip(clients.iter_mut()).enumerate() {
            if half == 1 && i == 3 {
                continue;
            }
            converge(
                c,
                &expected(w, &table),
                &format!("client {i} ({})", w.query),
            )
            .await;
        }
    }
    // the away client resumes: one patch from its position, no snapshot
    let since = clients[3]
        .pos
        .clone()
        .expect("the routed client got a position");
    let mut back = connect(&base, &wants[3], Some(&since)).await;
    back.state = std::mem::take(&mut clients[3].state);
    let types = converge(&mut back, &expected(&wants[3], &table), "resumed client").await;
    assert!(
        !types.iter().any(|t| t == "snapshot"),
        "a routed client's position resumes without a snapshot: {types:?}"
    );

    let routed_updates = metric(&base, "livetable_routed_updates_total").await - routed_before;
    eprintln!(
        "{changes} changes, {routed} routed subscriptions: {routed_updates} routed updates \
         (bound {bound}; broadcast would wake every subscription for every update)"
    );
    assert!(routed_updates > 0.0, "the routed clients were sent updates");
    assert!(
        routed_updates <= bound as f64,
        "at most one routed update per (change, concerned subscription): {routed_updates} > {bound}"
    );
    assert!(
        bound * 2 < changes * routed,
        "the workload leaves most subscriptions unconcerned by most changes (test design)"
    );
    drop(svc);
}
