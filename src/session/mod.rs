//! Sessions, leases and connection epochs (PROTOCOL.md §3), and keeping
//! them across restarts.
//!
//! The rules live in [`registry`], a plain state machine that takes the
//! current time as an argument; [`Sessions`] wraps it for sharing between
//! connection tasks, wakes the lease timer when a deadline appears, and
//! hands every change to the [`Store`] in the order the registry made them.
//! Must not know about sockets, frames or timers: the gateway drives it.

pub mod registry;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::store::{Store, StoreError, StoreFuture};
use crate::time::Clock;

pub use registry::{
    AttachOutcome, AttachParams, ConnId, Counts, Expired, LeasePolicy, RecoverError, Restored,
    SessionError, SessionRegistry, SessionState, SessionView, Superseded,
};

/// How often renewed leases are saved. A restarted gateway adds twice this
/// to every saved deadline, so no runtime loses a lease it was promised
/// because its last heartbeat had not been saved yet.
pub const RENEWALS_SAVED_EVERY: Duration = Duration::from_secs(1);

/// Renewals saved per slice: a few hundred records is tens of
/// microseconds under the lock.
const RENEWALS_PER_SLICE: usize = 256;

/// The registry behind a lock, plus the signal that the earliest deadline
/// may have moved and the store that keeps sessions across restarts.
/// Critical sections are short map operations plus the (non-blocking)
/// submission of a store write; nothing awaits while holding the lock.
pub struct Sessions {
    registry: Mutex<SessionRegistry>,
    deadline_moved: Notify,
    store: Arc<dyn Store>,
    clock: Clock,
}

/// Completes when the session changes a call made are saved.
pub type Saved = StoreFuture<()>;

impl Sessions {
    pub fn new(policy: LeasePolicy, store: Arc<dyn Store>, clock: Clock) -> Self {
        Sessions {
            registry: Mutex::new(SessionRegistry::new(policy)),
            deadline_moved: Notify::new(),
            store,
            clock,
        }
    }

    /// Loads the sessions `store` kept and restores them (see
    /// [`SessionRegistry::restore`]); those whose lease ran out while the
    /// gateway was down expire now, before anything is served. Returns the
    /// sessions and what was restored, with the sessions that expired.
    pub async fn restore(
        policy: LeasePolicy,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> Result<(Self, Restored, Vec<Expired>), StoreError> {
        let records = store.sessions_load().await?;
        let sessions = Sessions::new(policy, store, clock);
        let ((restored, expired), saved) = sessions.with_new_deadline(|r| {
            let restored = r.restore(records, &clock, RENEWALS_SAVED_EVERY * 2);
            let expired = r.expire_due(clock.now());
            (restored, expired)
        });
        // The expiries and dropped duplicates just taken are on disk before
        // a runtime can see the state they describe.
        saved.await?;
        Ok((sessions, restored, expired))
    }

    /// Runs `f` on the registry. Use for reads and for operations that
    /// cannot add an earlier deadline. Changes `f` made are submitted to the
    /// store before the lock is released; nobody waits for them (a failure
    /// is logged by the store).
    pub fn with<R>(&self, f: impl FnOnce(&mut SessionRegistry) -> R) -> R {
        let mut registry = self.registry.lock();
        let r = f(&mut registry);
        drop(self.submit_changes(&mut registry));
        r
    }

    /// Like [`Self::with`], then wakes the lease timer: for operations that
    /// add or move deadlines (attach, reconnect, recover). Also returns a
    /// future of the changes being saved: answer the runtime only after it,
    /// so an acknowledged session survives a crash.
    pub fn with_new_deadline<R>(&self, f: impl FnOnce(&mut SessionRegistry) -> R) -> (R, Saved) {
        let mut registry = self.registry.lock();
        let r = f(&mut registry);
        let saved = self.submit_changes(&mut registry);
        drop(registry);
        self.deadline_moved.notify_one();
        (r, saved)
    }

    /// Saves the leases heartbeats renewed since the last call, a slice at
    /// a time (see [`SessionRegistry::take_renewals`]): each slice is taken
    /// and submitted under the lock, so the saved order stays the order of
    /// change, and the lock is free between slices.
    pub async fn save_renewals(&self) -> Result<(), StoreError> {
        let mut pending = Vec::new();
        loop {
            let more = {
                // Other changes were submitted by the call that made them
                // (see `with`), so only renewals can be waiting here.
                let mut registry = self.registry.lock();
                let changes = registry.take_renewals(&self.clock, RENEWALS_PER_SLICE);
                if changes.is_empty() {
                    break;
                }
                pending.push(self.store.sessions_save(changes));
                registry.has_renewals()
            };
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
        for saved in pending {
            saved.await?;
        }
        Ok(())
    }

    /// Completes when a deadline may have moved earlier than the timer knows.
    pub async fn deadline_moved(&self) {
        self.deadline_moved.notified().await
    }

    /// Submitting under the registry's lock is what keeps the saved order
    /// the order the registry changed in.
    fn submit_changes(&self, registry: &mut SessionRegistry) -> Saved {
        let changes = registry.take_changes(&self.clock);
        if changes.is_empty() {
            return ready();
        }
        self.store.sessions_save(changes)
    }
}

fn ready() -> Saved {
    std::future::ready(Ok(())).boxed()
}
