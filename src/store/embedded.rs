//! The default store: one redb file, `rungate.redb`, in the data directory.
//!
//! Owns the on-disk format and the one OS thread that owns the database.
//! Every [`Store`] call becomes an `Op` sent down a channel before the
//! method returns, so submission order is execution order (the ordering
//! contract in [`super`]). The thread runs whatever has queued up as one
//! batch inside one write transaction and one durable commit (group commit),
//! and answers the batch's ops only once that commit has returned, so an
//! `Ok` always means "on disk".
//! Must not touch redb from async code (every redb call blocks) and must not
//! panic on anything the disk or the caller can cause: failures become
//! [`StoreError`]s.
//!
//! # On-disk format (format version [`FORMAT_VERSION`])
//!
//! | table               | key                       | value                     |
//! |---------------------|---------------------------|---------------------------|
//! | `meta`              | `"format_version"`        | `u64`                     |
//! | `kv`                | `(run id, key)`           | value (`&str`)            |
//! | `checkpoints`       | `(run id, checkpoint id)` | checkpoint record (bytes) |
//! | `latest_checkpoint` | run id                    | checkpoint id (`&str`)    |
//! | `sessions`          | session id                | session record (bytes)    |
//! | `run_owner`         | run id                    | tenant charged for its KV and checkpoints (`&str`) |
//! | `quota_usage`       | `(tenant, meter)`         | what the tenant holds (`u64`) |
//!
//! Records are encoded as [`super::records`] says. The `sessions` table came
//! after format 1 shipped; opening an older file creates it empty, which is
//! what that file means (no session was kept). So did `run_owner` and
//! `quota_usage` (meters named as [`super::quota::Meter::as_str`] says):
//! created empty, they count nothing of what an older build stored. Every
//! change to a count is made in the transaction of the write it counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use super::quota::{self, Charge, Meter, Usage};
use super::records::{
    CHECKPOINT_HEADER_LEN, decode_checkpoint, decode_session, encode_checkpoint, encode_session,
};
use super::{Checkpoint, SessionChange, SessionRecord, Store, StoreError, StoreFuture};
use crate::ids::RunId;

/// The database file's name inside the data directory.
pub const FILE_NAME: &str = "rungate.redb";

/// Bump when the tables or the record encoding change in a way older or
/// newer builds would misread; `open` refuses a file with another version.
pub const FORMAT_VERSION: u64 = 1;

/// Most ops run in one transaction: bounds how long the first op of a burst
/// waits for its answer, and how much one failed commit takes down with it.
const MAX_BATCH: usize = 1024;

/// Bytes of answers (values read) one transaction may hold back until it
/// commits; past it the transaction commits early and the rest of the batch
/// runs in the next one. Without it, a burst of large reads would all be
/// held in memory at once.
const MAX_BATCH_HELD_BYTES: usize = 16 * 1024 * 1024;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format_version";
const KV: TableDefinition<(&str, &str), &str> = TableDefinition::new("kv");
const CHECKPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("checkpoints");
const LATEST: TableDefinition<&str, &str> = TableDefinition::new("latest_checkpoint");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const RUN_OWNER: TableDefinition<&str, &str> = TableDefinition::new("run_owner");
const QUOTA_USAGE: TableDefinition<(&str, &str), u64> = TableDefinition::new("quota_usage");

/// Handle to the store. Clones share one database and one worker thread.
/// Dropping the last clone blocks until the worker has run the ops already
/// queued and closed the file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while dropping: taking it closes the channel, which is
    /// how the worker learns to stop.
    tx: Option<mpsc::Sender<Op>>,
    worker: Option<JoinHandle<()>>,
    path: PathBuf,
    commits: Arc<AtomicU64>,
}

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
        charge: Charge,
        reply: Reply<()>,
    },
    KvDelete {
        run: RunId,
        keys: Vec<String>,
        reply: Reply<u64>,
    },
    CheckpointSave {
        run: RunId,
        checkpoint: Checkpoint,
        charge: Charge,
        reply: Reply<()>,
    },
    RunDataDelete {
        run: RunId,
        reply: Reply<()>,
    },
    QuotaUsage {
        tenant: String,
        reply: Reply<Usage>,
    },
    CheckpointLoad {
        run: RunId,
        id: Option<String>,
        reply: Reply<Option<Checkpoint>>,
    },
    SessionsSave {
        changes: Vec<SessionChange>,
        max_runs: u64,
        reply: Reply<()>,
    },
    SessionsLoad {
        reply: Reply<Vec<SessionRecord>>,
    },
    /// Needs no work of its own: it is answered after its batch commits,
    /// and every earlier batch committed before it was answered.
    Flush {
        reply: Reply<()>,
    },
    /// Kills the worker the way a redb panic would.
    #[cfg(test)]
    Crash,
}

impl Op {
    fn is_write(&self) -> bool {
        match self {
            Op::KvSet { pairs, .. } => !pairs.is_empty(),
            Op::KvDelete { keys, .. } => !keys.is_empty(),
            Op::CheckpointSave { .. } | Op::RunDataDelete { .. } => true,
            Op::SessionsSave { changes, .. } => !changes.is_empty(),
            _ => false,
        }
    }

    /// Answers without running: the batch it was in has failed.
    fn fail(self, msg: &str) {
        fn err<T>(msg: &str) -> Result<T, StoreError> {
            Err(StoreError::Unavailable(msg.to_string()))
        }
        // A send fails only when the caller dropped the future, which is
        // allowed; nobody is left to tell.
        match self {
            Op::KvGet { reply, .. } => drop(reply.send(err(msg))),
            Op::KvSet { reply, .. }
            | Op::CheckpointSave { reply, .. }
            | Op::RunDataDelete { reply, .. }
            | Op::SessionsSave { reply, .. }
            | Op::Flush { reply } => drop(reply.send(err(msg))),
            Op::KvDelete { reply, .. } => drop(reply.send(err(msg))),
            Op::QuotaUsage { reply, .. } => drop(reply.send(err(msg))),
            Op::SessionsLoad { reply } => drop(reply.send(err(msg))),
            Op::CheckpointLoad { reply, .. } => drop(reply.send(err(msg))),
            #[cfg(test)]
            Op::Crash => {}
        }
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`, checks that its format
    /// is the one this build writes, and starts the worker thread.
    ///
    /// Blocks while redb opens the file, which includes a full integrity
    /// check (see `open_database`); call it before serving, not from a
    /// busy async task.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(StoreError::Unavailable(format!(
                    "data directory {} exists but is not a directory",
                    dir.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot create data directory {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot access data directory {}: {e}",
                    dir.display()
                )));
            }
        }
        let path = dir.join(FILE_NAME);
        let db = open_database(&path)?;
        prepare(&db, &path)?;

        let (tx, rx) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            db,
            path: path.clone(),
            commits: commits.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("rungate-store".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot start the storage thread for {}: {e}",
                    path.display()
                ))
            })?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                tx: Some(tx),
                worker: Some(handle),
                path,
                commits,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many write transactions have been committed since `open`. Fewer
    /// than the number of writes means group commit is batching them.
    pub fn durable_commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    fn submit<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Op) -> StoreFuture<T> {
        let (reply, answer) = oneshot::channel();
        let sent = match &self.inner.tx {
            Some(tx) => tx.send(make(reply)).is_ok(),
            None => false,
        };
        if !sent {
            return Box::pin(std::future::ready(Err(worker_gone())));
        }
        // A dropped reply means the worker died mid-batch (a panic in redb).
        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(worker_gone())) })
    }

    #[cfg(test)]
    fn crash_worker(&self) {
        if let Some(tx) = &self.inner.tx {
            let _ = tx.send(Op::Crash);
        }
    }
}

fn worker_gone() -> StoreError {
    StoreError::Unavailable("the storage thread has stopped".into())
}

impl Drop for Inner {
    /// Waits for the worker, so the queued ops are on disk and the file lock
    /// is released when the last handle is gone: a store reopened right
    /// after would otherwise find the file still locked. The wait is bounded
    /// by the ops already queued.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(worker) = self.worker.take() {
            // Err means the worker panicked; its callers were already told.
            let _ = worker.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store for EmbeddedStore {
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

    fn kv_set_charged(
        &self,
        run: &RunId,
        pairs: BTreeMap<String, String>,
        max_keys: usize,
        charge: Charge,
    ) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| Op::KvSet {
            run,
            pairs,
            max_keys,
            charge,
            reply,
        })
    }

    fn kv_delete(&self, run: &RunId, keys: Vec<String>) -> StoreFuture<u64> {
        let run = run.clone();
        self.submit(|reply| Op::KvDelete { run, keys, reply })
    }

    fn checkpoint_save_charged(
        &self,
        run: &RunId,
        checkpoint: Checkpoint,
        charge: Charge,
    ) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| Op::CheckpointSave {
            run,
            checkpoint,
            charge,
            reply,
        })
    }

    fn run_data_delete(&self, run: &RunId) -> StoreFuture<()> {
        let run = run.clone();
        self.submit(|reply| Op::RunDataDelete { run, reply })
    }

    fn quota_usage(&self, tenant: &str) -> StoreFuture<Usage> {
        let tenant = tenant.to_owned();
        self.submit(|reply| Op::QuotaUsage { tenant, reply })
    }

    fn checkpoint_load(&self, run: &RunId, id: Option<String>) -> StoreFuture<Option<Checkpoint>> {
        let run = run.clone();
        self.submit(|reply| Op::CheckpointLoad { run, id, reply })
    }

    fn sessions_save_within(
        &self,
        changes: Vec<SessionChange>,
        max_runs_per_tenant: u64,
    ) -> StoreFuture<()> {
        self.submit(|reply| Op::SessionsSave {
            changes,
            max_runs: max_runs_per_tenant,
            reply,
        })
    }

    fn sessions_load(&self) -> StoreFuture<Vec<SessionRecord>> {
        self.submit(|reply| Op::SessionsLoad { reply })
    }

    fn flush(&self) -> StoreFuture<()> {
        self.submit(|reply| Op::Flush { reply })
    }
}

/// Opens or creates the file, turning every redb failure into a
/// [`StoreError`] that names the file.
///
/// The integrity check makes the open read the whole file, but a plain
/// redb open may panic on a file damaged outside redb, and a store must
/// report a bad file, not crash the gateway. `catch_unwind` is the last line
/// behind it.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let opened = std::panic::catch_unwind(|| {
        Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)
    });
    let err = match opened {
        Ok(Ok(db)) => return Ok(db),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(StoreError::Corrupt(format!(
                "{} is damaged: the storage engine crashed reading it",
                path.display()
            )));
        }
    };
    let shown = path.display();
    Err(match err {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
            "{shown} is already in use (another rungate process or store is using this data directory)"
        )),
        redb::DatabaseError::UpgradeRequired(v) => StoreError::Corrupt(format!(
            "{shown} uses redb file format {v}, which this rungate build cannot read"
        )),
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => {
            StoreError::Corrupt(format!("{shown} is not a valid rungate database: {why}"))
        }
        // redb's way of saying "not a redb file" (bad magic number).
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt(format!("{shown} is not a valid rungate database: {e}"))
        }
        other => StoreError::Unavailable(format!("cannot open {shown}: {other}")),
    })
}

/// Checks (or, on a fresh file, writes) the format version and creates the
/// tables, so the worker never meets a missing or mistyped table.
fn prepare(db: &Database, path: &Path) -> Result<(), StoreError> {
    let shown = path.display();
    let unavailable = |e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("cannot initialize {shown}: {e}"))
    };
    let incompatible = |what: String| {
        StoreError::Corrupt(format!(
            "data directory was written by an incompatible rungate version ({what} in {shown}; \
             this build reads and writes format {FORMAT_VERSION})"
        ))
    };
    let table_error = |e: redb::TableError| match e {
        redb::TableError::Storage(e) => unavailable(&e),
        other => incompatible(other.to_string()),
    };

    let txn = db.begin_write().map_err(|e| unavailable(&e))?;
    {
        let fresh = txn
            .list_tables()
            .map_err(|e| unavailable(&e))?
            .next()
            .is_none();
        let mut meta = txn.open_table(META).map_err(table_error)?;
        let found = meta
            .get(FORMAT_KEY)
            .map_err(|e| unavailable(&e))?
            .map(|v| v.value());
        match found {
            Some(FORMAT_VERSION) => {}
            Some(other) => return Err(incompatible(format!("format version {other}"))),
            None if fresh => {
                meta.insert(FORMAT_KEY, FORMAT_VERSION)
                    .map_err(|e| unavailable(&e))?;
            }
            None => {
                return Err(StoreError::Corrupt(format!(
                    "{shown} is a redb database but not one rungate wrote (it has no format version)"
                )));
            }
        }
        txn.open_table(KV).map_err(table_error)?;
        txn.open_table(CHECKPOINTS).map_err(table_error)?;
        txn.open_table(LATEST).map_err(table_error)?;
        txn.open_table(SESSIONS).map_err(table_error)?;
        txn.open_table(RUN_OWNER).map_err(table_error)?;
        txn.open_table(QUOTA_USAGE).map_err(table_error)?;
    }
    txn.commit().map_err(|e| unavailable(&e))
}

/// Owned by the worker thread.
struct Worker {
    db: Database,
    path: PathBuf,
    commits: Arc<AtomicU64>,
}

/// An executed op's answer, held back until its batch has committed. Called
/// with `Some(reason)` if the batch failed after all.
type Answer = Box<dyn FnOnce(Option<&str>)>;

fn answer<T: 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |failed| {
        let result = match failed {
            Some(msg) => Err(StoreError::Unavailable(msg.to_string())),
            None => result,
        };
        // The caller may have dropped the future; that is allowed.
        let _ = reply.send(result);
    })
}

/// Why one op could not produce its result.
enum Failure {
    /// The engine failed: the whole batch is rolled back and fails.
    Batch(String),
    /// Only this op fails (a record on disk it cannot decode); the batch
    /// goes on.
    Op(StoreError),
}

/// Turns one op's outcome into its held-back answer, plus the reason the
/// batch must fail, if it must.
fn settle<T: 'static>(reply: Reply<T>, outcome: Result<T, Failure>) -> (Answer, Option<String>) {
    match outcome {
        Ok(v) => (answer(reply, Ok(v)), None),
        Err(Failure::Op(e)) => (answer(reply, Err(e)), None),
        Err(Failure::Batch(msg)) => (
            answer(reply, Err(StoreError::Unavailable(msg.clone()))),
            Some(msg),
        ),
    }
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Op>) {
        // `recv` fails only once every sender is gone *and* the queue is
        // empty, so ops queued before the drop still run.
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn run_batch(&self, batch: Vec<Op>) {
        let mut ops = batch.into_iter();
        // More than one transaction when the first ones hold too much.
        while ops.len() > 0 {
            let mut answers: Vec<Answer> = Vec::with_capacity(ops.len());
            let outcome = self.execute_all(&mut ops, &mut answers);
            match outcome {
                Ok(()) => answers.into_iter().for_each(|a| a(None)),
                Err(msg) => {
                    tracing::warn!(path = %self.path.display(), error = %msg, "storage batch failed; nothing in it was written");
                    answers.into_iter().for_each(|a| a(Some(&msg)));
                    ops.for_each(|op| op.fail(&msg));
                    return;
                }
            }
        }
    }

    /// Runs ops from `ops` in one transaction, pushing each one's answer,
    /// then commits. On `Err` nothing was written and the ops still in
    /// `ops` never ran.
    fn execute_all(
        &self,
        ops: &mut std::vec::IntoIter<Op>,
        answers: &mut Vec<Answer>,
    ) -> Result<(), String> {
        let shown = self.path.display();
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| format!("cannot start a write to {shown}: {e}"))?;
        // The default already, but `Ok` promises "on disk", so say it.
        txn.set_durability(Durability::Immediate)
            .map_err(|e| format!("cannot request durable commits on {shown}: {e}"))?;
        let mut wrote = false;
        {
            let mut tables = Tables::open(&txn, &self.path)?;
            for op in ops.by_ref() {
                wrote |= op.is_write();
                let (answer, failed) = tables.execute(op);
                answers.push(answer);
                // A failed insert may leave part of an op written; only
                // dropping the whole transaction keeps every op all-or-none.
                if let Some(msg) = failed {
                    return Err(msg);
                }
                if tables.held > MAX_BATCH_HELD_BYTES {
                    break;
                }
            }
        }
        if wrote {
            txn.commit()
                .map_err(|e| format!("cannot commit to {shown}: {e}"))?;
            self.commits.fetch_add(1, Ordering::Relaxed);
        } else if let Err(e) = txn.abort() {
            // Reads only: their answers came from a consistent snapshot and
            // stay right, so this is worth a log line, not a failure.
            tracing::warn!(path = %shown, error = %e, "aborting a read-only storage batch failed");
        }
        Ok(())
    }
}

fn storage(path: &Path, e: redb::StorageError) -> Failure {
    Failure::Batch(format!("storage error in {}: {e}", path.display()))
}

/// The tables of one batch's transaction.
struct Tables<'txn> {
    kv: Table<'txn, (&'static str, &'static str), &'static str>,
    checkpoints: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    latest: Table<'txn, &'static str, &'static str>,
    sessions: Table<'txn, &'static str, &'static [u8]>,
    owners: Table<'txn, &'static str, &'static str>,
    usage: Table<'txn, (&'static str, &'static str), u64>,
    path: &'txn Path,
    /// Bytes of values read so far, held until the transaction ends.
    held: usize,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction, path: &'txn Path) -> Result<Tables<'txn>, String> {
        let err = |e: redb::TableError| format!("cannot open a table in {}: {e}", path.display());
        Ok(Tables {
            kv: txn.open_table(KV).map_err(err)?,
            checkpoints: txn.open_table(CHECKPOINTS).map_err(err)?,
            latest: txn.open_table(LATEST).map_err(err)?,
            sessions: txn.open_table(SESSIONS).map_err(err)?,
            owners: txn.open_table(RUN_OWNER).map_err(err)?,
            usage: txn.open_table(QUOTA_USAGE).map_err(err)?,
            path,
            held: 0,
        })
    }

    fn execute(&mut self, op: Op) -> (Answer, Option<String>) {
        match op {
            Op::KvGet {
                run,
                keys,
                max_bytes,
                reply,
            } => settle(reply, self.kv_get(&run, keys, max_bytes)),
            Op::KvSet {
                run,
                pairs,
                max_keys,
                charge,
                reply,
            } => settle(reply, self.kv_set(&run, &pairs, max_keys, &charge)),
            Op::KvDelete { run, keys, reply } => settle(reply, self.kv_delete(&run, keys)),
            Op::CheckpointSave {
                run,
                checkpoint,
                charge,
                reply,
            } => settle(reply, self.checkpoint_save(&run, &checkpoint, &charge)),
            Op::RunDataDelete { run, reply } => settle(reply, self.run_data_delete(&run)),
            Op::QuotaUsage { tenant, reply } => settle(reply, self.quota_usage(&tenant)),
            Op::CheckpointLoad { run, id, reply } => {
                let loaded = self.checkpoint_load(&run, id);
                if let Ok(Some(c)) = &loaded {
                    self.held = self.held.saturating_add(c.data.get().len());
                }
                settle(reply, loaded)
            }
            Op::SessionsSave {
                changes,
                max_runs,
                reply,
            } => settle(reply, self.sessions_save(changes, max_runs)),
            Op::SessionsLoad { reply } => settle(reply, self.sessions_load()),
            Op::Flush { reply } => settle(reply, Ok(())),
            #[cfg(test)]
            Op::Crash => panic!("storage worker crashed on purpose (test)"),
        }
    }

    fn kv_get(
        &mut self,
        run: &RunId,
        keys: Vec<String>,
        max_bytes: usize,
    ) -> Result<BTreeMap<String, String>, Failure> {
        let mut found = BTreeMap::new();
        let mut bytes = 0usize;
        for key in keys {
            let value = self
                .kv
                .get((run.as_str(), key.as_str()))
                .map_err(|e| storage(self.path, e))?;
            if let Some(value) = value {
                let value = value.value();
                bytes = bytes.saturating_add(key.len() + value.len());
                // Checked before copying the value out: a refused read
                // never holds more than its limit.
                if bytes > max_bytes {
                    return Err(Failure::Op(StoreError::ReplyTooLarge { max: max_bytes }));
                }
                found.insert(key, value.to_string());
            }
        }
        self.held = self.held.saturating_add(bytes);
        Ok(found)
    }

    fn kv_set(
        &mut self,
        run: &RunId,
        pairs: &BTreeMap<String, String>,
        max_keys: usize,
        charge: &Charge,
    ) -> Result<(), Failure> {
        let path = self.path;
        let (mut new_keys, mut before, mut after) = (0, 0u64, 0u64);
        for (key, value) in pairs {
            let found = self
                .kv
                .get((run.as_str(), key.as_str()))
                .map_err(|e| storage(path, e))?;
            match found {
                Some(old) => before += quota::kv_entry_bytes(key, old.value()),
                None => new_keys += 1,
            }
            after += quota::kv_entry_bytes(key, value);
        }
        // Only a write that adds keys pays for counting the run's keys (a
        // range scan, at most `max_keys` long once the limit holds).
        if new_keys > 0 && max_keys != usize::MAX {
            let mut held = 0usize;
            let range = self
                .kv
                .range((run.as_str(), "")..)
                .map_err(|e| storage(path, e))?;
            for entry in range {
                let (k, _) = entry.map_err(|e| storage(path, e))?;
                if k.value().0 != run.as_str() || held + new_keys > max_keys {
                    break;
                }
                held += 1;
            }
            if held.saturating_add(new_keys) > max_keys {
                return Err(Failure::Op(StoreError::TooManyKeys { max: max_keys }));
            }
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let payer = self.charge(run, charge, Meter::KvBytes, quota::growth(before, after))?;
        for (key, value) in pairs {
            self.kv
                .insert((run.as_str(), key.as_str()), value.as_str())
                .map_err(|e| storage(path, e))?;
        }
        self.own(run, &payer)
    }

    fn kv_delete(&mut self, run: &RunId, keys: Vec<String>) -> Result<u64, Failure> {
        let path = self.path;
        let (mut deleted, mut freed) = (0u64, 0u64);
        for key in keys {
            let removed = self
                .kv
                .remove((run.as_str(), key.as_str()))
                .map_err(|e| storage(path, e))?;
            if let Some(value) = removed {
                deleted += 1;
                freed += quota::kv_entry_bytes(&key, value.value());
            }
        }
        self.refund(run, Meter::KvBytes, freed)?;
        Ok(deleted)
    }

    fn checkpoint_save(
        &mut self,
        run: &RunId,
        checkpoint: &Checkpoint,
        charge: &Charge,
    ) -> Result<(), Failure> {
        let record = encode_checkpoint(checkpoint);
        let key = (run.as_str(), checkpoint.id.as_str());
        let path = self.path;
        let before = self
            .checkpoints
            .get(key)
            .map_err(|e| storage(path, e))?
            .map_or(0, |old| {
                stored_checkpoint_bytes(&checkpoint.id, old.value())
            });
        let after = quota::checkpoint_bytes(&checkpoint.id, checkpoint.data.get().len());
        let payer = self.charge(
            run,
            charge,
            Meter::CheckpointBytes,
            quota::growth(before, after),
        )?;
        self.checkpoints
            .insert(key, record.as_slice())
            .map_err(|e| storage(path, e))?;
        self.latest
            .insert(run.as_str(), checkpoint.id.as_str())
            .map_err(|e| storage(path, e))?;
        self.own(run, &payer)
    }

    /// Every key and checkpoint of `run`, and its owner, gone; their bytes
    /// given back to that owner.
    fn run_data_delete(&mut self, run: &RunId) -> Result<(), Failure> {
        let path = self.path;
        let store_err = |e| storage(path, e);
        let mut kv_bytes = 0u64;
        let mut keys = Vec::new();
        for entry in self.kv.range((run.as_str(), "")..).map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            let (owner, key) = k.value();
            if owner != run.as_str() {
                break;
            }
            kv_bytes += quota::kv_entry_bytes(key, v.value());
            keys.push(key.to_owned());
        }
        for key in &keys {
            self.kv
                .remove((run.as_str(), key.as_str()))
                .map_err(store_err)?;
        }
        let mut cp_bytes = 0u64;
        let mut ids = Vec::new();
        for entry in self
            .checkpoints
            .range((run.as_str(), "")..)
            .map_err(store_err)?
        {
            let (k, v) = entry.map_err(store_err)?;
            let (owner, id) = k.value();
            if owner != run.as_str() {
                break;
            }
            cp_bytes += stored_checkpoint_bytes(id, v.value());
            ids.push(id.to_owned());
        }
        for id in &ids {
            self.checkpoints
                .remove((run.as_str(), id.as_str()))
                .map_err(store_err)?;
        }
        self.latest.remove(run.as_str()).map_err(store_err)?;
        self.refund(run, Meter::KvBytes, kv_bytes)?;
        self.refund(run, Meter::CheckpointBytes, cp_bytes)?;
        self.owners.remove(run.as_str()).map_err(store_err)?;
        Ok(())
    }

    fn quota_usage(&self, tenant: &str) -> Result<Usage, Failure> {
        let mut usage = Usage::default();
        for meter in Meter::ALL {
            *usage.get_mut(meter) = self.used(tenant, meter)?;
        }
        Ok(usage)
    }

    fn used(&self, tenant: &str, meter: Meter) -> Result<u64, Failure> {
        Ok(self
            .usage
            .get((tenant, meter.as_str()))
            .map_err(|e| storage(self.path, e))?
            .map_or(0, |v| v.value()))
    }

    /// Grows `tenant`'s `meter` by `delta` if [`quota::admit`] allows.
    fn add(&mut self, tenant: &str, meter: Meter, delta: i64, limit: u64) -> Result<(), Failure> {
        let used = self.used(tenant, meter)?;
        let after = quota::admit(meter, used, delta, limit)
            .map_err(|q| Failure::Op(StoreError::QuotaExceeded(q)))?;
        if after != used {
            self.usage
                .insert((tenant, meter.as_str()), after)
                .map_err(|e| storage(self.path, e))?;
        }
        Ok(())
    }

    /// The tenant `run`'s data is charged to: its owner, or `charge`'s
    /// tenant for a run that has none yet.
    fn payer(&self, run: &RunId, charge: &Charge) -> Result<String, Failure> {
        let owner = self
            .owners
            .get(run.as_str())
            .map_err(|e| storage(self.path, e))?;
        Ok(owner.map_or_else(|| charge.tenant.clone(), |o| o.value().to_owned()))
    }

    /// Charges `delta` of `meter` for a write to `run` (before anything of
    /// the write is stored); returns who paid, the run's owner from then on.
    fn charge(
        &mut self,
        run: &RunId,
        charge: &Charge,
        meter: Meter,
        delta: i64,
    ) -> Result<String, Failure> {
        let payer = self.payer(run, charge)?;
        self.add(&payer, meter, delta, charge.limit)?;
        Ok(payer)
    }

    fn own(&mut self, run: &RunId, payer: &str) -> Result<(), Failure> {
        let path = self.path;
        let known = self
            .owners
            .get(run.as_str())
            .map_err(|e| storage(path, e))?
            .is_some();
        if !known {
            self.owners
                .insert(run.as_str(), payer)
                .map_err(|e| storage(path, e))?;
        }
        Ok(())
    }

    /// Gives `bytes` of `meter` back to `run`'s owner, if it has one.
    fn refund(&mut self, run: &RunId, meter: Meter, bytes: u64) -> Result<(), Failure> {
        let owner = self
            .owners
            .get(run.as_str())
            .map_err(|e| storage(self.path, e))?
            .map(|o| o.value().to_owned());
        match owner {
            Some(owner) if bytes > 0 => self.add(&owner, meter, quota::growth(bytes, 0), u64::MAX),
            _ => Ok(()),
        }
    }

    fn checkpoint_load(
        &self,
        run: &RunId,
        id: Option<String>,
    ) -> Result<Option<Checkpoint>, Failure> {
        let named = id.is_some();
        let id = match id {
            Some(id) => id,
            None => match self
                .latest
                .get(run.as_str())
                .map_err(|e| storage(self.path, e))?
            {
                Some(id) => id.value().to_string(),
                None => return Ok(None),
            },
        };
        let record = self
            .checkpoints
            .get((run.as_str(), id.as_str()))
            .map_err(|e| storage(self.path, e))?;
        let Some(record) = record else {
            if named {
                return Ok(None);
            }
            return Err(Failure::Op(StoreError::Corrupt(format!(
                "{}: run {run}'s latest checkpoint is {id:?}, which is missing",
                self.path.display()
            ))));
        };
        decode_checkpoint(id.clone(), record.value())
            .map(Some)
            .map_err(|why| {
                Failure::Op(StoreError::Corrupt(format!(
                    "{}: checkpoint {id:?} of run {run}: {why}",
                    self.path.display()
                )))
            })
    }
}

/// What a stored checkpoint record of id `id` counts (see
/// [`quota::checkpoint_bytes`]).
fn stored_checkpoint_bytes(id: &str, record: &[u8]) -> u64 {
    quota::checkpoint_bytes(id, record.len().saturating_sub(CHECKPOINT_HEADER_LEN))
}

impl Tables<'_> {
    fn sessions_save(&mut self, changes: Vec<SessionChange>, max_runs: u64) -> Result<(), Failure> {
        let path = self.path;
        let mut refused = None;
        for change in changes {
            match change {
                SessionChange::Put(record) => {
                    let bytes = encode_session(&record);
                    let fresh = self
                        .sessions
                        .insert(record.session_id.as_str(), bytes.as_slice())
                        .map_err(|e| storage(path, e))?
                        .is_none();
                    // Renewals are most saves: only a session the table
                    // did not have counts, which the insert tells for free.
                    if let (true, Some(tenant)) = (fresh, &record.tenant)
                        && let Err(failure) = self.add(tenant, Meter::Runs, 1, max_runs)
                    {
                        let Failure::Op(e) = failure else {
                            return Err(failure);
                        };
                        self.sessions
                            .remove(record.session_id.as_str())
                            .map_err(|e| storage(path, e))?;
                        refused = Some(e);
                    }
                }
                SessionChange::Delete(id) => {
                    let old = self
                        .sessions
                        .remove(id.as_str())
                        .map_err(|e| storage(path, e))?;
                    // A record that cannot be read counted for nobody we
                    // can name; forgetting it is still right.
                    let tenant = old.and_then(|r| decode_session(r.value()).ok()?.tenant);
                    if let Some(tenant) = tenant {
                        self.add(&tenant, Meter::Runs, -1, u64::MAX)?;
                    }
                }
            }
        }
        match refused {
            Some(e) => Err(Failure::Op(e)),
            None => Ok(()),
        }
    }

    /// All records, or `Corrupt` naming the first one that cannot be read:
    /// a restarted gateway must not silently forget a session it promised.
    fn sessions_load(&self) -> Result<Vec<SessionRecord>, Failure> {
        let path = self.path;
        let mut records = Vec::new();
        for entry in self.sessions.iter().map_err(|e| storage(path, e))? {
            let (key, value) = entry.map_err(|e| storage(path, e))?;
            let record = decode_session(value.value()).map_err(|why| {
                Failure::Op(StoreError::Corrupt(format!(
                    "{}: session {:?}: {why}",
                    path.display(),
                    key.value()
                )))
            })?;
            records.push(record);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::time::Timestamp;
    use serde_json::value::RawValue;

    async fn make() -> Option<(Arc<dyn Store>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        Some((Arc::new(store), dir))
    }

    crate::store::conformance::conformance_tests!(make);

    fn run(s: &str) -> RunId {
        RunId::new(s).unwrap()
    }

    fn one(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_string(), v.to_string())])
    }

    fn checkpoint(id: &str, millis: u64, json: &str) -> Checkpoint {
        Checkpoint {
            id: id.into(),
            saved_at: Timestamp::from_unix_millis(millis),
            data: RawValue::from_string(json.into()).unwrap(),
        }
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = run("run-1");
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.kv_set(&r, one("k", "v")).await.unwrap();
            store
                .checkpoint_save(&r, checkpoint("cp-1", 1_000, r#"{"a":1}"#))
                .await
                .unwrap();
            store
                .checkpoint_save(&r, checkpoint("cp-2", 2_000, r#"{"a":2}"#))
                .await
                .unwrap();
        }
        assert!(dir.path().join(FILE_NAME).is_file());
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.kv_get(&r, vec!["k".into()]).await.unwrap(),
            one("k", "v")
        );
        let latest = store.checkpoint_load(&r, None).await.unwrap().unwrap();
        assert_eq!(
            (latest.id.as_str(), latest.data.get()),
            ("cp-2", r#"{"a":2}"#)
        );
        assert_eq!(latest.saved_at, Timestamp::from_unix_millis(2_000));
        let first = store
            .checkpoint_load(&r, Some("cp-1".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.data.get(), r#"{"a":1}"#);
    }

    /// The counts are in the file, beside the data: a reopened store refuses
    /// what the first one would. A file from before quotas (no count tables)
    /// opens with nothing counted, and deleting what it held never takes a
    /// count below zero.
    #[tokio::test]
    async fn quota_counts_survive_reopen_and_an_older_file_counts_nothing() {
        use crate::store::{Charge, SessionChange, StoreError};
        let dir = tempfile::tempdir().unwrap();
        let r = run("run-q");
        let charge = Charge::new("sub:t", 20);
        let mut session = crate::store::conformance::session("run-q", 0);
        session.tenant = Some("sub:t".into());
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store
                .kv_set_charged(&r, one("k", "123456789"), usize::MAX, charge.clone())
                .await
                .unwrap();
            store
                .checkpoint_save_charged(&r, checkpoint("c", 1_000, "1234"), charge.clone())
                .await
                .unwrap();
            store
                .sessions_save_within(vec![SessionChange::Put(session.clone())], 1)
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let usage = store.quota_usage("sub:t").await.unwrap();
        assert_eq!(
            (usage.runs, usage.kv_bytes, usage.checkpoint_bytes),
            (1, 10, 5)
        );
        let err = store
            .kv_set_charged(&r, one("k2", &"x".repeat(9)), usize::MAX, charge.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::QuotaExceeded(ref q) if q.used == 10),
            "{err:?}"
        );
        let mut other = crate::store::conformance::session("run-q2", 0);
        other.tenant = Some("sub:t".into());
        assert!(
            store
                .sessions_save_within(vec![SessionChange::Put(other)], 1)
                .await
                .is_err()
        );
        drop(store);

        // As if written before quotas: the count tables are not there.
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            assert!(txn.delete_table(QUOTA_USAGE).unwrap());
            assert!(txn.delete_table(RUN_OWNER).unwrap());
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.quota_usage("sub:t").await.unwrap(),
            Default::default()
        );
        assert_eq!(
            store.kv_get(&r, vec!["k".into()]).await.unwrap(),
            one("k", "123456789")
        );
        assert_eq!(store.kv_delete(&r, vec!["k".into()]).await.unwrap(), 1);
        store
            .sessions_save(vec![SessionChange::Delete(session.session_id.clone())])
            .await
            .unwrap();
        assert_eq!(
            store.quota_usage("sub:t").await.unwrap(),
            Default::default()
        );
        // From here on, what is written counts.
        store
            .kv_set_charged(&r, one("k", "1"), usize::MAX, charge)
            .await
            .unwrap();
        assert_eq!(store.quota_usage("sub:t").await.unwrap().kv_bytes, 2);
    }

    #[tokio::test]
    async fn sessions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = crate::store::conformance::session("run-a", 3);
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store
                .sessions_save(vec![SessionChange::Put(a.clone())])
                .await
                .unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.sessions_load().await.unwrap(), vec![a]);
    }

    /// A session record this build cannot read fails the whole load: the
    /// gateway must refuse to start rather than forget a session it
    /// acknowledged.
    #[tokio::test]
    async fn undecodable_session_record_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedStore::open(dir.path()).unwrap());
        for (name, bytes) in [
            ("bad-version", vec![9u8, b'{', b'}']),
            ("bad-json", b"\x01{not json".to_vec()),
            ("empty", Vec::new()),
        ] {
            {
                let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
                let txn = db.begin_write().unwrap();
                {
                    let mut table = txn.open_table(SESSIONS).unwrap();
                    table.retain(|_, _| false).unwrap();
                    table.insert(name, bytes.as_slice()).unwrap();
                }
                txn.commit().unwrap();
            }
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let err = store.sessions_load().await.unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    /// Ops submitted but never awaited are still written when the last
    /// handle is dropped, and the file is free to reopen at once.
    #[tokio::test]
    async fn drop_finishes_queued_ops() {
        let dir = tempfile::tempdir().unwrap();
        let r = run("run-1");
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let clone = store.clone();
            for i in 0..300 {
                drop(clone.kv_set(&r, one(&format!("k{i}"), &format!("v{i}"))));
            }
            drop(clone);
            drop(store.checkpoint_save(&r, checkpoint("cp", 5, "null")));
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
        let got = store.kv_get(&r, keys).await.unwrap();
        assert_eq!(got.len(), 300);
        assert_eq!(got["k299"], "v299");
        assert_eq!(
            store
                .checkpoint_load(&r, None)
                .await
                .unwrap()
                .unwrap()
                .data
                .get(),
            "null"
        );
    }

    /// 500 writes submitted at once must not take 500 commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_batches_writes() {
        let (_dir, store) = {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(dir.path()).unwrap();
            (dir, store)
        };
        let r = run("run-1");
        let before = store.durable_commits();
        let futures: Vec<_> = (0..500)
            .map(|i| store.kv_set(&r, one(&format!("k{i}"), "v")))
            .collect();
        for f in futures {
            f.await.unwrap();
        }
        let commits = store.durable_commits() - before;
        assert!(commits >= 1);
        assert!(commits < 500, "every write had its own commit ({commits})");
        // Reads alone commit nothing.
        store.kv_get(&r, vec!["k1".into()]).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.durable_commits() - before, commits);
    }

    #[tokio::test]
    async fn open_on_a_regular_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"hello").unwrap();
        let err = EmbeddedStore::open(&file).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );

        // A directory below a file cannot be created either.
        let below = file.join("sub");
        let err = EmbeddedStore::open(&below).unwrap_err();
        assert!(
            err.to_string().contains(&below.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn open_in_an_unwritable_location_is_an_error() {
        // /proc refuses new directories even to root.
        let path = Path::new("/proc/rungate-store-test/data");
        let err = EmbeddedStore::open(path).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            err.to_string().contains("/proc/rungate-store-test/data"),
            "{err}"
        );

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            let locked = dir.path().join("locked");
            std::fs::create_dir(&locked).unwrap();
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
            // Root ignores permissions; only check where they bite.
            let writable = std::fs::write(locked.join("probe"), b"").is_ok();
            if !writable {
                let err = EmbeddedStore::open(&locked).unwrap_err();
                assert!(
                    err.to_string().contains(&locked.display().to_string()),
                    "{err}"
                );
            }
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[tokio::test]
    async fn garbage_file_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(dir.path().join(FILE_NAME), garbage).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains(FILE_NAME), "{err}");

        std::fs::write(dir.path().join(FILE_NAME), b"short").unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }

    #[tokio::test]
    async fn incompatible_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedStore::open(dir.path()).unwrap());
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(FORMAT_KEY, FORMAT_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        let StoreError::Corrupt(msg) = &err else {
            panic!("expected Corrupt, got {err:?}");
        };
        assert!(msg.contains("incompatible rungate version"), "{msg}");
        assert!(
            msg.contains(&format!("format version {}", FORMAT_VERSION + 1)),
            "{msg}"
        );
        assert!(msg.contains(FILE_NAME), "{msg}");
    }

    #[tokio::test]
    async fn foreign_redb_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            let other: TableDefinition<u64, u64> = TableDefinition::new("someone-elses");
            txn.open_table(other).unwrap().insert(1, 2).unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[tokio::test]
    async fn second_open_of_the_same_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    /// A record damaged on disk fails that one load with `Corrupt`; the
    /// store keeps serving everything else.
    #[tokio::test]
    async fn undecodable_checkpoint_is_corrupt_for_that_load_only() {
        let dir = tempfile::tempdir().unwrap();
        let r = run("run-1");
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store
                .checkpoint_save(&r, checkpoint("good", 1, "1"))
                .await
                .unwrap();
        }
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(CHECKPOINTS).unwrap();
                table
                    .insert(("run-1", "bad-version"), [9u8, 0, 0].as_slice())
                    .unwrap();
                let mut not_json = vec![super::super::records::CHECKPOINT_RECORD_V1];
                not_json.extend_from_slice(&7u64.to_le_bytes());
                not_json.extend_from_slice(b"{not json");
                table
                    .insert(("run-1", "bad-json"), not_json.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for id in ["bad-version", "bad-json"] {
            let err = store
                .checkpoint_load(&r, Some(id.into()))
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{id}: {err:?}");
            assert!(err.to_string().contains(id), "{err}");
        }
        let good = store
            .checkpoint_load(&r, Some("good".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(good.data.get(), "1");
        store.kv_set(&r, one("still", "works")).await.unwrap();
    }

    #[tokio::test]
    async fn dead_worker_answers_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let r = run("run-1");
        store.crash_worker();
        let err = store.kv_set(&r, one("k", "v")).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let err = store.flush().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // Dropping the handle of a dead worker must not panic either.
        drop(store);
    }
}
