//! The periodic sweep of output streams: retention after a run's session
//! ended, and the global byte budget.
//!
//! One task for the whole gateway, ticking at a fixed pace; the stream
//! engine decides what to drop given the time. Must not hold stream policy
//! itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::state::Shared;

/// Retention is counted in minutes or hours; a few seconds late is fine.
/// The budget is also held on every publish, so this is only a backstop.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
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
}
