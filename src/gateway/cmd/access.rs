//! The checks most commands share before they touch anything: the session
//! a command names, on this socket, with the capability it needs, for a
//! run that has not ended.
//!
//! Owns the order of those checks (an ended run is said first, whatever
//! the session id) and the `FORBIDDEN` for a capability not asked for at
//! attach. Must not apply anything: it answers a [`SessionView`] or a
//! refusal, and the handler goes on.

use serde_json::json;

use super::ConnCtx;
use crate::gateway::errors::{run_ended, session_error};
use crate::ids::{RunId, SessionId};
use crate::protocol::{CommandError, CommandKind};
use crate::session::SessionView;

/// `RUN_ENDED` if `run` ended (or is ending) and the token covers it.
pub(crate) fn refuse_ended(ctx: &ConnCtx, run: &RunId) -> Result<(), CommandError> {
    match ctx.shared.streams.ended(run) {
        Some(end) if ctx.grant.runs.covers(run) => Err(run_ended(run, end.outcome)),
        _ => Ok(()),
    }
}

/// The session a command names, checked against this socket, its epoch and
/// the capability the command needs.
pub(crate) fn session_for(
    ctx: &ConnCtx,
    kind: CommandKind,
    session_id: &SessionId,
    run_id: &RunId,
) -> Result<SessionView, CommandError> {
    // An ended run's session is gone for good: say why, whatever the
    // session id (the first finish ended it on this very socket).
    refuse_ended(ctx, run_id)?;
    let view = ctx
        .shared
        .sessions
        .with(|r| r.authorize(ctx.id, session_id, run_id))
        .map_err(session_error)?;
    if let Some(cap) = kind.required_capability()
        && !view.capabilities.contains(cap)
    {
        return Err(CommandError::forbidden(format!(
            "{} needs the {cap} capability, which was not asked for at attach",
            kind.as_str()
        ))
        .with_details(json!({ "capability": cap })));
    }
    Ok(view)
}
