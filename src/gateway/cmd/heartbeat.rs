//! `runtime.heartbeat`: a session's lease renewed.
//!
//! Owns the reply (when the next heartbeat is due). Must not decide when
//! a lease runs out (the registry keeps the rule, the lease timer the
//! clock), nor save the renewal (upkeep saves renewals in batches).

use tokio::time::Instant;

use super::access::refuse_ended;
use super::{ConnCtx, Reply};
use crate::gateway::errors::session_error;
use crate::protocol::CommandError;
use crate::protocol::commands::{HeartbeatCommand, HeartbeatResponse};

/// `runtime.heartbeat`.
pub(crate) fn heartbeat(
    ctx: &ConnCtx,
    id: &str,
    req: HeartbeatCommand,
) -> Result<Reply, CommandError> {
    refuse_ended(ctx, &req.run_id)?;
    let now = Instant::now();
    ctx.shared
        .sessions
        .with(|r| {
            r.heartbeat(
                ctx.id,
                &req.session_id,
                &req.run_id,
                req.runtime_instance_id.as_ref(),
                now,
            )
        })
        .map_err(session_error)?;
    let response = HeartbeatResponse {
        accepted: true,
        next_heartbeat_due_at: ctx
            .shared
            .clock
            .wall(now + ctx.shared.config.heartbeat_interval),
    };
    Ok(Reply::now(id, &response))
}
