//! A run's checkpoints in Redis: a hash of records by id
//! (`{p}:cp:{run}`) and the id of the latest (`{p}:cp-latest:{run}`).
//!
//! Owns saving a checkpoint and making it the latest in one `MULTI`/`EXEC`,
//! and loading the latest or a named one in one script. Must not know KV
//! or sessions, and must not retry (see [`super`]).

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Reply, answer, redis_error};
use crate::ids::RunId;
use crate::redis::keys::Keys;
use crate::store::records::{decode_checkpoint, encode_checkpoint};
use crate::store::{Checkpoint, StoreError};

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
    load: Script,
}

impl Checkpoints {
    pub(super) fn new(keys: Keys) -> Checkpoints {
        Checkpoints {
            keys,
            load: Script::new(CHECKPOINT_LOAD),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::Save {
                run,
                checkpoint,
                reply,
            } => answer(reply, self.save(conn, &run, &checkpoint).await),
            Op::Load { run, id, reply } => answer(reply, self.load(conn, &run, id).await),
        }
    }

    async fn save(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(self.keys.checkpoints(run))
            .arg(&checkpoint.id)
            .arg(encode_checkpoint(checkpoint))
            .ignore()
            .cmd("SET")
            .arg(self.keys.latest_checkpoint(run))
            .arg(&checkpoint.id)
            .ignore()
            .query_async::<()>(conn)
            .await
            .map_err(redis_error)
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
