//! Every session the gateway knows, and the rules that move them between
//! sockets (PROTOCOL.md §3): fresh attach, reconnect with a higher connection
//! epoch, fencing, sub-runs, recovery, leases and expiry.
//!
//! [`SessionRegistry`] is a plain state machine in the quinn-proto shape: no
//! I/O, no clock of its own, no tasks. Every method that depends on time
//! takes `now`; every effect on a socket comes back as a value (who was
//! superseded, whose session expired) for the caller to deliver. Sockets are
//! only [`ConnId`]s here: this module must not know what a WebSocket is.
//!
//! One deadline index serves all sessions: a live session's entry is its
//! lease deadline; an expired session's entry is the moment its tombstone is
//! forgotten. The caller sleeps until [`SessionRegistry::next_deadline`] and
//! then calls [`SessionRegistry::expire_due`]; there is no task per session.
//!
//! Durability is the caller's too: the registry only remembers which
//! sessions changed since it was last asked. A change of identity, epoch or
//! state is [`SessionRegistry::take_changes`]; a lease merely renewed by a
//! heartbeat is [`SessionRegistry::take_renewals`], which may be saved
//! lazily (at thousands of heartbeats a second, one write each would be most
//! of the gateway's work). [`SessionRegistry::restore`] rebuilds the
//! sessions from saved records after a restart.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::ids::{Capabilities, Capability, OpaqueId, RunId, SessionId};
use crate::store::{PendingCancel, SessionChange, SessionRecord};
use crate::time::{Clock, Timestamp};

/// Names a connection (socket) without saying what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Where a session stands, as `runs.list` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Bound to a live socket.
    Attached,
    /// Its socket is gone; the lease is the reconnect window.
    Detached,
    /// The lease ran out. Remembered for a while so a late reconnect is told
    /// `SESSION_EXPIRED` rather than `NOT_FOUND`-ish silence.
    Expired,
}

/// Why a session operation was refused. The gateway maps each variant to
/// one protocol error code, in one place (`gateway::errors`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no such session on this connection")]
    NotAttached,
    #[error("session {session_id} moved to connection epoch {current_epoch}")]
    StaleEpoch {
        session_id: SessionId,
        current_epoch: u64,
    },
    #[error("connection epoch {offered} is not greater than the session's epoch {current}")]
    EpochNotGreater { offered: u64, current: u64 },
    /// `recoverConnections` names an epoch other than the main session's
    /// (above it as well as below: sub-runs move to the epoch the main
    /// session holds, nothing else).
    #[error(
        "connection epoch {offered} is not the main session's epoch {current}; sub-runs move to the main session's epoch"
    )]
    EpochNotMain { offered: u64, current: u64 },
    #[error("the session of run {run_id} has expired; attach afresh")]
    Expired { run_id: RunId },
    #[error("run {run_id} already has a live session")]
    RunTaken { run_id: RunId },
    #[error("run {run_id} is held by another runtime instance")]
    OtherInstance { run_id: RunId },
    #[error("{0}")]
    Forbidden(String),
    #[error("this socket already holds its maximum of {max} sessions")]
    TooManySessions { max: usize },
}

/// What a runtime asks for in `runtime.attach`.
#[derive(Debug, Clone)]
pub struct AttachParams {
    pub run_id: RunId,
    pub runtime_instance_id: OpaqueId,
    pub attempt_id: Option<OpaqueId>,
    pub reconnect: bool,
    pub connection_epoch: Option<u64>,
    pub capabilities: Capabilities,
    /// Whose `runs` quota a fresh session counts against (the store counts
    /// it when the session is saved; a reconnect keeps the session's own).
    pub tenant: Option<String>,
}

/// A read-only view of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub session_id: SessionId,
    pub run_id: RunId,
    pub runtime_instance_id: OpaqueId,
    pub epoch: u64,
    pub capabilities: Capabilities,
    pub lease_deadline: Instant,
    pub is_sub_run: bool,
    /// A viewer asked the run to stop and it has not ended yet.
    pub pending_cancel: Option<PendingCancel>,
}

/// A socket that lost a session to a newer epoch: it gets `session.superseded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    pub conn: ConnId,
    pub session_id: SessionId,
    pub run_id: RunId,
    pub new_epoch: u64,
}

/// A session whose lease ran out; `conn` (if any) gets `session.expired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub conn: Option<ConnId>,
    pub session_id: SessionId,
    pub run_id: RunId,
}

#[derive(Debug)]
pub struct AttachOutcome {
    pub session: SessionView,
    pub superseded: Option<Superseded>,
    /// True when this attach started a session (false: a reconnect).
    pub fresh: bool,
}

/// Run ids whose session state changed, for the caller to tell the streams.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub attached: usize,
    pub detached: usize,
    pub expired: usize,
}

#[derive(Debug)]
struct Session {
    id: SessionId,
    run_id: RunId,
    runtime_instance_id: OpaqueId,
    attempt_id: Option<OpaqueId>,
    epoch: u64,
    capabilities: Capabilities,
    /// The main session this sub-run belongs to.
    parent: Option<SessionId>,
    /// The socket the session is bound to; `None` while detached or expired.
    owner: Option<ConnId>,
    expired: bool,
    /// The key of this session's entry in `deadlines`.
    deadline: Instant,
    /// The deadline in the last record of this session taken for saving;
    /// `None` when that is not known (a session read from the store). A
    /// renewal is saved only once it moves the deadline more than
    /// [`LeasePolicy::renewal_save_step`] past this.
    saved_deadline: Option<Instant>,
    /// Sockets that held the session before and still remember it (they
    /// answer `STALE_EPOCH` for it); kept so forgetting the session can tidy
    /// them. Usually zero or one entry.
    former_owners: Vec<ConnId>,
    /// Another gateway holds it (a store shared between gateways said so).
    /// Kept only to answer for it: `STALE_EPOCH` to the sockets here that
    /// held it, `CONFLICT` to a fresh attach of its run. Its lease runs
    /// there, so its `deadline` here is when it is forgotten, it never
    /// expires here, and nothing about it is saved from here.
    elsewhere: bool,
    /// A viewer's `run.cancel`, pushed on every reattach until the run ends.
    cancel: Option<PendingCancel>,
    /// The tenant the session's record counts for (see [`AttachParams`]).
    tenant: Option<String>,
}

impl Session {
    fn view(&self) -> SessionView {
        SessionView {
            session_id: self.id.clone(),
            run_id: self.run_id.clone(),
            runtime_instance_id: self.runtime_instance_id.clone(),
            epoch: self.epoch,
            capabilities: self.capabilities,
            lease_deadline: self.deadline,
            is_sub_run: self.parent.is_some(),
            pending_cancel: self.cancel.clone(),
        }
    }

    /// The session's record, to be saved: its deadline is remembered as
    /// the saved one (`saved_deadline`). Every record the registry hands
    /// out for saving is made here, so that rule has one place.
    fn record_to_save(&mut self, clock: &Clock) -> SessionRecord {
        self.saved_deadline = Some(self.deadline);
        SessionRecord {
            session_id: self.id.clone(),
            run_id: self.run_id.clone(),
            runtime_instance_id: self.runtime_instance_id.clone(),
            attempt_id: self.attempt_id.clone(),
            epoch: self.epoch,
            capabilities: self.capabilities.iter().collect(),
            parent: self.parent.clone(),
            expired: self.expired,
            attached: self.owner.is_some(),
            deadline_unix_ms: clock.wall(self.deadline).unix_millis(),
            pending_cancel: self.cancel.clone(),
            tenant: self.tenant.clone(),
        }
    }

    fn from_record(r: SessionRecord, deadline: Instant, elsewhere: bool) -> Session {
        Session {
            id: r.session_id,
            run_id: r.run_id,
            runtime_instance_id: r.runtime_instance_id,
            attempt_id: r.attempt_id,
            epoch: r.epoch,
            capabilities: r.capabilities.into_iter().collect(),
            parent: r.parent,
            owner: None,
            expired: r.expired,
            deadline,
            saved_deadline: None,
            former_owners: Vec::new(),
            elsewhere,
            cancel: r.pending_cancel,
            tenant: r.tenant,
        }
    }

    fn state(&self) -> SessionState {
        if self.expired {
            SessionState::Expired
        } else if self.owner.is_some() {
            SessionState::Attached
        } else {
            SessionState::Detached
        }
    }
}

/// Where a session held here from a saved record stands in the deadline
/// index: a live one's saved deadline plus `slack` (renewals are saved
/// lazily, so the saved deadline may be up to that much behind the one the
/// runtime was promised), a tombstone's moment to be forgotten.
fn held_deadline(r: &SessionRecord, clock: &Clock, slack: Duration) -> Instant {
    // Slack is added in wall time, before mapping to an instant: mapping
    // clamps times already past to the clock's start.
    let slack_ms = if r.expired {
        0
    } else {
        slack.as_millis() as u64
    };
    clock.instant(Timestamp::from_unix_millis(
        r.deadline_unix_ms.saturating_add(slack_ms),
    ))
}

/// What the registry remembers about one socket.
#[derive(Debug, Default)]
struct ConnRecord {
    /// The socket's main session: its first attach still bound to it.
    main: Option<SessionId>,
    /// Sessions bound here now, in attach order.
    bound: Vec<SessionId>,
    /// Sessions that were bound here and moved on: answering `STALE_EPOCH`
    /// rather than `NOT_ATTACHED` for them tells the runtime it was fenced.
    moved_away: Vec<SessionId>,
}

/// Lease and tombstone lifetimes, and how many sessions one socket holds.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// How long an expired session is remembered.
    pub tombstone_ttl: Duration,
    /// Sessions (main and sub-runs) bound to one socket at once; an attach
    /// or recovery that would bind more is refused and changes nothing.
    pub max_sessions_per_conn: usize,
    /// Session records (live and tombstones) one tenant may have: counted
    /// by the store where a fresh session is saved (see
    /// [`crate::store::Store::sessions_save_within`]), not here.
    pub max_runs_per_tenant: u64,
}

impl LeasePolicy {
    /// How far a session's deadline may run ahead of its saved one before
    /// a renewal is saved: one lease. A heartbeat that moves the deadline
    /// less is not written, so a runtime heartbeating at the interval is
    /// saved about once per lease (every fourth heartbeat at the default
    /// three heartbeats per lease) rather than at every beat, which was
    /// most of the store's work at thousands of sessions (BENCHMARKS.md,
    /// heartbeats). The price is paid only after a restart or take-over: a
    /// restored lease may last up to this much longer than promised (see
    /// [`Self::saved_deadline_slack`]), never less.
    pub fn renewal_save_step(&self) -> Duration {
        self.lease_ttl
    }

    /// Added to a saved lease deadline when a session comes back from the
    /// store (a restart, or one taken over from another gateway). The saved
    /// deadline may be behind the one the runtime was promised by up to
    /// [`Self::renewal_save_step`] (renewals that moved it less were not
    /// written) plus a renewal period (one not saved yet) and the save
    /// itself; with this slack the lease is never cut short, and at most
    /// this much late.
    pub fn saved_deadline_slack(&self) -> Duration {
        self.renewal_save_step() + super::RENEWALS_SAVED_EVERY * 2
    }
}

/// All sessions. See the module docs.
#[derive(Debug)]
pub struct SessionRegistry {
    policy: LeasePolicy,
    /// Boxed: a session is some 250 bytes, and a table that is up to
    /// half empty after it grows would keep that much room per free slot
    /// (BENCHMARKS.md, idle sessions).
    sessions: HashMap<SessionId, Box<Session>>,
    by_run: HashMap<RunId, SessionId>,
    conns: HashMap<ConnId, ConnRecord>,
    deadlines: BTreeSet<(Instant, SessionId)>,
    /// Sessions started, moved, expired or forgotten since the last
    /// [`SessionRegistry::take_changes`].
    changed: HashSet<SessionId>,
    /// Sessions whose lease a heartbeat renewed since the last
    /// [`SessionRegistry::take_renewals`].
    renewed: HashSet<SessionId>,
}

/// What [`SessionRegistry::restore`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Runs whose session is live again (detached, waiting for its runtime).
    pub live: Vec<RunId>,
    /// Records of a run another (live, or newer) record holds: not
    /// restored, and deleted by the next [`SessionRegistry::take_changes`].
    pub dropped: usize,
}

impl SessionRegistry {
    pub fn new(policy: LeasePolicy) -> Self {
        SessionRegistry {
            policy,
            sessions: HashMap::new(),
            by_run: HashMap::new(),
            conns: HashMap::new(),
            deadlines: BTreeSet::new(),
            changed: HashSet::new(),
            renewed: HashSet::new(),
        }
    }

    pub fn policy(&self) -> LeasePolicy {
        self.policy
    }

    /// `runtime.attach` on socket `conn`: a fresh session, or with
    /// `reconnect` the run's session moved here at a higher epoch.
    pub fn attach(
        &mut self,
        conn: ConnId,
        params: AttachParams,
        now: Instant,
    ) -> Result<AttachOutcome, SessionError> {
        let socket_main = self.socket_main(conn);
        if let Some(main) = &socket_main
            && main.runtime_instance_id != params.runtime_instance_id
        {
            return Err(SessionError::Forbidden(format!(
                "this socket serves runtime instance {}; open another socket for another instance",
                main.runtime_instance_id
            )));
        }
        if params.reconnect {
            self.reconnect(conn, params, socket_main, now)
        } else {
            self.attach_fresh(conn, params, socket_main, now)
        }
    }

    fn socket_main(&self, conn: ConnId) -> Option<SessionView> {
        let main = self.conns.get(&conn)?.main.as_ref()?;
        self.sessions.get(main).map(|s| s.view())
    }

    fn attach_fresh(
        &mut self,
        conn: ConnId,
        params: AttachParams,
        socket_main: Option<SessionView>,
        now: Instant,
    ) -> Result<AttachOutcome, SessionError> {
        let replaced = if let Some(existing) = self
            .by_run
            .get(&params.run_id)
            .and_then(|id| self.sessions.get(id))
        {
            if !existing.expired {
                return Err(SessionError::RunTaken {
                    run_id: params.run_id,
                });
            }
            // An expired session's tombstone gives way to the fresh one,
            // once the fresh one is sure to be created.
            Some(existing.id.clone())
        } else {
            None
        };
        self.check_room(conn, 1)?;
        if let Some(old) = replaced {
            self.forget(&old);
        }
        let parent = match socket_main {
            None => None,
            Some(main) if main.capabilities.contains(Capability::SubtasksRun) => {
                Some(main.session_id)
            }
            Some(main) => {
                return Err(SessionError::Forbidden(format!(
                    "a sub-run needs the main session (run {}) to hold subtasks.run",
                    main.run_id
                )));
            }
        };
        let session = Session {
            id: SessionId::generate(),
            run_id: params.run_id.clone(),
            runtime_instance_id: params.runtime_instance_id,
            attempt_id: params.attempt_id,
            epoch: params.connection_epoch.unwrap_or(0),
            capabilities: params.capabilities,
            parent,
            owner: Some(conn),
            expired: false,
            deadline: now + self.policy.lease_ttl,
            saved_deadline: None,
            former_owners: Vec::new(),
            elsewhere: false,
            cancel: None,
            tenant: params.tenant,
        };
        let view = session.view();
        self.deadlines
            .insert((session.deadline, session.id.clone()));
        self.by_run
            .insert(session.run_id.clone(), session.id.clone());
        self.bind(conn, &session.id, session.parent.is_none());
        self.changed.insert(session.id.clone());
        self.sessions.insert(session.id.clone(), Box::new(session));
        Ok(AttachOutcome {
            session: view,
            superseded: None,
            fresh: true,
        })
    }

    fn reconnect(
        &mut self,
        conn: ConnId,
        params: AttachParams,
        socket_main: Option<SessionView>,
        now: Instant,
    ) -> Result<AttachOutcome, SessionError> {
        let Some(session) = self
            .by_run
            .get(&params.run_id)
            .and_then(|id| self.sessions.get(id))
        else {
            // Unknown run: its lease ran out long ago, or the gateway lost its
            // memory. Either way the runtime's next step is a fresh attach.
            return Err(SessionError::Expired {
                run_id: params.run_id,
            });
        };
        if session.expired {
            return Err(SessionError::Expired {
                run_id: params.run_id,
            });
        }
        if session.runtime_instance_id != params.runtime_instance_id {
            return Err(SessionError::OtherInstance {
                run_id: params.run_id,
            });
        }
        let offered = params.connection_epoch.unwrap_or(0);
        if offered <= session.epoch {
            return Err(SessionError::EpochNotGreater {
                offered,
                current: session.epoch,
            });
        }
        let is_main = match (&session.parent, &socket_main) {
            (None, None) => true,
            (Some(parent), Some(main)) if *parent == main.session_id => false,
            (None, Some(main)) => {
                return Err(SessionError::Forbidden(format!(
                    "this socket's main run is {}; a main run reconnects on a socket of its own",
                    main.run_id
                )));
            }
            (Some(_), _) => {
                return Err(SessionError::Forbidden(
                    "a sub-run moves with its main session (reattach the main run, then runtime.recoverConnections)"
                        .into(),
                ));
            }
        };
        let id = session.id.clone();
        let arriving = usize::from(session.owner != Some(conn));
        self.check_room(conn, arriving)?;
        let superseded = self.move_to(&id, conn, offered, Some(params.capabilities), now, is_main);
        let view = self
            .sessions
            .get(&id)
            .map(|s| s.view())
            .ok_or(SessionError::NotAttached)?;
        Ok(AttachOutcome {
            session: view,
            superseded,
            fresh: false,
        })
    }

    /// Binds session `id` to `conn` at `epoch` and renews its lease. Returns
    /// the socket that lost it, if another one held it.
    fn move_to(
        &mut self,
        id: &SessionId,
        conn: ConnId,
        epoch: u64,
        capabilities: Option<Capabilities>,
        now: Instant,
        is_main: bool,
    ) -> Option<Superseded> {
        let new_deadline = now + self.policy.lease_ttl;
        let session = self.sessions.get_mut(id)?;
        let old_owner = session.owner.replace(conn);
        session.epoch = epoch;
        session.elsewhere = false;
        if let Some(caps) = capabilities {
            session.capabilities = caps;
        }
        let old_deadline = std::mem::replace(&mut session.deadline, new_deadline);
        let run_id = session.run_id.clone();
        if let Some(old) = old_owner
            && old != conn
            && !session.former_owners.contains(&old)
        {
            session.former_owners.push(old);
        }
        self.deadlines.remove(&(old_deadline, id.clone()));
        self.deadlines.insert((new_deadline, id.clone()));
        self.changed.insert(id.clone());
        let superseded = match old_owner {
            Some(old) if old != conn => {
                if let Some(rec) = self.conns.get_mut(&old) {
                    rec.bound.retain(|s| s != id);
                    if rec.main.as_ref() == Some(id) {
                        rec.main = None;
                    }
                    rec.moved_away.push(id.clone());
                }
                Some(Superseded {
                    conn: old,
                    session_id: id.clone(),
                    run_id,
                    new_epoch: epoch,
                })
            }
            _ => None,
        };
        self.bind(conn, id, is_main);
        superseded
    }

    fn bind(&mut self, conn: ConnId, id: &SessionId, is_main: bool) {
        let rec = self.conns.entry(conn).or_default();
        rec.moved_away.retain(|s| s != id);
        if !rec.bound.contains(id) {
            // Most sockets hold one session: room for exactly that, not the
            // four a first push makes.
            if rec.bound.is_empty() {
                rec.bound.reserve_exact(1);
            }
            rec.bound.push(id.clone());
        }
        if is_main && rec.main.is_none() {
            rec.main = Some(id.clone());
        }
    }

    /// Sessions bound to `conn` now.
    pub fn sessions_on(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |r| r.bound.len())
    }

    /// Whether `arriving` more sessions fit on `conn`.
    fn check_room(&self, conn: ConnId, arriving: usize) -> Result<(), SessionError> {
        let max = self.policy.max_sessions_per_conn;
        if self.sessions_on(conn) + arriving > max {
            return Err(SessionError::TooManySessions { max });
        }
        Ok(())
    }

    /// Checks that `session_id` names a session of `run_id` bound to `conn`
    /// at its current epoch: the gate every command after attach passes.
    pub fn authorize(
        &self,
        conn: ConnId,
        session_id: &SessionId,
        run_id: &RunId,
    ) -> Result<SessionView, SessionError> {
        self.bound_here(conn, session_id, run_id).map(Session::view)
    }

    /// [`Self::authorize`] without the copy: the session itself.
    fn bound_here(
        &self,
        conn: ConnId,
        session_id: &SessionId,
        run_id: &RunId,
    ) -> Result<&Session, SessionError> {
        let rec = self.conns.get(&conn);
        let Some(session) = self.sessions.get(session_id) else {
            return Err(SessionError::NotAttached);
        };
        if session.run_id != *run_id {
            // Do not reveal which run the id belongs to.
            return Err(SessionError::NotAttached);
        }
        let here = session.owner == Some(conn);
        let was_here =
            rec.is_some_and(|r| r.moved_away.contains(session_id) || r.bound.contains(session_id));
        if session.expired && (here || was_here || session.former_owners.contains(&conn)) {
            return Err(SessionError::Expired {
                run_id: session.run_id.clone(),
            });
        }
        if here {
            return Ok(session);
        }
        if was_here {
            return Err(SessionError::StaleEpoch {
                session_id: session_id.clone(),
                current_epoch: session.epoch,
            });
        }
        Err(SessionError::NotAttached)
    }

    /// `runtime.heartbeat`: renews the lease. Returns the new deadline.
    /// Copies nothing out of the session: at 10,000 heartbeats a second a
    /// view of it (run, instance, cancel) per beat was measurable.
    pub fn heartbeat(
        &mut self,
        conn: ConnId,
        session_id: &SessionId,
        run_id: &RunId,
        runtime_instance_id: Option<&OpaqueId>,
        now: Instant,
    ) -> Result<Instant, SessionError> {
        let session = self.bound_here(conn, session_id, run_id)?;
        if let Some(instance) = runtime_instance_id
            && *instance != session.runtime_instance_id
        {
            return Err(SessionError::OtherInstance {
                run_id: run_id.clone(),
            });
        }
        let new_deadline = now + self.policy.lease_ttl;
        let step = self.policy.renewal_save_step();
        let Some(session) = self.sessions.get_mut(session_id) else {
            return Err(SessionError::NotAttached);
        };
        self.deadlines
            .remove(&(session.deadline, session_id.clone()));
        session.deadline = new_deadline;
        self.deadlines.insert((new_deadline, session_id.clone()));
        if session
            .saved_deadline
            .is_none_or(|saved| new_deadline > saved + step)
        {
            self.renewed.insert(session_id.clone());
        }
        Ok(new_deadline)
    }

    /// `runtime.recoverConnections`: moves sub-runs of the main session onto
    /// `conn` at the main session's epoch, all or none.
    ///
    /// `covers` says which runs `conn` may take (its token's scope): a
    /// sub-run attached under one token must not follow its main run onto a
    /// socket whose token does not cover it. A named run that it does not
    /// cover is refused before it is looked up, so the answer is the same
    /// whether or not that run exists.
    #[allow(clippy::too_many_arguments)] // one per member of the command
    pub fn recover(
        &mut self,
        conn: ConnId,
        main_session: &SessionId,
        main_run: &RunId,
        sub_runs: Option<&[RunId]>,
        connection_epoch: Option<u64>,
        covers: &dyn Fn(&RunId) -> bool,
        now: Instant,
    ) -> Result<Vec<Superseded>, RecoverError> {
        let not_covered = |run: &RunId| RecoverError {
            run_id: Some(run.clone()),
            error: SessionError::Forbidden(format!("the token does not cover run {run}")),
        };
        let main = self
            .authorize(conn, main_session, main_run)
            .map_err(RecoverError::main)?;
        if main.is_sub_run {
            return Err(RecoverError::main(SessionError::Forbidden(
                "recoverConnections names the main session, not a sub-run".into(),
            )));
        }
        if let Some(e) = connection_epoch
            && e != main.epoch
        {
            return Err(RecoverError::main(SessionError::EpochNotMain {
                offered: e,
                current: main.epoch,
            }));
        }
        let targets: Vec<SessionId> = match sub_runs {
            Some(runs) => {
                if let Some(run) = runs.iter().find(|run| !covers(run)) {
                    return Err(not_covered(run));
                }
                let mut ids = Vec::with_capacity(runs.len());
                for run in runs {
                    let id = self.by_run.get(run).ok_or_else(|| RecoverError {
                        run_id: Some(run.clone()),
                        error: SessionError::Expired {
                            run_id: run.clone(),
                        },
                    })?;
                    ids.push(id.clone());
                }
                ids
            }
            None => self
                .sessions
                .values()
                .filter(|s| s.parent.as_ref() == Some(main_session) && !s.expired)
                .map(|s| s.id.clone())
                .collect(),
        };
        // Check every target before moving any: all or none.
        for id in &targets {
            let Some(sub) = self.sessions.get(id) else {
                continue;
            };
            let fail = |error| {
                Err(RecoverError {
                    run_id: Some(sub.run_id.clone()),
                    error,
                })
            };
            if !covers(&sub.run_id) {
                return Err(not_covered(&sub.run_id));
            }
            if sub.expired {
                return fail(SessionError::Expired {
                    run_id: sub.run_id.clone(),
                });
            }
            if sub.runtime_instance_id != main.runtime_instance_id {
                return fail(SessionError::OtherInstance {
                    run_id: sub.run_id.clone(),
                });
            }
            if sub.parent.as_ref() != Some(main_session) {
                return fail(SessionError::Forbidden(format!(
                    "run {} is not a sub-run of main run {}",
                    sub.run_id, main.run_id
                )));
            }
            let already_here = sub.owner == Some(conn) && sub.epoch == main.epoch;
            if !already_here && sub.epoch >= main.epoch {
                return fail(SessionError::EpochNotGreater {
                    offered: main.epoch,
                    current: sub.epoch,
                });
            }
        }
        let arriving = targets
            .iter()
            .filter(|id| {
                self.sessions
                    .get(*id)
                    .is_some_and(|s| s.owner != Some(conn))
            })
            .count();
        self.check_room(conn, arriving)
            .map_err(RecoverError::main)?;
        let mut superseded = Vec::new();
        for id in &targets {
            if let Some(s) = self.move_to(id, conn, main.epoch, None, now, false) {
                superseded.push(s);
            }
        }
        Ok(superseded)
    }

    /// The socket `conn` closed: its sessions become detached and live on
    /// until their leases run out.
    pub fn connection_closed(&mut self, conn: ConnId) -> Vec<RunId> {
        let Some(rec) = self.conns.remove(&conn) else {
            return Vec::new();
        };
        let mut detached = Vec::new();
        for id in rec.bound.iter().chain(rec.moved_away.iter()) {
            if let Some(s) = self.sessions.get_mut(id) {
                if s.owner == Some(conn) {
                    s.owner = None;
                    detached.push(s.run_id.clone());
                    // Saved so other gateways sharing the store see it.
                    self.changed.insert(id.clone());
                }
                s.former_owners.retain(|c| *c != conn);
            }
        }
        detached
    }

    /// The earliest moment [`Self::expire_due`] has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Expires every session whose lease ended at or before `now`, and
    /// forgets tombstones that are old enough.
    pub fn expire_due(&mut self, now: Instant) -> Vec<Expired> {
        let mut expired = Vec::new();
        while let Some((at, id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            if session.expired || session.elsewhere {
                self.forget(&id);
                continue;
            }
            if let Some(e) = self.tombstone(&id, at) {
                expired.push(e);
            }
        }
        expired
    }

    /// Turns live session `id` (its deadline entry already removed) into a
    /// tombstone from `at` on, unbound from its socket.
    fn tombstone(&mut self, id: &SessionId, at: Instant) -> Option<Expired> {
        let session = self.sessions.get_mut(id)?;
        session.expired = true;
        session.cancel = None;
        let owner = session.owner.take();
        session.deadline = at + self.policy.tombstone_ttl;
        self.deadlines.insert((session.deadline, id.clone()));
        self.changed.insert(id.clone());
        if let Some(conn) = owner {
            session.former_owners.push(conn);
            if let Some(rec) = self.conns.get_mut(&conn) {
                rec.bound.retain(|s| s != id);
                if rec.main.as_ref() == Some(id) {
                    rec.main = None;
                }
                rec.moved_away.push(id.clone());
            }
        }
        Some(Expired {
            conn: owner,
            session_id: id.clone(),
            run_id: session.run_id.clone(),
        })
    }

    /// `runtime.finish`: ends live session `id` now, as its lease running
    /// out would (a tombstone; the socket no longer holds it), and, for a
    /// main session, each of its sub-runs still live. The caller tells
    /// nobody `session.expired`: the runtime asked for it. Answers the
    /// sessions ended, `id` first (empty if it was not live here).
    pub fn end(&mut self, id: &SessionId, now: Instant) -> Vec<Expired> {
        let live = |s: &Session| !s.expired && !s.elsewhere;
        if !self.sessions.get(id).is_some_and(|s| live(s)) {
            return Vec::new();
        }
        let mut ids = vec![id.clone()];
        let mut subs: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.parent.as_ref() == Some(id) && live(s))
            .map(|s| s.id.clone())
            .collect();
        subs.sort();
        ids.extend(subs);
        let mut ended = Vec::new();
        for id in ids {
            let Some(deadline) = self.sessions.get(&id).map(|s| s.deadline) else {
                continue;
            };
            self.deadlines.remove(&(deadline, id.clone()));
            ended.extend(self.tombstone(&id, now));
        }
        ended
    }

    /// The runs of the live sub-run sessions of main session `id`.
    pub fn open_sub_runs(&self, id: &SessionId) -> Vec<RunId> {
        let mut runs: Vec<RunId> = self
            .sessions
            .values()
            .filter(|s| s.parent.as_ref() == Some(id) && !s.expired && !s.elsewhere)
            .map(|s| s.run_id.clone())
            .collect();
        runs.sort();
        runs
    }

    /// The run of session `id`, if it is held here (live or a tombstone).
    pub fn run_of(&self, id: &SessionId) -> Option<&RunId> {
        self.sessions
            .get(id)
            .filter(|s| !s.elsewhere)
            .map(|s| &s.run_id)
    }

    /// Saves the tombstones of session `id` and of its sub-runs again with
    /// the next changes taken: a `runtime.finish` asked again, after the
    /// first one ended them here but could not save that.
    pub fn save_ended_again(&mut self, id: &SessionId) {
        let ended = |s: &Session| s.expired && !s.elsewhere;
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| (s.id == *id || s.parent.as_ref() == Some(id)) && ended(s))
            .map(|s| s.id.clone())
            .collect();
        self.changed.extend(ids);
    }

    /// A viewer's `run.cancel` for `run`: kept with its live session (a
    /// newer one replaces the reason) until the run ends. Answers who
    /// should be told now.
    pub fn request_cancel(&mut self, run: &RunId, cancel: PendingCancel) -> CancelTarget {
        let Some(session) = self
            .by_run
            .get(run)
            .and_then(|id| self.sessions.get_mut(id))
        else {
            return CancelTarget::NoSession;
        };
        if session.expired {
            return CancelTarget::NoSession;
        }
        if session.elsewhere {
            return CancelTarget::Elsewhere {
                session_id: session.id.clone(),
            };
        }
        session.cancel = Some(cancel);
        self.changed.insert(session.id.clone());
        CancelTarget::Held {
            conn: session.owner,
            session_id: session.id.clone(),
        }
    }

    /// A cancel for session `id` (another gateway passed it on): kept if
    /// the session is live and held here; answers its socket and run when
    /// it is attached, to push it to.
    pub fn request_cancel_of(
        &mut self,
        id: &SessionId,
        cancel: PendingCancel,
    ) -> Option<(ConnId, RunId)> {
        let session = self.sessions.get_mut(id)?;
        if session.expired || session.elsewhere {
            return None;
        }
        session.cancel = Some(cancel);
        self.changed.insert(id.clone());
        session.owner.map(|conn| (conn, session.run_id.clone()))
    }

    /// The pending cancels of `root` and its sub-runs bound to `conn`:
    /// pushed again after a reattach or recovery.
    pub fn pending_cancels(
        &self,
        conn: ConnId,
        root: &SessionId,
    ) -> Vec<(SessionId, RunId, PendingCancel)> {
        let mut found: Vec<_> = self
            .sessions
            .values()
            .filter(|s| s.owner == Some(conn) && (s.id == *root || s.parent.as_ref() == Some(root)))
            .filter_map(|s| {
                s.cancel
                    .clone()
                    .map(|c| (s.id.clone(), s.run_id.clone(), c))
            })
            .collect();
        found.sort_by(|a, b| a.1.cmp(&b.1));
        found
    }

    /// Drops every trace of session `id`.
    fn forget(&mut self, id: &SessionId) {
        let Some(session) = self.sessions.remove(id) else {
            return;
        };
        if !session.elsewhere {
            self.changed.insert(id.clone());
        }
        self.deadlines.remove(&(session.deadline, id.clone()));
        if self.by_run.get(&session.run_id) == Some(id) {
            self.by_run.remove(&session.run_id);
        }
        for conn in session.former_owners.iter().chain(session.owner.iter()) {
            if let Some(rec) = self.conns.get_mut(conn) {
                rec.bound.retain(|s| s != id);
                rec.moved_away.retain(|s| s != id);
                if rec.main.as_ref() == Some(id) {
                    rec.main = None;
                }
            }
        }
    }

    /// Withdraws a fresh session whose start could not be saved, so the
    /// run is free again and the runtime's retry starts it anew.
    pub fn abandon(&mut self, id: &SessionId) {
        self.forget(id);
    }

    /// The changes to save since the last call: started, moved, expired
    /// (as records) and forgotten (as deletions) sessions. Save them in the
    /// order taken; a session appears at most once, in its latest state,
    /// and deletions come first (a fresh session replacing its run's
    /// tombstone finds the tombstone's place in its tenant's quota free).
    pub fn take_changes(&mut self, clock: &Clock) -> Vec<SessionChange> {
        let changed = std::mem::take(&mut self.changed);
        let mut changes: Vec<SessionChange> = changed
            .into_iter()
            .map(|id| {
                self.renewed.remove(&id);
                match self.sessions.get_mut(&id) {
                    Some(s) => SessionChange::Put(s.record_to_save(clock)),
                    None => SessionChange::Delete(id),
                }
            })
            .collect();
        // Each session at most once, so this order changes no outcome.
        changes.sort_by_key(|c| matches!(c, SessionChange::Put(_)));
        changes
    }

    /// Records of up to `max` sessions whose lease was renewed since they
    /// were last taken (and that still exist); the rest wait for the next
    /// call. Taking them in slices lets the caller release the registry
    /// between slices, so heartbeats never wait behind thousands of records.
    pub fn take_renewals(&mut self, clock: &Clock, max: usize) -> Vec<SessionChange> {
        let ids: Vec<SessionId> = self.renewed.iter().take(max).cloned().collect();
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            self.renewed.remove(&id);
            if let Some(s) = self.sessions.get_mut(&id) {
                records.push(SessionChange::Put(s.record_to_save(clock)));
            }
        }
        records
    }

    /// Whether any renewal waits to be taken.
    pub fn has_renewals(&self) -> bool {
        !self.renewed.is_empty()
    }

    /// Rebuilds sessions from saved records after a restart: all detached,
    /// at their saved epoch and capabilities. A live session's deadline is
    /// its saved one plus `slack` (renewals are saved lazily, so the saved
    /// deadline may be up to that much behind the one the runtime was
    /// promised); one already past stays in the index and expires on the
    /// next [`Self::expire_due`], which the caller runs before serving.
    pub fn restore(
        &mut self,
        records: Vec<SessionRecord>,
        clock: &Clock,
        slack: Duration,
    ) -> Restored {
        let mut restored = Restored::default();
        let mut records = records;
        // Live before tombstones, then the higher epoch: if two records
        // name one run (a crash between saving one and deleting the other),
        // the one a runtime can still use wins.
        records.sort_by(|a, b| a.expired.cmp(&b.expired).then(b.epoch.cmp(&a.epoch)));
        for r in records {
            if self.by_run.contains_key(&r.run_id) || self.sessions.contains_key(&r.session_id) {
                restored.dropped += 1;
                self.changed.insert(r.session_id);
                continue;
            }
            if !r.expired {
                restored.live.push(r.run_id.clone());
            }
            let deadline = held_deadline(&r, clock, slack);
            self.insert(Session::from_record(r, deadline, false));
        }
        restored
    }

    fn insert(&mut self, session: Session) {
        self.deadlines
            .insert((session.deadline, session.id.clone()));
        self.by_run
            .insert(session.run_id.clone(), session.id.clone());
        self.sessions.insert(session.id.clone(), Box::new(session));
    }

    /// Takes in a record from a store other gateways share: the state of
    /// `record`'s run there. `held_here` says whether this gateway holds it
    /// (a session it took over from a gateway that stopped, see
    /// [`crate::store::SharedSessions::keep_alive`]); otherwise another one
    /// does, and it is kept as held elsewhere (see `Session::elsewhere`).
    /// A session of the run held on a socket here loses it: the socket is
    /// returned, to be told `session.superseded`, and answers `STALE_EPOCH`.
    ///
    /// What this gateway holds and changed more recently than the record
    /// (a save still on its way) is kept as it is.
    pub fn adopt(
        &mut self,
        record: SessionRecord,
        held_here: bool,
        clock: &Clock,
        slack: Duration,
        now: Instant,
    ) -> Vec<Superseded> {
        if let Some(local) = self.sessions.get(&record.session_id)
            && !local.elsewhere
            && (held_here || local.epoch > record.epoch)
        {
            // Held here already, or moved here and its save is on the way:
            // this gateway's copy is the newer one.
            return Vec::new();
        }
        let mut superseded = Vec::new();
        let mut former_owners = Vec::new();
        let same_run = self.by_run.get(&record.run_id).cloned();
        for id in same_run.iter().chain(std::iter::once(&record.session_id)) {
            if let Some(s) = self.release(id, record.epoch) {
                superseded.push(s);
            }
            if let Some(old) = self.sessions.get(id) {
                former_owners.extend(old.former_owners.iter().copied());
            }
            self.forget(id);
            if *id == record.session_id {
                // The record replaces it: nothing of the old copy is saved.
                self.changed.remove(id);
            }
        }
        let deadline = if held_here {
            held_deadline(&record, clock, slack)
        } else {
            now + self.policy.tombstone_ttl
        };
        let session_id = record.session_id.clone();
        let mut session = Session::from_record(record, deadline, !held_here);
        // The sockets that held it still answer STALE_EPOCH for it.
        session.former_owners = former_owners;
        for conn in &session.former_owners {
            if let Some(rec) = self.conns.get_mut(conn)
                && !rec.moved_away.contains(&session_id)
            {
                rec.moved_away.push(session_id.clone());
            }
        }
        if held_here {
            self.changed.insert(session_id);
        }
        self.insert(session);
        superseded
    }

    /// Another gateway took session `id` over at `epoch`: a socket here
    /// that held it loses it (returned, to be told `session.superseded`)
    /// and the session is kept as held elsewhere. Ignored if this gateway
    /// holds it at a later epoch already.
    pub fn lose(&mut self, id: &SessionId, epoch: u64, now: Instant) -> Option<Superseded> {
        let session = self.sessions.get(id)?;
        if session.epoch > epoch || (session.elsewhere && session.epoch == epoch) {
            return None;
        }
        let superseded = self.release(id, epoch);
        let forget_at = now + self.policy.tombstone_ttl;
        let session = self.sessions.get_mut(id)?;
        session.elsewhere = true;
        session.epoch = epoch;
        let old_deadline = std::mem::replace(&mut session.deadline, forget_at);
        self.deadlines.remove(&(old_deadline, id.clone()));
        self.deadlines.insert((forget_at, id.clone()));
        self.renewed.remove(id);
        self.changed.remove(id);
        superseded
    }

    /// Unbinds session `id` from the socket holding it, which remembers it
    /// as moved away (`STALE_EPOCH`); returns that socket.
    fn release(&mut self, id: &SessionId, new_epoch: u64) -> Option<Superseded> {
        let session = self.sessions.get_mut(id)?;
        let conn = session.owner.take()?;
        if !session.former_owners.contains(&conn) {
            session.former_owners.push(conn);
        }
        let run_id = session.run_id.clone();
        if let Some(rec) = self.conns.get_mut(&conn) {
            rec.bound.retain(|s| s != id);
            if rec.main.as_ref() == Some(id) {
                rec.main = None;
            }
            if !rec.moved_away.contains(id) {
                rec.moved_away.push(id.clone());
            }
        }
        Some(Superseded {
            conn,
            session_id: id.clone(),
            run_id,
            new_epoch,
        })
    }

    /// The state of `run`'s session, if it has one held here (one held
    /// elsewhere is for the shared store to say).
    pub fn run_state(&self, run: &RunId) -> Option<SessionState> {
        let id = self.by_run.get(run)?;
        self.sessions
            .get(id)
            .filter(|s| !s.elsewhere)
            .map(|s| s.state())
    }

    /// Every run with a session, and its state.
    pub fn runs(&self) -> Vec<(RunId, SessionState)> {
        self.sessions
            .values()
            .filter(|s| !s.elsewhere)
            .map(|s| (s.run_id.clone(), s.state()))
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in self.sessions.values().filter(|s| !s.elsewhere) {
            match s.state() {
                SessionState::Attached => c.attached += 1,
                SessionState::Detached => c.detached += 1,
                SessionState::Expired => c.expired += 1,
            }
        }
        c
    }
}

/// Where a `run.cancel` goes (see [`SessionRegistry::request_cancel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelTarget {
    /// The session is held here: push to `conn` if attached; the cancel
    /// is saved with the session either way.
    Held {
        conn: Option<ConnId>,
        session_id: SessionId,
    },
    /// Another gateway holds the session: it is to be told there.
    Elsewhere { session_id: SessionId },
    /// No live session for the run here.
    NoSession,
}

/// A refused `recoverConnections`: the error, and the sub-run it concerns
/// (`None` when the main session itself was the problem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverError {
    pub run_id: Option<RunId>,
    pub error: SessionError,
}

impl RecoverError {
    fn main(error: SessionError) -> Self {
        RecoverError {
            run_id: None,
            error,
        }
    }
}
