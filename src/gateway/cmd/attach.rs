//! `runtime.attach` (a fresh session or a reconnect to one) and
//! `runtime.recoverConnections` (a main session's sub-runs moved to this
//! socket): the commands that bind sessions to a socket.
//!
//! Owns what is checked before the registry is asked (draining, protocol
//! version, the token's runs and capabilities, an ended run), learning the
//! sessions other gateways hold first when the store is shared, telling a
//! socket that lost a session (`session.superseded`), answering only once
//! the move is saved, and pushing the cancels still pending on what was
//! bound. Must not decide who gets a session (the registry does), expire
//! one (the lease timer does) nor count a tenant's runs (the store does,
//! when a fresh session is saved: the attach names the tenant).

use std::sync::Arc;

use serde_json::json;
use tokio::time::Instant;

use super::access::refuse_ended;
use super::{ConnCtx, Reply, once_loaded, when_saved};
use crate::auth::Grant;
use crate::gateway::errors::{forbidden_run, recover_error, session_error};
use crate::gateway::push;
use crate::gateway::quota;
use crate::gateway::state::Shared;
use crate::ids::{Capabilities, Capability, SessionId};
use crate::protocol::commands::{
    Accepted, RecoverConnectionsCommand, RuntimeAttachRequest, RuntimeAttachResponse,
    protocol_version_supported, unsupported_protocol,
};
use crate::protocol::{CommandError, ErrorCode, encode_reply};
use crate::session::{AttachParams, ConnId};

/// `runtime.attach`.
pub(crate) fn attach(
    ctx: &mut ConnCtx,
    id: &str,
    req: RuntimeAttachRequest,
) -> Result<Reply, CommandError> {
    let reply = start_attach(ctx, id, req)?;
    ctx.bound_session = true;
    Ok(reply)
}

fn start_attach(ctx: &ConnCtx, id: &str, req: RuntimeAttachRequest) -> Result<Reply, CommandError> {
    let shared = &ctx.shared;
    if ctx.draining {
        return Err(CommandError::new(
            ErrorCode::Draining,
            "the gateway is draining; reconnect elsewhere or later",
        )
        .with_details(
            json!({ "reconnectAfterMs": shared.config.reconnect_after.as_millis() as u64 }),
        ));
    }
    if !protocol_version_supported(&req.protocol_version) {
        return Err(unsupported_protocol(&req.protocol_version));
    }
    if !ctx.grant.runs.covers(&req.run_id) {
        return Err(forbidden_run(&req.run_id));
    }
    // A run id is closed for good once it ended (while its stream is kept).
    refuse_ended(ctx, &req.run_id)?;
    let asked = req.capabilities.iter().copied().collect::<Capabilities>();
    let refused: Vec<Capability> = asked.missing_from(ctx.grant.caps);
    if !refused.is_empty() {
        let names: Vec<&str> = refused.iter().map(|c| c.as_str()).collect();
        return Err(CommandError::forbidden(format!(
            "the token does not allow {}",
            names.join(", ")
        ))
        .with_details(json!({ "refused": names })));
    }
    let params = AttachParams {
        run_id: req.run_id,
        runtime_instance_id: req.runtime_instance_id,
        attempt_id: req.attempt_id,
        reconnect: req.reconnect,
        connection_epoch: req.connection_epoch,
        capabilities: asked,
        tenant: quota::session_tenant(&ctx.grant),
    };
    if !shared.sessions.shared() {
        return attach_here(ctx.id, shared.clone(), id.to_owned(), params);
    }
    // Other gateways share the sessions: learn the run's session from the
    // store first, so a reconnect finds one another gateway held and a
    // fresh attach finds the run taken.
    let loaded = shared.sessions.load_from_shared(&params.run_id);
    let (conn, shared, id) = (ctx.id, shared.clone(), id.to_owned());
    once_loaded(vec![loaded], move || attach_here(conn, shared, id, params))
}

/// Attaches on the registry as it stands and answers once saved.
fn attach_here(
    conn: ConnId,
    shared: Arc<Shared>,
    id: String,
    params: AttachParams,
) -> Result<Reply, CommandError> {
    let now = Instant::now();
    let (outcome, saved) = shared
        .sessions
        .with_new_deadline(|r| r.attach(conn, params, now));
    let outcome = outcome.map_err(session_error)?;
    // The move already happened in memory, so the old socket is fenced now
    // whether or not the save succeeds.
    if let Some(s) = &outcome.superseded {
        shared.conns.superseded(s);
    }
    let session = outcome.session;
    // Per-session events are debug: at thousands of sessions an info line
    // each would be most of the gateway's work in an attach storm.
    tracing::debug!(run = %session.run_id, epoch = session.epoch, fresh = outcome.fresh, "session attached");
    let version = shared.runs.current().resolve(&session.run_id).version;
    let response = RuntimeAttachResponse {
        session_id: session.session_id.clone(),
        run_id: session.run_id.clone(),
        heartbeat_interval_ms: shared.config.heartbeat_interval.as_millis() as u64,
        lease_expires_at: shared.clock.wall(session.lease_deadline),
        config_version: Some(version),
    };
    let undo_shared = shared.clone();
    let run = session.run_id.clone();
    let (reattached, root) = (!outcome.fresh, session.session_id.clone());
    let undo = move || {
        // A fresh session nobody was told about is withdrawn so the retry
        // can start it; a moved one stays where it is (its old socket was
        // already fenced) and the retry moves it again.
        if outcome.fresh {
            undo_shared
                .sessions
                .with(|r| r.abandon(&session.session_id));
        }
    };
    when_saved(saved, undo, move || {
        // Keep the run's stream while the session lives (and fix its epoch
        // before the first publish, for viewers already waiting). Only once
        // saved: a session another gateway fenced off never started here.
        shared.streams.session_started(&run, now);
        if reattached {
            push_pending_cancels(&shared, conn, &root);
        }
        encode_reply(&id, &response)
    })
}

/// `runtime.recoverConnections`.
pub(crate) fn recover(
    ctx: &mut ConnCtx,
    id: &str,
    req: RecoverConnectionsCommand,
) -> Result<Reply, CommandError> {
    let reply = start_recover(ctx, id, req)?;
    ctx.bound_session = true;
    Ok(reply)
}

fn start_recover(
    ctx: &ConnCtx,
    id: &str,
    req: RecoverConnectionsCommand,
) -> Result<Reply, CommandError> {
    // All or none: an ended run among them refuses the whole recovery.
    refuse_ended(ctx, &req.main_run_id)?;
    for run in req.sub_run_ids.iter().flatten() {
        refuse_ended(ctx, run).map_err(|mut e| {
            e.message = format!("sub-run {run}: {}; nothing moved", e.message);
            e
        })?;
    }
    let sessions = &ctx.shared.sessions;
    if !sessions.shared() {
        return recover_here(
            ctx.id,
            ctx.shared.clone(),
            ctx.grant.clone(),
            id.to_owned(),
            req,
        );
    }
    // Sub-runs another gateway held are learnt from the shared store first:
    // those named (that the token covers: the others are refused unread),
    // or all of the main session's.
    let loads: Vec<_> = match &req.sub_run_ids {
        Some(runs) => runs
            .iter()
            .filter(|run| ctx.grant.runs.covers(run))
            .map(|run| sessions.load_from_shared(run))
            .collect(),
        None => vec![sessions.load_sub_runs_from_shared(&req.session_id)],
    };
    let (conn, shared, grant, id) = (ctx.id, ctx.shared.clone(), ctx.grant.clone(), id.to_owned());
    once_loaded(loads, move || recover_here(conn, shared, grant, id, req))
}

/// Recovers on the registry as it stands and answers once saved.
fn recover_here(
    conn: ConnId,
    shared: Arc<Shared>,
    grant: Grant,
    id: String,
    req: RecoverConnectionsCommand,
) -> Result<Reply, CommandError> {
    let now = Instant::now();
    let (moved, saved) = shared.sessions.with_new_deadline(|r| {
        r.recover(
            conn,
            &req.session_id,
            &req.main_run_id,
            req.sub_run_ids.as_deref(),
            req.connection_epoch,
            // Moving a sub-run here is taking it, like an attach.
            &|run| grant.runs.covers(run),
            now,
        )
    });
    let moved = moved.map_err(recover_error)?;
    for s in &moved {
        shared.conns.superseded(s);
    }
    let root = req.session_id;
    when_saved(
        saved,
        || {},
        move || {
            push_pending_cancels(&shared, conn, &root);
            encode_reply(&id, &Accepted::YES)
        },
    )
}

/// Pushes `run.cancelRequested` for every cancel still pending on `root`
/// (a main session) and its sub-runs now bound to `conn`: a runtime that
/// crashed right after a cancel still learns of it when it comes back.
fn push_pending_cancels(shared: &Shared, conn: ConnId, root: &SessionId) {
    let pending = shared.sessions.with(|r| r.pending_cancels(conn, root));
    for (session_id, run_id, cancel) in pending {
        shared.conns.push(
            conn,
            push::run_cancel_requested(&session_id, &run_id, &cancel),
        );
    }
}
