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
/// them. `place` (if any) is given back once the last piece is built, or when the client goes.
pub fn respond(first: Vec<u8>, body: TableBody, place: Option<Place>) -> Response {
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
        // a piece that could not be built ends the body with an error: the connection is cut,
        // so the client sees a failed download, never a short body that looks whole
        let (piece, body) = match built {
            Ok(b) => b,
            Err(e) => return Some((Err(std::io::Error::other(e)), None)),
        };
        let piece = piece?;
        let next = (!body.finished()).then_some((body, place));
        Some((Ok(Bytes::from(piece)), next))
    });
    let head = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let stream = futures::StreamExt::chain(head, rest);
    (json, Body::from_stream(stream)).into_response()
}

/// The response for a body built whole (a union's), sent in pieces of [`PIECE_BYTES`] that
/// share its bytes; `place` is given back once the last piece is handed on, or when the client
/// goes.
pub fn respond_built(body: Vec<u8>, place: Place) -> Response {
    let json = [(header::CONTENT_TYPE, "application/json")];
    let body = Bytes::from(body);
    let pieces = futures::stream::unfold(Some((body, place)), |state| async move {
        let (mut rest, place) = state?;
        let piece = rest.split_to(rest.len().min(PIECE_BYTES));
        let next = (!rest.is_empty()).then_some((rest, place));
        Some((Ok::<_, Infallible>(piece), next))
    });
    (json, Body::from_stream(pieces)).into_response()
}

#[cfg(test)]
mod tests;
