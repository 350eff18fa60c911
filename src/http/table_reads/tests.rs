use std::time::Duration;

use prometheus::IntGauge;
use serde_json::Value;

use super::*;
use crate::fanout::copies::{Copies, WAIT};
use crate::fanout::selector::Selector;
use crate::fanout::snapshot::tests::table;
use crate::fanout::snapshot::SnapshotCopy;
use crate::http::table_body::table_body;

fn copies(max: usize) -> Copies {
    Copies::new(max, IntGauge::new("g", "g").unwrap())
}

#[tokio::test]
async fn a_read_without_a_place_gets_a_503_with_retry_after() {
    let c = copies(1);
    let _place = c.enter(WAIT).await.unwrap();
    let refused = busy(c.enter(Duration::from_millis(10)).await.err().unwrap());
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let body = axum::body::to_bytes(refused.into_body(), 4096)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("--max-table-copies"));
}

/// The response's body and whether the place was given back before it was read whole.
async fn respond_with(piece: usize) -> (Vec<u8>, Vec<u8>) {
    let t = table(true);
    let sel = Selector::default();
    let whole = table_body(SnapshotCopy::take(&t, &sel), "odds", &sel);
    let r = copies(1);
    let place = r.enter(WAIT).await.unwrap();
    let mut body = TableBody::new(SnapshotCopy::take(&t, &sel), "odds".into(), sel);
    let first = body.next_piece(piece).unwrap();
    let resp = respond(first, body, Some(place));
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let mut stream = resp.into_body().into_data_stream();
    let mut got = Vec::new();
    while let Some(piece) = futures::StreamExt::next(&mut stream).await {
        got.extend_from_slice(&piece.unwrap());
        if got.len() < whole.len() {
            assert_eq!(r.in_flight(), 1, "held while pieces are left");
        }
        if got.len() == whole.len() {
            // the last piece built gave the place back, before the stream ended
            assert_eq!(r.in_flight(), 0);
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
    let r = copies(1);
    let place = r.enter(WAIT).await.unwrap();
    let mut body = TableBody::new(SnapshotCopy::take(&t, &sel), "odds".into(), sel);
    let first = body.next_piece(1).unwrap();
    let resp = respond(first, body, Some(place));
    assert_eq!(r.in_flight(), 1);
    // the connection closed before the body was read
    drop(resp);
    assert_eq!(r.in_flight(), 0);
}

#[tokio::test]
async fn a_body_built_whole_goes_in_pieces_and_holds_its_place_to_the_last() {
    let c = copies(1);
    let place = c.enter(WAIT).await.unwrap();
    let body: Vec<u8> = (0..PIECE_BYTES * 2 + 10)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let resp = respond_built(body.clone(), place);
    let mut stream = resp.into_body().into_data_stream();
    let mut got = Vec::new();
    let mut pieces = 0;
    while let Some(piece) = futures::StreamExt::next(&mut stream).await {
        got.extend_from_slice(&piece.unwrap());
        pieces += 1;
        let held = if got.len() < body.len() { 1 } else { 0 };
        assert_eq!(c.in_flight(), held, "after {} bytes", got.len());
    }
    assert_eq!(pieces, 3);
    assert_eq!(got, body);
}
