//! `runtime.finish`: a run's end.
//!
//! Owns the order of an end: the run's stream first (durably, after every
//! event before it), then its session, and for a main run its open
//! sub-runs (their streams end `cancelled`, "main run finished"), then the
//! KV and checkpoints of every run it ended, before the reply; and the
//! answer to a finish asked again, from the run's end marker, whichever
//! socket asks (same outcome: the same reply, once what the first one left
//! undone is done; another: `CONFLICT`). Must not push `session.expired`
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
        // Asked again: the same answer, once the first end is durable and
        // what the first finish may have left undone is done: a crash or a
        // store failure after the stream's end can cut it short before the
        // session ended, before that was saved, or before the run's data
        // was deleted.
        let pending = shared.streams.finish(&run, end, Instant::now());
        let session_id = req.session_id;
        return Ok(Reply::Later(
            async move {
                let ended = pending.await.map_err(|e| stream_error_of(&run, e))?;
                // Only a session of this run: the token covers the run, not
                // whatever session id the request names.
                let named = shared
                    .sessions
                    .with(|r| r.run_of(&session_id) == Some(&run));
                let runs = if named {
                    end_sessions(&shared, &session_id, Again::Yes).await?
                } else {
                    Vec::new()
                };
                delete_run_data(&shared, std::iter::once(run).chain(runs)).await?;
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
            let runs = end_sessions(&shared, &session.session_id, Again::No).await?;
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

/// Whether a finish is asked again of a run whose stream already ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Again {
    No,
    Yes,
}

/// Ends session `id` and, for a main session, its open sub-runs (their
/// streams first, `cancelled`: "main run finished"), then waits until the
/// ends are saved. Nobody is pushed `session.expired`. Asked `again`, a
/// session already ended here has its end saved again (the first save may
/// have failed). Answers the runs whose sessions it ended now.
async fn end_sessions(
    shared: &Shared,
    id: &SessionId,
    again: Again,
) -> Result<Vec<RunId>, CommandError> {
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
    let (ended, saved) = shared.sessions.with_new_deadline(|r| {
        let ended = r.end(id, now);
        if ended.is_empty() && again == Again::Yes {
            r.save_ended_again(id);
        }
        ended
    });
    for e in &ended {
        tracing::debug!(run = %e.run_id, "run finished; session ended");
        shared.streams.session_ended(&e.run_id, now);
    }
    saved.await.map_err(store_error)?;
    Ok(ended.into_iter().map(|e| e.run_id).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use serde_json::{Value, json};

    use crate::gateway::fuzzing::{Harness, Side};
    use crate::ids::RunId;
    use crate::store::memory::MemoryStore;
    use crate::store::{
        Charge, Checkpoint, SessionChange, SessionRecord, Store, StoreError, StoreFuture, Usage,
    };

    /// The memory store, whose session saves fail while `failing` is set.
    #[derive(Debug, Default)]
    struct SessionSavesFail {
        inner: MemoryStore,
        failing: AtomicBool,
    }

    impl Store for SessionSavesFail {
        fn kv_get_within(
            &self,
            run: &RunId,
            keys: Vec<String>,
            max_bytes: usize,
        ) -> StoreFuture<BTreeMap<String, String>> {
            self.inner.kv_get_within(run, keys, max_bytes)
        }
        fn kv_set_charged(
            &self,
            run: &RunId,
            pairs: BTreeMap<String, String>,
            max_keys: usize,
            charge: Charge,
        ) -> StoreFuture<()> {
            self.inner.kv_set_charged(run, pairs, max_keys, charge)
        }
        fn kv_delete(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<u64> {
            self.inner.kv_delete(run, keys)
        }
        fn checkpoint_save_charged(
            &self,
            run: &RunId,
            checkpoint: Checkpoint,
            charge: Charge,
        ) -> StoreFuture<()> {
            self.inner.checkpoint_save_charged(run, checkpoint, charge)
        }
        fn checkpoint_load(
            &self,
            run: &RunId,
            id: Option<String>,
        ) -> StoreFuture<Option<Checkpoint>> {
            self.inner.checkpoint_load(run, id)
        }
        fn run_data_delete(&self, run: &RunId) -> StoreFuture<()> {
            self.inner.run_data_delete(run)
        }
        fn quota_usage(&self, tenant: &str) -> StoreFuture<Usage> {
            self.inner.quota_usage(tenant)
        }
        fn sessions_save_within(
            &self,
            changes: Vec<SessionChange>,
            max_runs_per_tenant: u64,
        ) -> StoreFuture<()> {
            if self.failing.load(Ordering::SeqCst) {
                let failed = StoreError::Unavailable("the test's disk is away".into());
                return Box::pin(std::future::ready(Err(failed)));
            }
            self.inner
                .sessions_save_within(changes, max_runs_per_tenant)
        }
        fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>> {
            self.inner.sessions_load()
        }
        fn flush(&self) -> StoreFuture<()> {
            self.inner.flush()
        }
    }

    async fn send(h: &mut Harness, id: &str, kind: &str, payload: Value) -> Value {
        let frame = json!({ "id": id, "type": kind, "payload": payload }).to_string();
        serde_json::from_str(&h.send(Side::Runtime, &frame).await).unwrap()
    }

    async fn attach(h: &mut Harness, run: &str) -> String {
        let reply = send(
            h,
            "a",
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": "inst-1", "protocolVersion": "1",
                    "capabilities": ["kv.read", "kv.write", "subtasks.run"] }),
        )
        .await;
        reply["payload"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{reply}"))
            .to_owned()
    }

    fn finish(session: &str, run: &str) -> Value {
        json!({ "sessionId": session, "runId": run, "outcome": "completed" })
    }

    /// Whether the store holds `run`'s session as ended.
    async fn saved_as_ended(store: &SessionSavesFail, run: &str) -> bool {
        let records = store.inner.sessions_load().await.unwrap();
        let record = records.iter().find(|r| r.run_id.as_str() == run);
        record.unwrap_or_else(|| panic!("{run} saved")).expired
    }

    /// The first finish saved the stream's end, then failed to save the
    /// session's: its retry takes the "already ended" path, and must still
    /// save the session's end (and delete the run's data), for the session
    /// named, if it is a session of that run. (A sub-run's finish, so that
    /// another run's session is on the socket and stays.)
    #[tokio::test]
    async fn a_finish_asked_again_saves_the_session_end_the_first_could_not() {
        let store = Arc::new(SessionSavesFail::default());
        let mut h = Harness::with_store(store.clone());
        let main = attach(&mut h, "fuzz-1").await;
        let sub = attach(&mut h, "fuzz-1.sub").await;
        let set = json!({ "sessionId": sub, "runId": "fuzz-1.sub", "kv": { "k": "v" } });
        assert!(send(&mut h, "s", "kv.set", set).await["error"].is_null());

        store.failing.store(true, Ordering::SeqCst);
        let failed = send(&mut h, "f1", "runtime.finish", finish(&sub, "fuzz-1.sub")).await;
        assert_eq!(failed["error"]["code"], "INTERNAL", "{failed}");
        assert_eq!(failed["error"]["retryable"], true, "{failed}");
        store.failing.store(false, Ordering::SeqCst);
        assert!(!saved_as_ended(&store, "fuzz-1.sub").await);

        // A retry naming another run's session answers the end, and
        // leaves that session alone.
        let wrong = send(&mut h, "f2", "runtime.finish", finish(&main, "fuzz-1.sub")).await;
        assert_eq!(wrong["payload"]["accepted"], true, "{wrong}");
        let get = json!({ "sessionId": main, "runId": "fuzz-1", "keys": ["k"] });
        let read = send(&mut h, "g", "kv.get", get).await;
        assert_eq!(
            read["payload"]["kv"],
            json!({}),
            "the main session is live: {read}"
        );
        assert!(!saved_as_ended(&store, "fuzz-1").await);
        assert!(!saved_as_ended(&store, "fuzz-1.sub").await);

        let retried = send(&mut h, "f3", "runtime.finish", finish(&sub, "fuzz-1.sub")).await;
        assert_eq!(retried["payload"]["accepted"], true, "{retried}");
        assert!(
            saved_as_ended(&store, "fuzz-1.sub").await,
            "the retry saved the end"
        );
        assert!(!saved_as_ended(&store, "fuzz-1").await);
        let run = RunId::new("fuzz-1.sub").unwrap();
        let left = store.inner.kv_get(&run, vec!["k".into()]).await.unwrap();
        assert!(left.is_empty(), "the run's data is gone: {left:?}");
    }
}
