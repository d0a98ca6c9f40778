//! `run.cancel` (on `/v1/stream`) and the cancel `POST
//! /v1/runs/{runId}/cancel` shares with it: a viewer asks a run's runtime
//! to stop.
//!
//! Owns who may cancel ([`check_canceller`]: the `run.cancel` capability
//! and the run's cover) and what a cancel does ([`cancel_run`]): an ended
//! run is only reported; a live session keeps the cancel (saved before the
//! answer) and its socket, if attached, is pushed `run.cancelRequested`;
//! a session another gateway holds is told there, through the store. Must
//! not stop anything itself: the runtime decides what a cancel means, and
//! a detached one hears of it again at its next attach (`attach`).

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::json;

use super::{ConnCtx, Reply};
use crate::auth::Grant;
use crate::gateway::errors::{forbidden_run, store_error};
use crate::gateway::push;
use crate::gateway::state::Shared;
use crate::ids::{Capability, RunId, SessionId};
use crate::protocol::commands::{RunCancelCommand, RunCancelResponse};
use crate::protocol::{CommandError, ErrorCode, encode_reply};
use crate::session::CancelTarget;
use crate::store::PendingCancel;
use crate::time::Timestamp;

/// `run.cancel`.
pub(crate) fn cancel(
    ctx: &ConnCtx,
    id: &str,
    req: RunCancelCommand,
) -> Result<Reply, CommandError> {
    check_canceller(&ctx.grant, &req.run_id)?;
    let pending = cancel_run(ctx.shared.clone(), req.run_id, req.reason.map(|r| r.0));
    let id = id.to_owned();
    Ok(Reply::Later(
        async move { pending.await.map(|r| encode_reply(&id, &r)) }.boxed(),
    ))
}

/// Whether `grant` may cancel `run`: the capability and the run's cover.
pub(crate) fn check_canceller(grant: &Grant, run: &RunId) -> Result<(), CommandError> {
    if !grant.caps.contains(Capability::RunCancel) {
        return Err(CommandError::forbidden(
            "run.cancel needs a viewer token with the run.cancel capability",
        )
        .with_details(json!({ "capability": Capability::RunCancel })));
    }
    if !grant.runs.covers(run) {
        return Err(forbidden_run(run));
    }
    Ok(())
}

/// The part of a cancel both `run.cancel` and `POST /v1/runs/{runId}/cancel`
/// share, once the caller is allowed: an ended run is only reported; a
/// live session keeps the cancel (saved) and its socket, if attached, is
/// pushed `run.cancelRequested`; one another gateway holds is told there.
pub(crate) fn cancel_run(
    shared: Arc<Shared>,
    run: RunId,
    reason: Option<String>,
) -> BoxFuture<'static, Result<RunCancelResponse, CommandError>> {
    let loaded = shared
        .sessions
        .shared()
        .then(|| shared.sessions.load_from_shared(&run));
    async move {
        if let Some(loaded) = loaded {
            loaded.await.map_err(store_error)?;
        }
        if shared.streams.ended(&run).is_some() {
            return Ok(RunCancelResponse {
                delivered: false,
                ended: true,
            });
        }
        let cancel = PendingCancel {
            reason,
            requested_at_unix_ms: Timestamp::now().unix_millis(),
        };
        let (target, saved) = shared
            .sessions
            .with_new_deadline(|r| r.request_cancel(&run, cancel.clone()));
        let delivered = match target {
            CancelTarget::Held { conn, session_id } => {
                saved.await.map_err(store_error)?;
                match conn {
                    Some(conn) => shared
                        .conns
                        .push_now(conn, push::run_cancel_requested(&session_id, &run, &cancel)),
                    None => false,
                }
            }
            CancelTarget::Elsewhere { session_id } => {
                announce_cancel(&shared, &session_id, &run, &cancel).await?
            }
            CancelTarget::NoSession => {
                if shared.streams.summary(&run).is_none() {
                    return Err(CommandError::new(
                        ErrorCode::NotFound,
                        format!("the gateway knows no run {run}"),
                    )
                    .with_details(json!({ "runId": run })));
                }
                false
            }
        };
        Ok(RunCancelResponse {
            delivered,
            ended: false,
        })
    }
    .boxed()
}

/// A cancel for a session another gateway holds: announced to the gateways
/// sharing the store, so the one holding it keeps and pushes it. Answers
/// whether that session was attached when last saved.
async fn announce_cancel(
    shared: &Shared,
    session_id: &SessionId,
    run: &RunId,
    cancel: &PendingCancel,
) -> Result<bool, CommandError> {
    let Some(store) = shared.store.shared_sessions() else {
        return Ok(false);
    };
    let attached = store.session_of_run(run);
    store
        .announce_cancel(session_id, cancel)
        .await
        .map_err(store_error)?;
    let record = attached.await.map_err(store_error)?;
    Ok(record.is_some_and(|(r, _)| r.attached && !r.expired && r.session_id == *session_id))
}
