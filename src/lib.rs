//! rungate: a WebSocket session gateway for long-lived agent runtimes.
//!
//! # Layout
//!
//! The workspace has a crate per user (see README, *How it is built*):
//! this one is the gateway and the `rungate` binary (`serve`, `token`,
//! `demo`); `rungate-protocol` is the wire vocabulary every Rust party
//! shares (ids, timestamps, the envelope and its one codec, typed payloads
//! named as in spec/, pushes, error codes, the `stream.events` frame);
//! `rungate-client` is the Rust client; `rungate-loadgen` the load
//! generator, its baseline server and the soak; `rungate-test-support` the
//! test plumbing. The clients for other languages are in `clients/`.
//!
//! Inside the gateway, three floors; imports only point down.
//!
//! 1. **Transport** — [`gateway`]: the listener, HTTP routes, WebSocket
//!    connections with their byte budgets and stream subscriptions, SSE,
//!    dispatch and the command handlers, timers (leases, stream upkeep), metrics, draining. Knows
//!    frames, not leases or offsets.
//! 2. **Domain** — [`session`] (sessions, leases, epochs, a run's end and
//!    pending cancel), [`stream`] (one hub of per-run ring buffers:
//!    offsets, subscriptions, the end marker, the global budget; memory,
//!    durable-log and Redis backends behind one small trait), [`store`]
//!    (KV, checkpoints, session records, and what each tenant holds of
//!    them: [`store::quota`]),
//!    [`auth`] (tokens, run patterns), [`run_config`] (per-run config and
//!    secrets), [`origin`] (which browser pages may call). Plain types;
//!    time comes in as an argument.
//! 3. **Vocabulary** — [`protocol`] (the protocol crate, read here under
//!    that name), [`ids`] and [`time`].
//!
//! [`config`] gathers flags, environment and the config file into one
//! [`config::Config`], from one table of settings.
//!
//! The path of one command frame: `gateway::connection` reads a text
//! message and charges it to the socket's budget → `gateway::dispatch`
//! takes a token of the socket's command budget, decodes it
//! (`protocol::decode_typed`, the frame in one read; or, for anything it
//! declines, `protocol::decode`, the envelope, then
//! `protocol::Command::parse`, the typed payload, which answer errors),
//! checks the endpoint offers it and routes it by type →
//! the command's handler in `gateway::cmd` checks the session and limits
//! and calls the domain → `protocol::encode_reply` (or `gateway::errors`,
//! the one mapping of domain errors to protocol codes, HTTP's included) →
//! the connection's bounded write queue → the socket. Every push frame is
//! built in `gateway::push`.
//!
//! The path of one published batch: `events.publish` is dispatched like any
//! command → `stream::StreamHub::publish_as` (the one hub, whatever the
//! store) locks the run's stream and hands its ring to the hub's
//! `stream::Backend` → the memory backend appends the batch (the ring
//! assigns its offsets and builds its `stream.events` frame once), visible
//! at once; the durable log appends it invisibly and queues its record,
//! and its writer thread shows it through the hub's one door,
//! `stream::hub::Inbox`, once written and synced → `StreamHub::settle`
//! wakes the run's readers → every subscribed connection's
//! `gateway::follow` takes the same `Bytes` and queues it → sockets.
//! `runtime.finish` takes the same way and ends with the stream's
//! `stream.ended` frame, built once too.
//!
//! Several gateways on one Redis (`--store redis://`) change the backends,
//! not the paths: `store::redis` holds KV, checkpoints and sessions (and
//! fences each session to the gateway that holds it), `stream::redis` is
//! the backend that makes Redis the authority for every stream, with a
//! replica of each in every gateway's `StreamHub`. The batch above takes
//! one detour (a Lua script in Redis assigns the offsets, then its
//! announcement comes back into every gateway's hub through the same inbox)
//! and the rest is the same. Both open Redis and name their keys through
//! [`crate::redis`] (`redis::conn`, and `redis::keys` with the whole key
//! layout), so neither reaches into the other. `gateway::cluster` carries the news between gateways:
//! sessions taken over elsewhere, cancels for sessions held elsewhere, and
//! this gateway's keep-alive.

pub mod auth;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod origin;
pub mod redis;
pub mod run_config;
pub mod session;
pub mod store;
pub mod stream;
pub mod time;

/// The wire vocabulary lives in the protocol crate; the gateway reads it
/// under these names.
pub use rungate_protocol as protocol;
pub use rungate_protocol::ids;
