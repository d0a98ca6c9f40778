//! The gateway's side of quotas per tenant (spec/README.md, *Quotas per
//! tenant*): who a socket's writes are charged to, and up to which limit.
//!
//! Owns the policy: the tenant comes from the token ([`Grant::tenant`]),
//! the limits from the config. Must not count anything: the stores count,
//! in the same step as the write ([`crate::store::quota`]); and must not
//! word the refusal: `errors` turns a [`crate::store::QuotaExceeded`] into
//! `QUOTA_EXCEEDED`, like every other domain error.

use crate::auth::Grant;
use crate::config::Limits;
use crate::store::{Charge, Meter};

/// What a write of `meter` from a socket holding `grant` is charged as.
pub(crate) fn charge(grant: &Grant, limits: &Limits, meter: Meter) -> Charge {
    Charge::new(grant.tenant.as_str(), limit(limits, meter))
}

/// The tenant a fresh session of `grant` counts against.
pub(crate) fn session_tenant(grant: &Grant) -> Option<String> {
    Some(grant.tenant.as_str().to_owned())
}

fn limit(limits: &Limits, meter: Meter) -> u64 {
    match meter {
        Meter::Runs => limits.max_runs_per_tenant,
        Meter::KvBytes => limits.max_kv_bytes_per_tenant,
        Meter::CheckpointBytes => limits.max_checkpoint_bytes_per_tenant,
    }
}
