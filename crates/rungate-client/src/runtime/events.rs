//! What a [`super::RuntimeClient`] tells its application without being
//! asked: the connection's state, things that happened to the connection
//! or a session, and viewers' stop requests.
//!
//! Plain values the driver broadcasts. Must not hold the driver's state.

use std::time::Duration;

use rungate_protocol::push::RunCancelRequested;

/// The connection as the application sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected at this `connectionEpoch`, sessions restored.
    Connected {
        /// The socket's `connectionEpoch`.
        epoch: u64,
    },
    /// The socket is gone; reconnect attempt `attempt` is pending.
    Reconnecting {
        /// How many reconnect attempts failed before this one (0 for the first).
        attempt: u32,
    },
    /// [`super::RuntimeClient::close`] was called or every handle was dropped.
    Closed,
}

/// Things that happened to the connection or a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The socket was lost.
    Disconnected,
    /// A new socket carries the sessions again, at this epoch.
    Reconnected {
        /// The new socket's `connectionEpoch`.
        epoch: u64,
    },
    /// The gateway is shutting down; the client will reconnect.
    Draining {
        /// The push's `reconnectAfterMs`: how long the client waits before reconnecting.
        reconnect_after: Duration,
    },
    /// The run's lease ran out; its unacknowledged publishes failed.
    SessionExpired {
        /// The run whose session expired (`runId`).
        run_id: String,
    },
    /// Another connection took the run over with a higher epoch.
    SessionSuperseded {
        /// The run whose session moved (`runId`).
        run_id: String,
    },
    /// After a reconnect the gateway no longer knew the run's session (its
    /// lease ran out, or the gateway restarted without durable sessions),
    /// so the client attached the run afresh: a new session, the same run.
    SessionRenewed {
        /// The run attached afresh (`runId`).
        run_id: String,
        /// Its new session (`sessionId`).
        session_id: String,
    },
    /// The run ended (finished here, or the gateway said `RUN_ENDED`): its
    /// session is gone for good and the client forgot it.
    RunEnded {
        /// The run that ended (`runId`).
        run_id: String,
    },
}

/// A viewer asked a run to stop (the `run.cancelRequested` push).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    /// The session holding the run (`sessionId`).
    pub session_id: String,
    /// The run a viewer asked to stop (`runId`).
    pub run_id: String,
    /// The viewer's `reason`, if it gave one (at most 1024 UTF-8 bytes).
    pub reason: Option<String>,
    /// RFC 3339.
    pub requested_at: String,
}

impl From<RunCancelRequested> for CancelRequest {
    /// The push as the protocol crate typed it.
    fn from(p: RunCancelRequested) -> CancelRequest {
        CancelRequest {
            session_id: p.session_id.to_string(),
            run_id: p.run_id.to_string(),
            reason: p.reason,
            requested_at: p.requested_at.to_string(),
        }
    }
}
