//! Filtered and projected subscriptions (issue 15): `where=` and `columns=` on `/ws`, `/sse`, the
//! subscribe message and `GET /api/tables/{table}`, against the real broker over a 3-partition
//! topic, with random changes that move rows in and out while clients are attached.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;
use livetable::config::TopicSelection;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WHERE: &str = "league = 'EPL' AND price > 2";

/// A Debezium change of one `odds` row (`None`: a delete).
fn odds(key: &str, row: Option<(&str, &str, u32)>) -> FixtureRecord {
    let after = match row {
        Some((league, price, home)) => {
            json!({"id": key, "league": league, "price": price, "home": home})
        }
        None => Value::Null,
    };
    let op = if after.is_null() { "d" } else { "u" };
    let before = if after.is_null() {
        json!({"id": key})
    } else {
        Value::Null
    };
    FixtureRecord {
        key: Some(json!({"id": key}).to_string()),
        value: Some(
            json!({"before": before, "after": after, "op": op, "source": {"table": "odds", "ts_ms": 1}})
                .to_string(),
        ),
        headers: vec![],
    }
}

/// What a `where=WHERE&columns=price` client must hold, from the whole table.
fn expected(all: &Map<String, Value>) -> BTreeMap<String, Value> {
    all.iter()
        .filter(|(_, r)| {
            r["league"] == "EPL"
                && r["price"]
                    .as_str()
                    .and_then(|p| p.parse::<f64>().ok())
                    .is_some_and(|p| p > 2.0)
        })
        .map(|(k, r)| (k.clone(), json!({"price": r["price"]})))
        .collect()
}

fn merge(state: &mut BTreeMap<String, Value>, m: &Value) {
    let rows = match m["type"].as_str() {
        Some("snapshot") => {
            // a snapshot replaces the state (a big one continues in patch frames)
            state.clear();
            &m["rows"]
        }
        Some("patch") => &m["patch"],
        _ => return,
    };
    for (k, v) in rows.as_object().unwrap() {
        if v.is_null() {
            state.remove(k);
            continue;
        }
        let row = state.entry(k.clone()).or_insert_with(|| json!({}));
        for (c, x) in v.as_object().unwrap() {
            if x.is_null() {
                row.as_object_mut().unwrap().remove(c);
            } else {
                row[c] = x.clone();
            }
        }
    }
}

async fn api_rows(url: &str) -> Map<String, Value> {
    let (status, body) = get_json(url).await;
    assert_eq!(status, 200, "{url}: {body}");
    body["rows"].as_object().unwrap().clone()
}

/// Reads the client's messages until its state equals what the table says it must hold.
async fn converges(
    ws: &mut Ws,
    state: &mut BTreeMap<String, Value>,
    base: &str,
    seen_cols: &mut Vec<String>,
) {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_ne!(m["type"], "error", "{m}");
                for rows in [&m["rows"], &m["patch"]] {
                    if let Some(o) = rows.as_object() {
                        for v in o.values().filter_map(Value::as_object) {
                            seen_cols.extend(v.keys().cloned());
                        }
                    }
                }
                merge(state, &m);
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the connection ended: {other:?}"),
            Err(_) => {
                let all = api_rows(&format!("{base}/api/tables/odds")).await;
                if *state == expected(&all) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "the filtered client does not converge:\n client {state:?}\n want {:?}",
                    expected(&all)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_projected_clients_hold_exactly_their_rows_through_moves_in_and_out() {
    let u = unique("where");
    let topic = format!("{u}.public.odds");
    create_topic(&topic, 3).await;
    let p = producer();
    let leagues = ["EPL", "LIGA", "EPL"];
    let first: Vec<FixtureRecord> = (0..30)
        .map(|i| {
            let price = format!("{}.{}", 1 + i % 4, i % 10);
            odds(&format!("g{i}"), Some((leagues[i % 3], &price, 0)))
        })
        .collect();
    produce_keyed(&p, &topic, &first).await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "odds", 30).await;

    let q = format!("table=odds&where={}&columns=price", urlencode(WHERE));
    let ws_url = format!("{}/ws?{q}", base.replace("http://", "ws://"));
    let (mut a, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    // a second client asks the same with a subscribe message (columns as a list)
    let (mut b, _) =
        tokio_tungstenite::connect_async(format!("{}/ws", base.replace("http://", "ws://")))
            .await
            .unwrap();
    b.send(Message::Text(
        json!({"type": "subscribe", "table": "odds", "where": WHERE, "columns": ["price"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let (mut sa, mut sb) = (BTreeMap::new(), BTreeMap::new());
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    converges(&mut a, &mut sa, &base, &mut ca).await;
    converges(&mut b, &mut sb, &base, &mut cb).await;
    assert!(!sa.is_empty(), "some rows match at the start");

    // random changes: price and league moves (in and out), changes of a column the clients do
    // not get, deletes and re-creates, over 3 partitions
    let mut seed: u64 = 0x005e_ed0f_0dd5;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut changes = Vec::new();
    for i in 0..400u32 {
        let key = format!("g{}", next(40));
        let rec = match next(10) {
            0 => odds(&key, None),
            _ => {
                let price = format!("{}.{}", next(5), next(100));
                odds(&key, Some((leagues[next(3) as usize], &price, i)))
            }
        };
        changes.push(rec);
    }
    for chunk in changes.chunks(50) {
        produce_keyed(&p, &topic, chunk).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    converges(&mut a, &mut sa, &base, &mut ca).await;
    converges(&mut b, &mut sb, &base, &mut cb).await;
    // (b's connection was first subscribed whole: `/ws` of a node with one table)
    assert!(
        ca.iter().all(|c| c == "price"),
        "only the projected column is ever sent: {:?}",
        ca.iter().filter(|c| *c != "price").collect::<Vec<_>>()
    );

    // the HTTP API selects the same way
    let api = api_rows(&format!("{base}/api/tables/odds?{q}")).await;
    let api: BTreeMap<String, Value> = api.into_iter().collect();
    assert_eq!(api, sa);

    // a change of a column the client does not get sends it nothing
    let all = api_rows(&format!("{base}/api/tables/odds")).await;
    let (k, r) = all
        .iter()
        .find(|(k, _)| sa.contains_key(*k))
        .map(|(k, r)| (k.clone(), r.clone()))
        .expect("a matching row");
    produce_keyed(
        &p,
        &topic,
        &[odds(
            &k,
            Some((
                r["league"].as_str().unwrap(),
                r["price"].as_str().unwrap(),
                99_999,
            )),
        )],
    )
    .await;
    eventually(
        "the home change is applied",
        Duration::from_secs(20),
        || async {
            let (_, row) = get_json(&format!("{base}/api/tables/odds/rows/{k}")).await;
            (row["home"] == 99_999).then_some(())
        },
    )
    .await;
    let quiet = tokio::time::timeout(Duration::from_millis(700), a.next()).await;
    assert!(
        quiet.is_err(),
        "no message for a change of an unprojected column: {quiet:?}"
    );
    svc.shutdown();
    svc.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_are_refused_with_a_clear_error_and_the_connection_stays_usable() {
    let u = unique("badwhere");
    let topic = format!("{u}.public.odds");
    create_topic(&topic, 1).await;
    produce(
        &producer(),
        &topic,
        &[
            odds("g1", Some(("EPL", "3.5", 1))),
            odds("g2", Some(("LIGA", "1.5", 1))),
        ],
    )
    .await;
    let dir = tempdir();
    let c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    let (svc, base) = start_service(c).await;
    table_at_seq(&base, "odds", 2).await;
    let ws = base.replace("http://", "ws://");

    // on connect: an error naming the problem
    let (mut a, _) = tokio_tungstenite::connect_async(format!(
        "{ws}/ws?table=odds&where={}",
        urlencode("price >")
    ))
    .await
    .unwrap();
    let m = next_json(&mut a).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "bad_request");
    assert!(m["message"].as_str().unwrap().starts_with("where:"), "{m}");
    // the same connection subscribes correctly afterwards, in rows format too
    a.send(Message::Text(
        json!({"type": "subscribe", "table": "odds", "where": "lower(league) = 'epl'"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let m = next_json(&mut a).await;
    assert_eq!(m["code"], "bad_request", "functions are refused: {m}");
    a.send(Message::Text(
        json!({"type": "subscribe", "table": "odds", "where": "price > 2", "columns": "league"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let m = next_json(&mut a).await;
    assert_eq!(m["type"], "snapshot", "{m}");
    assert_eq!(m["rows"], json!({"g1": {"league": "EPL"}}));

    let (mut r, _) = tokio_tungstenite::connect_async(format!(
        "{ws}/ws?table=odds&format=rows&where={}&columns=price",
        urlencode("league IN ('LIGA')")
    ))
    .await
    .unwrap();
    let m = next_json(&mut r).await;
    assert_eq!(m, json!({"price": "1.5"}));

    // SSE and HTTP: 400 with the reason
    let sse = http()
        .get(format!("{base}/sse?table=odds&where={}", urlencode("a = ")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 400);
    let long = "x = 1 OR ".repeat(600) + "x = 1";
    let (status, body) = get_json(&format!(
        "{base}/api/tables/odds?where={}",
        urlencode(&long)
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_json(&format!("{base}/api/tables/odds?columns=")).await;
    assert_eq!(status, 400, "{body}");
    svc.shutdown();
    svc.wait().await.unwrap();
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] != "status" {
                return v;
            }
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
