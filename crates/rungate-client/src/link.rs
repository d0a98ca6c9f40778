//! One client socket: connecting with a token, writing requests, and
//! sorting what arrives into replies, errors and pushes.
//!
//! Owns the client's view of the frame envelope. Must not know what any
//! command means or keep state between frames: the drivers do.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::ClientError;

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `url` with `token` as a bearer token, within `timeout`.
pub(crate) async fn connect(
    url: &str,
    token: &str,
    timeout: Duration,
) -> Result<Socket, ClientError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::Connect(format!("bad URL {:?}: {e}", without_query(url))))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ClientError::Connect("the token is not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await {
        Err(_) => Err(ClientError::Connect(format!(
            "no handshake within {timeout:?}"
        ))),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            // 401/403 will not get better by retrying; say which it was.
            Err(ClientError::Connect(format!(
                "the gateway refused the connection: HTTP {}",
                response.status()
            )))
        }
        Ok(Err(e)) => Err(ClientError::Connect(e.to_string())),
        Ok(Ok((socket, _))) => Ok(socket),
    }
}

/// `url` up to its query: a `?token=` there must not reach an error
/// message, which callers log.
fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Whether a connect error is a refusal (bad token) rather than a network
/// problem worth retrying.
pub(crate) fn is_refusal(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect(m) if m.contains("HTTP 401") || m.contains("HTTP 403"))
}

/// A request frame.
pub(crate) fn request(id: &str, kind: &str, payload: &Value) -> Message {
    let frame = serde_json::json!({ "id": id, "type": kind, "payload": payload });
    Message::text(frame.to_string())
}

/// One frame from the gateway, sorted.
#[derive(Debug)]
pub(crate) enum Incoming {
    Reply {
        id: String,
        payload: Box<RawValue>,
    },
    Error {
        /// `None` when the gateway could not read the request's id.
        id: Option<String>,
        error: ClientError,
    },
    Push {
        kind: String,
        payload: Box<RawValue>,
    },
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<Value>,
}

/// Sorts one text frame; `None` for anything that is not a frame of the
/// protocol (ignored, as a client must ignore what it does not know).
pub(crate) fn sort(text: &str) -> Option<Incoming> {
    let env: Envelope = serde_json::from_str(text).ok()?;
    match env.kind.as_str() {
        "reply" => Some(Incoming::Reply {
            id: env.id?,
            payload: env.payload?,
        }),
        "error" => Some(Incoming::Error {
            id: env.id,
            error: ClientError::from_error_body(env.error.as_ref()?),
        }),
        _ => Some(Incoming::Push {
            kind: env.kind,
            payload: env.payload?,
        }),
    }
}

/// The next protocol frame, or `None` once the socket is closed or broken.
pub(crate) async fn next(socket: &mut Socket) -> Option<Incoming> {
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => {
                if let Some(frame) = sort(text.as_str()) {
                    return Some(frame);
                }
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Sends one message; `false` if the socket is gone.
pub(crate) async fn send(socket: &mut Socket, message: Message) -> bool {
    socket.send(message).await.is_ok()
}
