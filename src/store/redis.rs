//! A store on Redis, so several gateways share one state
//! (`--store redis://HOST:PORT/DB`).
//!
//! Owns [`RedisStore`] and the one task that talks to Redis for a store,
//! and wires the parts into [`Store`] and [`SharedSessions`]; each part is
//! a module of its own, with the Lua scripts it runs beside it:
//!
//! - `kv`: a run's KV pairs, within the caller's limits;
//! - `checkpoints`: a run's checkpoints and its latest;
//! - `quota`: what each tenant holds, and the end of a run's data;
//! - `sessions`: session records, and the fence that gives each session
//!   one holder among the gateways;
//! - `membership`: this gateway's node id, its keep-alive, and the takeover
//!   of a silent gateway's sessions;
//! - `session_moves`: the channel that carries takeovers and cancels
//!   between gateways.
//!
//! The key layout is [`crate::redis::keys`]'s, the connection is opened by
//! [`crate::redis::conn`], the same way as the stream engine's.
//!
//! Every [`Store`] call becomes an `Op` sent down a channel before the method
//! returns, and the task runs them one after another, so submission order
//! is execution order (the ordering contract in [`super`]); each op is one
//! round trip and atomic on the server (one command, `MULTI`/`EXEC`, or a
//! small Lua script). An `Ok` means Redis applied the op; how durable that is, is
//! Redis's own persistence setting (`appendonly yes` with `appendfsync
//! everysec` or `always`).
//! Must not retry on its own: Redis being away is a retryable
//! [`StoreError::Unavailable`] for the caller, and redis's connection
//! manager reconnects by itself for the next op. Must not hold the logic
//! of a part: this module only routes ops to them.
//!
//! # Sessions shared between gateways
//!
//! Each gateway (node) has a random id for the life of its process. A
//! session is *held* by the node that saved it last; a node's write of a
//! session another node holds at the same or a newer epoch is refused, and
//! so is a fresh session for a run that has a live one
//! ([`StoreError::Fenced`]). A save that moves a session to a newer epoch
//! on another node publishes the move, so the old node fences its socket
//! at once. Every node says it is alive once a second; the sessions of a
//! node silent for longer than [`NODE_SILENT_AFTER`] go, in one atomic
//! step, to the first live node that notices, which runs their leases from
//! then on: so each lease has exactly one node running it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::RedisError;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::{
    Charge, Checkpoint, PendingCancel, SessionChange, SessionMoved, SessionRecord, SharedSessions,
    Store, StoreError, StoreFuture, Usage,
};
use crate::ids::{RunId, SessionId};
use crate::redis::conn::open;
use crate::redis::keys::Keys;

mod checkpoints;
mod kv;
mod membership;
mod quota;
mod session_moves;
mod sessions;

use checkpoints::Checkpoints;
use kv::Kv;
use membership::Membership;
pub use membership::NODE_SILENT_AFTER;
use quota::Quotas;
use session_moves::{Cancelled, SessionMoves};
use sessions::Sessions;

/// Handle to the store. Clones share one task and one connection.
#[derive(Clone)]
pub struct RedisStore {
    tx: mpsc::UnboundedSender<Op>,
    url: String,
    /// This gateway's node id, random per process.
    node: String,
    #[cfg(test)]
    prefix: String,
    moves: Arc<Mutex<Option<mpsc::UnboundedReceiver<SessionMoved>>>>,
    cancels: Arc<Mutex<Option<mpsc::UnboundedReceiver<Cancelled>>>>,
}

/// Lua numbers are doubles: a limit passed to a script must stay a number
/// it holds exactly ("no limit" included).
const LUA_MAX_LIMIT: u64 = 1 << 50;

/// Where an op's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One op for the store's task, by the part that runs it.
enum Op {
    Kv(kv::Op),
    Checkpoints(checkpoints::Op),
    Quota(quota::Op),
    Sessions(sessions::Op),
    Membership(membership::Op),
    SessionMoves(session_moves::Op),
    /// Answered once every op before it has been answered.
    Flush {
        reply: Reply<()>,
    },
}

impl From<kv::Op> for Op {
    fn from(op: kv::Op) -> Op {
        Op::Kv(op)
    }
}

impl From<checkpoints::Op> for Op {
    fn from(op: checkpoints::Op) -> Op {
        Op::Checkpoints(op)
    }
}

impl From<quota::Op> for Op {
    fn from(op: quota::Op) -> Op {
        Op::Quota(op)
    }
}

impl From<sessions::Op> for Op {
    fn from(op: sessions::Op) -> Op {
        Op::Sessions(op)
    }
}

impl From<membership::Op> for Op {
    fn from(op: membership::Op) -> Op {
        Op::Membership(op)
    }
}

impl From<session_moves::Op> for Op {
    fn from(op: session_moves::Op) -> Op {
        Op::SessionMoves(op)
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT/DB`) and checks that Redis
    /// answers, so a wrong address is an error at start, not at the first
    /// command.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::connect_with(url, prefix, NODE_SILENT_AFTER).await
    }

    /// [`RedisStore::connect`], taking over the sessions of gateways silent
    /// for `node_silent_after` (tests shorten it).
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        node_silent_after: Duration,
    ) -> Result<RedisStore, StoreError> {
        let (client, conn) = open(url)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let node = membership::new_node_id();
        let keys = Keys::new(prefix);
        let (moves_tx, moves_rx) = mpsc::unbounded_channel();
        let (cancels_tx, cancels_rx) = mpsc::unbounded_channel();
        tokio::spawn(session_moves::follow(
            client,
            keys.session_moves(),
            node.clone(),
            moves_tx,
            cancels_tx,
        ));
        let worker = Worker {
            conn,
            kv: Kv::new(keys.clone()),
            checkpoints: Checkpoints::new(keys.clone()),
            quotas: Quotas::new(keys.clone()),
            sessions: Sessions::new(keys.clone(), node.clone()),
            membership: Membership::new(keys.clone(), node.clone(), node_silent_after),
            session_moves: SessionMoves::new(keys),
        };
        tokio::spawn(worker.run(rx));
        Ok(RedisStore {
            tx,
            url: url.to_owned(),
            #[cfg(test)]
            prefix: prefix.to_owned(),
            node,
            moves: Arc::new(Mutex::new(Some(moves_rx))),
            cancels: Arc::new(Mutex::new(Some(cancels_rx))),
        })
    }

    /// This gateway's node id (random per process).
    pub fn node(&self) -> &str {
        &self.node
    }

    #[cfg(test)]
    fn keys_prefix_for_tests(&self) -> String {
        self.prefix.clone()
    }

    /// Queues the op `make` builds (so it is ordered now, see the module
    /// docs) and hands back its answer.
    fn submit<T: Send + 'static, O: Into<Op>>(
        &self,
        make: impl FnOnce(Reply<T>) -> O,
    ) -> StoreFuture<T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(make(reply).into());
        Box::pin(async move {
            if sent.is_err() {
                return Err(worker_gone());
            }
            answer.await.unwrap_or_else(|_| Err(worker_gone()))
        })
    }
}

fn worker_gone() -> StoreError {
    StoreError::Unavailable("the Redis store's task has stopped".into())
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("node", &self.node)
            .finish()
    }
}

impl Store for RedisStore {
    fn kv_get_within(
        &self,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> StoreFuture<BTreeMap<String, String>> {
        let run = run.clone();
        self.submit(|reply| kv::Op::Get {
            run,
            keys,
            max_bytes,
            reply,
        })
    }

    fn kv_set_charged(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        charge: Charge,
    ) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| kv::Op::Set {
            run,
            pairs,
            max_keys,
            charge,
            reply,
        })
    }

    fn kv_delete(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<u64> {
        let run = run.clone();
        self.submit(|reply| kv::Op::Delete { run, keys, reply })
    }

    fn checkpoint_save_charged(
        &self,
        run: &RunId,
        checkpoint: Checkpoint,
        charge: Charge,
    ) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| checkpoints::Op::Save {
            run,
            checkpoint,
            charge,
            reply,
        })
    }

    fn run_data_delete(&self, run: &RunId) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| quota::Op::RunDataDelete { run, reply })
    }

    fn quota_usage(&self, tenant: &str) -> StoreFuture<Usage> {
        let tenant = tenant.to_owned();
        self.submit(|reply| quota::Op::Usage { tenant, reply })
    }

    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>> {
        let run = run.clone();
        self.submit(|reply| checkpoints::Op::Load { run, id, reply })
    }

    fn sessions_save_within(
        &self,
        changes: Vec<SessionChange>,
        max_runs_per_tenant: u64,
    ) -> StoreFuture<()> {
        self.submit(|reply| sessions::Op::Save {
            changes,
            max_runs: max_runs_per_tenant,
            reply,
        })
    }

    fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>> {
        self.submit(|reply| sessions::Op::Load { reply })
    }

    fn flush(&self) -> StoreFuture<()> {
        self.submit(|reply| Op::Flush { reply })
    }

    fn shared_sessions(&self) -> Option<&dyn SharedSessions> {
        Some(self)
    }
}

impl SharedSessions for RedisStore {
    fn session_of_run(&self, run: &RunId) -> StoreFuture<Option<(SessionRecord, bool)>> {
        let run = run.clone();
        self.submit(|reply| sessions::Op::OfRun { run, reply })
    }

    fn keep_alive(&self) -> StoreFuture<Vec<SessionRecord>> {
        self.submit(|reply| membership::Op::KeepAlive { reply })
    }

    fn sessions_of_runs(&self, runs: Vec<RunId>) -> StoreFuture<Vec<Option<SessionRecord>>> {
        self.submit(|reply| sessions::Op::OfRuns { runs, reply })
    }

    fn sub_sessions(&self, parent: &SessionId) -> StoreFuture<Vec<(SessionRecord, bool)>> {
        let parent = parent.clone();
        self.submit(|reply| sessions::Op::SubSessions { parent, reply })
    }

    fn moves(&self) -> Option<mpsc::UnboundedReceiver<SessionMoved>> {
        self.moves.lock().take()
    }

    fn announce_cancel(&self, session_id: &SessionId, cancel: &PendingCancel) -> StoreFuture<()> {
        let (session_id, cancel) = (session_id.clone(), cancel.clone());
        self.submit(|reply| session_moves::Op::AnnounceCancel {
            session_id,
            cancel,
            reply,
        })
    }

    fn cancels(&self) -> Option<mpsc::UnboundedReceiver<Cancelled>> {
        self.cancels.lock().take()
    }
}

/// The store's task: owns the connection, and runs each op with the part
/// it belongs to, one after another.
struct Worker {
    conn: ConnectionManager,
    kv: Kv,
    checkpoints: Checkpoints,
    quotas: Quotas,
    sessions: Sessions,
    membership: Membership,
    session_moves: SessionMoves,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        // Ends when every handle is gone and the queue is empty, so ops
        // queued before the last drop still run.
        while let Some(op) = rx.recv().await {
            self.execute(op).await;
        }
    }

    async fn execute(&mut self, op: Op) {
        let conn = &mut self.conn;
        match op {
            Op::Kv(op) => self.kv.execute(conn, op).await,
            Op::Checkpoints(op) => self.checkpoints.execute(conn, op).await,
            Op::Quota(op) => self.quotas.execute(conn, op).await,
            Op::Sessions(op) => self.sessions.execute(conn, op).await,
            Op::Membership(op) => self.membership.execute(conn, op).await,
            Op::SessionMoves(op) => self.session_moves.execute(conn, op).await,
            Op::Flush { reply } => answer(reply, Ok(())),
        }
    }
}

/// Hands an op its result. A send fails only when the caller dropped the
/// future, which is allowed (the op still ran); nobody is left to tell.
fn answer<T>(reply: Reply<T>, result: Result<T, StoreError>) {
    drop(reply.send(result));
}

/// A key of the wrong type means someone else's data under our prefix;
/// everything else (connection lost, timeout, Redis loading or read-only)
/// is worth a retry.
fn redis_error(e: RedisError) -> StoreError {
    if e.code() == Some("WRONGTYPE") {
        StoreError::Corrupt(format!("Redis holds a key of another type: {e}"))
    } else {
        StoreError::Unavailable(format!("Redis: {e}"))
    }
}

#[cfg(test)]
mod tests;
