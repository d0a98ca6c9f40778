//! One socket's byte budget: what it may have in flight and queued.
//!
//! Owns the count of bytes a socket holds in the gateway's memory: replies
//! being built (charged up front, at their worst-case size, when the request
//! goes to the store), frames waiting in its outbound queue, and frames its
//! writer has not yet handed to the socket. The reader stops reading while
//! the count is at or over the budget, so a peer that does not read its
//! replies pauses itself; its writer closes it after the write timeout.
//! Must not know what the bytes are (frames, replies, pushes) nor close
//! anything itself: callers decide what an exhausted budget means.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes held for one socket, against its budget.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Counts `bytes` as held. Never refuses: whoever holds the bytes
    /// already has them; [`Budget::has_room`] is what stops more coming.
    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Counts `bytes` as held if that keeps the total within `limit`
    /// (pushes from other tasks, which must never wait on this socket).
    pub fn try_charge(&self, bytes: usize, limit: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.saturating_add(bytes);
                (after <= limit).then_some(after)
            })
            .is_ok()
    }

    /// `bytes` charged before are no longer held.
    pub fn release(&self, bytes: usize) {
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            })
            .unwrap_or_default();
        debug_assert!(before >= bytes, "released more than was charged");
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether the socket may take on more work.
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::Acquire) < self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_comes_back_once_enough_is_released() {
        let b = Budget::new(100);
        b.charge(150);
        assert!(!b.has_room());
        b.release(60);
        assert!(b.has_room());
        assert!(!b.try_charge(20, 100));
        assert!(b.try_charge(10, 100));
    }
}
