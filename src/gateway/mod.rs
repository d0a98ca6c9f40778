//! The transport layer: one listener serving HTTP routes and WebSockets.
//!
//! [`start`] opens the store, loads the auth key and run config, binds the
//! listener and starts the long-lived tasks (accept loop, lease timer,
//! stream upkeep).
//! [`RunningGateway::drain`] is the SIGTERM path: readiness false,
//! `gateway.draining` to every socket, in-flight requests answered, store
//! flushed. Modules: `server` (accept), `http` (routes, auth, upgrade),
//! `admission` (connection caps),
//! `connection` (one socket), `read_ahead` (its receive side in bursts),
//! `outbox` (its queue and signals), `budget` (its bytes in flight and queued),
//! `rate_limit` (its command budget), `token_rates` (the same budget per
//! token for HTTP listings),
//! `dispatch` (one request: decode, route, count), `cmd` (the command
//! handlers, one module per command or family), `errors` (domain errors
//! as protocol errors and HTTP statuses), `quota` (who a write is charged
//! to, and the refusal), `push` (every push frame),
//! `follow` (a socket's stream subscriptions),
//! `sse` (the event-stream response), `leases` (the expiry timer), `upkeep`
//! (stream retention and budget, saving renewed leases), `cluster` (sessions
//! shared with other gateways), `state` (what they
//! share), `metrics`; `fuzzing` (feature `fuzzing`) hands the dispatcher to
//! `fuzz/` (and to the handlers' unit tests).
//! Must not contain protocol or session rules beyond wiring them together.

mod admission;
mod budget;
mod cluster;
mod cmd;
mod connection;
mod dashboard;
mod dispatch;
mod errors;
mod follow;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod leases;
pub mod metrics;
mod outbox;
mod push;
mod quota;
mod rate_limit;
mod read_ahead;
mod server;
mod sse;
mod state;
mod token_rates;
mod upkeep;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, AuthKey};
use crate::config::{Config, ConfigError, StoreKind};
use crate::redis::keys::DEFAULT_PREFIX;
use crate::run_config::{RunConfigError, RunConfigSource, RunDirectory};
use crate::session::{LeasePolicy, Sessions};
use crate::store::embedded::EmbeddedStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::stream::StreamHub;
use crate::stream::log::{self as stream_log, LogError};
use crate::stream::redis::{self as redis_streams, RedisStreamsError};
use crate::time::Clock;
use state::{Connections, Shared};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    StreamLog(#[from] LogError),
    /// Names the Redis address (without its password).
    #[error("output streams: {0}")]
    RedisStreams(#[from] RedisStreamsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    RunConfig(#[from] RunConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A gateway serving on [`RunningGateway::local_addr`].
pub struct RunningGateway {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: JoinHandle<()>,
    lease_timer: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    cluster: JoinHandle<()>,
    /// Stops the accept loop and the lease timer, at the end of a drain.
    stop: CancellationToken,
}

/// Opens everything `config` names and starts serving.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    config.validate()?;
    let (store, streams): (Arc<dyn Store>, Arc<StreamHub>) = match &config.store {
        StoreKind::Embedded => (
            Arc::new(EmbeddedStore::open(&config.data_dir)?),
            stream_log::open(
                &config.data_dir.join("streams"),
                config.streams.clone(),
                config.stream_sync,
            )?,
        ),
        StoreKind::Memory => (
            Arc::new(MemoryStore::new()),
            Arc::new(StreamHub::new(config.streams.clone())),
        ),
        StoreKind::Redis { url } => {
            let store = RedisStore::connect(url, DEFAULT_PREFIX).await?;
            tracing::info!(
                node = store.node(),
                "sharing sessions, state and streams through Redis"
            );
            // Publishes are fenced by this node's hold on the session, in
            // the same Redis script as the append.
            let streams = redis_streams::connect(
                url,
                DEFAULT_PREFIX,
                config.streams.clone(),
                Some(store.node()),
            )
            .await?;
            (Arc::new(store), streams)
        }
    };
    let auth = AuthKey::load_or_create(&config.auth_key_file)?;
    let runs = match &config.config_file {
        Some(path) => RunConfigSource::load(path)?,
        None => RunConfigSource::fixed(RunDirectory::default()),
    };
    let listener = listen(config.listen).map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let clock = Clock::start();
    let (sessions, restored, expired_while_down) =
        Sessions::restore(lease_policy(&config), store.clone(), clock).await?;
    let now = clock.now();
    // A restored session keeps its run's stream, as on attach; one whose
    // lease ran out while the gateway was down starts its retention now.
    for run in &restored.live {
        streams.session_started(run, now);
    }
    for e in &expired_while_down {
        streams.session_ended(&e.run_id, now);
    }
    if !restored.live.is_empty() || !expired_while_down.is_empty() {
        tracing::info!(
            restored = restored.live.len(),
            expired_while_down = expired_while_down.len(),
            dropped_duplicates = restored.dropped,
            "sessions restored"
        );
    }
    let shared = shared_state(config, clock, sessions, store, streams, runs, auth);
    let stop = CancellationToken::new();
    let lease_timer = tokio::spawn(leases::run(shared.clone(), stop.clone()));
    let upkeep = tokio::spawn(upkeep::run(shared.clone(), stop.clone()));
    let cluster = tokio::spawn(cluster::run(shared.clone(), stop.clone()));
    let accept = tokio::spawn(server::accept_loop(listener, shared.clone(), stop.clone()));
    tracing::info!(addr = %local_addr, "rungate listening");
    Ok(RunningGateway {
        shared,
        local_addr,
        accept,
        lease_timer,
        upkeep,
        cluster,
        stop,
    })
}

/// The lease rules `config` asks for.
fn lease_policy(config: &Config) -> LeasePolicy {
    LeasePolicy {
        lease_ttl: config.lease_ttl,
        heartbeat_interval: config.heartbeat_interval,
        tombstone_ttl: config.session_tombstone_ttl,
        max_sessions_per_conn: config.limits.max_sessions_per_socket,
        max_runs_per_tenant: config.limits.max_runs_per_tenant,
    }
}

/// What every connection task shares, from its parts: built here only (the
/// fuzzing harness comes through here too, so it cannot drift).
fn shared_state(
    config: Config,
    clock: Clock,
    sessions: Sessions,
    store: Arc<dyn Store>,
    streams: Arc<StreamHub>,
    runs: RunConfigSource,
    auth: AuthKey,
) -> Arc<Shared> {
    Arc::new(Shared {
        clock,
        sessions,
        store,
        streams,
        runs,
        auth,
        conns: Connections::default(),
        admission: admission::Admission::new(
            config.limits.max_connections,
            config.limits.max_sockets_per_token,
        ),
        metrics: metrics::Metrics::default(),
        draining: CancellationToken::new(),
        tasks: TaskTracker::new(),
        http_rates: token_rates::TokenRates::new(
            config.limits.max_commands_per_sec,
            config.limits.command_burst,
        ),
        config,
    })
}

/// Connections the kernel queues before `accept`: std's 128 drops SYNs
/// during a reconnect storm of thousands of runtimes (a gateway restart),
/// turning it into seconds of retransmit stalls.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted gateway must get its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl RunningGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The key tokens for this gateway are signed with.
    pub fn auth_key(&self) -> &AuthKey {
        &self.shared.auth
    }

    /// Number of open WebSocket connections.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.len()
    }

    /// Drains and stops: stop accepting, tell every socket, let in-flight
    /// requests finish (up to the drain timeout), flush the store.
    pub async fn drain(self) -> Result<(), StoreError> {
        tracing::info!("draining");
        self.shared.draining.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(self.shared.config.drain_timeout, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed with connections still open; stopping anyway");
        }
        self.stop.cancel();
        let _ = self.accept.await;
        let _ = self.lease_timer.await;
        let _ = self.upkeep.await;
        let _ = self.cluster.await;
        self.shared.streams.close().await;
        // Leases renewed since the last periodic save, so a restart right
        // after the drain gives every runtime its full reconnect window.
        self.shared.sessions.save_renewals().await?;
        self.shared.store.flush().await?;
        tracing::info!("drained");
        Ok(())
    }
}
