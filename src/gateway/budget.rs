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

    /// `bytes` charged before are no longer held. True if this release is
    /// the one that gave a spent budget room again: exactly one release
    /// answers true per time the budget comes back under its max, however
    /// releases and charges from other tasks interleave (judged on the one
    /// atomic update, not on a look before it), so a caller that wakes the
    /// paused reader on true never misses the wake-up.
    #[must_use = "a true answer means the paused reader must be woken"]
    pub fn release(&self, bytes: usize) -> bool {
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            })
            .unwrap_or_default();
        debug_assert!(before >= bytes, "released more than was charged");
        before >= self.max && before.saturating_sub(bytes) < self.max
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
        assert!(b.release(60), "this release gave room back");
        assert!(b.has_room());
        assert!(!b.try_charge(20, 100));
        assert!(b.try_charge(10, 100));
    }

    #[test]
    fn only_the_release_that_crosses_back_under_the_max_says_so() {
        let b = Budget::new(100);
        b.charge(50);
        // Releases that leave a budget with room, or still spent, do not.
        assert!(!b.release(10));
        b.charge(70);
        assert!(!b.has_room());
        assert!(!b.release(5), "still spent at 105");
        // Whoever releases across the line says so, even though the budget
        // had room when that caller began (a charge came in between:
        // judged on the update itself, a look before it would miss this).
        assert!(b.release(20));
        assert!(!b.release(85), "had room already");
    }
}
