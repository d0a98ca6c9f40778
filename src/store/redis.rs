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
//!
//! Records are encoded as [`super::records`] says, the same bytes as in the
//! embedded store. A run id may contain `:`; it is always the last part of
//! a key, so keys stay unambiguous.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::{mpsc, oneshot};

use super::records::{decode_checkpoint, decode_session, encode_checkpoint, encode_session};
use super::{Checkpoint, SessionChange, SessionRecord, Store, StoreError, StoreFuture};
use crate::ids::RunId;

/// Key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "rungate";

/// How long one op may wait for Redis before it is answered `Unavailable`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The latest checkpoint (`ARGV[1]` = `latest`) or a named one
/// (`ARGV[1]` = `named`, `ARGV[2]` = id) in one round trip. Returns nil when
/// the run has no latest checkpoint, `{id}` when the record is missing, and
/// `{id, record}` when found.
const CHECKPOINT_LOAD: &str = r"
local id = ARGV[2]
if ARGV[1] == 'latest' then
  id = redis.call('GET', KEYS[2])
  if not id then return nil end
end
local record = redis.call('HGET', KEYS[1], id)
if not record then return {id} end
return {id, record}
";

/// Writes every pair of `ARGV[2..]` (key, value, key, value, ...) to the
/// hash `KEYS[1]` unless that would leave it with more than `ARGV[1]`
/// fields; returns the field count it would have had when refused, else 0.
/// Counting and writing in one script keeps concurrent writers from
/// overshooting the limit together.
const KV_SET_WITHIN: &str = r"
local max = tonumber(ARGV[1])
local fresh = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then fresh = fresh + 1 end
end
local total = redis.call('HLEN', KEYS[1]) + fresh
if fresh > 0 and total > max then return total end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 0
";

/// Handle to the store. Clones share one task and one connection.
#[derive(Clone)]
pub struct RedisStore {
    tx: mpsc::UnboundedSender<Op>,
    url: String,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    KvGet {
        run: RunId,
        keys: Vec<String>,
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
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("bad Redis URL {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT * 3,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("Redis at {url} did not answer in time")))?
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to Redis at {url}: {e}")))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| StoreError::Unavailable(format!("Redis at {url} refused PING: {e}")))?;
        if pong != "PONG" {
            return Err(StoreError::Unavailable(format!(
                "{url} answered PING with {pong:?}; is it Redis?"
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            kv_set_within: Script::new(KV_SET_WITHIN),
            checkpoint_load: Script::new(CHECKPOINT_LOAD),
        };
        tokio::spawn(worker.run(rx));
        Ok(RedisStore {
            tx,
            url: url.to_owned(),
        })
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
            .finish()
    }
}

impl Store for RedisStore {
    fn kv_get(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<BTreeMap<String, String>> {
        let run = run.clone();
        self.submit(|reply| Op::KvGet { run, keys, reply })
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
}

/// Owned by the store's task.
struct Worker {
    conn: ConnectionManager,
    keys: Keys,
    kv_set_within: Script,
    checkpoint_load: Script,
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
            Op::KvGet { run, keys, reply } => drop(reply.send(self.kv_get(&run, keys).await)),
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
            Op::Flush { reply } => drop(reply.send(Ok(()))),
        }
    }

    async fn kv_get(
        &mut self,
        run: &RunId,
        keys: Vec<String>,
    ) -> Result<BTreeMap<String, String>, StoreError> {
        if keys.is_empty() {
            return Ok(BTreeMap::new());
        }
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.kv(run))
            .arg(&keys)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        Ok(keys
            .into_iter()
            .zip(values)
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
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
        let key = self.keys.sessions();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for change in &changes {
            match change {
                SessionChange::Put(record) => pipe
                    .cmd("HSET")
                    .arg(&key)
                    .arg(record.session_id.as_str())
                    .arg(encode_session(record))
                    .ignore(),
                SessionChange::Delete(id) => pipe.cmd("HDEL").arg(&key).arg(id.as_str()).ignore(),
            };
        }
        pipe.query_async::<()>(&mut self.conn)
            .await
            .map_err(redis_error)
    }

    async fn sessions_load(&mut self) -> Result<Vec<SessionRecord>, StoreError> {
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.keys.sessions())
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error)?;
        all.into_iter()
            .map(|(id, bytes)| {
                decode_session(&bytes)
                    .map_err(|why| StoreError::Corrupt(format!("Redis: session {id:?}: {why}")))
            })
            .collect()
    }
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

/// A throwaway `redis-server` for tests: the integration tests' own helper,
/// shared rather than copied.
#[cfg(test)]
#[path = "../../tests/common/redis.rs"]
pub(crate) mod test_server;

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
        let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}/0"), "t")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&port.to_string()), "{err}");
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
        let err = store.kv_get(&run("r"), vec!["k".into()]).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let err = store.sessions_load().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        store.kv_set(&run("other"), one("k", "v")).await.unwrap();
    }
}
