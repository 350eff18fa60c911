//! A WebSocket whose upgrade carried no token authenticates with its first message,
//! `{"type":"auth","token":"..."}`, within the handshake timeout; anything else closes it with
//! 4401.

use axum::extract::ws::{CloseFrame, Message, WebSocket};

use super::Access;
use crate::fanout::protocol::{ClientMessage, ErrorCode};
use crate::http::AppState;

/// Waits for the `auth` message; `Err(close reason)` after closing the socket with 4401.
pub async fn first_message(
    state: &AppState,
    socket: &mut WebSocket,
) -> Result<Access, &'static str> {
    let deadline = tokio::time::Instant::now() + state.fanout.auth_timeout;
    let refusal = loop {
        let msg = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => break "authentication required: no auth message in time".to_string(),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Err("client_closed"),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Text(t) => match serde_json::from_str::<ClientMessage>(t.as_str()) {
                Ok(ClientMessage::Auth { token }) => match state.auth.verify(&token) {
                    Ok(a) => return Ok(a),
                    Err(d) => break format!("token refused: {}", d.reason),
                },
                _ => {
                    break "authentication required: the first message must be {\"type\":\"auth\",\"token\":..}"
                        .to_string()
                }
            },
            _ => break "authentication required: the first message must be an auth message".to_string(),
        }
    };
    state
        .auth
        .count(&super::Denied::unauthorized(refusal.clone()));
    // fatal here (the connection closes), unlike a refused token refresh later on
    let text = serde_json::json!({
        "type": "error",
        "code": ErrorCode::Unauthorized.as_str(),
        "message": refusal,
        "fatal": true,
    });
    let _ = socket.send(Message::Text(text.to_string().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 4401,
            reason: "unauthorized".into(),
        })))
        .await;
    Err("unauthorized")
}
