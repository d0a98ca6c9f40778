//! Periodic chores: sweeping output streams (retention after a run's
//! session ended, the global byte budget) and saving the leases heartbeats
//! renewed.
//!
//! One task for the whole gateway, ticking at a fixed pace; the stream
//! engine decides what to drop given the time, the session registry what to
//! save. Must not hold stream or session policy itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::state::Shared;
use crate::session::RENEWALS_SAVED_EVERY;

/// Retention is counted in minutes or hours; a few seconds late is fine.
/// The budget is also held on every publish, so this is only a backstop.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut renewals = tokio::time::interval(RENEWALS_SAVED_EVERY);
    renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = renewals.tick() => save_renewals(&shared).await,
            _ = sweep.tick() => sweep_streams(&shared),
        }
    }
}

/// Waits for the save so a slow disk delays the next one rather than
/// queueing writes behind it.
async fn save_renewals(shared: &Shared) {
    if let Err(e) = shared.sessions.save_renewals().await {
        tracing::warn!(error = %e, "saving renewed leases failed; a restart now may expire them early");
    }
}

fn sweep_streams(shared: &Shared) {
    let outcome = shared.streams.sweep(Instant::now());
    if outcome.expired_streams + outcome.evicted_streams > 0 || outcome.trimmed_events > 0 {
        tracing::info!(
            expired = outcome.expired_streams,
            evicted = outcome.evicted_streams,
            trimmed_events = outcome.trimmed_events,
            "stream sweep"
        );
    }
}
