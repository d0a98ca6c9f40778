//! Session records in Redis, and the fence that gives each session one
//! holder among the gateways.
//!
//! A session is *held* by the node that saved it last; the save script
//! (`SESSIONS_SAVE`) refuses a node's write of a session another node
//! holds at the same or a newer epoch, and a fresh session for a run that
//! has a live one ([`StoreError::Fenced`]). A save that moves a session to
//! a newer epoch on another node publishes the move (see
//! `session_moves`), so the old node fences its socket at once.
//!
//! Owns the records (`{p}:sessions`), who holds each (`{p}:session-holder`,
//! `{p}:held:{node}`), the index of each run's session
//! (`{p}:session-of-run`) and of a main session's sub-runs
//! (`{p}:children:{session}`), and the `runs` of each record's tenant
//! (`{p}:usage:{tenant}`), changed in the same script. Must not interpret a
//! record beyond the fields the fence and the count need (run, epoch,
//! expired, parent, tenant), must not decide
//! when a silent node's sessions move (that is `membership`), and must not
//! retry (see [`super`]).

use redis::Script;
use redis::aio::ConnectionManager;

use super::{LUA_MAX_LIMIT, Reply, answer, redis_error};
use crate::ids::{RunId, SessionId};
use crate::redis::keys::{Keys, padded_epoch};
use crate::store::records::{decode_session, encode_session};
use crate::store::{Meter, QuotaExceeded, SessionChange, SessionRecord, StoreError};

/// Applies session changes (`ARGV[4..]`, eight values each: `P`ut or
/// `D`elete, session id, run id, padded epoch, expired `0`/`1`, parent
/// session id or empty, record, tenant or empty) for node
/// `ARGV[2]` under prefix `ARGV[1]`, skipping those another node holds
/// and fresh ones past their tenant's `ARGV[3]` runs: returns them flat as
/// `{session id, holder's padded epoch or '' or 'q' .. runs held}`.
const SESSIONS_SAVE: &str = include_str!("sessions_save.lua");

/// The record of run `ARGV[1]`'s session and its holder entry
/// (`{record, holder}`), or nil.
const SESSION_OF_RUN: &str = include_str!("session_of_run.lua");

/// The record of each run in `ARGV` (false where it has none).
const SESSIONS_OF_RUNS: &str = include_str!("sessions_of_runs.lua");

/// The records of the session ids in set `KEYS[1]` (a node's held set,
/// or a main session's sub-runs), from hash `KEYS[2]`, each followed by its
/// holder entry from `KEYS[3]`: `{record, holder, ...}`. Members whose
/// record is gone leave the set.
const SESSION_SET: &str = include_str!("session_set.lua");

/// A sessions op, answered on its `reply`.
pub(super) enum Op {
    Save {
        changes: Vec<SessionChange>,
        max_runs: u64,
        reply: Reply<()>,
    },
    /// The sessions this node holds.
    Load { reply: Reply<Vec<SessionRecord>> },
    OfRun {
        run: RunId,
        reply: Reply<Option<(SessionRecord, bool)>>,
    },
    OfRuns {
        runs: Vec<RunId>,
        reply: Reply<Vec<Option<SessionRecord>>>,
    },
    SubSessions {
        parent: SessionId,
        reply: Reply<Vec<(SessionRecord, bool)>>,
    },
}

/// The sessions part of the store's task, for one node.
pub(super) struct Sessions {
    keys: Keys,
    node: String,
    save: Script,
    of_run: Script,
    of_runs: Script,
    set: Script,
}

impl Sessions {
    pub(super) fn new(keys: Keys, node: String) -> Sessions {
        Sessions {
            keys,
            node,
            save: Script::new(SESSIONS_SAVE),
            of_run: Script::new(SESSION_OF_RUN),
            of_runs: Script::new(SESSIONS_OF_RUNS),
            set: Script::new(SESSION_SET),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::Save {
                changes,
                max_runs,
                reply,
            } => answer(reply, self.save(conn, changes, max_runs).await),
            Op::Load { reply } => answer(reply, self.load(conn).await),
            Op::OfRun { run, reply } => answer(reply, self.of_run(conn, &run).await),
            Op::OfRuns { runs, reply } => answer(reply, self.of_runs(conn, &runs).await),
            Op::SubSessions { parent, reply } => {
                answer(reply, self.sub_sessions(conn, &parent).await)
            }
        }
    }

    async fn save(
        &self,
        conn: &mut ConnectionManager,
        changes: Vec<SessionChange>,
        max_runs: u64,
    ) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut invocation = self.save.key(self.keys.sessions());
        invocation
            .key(self.keys.session_holders())
            .key(self.keys.session_of_run())
            .arg(self.keys.prefix())
            .arg(&self.node)
            .arg(max_runs.min(LUA_MAX_LIMIT));
        for change in &changes {
            match change {
                SessionChange::Put(r) => invocation
                    .arg("P")
                    .arg(r.session_id.as_str())
                    .arg(r.run_id.as_str())
                    .arg(padded_epoch(r.epoch))
                    .arg(if r.expired { "1" } else { "0" })
                    .arg(r.parent.as_ref().map_or("", |p| p.as_str()))
                    .arg(encode_session(r))
                    .arg(r.tenant.as_deref().unwrap_or("")),
                SessionChange::Delete(id) => invocation
                    .arg("D")
                    .arg(id.as_str())
                    .arg("")
                    .arg("")
                    .arg("")
                    .arg("")
                    .arg("")
                    .arg(""),
            };
        }
        let refused: Vec<String> = invocation.invoke_async(conn).await.map_err(redis_error)?;
        if refused.is_empty() {
            return Ok(());
        }
        // `q` and a count: a fresh session past its tenant's runs.
        let mut over_quota = None;
        let sessions: Vec<_> = refused
            .chunks(2)
            .filter_map(|pair| {
                let second = pair.get(1).map(String::as_str).unwrap_or("");
                if let Some(used) = second.strip_prefix('q') {
                    over_quota = Some(QuotaExceeded {
                        meter: Meter::Runs,
                        used: used.parse().unwrap_or(max_runs),
                        requested: 1,
                        limit: max_runs,
                    });
                    return None;
                }
                let id = SessionId::new(pair.first()?.as_str()).ok()?;
                Some((id, second.parse().ok()))
            })
            .collect();
        match over_quota {
            Some(q) if sessions.is_empty() => Err(StoreError::QuotaExceeded(q)),
            _ => Err(StoreError::Fenced { sessions }),
        }
    }

    async fn load(&self, conn: &mut ConnectionManager) -> Result<Vec<SessionRecord>, StoreError> {
        let held = self.session_set(conn, self.keys.held(&self.node)).await?;
        Ok(held.into_iter().map(|(record, _)| record).collect())
    }

    async fn sub_sessions(
        &self,
        conn: &mut ConnectionManager,
        parent: &SessionId,
    ) -> Result<Vec<(SessionRecord, bool)>, StoreError> {
        self.session_set(conn, self.keys.children(parent)).await
    }

    /// The records of a set of session ids (see [`SESSION_SET`]), each
    /// with whether this node holds it.
    async fn session_set(
        &self,
        conn: &mut ConnectionManager,
        set: String,
    ) -> Result<Vec<(SessionRecord, bool)>, StoreError> {
        let mut invocation = self.set.key(set);
        invocation
            .key(self.keys.sessions())
            .key(self.keys.session_holders());
        let flat: Vec<Vec<u8>> = invocation.invoke_async(conn).await.map_err(redis_error)?;
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

    async fn of_run(
        &self,
        conn: &mut ConnectionManager,
        run: &RunId,
    ) -> Result<Option<(SessionRecord, bool)>, StoreError> {
        let mut invocation = self.of_run.key(self.keys.session_of_run());
        invocation
            .key(self.keys.sessions())
            .key(self.keys.session_holders())
            .arg(run.as_str());
        let found: Option<(Vec<u8>, String)> =
            invocation.invoke_async(conn).await.map_err(redis_error)?;
        let Some((bytes, holder)) = found else {
            return Ok(None);
        };
        let record = decode_session(&bytes)
            .map_err(|why| StoreError::Corrupt(format!("Redis: session of run {run}: {why}")))?;
        Ok(Some((record, self.held_here(holder.as_bytes()))))
    }

    async fn of_runs(
        &self,
        conn: &mut ConnectionManager,
        runs: &[RunId],
    ) -> Result<Vec<Option<SessionRecord>>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.of_runs.key(self.keys.session_of_run());
        invocation.key(self.keys.sessions());
        for run in runs {
            invocation.arg(run.as_str());
        }
        let records: Vec<Option<Vec<u8>>> =
            invocation.invoke_async(conn).await.map_err(redis_error)?;
        records
            .into_iter()
            .map(|r| r.as_deref().map(decode_one).transpose())
            .collect()
    }
}

/// Session records as the scripts return them.
pub(super) fn decode_all(records: Vec<Vec<u8>>) -> Result<Vec<SessionRecord>, StoreError> {
    records.iter().map(|bytes| decode_one(bytes)).collect()
}

fn decode_one(bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    decode_session(bytes).map_err(|why| StoreError::Corrupt(format!("Redis: session: {why}")))
}
