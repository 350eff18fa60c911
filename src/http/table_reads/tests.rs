use std::time::Duration;

use prometheus::IntGauge;
use serde_json::Value;

use super::*;
use crate::fanout::selector::Selector;
use crate::fanout::snapshot::tests::table;
use crate::fanout::snapshot::SnapshotCopy;
use crate::http::table_body::table_body;

fn reads(max: usize) -> TableReads {
    TableReads::new(max, IntGauge::new("g", "g").unwrap())
}

#[tokio::test]
async fn a_read_over_the_limit_waits_then_gets_a_503_with_retry_after() {
    let r = reads(1);
    let place = r.enter(WAIT).await.unwrap();
    assert_eq!(r.in_flight.get(), 1);
    let started = std::time::Instant::now();
    let refused = r.enter(Duration::from_millis(100)).await.err().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let body = axum::body::to_bytes(refused.into_body(), 4096)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("--max-table-reads"));
    // a waiting read gets the place given back
    let waiting = tokio::spawn(async move {
        let p = r.enter(WAIT).await.map(|_| ());
        (p.is_ok(), r)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(place);
    let (entered, r) = waiting.await.unwrap();
    assert!(entered);
    assert_eq!(r.in_flight.get(), 0);
}

#[tokio::test]
async fn no_limit_when_zero() {
    let r = reads(0);
    let places: Vec<Place> = futures::future::join_all((0..100).map(|_| r.enter(WAIT)))
        .await
        .into_iter()
        .map(|p| p.ok().unwrap())
        .collect();
    assert_eq!(r.in_flight.get(), 100);
    drop(places);
    assert_eq!(r.in_flight.get(), 0);
}

/// The response's body and whether the place was given back before it was read whole.
async fn respond_with(piece: usize) -> (Vec<u8>, Vec<u8>) {
    let t = table(true);
    let sel = Selector::default();
    let whole = table_body(SnapshotCopy::take(&t, &sel), "odds", &sel);
    let r = reads(1);
    let place = r.enter(WAIT).await.unwrap();
    let mut body = TableBody::new(SnapshotCopy::take(&t, &sel), "odds".into(), sel);
    let first = body.next_piece(piece).unwrap();
    let resp = respond(first, body, place);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let mut stream = resp.into_body().into_data_stream();
    let mut got = Vec::new();
    while let Some(piece) = futures::StreamExt::next(&mut stream).await {
        got.extend_from_slice(&piece.unwrap());
        if got.len() < whole.len() {
            assert_eq!(r.in_flight.get(), 1, "held while pieces are left");
        }
        if got.len() == whole.len() {
            // the last piece built gave the place back, before the stream ended
            assert_eq!(r.in_flight.get(), 0);
            assert!(r.enter(Duration::ZERO).await.is_ok());
        }
    }
    (got, whole)
}

#[tokio::test]
async fn a_body_sent_whole_or_in_pieces_is_the_same_and_gives_its_place_back() {
    // one piece: sent at once; tiny pieces: streamed one row at a time
    for piece in [PIECE_BYTES, 1] {
        let (got, whole) = respond_with(piece).await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(whole).unwrap()
        );
    }
}

#[tokio::test]
async fn a_client_that_goes_gives_the_place_back() {
    let t = table(true);
    let sel = Selector::default();
    let r = reads(1);
    let place = r.enter(WAIT).await.unwrap();
    let mut body = TableBody::new(SnapshotCopy::take(&t, &sel), "odds".into(), sel);
    let first = body.next_piece(1).unwrap();
    let resp = respond(first, body, place);
    assert_eq!(r.in_flight.get(), 1);
    // the connection closed before the body was read
    drop(resp);
    assert_eq!(r.in_flight.get(), 0);
}
