//! `checkpoint.save` and `checkpoint.load`: a run's checkpoints.
//!
//! Owns the size limit checked before the store sees a checkpoint, who a
//! save is charged to (through `quota`), the id the gateway gives one saved
//! without an id (time then randomness, so ids sort by age), and the
//! replies (`NOT_FOUND` for no such checkpoint). Must not keep checkpoints,
//! decide which is latest or count a tenant's bytes: the store does.

use serde_json::json;

use super::access::session_for;
use super::{ConnCtx, Reply, after_store};
use crate::gateway::quota;
use crate::protocol::commands::{
    CheckpointLoadCommand, CheckpointLoadResponse, CheckpointSaveCommand, CheckpointSaveResponse,
};
use crate::protocol::{CommandError, CommandKind, ErrorCode, encode_reply};
use crate::store::{Checkpoint, Meter};
use crate::time::Timestamp;

/// `checkpoint.save`.
pub(crate) fn save(
    ctx: &ConnCtx,
    id: &str,
    req: CheckpointSaveCommand,
) -> Result<Reply, CommandError> {
    session_for(
        ctx,
        CommandKind::CheckpointSave,
        &req.session_id,
        &req.run_id,
    )?;
    let max = ctx.shared.config.limits.max_checkpoint_bytes;
    let size = req.data.get().len();
    if size > max {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!("the checkpoint data is {size} bytes; the limit is {max}"),
        )
        .with_details(json!({ "path": "/payload/data", "maxCheckpointBytes": max })));
    }
    let saved_at = Timestamp::now();
    let checkpoint_id = req
        .checkpoint_id
        .map(|c| c.as_str().to_owned())
        .unwrap_or_else(|| new_checkpoint_id(saved_at));
    let checkpoint = Checkpoint {
        id: checkpoint_id.clone(),
        saved_at,
        data: req.data,
    };
    let limits = &ctx.shared.config.limits;
    let charge = quota::charge(&ctx.grant, limits, Meter::CheckpointBytes);
    let pending = ctx
        .shared
        .store
        .checkpoint_save_charged(&req.run_id, checkpoint, charge);
    Ok(after_store(id, pending, move |id, ()| {
        Ok(encode_reply(
            id,
            &CheckpointSaveResponse {
                checkpoint_id,
                saved_at,
            },
        ))
    }))
}

/// `checkpoint.load`.
pub(crate) fn load(
    ctx: &ConnCtx,
    id: &str,
    req: CheckpointLoadCommand,
) -> Result<Reply, CommandError> {
    session_for(
        ctx,
        CommandKind::CheckpointLoad,
        &req.session_id,
        &req.run_id,
    )?;
    let named = req.checkpoint_id.map(|c| c.as_str().to_owned());
    let pending = ctx.shared.store.checkpoint_load(&req.run_id, named.clone());
    Ok(after_store(id, pending, move |id, found| match found {
        Some(c) => Ok(encode_reply(
            id,
            &CheckpointLoadResponse {
                checkpoint_id: c.id,
                saved_at: c.saved_at,
                data: c.data,
            },
        )),
        None => Err(CommandError::new(
            ErrorCode::NotFound,
            match named {
                Some(n) => format!("no checkpoint {n:?} for this run"),
                None => "this run has no checkpoint yet".to_owned(),
            },
        )),
    }))
}

/// A new checkpoint id: millisecond time then randomness, so ids sort by age.
fn new_checkpoint_id(at: Timestamp) -> String {
    format!("{:013}-{:08x}", at.unix_millis(), rand::random::<u32>())
}
