//! Reconnect delays: exponential, capped, with full jitter; and how long
//! to wait after a `gateway.draining`.
//!
//! Full jitter (a uniform delay between zero and the exponential bound)
//! spreads thousands of clients that lost the same gateway at the same
//! moment, so they do not all come back in one wave.

use std::time::Duration;

/// The wait before reconnecting after a `gateway.draining` push: the
/// `reconnectAfterMs` it asked for, or a second if its payload did not read
/// (that the gateway is going away is in the push's type).
pub(crate) fn after_draining(reconnect_after_ms: Option<u64>) -> Duration {
    Duration::from_millis(reconnect_after_ms.unwrap_or(1000))
}

/// Delay policy between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Bound of the first retry's delay.
    pub initial: Duration,
    /// Largest bound, however many attempts failed.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The bound for attempt `n` (0-based): `initial × 2ⁿ`, at most `max`.
    pub fn bound(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, bound(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let bound = self.bound(attempt).as_millis() as u64;
        Duration::from_millis(rand::random_range(0..=bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_jitter_stays_within_the_bound() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.bound(0), Duration::from_millis(100));
        assert_eq!(b.bound(3), Duration::from_millis(800));
        assert_eq!(b.bound(5), Duration::from_secs(2));
        assert_eq!(b.bound(200), Duration::from_secs(2));
        for attempt in 0..10 {
            for _ in 0..50 {
                assert!(b.delay(attempt) <= b.bound(attempt));
            }
        }
    }
}
