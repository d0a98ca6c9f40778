//! The Redis key layout: every key rungate writes, for the session store
//! and the stream engine alike, under one prefix.
//!
//! Owns the key names (and so what is on disk: renaming one strands every
//! existing deployment's data), and the one value format both engines
//! read, the holder entry of a session. Must not talk to Redis, and must
//! not know what the records inside the values mean.
//!
//! # Keys (prefix `p`, [`DEFAULT_PREFIX`] by default)
//!
//! The session store ([`crate::store::redis`]):
//!
//! | key                      | type   | holds                                   |
//! |--------------------------|--------|-----------------------------------------|
//! | `{p}:kv:{run}`           | hash   | key → value                             |
//! | `{p}:cp:{run}`           | hash   | checkpoint id → checkpoint record       |
//! | `{p}:cp-latest:{run}`    | string | id of the run's latest checkpoint       |
//! | `{p}:owner:{run}`        | string | the tenant charged for the run's KV and checkpoints |
//! | `{p}:usage:{tenant}`     | hash   | `runs`, `kvBytes`, `checkpointBytes` → what that tenant holds |
//! | `{p}:sessions`           | hash   | session id → session record             |
//! | `{p}:session-holder`     | hash   | session id → `NODE EPOCH EXPIRED` (the holder entry; the stream engine's publish fence reads it too) |
//! | `{p}:session-of-run`     | hash   | run id → session id                     |
//! | `{p}:held:{node}`        | set    | session ids that gateway holds          |
//! | `{p}:children:{session}` | set    | session ids of that main session's sub-runs |
//! | `{p}:alive:{node}`       | string | present while that gateway is alive     |
//! | `{p}:nodes`              | set    | gateways that have said they are alive  |
//! | `{p}:suspects`           | hash   | node → when it was first found silent   |
//! | `{p}:session-moves`      | channel| `SESSION_ID EPOCH NODE` per takeover; `cancel SESSION_ID MS REASON_JSON` per viewer's cancel of a session held elsewhere |
//!
//! The stream engine ([`crate::stream::redis`]):
//!
//! | key           | type   | holds                                         |
//! |---------------|--------|-----------------------------------------------|
//! | `{p}:s:{run}` | hash   | `epoch`; `next` (the head); `seq` (the highest accepted `seq`, 20 digits, or empty); `idle` (`active`, or wall-clock ms since idle); once the run ended, `end` (the outcome), `endedAt` (wall-clock ms) and `endMsg` (empty, or `+` then the message) |
//! | `{p}:x:{run}` | stream | one entry per published batch (a batch over the stream engine's `EVENTS_PER_ENTRY` events takes several), id `{first offset}-1`, one field `e` per event, in order. Trimmed with `MINID` to the entries that start within the last `max_events_per_run` offsets |
//! | `{p}:streams` | set    | the run ids that have a stream                |
//! | `{p}:events`  | channel| one message per change to a stream (the stream engine's notices) |
//!
//! Store records are encoded as [`crate::store`]'s records module says,
//! the same bytes as in the embedded store. A run id may contain `:`; it is
//! always the last part of a key, so keys stay unambiguous. Stream entry
//! ids end in `-1` because Redis refuses the id `0-0`.
//!
//! Epochs in the holder entry are written as 20-digit zero-padded decimals
//! ([`padded_epoch`]), because Lua numbers are doubles: two `u64`s compare
//! correctly as strings of equal length, not as doubles.
//!
//! The keys of gateway membership (`alive`, `nodes`, `suspects`) and the
//! per-node and per-parent sets are named inside the store's Lua scripts
//! from the prefix, not passed as `KEYS`; so this layout needs a single
//! Redis (not Redis Cluster). A test checks that every key a script names
//! is in the table above.

use crate::ids::{RunId, SessionId};

/// Key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "rungate";

/// Builds the keys of the layout in the module docs, under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix`.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix, for the scripts that name keys themselves.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ------------------------------------------------ the session store

    /// `{p}:kv:{run}`: the run's KV pairs.
    pub fn kv(&self, run: &RunId) -> String {
        format!("{}:kv:{run}", self.prefix)
    }

    /// `{p}:cp:{run}`: the run's checkpoints by id.
    pub fn checkpoints(&self, run: &RunId) -> String {
        format!("{}:cp:{run}", self.prefix)
    }

    /// `{p}:cp-latest:{run}`: the id of the run's latest checkpoint.
    pub fn latest_checkpoint(&self, run: &RunId) -> String {
        format!("{}:cp-latest:{run}", self.prefix)
    }

    /// `{p}:owner:{run}`: the tenant the run's KV and checkpoints are
    /// charged to.
    pub fn owner(&self, run: &RunId) -> String {
        format!("{}:owner:{run}", self.prefix)
    }

    /// What every tenant's usage hash (`{p}:usage:{tenant}`) begins with:
    /// the scripts append the tenant, which they learn from an owner key
    /// or a session record.
    pub fn usage_prefix(&self) -> String {
        format!("{}:usage:", self.prefix)
    }

    /// `{p}:sessions`: every session record by session id.
    pub fn sessions(&self) -> String {
        format!("{}:sessions", self.prefix)
    }

    /// `{p}:session-holder`: who holds each session ([`holder_entry_prefix`]);
    /// the store's fence, and the stream engine's publish fence.
    pub fn session_holders(&self) -> String {
        format!("{}:session-holder", self.prefix)
    }

    /// `{p}:session-of-run`: each run's session id.
    pub fn session_of_run(&self) -> String {
        format!("{}:session-of-run", self.prefix)
    }

    /// `{p}:held:{node}`: the sessions gateway `node` holds.
    pub fn held(&self, node: &str) -> String {
        format!("{}:held:{node}", self.prefix)
    }

    /// `{p}:children:{parent}`: the sub-run sessions of a main session.
    pub fn children(&self, parent: &SessionId) -> String {
        format!("{}:children:{parent}", self.prefix)
    }

    /// `{p}:session-moves`: the channel of takeovers and cancels.
    pub fn session_moves(&self) -> String {
        format!("{}:session-moves", self.prefix)
    }

    // ------------------------------------------------ the stream engine

    /// `{p}:s:{run}`: the meta hash of a run's stream.
    pub fn meta(&self, run: &RunId) -> String {
        format!("{}:s:{run}", self.prefix)
    }

    /// `{p}:x:{run}`: the Redis Stream of a run's events.
    pub fn events(&self, run: &RunId) -> String {
        format!("{}:x:{run}", self.prefix)
    }

    /// `{p}:streams`: the runs that have a stream.
    pub fn streams(&self) -> String {
        format!("{}:streams", self.prefix)
    }

    /// `{p}:events`: the channel of changes to streams.
    pub fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

/// An epoch as the scripts compare it: 20 digits, zero-padded (see the
/// module docs).
pub fn padded_epoch(epoch: u64) -> String {
    format!("{epoch:020}")
}

/// How the holder entry (`NODE EPOCH EXPIRED`) of a session `node` holds at
/// `epoch` begins.
pub fn holder_entry_prefix(node: &str, epoch: u64) -> String {
    format!("{node} {} ", padded_epoch(epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names on disk: existing data must keep working, so a change
    /// here is a migration, not a refactor.
    #[test]
    fn every_key_keeps_its_name() {
        let keys = Keys::new("p");
        let run = RunId::new("a:b").unwrap();
        let session = SessionId::new("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(keys.prefix(), "p");
        assert_eq!(keys.kv(&run), "p:kv:a:b");
        assert_eq!(keys.checkpoints(&run), "p:cp:a:b");
        assert_eq!(keys.latest_checkpoint(&run), "p:cp-latest:a:b");
        assert_eq!(keys.owner(&run), "p:owner:a:b");
        assert_eq!(keys.usage_prefix(), "p:usage:");
        assert_eq!(keys.sessions(), "p:sessions");
        assert_eq!(keys.session_holders(), "p:session-holder");
        assert_eq!(keys.session_of_run(), "p:session-of-run");
        assert_eq!(keys.held("n1"), "p:held:n1");
        assert_eq!(
            keys.children(&session),
            "p:children:0123456789abcdef0123456789abcdef"
        );
        assert_eq!(keys.session_moves(), "p:session-moves");
        assert_eq!(keys.meta(&run), "p:s:a:b");
        assert_eq!(keys.events(&run), "p:x:a:b");
        assert_eq!(keys.streams(), "p:streams");
        assert_eq!(keys.channel(), "p:events");
        assert_eq!(Keys::new(DEFAULT_PREFIX).sessions(), "rungate:sessions");
    }

    #[test]
    fn a_holder_entry_begins_with_node_and_padded_epoch() {
        assert_eq!(padded_epoch(7), "00000000000000000007");
        assert_eq!(padded_epoch(u64::MAX), u64::MAX.to_string());
        assert_eq!(holder_entry_prefix("n1", 7), "n1 00000000000000000007 ");
    }

    /// The scripts that name keys from the prefix (`p .. ':name'`) name
    /// only keys of the documented layout.
    #[test]
    fn every_key_a_script_builds_is_in_the_table() {
        let layout = include_str!("keys.rs");
        let scripts = [
            include_str!("../store/redis/keep_alive.lua"),
            include_str!("../store/redis/sessions_save.lua"),
        ];
        let mut named = 0;
        for script in scripts {
            for (at, _) in script.match_indices("p .. '") {
                let rest = &script[at + "p .. '".len()..];
                let name = &rest[..rest.find('\'').expect("a closed string")];
                assert!(name.starts_with(':'), "{name:?}");
                assert!(
                    layout.contains(&format!("`{{p}}{name}")),
                    "a script names {{p}}{name}, which the table lacks"
                );
                named += 1;
            }
        }
        assert!(named >= 6, "found the scripts' keys ({named})");
    }
}
