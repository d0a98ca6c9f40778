//! What tenants hold, in Redis: each run's owner (`{p}:owner:{run}`) and
//! each tenant's usage hash (`{p}:usage:{tenant}`: `runs`, `kvBytes`,
//! `checkpointBytes`), and the end of a run's data, which gives its bytes
//! back.
//!
//! Every script that changes what a tenant holds changes its usage hash in
//! the same script (`kv` and `checkpoints` for writes, `sessions` for runs,
//! this module for a run's whole data), applying
//! [`crate::store::quota::admit`]'s rule with its sizes (key plus value
//! bytes; checkpoint id plus record less its header), so a count and its
//! data never disagree and gateways sharing the Redis share the counts.
//! Owns reading a tenant's usage, deleting a run's data in one script, and
//! the [`QuotaExceeded`] a script's refusal becomes. Must not decide limits
//! or tenants (the caller passes a [`Charge`]), and must not retry (see
//! [`super`]).

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Reply, answer, redis_error};
use crate::ids::RunId;
use crate::redis::keys::Keys;
use crate::store::records::CHECKPOINT_HEADER_LEN;
use crate::store::{Charge, Meter, QuotaExceeded, StoreError, Usage};

/// Deletes a run's KV and checkpoints, giving their bytes back to its
/// owner, and forgets the owner. Arguments are in the script.
const RUN_DATA_DELETE: &str = include_str!("run_data_delete.lua");

/// A quota op, answered on its `reply`.
pub(super) enum Op {
    RunDataDelete { run: RunId, reply: Reply<()> },
    Usage { tenant: String, reply: Reply<Usage> },
}

/// The quota part of the store's task.
pub(super) struct Quotas {
    keys: Keys,
    run_data_delete: Script,
}

impl Quotas {
    pub(super) fn new(keys: Keys) -> Quotas {
        Quotas {
            keys,
            run_data_delete: Script::new(RUN_DATA_DELETE),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::RunDataDelete { run, reply } => {
                answer(reply, self.run_data_delete(conn, &run).await)
            }
            Op::Usage { tenant, reply } => answer(reply, self.usage(conn, &tenant).await),
        }
    }

    async fn run_data_delete(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
    ) -> Result<(), StoreError> {
        let mut invocation = self.run_data_delete.key(self.keys.kv(run));
        invocation
            .key(self.keys.checkpoints(run))
            .key(self.keys.latest_checkpoint(run))
            .key(self.keys.owner(run))
            .arg(self.keys.usage_prefix())
            .arg(CHECKPOINT_HEADER_LEN);
        invocation
            .invoke_async::<u64>(conn)
            .await
            .map(drop)
            .map_err(redis_error)
    }

    async fn usage(&self, conn: &mut ConnectionManager, tenant: &str) -> Result<Usage, StoreError> {
        let names: Vec<&str> = Meter::ALL.iter().map(|m| m.as_str()).collect();
        let values: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(format!("{}{tenant}", self.keys.usage_prefix()))
            .arg(&names)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        let mut usage = Usage::default();
        for (meter, value) in Meter::ALL.into_iter().zip(values) {
            *usage.get_mut(meter) = value.unwrap_or(0);
        }
        Ok(usage)
    }
}

/// A quota refusal a script answered: `used` and `requested` as it found
/// them, against the limit it was given.
pub(super) fn refused(meter: Meter, used: u64, requested: u64, charge: &Charge) -> StoreError {
    StoreError::QuotaExceeded(QuotaExceeded {
        meter,
        used,
        requested,
        limit: charge.limit,
    })
}
