//! A run's KV pairs in Redis: one hash per run (`{p}:kv:{run}`).
//!
//! Owns reading, writing and deleting the pairs within the limits the
//! caller passes (bytes per read, keys per run, the kvBytes quota of the
//! run's owner), each op one round trip; a write or a delete changes the
//! owner's usage in the same script (see `quota`). Must not know sessions,
//! checkpoints or who may touch the run (the caller checked), and must not
//! retry (see [`super`]).

use std::collections::BTreeMap;

use redis::Script;
use redis::aio::ConnectionManager;

use super::quota::refused;
use super::{LUA_MAX_LIMIT, Reply, answer, redis_error};
use crate::ids::RunId;
use crate::redis::keys::Keys;
use crate::store::{Charge, Meter, StoreError};

/// Writes every pair to the run's KV hash unless that would leave it with
/// more than its most keys (`{1, count}`) or its owner past its kvBytes
/// quota (`{2, used, growth}`); else `{0}`. Counting and writing in one
/// script keeps concurrent writers from overshooting the limits together.
/// Arguments are in the script.
const KV_SET_WITHIN: &str = include_str!("kv_set_within.lua");

/// Deletes keys from the run's KV hash, giving their bytes back to its
/// owner; returns how many there were.
const KV_DELETE: &str = include_str!("kv_delete.lua");

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
        charge: Charge,
        reply: Reply<()>,
    },
    Delete {
        run: RunId,
        keys: Vec<String>,
        reply: Reply<u64>,
    },
}

/// The KV part of the store's task.
pub(super) struct Kv {
    keys: Keys,
    set_within: Script,
    delete: Script,
}

impl Kv {
    pub(super) fn new(keys: Keys) -> Kv {
        Kv {
            keys,
            set_within: Script::new(KV_SET_WITHIN),
            delete: Script::new(KV_DELETE),
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
                charge,
                reply,
            } => answer(reply, self.set(conn, &run, pairs, max_keys, &charge).await),
            Op::Delete { run, keys, reply } => answer(reply, self.delete(conn, &run, keys).await),
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
        charge: &Charge,
    ) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut invocation = self.set_within.key(self.keys.kv(run));
        invocation
            .key(self.keys.owner(run))
            .arg((max_keys as u64).min(LUA_MAX_LIMIT))
            .arg(&charge.tenant)
            .arg(charge.limit.min(LUA_MAX_LIMIT))
            .arg(self.keys.usage_prefix());
        for (k, v) in &pairs {
            invocation.arg(k).arg(v);
        }
        let answer: Vec<u64> = invocation.invoke_async(conn).await.map_err(redis_error)?;
        match answer.as_slice() {
            [0] => Ok(()),
            [1, ..] => Err(StoreError::TooManyKeys { max: max_keys }),
            [2, used, requested] => Err(refused(Meter::KvBytes, *used, *requested, charge)),
            other => Err(StoreError::Corrupt(format!(
                "Redis: the KV write script answered {other:?}"
            ))),
        }
    }

    async fn delete(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
        keys: Vec<String>,
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.delete.key(self.keys.kv(run));
        invocation
            .key(self.keys.owner(run))
            .arg(self.keys.usage_prefix());
        for k in &keys {
            invocation.arg(k);
        }
        invocation.invoke_async(conn).await.map_err(redis_error)
    }
}
