//! A run's KV pairs in Redis: one hash per run (`{p}:kv:{run}`).
//!
//! Owns reading and writing the pairs within the limits the caller passes
//! (bytes per read, keys per run), each op one round trip. Must not know
//! sessions, checkpoints or who may touch the run (the caller checked), and
//! must not retry (see [`super`]).

use std::collections::BTreeMap;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Reply, answer, redis_error};
use crate::ids::RunId;
use crate::redis::keys::Keys;
use crate::store::StoreError;

/// Writes every pair of `ARGV[2..]` (key, value, key, value, ...) to the
/// hash `KEYS[1]` unless that would leave it with more than `ARGV[1]`
/// fields; returns the field count it would have had when refused, else 0.
/// Counting and writing in one script keeps concurrent writers from
/// overshooting the limit together.
const KV_SET_WITHIN: &str = include_str!("kv_set_within.lua");

/// Keys per `HMGET`: a read that turns out too large stops after at most
/// one chunk past its limit instead of holding every value.
const GET_CHUNK: usize = 64;

/// A KV op, answered on its `reply`.
pub(super) enum Op {
    Get {
        run: RunId,
        keys: Vec<String>,
        max_bytes: usize,
        reply: Reply<BTreeMap<String, String>>,
    },
    Set {
        run: RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        reply: Reply<()>,
    },
}

/// The KV part of the store's task.
pub(super) struct Kv {
    keys: Keys,
    set_within: Script,
}

impl Kv {
    pub(super) fn new(keys: Keys) -> Kv {
        Kv {
            keys,
            set_within: Script::new(KV_SET_WITHIN),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::Get {
                run,
                keys,
                max_bytes,
                reply,
            } => answer(reply, self.get(conn, &run, keys, max_bytes).await),
            Op::Set {
                run,
                pairs,
                max_keys,
                reply,
            } => answer(reply, self.set(conn, &run, pairs, max_keys).await),
        }
    }

    async fn get(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> Result<BTreeMap<String, String>, StoreError> {
        // In chunks (see GET_CHUNK). One HMGET per chunk: a reply is not
        // one snapshot then, which KV never promised across keys written by
        // different requests.
        let mut found = BTreeMap::new();
        let mut bytes = 0usize;
        for chunk in keys.chunks(GET_CHUNK) {
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.keys.kv(run))
                .arg(chunk)
                .query_async(conn)
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

    async fn set(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut invocation = self.set_within.key(self.keys.kv(run));
        // Lua numbers are doubles: "no limit" must stay a number it can hold.
        invocation.arg(max_keys.min(1 << 50));
        for (k, v) in &pairs {
            invocation.arg(k).arg(v);
        }
        let refused: u64 = invocation.invoke_async(conn).await.map_err(redis_error)?;
        if refused > 0 {
            return Err(StoreError::TooManyKeys { max: max_keys });
        }
        Ok(())
    }
}
