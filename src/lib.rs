//! rungate: a WebSocket session gateway for long-lived agent runtimes.
//!
//! # Layout
//!
//! Three layers; imports only point down.
//!
//! 1. **Transport** — [`gateway`]: the listener, HTTP routes, WebSocket
//!    connections and their stream subscriptions, SSE, dispatch, timers
//!    (leases, stream upkeep), metrics, draining. Knows frames, not leases
//!    or offsets.
//! 2. **Protocol** — [`protocol`]: the envelope, typed command payloads,
//!    error codes; encode and decode. No I/O.
//! 3. **Domain** — [`session`] (sessions, leases, epochs), [`stream`]
//!    (per-run ring buffers, offsets, subscriptions, the global budget),
//!    [`store`] (KV and checkpoints), [`auth`] (tokens, run patterns),
//!    [`run_config`] (per-run config and secrets). Plain types; time comes in
//!    as an argument.
//!
//! Beside the layers, [`client`] is the Rust client for runtimes and viewers;
//! it speaks only the wire protocol, like any other client.
//!
//! Shared vocabulary that every layer uses: [`ids`] and [`time`].
//! [`config`] gathers flags, environment and the config file into one
//! [`config::Config`].
//!
//! The path of one frame: `gateway::connection` reads a text message →
//! `protocol::decode` checks the envelope → `gateway::dispatch` types the
//! payload and routes it by type → a domain call → `protocol::encode_*` →
//! the connection's bounded write queue → the socket.
//!
//! The path of one published batch: `events.publish` is dispatched like any
//! command → `stream::StreamHub::publish` appends it and builds its
//! `stream.events` frame once → every subscribed connection's
//! `gateway::follow` wakes, takes the same `Bytes` and queues it → sockets.
//!
//! Several gateways on one Redis (`--store redis://`) change the engines,
//! not the paths: `store::redis` holds KV, checkpoints and sessions (and
//! fences each session to the gateway that holds it), `stream::redis` makes
//! Redis the authority for every stream and keeps a replica of each in the
//! local `StreamHub`, so the batch above takes one detour (a Lua script in
//! Redis, then its announcement back into every gateway's hub) and the rest
//! is the same. `gateway::cluster` carries the news between gateways:
//! sessions taken over elsewhere, and this gateway's keep-alive.

pub mod auth;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod origin;
pub mod run_config;
pub mod session;
pub mod store;
pub mod stream;
pub mod time;

/// The wire vocabulary lives in the protocol crate; the gateway reads it
/// under these names.
pub use rungate_protocol as protocol;
pub use rungate_protocol::ids;
