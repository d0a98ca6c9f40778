//! `stream.resume` and `stream.cancel`: following a run's output stream on
//! this socket, and stopping.
//!
//! Owns who may read a run's stream on which endpoint ([`check_reader`]: a
//! session of this socket with `stream.resume` on `/v1/runtime`, a viewer
//! token covering the run and no `sessionId` on `/v1/stream`), the
//! subscriptions-per-socket limit, and the order promise: a resume's
//! subscription is added to the socket's [`Following`] while the request
//! is handled, so its reply is queued before the first `stream.events`;
//! a cancel removes it at once, so nothing of that run follows its reply.
//! Must not deliver events (`follow` does, inside the connection task) nor
//! keep offsets or epochs (the stream engine does).
//!
//! [`Following`]: crate::gateway::follow::Following

use serde_json::json;
use tokio::time::Instant;

use super::access::session_for;
use super::{ConnCtx, Endpoint, Reply};
use crate::gateway::errors::forbidden_run;
use crate::ids::{RunId, SessionId};
use crate::protocol::commands::{Accepted, StreamCancelCommand, StreamResumeCommand};
use crate::protocol::{CommandError, CommandKind, ErrorCode};

/// `stream.resume`.
pub(crate) fn resume(
    ctx: &mut ConnCtx,
    id: &str,
    req: StreamResumeCommand,
) -> Result<Reply, CommandError> {
    check_reader(
        ctx,
        CommandKind::StreamResume,
        req.session_id.as_ref(),
        &req.run_id,
    )?;
    let max = ctx.shared.config.limits.max_subscriptions_per_socket;
    if !ctx.following.follows(&req.run_id) && ctx.following.len() >= max {
        return Err(CommandError::new(
            ErrorCode::RateLimited,
            format!("this socket already follows {max} runs; stream.cancel one first"),
        )
        .retryable(false)
        .with_details(json!({ "maxSubscriptionsPerSocket": max })));
    }
    let (info, subscription) = ctx.shared.streams.resume(
        &req.run_id,
        req.from_offset,
        req.stream_epoch.as_ref().map(|e| e.as_str()),
        Instant::now(),
    );
    let reply = Reply::now(id, &info);
    // Followed before the reply is queued; the connection sends the reply
    // before it next polls subscriptions, so the reply comes first.
    ctx.following
        .insert(req.run_id, info.stream_epoch, subscription);
    Ok(reply)
}

/// `stream.cancel`: accepted whether or not the run was followed.
pub(crate) fn cancel(
    ctx: &mut ConnCtx,
    id: &str,
    req: StreamCancelCommand,
) -> Result<Reply, CommandError> {
    check_reader(
        ctx,
        CommandKind::StreamCancel,
        req.session_id.as_ref(),
        &req.run_id,
    )?;
    ctx.following.remove(&req.run_id);
    Ok(Reply::now(id, &Accepted::YES))
}

/// Who may read `run`'s stream on this socket: on `/v1/runtime` a session
/// of this socket for that run with `stream.resume`; on `/v1/stream` a
/// viewer token covering it (and no `sessionId`).
fn check_reader(
    ctx: &ConnCtx,
    kind: CommandKind,
    session_id: Option<&SessionId>,
    run_id: &RunId,
) -> Result<(), CommandError> {
    match (ctx.endpoint, session_id) {
        (Endpoint::Runtime, Some(sid)) => session_for(ctx, kind, sid, run_id).map(drop),
        (Endpoint::Runtime, None) => Err(CommandError::invalid_payload(
            "/payload/sessionId",
            "sessionId is required on /v1/runtime",
        )),
        (Endpoint::Stream, Some(_)) => Err(CommandError::invalid_payload(
            "/payload/sessionId",
            "sessionId is not accepted on /v1/stream (viewers have no sessions)",
        )),
        (Endpoint::Stream, None) if ctx.grant.runs.covers(run_id) => Ok(()),
        (Endpoint::Stream, None) => Err(forbidden_run(run_id)),
    }
}
