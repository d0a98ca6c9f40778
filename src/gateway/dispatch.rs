//! From a decoded request to its answer: route by type, check scope and
//! capability, call the domain, encode the reply.
//!
//! Owns the mapping from domain errors to protocol error codes (one place,
//! [`session_error`] and [`store_error`]) and the per-endpoint command lists.
//! Commands are *applied* in the order they arrive on a socket; those that
//! wait on the store answer later (an [`Answer::Later`]), so replies may
//! overtake each other. Must not touch the socket: it returns frames.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::follow::Following;
use super::metrics::UNDECODED;
use super::rate_limit::TokenBucket;
use super::state::Shared;
use crate::auth::Grant;
use crate::ids::RunOutcome;
use crate::ids::{Capability, RunId, SessionId};
use crate::protocol::commands::{self as cmd, push};
use crate::protocol::{
    Command, CommandError, CommandKind, ErrorCode, Frame, encode_error, encode_push, encode_reply,
};
use crate::session::{
    AttachParams, CancelTarget, ConnId, RecoverError, Saved, SessionError, SessionState,
    SessionView,
};
use crate::store::{Checkpoint, PendingCancel, StoreError};
use crate::stream::{EndRequest, NewEvent, Publisher, RunEnd, StreamError};
use crate::time::Timestamp;

/// Which WebSocket endpoint a socket came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/v1/runtime`: runtimes, with a runtime token.
    Runtime,
    /// `/v1/stream`: dashboards, with a viewer token.
    Stream,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Runtime => "runtime",
            Endpoint::Stream => "stream",
        }
    }

    fn offers(self, kind: CommandKind) -> bool {
        match self {
            Endpoint::Runtime => !matches!(kind, CommandKind::RunsList | CommandKind::RunCancel),
            Endpoint::Stream => matches!(
                kind,
                CommandKind::StreamResume
                    | CommandKind::StreamCancel
                    | CommandKind::RunsList
                    | CommandKind::RunCancel
            ),
        }
    }
}

/// One socket as the dispatcher sees it: who it is and what it follows.
pub(crate) struct ConnCtx {
    pub id: ConnId,
    pub endpoint: Endpoint,
    pub grant: Grant,
    pub shared: Arc<Shared>,
    /// Set once the gateway drains: new sessions are refused.
    pub draining: bool,
    /// The runs whose streams this socket follows (`stream.resume`).
    pub following: Following,
    /// This socket's command budget.
    pub rate: TokenBucket,
    /// Set when an attach or recovery bound a session here; the idle
    /// check reads and clears it.
    pub bound_session: bool,
}

impl ConnCtx {
    /// A socket just registered, before its first frame.
    pub fn new(id: ConnId, endpoint: Endpoint, grant: Grant, shared: Arc<Shared>) -> ConnCtx {
        let limits = &shared.config.limits;
        let rate = TokenBucket::new(
            limits.max_commands_per_sec,
            limits.command_burst,
            Instant::now(),
        );
        ConnCtx {
            id,
            endpoint,
            grant,
            shared,
            draining: false,
            following: Following::default(),
            rate,
            bound_session: false,
        }
    }
}

/// A request's answer: ready now, or once the store has done its part.
pub(crate) enum Answer {
    Now(Frame),
    /// The reply to come, and the most bytes it may hold meanwhile (what
    /// the socket's budget is charged while it is built).
    Later(BoxFuture<'static, Frame>, usize),
}

type Outcome = Result<Frame, CommandError>;

/// What a handler returns: a frame now, or a future of one.
enum Reply {
    Now(Frame),
    Later(BoxFuture<'static, Outcome>),
}

/// What a small reply (an acknowledgement, an attach) may hold.
const SMALL_REPLY_BYTES: usize = 1024;

/// The most bytes `command`'s reply can hold while it is built: what the
/// socket's budget is charged up front, so requests that would together
/// build more than the budget are not read until earlier ones are sent.
fn worst_reply_bytes(limits: &crate::config::Limits, command: &Command) -> usize {
    let worst = match command {
        // The store refuses a read past `max_reply_bytes`.
        Command::KvGet(req) => req
            .keys
            .len()
            .saturating_mul(limits.max_kv_key_bytes + limits.max_kv_value_bytes + 16)
            .saturating_add(SMALL_REPLY_BYTES),
        Command::CheckpointLoad(_) => limits.max_checkpoint_bytes + SMALL_REPLY_BYTES,
        Command::RunsList(_) => limits.max_reply_bytes,
        _ => SMALL_REPLY_BYTES,
    };
    worst.min(limits.max_reply_bytes)
}

/// `frame`, or `PAYLOAD_TOO_LARGE` under `id` if it is larger than a reply
/// may be: a socket must never be handed a frame its writer cannot take.
fn within_reply_limit(id: &str, frame: Frame, max_reply: usize) -> Frame {
    let bytes = frame.as_str().len();
    if bytes <= max_reply {
        return frame;
    }
    let err = CommandError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the reply would be {bytes} bytes; the limit is {max_reply}; ask for less at a time"
        ),
    )
    .with_details(json!({ "maxReplyBytes": max_reply }));
    encode_error(Some(id), &err)
}

/// Handles one text frame. Never fails: every problem becomes an error frame.
pub(crate) fn handle_text(ctx: &mut ConnCtx, text: &str) -> Answer {
    let started = Instant::now();
    if let Err(wait) = ctx.rate.take(started) {
        return Answer::Now(rate_limited(ctx, text, wait, started));
    }
    let request = match crate::protocol::decode(text) {
        Ok(r) => r,
        Err(rejected) => {
            let frame = encode_error(rejected.id.as_deref(), &rejected.error);
            record(ctx, UNDECODED, Err(rejected.error.code), started);
            return Answer::Now(frame);
        }
    };
    let id = request.id;
    let Some(kind) = CommandKind::parse(&request.kind) else {
        let err = CommandError::new(
            ErrorCode::UnknownType,
            format!("unknown command type {:?}", request.kind),
        );
        record(ctx, UNDECODED, Err(err.code), started);
        return Answer::Now(encode_error(Some(&id), &err));
    };
    let label = kind.as_str();
    if !ctx.endpoint.offers(kind) {
        let err = CommandError::forbidden(format!(
            "{label} is not offered on the {} endpoint",
            ctx.endpoint.label()
        ));
        record(ctx, label, Err(err.code), started);
        return Answer::Now(encode_error(Some(&id), &err));
    }
    let mut worst = 0;
    let reply = Command::parse(kind, request.payload).and_then(|command| {
        // The request's own text counts too: what it carries (a kv.set's
        // pairs, a checkpoint) is held until the store has applied it.
        worst = worst_reply_bytes(&ctx.shared.config.limits, &command) + text.len();
        apply(ctx, &id, command)
    });
    let max_reply = ctx.shared.config.limits.max_reply_bytes;
    match reply {
        Ok(Reply::Now(frame)) => {
            let frame = within_reply_limit(&id, frame, max_reply);
            record(ctx, label, Ok(()), started);
            Answer::Now(frame)
        }
        Ok(Reply::Later(pending)) => {
            let shared = ctx.shared.clone();
            Answer::Later(
                async move {
                    let (frame, outcome) = match pending.await {
                        Ok(frame) => (within_reply_limit(&id, frame, max_reply), "ok"),
                        Err(err) => (encode_error(Some(&id), &err), err.code.as_str()),
                    };
                    shared
                        .metrics
                        .command(label, outcome, started.elapsed().as_secs_f64());
                    frame
                }
                .boxed(),
                worst,
            )
        }
        Err(err) => {
            record(ctx, label, Err(err.code), started);
            Answer::Now(encode_error(Some(&id), &err))
        }
    }
}

/// The answer to a frame over the socket's command budget: `RATE_LIMITED`,
/// retryable, under the request's id if it has one. Nothing of the command
/// is applied; the socket and its sessions carry on.
fn rate_limited(ctx: &ConnCtx, text: &str, wait: std::time::Duration, started: Instant) -> Frame {
    let (id, label) = match crate::protocol::decode(text) {
        Ok(r) => {
            let label = CommandKind::parse(&r.kind).map_or(UNDECODED, CommandKind::as_str);
            (Some(r.id), label)
        }
        Err(rejected) => (rejected.id, UNDECODED),
    };
    let limits = &ctx.shared.config.limits;
    // Rounded up, so a client that waits exactly this long finds a token.
    let retry_after_ms = wait.as_micros().div_ceil(1000) as u64;
    let err = CommandError::new(
        ErrorCode::RateLimited,
        format!(
            "this socket sends more than {} commands per second (bursts of {}); retry in {retry_after_ms} ms",
            limits.max_commands_per_sec, limits.command_burst
        ),
    )
    .retryable(true)
    .with_details(json!({
        "retryAfterMs": retry_after_ms,
        "maxCommandsPerSec": limits.max_commands_per_sec,
        "commandBurst": limits.command_burst,
    }));
    ctx.shared.metrics.refused("max_commands_per_sec");
    record(ctx, label, Err(err.code), started);
    encode_error(id.as_deref(), &err)
}

fn record(ctx: &ConnCtx, label: &'static str, outcome: Result<(), ErrorCode>, started: Instant) {
    let outcome = match outcome {
        Ok(()) => "ok",
        Err(code) => code.as_str(),
    };
    ctx.shared
        .metrics
        .command(label, outcome, started.elapsed().as_secs_f64());
}

fn apply(ctx: &mut ConnCtx, id: &str, command: Command) -> Result<Reply, CommandError> {
    let reply = |payload: &dyn erased::Payload| Ok(Reply::Now(erased::encode(id, payload)));
    match command {
        Command::RuntimeAttach(req) => {
            let attached = attach(ctx, id, req)?;
            ctx.bound_session = true;
            Ok(attached)
        }
        Command::RuntimeHeartbeat(req) => reply(&heartbeat(ctx, req)?),
        Command::RuntimeRecoverConnections(req) => {
            let recovered = recover(ctx, id, req)?;
            ctx.bound_session = true;
            Ok(recovered)
        }
        Command::SecretsGet(req) => Ok(Reply::Now(secrets_get(ctx, id, req)?)),
        Command::ConfigGet(req) => Ok(Reply::Now(config_get(ctx, id, req)?)),
        Command::KvGet(req) => kv_get(ctx, id, req),
        Command::KvSet(req) => kv_set(ctx, id, req),
        Command::CheckpointSave(req) => checkpoint_save(ctx, id, req),
        Command::CheckpointLoad(req) => checkpoint_load(ctx, id, req),
        Command::EventsPublish(req) => publish(ctx, id, req),
        Command::StreamResume(req) => reply(&stream_resume(ctx, req)?),
        Command::StreamCancel(req) => reply(&stream_cancel(ctx, req)?),
        Command::RuntimeFinish(req) => finish(ctx, id, req),
        Command::RunCancel(req) => run_cancel(ctx, id, req),
        Command::RunsList(req) => {
            let limit = match req.limit {
                None => usize::MAX,
                Some(n @ 1..=cmd::RUNS_LIST_MAX_LIMIT) => n as usize,
                Some(_) => {
                    return Err(CommandError::invalid_payload(
                        "/payload/limit",
                        format!("limit must be 1 to {}", cmd::RUNS_LIST_MAX_LIMIT),
                    ));
                }
            };
            let page = RunsPage {
                cursor: req.cursor,
                limit,
                max_bytes: ctx.shared.config.limits.max_reply_bytes,
            };
            Ok(later(
                id,
                runs_list(&ctx.shared, &ctx.grant, page),
                |id, runs| Ok(encode_reply(id, &runs)),
            ))
        }
    }
}

/// Lets `apply` hand differently typed payloads to one encoder.
mod erased {
    use super::*;

    pub trait Payload {
        fn encode(&self, id: &str) -> Frame;
    }

    impl<T: Serialize> Payload for T {
        fn encode(&self, id: &str) -> Frame {
            encode_reply(id, self)
        }
    }

    pub fn encode(id: &str, payload: &dyn Payload) -> Frame {
        payload.encode(id)
    }
}

// ------------------------------------------------------------ error mapping

/// The one place session errors become protocol errors.
pub(crate) fn session_error(e: SessionError) -> CommandError {
    let message = e.to_string();
    match e {
        SessionError::NotAttached => CommandError::new(ErrorCode::NotAttached, message),
        SessionError::StaleEpoch { current_epoch, .. } => {
            CommandError::new(ErrorCode::StaleEpoch, message)
                .with_details(json!({ "currentEpoch": current_epoch }))
        }
        SessionError::EpochNotGreater { offered, current }
        | SessionError::EpochNotMain { offered, current } => {
            CommandError::new(ErrorCode::StaleEpoch, message)
                .with_details(json!({ "offeredEpoch": offered, "currentEpoch": current }))
        }
        SessionError::Expired { run_id } => CommandError::new(ErrorCode::SessionExpired, message)
            .with_details(json!({ "runId": run_id })),
        SessionError::RunTaken { run_id } | SessionError::OtherInstance { run_id } => {
            CommandError::new(ErrorCode::Conflict, message).with_details(json!({ "runId": run_id }))
        }
        SessionError::Forbidden(_) => CommandError::new(ErrorCode::Forbidden, message),
        // Not retryable: the same attach on the same socket fails until the
        // runtime ends a session there or opens another socket.
        SessionError::TooManySessions { max } => CommandError::new(
            ErrorCode::RateLimited,
            format!("{message}; open another socket or let a session end"),
        )
        .retryable(false)
        .with_details(json!({ "maxSessionsPerSocket": max })),
    }
}

/// The one place stream errors become protocol errors.
pub(crate) fn stream_error(e: StreamError) -> CommandError {
    let message = e.to_string();
    match e {
        StreamError::TooLarge {
            max_events,
            max_bytes,
            ..
        } => CommandError::new(ErrorCode::PayloadTooLarge, message)
            .with_details(json!({ "maxEventsPerRun": max_events, "maxBytesPerRun": max_bytes })),
        StreamError::Unavailable(_) => {
            tracing::warn!(error = %message, "stream engine failed");
            CommandError::internal("the stream is unavailable; nothing was stored, retry")
                .retryable(true)
        }
        StreamError::Fenced => CommandError::new(
            ErrorCode::StaleEpoch,
            "the session moved to another gateway at a newer connection epoch; nothing was stored",
        ),
        StreamError::Ended { outcome } => CommandError::new(ErrorCode::RunEnded, message)
            .with_details(json!({ "outcome": outcome })),
        StreamError::EndConflict { outcome } => CommandError::new(ErrorCode::Conflict, message)
            .with_details(json!({ "outcome": outcome })),
        StreamError::EndUnsupported => CommandError::internal(message).retryable(false),
        StreamError::BudgetFull { max_bytes } => CommandError::new(ErrorCode::RateLimited, message)
            .retryable(true)
            .with_details(json!({ "streamGlobalMaxBytes": max_bytes, "retryAfterMs": 1000 })),
    }
}

/// `RUN_ENDED` for `run`, which ended with `outcome`.
fn run_ended(run: &RunId, outcome: RunOutcome) -> CommandError {
    CommandError::new(
        ErrorCode::RunEnded,
        format!("run {run} ended ({outcome}); a retry of the work is a new runId"),
    )
    .with_details(json!({ "runId": run, "outcome": outcome }))
}

/// [`stream_error`] that names the run a `RUN_ENDED` or `CONFLICT` is about.
fn stream_error_of(run: &RunId, e: StreamError) -> CommandError {
    match e {
        StreamError::Ended { outcome } => run_ended(run, outcome),
        StreamError::EndConflict { outcome } => CommandError::new(
            ErrorCode::Conflict,
            format!("run {run} already ended with outcome {outcome}"),
        )
        .with_details(json!({ "runId": run, "outcome": outcome })),
        e => stream_error(e),
    }
}

/// `RUN_ENDED` if `run` ended (or is ending) and the token covers it.
fn refuse_ended(ctx: &ConnCtx, run: &RunId) -> Result<(), CommandError> {
    match ctx.shared.streams.ended(run) {
        Some(end) if ctx.grant.runs.covers(run) => Err(run_ended(run, end.outcome)),
        _ => Ok(()),
    }
}

/// The one place storage errors become protocol errors.
pub(crate) fn store_error(e: StoreError) -> CommandError {
    match e {
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "store operation failed");
            CommandError::internal("storage is unavailable; nothing was written, retry")
                .retryable(true)
        }
        StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "store is corrupt");
            CommandError::internal("storage is corrupt").retryable(false)
        }
        // The run's KV is full: writing existing keys still works, new
        // ones never will (KV has no delete), so this is a size refusal.
        StoreError::TooManyKeys { max } => {
            CommandError::new(ErrorCode::PayloadTooLarge, e.to_string())
                .with_details(json!({ "maxKvKeysPerRun": max }))
        }
        // Another gateway got there first: it moved the session on to a
        // newer epoch, or (no epoch) holds a live session of the run.
        StoreError::ReplyTooLarge { max } => {
            CommandError::new(ErrorCode::PayloadTooLarge, e.to_string())
                .with_details(json!({ "maxReplyBytes": max }))
        }
        StoreError::Fenced { sessions } => match sessions.iter().find_map(|(_, e)| *e) {
            Some(current_epoch) => CommandError::new(
                ErrorCode::StaleEpoch,
                "the session moved to another gateway at a newer connection epoch",
            )
            .with_details(json!({ "currentEpoch": current_epoch })),
            None => CommandError::new(
                ErrorCode::Conflict,
                "the run already has a live session on another gateway",
            ),
        },
    }
}

// ----------------------------------------------------------------- checks

fn forbidden_run(run: &RunId) -> CommandError {
    CommandError::forbidden(format!("the token does not cover run {run}"))
        .with_details(json!({ "runId": run }))
}

/// The session a command names, checked against this socket, its epoch and
/// the capability the command needs.
fn session_for(
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

// --------------------------------------------------------------- commands

/// Answers once the session changes a command made are saved (at once when
/// they already are, as with the memory store), so a runtime never holds a
/// session a crash could take back. If saving fails, `undo` runs and the
/// command is answered with a retryable error.
fn when_saved(
    mut saved: Saved,
    undo: impl FnOnce() + Send + 'static,
    finish: impl FnOnce() -> Frame + Send + 'static,
) -> Result<Reply, CommandError> {
    let done = move |result: Result<(), StoreError>| match result {
        Ok(()) => Ok(finish()),
        Err(e) => {
            undo();
            Err(store_error(e))
        }
    };
    match (&mut saved).now_or_never() {
        Some(result) => done(result).map(Reply::Now),
        None => Ok(Reply::Later(async move { done(saved.await) }.boxed())),
    }
}

fn attach(ctx: &ConnCtx, id: &str, req: cmd::RuntimeAttachRequest) -> Result<Reply, CommandError> {
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
    if !cmd::protocol_version_supported(&req.protocol_version) {
        return Err(cmd::unsupported_protocol(&req.protocol_version));
    }
    if !ctx.grant.runs.covers(&req.run_id) {
        return Err(forbidden_run(&req.run_id));
    }
    // A run id is closed for good once it ended (while its stream is kept).
    refuse_ended(ctx, &req.run_id)?;
    let asked = req
        .capabilities
        .iter()
        .copied()
        .collect::<crate::ids::Capabilities>();
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

/// Answers with `then` once `loads` (sessions read from a store other
/// gateways share into the registry) are done: for a command whose rules
/// need to know sessions held elsewhere.
fn once_loaded(
    loads: Vec<Saved>,
    then: impl FnOnce() -> Result<Reply, CommandError> + Send + 'static,
) -> Result<Reply, CommandError> {
    Ok(Reply::Later(
        async move {
            for load in loads {
                load.await.map_err(store_error)?;
            }
            match then()? {
                Reply::Now(frame) => Ok(frame),
                Reply::Later(answer) => answer.await,
            }
        }
        .boxed(),
    ))
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
    let response = cmd::RuntimeAttachResponse {
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

fn heartbeat(
    ctx: &ConnCtx,
    req: cmd::HeartbeatCommand,
) -> Result<cmd::HeartbeatResponse, CommandError> {
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
    Ok(cmd::HeartbeatResponse {
        accepted: true,
        next_heartbeat_due_at: ctx
            .shared
            .clock
            .wall(now + ctx.shared.config.heartbeat_interval),
    })
}

fn recover(
    ctx: &ConnCtx,
    id: &str,
    req: cmd::RecoverConnectionsCommand,
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

fn recover_here(
    conn: ConnId,
    shared: Arc<Shared>,
    grant: Grant,
    id: String,
    req: cmd::RecoverConnectionsCommand,
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
    let moved = moved.map_err(|RecoverError { run_id, error }| {
        let mut e = session_error(error);
        if let Some(run) = run_id {
            e.message = format!("sub-run {run}: {}; nothing moved", e.message);
            e.details = Some(json!({ "runId": run }));
        }
        e
    })?;
    for s in &moved {
        shared.conns.superseded(s);
    }
    let root = req.session_id;
    when_saved(
        saved,
        || {},
        move || {
            push_pending_cancels(&shared, conn, &root);
            encode_reply(&id, &cmd::Accepted::YES)
        },
    )
}

/// Pushes `run.cancelRequested` for every cancel still pending on `root`
/// (a main session) and its sub-runs now bound to `conn`: a runtime that
/// crashed right after a cancel still learns of it when it comes back.
fn push_pending_cancels(shared: &Shared, conn: ConnId, root: &SessionId) {
    let pending = shared.sessions.with(|r| r.pending_cancels(conn, root));
    for (session_id, run_id, cancel) in pending {
        shared
            .conns
            .push(conn, cancel_push(&session_id, &run_id, &cancel));
    }
}

fn cancel_push(session_id: &SessionId, run_id: &RunId, cancel: &PendingCancel) -> Frame {
    let payload = push::RunCancelRequested {
        session_id,
        run_id,
        reason: cancel.reason.as_deref(),
        requested_at: Timestamp::from_unix_millis(cancel.requested_at_unix_ms),
    };
    encode_push(push::RUN_CANCEL_REQUESTED, &payload)
}

fn secrets_get(ctx: &ConnCtx, id: &str, req: cmd::GetSecretsCommand) -> Outcome {
    session_for(ctx, CommandKind::SecretsGet, &req.session_id, &req.run_id)?;
    let resolved = ctx.shared.runs.current().resolve(&req.run_id);
    let secrets: BTreeMap<&str, &str> = match &req.names {
        None => resolved
            .secrets
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect(),
        Some(names) => {
            let missing: Vec<&str> = names
                .iter()
                .filter(|n| !resolved.secrets.contains_key(n.as_str()))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(
                    CommandError::new(ErrorCode::NotFound, "no such secret for this run")
                        .with_details(json!({ "missing": missing })),
                );
            }
            names
                .iter()
                .filter_map(|n| resolved.secrets.get_key_value(n.as_str()))
                .map(|(k, v)| (k.as_str(), v.expose()))
                .collect()
        }
    };
    let secrets = secrets
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    Ok(encode_reply(id, &cmd::GetSecretsResponse { secrets }))
}

fn config_get(ctx: &ConnCtx, id: &str, req: cmd::SessionRef) -> Outcome {
    session_for(ctx, CommandKind::ConfigGet, &req.session_id, &req.run_id)?;
    let resolved = ctx.shared.runs.current().resolve(&req.run_id);
    Ok(encode_reply(
        id,
        &cmd::GetConfigResponse {
            config: std::borrow::Cow::Borrowed(&resolved.config),
        },
    ))
}

/// Wraps a store future into a later reply, finished by `finish`.
fn later<T: Send + 'static>(
    id: &str,
    fut: crate::store::StoreFuture<T>,
    finish: impl FnOnce(&str, T) -> Outcome + Send + 'static,
) -> Reply {
    let id = id.to_owned();
    Reply::Later(async move { fut.await.map_err(store_error).and_then(|v| finish(&id, v)) }.boxed())
}

fn kv_get(ctx: &ConnCtx, id: &str, req: cmd::GetKVCommand) -> Result<Reply, CommandError> {
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
    let fut = ctx
        .shared
        .store
        .kv_get_within(&req.run_id, req.keys, max_bytes);
    Ok(later(id, fut, |id, kv| {
        Ok(encode_reply(id, &cmd::GetKVResponse { kv }))
    }))
}

fn kv_set(ctx: &ConnCtx, id: &str, req: cmd::SetKVCommand) -> Result<Reply, CommandError> {
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
    let fut = ctx
        .shared
        .store
        .kv_set_within(&req.run_id, req.kv, limits.max_kv_keys_per_run);
    Ok(later(id, fut, |id, ()| {
        Ok(encode_reply(id, &cmd::Accepted::YES))
    }))
}

/// `key` as one reference token of a JSON pointer (RFC 6901).
fn json_pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// A new checkpoint id: millisecond time then randomness, so ids sort by age.
fn new_checkpoint_id(at: Timestamp) -> String {
    format!("{:013}-{:08x}", at.unix_millis(), rand::random::<u32>())
}

fn checkpoint_save(
    ctx: &ConnCtx,
    id: &str,
    req: cmd::CheckpointSaveCommand,
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
    let fut = ctx.shared.store.checkpoint_save(&req.run_id, checkpoint);
    Ok(later(id, fut, move |id, ()| {
        Ok(encode_reply(
            id,
            &cmd::CheckpointSaveResponse {
                checkpoint_id,
                saved_at,
            },
        ))
    }))
}

fn checkpoint_load(
    ctx: &ConnCtx,
    id: &str,
    req: cmd::CheckpointLoadCommand,
) -> Result<Reply, CommandError> {
    session_for(
        ctx,
        CommandKind::CheckpointLoad,
        &req.session_id,
        &req.run_id,
    )?;
    let named = req.checkpoint_id.map(|c| c.as_str().to_owned());
    let fut = ctx.shared.store.checkpoint_load(&req.run_id, named.clone());
    Ok(later(id, fut, move |id, found| match found {
        Some(c) => Ok(encode_reply(
            id,
            &cmd::CheckpointLoadResponse {
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

// ---------------------------------------------------------------- streams

fn publish(
    ctx: &ConnCtx,
    id: &str,
    req: cmd::PublishOutputEventsRequest,
) -> Result<Reply, CommandError> {
    let session = session_for(
        ctx,
        CommandKind::EventsPublish,
        &req.session_id,
        &req.run_id,
    )?;
    let limits = &ctx.shared.config.limits;
    if req.events.len() > limits.max_events_per_publish {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{} events in one publish; the limit is {}",
                req.events.len(),
                limits.max_events_per_publish
            ),
        )
        .with_details(json!({ "maxEventsPerPublish": limits.max_events_per_publish })));
    }
    if let Some(i) = req
        .events
        .iter()
        .position(|e| e.raw.get().len() > limits.max_event_bytes)
    {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "event {i} is {} bytes; the limit is {}",
                req.events[i].raw.get().len(),
                limits.max_event_bytes
            ),
        )
        .with_details(json!({ "path": format!("/payload/events/{i}"), "maxEventBytes": limits.max_event_bytes })));
    }
    let events: Vec<NewEvent<'_>> = req
        .events
        .iter()
        .map(|e| NewEvent {
            json: e.raw.get(),
            seq: e.seq,
        })
        .collect();
    // The engine fixes the batch's place in the stream before returning, so
    // publishes are ordered as they arrived even if their replies are not.
    let publisher = Publisher {
        session_id: session.session_id.as_str(),
        epoch: session.epoch,
    };
    let pending = ctx
        .shared
        .streams
        .publish_as(&req.run_id, &events, publisher, Instant::now());
    let shared = ctx.shared.clone();
    let id = id.to_owned();
    let run = req.run_id.clone();
    Ok(Reply::Later(
        async move {
            let outcome = pending.await.map_err(|e| stream_error_of(&run, e))?;
            shared
                .metrics
                .events_published(outcome.accepted, outcome.duplicates);
            Ok(encode_reply(&id, &cmd::Accepted::YES))
        }
        .boxed(),
    ))
}

// -------------------------------------------------------------- lifecycle

/// `runtime.finish`: ends the run's stream (durably, after every event
/// before it), then its session (and a main run's open sub-runs, whose
/// streams end `cancelled`). Idempotent by run: an ended run answers from
/// its end marker, whichever socket asks.
fn finish(ctx: &ConnCtx, id: &str, req: cmd::RuntimeFinishCommand) -> Result<Reply, CommandError> {
    let shared = ctx.shared.clone();
    let run = req.run_id;
    let end = EndRequest {
        outcome: req.outcome,
        message: req.message.map(|m| m.0),
        ended_at: Timestamp::now(),
    };
    let id = id.to_owned();
    if let Some(ended) = shared.streams.ended(&run) {
        if !ctx.grant.runs.covers(&run) {
            return Err(forbidden_run(&run));
        }
        if ended.outcome != end.outcome {
            return Err(stream_error_of(
                &run,
                StreamError::EndConflict {
                    outcome: ended.outcome,
                },
            ));
        }
        // Asked again: the same answer, once the first end is durable.
        let pending = shared.streams.finish(&run, end, Instant::now());
        return Ok(Reply::Later(
            async move {
                let ended = pending.await.map_err(|e| stream_error_of(&run, e))?;
                Ok(encode_reply(&id, &finished(&ended)))
            }
            .boxed(),
        ));
    }
    let session = session_for(ctx, CommandKind::RuntimeFinish, &req.session_id, &run)?;
    let pending = shared.streams.finish(&run, end, Instant::now());
    Ok(Reply::Later(
        async move {
            let ended = pending.await.map_err(|e| stream_error_of(&run, e))?;
            end_sessions(&shared, &session.session_id).await?;
            Ok(encode_reply(&id, &finished(&ended)))
        }
        .boxed(),
    ))
}

fn finished(end: &RunEnd) -> cmd::RuntimeFinishResponse {
    cmd::RuntimeFinishResponse {
        accepted: true,
        next_offset: end.next_offset,
    }
}

/// Ends session `id` and, for a main session, its open sub-runs (their
/// streams first, `cancelled`: "main run finished"), then waits until the
/// ends are saved. Nobody is pushed `session.expired`.
async fn end_sessions(shared: &Shared, id: &SessionId) -> Result<(), CommandError> {
    let subs: Vec<RunId> = shared.sessions.with(|r| r.open_sub_runs(id));
    for sub in subs {
        let end = EndRequest {
            outcome: RunOutcome::Cancelled,
            message: Some("main run finished".to_owned()),
            ended_at: Timestamp::now(),
        };
        match shared.streams.finish(&sub, end, Instant::now()).await {
            // Ended on its own already, with whatever outcome: it stays so.
            Ok(_) | Err(StreamError::EndConflict { .. }) => {}
            Err(e) => return Err(stream_error_of(&sub, e)),
        }
    }
    let now = Instant::now();
    let (ended, saved) = shared.sessions.with_new_deadline(|r| r.end(id, now));
    for e in &ended {
        tracing::debug!(run = %e.run_id, "run finished; session ended");
        shared.streams.session_ended(&e.run_id, now);
    }
    saved.await.map_err(store_error)
}

/// `run.cancel` on /v1/stream: a viewer token with the `run.cancel`
/// capability asks the run's runtime to stop.
fn run_cancel(ctx: &ConnCtx, id: &str, req: cmd::RunCancelCommand) -> Result<Reply, CommandError> {
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
) -> BoxFuture<'static, Result<cmd::RunCancelResponse, CommandError>> {
    let loaded = shared
        .sessions
        .shared()
        .then(|| shared.sessions.load_from_shared(&run));
    async move {
        if let Some(loaded) = loaded {
            loaded.await.map_err(store_error)?;
        }
        if shared.streams.ended(&run).is_some() {
            return Ok(cmd::RunCancelResponse {
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
                        .push_now(conn, cancel_push(&session_id, &run, &cancel)),
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
        Ok(cmd::RunCancelResponse {
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

fn stream_resume(
    ctx: &mut ConnCtx,
    req: cmd::StreamResumeCommand,
) -> Result<crate::stream::ResumeInfo, CommandError> {
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
    let (info, subscription) = ctx
        .shared
        .streams
        .resume(
            &req.run_id,
            req.from_offset,
            req.stream_epoch.as_ref().map(|e| e.as_str()),
            Instant::now(),
        )
        .map_err(stream_error)?;
    // Followed before the reply is queued; the connection sends the reply
    // before it next polls subscriptions, so the reply comes first.
    ctx.following
        .insert(req.run_id, info.stream_epoch.clone(), subscription);
    Ok(info)
}

fn stream_cancel(
    ctx: &mut ConnCtx,
    req: cmd::StreamCancelCommand,
) -> Result<cmd::Accepted, CommandError> {
    check_reader(
        ctx,
        CommandKind::StreamCancel,
        req.session_id.as_ref(),
        &req.run_id,
    )?;
    ctx.following.remove(&req.run_id);
    Ok(cmd::Accepted::YES)
}

/// Where a `runs.list` page starts and how large it may be.
pub(crate) struct RunsPage {
    /// Only runs after this one.
    pub cursor: Option<RunId>,
    pub limit: usize,
    /// The reply's size limit.
    pub max_bytes: usize,
}

impl RunsPage {
    /// A page of an HTTP body, which has no frame limit.
    pub fn http(cursor: Option<RunId>, limit: usize) -> RunsPage {
        RunsPage {
            cursor,
            limit,
            max_bytes: usize::MAX,
        }
    }
}

/// Most bytes of one run's summary in a reply besides its run id and
/// stream epoch: member names, a state, two 20-digit offsets, punctuation.
const SUMMARY_BYTES: usize = 160;

/// The runs `grant` covers that have a stream, with their session state:
/// the `runs.list` reply and the `GET /v1/runs` body.
///
/// A stream that no session ever fed and that holds nothing (a viewer
/// resumed a run that has not started) is not listed: there is no run to
/// show yet. A stream whose session is forgotten is listed as `expired`.
pub(crate) fn runs_list(
    shared: &Shared,
    grant: &Grant,
    page: RunsPage,
) -> crate::store::StoreFuture<cmd::RunsListResponse> {
    // The page: covered runs after the cursor, in run id order, as many as
    // `limit` and the reply's size allow. A run that turns out not to be
    // listed (below) leaves the page shorter, never the next one wrong.
    let room = page
        .max_bytes
        .saturating_sub(crate::config::REPLY_OVERHEAD_BYTES);
    let mut used = 0usize;
    let mut next_cursor = None;
    let mut streams = Vec::new();
    // No more candidates than could fit, plus one to know whether more
    // follow: the cost follows the page, not the gateway's stream count.
    let fit = room / (SUMMARY_BYTES + 17);
    let wanted = page.limit.min(fit).saturating_add(1);
    let selectors: Vec<crate::stream::RunSelector<'_>> = grant
        .runs
        .patterns()
        .iter()
        .map(|p| crate::stream::RunSelector {
            text: p.prefix(),
            prefix: !p.is_exact(),
        })
        .collect();
    let candidates = shared
        .streams
        .runs_matching(&selectors, page.cursor.as_ref(), wanted);
    for s in candidates {
        let bytes = SUMMARY_BYTES + s.run_id.as_str().len() + s.stream_epoch.as_str().len();
        if streams.len() >= page.limit || used + bytes > room {
            next_cursor = streams
                .last()
                .map(|last: &crate::stream::StreamSummary| last.run_id.clone());
            break;
        }
        used += bytes;
        streams.push(s);
    }
    let states: Vec<Option<SessionState>> = shared.sessions.with(|registry| {
        streams
            .iter()
            .map(|s| registry.run_state(&s.run_id))
            .collect()
    });
    // Runs with no session held here may have one on another gateway.
    let elsewhere: Vec<RunId> = streams
        .iter()
        .zip(&states)
        .filter(|(_, state)| state.is_none())
        .map(|(s, _)| s.run_id.clone())
        .collect();
    let from_store = match shared.store.shared_sessions() {
        Some(store) if !elsewhere.is_empty() => Some(store.sessions_of_runs(elsewhere)),
        _ => None,
    };
    Box::pin(async move {
        // One record per run without a state here, in the same order.
        let mut records = match from_store {
            Some(loaded) => loaded.await?,
            None => Vec::new(),
        }
        .into_iter();
        let mut runs = Vec::with_capacity(streams.len());
        for (s, state) in streams.into_iter().zip(states) {
            let state = state.or_else(|| {
                records.next().flatten().map(|r| {
                    if r.expired {
                        SessionState::Expired
                    } else if r.attached {
                        SessionState::Attached
                    } else {
                        SessionState::Detached
                    }
                })
            });
            let state = match state {
                _ if s.end.is_some() => cmd::RunState::Ended,
                Some(SessionState::Attached) => cmd::RunState::Attached,
                Some(SessionState::Detached) => cmd::RunState::Detached,
                Some(SessionState::Expired) => cmd::RunState::Expired,
                None if s.next_offset > 0 => cmd::RunState::Expired,
                None => continue,
            };
            let end = s.end.as_deref();
            runs.push(cmd::RunSummary {
                run_id: s.run_id,
                state,
                stream_epoch: s.stream_epoch,
                first_offset: s.first_offset,
                next_offset: s.next_offset,
                outcome: end.map(|e| e.outcome),
                ended_at: end.map(|e| e.ended_at),
                message: end.and_then(|e| e.message.clone()),
            });
        }
        Ok(cmd::RunsListResponse { runs, next_cursor })
    })
}
