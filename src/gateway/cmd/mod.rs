//! The commands, one module per command or small family, each with its
//! handler: check the request → apply it to the domain → its reply.
//!
//! | module | commands |
//! |---|---|
//! | [`attach`] | `runtime.attach` (fresh and reconnect), `runtime.recoverConnections` |
//! | [`heartbeat`] | `runtime.heartbeat` |
//! | [`run_config`] | `secrets.get`, `config.get` |
//! | [`kv`] | `kv.get`, `kv.set`, `kv.delete` |
//! | [`checkpoint`] | `checkpoint.save`, `checkpoint.load` |
//! | [`publish`] | `events.publish` |
//! | [`finish`] | `runtime.finish` |
//! | [`run_cancel`] | `run.cancel` (and `POST /v1/runs/{runId}/cancel`) |
//! | [`stream`] | `stream.resume`, `stream.cancel` |
//! | [`runs_list`] | `runs.list` (and `GET /v1/runs`) |
//!
//! A payload arrives typed (`protocol::Command::parse` did the schema);
//! a handler checks what the schema cannot (scope, session, capability,
//! limits; [`access`] holds the checks several share), calls the domain,
//! and answers a [`Reply`]: a frame now, or a future of one when the store
//! or the stream engine has a part. This module holds what every handler
//! shares: the socket as a handler sees it ([`ConnCtx`], [`Endpoint`]),
//! [`Reply`], and the helpers that turn a pending store or session save
//! into one.
//!
//! Handlers live under `gateway` rather than beside the domain because
//! they work on the gateway's own state (a socket's subscriptions, the
//! other sockets a push goes to) and answer in frames; the domain below
//! must not know either. Must not read or write sockets (`connection`
//! does), route or count commands (`dispatch` does), or word a domain
//! error (`errors` does).

pub(crate) mod access;
pub(crate) mod attach;
pub(crate) mod checkpoint;
pub(crate) mod finish;
pub(crate) mod heartbeat;
pub(crate) mod kv;
pub(crate) mod publish;
pub(crate) mod run_cancel;
pub(crate) mod run_config;
pub(crate) mod runs_list;
pub(crate) mod stream;

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::time::Instant;

use super::errors::store_error;
use super::follow::Following;
use super::rate_limit::TokenBucket;
use super::state::Shared;
use crate::auth::Grant;
use crate::protocol::{Command, CommandError, CommandKind, Frame, encode_reply};
use crate::session::{ConnId, Saved};
use crate::store::{StoreError, StoreFuture};

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

    /// Whether `kind` is offered here: the per-endpoint command lists.
    pub fn offers(self, kind: CommandKind) -> bool {
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

/// One socket as a handler sees it: who it is and what it follows.
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

/// A handler's answer once it is ready: the reply frame, or the error to
/// send under the request's id.
pub(crate) type Outcome = Result<Frame, CommandError>;

/// What a handler returns: a frame now, or a future of one.
pub(crate) enum Reply {
    Now(Frame),
    Later(BoxFuture<'static, Outcome>),
}

impl Reply {
    /// `payload` as the reply to request `id`, now.
    pub fn now(id: &str, payload: &impl Serialize) -> Reply {
        Reply::Now(encode_reply(id, payload))
    }
}

/// The reply to come once `pending` (a store call) is done, finished by
/// `finish`; a store failure is answered as [`store_error`] says.
fn after_store<T: Send + 'static>(
    id: &str,
    pending: StoreFuture<T>,
    finish: impl FnOnce(&str, T) -> Outcome + Send + 'static,
) -> Reply {
    let id = id.to_owned();
    Reply::Later(
        async move {
            pending
                .await
                .map_err(store_error)
                .and_then(|v| finish(&id, v))
        }
        .boxed(),
    )
}

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

/// What a small reply (an acknowledgement, an attach) may hold.
pub(super) const SMALL_REPLY_BYTES: usize = 1024;

/// The most bytes `command`'s reply can hold while it is built: what the
/// socket's budget is charged up front, so requests that would together
/// build more than the budget are not read until earlier ones are sent.
pub(crate) fn worst_reply_bytes(limits: &crate::config::Limits, command: &Command) -> usize {
    let worst = match command {
        // The store refuses a read past `max_reply_bytes`.
        Command::KvGet(req) => kv::worst_get_reply_bytes(limits, req),
        Command::CheckpointLoad(_) => limits.max_checkpoint_bytes + SMALL_REPLY_BYTES,
        Command::RunsList(_) => limits.max_reply_bytes,
        _ => SMALL_REPLY_BYTES,
    };
    worst.min(limits.max_reply_bytes)
}
