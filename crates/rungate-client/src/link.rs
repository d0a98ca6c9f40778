//! One client socket: connecting with a token, writing typed requests, and
//! sorting what arrives into replies, errors and pushes, all with the
//! protocol crate's codec (`encode_command`, `decode_incoming`,
//! `Push::parse`): the client has no codec of its own.
//!
//! Owns the client's view of the frame envelope. Must not know what any
//! command means or keep state between frames: the drivers do.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rungate_protocol::CommandPayload;
use rungate_protocol::envelope::{self, Frame};
use rungate_protocol::push::{Push, PushError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
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

/// A typed request, encoded by the protocol crate's codec (which names its
/// `type`).
pub(crate) fn request<C: CommandPayload>(id: &str, payload: &C) -> Message {
    message(envelope::encode_command(id, payload))
}

/// An encoded frame as one text message.
pub(crate) fn message(frame: Frame) -> Message {
    match Utf8Bytes::try_from(frame.into_bytes()) {
        Ok(text) => Message::Text(text),
        // The codec writes JSON, which is UTF-8; should that ever break,
        // an empty message draws a BAD_FRAME rather than a panic.
        Err(_) => Message::text(""),
    }
}

/// The payload of a reply to a `C`, as the protocol types it.
pub(crate) fn reply<C: CommandPayload>(payload: &RawValue) -> Result<C::Reply, ClientError> {
    // Not the payload itself in the message: it may hold secrets.
    serde_json::from_str(payload.get())
        .map_err(|e| ClientError::BadReply(format!("{} answered: {e}", C::KIND.as_str())))
}

/// A push that does not read as its type, and the run it was about if its
/// payload names one (whose follower is told).
#[derive(Debug)]
pub(crate) struct MalformedPush {
    pub(crate) error: PushError,
    pub(crate) run: Option<String>,
}

/// A push's payload, typed by the protocol crate.
pub(crate) fn push(kind: &str, payload: &RawValue) -> Result<Push, MalformedPush> {
    Push::parse(kind, payload).map_err(|error| {
        #[derive(Deserialize)]
        struct Named {
            #[serde(rename = "runId")]
            run_id: String,
        }
        let run = serde_json::from_str::<Named>(payload.get())
            .ok()
            .map(|n| n.run_id);
        MalformedPush { error, run }
    })
}

/// One frame from the gateway, sorted, owned so it can cross a channel.
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

/// Sorts one text frame with the protocol crate's codec; `None` for
/// anything that is not a frame of the protocol (ignored, as a client must
/// ignore what it does not know).
pub(crate) fn sort(text: &str) -> Option<Incoming> {
    Some(match envelope::decode_incoming(text)? {
        envelope::Incoming::Reply { id, payload } => Incoming::Reply {
            id: id.into_owned(),
            payload: payload.to_owned(),
        },
        envelope::Incoming::Error { id, error } => Incoming::Error {
            id: id.map(|i| i.into_owned()),
            error: ClientError::from(error),
        },
        envelope::Incoming::Push { kind, payload } => Incoming::Push {
            kind: kind.into_owned(),
            payload: payload.to_owned(),
        },
    })
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
