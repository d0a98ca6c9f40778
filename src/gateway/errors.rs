//! The one mapping from domain errors to protocol errors, and from protocol
//! errors to HTTP statuses.
//!
//! Owns which [`ErrorCode`] (with which `retryable` and `details`) each
//! refusal of the domain becomes: session and registry errors
//! ([`session_error`], [`recover_error`]), stream errors ([`stream_error`],
//! [`stream_error_of`]), store errors ([`store_error`], a tenant's quota
//! refusal among them), and the refusals the gateway itself words the same
//! way everywhere ([`forbidden_run`], [`run_ended`],
//! [`command_budget_spent`]). WebSocket handlers (`cmd`) and
//! HTTP routes (`http`) both come here, so a failure reads the same on
//! every transport; an HTTP route then answers [`http_status`] of the code.
//! Must not decide *when* a command fails (the handlers and the domain do),
//! nor encode frames or responses.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::json;

use crate::config::Limits;
use crate::ids::{RunId, RunOutcome};
use crate::protocol::{CommandError, ErrorCode};
use crate::session::{RecoverError, SessionError};
use crate::store::{Meter, QuotaExceeded, StoreError};
use crate::stream::StreamError;

/// A session or registry refusal as a protocol error.
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

/// A refused `runtime.recoverConnections`: [`session_error`], naming the
/// sub-run it is about, if it is about one (nothing moved either way).
pub(crate) fn recover_error(RecoverError { run_id, error }: RecoverError) -> CommandError {
    let mut e = session_error(error);
    if let Some(run) = run_id {
        e.message = format!("sub-run {run}: {}; nothing moved", e.message);
        e.details = Some(json!({ "runId": run }));
    }
    e
}

/// A stream engine refusal as a protocol error.
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

/// [`stream_error`] that names the run a `RUN_ENDED` or `CONFLICT` is about.
pub(crate) fn stream_error_of(run: &RunId, e: StreamError) -> CommandError {
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

/// `RUN_ENDED` for `run`, which ended with `outcome`.
pub(crate) fn run_ended(run: &RunId, outcome: RunOutcome) -> CommandError {
    CommandError::new(
        ErrorCode::RunEnded,
        format!("run {run} ended ({outcome}); a retry of the work is a new runId"),
    )
    .with_details(json!({ "runId": run, "outcome": outcome }))
}

/// A storage failure or refusal as a protocol error.
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
        // ones will not until some are deleted (waiting frees nothing), so
        // this is a size refusal.
        StoreError::TooManyKeys { max } => {
            CommandError::new(ErrorCode::PayloadTooLarge, e.to_string())
                .with_details(json!({ "maxKvKeysPerRun": max }))
        }
        StoreError::ReplyTooLarge { max } => {
            CommandError::new(ErrorCode::PayloadTooLarge, e.to_string())
                .with_details(json!({ "maxReplyBytes": max }))
        }
        StoreError::QuotaExceeded(q) => quota_exceeded(q),
        // Another gateway got there first: it moved the session on to a
        // newer epoch, or (no epoch) holds a live session of the run.
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

/// `QUOTA_EXCEEDED` for a write the store refused. Runs come back by
/// themselves as tombstones are forgotten, so that one is worth retrying
/// unchanged; bytes come back only when the tenant deletes or ends
/// something.
fn quota_exceeded(q: QuotaExceeded) -> CommandError {
    let advice = match q.meter {
        Meter::Runs => "; retry once a session of the tenant's ends and its tombstone is forgotten",
        Meter::KvBytes => "; delete keys (kv.delete) or finish runs to free room",
        Meter::CheckpointBytes => "; replace checkpoints by id or finish runs to free room",
    };
    CommandError::new(ErrorCode::QuotaExceeded, format!("{q}{advice}"))
        .retryable(q.meter == Meter::Runs)
        .with_details(json!({
            "quota": q.meter.as_str(),
            "used": q.used,
            "requested": q.requested,
            "limit": q.limit,
        }))
}

/// `FORBIDDEN`: the token does not cover `run`.
pub(crate) fn forbidden_run(run: &RunId) -> CommandError {
    CommandError::forbidden(format!("the token does not cover run {run}"))
        .with_details(json!({ "runId": run }))
}

/// `RATE_LIMITED`, retryable: `who` (a socket, a token's listings) spent
/// its command budget and finds a token again in `wait`.
pub(crate) fn command_budget_spent(limits: &Limits, who: &str, wait: Duration) -> CommandError {
    // Rounded up, so a client that waits exactly this long finds a token.
    let retry_after_ms = wait.as_micros().div_ceil(1000) as u64;
    CommandError::new(
        ErrorCode::RateLimited,
        format!(
            "{who} more than {} times per second (bursts of {}); retry in {retry_after_ms} ms",
            limits.max_commands_per_sec, limits.command_burst
        ),
    )
    .retryable(true)
    .with_details(json!({
        "retryAfterMs": retry_after_ms,
        "maxCommandsPerSec": limits.max_commands_per_sec,
        "commandBurst": limits.command_burst,
    }))
}

/// The status an HTTP route answers a protocol error with. The body is the
/// same error as on a WebSocket; the status only sorts it for HTTP clients
/// and proxies: the caller's fault (4xx) or the gateway's, try again (503).
/// Refusals before a route runs choose their own (405 for a wrong method,
/// 503 for a gateway holding its maximum of connections).
pub(crate) fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadFrame
        | ErrorCode::UnknownType
        | ErrorCode::InvalidPayload
        | ErrorCode::UnsupportedProtocol => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        // The tenant may not hold more: like a refused permission, not a
        // busy gateway (no HTTP route writes a run's data today).
        ErrorCode::Forbidden | ErrorCode::QuotaExceeded => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        // The run's or session's state refuses it, not the request itself.
        ErrorCode::NotAttached
        | ErrorCode::StaleEpoch
        | ErrorCode::SessionExpired
        | ErrorCode::Conflict
        | ErrorCode::RunEnded => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Draining | ErrorCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_status_and_retryable_ones_say_come_back() {
        for code in ErrorCode::ALL {
            let status = http_status(code);
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{code}"
            );
            // A status that tells a client to come back later belongs to a
            // code that says retrying may help, and the other way round.
            let later = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
            assert_eq!(later, code.retryable(), "{code}");
        }
    }

    #[test]
    fn a_recover_refusal_names_its_sub_run() {
        let run = RunId::new("sub-1").unwrap();
        let e = recover_error(RecoverError {
            run_id: Some(run),
            error: SessionError::NotAttached,
        });
        assert_eq!(e.code, ErrorCode::NotAttached);
        assert!(e.message.starts_with("sub-run sub-1: "), "{}", e.message);
        assert_eq!(e.details, Some(json!({ "runId": "sub-1" })));
    }
}
