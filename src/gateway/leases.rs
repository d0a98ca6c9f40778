//! The one timer behind every lease.
//!
//! Sleeps until the registry's earliest deadline (or until told a deadline
//! moved), expires what is due, and tells the sockets concerned and the
//! stream engine (retention starts when a run's session ends). There is no
//! task or timer per session. Must not decide what expires: the registry
//! does, given the time.

use std::sync::Arc;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::state::Shared;
use crate::protocol::commands::push;
use crate::protocol::encode_push;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let next = shared.sessions.with(|r| r.next_deadline());
        // With nothing scheduled, wait for the first attach to say so.
        let far = Instant::now() + std::time::Duration::from_secs(86_400);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.sessions.deadline_moved() => continue,
            _ = sleep_until(next.unwrap_or(far)) => {}
        }
        let now = Instant::now();
        let expired = shared.sessions.with(|r| r.expire_due(now));
        for e in expired {
            tracing::debug!(run = %e.run_id, "session lease expired");
            // The run's output stays readable for the retention period.
            shared.streams.session_ended(&e.run_id, now);
            if let Some(conn) = e.conn {
                let payload = push::SessionExpired {
                    session_id: &e.session_id,
                    run_id: &e.run_id,
                };
                shared
                    .conns
                    .push(conn, encode_push(push::SESSION_EXPIRED, &payload));
            }
        }
    }
}
