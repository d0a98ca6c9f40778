//! The gateway's part in sharing sessions with other gateways (a store
//! several gateways use at once, `--store redis://`).
//!
//! One task: says every second that this gateway is alive (and takes over
//! the sessions of gateways that stopped saying so), hands the store's
//! reports of sessions another gateway took over to the registry, and tells
//! every socket that lost a session `session.superseded`, whichever way the
//! loss was noticed; and hands a viewer's cancel that another gateway
//! announced for a session held here to the registry and its socket. Must not decide who holds a session: the store fences,
//! the registry keeps the rules; this only carries the news between them
//! and the sockets.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::push;
use super::state::Shared;
use crate::session::RENEWALS_SAVED_EVERY;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(mut lost) = shared.sessions.lost_sessions() else {
        return;
    };
    let mut moves = shared.store.shared_sessions().and_then(|s| s.moves());
    let mut cancels = shared.store.shared_sessions().and_then(|s| s.cancels());
    let mut alive = tokio::time::interval(RENEWALS_SAVED_EVERY);
    alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let shared_store = shared.sessions.shared();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(s) = lost.recv() => {
                tracing::debug!(run = %s.run_id, epoch = s.new_epoch, "session taken over by another gateway");
                shared.conns.superseded(&s);
                shared.metrics.handovers("lost", 1);
            }
            Some(moved) = async { match moves.as_mut() {
                Some(m) => m.recv().await,
                None => std::future::pending().await,
            } } => shared.sessions.moved_elsewhere(&moved),
            // A viewer on another gateway asked a run held here to stop.
            Some((session_id, cancel)) = async { match cancels.as_mut() {
                Some(c) => c.recv().await,
                None => std::future::pending().await,
            } } => {
                if let Some((conn, run_id)) = shared.sessions.cancel_arrived(&session_id, cancel.clone()) {
                    shared.conns.push(conn, push::run_cancel_requested(&session_id, &run_id, &cancel));
                }
            }
            _ = alive.tick(), if shared_store => match take_over_silent(&shared).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(sessions = n, "took over the sessions of a gateway that stopped");
                    shared.metrics.handovers("taken_over", n as u64);
                }
                Err(e) => tracing::warn!(error = %e, "cannot tell the shared store this gateway is alive"),
            },
        }
    }
}

/// Says this gateway is alive and holds the sessions of gateways that
/// stopped. Their runs' streams are kept first, as an attach or a restore
/// keeps them: the gateway that died may have held a run whose stream it
/// never got to propose (it died just after the attach), and a lease
/// already due expires as soon as it is held, which then starts the
/// stream's retention rather than leaving it to a session that is gone.
async fn take_over_silent(shared: &Shared) -> Result<usize, crate::store::StoreError> {
    let taken = shared.sessions.keep_alive().await?;
    let now = shared.clock.now();
    for run in taken.runs() {
        shared.streams.session_started(run, now);
    }
    shared.sessions.hold(taken).await
}
