//! Which gateways share the store, and what happens to the sessions of
//! one that goes silent.
//!
//! Each gateway (node) has a random id for the life of its process. Every
//! node says it is alive once a second (`KEEP_ALIVE`, called by the
//! gateway's cluster task); the sessions of a node silent for longer than
//! [`NODE_SILENT_AFTER`] go, in one atomic step, to the first live node
//! that notices, which runs their leases from then on: so each lease has
//! exactly one node running it.
//!
//! Owns the node id and the membership keys (`{p}:alive:{node}`,
//! `{p}:nodes`, `{p}:suspects`, named inside the script). Must not save or
//! fence sessions itself beyond moving a silent node's holds (that is
//! `sessions`), must not keep time of its own (Redis's clock decides
//! silence), and must not retry (see [`super`]).

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::sessions::decode_all;
use super::{Reply, answer, redis_error};
use crate::redis::keys::Keys;
use crate::store::{SessionRecord, StoreError};

/// A node silent this long has its sessions taken over. Five missed
/// keep-alives: long enough for a busy process or a Redis restart (after
/// which every live node says so again within a second), short next to a
/// lease.
pub const NODE_SILENT_AFTER: Duration = Duration::from_secs(5);

/// Node `ARGV[2]` (prefix `ARGV[1]`) is alive for `ARGV[3]` ms more; a
/// node silent for `ARGV[3]` ms since first found so has its sessions
/// moved to this one. Returns the records taken over.
const KEEP_ALIVE: &str = include_str!("keep_alive.lua");

/// A fresh node id: random, for the life of this process.
pub(super) fn new_node_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A membership op, answered on its `reply`.
pub(super) enum Op {
    /// This node is alive; answers the sessions taken over from silent ones.
    KeepAlive { reply: Reply<Vec<SessionRecord>> },
}

/// The membership part of the store's task, for one node.
pub(super) struct Membership {
    keys: Keys,
    node: String,
    silent_after: Duration,
    keep_alive: Script,
}

impl Membership {
    pub(super) fn new(keys: Keys, node: String, silent_after: Duration) -> Membership {
        Membership {
            keys,
            node,
            silent_after,
            keep_alive: Script::new(KEEP_ALIVE),
        }
    }

    pub(super) async fn execute(&self, conn: &mut ConnectionManager, op: Op) {
        match op {
            Op::KeepAlive { reply } => answer(reply, self.keep_alive(conn).await),
        }
    }

    async fn keep_alive(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let mut invocation = self.keep_alive.key(self.keys.session_holders());
        invocation
            .key(self.keys.sessions())
            .arg(self.keys.prefix())
            .arg(&self.node)
            .arg(self.silent_after.as_millis() as u64);
        let records: Vec<Vec<u8>> = invocation.invoke_async(conn).await.map_err(redis_error)?;
        decode_all(records)
    }
}
