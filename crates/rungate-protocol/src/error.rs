//! Error codes and the error a command answers with.
//!
//! Owns the closed list of codes from PROTOCOL.md §2, which of them are
//! retryable, and [`CommandError`], the one error type every handler returns.
//! Must not decide *when* an error happens: the domain and the dispatcher do.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

/// The `code` field of an error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Not JSON, not an object, a binary frame, or no usable `id`/`type`.
    BadFrame,
    /// No such command `type`.
    UnknownType,
    /// The payload breaks the schema; `details.path` says where.
    InvalidPayload,
    /// No valid token.
    Unauthenticated,
    /// The token or the session's capabilities do not allow it, or the command is not
    /// offered on this endpoint.
    Forbidden,
    /// No such session on this socket.
    NotAttached,
    /// The session moved to a newer connection, or a reconnect's `connectionEpoch` is not
    /// greater than the current one (fencing).
    StaleEpoch,
    /// The session's lease ran out: attach afresh.
    SessionExpired,
    /// The run already has a live session, another runtime instance holds it, or it was
    /// finished with another outcome.
    Conflict,
    /// No such run, checkpoint, key or secret.
    NotFound,
    /// Too many requests: slow down and retry.
    RateLimited,
    /// The frame or a value in it is over its limit.
    PayloadTooLarge,
    /// `protocolVersion` is not `"1"` or `"1.x"`.
    UnsupportedProtocol,
    /// The gateway is shutting down: reconnect elsewhere or later.
    Draining,
    /// The gateway failed; `retryable` says whether trying again may help.
    Internal,
    /// The run ended (`runtime.finish`): nothing more is stored for it and its id cannot be
    /// attached again; `details` has `runId` and `outcome`.
    RunEnded,
    /// The request would take its tenant past a quota (runs, KV bytes,
    /// checkpoint bytes); nothing was stored. `details` has `quota`, `used`,
    /// `requested` and `limit`.
    QuotaExceeded,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::InvalidPayload,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotAttached,
        ErrorCode::StaleEpoch,
        ErrorCode::SessionExpired,
        ErrorCode::Conflict,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::Draining,
        ErrorCode::Internal,
        ErrorCode::RunEnded,
        ErrorCode::QuotaExceeded,
    ];

    /// The wire spelling, also used as a metrics label.
    /// The code named `s` on the wire, if it is one.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The wire spelling (`BAD_FRAME`, `RUN_ENDED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::InvalidPayload => "INVALID_PAYLOAD",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotAttached => "NOT_ATTACHED",
            ErrorCode::StaleEpoch => "STALE_EPOCH",
            ErrorCode::SessionExpired => "SESSION_EXPIRED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedProtocol => "UNSUPPORTED_PROTOCOL",
            ErrorCode::Draining => "DRAINING",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::RunEnded => "RUN_ENDED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }

    /// Whether the same request may succeed if sent again later, unchanged.
    /// Everything else needs the client to change something first.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited | ErrorCode::Draining | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed command: what goes into the `error` object of an error frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CommandError {
    /// The error's `code`.
    pub code: ErrorCode,
    /// For humans. Never contains secrets or tokens.
    pub message: String,
    /// Overrides [`ErrorCode::retryable`] where one instance differs
    /// (a failing disk during a write is retryable `INTERNAL`; a bug is not).
    pub retryable: bool,
    /// The error's `details`, if any (`path` for `INVALID_PAYLOAD`; what was refused for others).
    pub details: Option<Value>,
}

impl CommandError {
    /// An error with `code` and `message`, retryable as [`ErrorCode::retryable`] says, without
    /// details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
            retryable: code.retryable(),
            details: None,
        }
    }

    /// Sets `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Overrides `retryable`.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// A `BAD_FRAME` error.
    pub fn bad_frame(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadFrame, message)
    }

    /// A schema violation at `path` (a JSON pointer into the request frame).
    pub fn invalid_payload(path: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidPayload, message)
            .with_details(serde_json::json!({ "path": path }))
    }

    /// A `FORBIDDEN` error.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// An `INTERNAL` error (retryable).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The JSON shape of the `error` member.
#[derive(Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
    pub retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<&'a Value>,
}

impl<'a> From<&'a CommandError> for ErrorBody<'a> {
    fn from(e: &'a CommandError) -> Self {
        ErrorBody {
            code: e.code,
            message: &e.message,
            retryable: e.retryable,
            details: e.details.as_ref(),
        }
    }
}
