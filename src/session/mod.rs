//! Sessions, leases and connection epochs (PROTOCOL.md §3).
//!
//! The rules live in [`registry`], a plain state machine that takes the
//! current time as an argument; [`Sessions`] wraps it for sharing between
//! connection tasks and wakes the lease timer when a deadline appears.
//! Must not know about sockets, frames or timers: the gateway drives it.

pub mod registry;

#[cfg(test)]
mod tests;

use parking_lot::Mutex;
use tokio::sync::Notify;

pub use registry::{
    AttachOutcome, AttachParams, ConnId, Counts, Expired, LeasePolicy, RecoverError, SessionError,
    SessionRegistry, SessionState, SessionView, Superseded,
};

/// The registry behind a lock, plus the signal that the earliest deadline
/// may have moved. Critical sections are short map operations; nothing
/// awaits while holding the lock.
pub struct Sessions {
    registry: Mutex<SessionRegistry>,
    deadline_moved: Notify,
}

impl Sessions {
    pub fn new(policy: LeasePolicy) -> Self {
        Sessions {
            registry: Mutex::new(SessionRegistry::new(policy)),
            deadline_moved: Notify::new(),
        }
    }

    /// Runs `f` on the registry. Use for reads and for operations that cannot
    /// add an earlier deadline.
    pub fn with<R>(&self, f: impl FnOnce(&mut SessionRegistry) -> R) -> R {
        f(&mut self.registry.lock())
    }

    /// Like [`Self::with`], then wakes the lease timer: for operations that
    /// add or move deadlines (attach, reconnect, recover).
    pub fn with_new_deadline<R>(&self, f: impl FnOnce(&mut SessionRegistry) -> R) -> R {
        let r = f(&mut self.registry.lock());
        self.deadline_moved.notify_one();
        r
    }

    /// Completes when a deadline may have moved earlier than the timer knows.
    pub async fn deadline_moved(&self) {
        self.deadline_moved.notified().await
    }
}
