//! A token bucket: how many commands one socket may send, sustained and in
//! a burst.
//!
//! Owns the arithmetic only: [`TokenBucket::take`] is told the time, so it
//! is tested with plain instants and no sleeping. A bucket holds up to
//! `burst` tokens, gains `rate` per second, and each command takes one. It
//! is kept in the GCRA form (one "theoretical arrival time" instead of a
//! fractional token count), which is the same bucket in integer time: no
//! floating-point drift, so the sustained rate is exactly the configured
//! one. The `governor` crate does this and much more (keyed limiters,
//! jitter, clocks); one bucket per socket, owned by that socket's task,
//! needs none of it. Must not know what a command is or what happens to
//! one that is refused: `dispatch` answers.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Time one token takes to come back: 1 s / rate.
    interval: Duration,
    /// How far ahead of now `tat` may run: (burst - 1) intervals.
    tolerance: Duration,
    /// When the bucket would be full again if nothing more were taken;
    /// never earlier than the last `now` seen.
    tat: Instant,
}

impl TokenBucket {
    /// A full bucket: a new socket may send `burst` commands at once.
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> TokenBucket {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        TokenBucket {
            interval,
            tolerance: interval * (burst.max(1) - 1),
            tat: now,
        }
    }

    /// Takes one token, or says how long until one is there (and takes
    /// nothing).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let tat = self.tat.max(now);
        let ahead = tat.duration_since(now);
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        self.tat = tat + self.interval;
        Ok(())
    }

    /// Whether the bucket has refilled completely (as a new one starts).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_the_burst_then_refuses() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // A refusal takes nothing: the wait stays the same.
        assert_eq!(b.take(t0).unwrap_err(), Duration::from_millis(100));
    }

    #[test]
    fn tokens_come_back_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0 + Duration::from_millis(50)).is_err());
        assert!(b.take(t0 + Duration::from_millis(150)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(150)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later).is_ok());
        assert!(b.take(later).is_ok());
        assert!(b.take(later).is_err());
    }

    #[test]
    fn sustained_rate_is_the_configured_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1, t0);
        let mut allowed = 0;
        // One attempt every millisecond for ten seconds.
        for ms in 0..10_000 {
            if b.take(t0 + Duration::from_millis(ms)).is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_it_gives_is_enough_on_the_paused_clock() {
        let mut b = TokenBucket::new(3, 1, Instant::now());
        assert!(b.take(Instant::now()).is_ok());
        let wait = b.take(Instant::now()).unwrap_err();
        tokio::time::advance(wait - Duration::from_nanos(1)).await;
        assert!(b.take(Instant::now()).is_err());
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(b.take(Instant::now()).is_ok());
    }
}
