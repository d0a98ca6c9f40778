//! The global byte budget (`global_max_bytes`) across every run's stream.
//!
//! Owns the policy: room is made by dropping whole idle streams (no live
//! session), least recently published first, and then only at the expense
//! of the publisher's own history; a run with a live session never loses
//! events to another run's publishing (issue #19). A batch the others leave
//! no room for is refused whole. With a remote authority (Redis) the rings
//! are replicas and keep what the authority kept: only idle streams make
//! room, and nothing is refused here.
//! Must not decide retention (see [`super::retention`]) or wake readers
//! of a trimmed stream: those at the head are unaffected, the others find
//! the gap on their next read.

use std::sync::atomic::Ordering;

use super::StreamHub;
use crate::ids::RunId;
use crate::stream::{PublishedEvent, StreamError, SweepOutcome};

impl StreamHub {
    /// Makes room for `events` before they go into `run`'s ring, if the
    /// budget would be exceeded; refuses them with
    /// [`StreamError::BudgetFull`] if the other runs alone leave no room.
    pub(super) fn make_room(
        &self,
        run: &RunId,
        events: &[PublishedEvent<'_>],
    ) -> Result<(), StreamError> {
        let limit = self.limits.global_max_bytes;
        // At most what the run's ring can hold (it trims itself past that;
        // a batch larger still is the ring's TooLarge, not the budget's).
        let incoming = events
            .iter()
            .map(|e| e.json.len())
            .sum::<usize>()
            .min(self.limits.max_bytes_per_run);
        if self.total_bytes().saturating_add(incoming) <= limit {
            return Ok(());
        }
        self.enforce_budget(Some(run), incoming);
        let own = self
            .streams
            .get(run)
            .map_or(0, |s| s.state.read().ring.bytes());
        // Refused only if the others alone leave no room: this run can
        // always give up its own history.
        let others = self.total_bytes().saturating_sub(own);
        if others.saturating_add(incoming.min(limit)) > limit {
            return Err(StreamError::BudgetFull { max_bytes: limit });
        }
        Ok(())
    }

    /// Brings total bytes within `global_max_bytes` less `room` (a batch
    /// about to be appended): drops whole idle streams (no live session),
    /// least recently published first; if still over, evicts the oldest
    /// events of `publisher`'s own stream, and of no other. Does nothing if
    /// another call is already at it.
    pub(super) fn enforce_budget(&self, publisher: Option<&RunId>, room: usize) -> SweepOutcome {
        let mut outcome = SweepOutcome::default();
        let Some(_guard) = self.budget.try_lock() else {
            return outcome;
        };
        let limit = self.limits.global_max_bytes.saturating_sub(room);
        if self.total_bytes() <= limit {
            return outcome;
        }
        let mut idle = Vec::new();
        let mut active = Vec::new();
        for entry in self.streams.iter() {
            let state = entry.value().state.read();
            if state.ring.bytes() == 0 {
                continue;
            }
            let item = (
                state.last_publish,
                entry.key().clone(),
                entry.value().clone(),
            );
            // The publisher's own stream is trimmed, never dropped whole
            // for its own batch (even when idle: no session yet).
            if publisher == Some(entry.key()) {
                active.push(item);
            } else if state.idle_since.is_some() {
                idle.push(item);
            }
        }
        idle.sort_by_key(|(at, _, _)| *at);
        active.sort_by_key(|(at, _, _)| *at);

        for (_, run, stream) in &idle {
            if self.total_bytes() <= limit {
                return outcome;
            }
            if self.drop_stream(run, stream, true, |_, state| state.idle_since.is_some()) {
                outcome.evicted_streams += 1;
            }
        }
        for (_, _, stream) in &active {
            let over = self.total_bytes().saturating_sub(limit);
            if over == 0 {
                break;
            }
            let mut state = stream.state.write();
            if state.closed {
                continue;
            }
            let before = state.ring.bytes();
            let (events, _) = state.ring.trim(over);
            self.account(before, state.ring.bytes());
            drop(state);
            outcome.trimmed_events += events;
            self.evicted_events.fetch_add(events, Ordering::Relaxed);
        }
        outcome
    }
}
