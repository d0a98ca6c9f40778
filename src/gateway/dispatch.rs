//! One text frame on its way to its answer: the socket's command budget →
//! decode → route to the command's handler → encode → back to the socket,
//! each command counted in the metrics.
//!
//! Owns that path and nothing of what a command does: the handlers are in
//! `cmd` (one module per command or family), the wording of domain errors
//! in `errors`. Commands are *applied* in the order they arrive on a
//! socket; those that wait on the store answer later (an
//! [`Answer::Later`]), so replies may overtake each other. Must not touch
//! the socket: it returns frames, and `connection` queues them.

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::time::Instant;

use super::cmd::{self, ConnCtx, Reply};
use super::errors::command_budget_spent;
use super::metrics::UNDECODED;
use crate::protocol::{
    Command, CommandError, CommandKind, ErrorCode, Frame, TypedRequest, encode_error,
};

/// A request's answer: ready now, or once the store has done its part.
pub(crate) enum Answer {
    Now(Frame),
    /// The reply to come, and the most bytes it may hold meanwhile (what
    /// the socket's budget is charged while it is built).
    Later(BoxFuture<'static, Frame>, usize),
}

/// Handles one text frame. Never fails: every problem becomes an error frame.
pub(crate) fn handle_text(ctx: &mut ConnCtx, text: &str) -> Answer {
    let started = Instant::now();
    if let Err(wait) = ctx.rate.take(started) {
        return Answer::Now(rate_limited(ctx, text, wait, started));
    }
    let Decoded { id, kind, command } = match decode(ctx, text) {
        Ok(decoded) => decoded,
        Err(refused) => {
            record(ctx, refused.label, refused.error.code.as_str(), started);
            return Answer::Now(encode_error(refused.id.as_deref(), &refused.error));
        }
    };
    // The request's own text counts too: what it carries (a kv.set's
    // pairs, a checkpoint) is held until the store has applied it.
    let worst = cmd::worst_reply_bytes(&ctx.shared.config.limits, &command) + text.len();
    let label = kind.as_str();
    let max_reply = ctx.shared.config.limits.max_reply_bytes;
    match route(ctx, &id, command) {
        Ok(Reply::Now(frame)) => {
            let (frame, outcome) = within_reply_limit(&id, frame, max_reply);
            record(ctx, label, outcome, started);
            Answer::Now(frame)
        }
        Ok(Reply::Later(pending)) => {
            let shared = ctx.shared.clone();
            let answer = async move {
                let (frame, outcome) = match pending.await {
                    Ok(frame) => within_reply_limit(&id, frame, max_reply),
                    Err(err) => (encode_error(Some(&id), &err), err.code.as_str()),
                };
                shared
                    .metrics
                    .command(label, outcome, started.elapsed().as_secs_f64());
                frame
            };
            Answer::Later(answer.boxed(), worst)
        }
        Err(err) => {
            record(ctx, label, err.code.as_str(), started);
            Answer::Now(encode_error(Some(&id), &err))
        }
    }
}

/// A frame that became a typed command offered on this endpoint; the
/// command may borrow the frame's text (a publish's events).
struct Decoded<'a> {
    id: String,
    kind: CommandKind,
    command: Command<'a>,
}

/// A frame that did not: the id to answer under (if usable), the metrics
/// label to count it under, and why.
struct Undecoded {
    id: Option<String>,
    label: &'static str,
    error: CommandError,
}

/// The envelope (`protocol::decode`), the command type, whether this
/// endpoint offers it, then the typed payload (`Command::parse`).
///
/// A frame laid out as clients write it is read in one pass first
/// (`protocol::decode_typed`); it can only succeed, so the endpoint check is
/// all that is left to answer. Anything it declines is read step by step,
/// and each step answers its own errors in the order above.
fn decode<'a>(ctx: &ConnCtx, text: &'a str) -> Result<Decoded<'a>, Undecoded> {
    if let Some(typed) = crate::protocol::decode_typed(text) {
        let TypedRequest { id, kind, command } = typed;
        if !ctx.endpoint.offers(kind) {
            return Err(not_offered(ctx, id, kind));
        }
        return Ok(Decoded { id, kind, command });
    }
    let request = crate::protocol::decode(text).map_err(|rejected| Undecoded {
        id: rejected.id,
        label: UNDECODED,
        error: rejected.error,
    })?;
    let id = request.id;
    let Some(kind) = CommandKind::parse(&request.kind) else {
        let error = CommandError::new(
            ErrorCode::UnknownType,
            format!("unknown command type {:?}", request.kind),
        );
        return Err(Undecoded {
            id: Some(id),
            label: UNDECODED,
            error,
        });
    };
    if !ctx.endpoint.offers(kind) {
        return Err(not_offered(ctx, id, kind));
    }
    match Command::parse(kind, request.payload) {
        Ok(command) => Ok(Decoded { id, kind, command }),
        Err(error) => Err(Undecoded {
            id: Some(id),
            label: kind.as_str(),
            error,
        }),
    }
}

/// `FORBIDDEN`: `kind` is not offered on this connection's endpoint.
fn not_offered(ctx: &ConnCtx, id: String, kind: CommandKind) -> Undecoded {
    Undecoded {
        id: Some(id),
        label: kind.as_str(),
        error: CommandError::forbidden(format!(
            "{} is not offered on the {} endpoint",
            kind.as_str(),
            ctx.endpoint.label()
        )),
    }
}

/// Each command to its handler (`cmd`).
fn route(ctx: &mut ConnCtx, id: &str, command: Command<'_>) -> Result<Reply, CommandError> {
    match command {
        Command::RuntimeAttach(req) => cmd::attach::attach(ctx, id, req),
        Command::RuntimeRecoverConnections(req) => cmd::attach::recover(ctx, id, req),
        Command::RuntimeHeartbeat(req) => cmd::heartbeat::heartbeat(ctx, id, req),
        Command::SecretsGet(req) => cmd::run_config::secrets_get(ctx, id, req),
        Command::ConfigGet(req) => cmd::run_config::config_get(ctx, id, req),
        Command::KvGet(req) => cmd::kv::get(ctx, id, req),
        Command::KvSet(req) => cmd::kv::set(ctx, id, req),
        Command::KvDelete(req) => cmd::kv::delete(ctx, id, req),
        Command::CheckpointSave(req) => cmd::checkpoint::save(ctx, id, req),
        Command::CheckpointLoad(req) => cmd::checkpoint::load(ctx, id, req),
        Command::EventsPublish(req) => cmd::publish::publish(ctx, id, req),
        Command::RuntimeFinish(req) => cmd::finish::finish(ctx, id, req),
        Command::RunCancel(req) => cmd::run_cancel::cancel(ctx, id, req),
        Command::StreamResume(req) => cmd::stream::resume(ctx, id, req),
        Command::StreamCancel(req) => cmd::stream::cancel(ctx, id, req),
        Command::RunsList(req) => cmd::runs_list::list(ctx, id, req),
    }
}

/// `frame`, or `PAYLOAD_TOO_LARGE` under `id` if it is larger than a reply
/// may be: a socket must never be handed a frame its writer cannot take.
/// With the outcome to count: `"ok"`, or the code the client is sent.
fn within_reply_limit(id: &str, frame: Frame, max_reply: usize) -> (Frame, &'static str) {
    let bytes = frame.as_str().len();
    if bytes <= max_reply {
        return (frame, "ok");
    }
    let err = CommandError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the reply would be {bytes} bytes; the limit is {max_reply}; ask for less at a time"
        ),
    )
    .with_details(json!({ "maxReplyBytes": max_reply }));
    (encode_error(Some(id), &err), err.code.as_str())
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
    let err = command_budget_spent(
        &ctx.shared.config.limits,
        "this socket sends commands",
        wait,
    );
    ctx.shared.metrics.refused("max_commands_per_sec");
    record(ctx, label, err.code.as_str(), started);
    encode_error(id.as_deref(), &err)
}

/// Counts one command answered now: its type, `"ok"` or its error code,
/// and how long it took.
fn record(ctx: &ConnCtx, label: &'static str, outcome: &'static str, started: Instant) {
    ctx.shared
        .metrics
        .command(label, outcome, started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_reply;

    #[test]
    fn a_reply_over_the_limit_is_sent_and_counted_as_too_large() {
        let frame = encode_reply("r1", &json!({ "blob": "x".repeat(100) }));
        let (small, outcome) = within_reply_limit("r1", frame.clone(), 1000);
        assert_eq!((small.as_str(), outcome), (frame.as_str(), "ok"));
        let (refused, outcome) = within_reply_limit("r1", frame, 50);
        assert_eq!(outcome, "PAYLOAD_TOO_LARGE");
        let v: serde_json::Value = serde_json::from_str(refused.as_str()).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["error"]["code"], "PAYLOAD_TOO_LARGE");
        assert_eq!(v["error"]["details"]["maxReplyBytes"], 50);
    }
}
