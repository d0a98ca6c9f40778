//! Wall-clock timestamps as the wire writes them: RFC 3339, UTC,
//! millisecond precision.
//!
//! Owns parsing and formatting only. Must not read a monotonic clock or
//! know about deadlines: the gateway's `time::Clock` maps its instants to
//! these.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A point in wall-clock time, written as RFC 3339 with millisecond
/// precision in UTC (`2026-11-25T10:00:00.123Z`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now())
    }

    /// The time as a [`SystemTime`].
    pub fn system_time(self) -> SystemTime {
        self.0
    }

    /// Milliseconds since the Unix epoch (0 for times before it).
    pub fn unix_millis(self) -> u64 {
        self.0
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// The time `ms` milliseconds after the Unix epoch.
    pub fn from_unix_millis(ms: u64) -> Timestamp {
        Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Parses RFC 3339 as the schema's `timestamp` does: `T` between date
    /// and time, no leap seconds, a time a `SystemTime` can hold.
    pub fn parse(s: &str) -> Result<Timestamp, TimestampError> {
        let b = s.as_bytes();
        if b.len() < 20 || !matches!(b[10], b'T' | b't') {
            return Err(TimestampError(
                "expected YYYY-MM-DDTHH:MM:SS with an offset",
            ));
        }
        if &b[17..19] == b"60" {
            return Err(TimestampError("leap seconds are not accepted"));
        }
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|_| TimestampError("not an RFC 3339 timestamp"))?;
        let secs = t.unix_timestamp();
        let st = if secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), t.nanosecond()))
        } else {
            SystemTime::UNIX_EPOCH
                .checked_sub(Duration::from_secs(secs.unsigned_abs()))
                .and_then(|st| st.checked_add(Duration::from_nanos(u64::from(t.nanosecond()))))
        };
        st.map(Timestamp)
            .ok_or(TimestampError("out of the representable range"))
    }
}

/// Why a string is not a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimestampError(&'static str);

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.unix_millis() as i128;
        let t = OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        // Fixed shape: date, time, exactly three fraction digits, `Z`.
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Timestamp::parse(&s).map_err(|e| serde::de::Error::custom(format!("bad timestamp: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn formats_and_parses_rfc3339() {
        let t = Timestamp::from_unix_millis(1_764_064_800_123);
        assert_eq!(t.to_string(), "2025-11-25T10:00:00.123Z");
        assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
        assert!(Timestamp::parse("2025-11-25T11:00:00+01:00").is_ok());
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("2025-11-25 10:00:00Z").is_err());
        assert!(Timestamp::parse("2016-12-31T23:59:60Z").is_err());
        assert!(Timestamp::parse("0001-01-01T00:00:00Z").is_ok());
        assert!(Timestamp::parse("9999-12-31T23:59:59.999Z").is_ok());
    }
}
