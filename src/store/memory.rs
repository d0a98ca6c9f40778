//! In-memory store: plain maps behind one lock, for tests and `--store memory`.
//!
//! Owns nothing durable: everything is lost when the process exits, so
//! `flush` is a no-op. Each method applies its operation while it holds the
//! lock, before returning an already-completed future, which is what the
//! ordering contract in [`super`] asks for.
//! Must not block or await while holding the lock, and must not grow any
//! behavior the embedded store lacks (the two share one conformance suite).

use std::collections::{BTreeMap, HashMap};
use std::future::ready;

use parking_lot::Mutex;

use super::{Checkpoint, SessionChange, SessionRecord, Store, StoreError, StoreFuture};
use crate::ids::{RunId, SessionId};

/// Keeps every run's state in process memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    kv: HashMap<RunId, HashMap<String, String>>,
    checkpoints: HashMap<RunId, RunCheckpoints>,
    sessions: HashMap<SessionId, SessionRecord>,
}

#[derive(Debug, Default)]
struct RunCheckpoints {
    by_id: HashMap<String, Checkpoint>,
    /// Always names an entry of `by_id` once set: checkpoints are never
    /// deleted.
    latest: Option<String>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

fn done<T: Send + 'static>(result: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(ready(result))
}

impl Store for MemoryStore {
    fn kv_get_within(
        &self,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> StoreFuture<BTreeMap<String, String>> {
        let state = self.state.lock();
        let mut found = BTreeMap::new();
        let mut bytes = 0usize;
        if let Some(values) = state.kv.get(run) {
            for k in keys {
                if let Some(v) = values.get(&k) {
                    bytes = bytes.saturating_add(k.len() + v.len());
                    if bytes > max_bytes {
                        return done(Err(StoreError::ReplyTooLarge { max: max_bytes }));
                    }
                    found.insert(k, v.clone());
                }
            }
        }
        done(Ok(found))
    }

    fn kv_set_within(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
    ) -> StoreFuture<()> {
        // Inserting into a map cannot fail halfway, so holding the lock for
        // the count and the whole loop is all the atomicity needed.
        if !pairs.is_empty() {
            let mut state = self.state.lock();
            let values = state.kv.entry(run.clone()).or_default();
            let new_keys = pairs.keys().filter(|k| !values.contains_key(*k)).count();
            if values.len().saturating_add(new_keys) > max_keys {
                return done(Err(StoreError::TooManyKeys { max: max_keys }));
            }
            values.extend(pairs);
        }
        done(Ok(()))
    }

    fn checkpoint_save(&self, run: &RunId, checkpoint: Checkpoint) -> StoreFuture<()> {
        let mut state = self.state.lock();
        let run_cps = state.checkpoints.entry(run.clone()).or_default();
        run_cps.latest = Some(checkpoint.id.clone());
        run_cps.by_id.insert(checkpoint.id.clone(), checkpoint);
        done(Ok(()))
    }

    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>> {
        let state = self.state.lock();
        let found = state.checkpoints.get(run).and_then(|run_cps| {
            let id = id.as_ref().or(run_cps.latest.as_ref())?;
            run_cps.by_id.get(id).cloned()
        });
        done(Ok(found))
    }

    fn sessions_save(&self, changes: Vec<SessionChange>) -> StoreFuture<()> {
        let mut state = self.state.lock();
        for change in changes {
            match change {
                SessionChange::Put(record) => {
                    state.sessions.insert(record.session_id.clone(), record);
                }
                SessionChange::Delete(id) => {
                    state.sessions.remove(&id);
                }
            }
        }
        done(Ok(()))
    }

    fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>> {
        done(Ok(self.state.lock().sessions.values().cloned().collect()))
    }

    fn flush(&self) -> StoreFuture<()> {
        done(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Store;

    async fn make() -> Option<(Arc<dyn Store>, ())> {
        Some((Arc::new(MemoryStore::new()), ()))
    }

    crate::store::conformance::conformance_tests!(make);
}
