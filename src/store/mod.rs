//! Durable state a run keeps between attaches: key-value pairs and checkpoints.
//!
//! Owns the [`Store`] trait, the one seam between the protocol code and a
//! storage engine, plus its implementations: [`embedded`] (redb on disk, the
//! default) and [`memory`] (for tests and `--store memory`). A distributed
//! engine is a third implementation; nothing above this module changes.
//! Must not know about sessions, capabilities or frames: callers have already
//! checked that the session may touch `run`.
//!
//! Ordering contract: each method *submits* its operation before it returns
//! the future, so operations called one after another take effect in that
//! order even if their futures are awaited concurrently or not at all. The
//! dispatcher relies on this to apply one socket's commands in the order they
//! arrived while answering them in any order.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde_json::value::RawValue;

use crate::ids::RunId;
use crate::time::Timestamp;

pub mod embedded;
pub mod memory;

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
}

/// One saved checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub id: String,
    pub saved_at: Timestamp,
    /// The checkpoint's JSON, exactly as the runtime sent it.
    pub data: Box<RawValue>,
}


pub trait Store: Send + Sync + 'static {
    /// The values of those `keys` that exist for `run` (absent keys are
    /// simply not in the map).
    fn kv_get(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<BTreeMap<String, String>>;

    /// Writes all pairs for `run` atomically: all or none.
    fn kv_set(&self, run: &RunId, pairs: BTreeMap<String, String>) -> StoreFuture<()>;

    /// Saves `checkpoint` for `run` as its latest. An existing checkpoint
    /// with the same id is replaced (so a retried save is harmless).
    fn checkpoint_save(&self, run: &RunId, checkpoint: Checkpoint) -> StoreFuture<()>;

    /// The checkpoint named `id`, or the latest saved when `id` is `None`;
    /// `Ok(None)` when there is no such checkpoint.
    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>>;

    /// Completes once everything submitted before it is durable.
    fn flush(&self) -> StoreFuture<()>;
}
