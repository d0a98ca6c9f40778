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

use super::quota::{self, Charge, Meter, Usage};
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
    /// The tenant each run's KV and checkpoints are charged to.
    owners: HashMap<RunId, String>,
    usage: HashMap<String, Usage>,
}

impl State {
    /// The tenant `run`'s data is charged to: its owner, or `charge`'s
    /// tenant for a run that has none yet.
    fn payer(&self, run: &RunId, charge: &Charge) -> String {
        self.owners
            .get(run)
            .cloned()
            .unwrap_or_else(|| charge.tenant.clone())
    }

    /// Charges `delta` of `meter` to `tenant` if [`quota::admit`] allows.
    fn charge(
        &mut self,
        tenant: &str,
        meter: Meter,
        delta: i64,
        limit: u64,
    ) -> Result<(), StoreError> {
        let usage = self.usage.entry(tenant.to_owned()).or_default();
        let after = quota::admit(meter, usage.get(meter), delta, limit)
            .map_err(StoreError::QuotaExceeded)?;
        *usage.get_mut(meter) = after;
        Ok(())
    }

    /// Gives `bytes` of `meter` back to `run`'s owner, if it has one.
    fn refund(&mut self, run: &RunId, meter: Meter, bytes: u64) {
        if let Some(owner) = self.owners.get(run).cloned() {
            let delta = quota::growth(bytes, 0);
            let _ = self.charge(&owner, meter, delta, u64::MAX);
        }
    }
}

#[derive(Debug, Default)]
struct RunCheckpoints {
    by_id: HashMap<String, Checkpoint>,
    /// Always names an entry of `by_id` once set: checkpoints are deleted
    /// only with their whole run.
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

    fn kv_set_charged(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        charge: Charge,
    ) -> StoreFuture<()> {
        // Inserting into a map cannot fail halfway, so holding the lock for
        // the counts and the whole loop is all the atomicity needed.
        if pairs.is_empty() {
            return done(Ok(()));
        }
        let mut state = self.state.lock();
        let existing = state.kv.get(run);
        let held = existing.map_or(0, HashMap::len);
        let (mut new_keys, mut before, mut after) = (0usize, 0u64, 0u64);
        for (k, v) in &pairs {
            match existing.and_then(|values| values.get(k)) {
                Some(old) => before += quota::kv_entry_bytes(k, old),
                None => new_keys += 1,
            }
            after += quota::kv_entry_bytes(k, v);
        }
        if new_keys > 0 && held.saturating_add(new_keys) > max_keys {
            return done(Err(StoreError::TooManyKeys { max: max_keys }));
        }
        let payer = state.payer(run, &charge);
        let delta = quota::growth(before, after);
        if let Err(e) = state.charge(&payer, Meter::KvBytes, delta, charge.limit) {
            return done(Err(e));
        }
        state.owners.entry(run.clone()).or_insert(payer);
        state.kv.entry(run.clone()).or_default().extend(pairs);
        done(Ok(()))
    }

    fn kv_delete(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<u64> {
        let mut state = self.state.lock();
        let (mut deleted, mut freed) = (0u64, 0u64);
        if let Some(values) = state.kv.get_mut(run) {
            for k in keys {
                if let Some(v) = values.remove(&k) {
                    deleted += 1;
                    freed += quota::kv_entry_bytes(&k, &v);
                }
            }
        }
        state.refund(run, Meter::KvBytes, freed);
        done(Ok(deleted))
    }

    fn checkpoint_save_charged(
        &self,
        run: &RunId,
        checkpoint: Checkpoint,
        charge: Charge,
    ) -> StoreFuture<()> {
        let mut state = self.state.lock();
        let before = state
            .checkpoints
            .get(run)
            .and_then(|cps| cps.by_id.get(&checkpoint.id))
            .map_or(0, |old| {
                quota::checkpoint_bytes(&old.id, old.data.get().len())
            });
        let after = quota::checkpoint_bytes(&checkpoint.id, checkpoint.data.get().len());
        let payer = state.payer(run, &charge);
        let delta = quota::growth(before, after);
        if let Err(e) = state.charge(&payer, Meter::CheckpointBytes, delta, charge.limit) {
            return done(Err(e));
        }
        state.owners.entry(run.clone()).or_insert(payer);
        let run_cps = state.checkpoints.entry(run.clone()).or_default();
        run_cps.latest = Some(checkpoint.id.clone());
        run_cps.by_id.insert(checkpoint.id.clone(), checkpoint);
        done(Ok(()))
    }

    fn run_data_delete(&self, run: &RunId) -> StoreFuture<()> {
        let mut state = self.state.lock();
        let kv: u64 = state.kv.remove(run).map_or(0, |values| {
            values
                .iter()
                .map(|(k, v)| quota::kv_entry_bytes(k, v))
                .sum()
        });
        let checkpoints: u64 = state.checkpoints.remove(run).map_or(0, |cps| {
            cps.by_id
                .values()
                .map(|c| quota::checkpoint_bytes(&c.id, c.data.get().len()))
                .sum()
        });
        state.refund(run, Meter::KvBytes, kv);
        state.refund(run, Meter::CheckpointBytes, checkpoints);
        state.owners.remove(run);
        done(Ok(()))
    }

    fn quota_usage(&self, tenant: &str) -> StoreFuture<Usage> {
        let usage = self.state.lock().usage.get(tenant).copied();
        done(Ok(usage.unwrap_or_default()))
    }

    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>> {
        let state = self.state.lock();
        let found = state.checkpoints.get(run).and_then(|run_cps| {
            let id = id.as_ref().or(run_cps.latest.as_ref())?;
            run_cps.by_id.get(id).cloned()
        });
        done(Ok(found))
    }

    fn sessions_save_within(
        &self,
        changes: Vec<SessionChange>,
        max_runs_per_tenant: u64,
    ) -> StoreFuture<()> {
        let mut state = self.state.lock();
        let mut refused = None;
        for change in changes {
            match change {
                SessionChange::Put(record) => {
                    let fresh = !state.sessions.contains_key(&record.session_id);
                    if let (true, Some(tenant)) = (fresh, &record.tenant)
                        && let Err(e) = state.charge(tenant, Meter::Runs, 1, max_runs_per_tenant)
                    {
                        refused = Some(e);
                        continue;
                    }
                    state.sessions.insert(record.session_id.clone(), record);
                }
                SessionChange::Delete(id) => {
                    let tenant = state.sessions.remove(&id).and_then(|r| r.tenant);
                    if let Some(tenant) = tenant {
                        let _ = state.charge(&tenant, Meter::Runs, -1, u64::MAX);
                    }
                }
            }
        }
        done(refused.map_or(Ok(()), Err))
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
