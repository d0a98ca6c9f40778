//! Durable state a run keeps between attaches: key-value pairs and
//! checkpoints, plus the session records that let a restarted gateway know
//! its sessions again, and what each tenant holds of them ([`quota`]).
//!
//! Owns the [`Store`] trait, the one seam between the protocol code and a
//! storage engine, plus its implementations: [`embedded`] (redb on disk, the
//! default) and [`memory`] (for tests and `--store memory`). A distributed
//! engine is a third implementation; nothing above this module changes.
//! Must not know about capabilities checks, leases or frames: callers have
//! already checked that the session may touch `run`, and a
//! [`SessionRecord`] is kept as given, never interpreted (except its
//! tenant, which the store counts).
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
pub use quota::{Charge, Meter, QuotaExceeded, Usage};

pub mod embedded;
pub mod memory;
pub mod quota;
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
    /// The write would take its tenant past a quota. Nothing of it was
    /// written (for a session save: nothing of the fresh session refused).
    #[error(transparent)]
    QuotaExceeded(QuotaExceeded),
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
    /// The tenant whose `runs` quota the record counts against (the
    /// token's that started the session); `None` counts against nobody
    /// (records saved before quotas existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
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
// Not boxed: changes live only in the batch being saved, and most of a
// batch are puts; a box would cost an allocation per saved session to
// spare the few deletes the record's size (its ids are inline).
#[allow(clippy::large_enum_variant)]
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

    /// [`Store::kv_set_charged`] with no quota.
    fn kv_set_within(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> StoreFuture<()> {
        self.kv_set_charged(run, pairs, max_keys, Charge::unlimited())
    }

    /// [`Store::kv_set`], refused with [`StoreError::TooManyKeys`] (and
    /// nothing written) if afterwards `run` would have more than
    /// `max_keys` keys. Overwriting existing keys never counts against it.
    /// Then the write's net growth in [`quota::kv_entry_bytes`] is charged
    /// to the run's owner (`charge`'s tenant becomes it if the run has
    /// none), refused with [`StoreError::QuotaExceeded`] (nothing written)
    /// if it would pass `charge.limit` (see [`quota::admit`]).
    /// Both counts are taken where the write is applied, so concurrent
    /// writes cannot overshoot them together.
    fn kv_set_charged(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        charge: Charge,
    ) -> StoreFuture<()>;

    /// Deletes those of `keys` that `run` has, atomically, giving their
    /// bytes back to the run's owner; answers how many there were.
    fn kv_delete(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<u64>;

    /// Saves `checkpoint` for `run` as its latest. An existing checkpoint
    /// with the same id is replaced (so a retried save is harmless).
    fn checkpoint_save(&self, run: &RunId, checkpoint: Checkpoint) -> StoreFuture<()> {
        self.checkpoint_save_charged(run, checkpoint, Charge::unlimited())
    }

    /// [`Store::checkpoint_save`], its net growth in
    /// [`quota::checkpoint_bytes`] charged to the run's owner as
    /// [`Store::kv_set_charged`] charges KV.
    fn checkpoint_save_charged(
        &self,
        run: &RunId,
        checkpoint: Checkpoint,
        charge: Charge,
    ) -> StoreFuture<()>;

    /// The checkpoint named `id`, or the latest saved when `id` is `None`;
    /// `Ok(None)` when there is no such checkpoint.
    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>>;

    /// Deletes every KV key and checkpoint of `run` (a run that ended),
    /// giving their bytes back to its owner; the run has no owner after.
    fn run_data_delete(&self, run: &RunId) -> StoreFuture<()>;

    /// What `tenant` holds, as the store counts it.
    fn quota_usage(&self, tenant: &str) -> StoreFuture<Usage>;

    /// [`Store::sessions_save_within`] with no limit on runs.
    fn sessions_save(&self, changes: Vec<SessionChange>) -> StoreFuture<()> {
        self.sessions_save_within(changes, u64::MAX)
    }

    /// Applies `changes` in order, atomically; a store several gateways
    /// share leaves out the changes of sessions another gateway holds and
    /// says which ([`StoreError::Fenced`]). A record with a tenant counts
    /// against its `runs` quota from its first `Put` to its `Delete`; a
    /// `Put` of a new session that would give its tenant more than
    /// `max_runs_per_tenant` is left out and reported
    /// ([`StoreError::QuotaExceeded`]) once the other changes are applied
    /// (a store several gateways share reports [`StoreError::Fenced`]
    /// first when both happen).
    fn sessions_save_within(
        &self,
        changes: Vec<SessionChange>,
        max_runs_per_tenant: u64,
    ) -> StoreFuture<()>;

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

    use super::{
        Charge, Checkpoint, Meter, QuotaExceeded, SessionChange, SessionRecord, Store, StoreError,
    };
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
                kv_bytes_are_charged_to_the_runs_owner,
                kv_delete_removes_keys_and_gives_their_bytes_back,
                concurrent_charged_writes_never_overshoot,
                checkpoint_bytes_are_charged_to_the_runs_owner,
                run_data_delete_empties_the_run_and_frees_its_owner,
                sessions_count_against_their_tenants_runs,
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

    fn quota_refusal(result: Result<impl std::fmt::Debug, StoreError>) -> QuotaExceeded {
        match result {
            Err(StoreError::QuotaExceeded(q)) => q,
            other => panic!("expected a quota refusal, got {other:?}"),
        }
    }

    async fn kv_bytes(store: &Arc<dyn Store>, tenant: &str) -> u64 {
        store.quota_usage(tenant).await.unwrap().kv_bytes
    }

    pub(crate) async fn kv_bytes_are_charged_to_the_runs_owner(store: Arc<dyn Store>) {
        let (r, other_run) = (run("run-q"), run("run-q2"));
        let t = Charge::new("sub:t", 20);
        let max = usize::MAX;
        // "a"+"12345" and "b"+"1234": 11 bytes.
        store
            .kv_set_charged(&r, pairs(&[("a", "12345"), ("b", "1234")]), max, t.clone())
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 11);
        // 10 more would make 21: refused whole, nothing of it written.
        let q = quota_refusal(
            store
                .kv_set_charged(
                    &r,
                    pairs(&[("a", "x"), ("c", "1234567890123")]),
                    max,
                    t.clone(),
                )
                .await,
        );
        assert_eq!(
            q,
            QuotaExceeded {
                meter: Meter::KvBytes,
                used: 11,
                requested: 10,
                limit: 20
            },
            "the net growth: c's 14 bytes less a's 4"
        );
        let got = store.kv_get(&r, keys(&["a", "b", "c"])).await.unwrap();
        assert_eq!(got, pairs(&[("a", "12345"), ("b", "1234")]));
        assert_eq!(kv_bytes(&store, "sub:t").await, 11);
        // Exactly the limit fits (another run of the same tenant counts
        // too), then an overwrite as long or shorter always works.
        store
            .kv_set_charged(&other_run, pairs(&[("d", "12345678")]), max, t.clone())
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 20);
        store
            .kv_set_charged(&r, pairs(&[("a", "54321"), ("b", "")]), max, t.clone())
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 16);
        store
            .kv_set_charged(&r, BTreeMap::new(), max, t.clone())
            .await
            .unwrap();
        // A lowered limit: growth refused, shrinking still works.
        let lowered = Charge::new("sub:t", 5);
        assert!(
            store
                .kv_set_charged(&r, pairs(&[("b", "x")]), max, lowered.clone())
                .await
                .is_err()
        );
        store
            .kv_set_charged(&r, pairs(&[("a", "1")]), max, lowered)
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 12);
        // Another tenant writing the run is charged nothing: the owner is.
        store
            .kv_set_charged(&r, pairs(&[("e", "12")]), max, Charge::new("sub:u", 100))
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 15);
        assert_eq!(kv_bytes(&store, "sub:u").await, 0);
        // (The limit comes with the charge: one configured for every
        // tenant.)
        assert!(
            store
                .kv_set_charged(
                    &r,
                    pairs(&[("f", "123456")]),
                    max,
                    Charge::new("sub:u", 100)
                )
                .await
                .is_ok()
        );
        assert_eq!(kv_bytes(&store, "sub:t").await, 22);
        // The key count is checked before the quota.
        let err = store
            .kv_set_charged(&r, pairs(&[("g", "")]), 1, Charge::new("sub:t", 0))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TooManyKeys { max: 1 }), "{err:?}");
    }

    pub(crate) async fn kv_delete_removes_keys_and_gives_their_bytes_back(store: Arc<dyn Store>) {
        let r = run("run-del");
        let t = Charge::new("sub:t", 30);
        store
            .kv_set_charged(
                &r,
                pairs(&[("a", "1"), ("bb", "22"), ("c", "333")]),
                usize::MAX,
                t.clone(),
            )
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 2 + 4 + 4);
        let deleted = store
            .kv_delete(&r, keys(&["bb", "missing", "a", "bb"]))
            .await
            .unwrap();
        assert_eq!(deleted, 2, "present keys, each once");
        assert_eq!(
            store.kv_get(&r, keys(&["a", "bb", "c"])).await.unwrap(),
            pairs(&[("c", "333")])
        );
        assert_eq!(kv_bytes(&store, "sub:t").await, 4);
        assert_eq!(store.kv_delete(&r, keys(&["a"])).await.unwrap(), 0);
        assert_eq!(store.kv_delete(&r, vec![]).await.unwrap(), 0);
        assert_eq!(
            store
                .kv_delete(&run("nothing"), keys(&["a"]))
                .await
                .unwrap(),
            0
        );
        // What was freed can be written again, and the places too.
        store
            .kv_set_charged(&r, pairs(&[("d", &"x".repeat(25))]), 2, t.clone())
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:t").await, 30);
    }

    /// Eight tasks racing 1-byte-key writes of 10 bytes at a limit of 200:
    /// exactly 20 land, whatever the interleaving, and the count is what
    /// the data holds.
    pub(crate) async fn concurrent_charged_writes_never_overshoot(store: Arc<dyn Store>) {
        let charge = Charge::new("sub:race", 200);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (store, charge) = (store.clone(), charge.clone());
            tasks.push(tokio::spawn(async move {
                let r = run(&format!("run-race-{}", t % 2));
                let writes: Vec<_> = (0..10)
                    .map(|i| {
                        let k = format!("t{t}-{i}");
                        let v = "v".repeat(10 - k.len());
                        store.kv_set_charged(&r, pairs(&[(&k, &v)]), usize::MAX, charge.clone())
                    })
                    .collect();
                let mut landed = 0;
                for w in writes {
                    match w.await {
                        Ok(()) => landed += 1,
                        Err(StoreError::QuotaExceeded(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                landed
            }));
        }
        let mut landed = 0;
        for t in tasks {
            landed += t.await.unwrap();
        }
        assert_eq!(landed, 20);
        assert_eq!(kv_bytes(&store, "sub:race").await, 200);
    }

    pub(crate) async fn checkpoint_bytes_are_charged_to_the_runs_owner(store: Arc<dyn Store>) {
        let r = run("run-cpq");
        let t = Charge::new("sub:t", 30);
        let used = |store: Arc<dyn Store>| async move {
            store.quota_usage("sub:t").await.unwrap().checkpoint_bytes
        };
        // "cp-1" + "[1,2,3]": 11 bytes.
        store
            .checkpoint_save_charged(&r, checkpoint("cp-1", 1_000, "[1,2,3]"), t.clone())
            .await
            .unwrap();
        assert_eq!(used(store.clone()).await, 11);
        let q = quota_refusal(
            store
                .checkpoint_save_charged(&r, checkpoint("cp-2", 2_000, &"7".repeat(16)), t.clone())
                .await,
        );
        assert_eq!(
            (q.meter, q.used, q.requested, q.limit),
            (Meter::CheckpointBytes, 11, 20, 30)
        );
        // Nothing saved: the latest is still cp-1.
        assert_eq!(
            store.checkpoint_load(&r, None).await.unwrap().unwrap().id,
            "cp-1"
        );
        assert!(
            store
                .checkpoint_load(&r, Some("cp-2".into()))
                .await
                .unwrap()
                .is_none()
        );
        // Replacing cp-1 is charged the difference; a smaller one frees.
        store
            .checkpoint_save_charged(&r, checkpoint("cp-1", 3_000, &"7".repeat(26)), t.clone())
            .await
            .unwrap();
        assert_eq!(used(store.clone()).await, 30);
        store
            .checkpoint_save_charged(&r, checkpoint("cp-1", 4_000, "1"), t.clone())
            .await
            .unwrap();
        assert_eq!(used(store.clone()).await, 5);
        // KV and checkpoints of one tenant are separate meters.
        assert_eq!(kv_bytes(&store, "sub:t").await, 0);
    }

    pub(crate) async fn run_data_delete_empties_the_run_and_frees_its_owner(store: Arc<dyn Store>) {
        let (r, kept) = (run("run-end"), run("run-end-2"));
        let t = Charge::new("sub:t", 1000);
        store
            .kv_set_charged(&r, pairs(&[("a", "1"), ("b", "2")]), usize::MAX, t.clone())
            .await
            .unwrap();
        store
            .checkpoint_save_charged(&r, checkpoint("cp", 1_000, "true"), t.clone())
            .await
            .unwrap();
        store
            .kv_set_charged(&kept, pairs(&[("a", "1")]), usize::MAX, t.clone())
            .await
            .unwrap();
        store.run_data_delete(&r).await.unwrap();
        assert!(
            store
                .kv_get(&r, keys(&["a", "b"]))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.checkpoint_load(&r, None).await.unwrap().is_none());
        assert!(
            store
                .checkpoint_load(&r, Some("cp".into()))
                .await
                .unwrap()
                .is_none()
        );
        let usage = store.quota_usage("sub:t").await.unwrap();
        assert_eq!((usage.kv_bytes, usage.checkpoint_bytes), (2, 0));
        assert_eq!(
            store.kv_get(&kept, keys(&["a"])).await.unwrap(),
            pairs(&[("a", "1")])
        );
        // Twice is harmless; afterwards the run has no owner: the next
        // writer owns it.
        store.run_data_delete(&r).await.unwrap();
        store
            .kv_set_charged(
                &r,
                pairs(&[("z", "9")]),
                usize::MAX,
                Charge::new("sub:u", 10),
            )
            .await
            .unwrap();
        assert_eq!(kv_bytes(&store, "sub:u").await, 2);
        assert_eq!(kv_bytes(&store, "sub:t").await, 2);
    }

    pub(crate) async fn sessions_count_against_their_tenants_runs(store: Arc<dyn Store>) {
        let of = |run_name: &str, tenant: &str| {
            let mut r = session(run_name, 0);
            r.tenant = Some(tenant.to_owned());
            r
        };
        let runs = |store: Arc<dyn Store>, t: &'static str| async move {
            store.quota_usage(t).await.unwrap().runs
        };
        let (a, b, c) = (
            of("run-a", "sub:t"),
            of("run-b", "sub:t"),
            of("run-c", "sub:t"),
        );
        store
            .sessions_save_within(
                vec![SessionChange::Put(a.clone()), SessionChange::Put(b.clone())],
                2,
            )
            .await
            .unwrap();
        assert_eq!(runs(store.clone(), "sub:t").await, 2);
        // A third is refused; the other changes of the call are applied.
        let mut a2 = a.clone();
        a2.expired = true;
        let q = quota_refusal(
            store
                .sessions_save_within(
                    vec![
                        SessionChange::Put(a2.clone()),
                        SessionChange::Put(c.clone()),
                    ],
                    2,
                )
                .await,
        );
        assert_eq!(
            (q.meter, q.used, q.requested, q.limit),
            (Meter::Runs, 2, 1, 2)
        );
        let mut saved = store.sessions_load().await.unwrap();
        saved.sort_by(|x, y| x.run_id.cmp(&y.run_id));
        assert_eq!(saved, vec![a2.clone(), b.clone()]);
        // Saving a known session again (a renewal, a tombstone) counts
        // nothing; another tenant and records without one are apart.
        store
            .sessions_save_within(
                vec![
                    SessionChange::Put(b.clone()),
                    SessionChange::Put(of("run-d", "sub:u")),
                    SessionChange::Put(session("run-e", 0)),
                ],
                2,
            )
            .await
            .unwrap();
        assert_eq!(runs(store.clone(), "sub:t").await, 2);
        assert_eq!(runs(store.clone(), "sub:u").await, 1);
        // Deleting gives the place back (a delete before a put in one
        // call makes room for it).
        store
            .sessions_save_within(
                vec![
                    SessionChange::Delete(a.session_id.clone()),
                    SessionChange::Put(c.clone()),
                ],
                2,
            )
            .await
            .unwrap();
        assert_eq!(runs(store.clone(), "sub:t").await, 2);
        store
            .sessions_save_within(vec![SessionChange::Delete(b.session_id.clone())], 2)
            .await
            .unwrap();
        assert_eq!(runs(store.clone(), "sub:t").await, 1);
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
            tenant: None,
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
