//! A run's checkpoints in Redis: a hash of records by id
//! (`{p}:cp:{run}`) and the id of the latest (`{p}:cp-latest:{run}`).
//!
//! Owns saving a checkpoint and making it the latest, charged to the run's
//! owner within its checkpointBytes quota (see `quota`), in one script, and
//! loading the latest or a named one in one script. Must not know KV or
//! sessions, and must not retry (see [`super`]).

use redis::Script;
use redis::aio::ConnectionManager;

use super::quota::refused;
use super::{LUA_MAX_LIMIT, Reply, answer, redis_error};
use crate::ids::RunId;
use crate::redis::keys::Keys;
use crate::store::records::{CHECKPOINT_HEADER_LEN, decode_checkpoint, encode_checkpoint};
use crate::store::{Charge, Checkpoint, Meter, StoreError};

/// Saves a checkpoint as the run's latest unless its owner would pass its
/// checkpointBytes quota (`{used, growth}`; `{}` when saved). Arguments are
/// in the script.
const CHECKPOINT_SAVE: &str = include_str!("checkpoint_save.lua");

/// The latest checkpoint (`ARGV[1]` = `latest`) or a named one
/// (`ARGV[1]` = `named`, `ARGV[2]` = id) in one round trip. Returns nil when
/// the run has no latest checkpoint, `{id}` when the record is missing, and
/// `{id, record}` when found.
const CHECKPOINT_LOAD: &str = include_str!("checkpoint_load.lua");

/// A checkpoint op, answered on its `reply`.
pub(super) enum Op {
    Save {
        run: RunId,
        checkpoint: Checkpoint,
        charge: Charge,
        reply: Reply<()>,
    },
    Load {
        run: RunId,
        id: Option<String>,
        reply: Reply<Option<Checkpoint>>,
    },
}

/// The checkpoint part of the store's task.
pub(super) struct Checkpoints {
    keys: Keys,
    save: Script,
    load: Script,
}

impl Checkpoints {
    pub(super) fn new(keys: Keys) -> Checkpoints {
        Checkpoints {
            keys,
            save: Script::new(CHECKPOINT_SAVE),
            load: Script::new(CHECKPOINT_LOAD),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::Save {
                run,
                checkpoint,
                charge,
                reply,
            } => answer(reply, self.save(conn, &run, &checkpoint, &charge).await),
            Op::Load { run, id, reply } => answer(reply, self.load(conn, &run, id).await),
        }
    }

    async fn save(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        checkpoint: &Checkpoint,
        charge: &Charge,
    ) -> Result<(), StoreError> {
        let mut invocation = self.save.key(self.keys.checkpoints(run));
        invocation
            .key(self.keys.latest_checkpoint(run))
            .key(self.keys.owner(run))
            .arg(&charge.tenant)
            .arg(charge.limit.min(LUA_MAX_LIMIT))
            .arg(self.keys.usage_prefix())
            .arg(CHECKPOINT_HEADER_LEN)
            .arg(&checkpoint.id)
            .arg(encode_checkpoint(checkpoint));
        let answer: Vec<u64> = invocation.invoke_async(conn).await.map_err(redis_error)?;
        match answer.as_slice() {
            [] => Ok(()),
            [used, requested] => Err(refused(Meter::CheckpointBytes, *used, *requested, charge)),
            other => Err(StoreError::Corrupt(format!(
                "Redis: the checkpoint save script answered {other:?}"
            ))),
        }
    }

    async fn load(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        id: Option<String>,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let named = id.is_some();
        let mut invocation = self.load.key(self.keys.checkpoints(run));
        invocation
            .key(self.keys.latest_checkpoint(run))
            .arg(if named { "named" } else { "latest" })
            .arg(id.unwrap_or_default());
        // nil, {id} or {id, record}: see CHECKPOINT_LOAD.
        let found: Option<Vec<Vec<u8>>> =
            invocation.invoke_async(conn).await.map_err(redis_error)?;
        let Some(mut parts) = found else {
            return Ok(None);
        };
        let record = (parts.len() == 2).then(|| parts.pop()).flatten();
        let id = parts
            .pop()
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .unwrap_or_default();
        match record {
            None if named => Ok(None),
            None => Err(StoreError::Corrupt(format!(
                "Redis: run {run}'s latest checkpoint is {id:?}, which is missing"
            ))),
            Some(record) => decode_checkpoint(id.clone(), &record)
                .map(Some)
                .map_err(|why| {
                    StoreError::Corrupt(format!("Redis: checkpoint {id:?} of run {run}: {why}"))
                }),
        }
    }
}
