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

use crate::gateway::origin::AllowedOrigins;
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
    /// Keys one run's KV may hold: KV is never deleted, so without this a
    /// runtime could grow the store without bound, one new key at a time.
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
    /// Keys one `kv.get` may name: bounds how long one request holds the
    /// store (a 1 MiB frame could name 300,000 keys).
    pub max_kv_get_keys: usize,
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
            lease_ttl: heartbeat_interval * 3,
            session_tombstone_ttl: Duration::from_secs(3600),
            reconnect_after: Duration::from_millis(1000),
            drain_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            streams: StreamLimits::default(),
            stream_sync: SyncPolicy::Always,
            allowed_origins: AllowedOrigins::default(),
        }
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
        {
            return Err(ConfigError::Invalid(
                "KV, checkpoint, session, connection, idle and rate limits must be positive".into(),
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

/// `rungate serve` flags. Every flag also reads `RUNGATE_<FLAG>` and the
/// `[gateway]` table of `--config` (same names with underscores).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7700]
    #[arg(long, env = "RUNGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded store and the auth key [default: ./rungate-data]
    #[arg(long, env = "RUNGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML file: a [gateway] table with these settings, [[runs]] config and secrets
    #[arg(long, env = "RUNGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// HMAC key for tokens; created on first start [default: DATA_DIR/auth.key]
    #[arg(long, env = "RUNGATE_AUTH_KEY_FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// Storage engine: "embedded" (redb under --data-dir), "memory", or
    /// "redis://HOST:PORT/DB" (KV, checkpoints, sessions in Redis) [default: embedded]
    #[arg(long, env = "RUNGATE_STORE")]
    pub store: Option<String>,
    /// Heartbeat interval told to runtimes, ms (≥ 1000) [default: 10000]
    #[arg(long, env = "RUNGATE_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lease TTL, ms [default: 3 × heartbeat interval]
    #[arg(long, env = "RUNGATE_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// How long an expired session is remembered, s [default: 3600]
    #[arg(long, env = "RUNGATE_SESSION_TOMBSTONE_SECS")]
    pub session_tombstone_secs: Option<u64>,
    /// Largest WebSocket message accepted, bytes [default: 1048576]
    #[arg(long, env = "RUNGATE_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Requests in flight per socket before reading pauses [default: 256]
    #[arg(long, env = "RUNGATE_MAX_INFLIGHT_PER_SOCKET")]
    pub max_inflight_per_socket: Option<usize>,
    /// Frames queued per socket [default: 1024]
    #[arg(long, env = "RUNGATE_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    /// Seconds a client has to send its HTTP headers [default: 10]
    #[arg(long, env = "RUNGATE_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,
    /// reconnectAfterMs told to clients when draining [default: 1000]
    #[arg(long, env = "RUNGATE_RECONNECT_AFTER_MS")]
    pub reconnect_after_ms: Option<u64>,
    /// Longest a drain waits for in-flight work, s [default: 30]
    #[arg(long, env = "RUNGATE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Seconds a socket may take no data while frames wait before it is closed [default: 30]
    #[arg(long, env = "RUNGATE_WRITE_TIMEOUT_SECS")]
    pub write_timeout_secs: Option<u64>,
    /// Events one events.publish may carry [default: 1000]
    #[arg(long, env = "RUNGATE_MAX_EVENTS_PER_PUBLISH")]
    pub max_events_per_publish: Option<usize>,
    /// Bytes of one output event's JSON [default: 65536]
    #[arg(long, env = "RUNGATE_MAX_EVENT_BYTES")]
    pub max_event_bytes: Option<usize>,
    /// Runs one socket may follow at once [default: 256]
    #[arg(long, env = "RUNGATE_MAX_SUBSCRIPTIONS_PER_SOCKET")]
    pub max_subscriptions_per_socket: Option<usize>,
    /// Seconds between keepalive comments on an idle SSE response [default: 15]
    #[arg(long, env = "RUNGATE_SSE_KEEPALIVE_SECS")]
    pub sse_keepalive_secs: Option<u64>,
    /// Events kept per run's stream [default: 10000]
    #[arg(long, env = "RUNGATE_STREAM_MAX_EVENTS")]
    pub stream_max_events: Option<usize>,
    /// Bytes kept per run's stream [default: 16777216]
    #[arg(long, env = "RUNGATE_STREAM_MAX_BYTES")]
    pub stream_max_bytes: Option<usize>,
    /// Bytes kept across all streams; idle streams are evicted first [default: 536870912]
    #[arg(long, env = "RUNGATE_STREAM_GLOBAL_MAX_BYTES")]
    pub stream_global_max_bytes: Option<usize>,
    /// Seconds a run's stream stays readable after its session ends [default: 3600]
    #[arg(long, env = "RUNGATE_STREAM_RETENTION_SECS")]
    pub stream_retention_secs: Option<u64>,
    /// When the event log reaches the disk: always (before every ack), interval:MS, or os [default: always]
    #[arg(long, env = "RUNGATE_STREAM_SYNC")]
    pub stream_sync: Option<String>,
    /// Bytes of one KV key [default: 512]
    #[arg(long, env = "RUNGATE_MAX_KV_KEY_BYTES")]
    pub max_kv_key_bytes: Option<usize>,
    /// Bytes of one KV value [default: 65536]
    #[arg(long, env = "RUNGATE_MAX_KV_VALUE_BYTES")]
    pub max_kv_value_bytes: Option<usize>,
    /// Keys one run's KV may hold [default: 1000]
    #[arg(long, env = "RUNGATE_MAX_KV_KEYS_PER_RUN")]
    pub max_kv_keys_per_run: Option<usize>,
    /// Bytes of one checkpoint's data JSON [default: 1048576]
    #[arg(long, env = "RUNGATE_MAX_CHECKPOINT_BYTES")]
    pub max_checkpoint_bytes: Option<usize>,
    /// Sessions (main run and sub-runs) one socket may hold [default: 128]
    #[arg(long, env = "RUNGATE_MAX_SESSIONS_PER_SOCKET")]
    pub max_sessions_per_socket: Option<usize>,
    /// Open WebSockets and SSE responses per token [default: 1000]
    #[arg(long, env = "RUNGATE_MAX_SOCKETS_PER_TOKEN")]
    pub max_sockets_per_token: Option<usize>,
    /// Open WebSockets and SSE responses in all; more get HTTP 503 [default: 100000]
    #[arg(long, env = "RUNGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a runtime socket may hold no session before it is closed [default: 60]
    #[arg(long, env = "RUNGATE_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Commands per second one socket may send, sustained [default: 1000]
    #[arg(long, env = "RUNGATE_MAX_COMMANDS_PER_SEC")]
    pub max_commands_per_sec: Option<u32>,
    /// Commands one socket may send in a burst above that rate [default: 2000]
    #[arg(long, env = "RUNGATE_COMMAND_BURST")]
    pub command_burst: Option<u32>,
    /// Bytes of one reply; larger answers are PAYLOAD_TOO_LARGE [default: 2097152]
    #[arg(long, env = "RUNGATE_MAX_REPLY_BYTES")]
    pub max_reply_bytes: Option<usize>,
    /// Bytes one socket may have in flight and queued before reading pauses [default: 8388608]
    #[arg(long, env = "RUNGATE_MAX_SOCKET_BUFFER_BYTES")]
    pub max_socket_buffer_bytes: Option<usize>,
    /// Keys one kv.get may name [default: 1000]
    #[arg(long, env = "RUNGATE_MAX_KV_GET_KEYS")]
    pub max_kv_get_keys: Option<usize>,
    /// Browser origins allowed besides the gateway's own, comma-separated
    /// (https://app.example.com,http://localhost:3000), or * for any [default: same origin only]
    #[arg(long, env = "RUNGATE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
}

/// The `[gateway]` table: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGateway {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    auth_key_file: Option<PathBuf>,
    store: Option<String>,
    heartbeat_interval_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    session_tombstone_secs: Option<u64>,
    max_frame_bytes: Option<usize>,
    max_inflight_per_socket: Option<usize>,
    outbound_queue: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    reconnect_after_ms: Option<u64>,
    drain_timeout_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
    max_events_per_publish: Option<usize>,
    max_event_bytes: Option<usize>,
    max_subscriptions_per_socket: Option<usize>,
    sse_keepalive_secs: Option<u64>,
    stream_max_events: Option<usize>,
    stream_max_bytes: Option<usize>,
    stream_global_max_bytes: Option<usize>,
    stream_retention_secs: Option<u64>,
    stream_sync: Option<String>,
    max_kv_key_bytes: Option<usize>,
    max_kv_value_bytes: Option<usize>,
    max_kv_keys_per_run: Option<usize>,
    max_checkpoint_bytes: Option<usize>,
    max_sessions_per_socket: Option<usize>,
    max_sockets_per_token: Option<usize>,
    max_connections: Option<usize>,
    idle_timeout_secs: Option<u64>,
    max_commands_per_sec: Option<u32>,
    command_burst: Option<u32>,
    max_reply_bytes: Option<usize>,
    max_socket_buffer_bytes: Option<usize>,
    max_kv_get_keys: Option<usize>,
    /// A list in the file (`["https://a.example"]`); the flag takes the
    /// same list comma-separated.
    allowed_origins: Option<Vec<String>>,
}

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

impl ServeArgs {
    /// Layers flags/env over the config file over defaults.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file_gateway(path)?,
            None => FileGateway::default(),
        };
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)));
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("rungate-data"));
        let mut c = Config::new(listen, data_dir);
        c.config_file = self.config;
        if let Some(p) = self.auth_key_file.or(file.auth_key_file) {
            c.auth_key_file = p;
        }
        if let Some(s) = self.store.or(file.store) {
            c.store = s.parse()?;
        }
        if let Some(ms) = self.heartbeat_interval_ms.or(file.heartbeat_interval_ms) {
            c.heartbeat_interval = Duration::from_millis(ms);
            c.lease_ttl = c.heartbeat_interval * 3;
        }
        if let Some(ms) = self.lease_ttl_ms.or(file.lease_ttl_ms) {
            c.lease_ttl = Duration::from_millis(ms);
        }
        if let Some(s) = self.session_tombstone_secs.or(file.session_tombstone_secs) {
            c.session_tombstone_ttl = Duration::from_secs(s);
        }
        if let Some(v) = self.max_frame_bytes.or(file.max_frame_bytes) {
            c.limits.max_frame_bytes = v;
        }
        if let Some(v) = self
            .max_inflight_per_socket
            .or(file.max_inflight_per_socket)
        {
            c.limits.max_inflight_per_socket = v;
        }
        if let Some(v) = self.outbound_queue.or(file.outbound_queue) {
            c.limits.outbound_queue = v;
        }
        if let Some(s) = self.handshake_timeout_secs.or(file.handshake_timeout_secs) {
            c.limits.handshake_timeout = Duration::from_secs(s);
        }
        if let Some(ms) = self.reconnect_after_ms.or(file.reconnect_after_ms) {
            c.reconnect_after = Duration::from_millis(ms);
        }
        if let Some(s) = self.drain_timeout_secs.or(file.drain_timeout_secs) {
            c.drain_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.write_timeout_secs.or(file.write_timeout_secs) {
            c.limits.write_timeout = Duration::from_secs(s);
        }
        if let Some(v) = self.max_events_per_publish.or(file.max_events_per_publish) {
            c.limits.max_events_per_publish = v;
        }
        if let Some(v) = self.max_event_bytes.or(file.max_event_bytes) {
            c.limits.max_event_bytes = v;
        }
        if let Some(v) = self
            .max_subscriptions_per_socket
            .or(file.max_subscriptions_per_socket)
        {
            c.limits.max_subscriptions_per_socket = v;
        }
        if let Some(s) = self.sse_keepalive_secs.or(file.sse_keepalive_secs) {
            c.limits.sse_keepalive = Duration::from_secs(s);
        }
        if let Some(v) = self.stream_max_events.or(file.stream_max_events) {
            c.streams.max_events_per_run = v;
        }
        if let Some(v) = self.stream_max_bytes.or(file.stream_max_bytes) {
            c.streams.max_bytes_per_run = v;
        }
        if let Some(v) = self
            .stream_global_max_bytes
            .or(file.stream_global_max_bytes)
        {
            c.streams.global_max_bytes = v;
        }
        if let Some(s) = self.stream_retention_secs.or(file.stream_retention_secs) {
            c.streams.retention = Duration::from_secs(s);
        }
        if let Some(s) = self.stream_sync.or(file.stream_sync) {
            c.stream_sync = s.parse().map_err(ConfigError::Invalid)?;
        }
        let l = &mut c.limits;
        if let Some(v) = self.max_kv_key_bytes.or(file.max_kv_key_bytes) {
            l.max_kv_key_bytes = v;
        }
        if let Some(v) = self.max_kv_value_bytes.or(file.max_kv_value_bytes) {
            l.max_kv_value_bytes = v;
        }
        if let Some(v) = self.max_kv_keys_per_run.or(file.max_kv_keys_per_run) {
            l.max_kv_keys_per_run = v;
        }
        if let Some(v) = self.max_checkpoint_bytes.or(file.max_checkpoint_bytes) {
            l.max_checkpoint_bytes = v;
        }
        if let Some(v) = self
            .max_sessions_per_socket
            .or(file.max_sessions_per_socket)
        {
            l.max_sessions_per_socket = v;
        }
        if let Some(v) = self.max_sockets_per_token.or(file.max_sockets_per_token) {
            l.max_sockets_per_token = v;
        }
        if let Some(v) = self.max_connections.or(file.max_connections) {
            l.max_connections = v;
        }
        if let Some(s) = self.idle_timeout_secs.or(file.idle_timeout_secs) {
            l.idle_timeout = Duration::from_secs(s);
        }
        if let Some(v) = self.max_commands_per_sec.or(file.max_commands_per_sec) {
            l.max_commands_per_sec = v;
        }
        if let Some(v) = self.command_burst.or(file.command_burst) {
            l.command_burst = v;
        }
        if let Some(v) = self.max_reply_bytes.or(file.max_reply_bytes) {
            l.max_reply_bytes = v;
        }
        if let Some(v) = self
            .max_socket_buffer_bytes
            .or(file.max_socket_buffer_bytes)
        {
            l.max_socket_buffer_bytes = v;
        }
        if let Some(v) = self.max_kv_get_keys.or(file.max_kv_get_keys) {
            l.max_kv_get_keys = v;
        }
        let origins = match (self.allowed_origins, file.allowed_origins) {
            (Some(flag), _) => Some(AllowedOrigins::parse_list(&flag)),
            (None, Some(list)) => Some(AllowedOrigins::parse(list.iter().map(String::as_str))),
            (None, None) => None,
        };
        if let Some(origins) = origins {
            c.allowed_origins = origins.map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        c.validate()?;
        Ok(c)
    }
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
            allowed_origins: Some("*".into()),
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
            allowed_origins: Some("https://a.example/app".into()),
            ..ServeArgs::default()
        };
        assert!(matches!(bad.into_config(), Err(ConfigError::Invalid(_))));
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
}
