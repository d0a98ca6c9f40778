//! Durable state a run keeps between attaches: key-value pairs and
//! checkpoints, plus the session records that let a restarted gateway know
//! its sessions again.
//!
//! Owns the [`Store`] trait, the one seam between the protocol code and a
//! storage engine, plus its implementations: [`embedded`] (redb on disk, the
//! default) and [`memory`] (for tests and `--store memory`). A distributed
//! engine is a third implementation; nothing above this module changes.
//! Must not know about capabilities checks, leases or frames: callers have
//! already checked that the session may touch `run`, and a
//! [`SessionRecord`] is kept as given, never interpreted.
//!
//! Ordering contract: each method *submits* its operation before it returns
//! the future, so operations called one after another take effect in that
//! order even if their futures are awaited concurrently or not at all. The
//! dispatcher relies on this to apply one socket's commands in the order they
//! arrived while answering them in any order.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{Capability, OpaqueId, RunId, SessionId};
use crate::time::Timestamp;

pub mod embedded;
pub mod memory;
pub(crate) mod records;
pub mod redis;

/// A store operation in flight; already ordered (see the module docs).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (disk full, I/O error, engine gone). Nothing was
    /// written; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Data on disk is not what this version can read.
    #[error("storage corrupt or incompatible: {0}")]
    Corrupt(String),
    /// A KV write would give the run more than `max` keys. Nothing was
    /// written.
    #[error("the run's KV would hold more than {max} keys; nothing was written")]
    TooManyKeys { max: usize },
    /// A read found more than `max` bytes of keys and values: it is
    /// refused whole rather than held (ask for fewer keys at a time).
    #[error(
        "the keys and values asked for add up to more than {max} bytes; ask for fewer keys at a time"
    )]
    ReplyTooLarge { max: usize },
    /// Only from a store several gateways share: these sessions are held by
    /// another gateway (a newer epoch, or a live session of the same run),
    /// so their changes were not applied. Every other change was.
    /// Each with the epoch it is held at there, or `None` for a session
    /// the store never had whose run has another live session.
    #[error("{} session(s) are held by another gateway", sessions.len())]
    Fenced {
        sessions: Vec<(SessionId, Option<u64>)>,
    },
}

/// One saved checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub id: String,
    pub saved_at: Timestamp,
    /// The checkpoint's JSON, exactly as the runtime sent it.
    pub data: Box<RawValue>,
}

/// One session as the store keeps it: what a restarted gateway needs to
/// accept the session's reconnect and to keep fencing stale epochs.
/// Times are wall-clock milliseconds, the only clock the next process shares
/// with this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionRecord {
    pub session_id: SessionId,
    pub run_id: RunId,
    pub runtime_instance_id: OpaqueId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<OpaqueId>,
    pub epoch: u64,
    pub capabilities: Vec<Capability>,
    /// The main session of a sub-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SessionId>,
    /// The lease ran out; the record is a tombstone.
    pub expired: bool,
    /// Bound to a socket when saved (what another gateway's `runs.list`
    /// shows for it); a restarted gateway restores every session detached.
    #[serde(default)]
    pub attached: bool,
    /// The lease deadline, or for a tombstone the moment it is forgotten.
    pub deadline_unix_ms: u64,
    /// A viewer's `run.cancel` not yet seen through: pushed to the runtime
    /// on every reattach or recovery until the run ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_cancel: Option<PendingCancel>,
}

/// A stop a viewer asked for (`run.cancel`), kept with the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingCancel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub requested_at_unix_ms: u64,
}

/// One change to the stored sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// Insert or replace the record with this session id.
    Put(SessionRecord),
    /// Forget this session (absent already is fine).
    Delete(SessionId),
}

pub trait Store: Send + Sync + 'static {
    /// The values of those `keys` that exist for `run` (absent keys are
    /// simply not in the map).
    fn kv_get(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<BTreeMap<String, String>> {
        self.kv_get_within(run, keys, usize::MAX)
    }

    /// [`Store::kv_get`], refused with [`StoreError::ReplyTooLarge`] once
    /// the keys and values found add up to more than `max_bytes`: the
    /// engine stops reading there, so one request never makes it hold more.
    fn kv_get_within(
        &self,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> StoreFuture<BTreeMap<String, String>>;

    /// Writes all pairs for `run` atomically: all or none.
    fn kv_set(&self, run: &RunId, pairs: BTreeMap<String, String>) -> StoreFuture<()> {
        self.kv_set_within(run, pairs, usize::MAX)
    }

    /// [`Store::kv_set`], refused with [`StoreError::TooManyKeys`] (and
    /// nothing written) if afterwards `run` would have more than
    /// `max_keys` keys. Overwriting existing keys never counts against it.
    /// The count is taken where the write is applied, so concurrent writes
    /// cannot overshoot it together.
    fn kv_set_within(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> StoreFuture<()>;

    /// Saves `checkpoint` for `run` as its latest. An existing checkpoint
    /// with the same id is replaced (so a retried save is harmless).
    fn checkpoint_save(&self, run: &RunId, checkpoint: Checkpoint) -> StoreFuture<()>;

    /// The checkpoint named `id`, or the latest saved when `id` is `None`;
    /// `Ok(None)` when there is no such checkpoint.
    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>>;

    /// Applies `changes` in order, all or none; a store several gateways
    /// share leaves out the changes of sessions another gateway holds and
    /// says which ([`StoreError::Fenced`]).
    fn sessions_save(&self, changes: Vec<SessionChange>) -> StoreFuture<()>;

    /// The session records this gateway holds, in no particular order: all
    /// of them for a store of its own.
    fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>>;

    /// Completes once everything submitted before it is durable.
    fn flush(&self) -> StoreFuture<()>;

    /// The cross-gateway side of sessions, for a store several gateways
    /// share at once; `None` for a store of one gateway's own.
    fn shared_sessions(&self) -> Option<&dyn SharedSessions> {
        None
    }
}

/// Sessions in a store that several gateways share (Redis). Each session is
/// *held* by one gateway: the one that attached it last, at its epoch. The
/// store fences the others' writes ([`StoreError::Fenced`]), tells every
/// gateway when a session moves ([`SharedSessions::moves`]), and hands the
/// sessions of a gateway that stopped answering to one that does
/// ([`SharedSessions::keep_alive`]), so every lease is run by exactly one
/// gateway.
pub trait SharedSessions: Send + Sync {
    /// The record of `run`'s session, if the store has one, and whether
    /// this gateway holds it. Read before a runtime attaches or reconnects,
    /// so a session held elsewhere is known here.
    fn session_of_run(&self, run: &RunId) -> StoreFuture<Option<(SessionRecord, bool)>>;

    /// Says this gateway is alive, and takes over the sessions of gateways
    /// that stopped saying so: returns their records, now held here. Call
    /// about once a second ([`crate::session::RENEWALS_SAVED_EVERY`]).
    fn keep_alive(&self) -> StoreFuture<Vec<SessionRecord>>;

    /// The records of the sub-runs of main session `parent`, each with
    /// whether this gateway holds it: what `recoverConnections` without
    /// `subRunIds` moves.
    fn sub_sessions(&self, parent: &SessionId) -> StoreFuture<Vec<(SessionRecord, bool)>>;

    /// The records of these runs' sessions (`None` where a run has none),
    /// in the order asked: what `runs.list` shows for runs held elsewhere.
    fn sessions_of_runs(&self, runs: Vec<RunId>) -> StoreFuture<Vec<Option<SessionRecord>>>;

    /// Sessions another gateway took over, as they happen. Called once;
    /// `None` after the first call.
    fn moves(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<SessionMoved>>;

    /// Tells the gateway holding `session_id` that a viewer asked its run
    /// to stop (announced beside the moves, to every gateway); that one
    /// keeps it with the session and pushes it. Completes once announced.
    fn announce_cancel(&self, session_id: &SessionId, cancel: &PendingCancel) -> StoreFuture<()> {
        let _ = (session_id, cancel);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Cancels other gateways announced, as they arrive. Called once;
    /// `None` after the first call (and for a store that has none).
    fn cancels(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<(SessionId, PendingCancel)>> {
        None
    }
}

/// Another gateway now holds `session_id`, at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMoved {
    pub session_id: SessionId,
    pub epoch: u64,
}

/// Behavior every [`Store`] must show, written once and run against each
/// implementation through [`conformance_tests!`], so the in-memory store
/// cannot drift from the embedded one.
#[cfg(test)]
pub(crate) mod conformance {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use serde_json::value::RawValue;

    use super::{Checkpoint, SessionChange, SessionRecord, Store};
    use crate::ids::{Capability, OpaqueId, RunId, SessionId};
    use crate::time::Timestamp;

    /// Expands to one `#[tokio::test]` per conformance check. `$make` is a
    /// async function returning `Some((Arc<dyn Store>, guard))`; the guard (a temp
    /// dir, a server) lives until the check ends.
    macro_rules! conformance_tests {
        ($make:path) => {
            $crate::store::conformance::conformance_tests!(@each $make, [
                kv_roundtrip_omits_absent_keys,
                kv_set_overwrites_and_keeps_other_keys,
                kv_set_is_atomic_over_many_keys,
                kv_is_scoped_per_run,
                kv_key_count_is_bounded_per_run,
                kv_reads_are_bounded_in_bytes,
                checkpoint_latest_and_named,
                checkpoint_replace_same_id_becomes_latest,
                checkpoint_preserves_data_and_time,
                checkpoints_are_scoped_per_run,
                ops_apply_in_submission_order,
                dropped_futures_still_apply,
                sessions_put_replace_delete,
                sessions_apply_in_order_within_and_across_calls,
                many_concurrent_ops_all_succeed,
            ]);
        };
        (@each $make:path, [$($name:ident),* $(,)?]) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    // `None`: the engine is not available here (and the
                    // maker said so loudly).
                    let Some((store, _guard)) = $make().await else { return };
                    $crate::store::conformance::$name(store).await;
                }
            )*
        };
    }
    pub(crate) use conformance_tests;

    fn run(s: &str) -> RunId {
        RunId::new(s).unwrap()
    }

    fn pairs(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keys(items: &[&str]) -> Vec<String> {
        items.iter().map(|k| k.to_string()).collect()
    }

    pub(crate) fn checkpoint(id: &str, millis: u64, json: &str) -> Checkpoint {
        Checkpoint {
            id: id.to_string(),
            saved_at: Timestamp::from_unix_millis(millis),
            data: RawValue::from_string(json.to_string()).unwrap(),
        }
    }

    pub(crate) async fn kv_roundtrip_omits_absent_keys(store: Arc<dyn Store>) {
        let r = run("run-1");
        assert!(store.kv_get(&r, keys(&["a"])).await.unwrap().is_empty());
        store
            .kv_set(&r, pairs(&[("a", "1"), ("b", "two"), ("", "empty key")]))
            .await
            .unwrap();
        let got = store
            .kv_get(&r, keys(&["a", "missing", "b", ""]))
            .await
            .unwrap();
        assert_eq!(got, pairs(&[("a", "1"), ("b", "two"), ("", "empty key")]));
        assert!(store.kv_get(&r, vec![]).await.unwrap().is_empty());
        store.kv_set(&r, BTreeMap::new()).await.unwrap();
    }

    pub(crate) async fn kv_set_overwrites_and_keeps_other_keys(store: Arc<dyn Store>) {
        let r = run("run-1");
        store
            .kv_set(&r, pairs(&[("a", "1"), ("b", "2")]))
            .await
            .unwrap();
        store
            .kv_set(&r, pairs(&[("b", "3"), ("c", "4")]))
            .await
            .unwrap();
        let got = store.kv_get(&r, keys(&["a", "b", "c"])).await.unwrap();
        assert_eq!(got, pairs(&[("a", "1"), ("b", "3"), ("c", "4")]));
    }

    /// A reader racing a writer that rewrites 200 keys at once must never
    /// see two generations mixed.
    pub(crate) async fn kv_set_is_atomic_over_many_keys(store: Arc<dyn Store>) {
        const KEYS: usize = 200;
        const GENERATIONS: usize = 30;
        let r = run("run-atomic");
        let all_keys: Vec<String> = (0..KEYS).map(|i| format!("k{i:03}")).collect();

        let writer = {
            let (store, r, all_keys) = (store.clone(), r.clone(), all_keys.clone());
            tokio::spawn(async move {
                for g in 1..=GENERATIONS {
                    let batch = all_keys
                        .iter()
                        .map(|k| (k.clone(), format!("gen{g}")))
                        .collect();
                    store.kv_set(&r, batch).await.unwrap();
                }
            })
        };
        let reader = {
            let (store, r, all_keys) = (store.clone(), r.clone(), all_keys.clone());
            tokio::spawn(async move {
                let mut seen = 0;
                loop {
                    let got = store.kv_get(&r, all_keys.clone()).await.unwrap();
                    if got.is_empty() {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    assert_eq!(got.len(), KEYS, "saw a partial kv_set");
                    let first = got.values().next().unwrap().clone();
                    assert!(
                        got.values().all(|v| *v == first),
                        "saw two generations mixed"
                    );
                    seen += 1;
                    if first == format!("gen{GENERATIONS}") {
                        return seen;
                    }
                }
            })
        };
        writer.await.unwrap();
        assert!(reader.await.unwrap() >= 1);
    }

    pub(crate) async fn kv_is_scoped_per_run(store: Arc<dyn Store>) {
        let (a, b) = (run("run-a"), run("run-b"));
        store
            .kv_set(&a, pairs(&[("shared", "from a"), ("only-a", "x")]))
            .await
            .unwrap();
        store
            .kv_set(&b, pairs(&[("shared", "from b")]))
            .await
            .unwrap();
        let got_a = store.kv_get(&a, keys(&["shared", "only-a"])).await.unwrap();
        let got_b = store.kv_get(&b, keys(&["shared", "only-a"])).await.unwrap();
        assert_eq!(got_a, pairs(&[("shared", "from a"), ("only-a", "x")]));
        assert_eq!(got_b, pairs(&[("shared", "from b")]));
        // A run id that is a prefix of another must not see its keys.
        let prefix = run("run");
        assert!(
            store
                .kv_get(&prefix, keys(&["shared", "only-a"]))
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub(crate) async fn kv_reads_are_bounded_in_bytes(store: Arc<dyn Store>) {
        let r = run("run-bytes");
        // 100 keys of 2 + 10 bytes each (keys "00".."99"): 1,200 bytes.
        let many: BTreeMap<String, String> = (0..100)
            .map(|i| (format!("{i:02}"), "v".repeat(10)))
            .collect();
        store.kv_set(&r, many.clone()).await.unwrap();
        let all: Vec<String> = many.keys().cloned().collect();
        let got = store.kv_get_within(&r, all.clone(), 1200).await.unwrap();
        assert_eq!(got, many, "exactly the limit is read");
        let err = store.kv_get_within(&r, all, 1199).await.unwrap_err();
        assert!(
            matches!(err, super::StoreError::ReplyTooLarge { max: 1199 }),
            "{err:?}"
        );
        // Absent keys cost nothing.
        let absent: Vec<String> = (0..1000).map(|i| format!("absent-{i}")).collect();
        assert!(store.kv_get_within(&r, absent, 1).await.unwrap().is_empty());
    }

    pub(crate) async fn kv_key_count_is_bounded_per_run(store: Arc<dyn Store>) {
        let r = run("run-1");
        store
            .kv_set_within(&r, pairs(&[("a", "1"), ("b", "2")]), 3)
            .await
            .unwrap();
        // Two new keys would make four: refused, and nothing of it written.
        let err = store
            .kv_set_within(&r, pairs(&[("a", "changed"), ("c", "3"), ("d", "4")]), 3)
            .await
            .unwrap_err();
        assert!(
            matches!(err, super::StoreError::TooManyKeys { max: 3 }),
            "{err:?}"
        );
        let got = store.kv_get(&r, keys(&["a", "c", "d"])).await.unwrap();
        assert_eq!(got, pairs(&[("a", "1")]));
        // Overwrites and the last free key fit; then the run is full.
        store
            .kv_set_within(&r, pairs(&[("a", "x"), ("b", "y"), ("c", "z")]), 3)
            .await
            .unwrap();
        store
            .kv_set_within(&r, pairs(&[("c", "again")]), 3)
            .await
            .unwrap();
        assert!(
            store
                .kv_set_within(&r, pairs(&[("d", "4")]), 3)
                .await
                .is_err()
        );
        // Another run has its own count.
        store
            .kv_set_within(&run("run-2"), pairs(&[("d", "4")]), 3)
            .await
            .unwrap();
    }

    pub(crate) async fn checkpoint_latest_and_named(store: Arc<dyn Store>) {
        let r = run("run-1");
        assert!(store.checkpoint_load(&r, None).await.unwrap().is_none());

        store
            .checkpoint_save(&r, checkpoint("cp-1", 1_000, r#"{"step":1}"#))
            .await
            .unwrap();
        let latest = store.checkpoint_load(&r, None).await.unwrap().unwrap();
        assert_eq!(latest.id, "cp-1");
        assert_eq!(latest.data.get(), r#"{"step":1}"#);

        store
            .checkpoint_save(&r, checkpoint("cp-2", 2_000, r#"{"step":2}"#))
            .await
            .unwrap();
        let latest = store.checkpoint_load(&r, None).await.unwrap().unwrap();
        assert_eq!(latest.id, "cp-2");
        assert_eq!(latest.data.get(), r#"{"step":2}"#);

        let named = store
            .checkpoint_load(&r, Some("cp-1".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(named.id, "cp-1");
        assert_eq!(named.data.get(), r#"{"step":1}"#);
        assert!(
            store
                .checkpoint_load(&r, Some("cp-3".into()))
                .await
                .unwrap()
                .is_none()
        );
    }

    pub(crate) async fn checkpoint_replace_same_id_becomes_latest(store: Arc<dyn Store>) {
        let r = run("run-1");
        store
            .checkpoint_save(&r, checkpoint("cp-1", 1_000, r#"{"v":"old"}"#))
            .await
            .unwrap();
        store
            .checkpoint_save(&r, checkpoint("cp-2", 2_000, r#"{"v":"two"}"#))
            .await
            .unwrap();
        store
            .checkpoint_save(&r, checkpoint("cp-1", 3_000, r#"{"v":"new"}"#))
            .await
            .unwrap();

        let latest = store.checkpoint_load(&r, None).await.unwrap().unwrap();
        assert_eq!(latest.id, "cp-1");
        assert_eq!(latest.data.get(), r#"{"v":"new"}"#);
        assert_eq!(latest.saved_at, Timestamp::from_unix_millis(3_000));
        let named = store
            .checkpoint_load(&r, Some("cp-1".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(named.data.get(), r#"{"v":"new"}"#);
        let other = store
            .checkpoint_load(&r, Some("cp-2".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(other.data.get(), r#"{"v":"two"}"#);
    }

    /// The JSON comes back byte for byte (whitespace, key order, escapes)
    /// and the time to the millisecond.
    pub(crate) async fn checkpoint_preserves_data_and_time(store: Arc<dyn Store>) {
        let r = run("run-1");
        let json = "{ \"z\": [1, 2.50, null],\n  \"a\": \"\\u00e9\\\"\", \"é\": {} }";
        let saved_at = 1_764_064_800_123;
        store
            .checkpoint_save(&r, checkpoint("cp/with spaces", saved_at, json))
            .await
            .unwrap();
        let got = store
            .checkpoint_load(&r, Some("cp/with spaces".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.id, "cp/with spaces");
        assert_eq!(got.data.get(), json);
        assert_eq!(got.saved_at, Timestamp::from_unix_millis(saved_at));
        assert_eq!(got.saved_at.unix_millis(), saved_at);
    }

    pub(crate) async fn checkpoints_are_scoped_per_run(store: Arc<dyn Store>) {
        let (a, b) = (run("run-a"), run("run-b"));
        store
            .checkpoint_save(&a, checkpoint("cp", 1_000, r#""a""#))
            .await
            .unwrap();
        assert!(store.checkpoint_load(&b, None).await.unwrap().is_none());
        assert!(
            store
                .checkpoint_load(&b, Some("cp".into()))
                .await
                .unwrap()
                .is_none()
        );
        store
            .checkpoint_save(&b, checkpoint("cp", 2_000, r#""b""#))
            .await
            .unwrap();
        let got_a = store.checkpoint_load(&a, None).await.unwrap().unwrap();
        let got_b = store.checkpoint_load(&b, None).await.unwrap().unwrap();
        assert_eq!(got_a.data.get(), r#""a""#);
        assert_eq!(got_b.data.get(), r#""b""#);
    }

    /// Futures awaited in the reverse of the order their calls were made
    /// still see each other's effects in call order.
    pub(crate) async fn ops_apply_in_submission_order(store: Arc<dyn Store>) {
        let r = run("run-1");
        let set1 = store.kv_set(&r, pairs(&[("k", "1")]));
        let get1 = store.kv_get(&r, keys(&["k"]));
        let set2 = store.kv_set(&r, pairs(&[("k", "2")]));
        let get2 = store.kv_get(&r, keys(&["k"]));
        let save = store.checkpoint_save(&r, checkpoint("cp", 1_000, "[]"));
        let load = store.checkpoint_load(&r, None);
        let flush = store.flush();

        assert_eq!(get2.await.unwrap(), pairs(&[("k", "2")]));
        assert_eq!(get1.await.unwrap(), pairs(&[("k", "1")]));
        assert_eq!(load.await.unwrap().unwrap().id, "cp");
        flush.await.unwrap();
        let (a, b, c) = tokio::join!(set2, set1, save);
        a.unwrap();
        b.unwrap();
        c.unwrap();
    }

    pub(crate) fn session(run_name: &str, epoch: u64) -> SessionRecord {
        SessionRecord {
            session_id: SessionId::generate(),
            run_id: run(run_name),
            runtime_instance_id: OpaqueId::new("worker-1").unwrap(),
            attempt_id: Some(OpaqueId::new("attempt-7").unwrap()),
            epoch,
            capabilities: vec![Capability::KvRead, Capability::KvWrite],
            parent: None,
            expired: false,
            attached: true,
            deadline_unix_ms: 1_764_064_800_123,
            pending_cancel: None,
        }
    }

    fn sorted(mut records: Vec<SessionRecord>) -> Vec<SessionRecord> {
        records.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        records
    }

    pub(crate) async fn sessions_put_replace_delete(store: Arc<dyn Store>) {
        assert!(store.sessions_load().await.unwrap().is_empty());
        let a = session("run-a", 1);
        let mut b = session("run-b", 5);
        b.parent = Some(a.session_id.clone());
        b.attempt_id = None;
        store
            .sessions_save(vec![
                SessionChange::Put(a.clone()),
                SessionChange::Put(b.clone()),
            ])
            .await
            .unwrap();
        assert_eq!(
            sorted(store.sessions_load().await.unwrap()),
            vec![a.clone(), b.clone()]
        );

        let mut a2 = a.clone();
        a2.epoch = 9;
        a2.expired = true;
        store
            .sessions_save(vec![
                SessionChange::Put(a2.clone()),
                SessionChange::Delete(b.session_id.clone()),
                // Forgetting what is not there is not an error.
                SessionChange::Delete(SessionId::generate()),
            ])
            .await
            .unwrap();
        assert_eq!(store.sessions_load().await.unwrap(), vec![a2]);
    }

    pub(crate) async fn sessions_apply_in_order_within_and_across_calls(store: Arc<dyn Store>) {
        let a = session("run-a", 1);
        let mut later = a.clone();
        later.epoch = 2;
        // Within one call: put, delete, put again leaves the last put.
        let first = store.sessions_save(vec![
            SessionChange::Put(a.clone()),
            SessionChange::Delete(a.session_id.clone()),
            SessionChange::Put(a.clone()),
        ]);
        // Across calls: the later call wins even if awaited first.
        let second = store.sessions_save(vec![SessionChange::Put(later.clone())]);
        second.await.unwrap();
        first.await.unwrap();
        assert_eq!(store.sessions_load().await.unwrap(), vec![later]);
    }

    pub(crate) async fn dropped_futures_still_apply(store: Arc<dyn Store>) {
        let r = run("run-1");
        drop(store.kv_set(&r, pairs(&[("k", "v")])));
        drop(store.checkpoint_save(&r, checkpoint("cp", 1_000, "true")));
        drop(store.flush());
        assert_eq!(
            store.kv_get(&r, keys(&["k"])).await.unwrap(),
            pairs(&[("k", "v")])
        );
        assert_eq!(
            store
                .checkpoint_load(&r, None)
                .await
                .unwrap()
                .unwrap()
                .data
                .get(),
            "true"
        );
    }

    /// 20 tasks × 25 writes, all in flight at once, then every value read
    /// back.
    pub(crate) async fn many_concurrent_ops_all_succeed(store: Arc<dyn Store>) {
        const TASKS: usize = 20;
        const PER_TASK: usize = 25;
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let r = run(&format!("run-{}", t % 4));
                let futures: Vec<_> = (0..PER_TASK)
                    .map(|i| {
                        store.kv_set(&r, pairs(&[(&format!("t{t}-k{i}"), &format!("v{t}-{i}"))]))
                    })
                    .collect();
                for f in futures {
                    f.await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        store.flush().await.unwrap();
        for t in 0..TASKS {
            let r = run(&format!("run-{}", t % 4));
            let wanted: Vec<String> = (0..PER_TASK).map(|i| format!("t{t}-k{i}")).collect();
            let got = store.kv_get(&r, wanted).await.unwrap();
            assert_eq!(got.len(), PER_TASK, "task {t} lost writes");
            for i in 0..PER_TASK {
                assert_eq!(got[&format!("t{t}-k{i}")], format!("v{t}-{i}"));
            }
        }
    }
}
