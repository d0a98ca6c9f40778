//! `runtime.finish`: a run's end.
//!
//! Owns the order of an end: the run's stream first (durably, after every
//! event before it), then its session, and for a main run its open
//! sub-runs (their streams end `cancelled`, "main run finished"), then the
//! KV and checkpoints of every run it ended, before the reply; and the
//! answer to a finish asked again, from the run's end marker, whichever
//! socket asks (same outcome: the same reply, once the run's data is gone;
//! another: `CONFLICT`). Must not push `session.expired`
//! (an ended session is not an expired one) nor build `stream.ended` (the
//! stream engine does, once per stream).

use std::collections::BTreeSet;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::access::session_for;
use super::{ConnCtx, Reply};
use crate::gateway::errors::{forbidden_run, store_error, stream_error_of};
use crate::gateway::state::Shared;
use crate::ids::{RunId, RunOutcome, SessionId};
use crate::protocol::commands::{RuntimeFinishCommand, RuntimeFinishResponse};
use crate::protocol::{CommandError, CommandKind, encode_reply};
use crate::stream::{EndRequest, RunEnd, StreamError};
use crate::time::Timestamp;

/// `runtime.finish`.
pub(crate) fn finish(
    ctx: &ConnCtx,
    id: &str,
    req: RuntimeFinishCommand,
) -> Result<Reply, CommandError> {
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
        // Asked again: the same answer, once the first end is durable
        // (and the run's data gone, which a first finish cut short by a
        // crash or a store failure may not have seen through).
        let pending = shared.streams.finish(&run, end, Instant::now());
        return Ok(Reply::Later(
            async move {
                let ended = pending.await.map_err(|e| stream_error_of(&run, e))?;
                delete_run_data(&shared, [run]).await?;
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
            let runs = end_sessions(&shared, &session.session_id).await?;
            delete_run_data(&shared, std::iter::once(run).chain(runs)).await?;
            Ok(encode_reply(&id, &finished(&ended)))
        }
        .boxed(),
    ))
}

/// Deletes the KV and checkpoints of runs that ended: nothing can read them
/// any more, and their bytes go back to their owners' quotas.
async fn delete_run_data(
    shared: &Shared,
    runs: impl IntoIterator<Item = RunId>,
) -> Result<(), CommandError> {
    let runs: BTreeSet<RunId> = runs.into_iter().collect();
    // All submitted before any is awaited: one store round each, queued.
    let deletes: Vec<_> = runs
        .iter()
        .map(|run| shared.store.run_data_delete(run))
        .collect();
    for deleted in deletes {
        deleted.await.map_err(store_error)?;
    }
    Ok(())
}

fn finished(end: &RunEnd) -> RuntimeFinishResponse {
    RuntimeFinishResponse {
        accepted: true,
        next_offset: end.next_offset,
    }
}

/// Ends session `id` and, for a main session, its open sub-runs (their
/// streams first, `cancelled`: "main run finished"), then waits until the
/// ends are saved. Nobody is pushed `session.expired`. Answers the runs
/// whose sessions it ended.
async fn end_sessions(shared: &Shared, id: &SessionId) -> Result<Vec<RunId>, CommandError> {
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
    saved.await.map_err(store_error)?;
    Ok(ended.into_iter().map(|e| e.run_id).collect())
}
