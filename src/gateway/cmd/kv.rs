//! `kv.get` and `kv.set`: a run's key-value state.
//!
//! Owns the limits checked before the store sees a request (keys per
//! `kv.get`, key and value sizes of a `kv.set`, each refused whole with
//! `details.path`), what a `kv.get` reply may hold at worst, and the
//! replies. Must not store anything itself nor count a run's keys: the
//! store applies a write all or none and refuses one key too many.

use serde_json::json;

use super::access::session_for;
use super::{ConnCtx, Reply, SMALL_REPLY_BYTES, after_store};
use crate::config::Limits;
use crate::protocol::commands::{Accepted, GetKVCommand, GetKVResponse, SetKVCommand};
use crate::protocol::{CommandError, CommandKind, ErrorCode, encode_reply};

/// `kv.get`.
pub(crate) fn get(ctx: &ConnCtx, id: &str, req: GetKVCommand) -> Result<Reply, CommandError> {
    session_for(ctx, CommandKind::KvGet, &req.session_id, &req.run_id)?;
    // Before the store sees it: one request must not hold the store thread
    // for long, whatever else is waiting there.
    let max_keys = ctx.shared.config.limits.max_kv_get_keys;
    if req.keys.len() > max_keys {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "kv.get names {} keys; the limit is {max_keys}: ask in several requests",
                req.keys.len()
            ),
        )
        .with_details(json!({ "path": "/payload/keys", "maxKvGetKeys": max_keys })));
    }
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
    let pending = ctx
        .shared
        .store
        .kv_set_within(&req.run_id, req.kv, limits.max_kv_keys_per_run);
    Ok(after_store(id, pending, |id, ()| {
        Ok(encode_reply(id, &Accepted::YES))
    }))
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
