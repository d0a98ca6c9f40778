//! Every push the gateway builds: frames nobody asked for, from the
//! protocol crate's typed push payloads.
//!
//! Owns which payload each server-initiated message carries and how a
//! domain value becomes it: `session.superseded` (a [`Superseded`]),
//! `session.expired` (an [`Expired`]), `run.cancelRequested` (a
//! [`PendingCancel`]), `gateway.draining` and `stream.closed`, and the same
//! payloads where SSE sends them as `data:` (`draining`, `closed`, `gap`).
//! The frames a stream's ring stores (`stream.events`, `stream.gap`,
//! `stream.ended`) are built once per batch by `protocol::stream_frame`,
//! inside the stream engine, and reach sockets as they are; they are not
//! built here. Must not decide who is pushed what or when (the handlers,
//! the lease timer, `cluster` and the connection do), nor queue anything:
//! `state::Connections` delivers.

use std::time::Duration;

use crate::ids::{RunId, SessionId, StreamEpoch};
use crate::protocol::push;
use crate::protocol::{Frame, encode_push};
use crate::session::Expired;
use crate::session::registry::Superseded;
use crate::store::PendingCancel;
use crate::time::Timestamp;

/// `session.superseded` for the socket that lost `s` to a newer epoch.
pub(crate) fn session_superseded(s: &Superseded) -> Frame {
    let payload = push::SessionSuperseded {
        session_id: s.session_id.clone(),
        run_id: s.run_id.clone(),
        connection_epoch: s.new_epoch,
    };
    encode_push(push::SESSION_SUPERSEDED, &payload)
}

/// `session.expired` for the socket `e`'s session was bound to.
pub(crate) fn session_expired(e: &Expired) -> Frame {
    let payload = push::SessionExpired {
        session_id: e.session_id.clone(),
        run_id: e.run_id.clone(),
    };
    encode_push(push::SESSION_EXPIRED, &payload)
}

/// `run.cancelRequested` for the socket holding `session_id` of `run_id`,
/// which a viewer asked to stop.
pub(crate) fn run_cancel_requested(
    session_id: &SessionId,
    run_id: &RunId,
    cancel: &PendingCancel,
) -> Frame {
    let payload = push::RunCancelRequested {
        session_id: session_id.clone(),
        run_id: run_id.clone(),
        reason: cancel.reason.clone(),
        requested_at: Timestamp::from_unix_millis(cancel.requested_at_unix_ms),
    };
    encode_push(push::RUN_CANCEL_REQUESTED, &payload)
}

/// The `gateway.draining` payload: reconnect after `reconnect_after`.
pub(crate) fn draining(reconnect_after: Duration) -> push::GatewayDraining {
    push::GatewayDraining {
        reconnect_after_ms: reconnect_after.as_millis() as u64,
    }
}

/// The `gateway.draining` push.
pub(crate) fn gateway_draining(reconnect_after: Duration) -> Frame {
    encode_push(push::GATEWAY_DRAINING, &draining(reconnect_after))
}

/// The `stream.closed` payload: `run`'s stream of `epoch` was dropped.
pub(crate) fn closed(run: &RunId, epoch: &StreamEpoch) -> push::StreamClosed {
    push::StreamClosed {
        run_id: run.clone(),
        stream_epoch: epoch.clone(),
    }
}

/// The `stream.closed` push: the followed stream was dropped (retention or
/// the memory budget); resume to follow the run's next stream.
pub(crate) fn stream_closed(run: &RunId, epoch: &StreamEpoch) -> Frame {
    encode_push(push::STREAM_CLOSED, &closed(run, epoch))
}

/// The `stream.gap` payload, for a transport that serializes it (SSE); a
/// WebSocket follower is sent the frame its subscription delivers.
pub(crate) fn gap(run: &RunId, epoch: &StreamEpoch, from: u64, to: u64) -> push::StreamGap {
    push::StreamGap {
        run_id: run.clone(),
        stream_epoch: epoch.clone(),
        from_offset: from,
        to_offset: to,
    }
}

/// A payload's JSON text, for SSE's `data:`. Our own payloads of ids,
/// numbers and strings always serialize.
pub(crate) fn json(payload: &impl serde::Serialize) -> String {
    serde_json::to_string(payload).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ConnId;
    use serde_json::{Value, json};

    fn parsed(frame: &Frame) -> Value {
        serde_json::from_str(frame.as_str()).unwrap()
    }

    #[test]
    fn each_push_has_its_type_and_payload() {
        let session_id = SessionId::generate();
        let run_id = RunId::new("r-1").unwrap();
        let superseded = Superseded {
            conn: ConnId(1),
            session_id: session_id.clone(),
            run_id: run_id.clone(),
            new_epoch: 4,
        };
        assert_eq!(
            parsed(&session_superseded(&superseded)),
            json!({"type": "session.superseded", "payload": {
                "sessionId": session_id, "runId": "r-1", "connectionEpoch": 4 }})
        );
        let expired = Expired {
            conn: None,
            session_id: session_id.clone(),
            run_id: run_id.clone(),
        };
        assert_eq!(
            parsed(&session_expired(&expired)),
            json!({"type": "session.expired", "payload": {
                "sessionId": session_id, "runId": "r-1" }})
        );
        let cancel = PendingCancel {
            reason: None,
            requested_at_unix_ms: 0,
        };
        let v = parsed(&run_cancel_requested(&session_id, &run_id, &cancel));
        assert_eq!(v["type"], "run.cancelRequested");
        assert!(v["payload"].get("reason").is_none());
        assert_eq!(
            parsed(&gateway_draining(Duration::from_millis(1500))),
            json!({"type": "gateway.draining", "payload": { "reconnectAfterMs": 1500 }})
        );
        let epoch = StreamEpoch::generate();
        assert_eq!(
            parsed(&stream_closed(&run_id, &epoch)),
            json!({"type": "stream.closed", "payload": { "runId": "r-1", "streamEpoch": epoch }})
        );
    }
}
