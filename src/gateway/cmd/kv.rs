//! `kv.get`, `kv.set` and `kv.delete`: a run's key-value state.
//!
//! Owns the limits checked before the store sees a request (keys per
//! `kv.get` or `kv.delete`, key and value sizes of a `kv.set`, each refused
//! whole with `details.path`), who a `kv.set` is charged to (through
//! `quota`), what a `kv.get` reply may hold at worst, and the replies.
//! Must not store anything itself nor count a run's keys or its tenant's
//! bytes: the store applies a write all or none and refuses one key or one
//! byte too many.

use serde_json::json;

use super::access::session_for;
use super::{ConnCtx, Reply, SMALL_REPLY_BYTES, after_store};
use crate::config::Limits;
use crate::gateway::quota;
use crate::protocol::commands::{
    Accepted, DeleteKVCommand, DeleteKVResponse, GetKVCommand, GetKVResponse, SetKVCommand,
};
use crate::protocol::{CommandError, CommandKind, ErrorCode, encode_reply};
use crate::store::Meter;

/// `kv.get`.
pub(crate) fn get(ctx: &ConnCtx, id: &str, req: GetKVCommand) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::KvGet, &req.session_id, &req.run_id)?;
    within_key_count(&ctx.shared.config.limits, "kv.get", "ask", req.keys.len())?;
    let max_bytes = ctx.shared.config.limits.max_reply_bytes;
    let pending = ctx
        .shared
        .store
        .kv_get_within(&req.run_id, req.keys, max_bytes);
    Ok(after_store(id, pending, |id, kv| {
        Ok(encode_reply(id, &GetKVResponse { kv }))
    }))
}

/// The most bytes a `kv.get` of `req`'s keys can answer (before the reply
/// limit, which the store enforces too).
pub(crate) fn worst_get_reply_bytes(limits: &Limits, req: &GetKVCommand) -> usize {
    req.keys
        .len()
        .saturating_mul(limits.max_kv_key_bytes + limits.max_kv_value_bytes + 16)
        .saturating_add(SMALL_REPLY_BYTES)
}

/// `kv.set`.
pub(crate) fn set(ctx: &ConnCtx, id: &str, req: SetKVCommand) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::KvSet, &req.session_id, &req.run_id)?;
    let limits = &ctx.shared.config.limits;
    // Checked here, before the store sees anything, so a refused write
    // stores none of its pairs. An over-long key is not echoed back.
    for (key, value) in &req.kv {
        if key.len() > limits.max_kv_key_bytes {
            return Err(CommandError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a key is {} bytes; the limit is {}",
                    key.len(),
                    limits.max_kv_key_bytes
                ),
            )
            .with_details(
                json!({ "path": "/payload/kv", "maxKvKeyBytes": limits.max_kv_key_bytes }),
            ));
        }
        if value.len() > limits.max_kv_value_bytes {
            return Err(CommandError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a value is {} bytes; the limit is {}",
                    value.len(),
                    limits.max_kv_value_bytes
                ),
            )
            .with_details(json!({
                "path": format!("/payload/kv/{}", json_pointer_token(key)),
                "maxKvValueBytes": limits.max_kv_value_bytes,
            })));
        }
    }
    let charge = quota::charge(&ctx.grant, limits, Meter::KvBytes);
    let pending =
        ctx.shared
            .store
            .kv_set_charged(&req.run_id, req.kv, limits.max_kv_keys_per_run, charge);
    Ok(after_store(id, pending, |id, ()| {
        Ok(encode_reply(id, &Accepted::YES))
    }))
}

/// `kv.delete`. What it frees goes back to the run's owner (the store
/// knows who that is), whoever deletes.
pub(crate) fn delete(ctx: &ConnCtx, id: &str, req: DeleteKVCommand) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::KvDelete, &req.session_id, &req.run_id)?;
    within_key_count(
        &ctx.shared.config.limits,
        "kv.delete",
        "delete",
        req.keys.len(),
    )?;
    let pending = ctx.shared.store.kv_delete(&req.run_id, req.keys);
    Ok(after_store(id, pending, |id, deleted| {
        Ok(encode_reply(id, &DeleteKVResponse { deleted }))
    }))
}

/// `PAYLOAD_TOO_LARGE` for a `command` naming more than `max_kv_get_keys`
/// keys, checked before the store sees it: one request must not hold the
/// store thread for long, whatever else is waiting there. `verb` is what
/// the client should do in several requests instead.
fn within_key_count(
    limits: &Limits,
    command: &str,
    verb: &str,
    named: usize,
) -> Result<(), CommandError> {
    let max_keys = limits.max_kv_get_keys;
    if named <= max_keys {
        return Ok(());
    }
    Err(CommandError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "{command} names {named} keys; the limit is {max_keys}: {verb} in several requests"
        ),
    )
    .with_details(json!({ "path": "/payload/keys", "maxKvGetKeys": max_keys })))
}

/// `key` as one reference token of a JSON pointer (RFC 6901).
fn json_pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_escape_tilde_then_slash() {
        assert_eq!(json_pointer_token("a/b~c"), "a~1b~0c");
        // `~1` in a key is a tilde and a one, not a slash.
        assert_eq!(json_pointer_token("~1"), "~01");
    }
}
