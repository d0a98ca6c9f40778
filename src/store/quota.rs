//! What a tenant's stored data is counted in, and the one rule every
//! engine applies when it counts (spec/README.md, *Quotas per tenant*).
//!
//! Owns the [`Meter`]s, how big a stored thing is ([`kv_entry_bytes`],
//! [`checkpoint_bytes`]), [`Charge`] (who pays for a write, and the most
//! they may hold), the rule ([`admit`]) and its refusal
//! ([`QuotaExceeded`]). The engines keep the counters beside the data they
//! count and apply [`admit`] inside the write's own lock or transaction, so
//! a count and its data never disagree; the Redis engine's Lua scripts
//! apply the same rule with the same sizes (see [`super::redis`]).
//! Must not know tokens, limits' sources or protocol codes: the gateway
//! names the tenant, takes the limits from its config and turns a
//! [`QuotaExceeded`] into `QUOTA_EXCEEDED`.

use std::fmt;

/// One thing a tenant's usage is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    /// Session records (live sessions and tombstones).
    Runs,
    /// Key plus value bytes of the KV of the runs it owns.
    KvBytes,
    /// Id plus data bytes of the checkpoints of the runs it owns.
    CheckpointBytes,
}

impl Meter {
    pub const ALL: [Meter; 3] = [Meter::Runs, Meter::KvBytes, Meter::CheckpointBytes];

    /// The name in `details.quota`, also the counter's name in the stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Runs => "runs",
            Meter::KvBytes => "kvBytes",
            Meter::CheckpointBytes => "checkpointBytes",
        }
    }
}

impl fmt::Display for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who pays for a write (becoming the run's owner if it has none yet), and
/// the most that tenant may hold of the meter written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub tenant: String,
    pub limit: u64,
}

impl Charge {
    pub fn new(tenant: impl Into<String>, limit: u64) -> Charge {
        Charge {
            tenant: tenant.into(),
            limit,
        }
    }

    /// No limit, counted for the empty tenant, which no token has: for
    /// callers that bound nothing (tests, tools).
    pub fn unlimited() -> Charge {
        Charge::new("", u64::MAX)
    }
}

/// A write refused because it would take a tenant past a quota; nothing of
/// it was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the tenant's {meter} quota is {limit}; it holds {used} and this would add {requested}; nothing was stored"
)]
pub struct QuotaExceeded {
    pub meter: Meter,
    /// What the tenant holds now.
    pub used: u64,
    /// What the write would have added (its net growth).
    pub requested: u64,
    pub limit: u64,
}

/// The rule: `used` grown by `delta` (negative: shrunk). Growth that would
/// pass `limit` is refused; a change that does not grow is always allowed,
/// even above the limit (one that was lowered), and usage never goes
/// below zero (data stored before counting began is not in it).
pub fn admit(meter: Meter, used: u64, delta: i64, limit: u64) -> Result<u64, QuotaExceeded> {
    if delta <= 0 {
        return Ok(used.saturating_sub(delta.unsigned_abs()));
    }
    let requested = delta.unsigned_abs();
    match used.checked_add(requested) {
        Some(after) if after <= limit => Ok(after),
        _ => Err(QuotaExceeded {
            meter,
            used,
            requested,
            limit,
        }),
    }
}

/// What one KV entry counts: its key and value bytes (UTF-8).
pub fn kv_entry_bytes(key: &str, value: &str) -> u64 {
    (key.len() + value.len()) as u64
}

/// What one checkpoint counts: its id and its data JSON bytes, as sent.
pub fn checkpoint_bytes(id: &str, data_len: usize) -> u64 {
    (id.len() + data_len) as u64
}

/// The signed difference `after - before`, for [`admit`].
pub fn growth(before: u64, after: u64) -> i64 {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if after >= before {
        clamp(after - before)
    } else {
        -clamp(before - after)
    }
}

/// What a tenant holds, per meter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub runs: u64,
    pub kv_bytes: u64,
    pub checkpoint_bytes: u64,
}

impl Usage {
    pub fn get(&self, meter: Meter) -> u64 {
        match meter {
            Meter::Runs => self.runs,
            Meter::KvBytes => self.kv_bytes,
            Meter::CheckpointBytes => self.checkpoint_bytes,
        }
    }

    pub fn get_mut(&mut self, meter: Meter) -> &mut u64 {
        match meter {
            Meter::Runs => &mut self.runs,
            Meter::KvBytes => &mut self.kv_bytes,
            Meter::CheckpointBytes => &mut self.checkpoint_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_limit_is_refused_and_shrinking_never_is() {
        let m = Meter::KvBytes;
        assert_eq!(admit(m, 0, 10, 10), Ok(10), "exactly the limit fits");
        assert_eq!(
            admit(m, 4, 7, 10),
            Err(QuotaExceeded {
                meter: m,
                used: 4,
                requested: 7,
                limit: 10
            })
        );
        // Above a lowered limit: no growth is still fine, growth is not.
        assert_eq!(admit(m, 50, 0, 10), Ok(50));
        assert_eq!(admit(m, 50, -5, 10), Ok(45));
        assert!(admit(m, 50, 1, 10).is_err());
        // Never below zero, never wrapping.
        assert_eq!(admit(m, 3, -5, 10), Ok(0));
        assert!(admit(m, u64::MAX, 1, u64::MAX).is_err());
        assert_eq!(admit(m, 0, i64::MIN, 10), Ok(0));
    }

    #[test]
    fn sizes_and_growth() {
        assert_eq!(kv_entry_bytes("ab", "é"), 4);
        assert_eq!(checkpoint_bytes("cp-1", 10), 14);
        assert_eq!(growth(3, 10), 7);
        assert_eq!(growth(10, 3), -7);
        assert_eq!(growth(0, u64::MAX), i64::MAX);
        let names: Vec<&str> = Meter::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(names, ["runs", "kvBytes", "checkpointBytes"]);
    }
}
