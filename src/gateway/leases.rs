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

use futures_util::FutureExt;

use super::push;
use super::state::Shared;
use crate::ids::SessionId;
use crate::session::Expired;
use crate::store::StoreError;

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
        let (expired, saved) = shared.sessions.expire_due(now);
        if expired.is_empty() {
            continue;
        }
        // Sockets hear of an expiry once it is saved: with a store other
        // gateways share, one fenced off there did not happen (the session
        // moved on), which is what keeps it to one `session.expired`.
        let shared = shared.clone();
        let mut tell = Box::pin(async move {
            let fenced: Vec<SessionId> = match saved.await {
                Err(StoreError::Fenced { sessions }) => {
                    sessions.into_iter().map(|(id, _)| id).collect()
                }
                _ => Vec::new(),
            };
            let now = Instant::now();
            for e in expired.iter().filter(|e| !fenced.contains(&e.session_id)) {
                tell_expired(&shared, e, now);
            }
        });
        // A store of the gateway's own has usually saved already.
        if (&mut tell).now_or_never().is_none() {
            tokio::spawn(tell);
        }
    }
}

fn tell_expired(shared: &Shared, e: &Expired, now: Instant) {
    tracing::debug!(run = %e.run_id, "session lease expired");
    // The run's output stays readable for the retention period.
    shared.streams.session_ended(&e.run_id, now);
    if let Some(conn) = e.conn {
        shared
            .conns
            .session_lost(conn, &e.run_id, push::session_expired(e));
    }
}
