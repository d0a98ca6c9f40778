//! Monotonic instants inside the gateway, wall-clock timestamps on the wire.
//!
//! The domain reasons in [`tokio::time::Instant`] (monotonic, and pausable
//! in tests); the wire speaks RFC 3339 UTC [`Timestamp`]s (defined in the
//! protocol crate). [`Clock`] converts between the two by remembering one
//! (instant, wall time) pair taken at start, so a deadline reads the same
//! however often it is formatted. Must not sleep or schedule anything.

use std::time::SystemTime;

use tokio::time::Instant;

pub use rungate_protocol::time::{Timestamp, TimestampError};

/// Converts monotonic instants to wall-clock timestamps.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
    origin_wall: SystemTime,
}

impl Clock {
    /// Anchors the clock at this moment.
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
            origin_wall: SystemTime::now(),
        }
    }

    /// A clock that reads `wall` at `at`: for tests whose paused tokio time
    /// has moved on while the system clock has not.
    #[cfg(test)]
    pub fn anchored(at: Instant, wall: Timestamp) -> Clock {
        Clock {
            origin: at,
            origin_wall: wall.system_time(),
        }
    }

    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// The wall-clock time of `at`.
    pub fn wall(&self, at: Instant) -> Timestamp {
        if at >= self.origin {
            Timestamp::from(self.origin_wall + (at - self.origin))
        } else {
            Timestamp::from(self.origin_wall - (self.origin - at))
        }
    }

    /// The instant of wall-clock time `t` (clamped to the clock's origin
    /// for times before it).
    pub fn instant(&self, t: Timestamp) -> Instant {
        match t.system_time().duration_since(self.origin_wall) {
            Ok(d) => self.origin + d,
            Err(_) => self.origin,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clock_maps_instants_to_wall_time() {
        let clock = Clock::start();
        let now = clock.now();
        let later = now + Duration::from_secs(30);
        let diff = clock.wall(later).unix_millis() - clock.wall(now).unix_millis();
        assert_eq!(diff, 30_000);
    }
}
