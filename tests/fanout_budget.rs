//! The hub's byte budget (`--fanout-buffer-bytes`) with real clients over real sockets: a
//! WebSocket client that stops reading while large rows stream through its table holds the
//! server to that budget, not to what was published, and still ends with the right rows.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use livetable::config::TopicSelection;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Keys of the table, each row ~4 KB.
const KEYS: usize = 200;
/// Rounds of updates to every key after the first rows: 24,000 changes, ~100 MB of rows.
const ROUNDS: usize = 120;
/// Room for about ten batches of these rows (batches close at [`BATCH_BYTES`] of records; the
/// hub's estimate of an update counts each row before and after, and its frame: ~3x), so a
/// client that reads keeps up with room to spare, while ~6x the budget passes the stalled one.
const BUDGET: usize = 32 << 20;
const BATCH_BYTES: usize = 1 << 20;

fn round(r: usize) -> Vec<FixtureRecord> {
    (0..KEYS)
        .map(|i| FixtureRecord {
            key: Some(format!(r#"{{"id":"w{i}"}}"#)),
            value: Some(format!(
                r#"{{"id":"w{i}","round":{r},"pad":"{}","__op":"u","__table":"wide"}}"#,
                format!("{r:04}{i:04}").repeat(500)
            )),
            headers: vec![],
        })
        .collect()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Reads `ws` until every key is at round `last`; returns the snapshots it was sent.
async fn read_until(ws: &mut Ws, state: &mut BTreeMap<String, Value>, last: usize) -> usize {
    let until = std::time::Instant::now() + Duration::from_secs(180);
    let mut snapshots = 0;
    loop {
        let done = state.len() == KEYS
            && state
                .values()
                .all(|r| r["round"].as_u64() == Some(last as u64));
        if done {
            return snapshots;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("rows not all at round {last} in 180 s: {state:?}"))
            .expect("the connection stays open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            let m: Value = serde_json::from_str(&t).unwrap();
            if absorb(state, &m).as_deref() == Some("snapshot") {
                snapshots += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_the_hub_to_its_byte_budget_and_still_converges() {
    init_logs();
    let u = unique("budget");
    let topic = format!("{u}.wide");
    create_topic(&topic, 2).await;
    let dir = tempdir();
    let mut c = test_config(TopicSelection::Names(vec![topic.clone()]), dir.path(), &u);
    // the stalled client is never closed as slow within the test: only the budget bounds it
    c.slow_client = Duration::from_secs(300);
    c.fanout_buffer_bytes = BUDGET;
    c.max_batch_bytes = BATCH_BYTES;
    let (svc, base) = start_service(c).await;
    let producer = producer();
    produce_keyed(&producer, &topic, &round(0)).await;
    table_at_seq(&base, "wide", KEYS as u64).await;

    let mut stalled = small_buffer_ws(&base, "/ws?table=wide").await;
    let mut reader = small_buffer_ws(&base, "/ws?table=wide").await;
    let mut read = BTreeMap::new();
    assert_eq!(read_until(&mut reader, &mut read, 0).await, 1);
    let reading = tokio::spawn(async move {
        let snapshots = read_until(&mut reader, &mut read, ROUNDS).await;
        (reader, snapshots)
    });

    let rss_before = rss_bytes();
    for r in 1..=ROUNDS {
        produce_keyed(&producer, &topic, &round(r)).await;
    }
    let last = (KEYS * (ROUNDS + 1)) as u64;
    eventually("every change applied", Duration::from_secs(180), || async {
        let (_, t) = get_json(&format!("{base}/api/tables/wide")).await;
        (t["seq"].as_u64() >= Some(last)).then_some(())
    })
    .await;
    let (_reader, snapshots) = tokio::time::timeout(Duration::from_secs(180), reading)
        .await
        .expect("the reading client caught up")
        .unwrap();
    let grown = rss_bytes().saturating_sub(rss_before);
    let m = metrics_text(&base).await;
    let held = metric_value(&m, r#"livetable_fanout_buffer_bytes{table="wide"}"#).unwrap();
    let evicted = metric_value(&m, "livetable_fanout_buffer_evictions_total").unwrap();
    eprintln!(
        "published ~{} MB; process RSS grew {} MB; hub holds {:.1} MB (budget {} MB); {evicted} \
         unread updates dropped; reading client sent {snapshots} snapshot(s)",
        KEYS * ROUNDS * 4 / 1000,
        grown >> 20,
        held / 1e6,
        BUDGET >> 20,
    );
    assert!(held <= BUDGET as f64, "the hub holds {held} bytes");
    assert!(
        evicted >= 1.0,
        "the stalled client's unread updates were dropped"
    );
    assert_eq!(
        snapshots, 0,
        "a client that reads is never sent a new snapshot"
    );

    // it reads again: what it was sent, then a new snapshot (it lagged), then the live rows
    let mut state = BTreeMap::new();
    let snapshots = read_until(&mut stalled, &mut state, ROUNDS).await;
    assert!(
        snapshots >= 2,
        "the lagging client started again from a snapshot"
    );
    let m = metrics_text(&base).await;
    assert!(metric_value(&m, "livetable_resnapshots_total") >= Some(1.0));
    drop(stalled);
    svc.shutdown();
    svc.wait().await.unwrap();
}
