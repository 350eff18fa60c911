//! Whole-table reads (`GET /api/tables/{table}`, a union's included), bounded. Each holds a copy
//! of the rows it selects (their keys and shared rows: ~100 bytes a row beside the table) from
//! its copy until its body's last piece is built, and the body goes out in pieces of
//! [`PIECE_BYTES`] as the client takes them: what a read costs is its copy, not its text (a
//! 1M-row table's body is ~136 MB). At most `--max-table-reads` run at once; a request waits up to
//! [`WAIT`] for a place, then gets 503 with `Retry-After`. A client that stops reading holds its
//! place until the connection's idle timeout closes it (`--idle-timeout-secs`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::IntGauge;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::table_body::TableBody;

/// About the size of each piece of a body sent in pieces.
pub const PIECE_BYTES: usize = 256 * 1024;

/// How long a read waits for a place before it is answered 503.
pub const WAIT: Duration = Duration::from_secs(5);

/// The places of whole-table reads.
pub struct TableReads {
    places: Arc<Semaphore>,
    /// 0: no limit.
    max: usize,
    in_flight: IntGauge,
}

/// A read's place: given back when dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl TableReads {
    /// `max` reads at once (0: no limit); `in_flight` counts them.
    pub fn new(max: usize, in_flight: IntGauge) -> Self {
        let permits = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        TableReads {
            places: Arc::new(Semaphore::new(permits)),
            max,
            in_flight,
        }
    }

    /// A place, waiting up to `wait`; the 503 to answer when none came free.
    pub async fn enter(&self, wait: Duration) -> Result<Place, Response> {
        match tokio::time::timeout(wait, self.places.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                self.in_flight.inc();
                Ok(Place {
                    _permit: permit,
                    in_flight: self.in_flight.clone(),
                })
            }
            // the semaphore is never closed; a timeout or a close both mean no place
            _ => Err(busy(self.max, wait)),
        }
    }
}

fn busy(max: usize, wait: Duration) -> Response {
    let msg = format!(
        "busy: {max} whole-table reads are in progress (--max-table-reads) and none ended within {} s; retry later",
        wait.as_secs()
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "error": msg })),
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
