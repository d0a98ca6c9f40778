//! [`RuntimeClient`]: one runtime's persistent socket, kept alive across
//! network failures.
//!
//! The handle ([`client`]) sends operations ([`op`]) to a driver task
//! ([`driver`]) that owns the socket and all mutable state: the runs
//! attached through this client ([`runs`]), requests in flight, publishes
//! not yet acknowledged ([`outbox`]), streams followed ([`follows`]) and
//! the heartbeat clock ([`heartbeat`]). The driver:
//!
//! - matches replies to requests by id (replies may come in any order);
//! - heartbeats every run at the interval the gateway gave;
//! - on a lost socket, reconnects with [`crate::Backoff`], attaches the
//!   main run again with `reconnect: true` and a higher `connectionEpoch`,
//!   moves the sub-runs with `runtime.recoverConnections` (dropping, one by
//!   one, any the gateway refuses), resends every unacknowledged publish in
//!   its original order, and resumes the streams it was following;
//! - numbers every published event with a per-run `seq`, so a resent batch
//!   is stored once: a network cut loses nothing and duplicates nothing.
//!
//! Requests that were sent but not answered when the socket dropped fail
//! with [`crate::ClientError::ConnectionLost`] (they may have been
//! applied); those not yet sent wait for the new connection. Publishes
//! never fail that way.
//!
//! A run ends with [`RuntimeClient::finish`]; a viewer's stop arrives on
//! [`RuntimeClient::cancel_requests`] (the runtime decides how to stop,
//! then finishes the run, usually `cancelled`).
//!
//! Every request is one of the protocol crate's typed payloads; every
//! reply is read as the protocol's typed reply. Must not know gateway
//! internals: only frames.

mod client;
mod driver;
mod events;
mod follows;
mod heartbeat;
mod op;
mod options;
mod outbox;
mod runs;

pub use client::{Attached, Checkpoint, Event, RuntimeClient};
pub use events::{CancelRequest, ClientEvent, ConnectionState};
pub use options::RuntimeOptions;
