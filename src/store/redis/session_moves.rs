//! The channel of news about sessions between gateways
//! (`{p}:session-moves`): takeovers, and viewers' cancels for sessions
//! another gateway holds.
//!
//! Owns what is said on the channel (its two message kinds), the task that
//! follows it for this node, and publishing a cancel. Must not act on the
//! news (the gateway's cluster task does) and must not fence anything: a
//! move missed while the channel was away is not lost for good, since the
//! old node's next save of that session is fenced by `sessions`.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{Reply, answer};
use crate::ids::SessionId;
use crate::redis::conn::subscribe;
use crate::redis::keys::Keys;
use crate::store::{PendingCancel, SessionMoved, StoreError};

/// A viewer's cancel another gateway announced: the session and the cancel.
pub(super) type Cancelled = (SessionId, PendingCancel);

/// How long to wait before subscribing again after a failed attempt.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// A session-moves op, answered on its `reply`.
pub(super) enum Op {
    /// Publishes a cancel on the channel.
    AnnounceCancel {
        session_id: SessionId,
        cancel: PendingCancel,
        reply: Reply<()>,
    },
}

/// The session-moves part of the store's task.
pub(super) struct SessionMoves {
    keys: Keys,
}

impl SessionMoves {
    pub(super) fn new(keys: Keys) -> SessionMoves {
        SessionMoves { keys }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::AnnounceCancel {
                session_id,
                cancel,
                reply,
            } => {
                let published: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(self.keys.session_moves())
                    .arg(cancel_message(&session_id, &cancel))
                    .query_async(conn)
                    .await;
                answer(
                    reply,
                    published
                        .map(drop)
                        .map_err(|e| StoreError::Unavailable(e.to_string())),
                )
            }
        }
    }
}

/// Follows the channel of session takeovers for as long as anyone listens,
/// resubscribing after a lost connection. A move missed while away is not
/// lost for good: the old node's next save of that session is fenced.
/// The same channel carries viewers' cancels for sessions another gateway
/// holds (`cancel ...` messages, see [`cancel_message`]): one subscription
/// for both kinds of news about sessions.
pub(super) async fn follow(
    client: redis::Client,
    channel: String,
    node: String,
    out: mpsc::UnboundedSender<SessionMoved>,
    cancels: mpsc::UnboundedSender<Cancelled>,
) {
    use futures_util::StreamExt;
    while !out.is_closed() {
        let mut pubsub = match subscribe(&client, &channel).await {
            Ok(p) => p,
            Err(_) => {
                tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                continue;
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                // The store is gone: nobody is left to tell.
                _ = out.closed() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if let Some(cancel) = parse_cancel(&text) {
                let _ = cancels.send(cancel);
                continue;
            }
            // This node's own takeovers are news only to the others.
            if let Some((moved, by)) = parse_move(&text)
                && by != node
                && out.send(moved).is_err()
            {
                return;
            }
        }
        tracing::warn!("lost Redis's channel of session moves; resubscribing");
    }
}

/// `cancel SESSION_ID REQUESTED_AT_MS REASON_JSON`: a viewer's cancel for
/// a session, for whichever gateway holds it. `REASON_JSON` is the reason
/// as a JSON string, or `null`. Older nodes read it as a move of no valid
/// session and ignore it.
fn cancel_message(session_id: &SessionId, cancel: &PendingCancel) -> String {
    let reason = serde_json::to_string(&cancel.reason).unwrap_or_else(|_| "null".into());
    format!(
        "cancel {session_id} {} {reason}",
        cancel.requested_at_unix_ms
    )
}

fn parse_cancel(text: &str) -> Option<Cancelled> {
    let rest = text.strip_prefix("cancel ")?;
    let (sid, rest) = rest.split_once(' ')?;
    let (ms, reason) = rest.split_once(' ')?;
    let cancel = PendingCancel {
        reason: serde_json::from_str(reason).ok()?,
        requested_at_unix_ms: ms.parse().ok()?,
    };
    Some((SessionId::new(sid).ok()?, cancel))
}

/// `SESSION_ID EPOCH NODE` as the sessions save script publishes it: the
/// move and the node that made it.
fn parse_move(text: &str) -> Option<(SessionMoved, &str)> {
    let mut parts = text.split(' ');
    let moved = SessionMoved {
        session_id: SessionId::new(parts.next()?).ok()?,
        epoch: parts.next()?.parse().ok()?,
    };
    Some((moved, parts.next()?))
}
