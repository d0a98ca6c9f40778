//! Rust clients for the gateway: [`RuntimeClient`] for runtimes and
//! [`ViewerClient`] for anything that tails a run's output.
//!
//! Owns the client side of the protocol: sending the protocol crate's typed
//! requests (never JSON built by hand) and reading its typed replies and
//! pushes (a push that breaks its type is [`ClientError::BadPush`], never
//! guessed at), matching replies to requests by id, reconnecting with
//! backoff, re-attaching with a higher `connectionEpoch`, resending unacknowledged publishes (which `seq`
//! de-duplication makes safe), and resuming streams from the last offset
//! delivered. Speaks only the wire protocol, like any third-party client:
//! it must not reach into the gateway's internals, so it works against any
//! gateway that implements PROTOCOL.md.
//!
//! Both clients keep their socket in a background task (a *driver*) and
//! talk to it through channels, so they are cheap to clone, safe to call
//! from many tasks at once, and a caller that drops a future loses nothing
//! but its own answer.

mod backoff;
mod follow;
mod link;
mod runtime;
mod token;
mod viewer;

pub use backoff::Backoff;
pub use follow::{Follower, StreamItem};
pub use rungate_protocol::ids::RunOutcome;
pub use runtime::{
    Attached, CancelRequest, Checkpoint, ClientEvent, ConnectionState, Event, RuntimeClient,
    RuntimeOptions,
};
pub use token::TokenSource;
pub use viewer::{CancelAnswer, ViewerClient, ViewerOptions};

use serde_json::Value;

use rungate_protocol::ErrorCode;

/// What a client call can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error frame.
    #[error("{code}: {message}")]
    Gateway {
        /// The error frame's `code`: branch on this.
        code: ErrorCode,
        /// The error frame's `message`, for humans only (never secrets or tokens).
        message: String,
        /// The error frame's `retryable`: the same request may succeed later, unchanged.
        retryable: bool,
        /// The error frame's `details`, if any (`path` for `INVALID_PAYLOAD`, `runId`, refused
        /// capabilities…).
        details: Option<Value>,
    },
    /// No answer within the request timeout. The request may or may not
    /// have been applied.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The socket was lost after the request was sent and before its
    /// answer came: it may or may not have been applied. (Publishes are
    /// never failed this way: they are resent.)
    #[error("the connection was lost before the answer came; the request may have been applied")]
    ConnectionLost,
    /// The client was shut down.
    #[error("the client is closed")]
    Closed,
    /// The run was not attached through this client, or its session ended
    /// (expired or taken over by another connection).
    #[error("run {0} has no session on this client")]
    NoSession(String),
    /// The gateway could not be reached or refused the connection.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A reply did not have the shape the protocol promises.
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// A push did not have the shape the protocol promises (which member,
    /// and why): the follower of the run it was about ends with this.
    #[error(transparent)]
    BadPush(#[from] rungate_protocol::push::PushError),
    /// The request cannot be written as the protocol's typed request (a
    /// run id, capability or other identifier the protocol does not
    /// allow); it was not sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The protocol error code, if the gateway sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Gateway { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The run a gateway error names in `details.runId`, if any.
    pub fn run_id(&self) -> Option<String> {
        match self {
            ClientError::Gateway { details, .. } => details
                .as_ref()
                .and_then(|d| d["runId"].as_str())
                .map(str::to_owned),
            _ => None,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Gateway { retryable, .. } => *retryable,
            ClientError::Timeout(_) | ClientError::ConnectionLost | ClientError::Connect(_) => true,
            ClientError::Closed
            | ClientError::NoSession(_)
            | ClientError::BadReply(_)
            | ClientError::BadPush(_)
            | ClientError::InvalidRequest(_) => false,
        }
    }

    /// `value`, given as the request's `member`, is not what the protocol
    /// allows there.
    pub(crate) fn invalid(member: &str, value: &str, why: impl std::fmt::Display) -> ClientError {
        ClientError::InvalidRequest(format!("{member} {value:?}: {why}"))
    }
}

impl From<rungate_protocol::CommandError> for ClientError {
    /// An error frame from the gateway, as its codec read it.
    fn from(e: rungate_protocol::CommandError) -> ClientError {
        ClientError::Gateway {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
            details: e.details,
        }
    }
}
