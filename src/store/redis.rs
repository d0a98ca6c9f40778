//! A store on Redis, so several gateways share one state
//! (`--store redis://HOST:PORT/DB`).
//!
//! Owns the key layout and the one task that talks to Redis for a store.
//! Every [`Store`] call becomes an `Op` sent down a channel before the method
//! returns, and the task runs them one after another, so submission order
//! is execution order (the ordering contract in [`super`]); each op is one
//! round trip and atomic on the server (one command, `MULTI`/`EXEC`, or a
//! small Lua script). An `Ok` means Redis applied the op; how durable that is, is
//! Redis's own persistence setting (`appendonly yes` with `appendfsync
//! everysec` or `always`).
//! Must not retry on its own: Redis being away is a retryable
//! [`StoreError::Unavailable`] for the caller, and redis's connection
//! manager reconnects by itself for the next op.
//!
//! # Keys (prefix `rungate` by default)
//!
//! | key                      | type   | holds                                   |
//! |--------------------------|--------|-----------------------------------------|
//! | `{p}:kv:{run}`           | hash   | key → value                             |
//! | `{p}:cp:{run}`           | hash   | checkpoint id → checkpoint record       |
//! | `{p}:cp-latest:{run}`    | string | id of the run's latest checkpoint       |
//! | `{p}:sessions`           | hash   | session id → session record             |
//! | `{p}:session-holder`     | hash   | session id → `NODE EPOCH EXPIRED`       |
//! | `{p}:session-of-run`     | hash   | run id → session id                     |
//! | `{p}:held:{node}`        | set    | session ids that gateway holds          |
//! | `{p}:children:{session}` | set    | session ids of that main session's sub-runs |
//! | `{p}:alive:{node}`       | string | present while that gateway is alive     |
//! | `{p}:nodes`              | set    | gateways that have said they are alive  |
//! | `{p}:suspects`           | hash   | node → when it was first found silent   |
//! | `{p}:session-moves`      | channel| `SESSION_ID EPOCH NODE` per takeover; `cancel SESSION_ID MS REASON_JSON` per viewer's cancel of a session held elsewhere |
//!
//! Records are encoded as [`super::records`] says, the same bytes as in the
//! embedded store. A run id may contain `:`; it is always the last part of
//! a key, so keys stay unambiguous. Epochs are written as 20-digit
//! zero-padded decimals, because Lua numbers are doubles: two `u64`s
//! compare correctly as strings of equal length, not as doubles.
//!
//! # Sessions shared between gateways
//!
//! Each gateway (node) has a random id for the life of its process. A
//! session is *held* by the node that saved it last; the save script
//! (`SESSIONS_SAVE`) refuses a node's write of a session another node
//! holds at the same or a newer epoch, and a fresh session for a run that
//! has a live one ([`StoreError::Fenced`]). A save that moves a session to
//! a newer epoch on another node publishes the move, so the old node fences
//! its socket at once. Every node says it is alive once a second
//! (`KEEP_ALIVE`); the sessions of a node silent for longer than
//! [`NODE_SILENT_AFTER`] go, in one atomic step, to the first live node that
//! notices, which runs their leases from then on: so each lease has exactly
//! one node running it. Keys outside `KEYS` are named inside the scripts,
//! so this layout needs a single Redis (not Redis Cluster).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::{mpsc, oneshot};

use super::records::{decode_checkpoint, decode_session, encode_checkpoint, encode_session};
use super::{
    Checkpoint, PendingCancel, SessionChange, SessionMoved, SessionRecord, SharedSessions, Store,
    StoreError, StoreFuture,
};
use crate::ids::{RunId, SessionId};

/// Key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "rungate";

/// How long one op may wait for Redis before it is answered `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node silent this long has its sessions taken over. Five missed
/// keep-alives: long enough for a busy process or a Redis restart (after
/// which every live node says so again within a second), short next to a
/// lease.
pub const NODE_SILENT_AFTER: Duration = Duration::from_secs(5);

/// Applies session changes (`ARGV[3..]`, seven values each: `P`ut or
/// `D`elete, session id, run id, padded epoch, expired `0`/`1`, parent
/// session id or empty, record) for node
/// `ARGV[2]` under prefix `ARGV[1]`, skipping those another node holds:
/// returns them flat as `{session id, holder's padded epoch or ''}`.
const SESSIONS_SAVE: &str = include_str!("redis/sessions_save.lua");

/// The record of run `ARGV[1]`'s session and its holder entry
/// (`{record, holder}`), or nil.
const SESSION_OF_RUN: &str = include_str!("redis/session_of_run.lua");

/// Node `ARGV[2]` (prefix `ARGV[1]`) is alive for `ARGV[3]` ms more; a
/// node silent for `ARGV[3]` ms since first found so has its sessions
/// moved to this one. Returns the records taken over.
const KEEP_ALIVE: &str = include_str!("redis/keep_alive.lua");

/// The record of each run in `ARGV` (false where it has none).
const SESSIONS_OF_RUNS: &str = include_str!("redis/sessions_of_runs.lua");

/// The records of the session ids in set `KEYS[1]` (a node's held set,
/// or a main session's sub-runs), from hash `KEYS[2]`, each followed by its
/// holder entry from `KEYS[3]`: `{record, holder, ...}`. Members whose
/// record is gone leave the set.
const SESSION_SET: &str = include_str!("redis/session_set.lua");

/// The latest checkpoint (`ARGV[1]` = `latest`) or a named one
/// (`ARGV[1]` = `named`, `ARGV[2]` = id) in one round trip. Returns nil when
/// the run has no latest checkpoint, `{id}` when the record is missing, and
/// `{id, record}` when found.
const CHECKPOINT_LOAD: &str = include_str!("redis/checkpoint_load.lua");

/// Writes every pair of `ARGV[2..]` (key, value, key, value, ...) to the
/// hash `KEYS[1]` unless that would leave it with more than `ARGV[1]`
/// fields; returns the field count it would have had when refused, else 0.
/// Counting and writing in one script keeps concurrent writers from
/// overshooting the limit together.
const KV_SET_WITHIN: &str = include_str!("redis/kv_set_within.lua");

/// Why `open` failed; the URL is shown without its password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad Redis URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("cannot reach Redis at {url}: {why}")]
    Connect { url: String, why: String },
}

/// Opens `url` the way both Redis engines (this store and
/// [`crate::stream::redis`]) talk to Redis: a client, and a connection
/// manager with bounded connect and response times that reconnects by
/// itself; checked with a `PING`, so a wrong address is an error at start.
pub(crate) async fn open(url: &str) -> Result<(redis::Client, ConnectionManager), OpenError> {
    let shown = redacted(url);
    let client = redis::Client::open(url).map_err(|e| OpenError::Url {
        url: shown.clone(),
        why: e.to_string(),
    })?;
    let unreachable = |why: String| OpenError::Connect {
        url: shown.clone(),
        why,
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2);
    let mut conn = tokio::time::timeout(
        CONNECT_TIMEOUT * 3,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    .map_err(|_| unreachable("no answer in time".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| unreachable(format!("PING refused: {e}")))?;
    if pong != "PONG" {
        return Err(unreachable(format!(
            "answered PING with {pong:?}; is it Redis?"
        )));
    }
    Ok((client, conn))
}

/// `url` without its password, for messages and logs.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Handle to the store. Clones share one task and one connection.
#[derive(Clone)]
pub struct RedisStore {
    tx: mpsc::UnboundedSender<Op>,
    url: String,
    /// This gateway's node id, random per process.
    node: String,
    #[cfg(test)]
    prefix: String,
    moves: std::sync::Arc<parking_lot::Mutex<Option<mpsc::UnboundedReceiver<SessionMoved>>>>,
    cancels: std::sync::Arc<parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Cancelled>>>>,
}

/// A viewer's cancel another gateway announced: the session and the cancel.
type Cancelled = (SessionId, PendingCancel);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    KvGet {
        run: RunId,
        keys: Vec<String>,
        max_bytes: usize,
        reply: Reply<BTreeMap<String, String>>,
    },
    KvSet {
        run: RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        reply: Reply<()>,
    },
    CheckpointSave {
        run: RunId,
        checkpoint: Checkpoint,
        reply: Reply<()>,
    },
    CheckpointLoad {
        run: RunId,
        id: Option<String>,
        reply: Reply<Option<Checkpoint>>,
    },
    SessionsSave {
        changes: Vec<SessionChange>,
        reply: Reply<()>,
    },
    SessionsLoad {
        reply: Reply<Vec<SessionRecord>>,
    },
    SessionOfRun {
        run: RunId,
        reply: Reply<Option<(SessionRecord, bool)>>,
    },
    KeepAlive {
        reply: Reply<Vec<SessionRecord>>,
    },
    SessionsOfRuns {
        runs: Vec<RunId>,
        reply: Reply<Vec<Option<SessionRecord>>>,
    },
    SubSessions {
        parent: SessionId,
        reply: Reply<Vec<(SessionRecord, bool)>>,
    },
    /// Publishes a cancel on the moves channel.
    AnnounceCancel {
        session_id: SessionId,
        cancel: PendingCancel,
        reply: Reply<()>,
    },
    /// Answered once every op before it has been answered.
    Flush {
        reply: Reply<()>,
    },
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
        let node = format!("{:016x}", rand::random::<u64>());
        let keys = Keys {
            prefix: prefix.to_owned(),
        };
        let (moves_tx, moves_rx) = mpsc::unbounded_channel();
        let (cancels_tx, cancels_rx) = mpsc::unbounded_channel();
        tokio::spawn(follow_moves(
            client,
            keys.moves(),
            node.clone(),
            moves_tx,
            cancels_tx,
        ));
        let worker = Worker {
            conn,
            keys,
            node: node.clone(),
            node_silent_after,
            kv_set_within: Script::new(KV_SET_WITHIN),
            checkpoint_load: Script::new(CHECKPOINT_LOAD),
            sessions_save: Script::new(SESSIONS_SAVE),
            session_of_run: Script::new(SESSION_OF_RUN),
            keep_alive: Script::new(KEEP_ALIVE),
            session_set: Script::new(SESSION_SET),
            sessions_of_runs: Script::new(SESSIONS_OF_RUNS),
        };
        tokio::spawn(worker.run(rx));
        Ok(RedisStore {
            tx,
            url: url.to_owned(),
            #[cfg(test)]
            prefix: prefix.to_owned(),
            node,
            moves: std::sync::Arc::new(parking_lot::Mutex::new(Some(moves_rx))),
            cancels: std::sync::Arc::new(parking_lot::Mutex::new(Some(cancels_rx))),
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

    fn submit<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Op) -> StoreFuture<T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(make(reply));
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
        self.submit(|reply| Op::KvGet {
            run,
            keys,
            max_bytes,
            reply,
        })
    }

    fn kv_set_within(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| Op::KvSet {
            run,
            pairs,
            max_keys,
            reply,
        })
    }

    fn checkpoint_save(&self, run: &RunId, checkpoint: Checkpoint) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| Op::CheckpointSave {
            run,
            checkpoint,
            reply,
        })
    }

    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>> {
        let run = run.clone();
        self.submit(|reply| Op::CheckpointLoad { run, id, reply })
    }

    fn sessions_save(&self, changes: Vec<SessionChange>) -> StoreFuture<()> {
        self.submit(|reply| Op::SessionsSave { changes, reply })
    }

    fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>> {
        self.submit(|reply| Op::SessionsLoad { reply })
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
        self.submit(|reply| Op::SessionOfRun { run, reply })
    }

    fn keep_alive(&self) -> StoreFuture<Vec<SessionRecord>> {
        self.submit(|reply| Op::KeepAlive { reply })
    }

    fn sessions_of_runs(&self, runs: Vec<RunId>) -> StoreFuture<Vec<Option<SessionRecord>>> {
        self.submit(|reply| Op::SessionsOfRuns { runs, reply })
    }

    fn sub_sessions(&self, parent: &SessionId) -> StoreFuture<Vec<(SessionRecord, bool)>> {
        let parent = parent.clone();
        self.submit(|reply| Op::SubSessions { parent, reply })
    }

    fn moves(&self) -> Option<mpsc::UnboundedReceiver<SessionMoved>> {
        self.moves.lock().take()
    }

    fn announce_cancel(&self, session_id: &SessionId, cancel: &PendingCancel) -> StoreFuture<()> {
        let (session_id, cancel) = (session_id.clone(), cancel.clone());
        self.submit(|reply| Op::AnnounceCancel {
            session_id,
            cancel,
            reply,
        })
    }

    fn cancels(&self) -> Option<mpsc::UnboundedReceiver<Cancelled>> {
        self.cancels.lock().take()
    }
}

/// Follows the channel of session takeovers for as long as anyone listens,
/// resubscribing after a lost connection. A move missed while away is not
/// lost for good: the old node's next save of that session is fenced.
/// The same channel carries viewers' cancels for sessions another gateway
/// holds (`cancel ...` messages, see [`cancel_message`]): one subscription
/// for both kinds of news about sessions.
async fn follow_moves(
    client: redis::Client,
    channel: String,
    node: String,
    out: mpsc::UnboundedSender<SessionMoved>,
    cancels: mpsc::UnboundedSender<Cancelled>,
) {
    use futures_util::StreamExt;
    while !out.is_closed() {
        let pubsub = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(CONNECT_TIMEOUT * 3, pubsub).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                // The store is gone: nobody is left to tell.
                _ = out.closed() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if let Some(cancel) = parse_cancel(&text) {
                let _ = cancels.send(cancel);
                continue;
            }
            // This node's own takeovers are news only to the others.
            if let Some((moved, by)) = parse_move(&text)
                && by != node
                && out.send(moved).is_err()
            {
                return;
            }
        }
        tracing::warn!("lost Redis's channel of session moves; resubscribing");
    }
}

/// `cancel SESSION_ID REQUESTED_AT_MS REASON_JSON`: a viewer's cancel for
/// a session, for whichever gateway holds it. `REASON_JSON` is the reason
/// as a JSON string, or `null`. Older nodes read it as a move of no valid
/// session and ignore it.
fn cancel_message(session_id: &SessionId, cancel: &PendingCancel) -> String {
    let reason = serde_json::to_string(&cancel.reason).unwrap_or_else(|_| "null".into());
    format!(
        "cancel {session_id} {} {reason}",
        cancel.requested_at_unix_ms
    )
}

fn parse_cancel(text: &str) -> Option<Cancelled> {
    let rest = text.strip_prefix("cancel ")?;
    let (sid, rest) = rest.split_once(' ')?;
    let (ms, reason) = rest.split_once(' ')?;
    let cancel = PendingCancel {
        reason: serde_json::from_str(reason).ok()?,
        requested_at_unix_ms: ms.parse().ok()?,
    };
    Some((SessionId::new(sid).ok()?, cancel))
}

/// `SESSION_ID EPOCH NODE` as [`SESSIONS_SAVE`] publishes it: the move and
/// the node that made it.
fn parse_move(text: &str) -> Option<(SessionMoved, &str)> {
    let mut parts = text.split(' ');
    let moved = SessionMoved {
        session_id: SessionId::new(parts.next()?).ok()?,
        epoch: parts.next()?.parse().ok()?,
    };
    Some((moved, parts.next()?))
}

/// Builds the keys of the layout in the module docs.
struct Keys {
    prefix: String,
}

impl Keys {
    fn kv(&self, run: &RunId) -> String {
        format!("{}:kv:{run}", self.prefix)
    }
    fn checkpoints(&self, run: &RunId) -> String {
        format!("{}:cp:{run}", self.prefix)
    }
    fn latest(&self, run: &RunId) -> String {
        format!("{}:cp-latest:{run}", self.prefix)
    }
    fn sessions(&self) -> String {
        format!("{}:sessions", self.prefix)
    }
    fn holders(&self) -> String {
        format!("{}:session-holder", self.prefix)
    }
    fn session_of_run(&self) -> String {
        format!("{}:session-of-run", self.prefix)
    }
    fn held(&self, node: &str) -> String {
        format!("{}:held:{node}", self.prefix)
    }
    fn moves(&self) -> String {
        format!("{}:session-moves", self.prefix)
    }
    fn children(&self, parent: &SessionId) -> String {
        format!("{}:children:{parent}", self.prefix)
    }
}

/// Owned by the store's task.
struct Worker {
    conn: ConnectionManager,
    keys: Keys,
    node: String,
    node_silent_after: Duration,
    kv_set_within: Script,
    checkpoint_load: Script,
    sessions_save: Script,
    session_of_run: Script,
    keep_alive: Script,
    session_set: Script,
    sessions_of_runs: Script,
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
        // A send fails only when the caller dropped the future, which is
        // allowed (the op still ran); nobody is left to tell.
        match op {
            Op::KvGet {
                run,
                keys,
                max_bytes,
                reply,
            } => drop(reply.send(self.kv_get(&run, keys, max_bytes).await)),
            Op::KvSet {
                run,
                pairs,
                max_keys,
                reply,
            } => drop(reply.send(self.kv_set(&run, pairs, max_keys).await)),
            Op::CheckpointSave {
                run,
                checkpoint,
                reply,
            } => drop(reply.send(self.checkpoint_save(&run, &checkpoint).await)),
            Op::CheckpointLoad { run, id, reply } => {
                drop(reply.send(self.checkpoint_load(&run, id).await))
            }
            Op::SessionsSave { changes, reply } => {
                drop(reply.send(self.sessions_save(changes).await))
            }
            Op::SessionsLoad { reply } => drop(reply.send(self.sessions_load().await)),
            Op::SessionOfRun { run, reply } => drop(reply.send(self.session_of_run(&run).await)),
            Op::KeepAlive { reply } => drop(reply.send(self.keep_alive().await)),
            Op::SessionsOfRuns { runs, reply } => {
                drop(reply.send(self.sessions_of_runs(&runs).await))
            }
            Op::SubSessions { parent, reply } => drop(reply.send(self.sub_sessions(&parent).await)),
            Op::AnnounceCancel {
                session_id,
                cancel,
                reply,
            } => {
                let published: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(self.keys.moves())
                    .arg(cancel_message(&session_id, &cancel))
                    .query_async(&mut self.conn)
                    .await;
                drop(
                    reply.send(
                        published
                            .map(drop)
                            .map_err(|e| StoreError::Unavailable(e.to_string())),
                    ),
                )
            }
            Op::Flush { reply } => drop(reply.send(Ok(()))),
        }
    }

    async fn kv_get(
        &mut self,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> Result<BTreeMap<String, String>, StoreError> {
        // In chunks, so a read that turns out too large stops after at
        // most one chunk past its limit instead of holding every value.
        // (One HMGET per chunk: a reply is not one snapshot then, which KV
        // never promised across keys written by different requests.)
        const CHUNK: usize = 64;
        let mut found = BTreeMap::new();
        let mut bytes = 0usize;
        for chunk in keys.chunks(CHUNK) {
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.keys.kv(run))
                .arg(chunk)
                .query_async(&mut self.conn)
                .await
                .map_err(redis_error)?;
            for (k, v) in chunk.iter().zip(values) {
                if let Some(v) = v {
                    bytes = bytes.saturating_add(k.len() + v.len());
                    if bytes > max_bytes {
                        return Err(StoreError::ReplyTooLarge { max: max_bytes });
                    }
                    found.insert(k.clone(), v);
                }
            }
        }
        Ok(found)
    }

    async fn kv_set(
        &mut self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut invocation = self.kv_set_within.key(self.keys.kv(run));
        // Lua numbers are doubles: "no limit" must stay a number it can hold.
        invocation.arg(max_keys.min(1 << 50));
        for (k, v) in &pairs {
            invocation.arg(k).arg(v);
        }
        let refused: u64 = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        if refused > 0 {
            return Err(StoreError::TooManyKeys { max: max_keys });
        }
        Ok(())
    }

    async fn checkpoint_save(
        &mut self,
        run: &RunId,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(self.keys.checkpoints(run))
            .arg(&checkpoint.id)
            .arg(encode_checkpoint(checkpoint))
            .ignore()
            .cmd("SET")
            .arg(self.keys.latest(run))
            .arg(&checkpoint.id)
            .ignore()
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(redis_error)
    }

    async fn checkpoint_load(
        &mut self,
        run: &RunId,
        id: Option<String>,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let named = id.is_some();
        let mut invocation = self.checkpoint_load.key(self.keys.checkpoints(run));
        invocation
            .key(self.keys.latest(run))
            .arg(if named { "named" } else { "latest" })
            .arg(id.unwrap_or_default());
        // nil, {id} or {id, record}: see CHECKPOINT_LOAD.
        let found: Option<Vec<Vec<u8>>> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        let Some(mut parts) = found else {
            return Ok(None);
        };
        let record = (parts.len() == 2).then(|| parts.pop()).flatten();
        let id = parts
            .pop()
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .unwrap_or_default();
        match record {
            None if named => Ok(None),
            None => Err(StoreError::Corrupt(format!(
                "Redis: run {run}'s latest checkpoint is {id:?}, which is missing"
            ))),
            Some(record) => decode_checkpoint(id.clone(), &record)
                .map(Some)
                .map_err(|why| {
                    StoreError::Corrupt(format!("Redis: checkpoint {id:?} of run {run}: {why}"))
                }),
        }
    }

    async fn sessions_save(&mut self, changes: Vec<SessionChange>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut invocation = self.sessions_save.key(self.keys.sessions());
        invocation
            .key(self.keys.holders())
            .key(self.keys.session_of_run())
            .arg(&self.keys.prefix)
            .arg(&self.node);
        for change in &changes {
            match change {
                SessionChange::Put(r) => invocation
                    .arg("P")
                    .arg(r.session_id.as_str())
                    .arg(r.run_id.as_str())
                    .arg(padded(r.epoch))
                    .arg(if r.expired { "1" } else { "0" })
                    .arg(r.parent.as_ref().map_or("", |p| p.as_str()))
                    .arg(encode_session(r)),
                SessionChange::Delete(id) => invocation
                    .arg("D")
                    .arg(id.as_str())
                    .arg("")
                    .arg("")
                    .arg("")
                    .arg("")
                    .arg(""),
            };
        }
        let refused: Vec<String> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        if refused.is_empty() {
            return Ok(());
        }
        let sessions = refused
            .chunks(2)
            .filter_map(|pair| {
                let id = SessionId::new(pair.first()?.as_str()).ok()?;
                Some((id, pair.get(1).and_then(|e| e.parse().ok())))
            })
            .collect();
        Err(StoreError::Fenced { sessions })
    }

    async fn sessions_load(&mut self) -> Result<Vec<SessionRecord>, StoreError> {
        let held = self.session_set(self.keys.held(&self.node)).await?;
        Ok(held.into_iter().map(|(record, _)| record).collect())
    }

    /// The records of a set of session ids (see [`SESSION_SET`]), each
    /// with whether this node holds it.
    async fn session_set(&mut self, set: String) -> Result<Vec<(SessionRecord, bool)>, StoreError> {
        let mut invocation = self.session_set.key(set);
        invocation
            .key(self.keys.sessions())
            .key(self.keys.holders());
        let flat: Vec<Vec<u8>> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        flat.chunks(2)
            .map(|pair| {
                let holder = pair.get(1).map(Vec::as_slice).unwrap_or_default();
                Ok((decode_one(&pair[0])?, self.held_here(holder)))
            })
            .collect()
    }

    /// Whether a holder entry (`NODE EPOCH EXPIRED`) names this node.
    fn held_here(&self, holder: &[u8]) -> bool {
        holder.split(|b| *b == b' ').next() == Some(self.node.as_bytes())
    }

    async fn session_of_run(
        &mut self,
        run: &RunId,
    ) -> Result<Option<(SessionRecord, bool)>, StoreError> {
        let mut invocation = self.session_of_run.key(self.keys.session_of_run());
        invocation
            .key(self.keys.sessions())
            .key(self.keys.holders())
            .arg(run.as_str());
        let found: Option<(Vec<u8>, String)> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        let Some((bytes, holder)) = found else {
            return Ok(None);
        };
        let record = decode_session(&bytes)
            .map_err(|why| StoreError::Corrupt(format!("Redis: session of run {run}: {why}")))?;
        Ok(Some((record, self.held_here(holder.as_bytes()))))
    }

    async fn keep_alive(&mut self) -> Result<Vec<SessionRecord>, StoreError> {
        let mut invocation = self.keep_alive.key(self.keys.holders());
        invocation
            .key(self.keys.sessions())
            .arg(&self.keys.prefix)
            .arg(&self.node)
            .arg(self.node_silent_after.as_millis() as u64);
        let records: Vec<Vec<u8>> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        decode_all(records)
    }
}

impl Worker {
    async fn sub_sessions(
        &mut self,
        parent: &SessionId,
    ) -> Result<Vec<(SessionRecord, bool)>, StoreError> {
        self.session_set(self.keys.children(parent)).await
    }

    async fn sessions_of_runs(
        &mut self,
        runs: &[RunId],
    ) -> Result<Vec<Option<SessionRecord>>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.sessions_of_runs.key(self.keys.session_of_run());
        invocation.key(self.keys.sessions());
        for run in runs {
            invocation.arg(run.as_str());
        }
        let records: Vec<Option<Vec<u8>>> = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        records
            .into_iter()
            .map(|r| r.as_deref().map(decode_one).transpose())
            .collect()
    }
}

fn decode_all(records: Vec<Vec<u8>>) -> Result<Vec<SessionRecord>, StoreError> {
    records.iter().map(|bytes| decode_one(bytes)).collect()
}

fn decode_one(bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    decode_session(bytes).map_err(|why| StoreError::Corrupt(format!("Redis: session: {why}")))
}

/// An epoch as the scripts compare it: see the module docs.
fn padded(epoch: u64) -> String {
    format!("{epoch:020}")
}

/// The hash of who holds each session, under `prefix`: for the stream
/// engine's publish fence, which checks it in the same script as the append.
pub fn session_holder_key(prefix: &str) -> String {
    Keys {
        prefix: prefix.to_owned(),
    }
    .holders()
}

/// How the holder entry of a session `node` holds at `epoch` begins.
pub fn holder_entry_prefix(node: &str, epoch: u64) -> String {
    format!("{node} {} ", padded(epoch))
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

/// A throwaway `redis-server` for tests, from the shared test-support crate.
#[cfg(test)]
pub(crate) use rungate_test_support::redis as test_server;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::test_server::TestRedis;
    use super::*;
    use crate::ids::SessionId;

    /// Each check gets a server of its own (or a prefix of its own on
    /// `REDIS_URL`), so checks never see each other's keys.
    async fn make() -> Option<(Arc<dyn Store>, TestRedis)> {
        let server = test_server::start()?;
        let prefix = format!("test-{}", SessionId::generate());
        let store = RedisStore::connect(&server.url, &prefix)
            .await
            .expect("connect to the test Redis");
        Some((Arc::new(store), server))
    }

    crate::store::conformance::conformance_tests!(make);

    fn run(s: &str) -> RunId {
        RunId::new(s).unwrap()
    }

    fn one(k: &str, v: &str) -> BTreeMap<String, String> {
        [(k.to_owned(), v.to_owned())].into()
    }

    /// Redis gone: ops answer a retryable `Unavailable` promptly; Redis
    /// back: the same store works again by itself. (This test server keeps
    /// nothing across its restart, so only new writes are checked.)
    #[tokio::test]
    async fn redis_away_is_unavailable_and_the_store_recovers_by_itself() {
        if std::env::var("REDIS_URL").is_ok() {
            return; // Cannot stop a server that is not ours.
        }
        let Some(mut server) = test_server::start() else {
            return;
        };
        let store = RedisStore::connect(&server.url, "t").await.unwrap();
        let r = run("r");
        store.kv_set(&r, one("k", "1")).await.unwrap();
        server.stop();
        let err = tokio::time::timeout(Duration::from_secs(30), store.kv_set(&r, one("k", "2")))
            .await
            .expect("answered, not hung")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        server.restart();
        let mut recovered = false;
        for _ in 0..100 {
            if store.kv_set(&r, one("k", "3")).await.is_ok() {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recovered, "the store reconnected by itself");
        assert_eq!(
            store.kv_get(&r, vec!["k".into()]).await.unwrap(),
            one("k", "3")
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error_at_connect() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // (The stream engine opens Redis through the same `open`.)
        let err = RedisStore::connect(&format!("redis://:secret@127.0.0.1:{port}/0"), "t")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        assert!(
            !err.to_string().contains("secret"),
            "no password in errors: {err}"
        );
        let err = RedisStore::connect("http://nope", "t").await.unwrap_err();
        assert!(err.to_string().contains("bad Redis URL"), "{err}");
    }

    /// Someone else's data under our prefix is `Corrupt`, not a panic, and
    /// touches only the op that met it.
    #[tokio::test]
    async fn foreign_keys_are_corrupt_not_a_panic() {
        let Some(server) = test_server::start() else {
            return;
        };
        let store = RedisStore::connect(&server.url, "f").await.unwrap();
        let client = redis::Client::open(server.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("SET")
            .arg("f:kv:r")
            .arg("a string, not a hash")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        redis::cmd("HSET")
            .arg("f:sessions")
            .arg("s")
            .arg("garbage")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        redis::cmd("SADD")
            .arg(format!("f:held:{}", store.node()))
            .arg("s")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let err = store.kv_get(&run("r"), vec!["k".into()]).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let err = store.sessions_load().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        store.kv_set(&run("other"), one("k", "v")).await.unwrap();
    }

    // ------------------------------------------- sessions shared by nodes

    use crate::store::conformance::session;

    /// Two gateways (nodes) on one Redis, under one prefix.
    async fn two_nodes(silent_after: Duration) -> Option<(RedisStore, RedisStore, TestRedis)> {
        let server = test_server::start()?;
        let prefix = format!("nodes-{}", SessionId::generate());
        let a = RedisStore::connect_with(&server.url, &prefix, silent_after)
            .await
            .unwrap();
        let b = RedisStore::connect_with(&server.url, &prefix, silent_after)
            .await
            .unwrap();
        assert_ne!(a.node(), b.node());
        Some((a, b, server))
    }

    fn put(r: &SessionRecord) -> Vec<SessionChange> {
        vec![SessionChange::Put(r.clone())]
    }

    fn fenced(result: Result<(), StoreError>) -> Vec<(SessionId, Option<u64>)> {
        match result {
            Err(StoreError::Fenced { sessions }) => sessions,
            other => panic!("expected Fenced, got {other:?}"),
        }
    }

    /// A takeover at a newer epoch wins once, is announced to the old node,
    /// and fences the old node's writes of that session from then on.
    #[tokio::test]
    async fn a_takeover_fences_the_old_node_and_is_announced() {
        let Some((a, b, _server)) = two_nodes(NODE_SILENT_AFTER).await else {
            return;
        };
        let mut moves = a.moves().expect("first call");
        assert!(a.moves().is_none(), "handed out once");
        let mut s = session("r", 1);
        a.sessions_save(put(&s)).await.unwrap();
        let (seen, held_here) = b.session_of_run(&s.run_id).await.unwrap().unwrap();
        assert_eq!((seen.clone(), held_here), (s.clone(), false));
        assert!(a.session_of_run(&s.run_id).await.unwrap().unwrap().1);

        // The same epoch from another node is refused and names the holder's.
        assert_eq!(
            fenced(b.sessions_save(put(&s)).await),
            vec![(s.session_id.clone(), Some(1))]
        );
        s.epoch = 2;
        b.sessions_save(put(&s)).await.unwrap();
        let moved = tokio::time::timeout(Duration::from_secs(30), moves.recv())
            .await
            .expect("announced in time")
            .expect("a move");
        assert_eq!(
            moved,
            SessionMoved {
                session_id: s.session_id.clone(),
                epoch: 2
            }
        );
        // The old node's renewal at its old epoch, and its delete, are fenced.
        let mut old = s.clone();
        old.epoch = 1;
        old.deadline_unix_ms += 10_000;
        assert_eq!(
            fenced(a.sessions_save(put(&old)).await),
            vec![(s.session_id.clone(), Some(2))]
        );
        assert_eq!(
            fenced(
                a.sessions_save(vec![SessionChange::Delete(s.session_id.clone())])
                    .await
            ),
            vec![(s.session_id.clone(), Some(2))]
        );
        assert_eq!(
            b.session_of_run(&s.run_id).await.unwrap().unwrap(),
            (s.clone(), true)
        );
        // Each node loads what it holds, nothing else.
        assert_eq!(b.sessions_load().await.unwrap(), vec![s.clone()]);
        assert!(a.sessions_load().await.unwrap().is_empty());
        // An epoch beyond a double's precision still compares exactly.
        s.epoch = u64::MAX - 1;
        a.sessions_save(put(&s)).await.unwrap();
        let mut b_old = s.clone();
        b_old.epoch = u64::MAX - 2;
        assert_eq!(
            fenced(b.sessions_save(put(&b_old)).await),
            vec![(s.session_id.clone(), Some(u64::MAX - 1))]
        );
    }

    /// A fresh session of a run with a live session elsewhere is refused
    /// (no epoch: it is another session); once that one is a tombstone it
    /// gives way and the tombstone is gone.
    #[tokio::test]
    async fn a_run_has_one_live_session_across_nodes() {
        let Some((a, b, server)) = two_nodes(NODE_SILENT_AFTER).await else {
            return;
        };
        let mut first = session("r", 1);
        a.sessions_save(put(&first)).await.unwrap();
        let second = session("r", 1);
        assert_eq!(
            fenced(b.sessions_save(put(&second)).await),
            vec![(second.session_id.clone(), None)]
        );
        // Other changes in the same save still apply.
        let other = session("other", 1);
        assert_eq!(
            fenced(
                b.sessions_save(vec![
                    SessionChange::Put(second.clone()),
                    SessionChange::Put(other.clone())
                ])
                .await
            ),
            vec![(second.session_id.clone(), None)]
        );
        assert_eq!(
            b.session_of_run(&other.run_id).await.unwrap().unwrap().0,
            other
        );
        first.expired = true;
        a.sessions_save(put(&first)).await.unwrap();
        b.sessions_save(put(&second)).await.unwrap();
        assert_eq!(
            b.session_of_run(&second.run_id).await.unwrap().unwrap(),
            (second.clone(), true)
        );
        assert!(
            a.sessions_load().await.unwrap().is_empty(),
            "the tombstone went"
        );
        // A deleted session leaves no trace: not its record, not its run's
        // index entry.
        b.sessions_save(vec![SessionChange::Delete(second.session_id.clone())])
            .await
            .unwrap();
        assert!(b.session_of_run(&second.run_id).await.unwrap().is_none());
        let client = redis::Client::open(server.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let indexed: Vec<String> = redis::cmd("HKEYS")
            .arg(b.keys_prefix_for_tests() + ":session-of-run")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(indexed, vec![other.run_id.to_string()], "only the live run");
    }

    /// A node that stops saying it is alive has its sessions taken over by
    /// exactly one live node, once it has been silent long enough.
    #[tokio::test]
    async fn a_silent_nodes_sessions_go_to_one_live_node() {
        let silent = Duration::from_millis(300);
        let Some((a, b, server)) = two_nodes(silent).await else {
            return;
        };
        let c = RedisStore::connect_with(&server.url, &b.keys_prefix_for_tests(), silent)
            .await
            .unwrap();
        let held = [session("r1", 1), session("r2", 4)];
        for s in &held {
            a.sessions_save(put(s)).await.unwrap();
        }
        assert!(a.keep_alive().await.unwrap().is_empty());
        // A keeps saying it is alive: nothing is taken.
        for _ in 0..3 {
            tokio::time::sleep(silent).await;
            assert!(a.keep_alive().await.unwrap().is_empty());
            assert!(b.keep_alive().await.unwrap().is_empty());
        }
        // A goes silent. B and C race; each session goes to one of them.
        drop(a);
        let mut taken: Vec<SessionRecord> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while taken.len() < held.len() {
            assert!(tokio::time::Instant::now() < deadline, "taken over in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
            taken.extend(b.keep_alive().await.unwrap());
            taken.extend(c.keep_alive().await.unwrap());
        }
        taken.sort_by(|x, y| x.run_id.cmp(&y.run_id));
        assert_eq!(taken, held.to_vec(), "each session once");
        for _ in 0..3 {
            tokio::time::sleep(silent).await;
            assert!(b.keep_alive().await.unwrap().is_empty());
            assert!(c.keep_alive().await.unwrap().is_empty());
        }
        // Whoever took them holds them now: their saves pass.
        let mut holders = 0;
        for node in [&b, &c] {
            let mine = node.sessions_load().await.unwrap();
            for s in &mine {
                node.sessions_save(put(s)).await.unwrap();
            }
            holders += mine.len();
        }
        assert_eq!(holders, held.len());
    }
}
