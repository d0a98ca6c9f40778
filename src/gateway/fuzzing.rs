//! A doorway for `fuzz/` (feature `fuzzing`, hidden from the docs): the real
//! dispatcher over a real gateway state, without sockets.
//!
//! [`Harness`] builds what `gateway::start` builds — sessions, the memory
//! store, an in-memory stream hub, run config with one secret, metrics —
//! and two sockets on it as the connection task would see them: a runtime
//! socket (token: runs `fuzz-*`, every capability) and a viewer socket
//! (token: runs `fuzz-*`). Text goes through `dispatch::handle_text`, the
//! one entry the connection task uses, so the fuzzer reaches every check
//! and handler a peer can. It is not a second implementation of anything:
//! only the socket and its writer are missing. Unit tests of the handlers
//! use it too, with a store of their own ([`Harness::with_store`]) when
//! they need one that fails on demand.
//! Must stay small and must not be used by the gateway itself.

use std::sync::Arc;

use futures_util::FutureExt;

use super::cmd::{ConnCtx, Endpoint};
use super::dispatch::{self, Answer};
use super::outbox::Outbox;
use super::state::{Outgoing, Shared};
use crate::auth::{AuthKey, RunPattern, TokenKind};
use crate::config::{Config, StoreKind};
use crate::ids::Capability;
use crate::run_config::{RunConfigSource, RunDirectory};
use crate::session::Sessions;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::stream::StreamHub;
use crate::time::Clock;

/// Which of the harness's two sockets a frame arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/v1/runtime`, runtime token for `fuzz-*` with every capability.
    Runtime,
    /// `/v1/stream`, viewer token for `fuzz-*`.
    Viewer,
}

/// One in-process gateway state with a runtime and a viewer socket.
pub struct Harness {
    runtime: FakeSocket,
    viewer: FakeSocket,
}

struct FakeSocket {
    ctx: ConnCtx,
    /// What other tasks queued for this socket (superseded, expired).
    outbox: Arc<Outbox>,
}

/// Per-run config the fuzzer can read back (`config.get`, `secrets.get`).
const RUN_CONFIG: &str = r#"
[[runs]]
pattern = "fuzz-*"
[runs.config]
model = "small"
[runs.secrets]
API_KEY = "fuzz-secret"
"#;

impl Harness {
    /// A fresh state: no sessions, no streams.
    pub fn new() -> Harness {
        Harness::with_store(Arc::new(MemoryStore::new()))
    }

    /// [`Harness::new`] over `store` instead of a memory store.
    pub fn with_store(store: Arc<dyn Store>) -> Harness {
        let mut config = Config::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            "/nonexistent/rungate-fuzz",
        );
        config.store = StoreKind::Memory;
        // The constant above is valid; an empty directory would only make
        // config.get and secrets.get less interesting, never wrong.
        let runs = RunDirectory::from_toml_str(RUN_CONFIG).unwrap_or_default();
        let clock = Clock::start();
        let sessions = Sessions::new(super::lease_policy(&config), store.clone(), clock);
        let streams = Arc::new(StreamHub::new(config.streams.clone()));
        let shared = super::shared_state(
            config,
            clock,
            sessions,
            store,
            streams,
            RunConfigSource::fixed(runs),
            AuthKey::from_secret(b"fuzz"),
        );
        Harness {
            runtime: FakeSocket::open(&shared, Endpoint::Runtime, TokenKind::Runtime),
            viewer: FakeSocket::open(&shared, Endpoint::Stream, TokenKind::Viewer),
        }
    }

    /// Handles one text message on `side` as the connection task would,
    /// waiting for a store-bound answer; returns the answer frame's text.
    pub async fn send(&mut self, side: Side, text: &str) -> String {
        let answer = dispatch::handle_text(&mut self.socket(side).ctx, text);
        let frame = match answer {
            Answer::Now(frame) => frame,
            Answer::Later(pending, _) => pending.await,
        };
        frame.as_str().to_owned()
    }

    /// Every frame queued for `side` but not yet taken: pushes from other
    /// sockets, then stream deliveries that are ready now.
    pub fn drain(&mut self, side: Side) -> Vec<String> {
        let socket = self.socket(side);
        let mut frames = Vec::new();
        while let Some(item) = socket.outbox.try_next() {
            if let Outgoing::Frame(bytes) = item {
                socket.outbox.release(bytes.len());
                frames.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        while socket.ctx.following.is_waiting() {
            match socket.ctx.following.next().now_or_never() {
                Some(Some((_run, sent))) => frames.extend(
                    sent.frames
                        .iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                ),
                _ => break,
            }
        }
        frames
    }

    fn socket(&mut self, side: Side) -> &mut FakeSocket {
        match side {
            Side::Runtime => &mut self.runtime,
            Side::Viewer => &mut self.viewer,
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl FakeSocket {
    fn open(shared: &Arc<Shared>, endpoint: Endpoint, kind: TokenKind) -> FakeSocket {
        let limits = &shared.config.limits;
        let outbox = Outbox::new(limits.outbound_queue, limits.max_socket_buffer_bytes);
        let id = shared.conns.register(outbox.clone());
        let caps = match kind {
            TokenKind::Runtime => Capability::ALL.into_iter().collect(),
            TokenKind::Viewer => Default::default(),
        };
        // A real token through the real check: the grant is what a peer
        // holding this token gets.
        let runs = RunPattern::parse("fuzz-*")
            .expect("a constant, valid pattern")
            .into();
        let grant = shared
            .auth
            .mint(kind, &runs, caps, std::time::Duration::from_secs(86_400))
            .and_then(|token| shared.auth.verify(&token))
            .expect("a token minted here verifies here");
        FakeSocket {
            ctx: ConnCtx::new(id, endpoint, grant, shared.clone()),
            outbox,
        }
    }
}
