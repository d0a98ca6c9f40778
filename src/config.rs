//! Everything the gateway can be told, gathered into one [`Config`].
//!
//! Sources, strongest first: command-line flags, `RUNGATE_*` environment
//! variables (clap reads both), the `[gateway]` table of the `--config`
//! TOML file, then the defaults written here. The same file's `[[runs]]`
//! entries (per-run config and secrets) belong to [`crate::run_config`].
//! Must not open sockets or files other than reading the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::origin::AllowedOrigins;
use crate::stream::StreamLimits;
use crate::stream::log::SyncPolicy;

/// Which engine holds KV, checkpoints and session records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// redb files under `--data-dir` (the default).
    Embedded,
    /// Process memory: gone on restart.
    Memory,
    /// A Redis server shared by several gateways (`redis://HOST:PORT/DB`).
    Redis { url: String },
}

impl std::str::FromStr for StoreKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "embedded" => Ok(StoreKind::Embedded),
            "memory" => Ok(StoreKind::Memory),
            url if url.starts_with("redis://") => Ok(StoreKind::Redis {
                url: url.to_owned(),
            }),
            other => Err(ConfigError::Invalid(format!(
                "--store {other:?} is not supported; use \"embedded\", \"memory\" or \"redis://HOST:PORT/DB\""
            ))),
        }
    }
}

/// Room in a reply for its envelope (id, type, the member names around the
/// data) besides the data itself.
pub const REPLY_OVERHEAD_BYTES: usize = 4096;

/// Sizes and counts that bound what one peer can make the gateway hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message (and frame) accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Requests one socket may have in flight (waiting on the store); past
    /// this the gateway stops reading that socket until one completes.
    pub max_inflight_per_socket: usize,
    /// Frames queued for one socket's writer before producers wait (replies)
    /// or the socket is dropped (pushes to a socket that does not read).
    pub outbound_queue: usize,
    /// Time a client has to send its HTTP request headers.
    pub handshake_timeout: Duration,
    /// Longest a socket may take no data while frames wait for it before
    /// it is closed.
    pub write_timeout: Duration,
    /// Events one `events.publish` may carry.
    pub max_events_per_publish: usize,
    /// Bytes of one output event's JSON.
    pub max_event_bytes: usize,
    /// Runs one socket may follow at once (`stream.resume`).
    pub max_subscriptions_per_socket: usize,
    /// How often an idle SSE response gets a comment line, so proxies and
    /// browsers keep it open.
    pub sse_keepalive: Duration,
    /// Bytes of one KV key (UTF-8).
    pub max_kv_key_bytes: usize,
    /// Bytes of one KV value (UTF-8).
    pub max_kv_value_bytes: usize,
    /// Keys one run's KV may hold: bounds how long counting, reading or
    /// deleting one run's KV can take, whatever its tenant's quota.
    pub max_kv_keys_per_run: usize,
    /// Bytes of one checkpoint's `data` JSON, as sent.
    pub max_checkpoint_bytes: usize,
    /// Sessions one socket may hold: its main run plus sub-runs.
    pub max_sessions_per_socket: usize,
    /// Open WebSockets and SSE responses one token may hold at once, so
    /// one leaked or looping credential cannot take every place.
    pub max_sockets_per_token: usize,
    /// Open WebSockets and SSE responses the gateway holds in all; past it
    /// new ones are refused with 503 before any upgrade.
    pub max_connections: usize,
    /// How long a runtime socket may hold no session before it is closed.
    pub idle_timeout: Duration,
    /// Commands one socket may send per second, sustained (token bucket).
    pub max_commands_per_sec: u32,
    /// Commands one socket may send at once above the sustained rate.
    pub command_burst: u32,
    /// Bytes of one reply frame; a larger answer is refused with
    /// `PAYLOAD_TOO_LARGE` (the socket stays open). At least one checkpoint
    /// and one KV pair, however escaped, so anything stored can be read.
    pub max_reply_bytes: usize,
    /// Bytes one socket may hold in the gateway: replies being built
    /// (counted at their worst case), queued and unsent frames. At it,
    /// reading the socket pauses.
    pub max_socket_buffer_bytes: usize,
    /// Keys one `kv.get` or `kv.delete` may name: bounds how long one
    /// request holds the store (a 1 MiB frame could name 300,000 keys).
    pub max_kv_get_keys: usize,
    /// Session records (live sessions and tombstones) one tenant may have
    /// (spec/README.md, *Quotas per tenant*).
    pub max_runs_per_tenant: u64,
    /// Key plus value bytes the KV of one tenant's runs may hold.
    pub max_kv_bytes_per_tenant: u64,
    /// Id plus data bytes the checkpoints of one tenant's runs may hold.
    pub max_checkpoint_bytes_per_tenant: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 1024 * 1024,
            max_inflight_per_socket: 256,
            outbound_queue: 1024,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_events_per_publish: 1000,
            max_event_bytes: 64 * 1024,
            max_subscriptions_per_socket: 256,
            sse_keepalive: Duration::from_secs(15),
            max_kv_key_bytes: 512,
            max_kv_value_bytes: 64 * 1024,
            max_kv_keys_per_run: 1000,
            max_checkpoint_bytes: 1024 * 1024,
            max_sessions_per_socket: 128,
            max_sockets_per_token: 1000,
            max_connections: 100_000,
            idle_timeout: Duration::from_secs(60),
            max_commands_per_sec: 1000,
            command_burst: 2000,
            max_reply_bytes: 2 * 1024 * 1024,
            max_socket_buffer_bytes: 8 * 1024 * 1024,
            max_kv_get_keys: 1000,
            // What one gateway is sized for (BENCHMARKS.md: 100k
            // sessions), so a gateway of one tenant is not limited by it;
            // an operator with several tenants gives each its share.
            max_runs_per_tenant: 100_000,
            max_kv_bytes_per_tenant: 256 * 1024 * 1024,
            max_checkpoint_bytes_per_tenant: 256 * 1024 * 1024,
        }
    }
}

/// The gateway's whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The TOML file with `[gateway]` settings and `[[runs]]` config/secrets.
    pub config_file: Option<PathBuf>,
    pub auth_key_file: PathBuf,
    pub store: StoreKind,
    /// What attach tells runtimes; never under 1000 ms.
    pub heartbeat_interval: Duration,
    /// How long a session lives without a heartbeat (default 3 × interval).
    pub lease_ttl: Duration,
    /// How long an expired session is remembered, to answer `SESSION_EXPIRED`.
    pub session_tombstone_ttl: Duration,
    /// What `gateway.draining` tells clients to wait before reconnecting.
    pub reconnect_after: Duration,
    /// Longest a drain waits for in-flight requests before exiting anyway.
    pub drain_timeout: Duration,
    pub limits: Limits,
    /// Ring buffer bounds, retention and the global byte budget.
    pub streams: StreamLimits,
    /// When the output-event log is synced (embedded store only).
    pub stream_sync: SyncPolicy,
    /// Browser origins allowed besides the gateway's own (`Origin` equal to
    /// the `Host` the request was sent to).
    pub allowed_origins: AllowedOrigins,
}

impl Config {
    /// Defaults for a gateway on `listen` keeping its files in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Config {
        let data_dir = data_dir.into();
        let heartbeat_interval = Duration::from_secs(10);
        Config {
            listen,
            auth_key_file: data_dir.join("auth.key"),
            data_dir,
            config_file: None,
            store: StoreKind::Embedded,
            heartbeat_interval,
            lease_ttl: heartbeat_interval * LEASE_TTL_HEARTBEATS,
            session_tombstone_ttl: Duration::from_secs(3600),
            reconnect_after: Duration::from_millis(1000),
            drain_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            streams: StreamLimits::default(),
            stream_sync: SyncPolicy::Always,
            allowed_origins: AllowedOrigins::default(),
        }
    }

    /// Every default: what `rungate serve` runs with when told nothing.
    pub fn defaults() -> Config {
        Config::new(
            SocketAddr::from(([127, 0, 0, 1], 7700)),
            PathBuf::from("rungate-data"),
        )
    }

    /// Checks relations between settings that no single flag can.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval < Duration::from_millis(1000) {
            return Err(ConfigError::Invalid(
                "heartbeat interval must be at least 1000 ms (PROTOCOL.md §3)".into(),
            ));
        }
        if self.lease_ttl.is_zero() {
            return Err(ConfigError::Invalid("lease TTL must be positive".into()));
        }
        if self.limits.max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max frame size must be at least 1024 bytes".into(),
            ));
        }
        if self.limits.max_inflight_per_socket == 0 || self.limits.outbound_queue == 0 {
            return Err(ConfigError::Invalid("queue limits must be positive".into()));
        }
        let l = &self.limits;
        if l.max_events_per_publish == 0
            || l.max_event_bytes == 0
            || l.max_subscriptions_per_socket == 0
            || l.sse_keepalive.is_zero()
            || l.write_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "publish, subscription and keepalive limits must be positive".into(),
            ));
        }
        if l.max_kv_key_bytes == 0
            || l.max_kv_value_bytes == 0
            || l.max_kv_keys_per_run == 0
            || l.max_checkpoint_bytes == 0
            || l.max_sessions_per_socket == 0
            || l.max_sockets_per_token == 0
            || l.max_connections == 0
            || l.idle_timeout.is_zero()
            || l.max_commands_per_sec == 0
            || l.command_burst == 0
            || l.max_kv_get_keys == 0
            || l.max_runs_per_tenant == 0
            || l.max_kv_bytes_per_tenant == 0
            || l.max_checkpoint_bytes_per_tenant == 0
        {
            return Err(ConfigError::Invalid(
                "KV, checkpoint, session, connection, idle, rate and quota limits must be positive"
                    .into(),
            ));
        }
        // Limits that agree: anything stored within the limits can be read
        // back in one reply, so a reply must hold the largest checkpoint and
        // the largest KV pair, each at its worst JSON escaping.
        let one_pair = (l.max_kv_key_bytes + l.max_kv_value_bytes).saturating_mul(6);
        let needed = l.max_checkpoint_bytes.max(one_pair) + REPLY_OVERHEAD_BYTES;
        if l.max_reply_bytes < needed {
            return Err(ConfigError::Invalid(format!(
                "max reply size must be at least {needed} bytes (the largest checkpoint or KV pair, escaped, with its frame)"
            )));
        }
        if l.max_socket_buffer_bytes < l.max_reply_bytes {
            return Err(ConfigError::Invalid(
                "the socket buffer must hold at least one reply of the maximum size".into(),
            ));
        }
        let s = &self.streams;
        if s.max_events_per_run == 0 || s.max_bytes_per_run == 0 || s.max_events_per_delivery == 0 {
            return Err(ConfigError::Invalid(
                "stream limits must be positive".into(),
            ));
        }
        if s.global_max_bytes < s.max_bytes_per_run {
            return Err(ConfigError::Invalid(
                "the global stream budget must be at least the per-run byte limit".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// One `--help` line: what a setting is, then its default.
fn help(what: &str, default: impl std::fmt::Display) -> String {
    format!("{what} [default: {default}]")
}

/// The `allowed_origins` setting as written: a comma-separated list on the
/// command line and in the environment, a list (or the same string) in the
/// config file. Parsed into [`AllowedOrigins`] when the config is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginList(pub Vec<String>);

impl std::str::FromStr for OriginList {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(OriginList(
            s.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

impl<'de> Deserialize<'de> for OriginList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            List(Vec<String>),
            Comma(String),
        }
        Ok(match Written::deserialize(d)? {
            Written::List(list) => OriginList(list),
            Written::Comma(s) => match s.parse() {
                Ok(list) => list,
                Err(never) => match never {},
            },
        })
    }
}

/// The table of settings: each is written once, here, and becomes a flag
/// (`--name-with-dashes`), an environment variable (`RUNGATE_NAME`), a key
/// of the config file's `[gateway]` table (`name`), a line of `--help`
/// (its doc and its default, read from [`Config::defaults`]) and a step of
/// [`ServeArgs::into_config`] (`set`, applied in table order, so a setting
/// that derives another's default comes before it).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $name:ident: $ty:ty, $env:literal,
            default |$d:ident| $default:expr,
            set |$c:ident, $v:ident| $set:block
    )*) => {
        /// `rungate serve` flags. Every flag also reads `RUNGATE_<FLAG>` and the
        /// `[gateway]` table of `--config` (same names with underscores).
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            /// TOML file: a [gateway] table with these settings, [[runs]] config and secrets
            #[arg(long, env = "RUNGATE_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])+
                #[arg(long, env = $env, help = help(concat!($($doc),+).trim(), {
                    let $d = Config::defaults();
                    $default
                }))]
                pub $name: Option<$ty>,
            )*
        }

        /// The `[gateway]` table of the config file: the same settings.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileGateway {
            $( $name: Option<$ty>, )*
        }

        impl ServeArgs {
            /// Layers flags/env over the config file over defaults.
            pub fn into_config(self) -> Result<Config, ConfigError> {
                let file = match &self.config {
                    Some(path) => read_file_gateway(path)?,
                    None => FileGateway::default(),
                };
                let mut config = Config::defaults();
                config.config_file = self.config;
                $(
                    if let Some(value) = self.$name.or(file.$name) {
                        #[allow(unused_variables)]
                        fn set($c: &mut Config, $v: $ty) -> Result<(), ConfigError> {
                            $set
                            Ok(())
                        }
                        set(&mut config, value)?;
                    }
                )*
                config.validate()?;
                Ok(config)
            }

            /// Every setting's name, as a config-file key.
            #[cfg(test)]
            fn names() -> &'static [&'static str] {
                &[$(stringify!($name)),*]
            }
        }
    };
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

settings! {
    /// Address to listen on
    listen: SocketAddr, "RUNGATE_LISTEN",
        default |d| d.listen,
        set |c, v| { c.listen = v; }
    /// Directory for the embedded store and the auth key
    data_dir: PathBuf, "RUNGATE_DATA_DIR",
        default |d| d.data_dir.display().to_string(),
        set |c, v| {
            // The key file lives in the data directory unless told apart
            // (auth_key_file comes after this in the table).
            c.auth_key_file = v.join("auth.key");
            c.data_dir = v;
        }
    /// HMAC key for tokens; created on first start
    auth_key_file: PathBuf, "RUNGATE_AUTH_KEY_FILE",
        default |_d| "DATA_DIR/auth.key",
        set |c, v| { c.auth_key_file = v; }
    /// Storage engine: "embedded" (redb under --data-dir), "memory", or
    /// "redis://HOST:PORT/DB" (KV, checkpoints, sessions in Redis)
    store: String, "RUNGATE_STORE",
        default |_d| "embedded",
        set |c, v| { c.store = v.parse()?; }
    /// Heartbeat interval told to runtimes, ms (≥ 1000)
    heartbeat_interval_ms: u64, "RUNGATE_HEARTBEAT_INTERVAL_MS",
        default |d| millis(d.heartbeat_interval),
        set |c, v| {
            c.heartbeat_interval = Duration::from_millis(v);
            c.lease_ttl = c.heartbeat_interval * LEASE_TTL_HEARTBEATS;
        }
    /// Lease TTL, ms
    lease_ttl_ms: u64, "RUNGATE_LEASE_TTL_MS",
        default |_d| format!("{LEASE_TTL_HEARTBEATS} × heartbeat interval"),
        set |c, v| { c.lease_ttl = Duration::from_millis(v); }
    /// How long an expired session is remembered, s
    session_tombstone_secs: u64, "RUNGATE_SESSION_TOMBSTONE_SECS",
        default |d| secs(d.session_tombstone_ttl),
        set |c, v| { c.session_tombstone_ttl = Duration::from_secs(v); }
    /// Largest WebSocket message accepted, bytes
    max_frame_bytes: usize, "RUNGATE_MAX_FRAME_BYTES",
        default |d| d.limits.max_frame_bytes,
        set |c, v| { c.limits.max_frame_bytes = v; }
    /// Requests in flight per socket before reading pauses
    max_inflight_per_socket: usize, "RUNGATE_MAX_INFLIGHT_PER_SOCKET",
        default |d| d.limits.max_inflight_per_socket,
        set |c, v| { c.limits.max_inflight_per_socket = v; }
    /// Frames queued per socket
    outbound_queue: usize, "RUNGATE_OUTBOUND_QUEUE",
        default |d| d.limits.outbound_queue,
        set |c, v| { c.limits.outbound_queue = v; }
    /// Seconds a client has to send its HTTP headers
    handshake_timeout_secs: u64, "RUNGATE_HANDSHAKE_TIMEOUT_SECS",
        default |d| secs(d.limits.handshake_timeout),
        set |c, v| { c.limits.handshake_timeout = Duration::from_secs(v); }
    /// reconnectAfterMs told to clients when draining
    reconnect_after_ms: u64, "RUNGATE_RECONNECT_AFTER_MS",
        default |d| millis(d.reconnect_after),
        set |c, v| { c.reconnect_after = Duration::from_millis(v); }
    /// Longest a drain waits for in-flight work, s
    drain_timeout_secs: u64, "RUNGATE_DRAIN_TIMEOUT_SECS",
        default |d| secs(d.drain_timeout),
        set |c, v| { c.drain_timeout = Duration::from_secs(v); }
    /// Seconds a socket may take no data while frames wait before it is closed
    write_timeout_secs: u64, "RUNGATE_WRITE_TIMEOUT_SECS",
        default |d| secs(d.limits.write_timeout),
        set |c, v| { c.limits.write_timeout = Duration::from_secs(v); }
    /// Events one events.publish may carry
    max_events_per_publish: usize, "RUNGATE_MAX_EVENTS_PER_PUBLISH",
        default |d| d.limits.max_events_per_publish,
        set |c, v| { c.limits.max_events_per_publish = v; }
    /// Bytes of one output event's JSON
    max_event_bytes: usize, "RUNGATE_MAX_EVENT_BYTES",
        default |d| d.limits.max_event_bytes,
        set |c, v| { c.limits.max_event_bytes = v; }
    /// Runs one socket may follow at once
    max_subscriptions_per_socket: usize, "RUNGATE_MAX_SUBSCRIPTIONS_PER_SOCKET",
        default |d| d.limits.max_subscriptions_per_socket,
        set |c, v| { c.limits.max_subscriptions_per_socket = v; }
    /// Seconds between keepalive comments on an idle SSE response
    sse_keepalive_secs: u64, "RUNGATE_SSE_KEEPALIVE_SECS",
        default |d| secs(d.limits.sse_keepalive),
        set |c, v| { c.limits.sse_keepalive = Duration::from_secs(v); }
    /// Events kept per run's stream
    stream_max_events: usize, "RUNGATE_STREAM_MAX_EVENTS",
        default |d| d.streams.max_events_per_run,
        set |c, v| { c.streams.max_events_per_run = v; }
    /// Bytes kept per run's stream
    stream_max_bytes: usize, "RUNGATE_STREAM_MAX_BYTES",
        default |d| d.streams.max_bytes_per_run,
        set |c, v| { c.streams.max_bytes_per_run = v; }
    /// Bytes kept across all streams; idle streams are evicted first
    stream_global_max_bytes: usize, "RUNGATE_STREAM_GLOBAL_MAX_BYTES",
        default |d| d.streams.global_max_bytes,
        set |c, v| { c.streams.global_max_bytes = v; }
    /// Seconds a run's stream stays readable after its session ends
    stream_retention_secs: u64, "RUNGATE_STREAM_RETENTION_SECS",
        default |d| secs(d.streams.retention),
        set |c, v| { c.streams.retention = Duration::from_secs(v); }
    /// When the event log reaches the disk: always (before every ack), interval:MS, or os
    stream_sync: String, "RUNGATE_STREAM_SYNC",
        default |_d| "always",
        set |c, v| { c.stream_sync = v.parse().map_err(ConfigError::Invalid)?; }
    /// Bytes of one KV key
    max_kv_key_bytes: usize, "RUNGATE_MAX_KV_KEY_BYTES",
        default |d| d.limits.max_kv_key_bytes,
        set |c, v| { c.limits.max_kv_key_bytes = v; }
    /// Bytes of one KV value
    max_kv_value_bytes: usize, "RUNGATE_MAX_KV_VALUE_BYTES",
        default |d| d.limits.max_kv_value_bytes,
        set |c, v| { c.limits.max_kv_value_bytes = v; }
    /// Keys one run's KV may hold
    max_kv_keys_per_run: usize, "RUNGATE_MAX_KV_KEYS_PER_RUN",
        default |d| d.limits.max_kv_keys_per_run,
        set |c, v| { c.limits.max_kv_keys_per_run = v; }
    /// Bytes of one checkpoint's data JSON
    max_checkpoint_bytes: usize, "RUNGATE_MAX_CHECKPOINT_BYTES",
        default |d| d.limits.max_checkpoint_bytes,
        set |c, v| { c.limits.max_checkpoint_bytes = v; }
    /// Sessions one socket may hold (main run and sub-runs)
    max_sessions_per_socket: usize, "RUNGATE_MAX_SESSIONS_PER_SOCKET",
        default |d| d.limits.max_sessions_per_socket,
        set |c, v| { c.limits.max_sessions_per_socket = v; }
    /// Open WebSockets and SSE responses one token may hold
    max_sockets_per_token: usize, "RUNGATE_MAX_SOCKETS_PER_TOKEN",
        default |d| d.limits.max_sockets_per_token,
        set |c, v| { c.limits.max_sockets_per_token = v; }
    /// Open WebSockets and SSE responses in all; more get HTTP 503
    max_connections: usize, "RUNGATE_MAX_CONNECTIONS",
        default |d| d.limits.max_connections,
        set |c, v| { c.limits.max_connections = v; }
    /// Seconds a runtime socket may hold no session before it is closed
    idle_timeout_secs: u64, "RUNGATE_IDLE_TIMEOUT_SECS",
        default |d| secs(d.limits.idle_timeout),
        set |c, v| { c.limits.idle_timeout = Duration::from_secs(v); }
    /// Commands one socket may send per second, sustained
    max_commands_per_sec: u32, "RUNGATE_MAX_COMMANDS_PER_SEC",
        default |d| d.limits.max_commands_per_sec,
        set |c, v| { c.limits.max_commands_per_sec = v; }
    /// Commands one socket may send at once above the sustained rate
    command_burst: u32, "RUNGATE_COMMAND_BURST",
        default |d| d.limits.command_burst,
        set |c, v| { c.limits.command_burst = v; }
    /// Bytes of one reply; larger answers are PAYLOAD_TOO_LARGE
    max_reply_bytes: usize, "RUNGATE_MAX_REPLY_BYTES",
        default |d| d.limits.max_reply_bytes,
        set |c, v| { c.limits.max_reply_bytes = v; }
    /// Bytes one socket may have in flight and queued before reading pauses
    max_socket_buffer_bytes: usize, "RUNGATE_MAX_SOCKET_BUFFER_BYTES",
        default |d| d.limits.max_socket_buffer_bytes,
        set |c, v| { c.limits.max_socket_buffer_bytes = v; }
    /// Keys one kv.get or kv.delete may name
    max_kv_get_keys: usize, "RUNGATE_MAX_KV_GET_KEYS",
        default |d| d.limits.max_kv_get_keys,
        set |c, v| { c.limits.max_kv_get_keys = v; }
    /// Runs one tenant may hold sessions for (live and tombstones); more
    /// is QUOTA_EXCEEDED
    max_runs_per_tenant: u64, "RUNGATE_MAX_RUNS_PER_TENANT",
        default |d| d.limits.max_runs_per_tenant,
        set |c, v| { c.limits.max_runs_per_tenant = v; }
    /// Bytes of KV (keys and values) the runs of one tenant may hold
    max_kv_bytes_per_tenant: u64, "RUNGATE_MAX_KV_BYTES_PER_TENANT",
        default |d| d.limits.max_kv_bytes_per_tenant,
        set |c, v| { c.limits.max_kv_bytes_per_tenant = v; }
    /// Bytes of checkpoints (ids and data) the runs of one tenant may hold
    max_checkpoint_bytes_per_tenant: u64, "RUNGATE_MAX_CHECKPOINT_BYTES_PER_TENANT",
        default |d| d.limits.max_checkpoint_bytes_per_tenant,
        set |c, v| { c.limits.max_checkpoint_bytes_per_tenant = v; }
    /// Browser origins allowed besides the gateway's own, comma-separated
    /// (https://app.example.com,http://localhost:3000), or * for any
    allowed_origins: OriginList, "RUNGATE_ALLOWED_ORIGINS",
        default |_d| "same origin only",
        set |c, v| {
            c.allowed_origins = AllowedOrigins::parse(v.0.iter().map(String::as_str))
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
}

/// The lease TTL, in heartbeat intervals, when it is not set itself.
const LEASE_TTL_HEARTBEATS: u32 = 3;

#[derive(Debug, Default, Deserialize)]
struct FileTop {
    #[serde(default)]
    gateway: FileGateway,
}

fn read_file_gateway(path: &Path) -> Result<FileGateway, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    // [[runs]] may hold secrets and toml's Display quotes the offending
    // line, so keep only its message (which names the key, not the value).
    let top: FileTop = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    Ok(top.gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rungate.toml");
        std::fs::write(
            &path,
            "[gateway]\nheartbeat_interval_ms = 2000\nmax_frame_bytes = 4096\n\n[[runs]]\npattern = \"*\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            max_frame_bytes: Some(8192),
            ..ServeArgs::default()
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(2000));
        assert_eq!(c.lease_ttl, Duration::from_millis(6000));
        assert_eq!(c.limits.max_frame_bytes, 8192);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 7700)));
    }

    #[test]
    fn every_limit_is_a_config_key_and_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rungate.toml");
        std::fs::write(
            &path,
            "[gateway]\nmax_kv_key_bytes = 1\nmax_kv_value_bytes = 2\nmax_kv_keys_per_run = 3\n\
             max_checkpoint_bytes = 4\nmax_sessions_per_socket = 5\nmax_sockets_per_token = 6\n\
             max_connections = 7\nidle_timeout_secs = 8\nmax_commands_per_sec = 9\n\
             command_burst = 10\nallowed_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let c = args.into_config().unwrap();
        let l = &c.limits;
        assert_eq!(
            (
                l.max_kv_key_bytes,
                l.max_kv_value_bytes,
                l.max_kv_keys_per_run
            ),
            (1, 2, 3)
        );
        assert_eq!(
            (
                l.max_checkpoint_bytes,
                l.max_sessions_per_socket,
                l.max_sockets_per_token
            ),
            (4, 5, 6)
        );
        assert_eq!(l.max_connections, 7);
        assert_eq!(l.idle_timeout, Duration::from_secs(8));
        assert_eq!((l.max_commands_per_sec, l.command_burst), (9, 10));
        assert_eq!(
            c.allowed_origins,
            AllowedOrigins::List(vec!["https://a.example".into()])
        );
        // Flags win over the file.
        let args = ServeArgs {
            config: Some(path),
            max_connections: Some(70),
            allowed_origins: Some(OriginList(vec!["*".into()])),
            ..ServeArgs::default()
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.limits.max_connections, 70);
        assert_eq!(c.allowed_origins, AllowedOrigins::Any);
        // Zero is refused, as is an origin with a path.
        let zero = ServeArgs {
            command_burst: Some(0),
            ..ServeArgs::default()
        };
        assert!(matches!(zero.into_config(), Err(ConfigError::Invalid(_))));
        let bad = ServeArgs {
            allowed_origins: Some("https://a.example/app".parse().unwrap()),
            ..ServeArgs::default()
        };
        assert!(matches!(bad.into_config(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn quotas_are_settings_with_defaults_and_zero_is_refused() {
        let d = Config::defaults().limits;
        assert_eq!(
            (
                d.max_runs_per_tenant,
                d.max_kv_bytes_per_tenant,
                d.max_checkpoint_bytes_per_tenant
            ),
            (100_000, 256 << 20, 256 << 20)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rungate.toml");
        std::fs::write(
            &path,
            "[gateway]\nmax_runs_per_tenant = 7\nmax_kv_bytes_per_tenant = 8\n\
             max_checkpoint_bytes_per_tenant = 9\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_kv_bytes_per_tenant: Some(80),
            ..ServeArgs::default()
        };
        let l = args.into_config().unwrap().limits;
        assert_eq!(
            (
                l.max_runs_per_tenant,
                l.max_kv_bytes_per_tenant,
                l.max_checkpoint_bytes_per_tenant
            ),
            (7, 80, 9)
        );
        for zero in [
            ServeArgs {
                max_runs_per_tenant: Some(0),
                ..ServeArgs::default()
            },
            ServeArgs {
                max_kv_bytes_per_tenant: Some(0),
                ..ServeArgs::default()
            },
            ServeArgs {
                max_checkpoint_bytes_per_tenant: Some(0),
                ..ServeArgs::default()
            },
        ] {
            assert!(matches!(zero.into_config(), Err(ConfigError::Invalid(_))));
        }
    }

    #[test]
    fn refuses_a_too_short_heartbeat_and_unknown_settings() {
        let args = ServeArgs {
            heartbeat_interval_ms: Some(999),
            ..ServeArgs::default()
        };
        assert!(matches!(args.into_config(), Err(ConfigError::Invalid(_))));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[gateway]\nlisten_port = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert!(matches!(args.into_config(), Err(ConfigError::Parse { .. })));
    }

    /// The table gives every setting its file key, flag and variable: a
    /// file naming each key parses, and `--help` names each flag and
    /// variable once.
    #[test]
    fn every_setting_is_a_file_key_a_flag_and_a_variable() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let mut help = Vec::new();
        Cli::command().write_long_help(&mut help).unwrap();
        let help = String::from_utf8(help).unwrap();
        for name in ServeArgs::names() {
            let flag = format!("--{} ", name.replace('_', "-"));
            let var = format!("RUNGATE_{}=", name.to_uppercase());
            assert_eq!(help.matches(&flag).count(), 1, "{flag} in --help:\n{help}");
            assert_eq!(help.matches(&var).count(), 1, "{var} in --help");
            let text = format!("[gateway]\n{name} = {}\n", sample(name));
            let parsed: Result<FileTop, _> = toml::from_str(&text);
            assert!(parsed.is_ok(), "{text}: {:?}", parsed.err());
        }
        assert!(
            help.contains("[default: 1048576]"),
            "defaults come from Config::defaults"
        );
    }

    fn sample(name: &str) -> &'static str {
        match name {
            "listen" => "\"127.0.0.1:1\"",
            "data_dir" | "auth_key_file" | "store" | "stream_sync" => "\"x\"",
            "allowed_origins" => "[\"https://a.example\"]",
            _ => "1",
        }
    }
}
