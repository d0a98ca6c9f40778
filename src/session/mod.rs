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
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::ids::{RunId, SessionId};
use crate::store::{PendingCancel, SessionMoved, SessionRecord, Store, StoreError, StoreFuture};
use crate::time::Clock;

pub use registry::{
    AttachOutcome, AttachParams, CancelTarget, ConnId, Counts, Expired, LeasePolicy, RecoverError,
    Restored, SessionError, SessionRegistry, SessionState, SessionView, Superseded,
};

/// How often renewed leases are saved. A restarted gateway adds twice this
/// (plus the renewal save step) to every saved deadline, so no runtime
/// loses a lease it was promised because its last heartbeat had not been
/// saved yet.
pub const RENEWALS_SAVED_EVERY: Duration = Duration::from_secs(1);

/// Renewals saved per slice: a few hundred records is tens of
/// microseconds under the lock.
const RENEWALS_PER_SLICE: usize = 256;

/// The registry behind a lock, plus the signal that the earliest deadline
/// may have moved and the store that keeps sessions across restarts.
/// Critical sections are short map operations plus the (non-blocking)
/// submission of a store write; nothing awaits while holding the lock.
///
/// With a store several gateways share, a session held here can be lost
/// to another gateway at any time (its takeover reported by the store, or
/// a save here fenced off). Every such loss goes out through one channel,
/// [`Sessions::lost_sessions`], whoever noticed it.
pub struct Sessions {
    registry: Arc<Mutex<SessionRegistry>>,
    deadline_moved: Notify,
    store: Arc<dyn Store>,
    clock: Clock,
    lost_tx: mpsc::UnboundedSender<Superseded>,
    lost_rx: Mutex<Option<mpsc::UnboundedReceiver<Superseded>>>,
}

/// Completes when the session changes a call made are saved.
pub type Saved = StoreFuture<()>;

impl Sessions {
    pub fn new(policy: LeasePolicy, store: Arc<dyn Store>, clock: Clock) -> Self {
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        Sessions {
            registry: Arc::new(Mutex::new(SessionRegistry::new(policy))),
            deadline_moved: Notify::new(),
            store,
            clock,
            lost_tx,
            lost_rx: Mutex::new(Some(lost_rx)),
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
            let restored = r.restore(records, &clock, r.policy().saved_deadline_slack());
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
                let max_runs = registry.policy().max_runs_per_tenant;
                let saved = self.store.sessions_save_within(changes, max_runs);
                pending.push(self.fenced_means_lost(saved));
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

    /// Expires what is due at `now` (see [`SessionRegistry::expire_due`]).
    /// Tell the sockets only once the returned future says the expiries
    /// are saved: with a store other gateways share, an expiry fenced off
    /// there (the session moved on) did not happen, and the future names it.
    pub fn expire_due(&self, now: Instant) -> (Vec<Expired>, Saved) {
        let mut registry = self.registry.lock();
        let expired = registry.expire_due(now);
        let saved = self.submit_changes(&mut registry);
        (expired, saved)
    }

    /// Sessions held on a socket here that another gateway took over: each
    /// socket is to be told `session.superseded`. Called once; `None` after.
    pub fn lost_sessions(&self) -> Option<mpsc::UnboundedReceiver<Superseded>> {
        self.lost_rx.lock().take()
    }

    /// Whether another gateway may hold sessions of this store (so
    /// attaching reads the run's session from the store first).
    pub fn shared(&self) -> bool {
        self.store.shared_sessions().is_some()
    }

    /// Reads `run`'s session from a store other gateways share and takes
    /// it in (see [`SessionRegistry::adopt`]), so a reconnect here finds a
    /// session another gateway held, and a fresh attach finds the run
    /// taken. Resolves at once for a store of this gateway's own.
    pub fn load_from_shared(&self, run: &RunId) -> Saved {
        let Some(shared) = self.store.shared_sessions() else {
            return ready();
        };
        let loaded = shared.session_of_run(run);
        self.adopt_loaded(Box::pin(
            async move { Ok(loaded.await?.into_iter().collect()) },
        ))
    }

    /// As [`Sessions::load_from_shared`] for every sub-run of main session
    /// `parent` (before `recoverConnections` names none).
    pub fn load_sub_runs_from_shared(&self, parent: &SessionId) -> Saved {
        match self.store.shared_sessions() {
            Some(shared) => self.adopt_loaded(shared.sub_sessions(parent)),
            None => ready(),
        }
    }

    fn adopt_loaded(&self, loaded: StoreFuture<Vec<(SessionRecord, bool)>>) -> Saved {
        let registry = self.registry.clone();
        let (lost, clock) = (self.lost_tx.clone(), self.clock);
        Box::pin(async move {
            for (record, held_here) in loaded.await? {
                let mut r = registry.lock();
                let slack = r.policy().saved_deadline_slack();
                let superseded = r.adopt(record, held_here, &clock, slack, clock.now());
                drop(r);
                for s in superseded {
                    let _ = lost.send(s);
                }
            }
            Ok(())
        })
    }

    /// Tells a store other gateways share that this one is alive, and
    /// takes over the sessions of any that stopped: the store now says
    /// they are held here, and [`Sessions::hold`] starts their leases.
    /// Between the two the caller keeps their runs' streams (as on attach),
    /// before a lease that is already due can expire here.
    pub async fn keep_alive(&self) -> Result<TakenOver, StoreError> {
        match self.store.shared_sessions() {
            Some(shared) => Ok(TakenOver(shared.keep_alive().await?)),
            None => Ok(TakenOver(Vec::new())),
        }
    }

    /// Runs the leases of sessions taken over here, from their saved
    /// deadlines (plus slack); answers how many once they are saved.
    pub async fn hold(&self, taken: TakenOver) -> Result<usize, StoreError> {
        let records = taken.0;
        if records.is_empty() {
            return Ok(0);
        }
        let count = records.len();
        let (_, saved) = self.with_new_deadline(|r| {
            let now = self.clock.now();
            for record in records {
                let slack = r.policy().saved_deadline_slack();
                r.adopt(record, true, &self.clock, slack, now);
            }
        });
        saved.await?;
        Ok(count)
    }

    /// A cancel another gateway announced for session `id`: kept with it if
    /// it is held here (and saved); answers the socket to push it to.
    pub fn cancel_arrived(&self, id: &SessionId, cancel: PendingCancel) -> Option<(ConnId, RunId)> {
        let mut registry = self.registry.lock();
        let target = registry.request_cancel_of(id, cancel);
        drop(self.submit_changes(&mut registry));
        target
    }

    /// Another gateway took a session over: the socket here that held it
    /// (if any) is reported on [`Sessions::lost_sessions`].
    pub fn moved_elsewhere(&self, moved: &SessionMoved) {
        let now = self.clock.now();
        let lost = self
            .registry
            .lock()
            .lose(&moved.session_id, moved.epoch, now);
        if let Some(s) = lost {
            let _ = self.lost_tx.send(s);
        }
    }

    /// Submitting under the registry's lock is what keeps the saved order
    /// the order the registry changed in. A save a shared store fenced off
    /// means those sessions are held elsewhere: they are given up here
    /// before the future reports it.
    fn submit_changes(&self, registry: &mut SessionRegistry) -> Saved {
        let changes = registry.take_changes(&self.clock);
        if changes.is_empty() {
            return ready();
        }
        let max_runs = registry.policy().max_runs_per_tenant;
        self.fenced_means_lost(self.store.sessions_save_within(changes, max_runs))
    }

    fn fenced_means_lost(&self, saved: Saved) -> Saved {
        if self.store.shared_sessions().is_none() {
            return saved;
        }
        let registry = self.registry.clone();
        let (lost, clock) = (self.lost_tx.clone(), self.clock);
        Box::pin(async move {
            let result = saved.await;
            if let Err(StoreError::Fenced { sessions }) = &result {
                let now = clock.now();
                let mut registry = registry.lock();
                for (id, epoch) in sessions {
                    // `None`: a fresh session whose run another gateway
                    // holds; the attach that made it withdraws it.
                    let Some(epoch) = epoch else { continue };
                    if let Some(s) = registry.lose(id, *epoch, now) {
                        let _ = lost.send(s);
                    }
                }
            }
            result
        })
    }
}

fn ready() -> Saved {
    std::future::ready(Ok(())).boxed()
}

/// Sessions the store moved here from gateways that went silent, not yet
/// held by this gateway's registry (see [`Sessions::keep_alive`]).
#[must_use = "taken-over sessions have no lease here until held"]
pub struct TakenOver(Vec<SessionRecord>);

impl TakenOver {
    /// The runs of the sessions taken over.
    pub fn runs(&self) -> impl Iterator<Item = &RunId> {
        self.0.iter().map(|r| &r.run_id)
    }
}
