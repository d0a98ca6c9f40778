//! What every connection task shares: configuration, the domain objects, the
//! table of open sockets, metrics and the drain signal.
//!
//! Owns [`Connections`], the only way to reach another socket: a bounded
//! [`Outbox`] per socket, so a push (superseded, expired, draining) never
//! waits on a peer. Must not hold protocol rules: those live in `cmd` and the
//! domain modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::Admission;
use super::metrics::Metrics;
use super::outbox::{Outbox, Refused};
use crate::auth::AuthKey;
use crate::config::Config;
use crate::ids::RunId;
use crate::protocol::Frame;
use crate::run_config::RunConfigSource;
use crate::session::registry::Superseded;
use crate::session::{ConnId, Sessions};
use crate::store::Store;
use crate::stream::StreamHub;
use crate::time::Clock;

/// Everything a connection needs, behind one `Arc`.
pub(crate) struct Shared {
    pub config: Config,
    pub clock: Clock,
    pub sessions: Sessions,
    pub store: Arc<dyn Store>,
    pub streams: Arc<StreamHub>,
    pub runs: RunConfigSource,
    pub auth: AuthKey,
    pub conns: Connections,
    /// Places for long-lived connections, in all and per token.
    pub admission: Admission,
    pub metrics: Metrics,
    /// Cancelled when a drain begins: readiness goes false, sockets are told.
    pub draining: CancellationToken,
    /// Every task serving a client, so a drain can wait for them.
    pub tasks: TaskTracker,
    /// `GET /v1/runs` requests per token.
    pub http_rates: super::token_rates::TokenRates,
}

/// One item for a socket's writer.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A complete JSON text frame.
    Frame(Bytes),
    /// Close the socket with this code and reason after what is queued.
    Close(u16, &'static str),
}

impl From<Frame> for Outgoing {
    fn from(f: Frame) -> Self {
        Outgoing::Frame(f.into_bytes())
    }
}

/// All open sockets by id.
#[derive(Default)]
pub(crate) struct Connections {
    open: DashMap<ConnId, Arc<Outbox>>,
    next_id: AtomicU64,
}

impl Connections {
    pub fn register(&self, outbox: Arc<Outbox>) -> ConnId {
        let id = ConnId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        self.open.insert(id, outbox);
        id
    }

    pub fn remove(&self, id: ConnId) {
        self.open.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Queues a push for socket `id` without waiting. A socket whose queue
    /// is full (in frames, or in bytes: twice its budget, since its own
    /// replies may fill the budget itself) is not reading; it is closed
    /// rather than allowed to grow.
    pub fn push(&self, id: ConnId, frame: Frame) {
        self.push_now(id, frame);
    }

    /// As [`Connections::push`]; answers whether the frame was queued for
    /// an open socket. Every push goes through here, so each is charged to
    /// the socket's byte budget exactly as the writer releases it.
    pub fn push_now(&self, id: ConnId, frame: Frame) -> bool {
        let Some(outbox) = self.open.get(&id).map(|o| o.clone()) else {
            return false;
        };
        let bytes = frame.as_str().len();
        let limit = outbox.budget().max().saturating_mul(2);
        if !outbox.budget().try_charge(bytes, limit) {
            tracing::warn!(
                conn = id.0,
                "outbound bytes over the budget; closing the socket"
            );
            outbox.kill();
            return false;
        }
        match outbox.try_push(frame.into()) {
            Ok(()) => true,
            Err(refused) => {
                outbox.release(bytes);
                if refused == Refused::Full {
                    tracing::warn!(conn = id.0, "outbound queue full; closing the socket");
                }
                outbox.kill();
                false
            }
        }
    }

    /// A socket lost a session to a newer epoch (here or on another
    /// gateway): it is pushed `session.superseded` and stops following the
    /// run, whichever way the loss was noticed.
    pub fn superseded(&self, s: &Superseded) {
        self.session_lost(s.conn, &s.run_id, super::push::session_superseded(s));
    }

    /// Socket `id` lost its session of `run` (`frame` says how:
    /// `session.superseded` or `session.expired`): pushes it, and the
    /// socket stops following `run`'s stream.
    pub fn session_lost(&self, id: ConnId, run: &RunId, frame: Frame) {
        let Some(outbox) = self.open.get(&id).map(|o| o.clone()) else {
            return;
        };
        outbox.lost_run(run.clone());
        self.push(id, frame);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn push() -> Frame {
        super::super::push::gateway_draining(Duration::from_secs(1))
    }

    /// Pushes never wait on a socket: one that is not reading is closed
    /// once its queue is full in frames, and what was refused is not left
    /// charged to its budget.
    #[test]
    fn a_push_into_a_full_queue_is_refused_and_closes_the_socket() {
        let conns = Connections::default();
        let outbox = Outbox::new(2, 1 << 20);
        let id = conns.register(outbox.clone());
        let bytes = push().as_str().len();
        assert!(conns.push_now(id, push()));
        assert!(conns.push_now(id, push()));
        assert!(!outbox.take_signals().killed, "room for two");
        assert!(!conns.push_now(id, push()));
        assert!(outbox.take_signals().killed);
        // The writer hands on the two queued frames; nothing else is held.
        for _ in 0..2 {
            assert!(outbox.try_next().is_some());
            outbox.release(bytes);
        }
        assert!(outbox.try_next().is_none());
        assert!(outbox.budget().try_charge(1 << 21, 1 << 21), "all released");
    }

    /// Or once its bytes queued would pass twice its budget (its own
    /// replies may fill the budget itself).
    #[test]
    fn a_push_past_twice_the_byte_budget_is_refused_and_closes_the_socket() {
        let conns = Connections::default();
        let bytes = push().as_str().len();
        let outbox = Outbox::new(1000, bytes);
        let id = conns.register(outbox.clone());
        assert!(conns.push_now(id, push()));
        assert!(conns.push_now(id, push()));
        assert!(!outbox.take_signals().killed);
        assert!(!conns.push_now(id, push()));
        assert!(outbox.take_signals().killed);
        // A closed socket takes nothing; an unknown one is not an error.
        outbox.close();
        assert!(!conns.push_now(id, push()));
        conns.remove(id);
        assert!(!conns.push_now(id, push()));
    }

    /// Losing a session tells the connection task which run to stop
    /// following, beside the push itself.
    #[test]
    fn a_lost_session_leaves_its_run_for_the_connection_task() {
        let conns = Connections::default();
        let outbox = Outbox::new(4, 1 << 20);
        let id = conns.register(outbox.clone());
        let run = RunId::new("lost-1").unwrap();
        conns.session_lost(id, &run, push());
        assert_eq!(outbox.take_signals().lost_runs, vec![run]);
        assert!(outbox.try_next().is_some());
    }
}
