//! What both Redis engines share: how a connection to Redis is opened
//! ([`conn`]) and the key layout under one prefix ([`keys`]).
//!
//! The session store ([`crate::store::redis`]) and the stream engine
//! ([`crate::stream::redis`]) each run their own tasks on their own
//! connections, but they open them the same way and read each other's keys
//! (a publish is fenced by the store's session holders), so both take
//! their connections and key names from here and neither reaches into the
//! other. Must not know what a store op or a stream op is: no scripts, no
//! records, no retries of commands.

pub mod conn;
pub mod keys;

/// A throwaway `redis-server` for tests, from the shared test-support crate.
#[cfg(test)]
pub(crate) use rungate_test_support::redis as test_server;
