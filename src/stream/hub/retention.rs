//! Dropping whole streams: retention after a run's session ended, and the
//! one way a stream leaves the map ([`StreamHub::drop_stream`]).
//!
//! Owns when an idle stream has outlived the retention period, and the
//! atomic drop: decided and done under the map's shard lock and the
//! stream's lock together, so no publish slips in between; its readers are
//! woken with `Closed`. A drop this hub decided is told to the backend
//! ([`News::Dropped`]); one the authority decided is not (it knows).
//! Must not read a clock: `now` comes in from the gateway's timer.

use std::sync::Arc;

use tokio::time::Instant;

use super::{RunStream, StreamHub, StreamState};
use crate::ids::RunId;
use crate::stream::SweepOutcome;
use crate::stream::backend::News;

impl StreamHub {
    /// Drops streams idle for at least the retention period, then holds
    /// the global byte budget (see [`StreamHub::enforce_budget`]). The
    /// gateway calls it from a timer (every few seconds is plenty).
    ///
    /// An idle stream that holds no events but has subscribers is kept:
    /// dropping it frees nothing and would only send a dashboard that waits
    /// for a run to start a needless `Closed`.
    pub fn sweep(&self, now: Instant) -> SweepOutcome {
        let retention = self.limits.retention;
        let candidates: Vec<(RunId, Arc<RunStream>)> = self
            .streams
            .iter()
            .filter(|e| {
                let state = e.value().state.read();
                state
                    .idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= retention)
            })
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut expired = 0;
        for (run, stream) in candidates {
            let dropped = self.drop_stream(&run, &stream, true, |s, state| {
                let expired = state
                    .idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= retention);
                // The map holds one reference and `candidates` another.
                let watched = Arc::strong_count(s) > 2;
                expired && !(state.ring.is_empty() && watched)
            });
            if dropped {
                expired += 1;
            }
        }
        let budget = self.enforce_budget(None, 0);
        SweepOutcome {
            expired_streams: expired,
            ..budget
        }
    }

    /// Removes `stream` from the map if it is still `run`'s stream and
    /// `keep_going` agrees (checked under the stream's lock, so no publish
    /// slips in between), frees its events and wakes its subscribers with
    /// `Closed`; `tell` says whether the backend hears of it. Returns
    /// whether it was dropped.
    pub(super) fn drop_stream(
        &self,
        run: &RunId,
        stream: &Arc<RunStream>,
        tell: bool,
        keep_going: impl FnOnce(&Arc<RunStream>, &StreamState) -> bool,
    ) -> bool {
        let removed = self.streams.remove_if(run, |_, current| {
            if !Arc::ptr_eq(current, stream) {
                return false;
            }
            let mut state = current.state.write();
            if state.closed || !keep_going(current, &state) {
                return false;
            }
            state.closed = true;
            let before = state.ring.bytes();
            state.ring.clear();
            self.account(before, 0);
            if tell {
                self.backend.tell(News::Dropped {
                    run,
                    epoch: state.ring.epoch(),
                });
            }
            self.ids.write().remove(run);
            true
        });
        if removed.is_some() {
            stream.notify.notify_waiters();
        }
        removed.is_some()
    }
}
