//! Whole-table reads (`GET /api/tables/{table}`, a union's included). Each holds a copy of the
//! rows it selects (their keys and shared rows: ~46 bytes a row beside the table) until its
//! body's last piece is built, and the body goes out in pieces of [`PIECE_BYTES`] as the client
//! takes them: what a read costs is its copy, not its text (a 1M-row table's body is ~136 MB).
//! Each takes a place among the process's copies first ([`crate::fanout::copies`]); a read that
//! finds none within [`crate::fanout::copies::WAIT`] gets 503 with `Retry-After`. A client that
//! stops reading holds its place until the connection's idle timeout closes it
//! (`--idle-timeout-secs`).

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::convert::Infallible;

use crate::fanout::copies::{Busy, Place};
use crate::http::table_body::TableBody;

/// About the size of each piece of a body sent in pieces.
pub const PIECE_BYTES: usize = 256 * 1024;

/// The 503 for a read that found no place.
pub fn busy(b: Busy) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "error": b.to_string() })),
    )
        .into_response()
}

/// The response for `body`, whose first piece is `first`: the whole body at once when that was
/// all of it, else the rest built piece by piece (off the async workers) as the client takes
/// them. `place` is given back once the last piece is built, or when the client goes.
pub fn respond(first: Vec<u8>, body: TableBody, place: Place) -> Response {
    let json = [(header::CONTENT_TYPE, "application/json")];
    if body.finished() {
        drop(place);
        return (json, first).into_response();
    }
    let rest = futures::stream::unfold(Some((body, place)), |state| async move {
        let (mut body, place) = state?;
        let built = tokio::task::spawn_blocking(move || {
            let piece = body.next_piece(PIECE_BYTES);
            (piece, body)
        })
        .await;
        // a panic while building ends the body short: the client sees invalid JSON, never a
        // wrong row
        let (piece, body) = built.ok()?;
        let piece = piece?;
        let next = (!body.finished()).then_some((body, place));
        Some((Ok::<_, Infallible>(Bytes::from(piece)), next))
    });
    let head = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(first)) });
    let stream = futures::StreamExt::chain(head, rest);
    (json, Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests;
