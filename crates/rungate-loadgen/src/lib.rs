//! `rungate loadgen`: thousands of runtime sessions and viewers over real
//! sockets against a gateway (or the [`Baseline`] server), ending with a
//! [`Report`].
//!
//! # What a run does, phase by phase
//!
//! 1. **Connect**: `--sessions` runtime sessions on `--sessions /
//!    --sessions-per-socket` raw WebSockets to `/v1/runtime` (plain
//!    tokio-tungstenite, no `rungate-client`: a few KiB per socket), at
//!    most `--connect-concurrency` handshakes at once, each socket bound to
//!    one of `--sources` loopback addresses 127.0.0.x so more than the
//!    ~28k ephemeral ports of one address pair fit. Each attaches its run
//!    (and sub-runs) and heartbeats from then on at the interval the
//!    gateway gave (`--heartbeat-ms` overrides), at a phase spread over the
//!    interval.
//! 2. **Prefill** (`--prefill N`): each publisher publishes N events, as
//!    fast as acknowledged, before any viewer exists.
//! 3. **Resume**: `--viewers` sockets to `/v1/stream` connect, then all at
//!    once send `stream.resume` for `--follow` publishing runs each, live
//!    or `--from` an offset.
//! 4. **Traffic** for `--duration` seconds (or until each publisher sent
//!    `--count` batches, or, with no publishing and a replay to read, until
//!    every viewer caught up): publishers send `events.publish` of
//!    `--batch` events of `--event-bytes` bytes at `--rate` batches per
//!    second, or `--rate max`: as fast as acknowledged with `--window`
//!    batches in flight. Each event carries its send time, so viewers
//!    measure publish-to-viewer latency.
//! 5. **Stop**: publishers stop and wait for their acknowledgements;
//!    viewers read until they have every event accepted (or a drain
//!    timeout passes); the sockets close.
//!
//! Every request's round trip goes into an HdrHistogram by command type;
//! errors are counted by code. With `--gateway-pid`, the gateway's RSS is
//! read before connecting, after attaching and at the end, and its CPU over
//! the traffic phase; each `--watch-pid NAME=PID` (a second gateway node,
//! the Redis server) gets its CPU over the same interval.
//!
//! Several gateway nodes: `--viewer-url` sends the viewers to another node
//! than the runtimes (`--url`), so every delivery crosses the shared store.
//!
//! Layout: `wire` (frames out, classification in), `net` (sockets, source
//! addresses, descriptor limit), `runtime` and `viewer` (one task per
//! socket), `stats` (counters and histograms), `procfs`, `report`,
//! `progress`, `echo` (the baseline server), [`soak`] (`rungate-loadgen
//! soak`: the gateway binary under load and faults, with a checker). Must
//! not use gateway internals: it speaks the wire protocol, so it measures
//! any gateway.

mod echo;
mod net;
mod procfs;
mod progress;
mod report;
mod runtime;
pub mod soak;
mod stats;
mod viewer;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

pub use echo::{Baseline, BaselineArgs};
pub use report::Report;

use rungate::auth::{AuthError, AuthKey, RunScope, TokenKind};
use rungate_protocol::ids::{Capabilities, Capability};
use stats::{Stats, get};

/// Batches per second per publisher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// No publishing.
    Off,
    /// This many batches per second per publisher.
    PerSec(f64),
    /// As fast as acknowledged, `--window` batches in flight.
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s {
        "max" => Ok(Rate::Max),
        _ => match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSec(r)),
            // Only zero is left that is not negative, infinite or NaN.
            Ok(r) if r >= 0.0 && r.is_finite() => Ok(Rate::Off),
            _ => Err("expected a number of batches per second, 0, or max".into()),
        },
    }
}

/// Where viewers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At the head: only what is published after the resume.
    Live,
    /// From this offset: a replay, then live.
    Offset(u64),
}

impl StartAt {
    /// The `fromOffset` to send, if any.
    pub fn offset(self) -> Option<u64> {
        match self {
            StartAt::Live => None,
            StartAt::Offset(o) => Some(o),
        }
    }
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{pid:?} is not a process id"))?;
    if name.is_empty() {
        return Err("expected NAME=PID".into());
    }
    Ok((name.to_owned(), pid))
}

fn parse_from(s: &str) -> Result<StartAt, String> {
    if s == "live" {
        return Ok(StartAt::Live);
    }
    s.parse()
        .map(StartAt::Offset)
        .map_err(|_| "expected live or an offset".into())
}

/// `rungate loadgen` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "loadgen")]
pub struct LoadgenArgs {
    /// The gateway (or baseline): ws://HOST:PORT; /v1/runtime and
    /// /v1/stream are appended
    #[arg(long, default_value = "ws://127.0.0.1:7700")]
    pub url: String,
    /// Where viewers connect, ws://HOST:PORT, when not --url: another
    /// gateway node sharing the runtimes' store [default: --url]
    #[arg(long)]
    pub viewer_url: Option<String>,
    /// Runtime sessions to attach
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Sessions per socket: the first is the main run, the others sub-runs
    /// (their token needs subtasks.run)
    #[arg(long, default_value_t = 1)]
    pub sessions_per_socket: usize,
    /// Viewer sockets on /v1/stream
    #[arg(long, default_value_t = 0)]
    pub viewers: usize,
    /// Runs each viewer follows (0: every publishing run, up to 256)
    #[arg(long, default_value_t = 1)]
    pub follow: usize,
    /// Where viewers resume: live, or an offset (0 replays everything kept)
    #[arg(long, default_value = "live", value_parser = parse_from)]
    pub from: StartAt,
    /// Sessions that publish [default: all of them when --rate is set]
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Batches per second per publisher: a number, 0 (none) or max (as fast
    /// as acknowledged)
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub rate: Rate,
    /// Batches in flight per publisher (with --rate max; at least 64 with a
    /// fixed rate, past which ticks are skipped and counted)
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Events per batch
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Bytes of each event's JSON (it embeds the send time)
    #[arg(long, default_value_t = 200)]
    pub event_bytes: usize,
    /// Events each publisher publishes before the viewers connect
    #[arg(long, default_value_t = 0)]
    pub prefill: u64,
    /// Seconds of traffic
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after each publisher sent this many batches (or at --duration)
    #[arg(long)]
    pub count: Option<u64>,
    /// Heartbeat interval, ms [default: the one the attach reply gives]
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Loopback source addresses 127.0.0.1..=127.0.0.K [default: one per
    /// 4,000 sockets]
    #[arg(long, default_value_t = 0)]
    pub sources: usize,
    /// Handshakes (with their attaches) in progress at once (64 connected
    /// fastest here: 7,400/s against 1,900/s with 256)
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Runtime token; it must cover the runs RUN_PREFIX*. Every runtime
    /// socket uses it, so past 1,000 sockets start the gateway with
    /// --max-sockets-per-token raised (or give --auth-key-file instead)
    #[arg(long, env = "RUNGATE_LOADGEN_TOKEN")]
    pub token: Option<String>,
    /// Viewer token; it must cover the runs RUN_PREFIX* (the same
    /// --max-sockets-per-token note applies)
    #[arg(long, env = "RUNGATE_LOADGEN_VIEWER_TOKEN")]
    pub viewer_token: Option<String>,
    /// Mint the tokens with this key file (the gateway's --auth-key-file):
    /// one per 500 sockets, within the gateway's default per-token cap
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// Run ids are RUN_PREFIX0, RUN_PREFIX1, … [default: lg-XXXXXX-, new
    /// each run so runs against one gateway never collide]
    #[arg(long)]
    pub run_prefix: Option<String>,
    /// The gateway's process id: report its RSS and CPU
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Another process to report CPU (user + system) and RSS of, over the
    /// same interval as the gateway's, as NAME=PID (e.g. redis=4242,
    /// gateway_b=4243); repeatable
    #[arg(long, value_parser = parse_watch)]
    pub watch_pid: Vec<(String, u32)>,
    /// Seconds to wait after the last attach before reading the RSS
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Longest wait, in seconds, for acknowledgements and deliveries after
    /// the traffic stops (and for each phase to complete)
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// A name for this run in the report (e.g. gateway or baseline)
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print the report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// No progress bar or phase lines on stderr
    #[arg(long)]
    pub quiet: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// Flags that contradict each other or the run's size.
    #[error("{0}")]
    Usage(String),
    /// The gateway's address did not resolve.
    #[error("cannot resolve {url}: {source}")]
    Resolve {
        /// The URL given.
        url: String,
        /// Why it did not resolve.
        source: std::io::Error,
    },
    /// Tokens could not be minted from `--auth-key-file`.
    #[error("minting tokens: {0}")]
    Auth(#[from] AuthError),
    /// An operating-system limit (open files) is too low for the run.
    #[error("{0}")]
    Limit(String),
}

impl LoadgenArgs {
    /// Parses flags as the command line would (for tests and scripts).
    pub fn from_flags<I, T>(flags: I) -> Result<LoadgenArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let all = std::iter::once(std::ffi::OsString::from("loadgen"))
            .chain(flags.into_iter().map(Into::into));
        LoadgenArgs::try_parse_from(all)
    }

    fn runtime_sockets(&self) -> usize {
        self.sessions.div_ceil(self.sessions_per_socket.max(1))
    }

    fn publishers(&self) -> usize {
        let sockets = self.runtime_sockets();
        match self.rate {
            Rate::Off if self.prefill == 0 => 0,
            _ => self.publishers.unwrap_or(sockets).min(sockets),
        }
    }

    fn check(&self) -> Result<(), LoadgenError> {
        let usage = |m: &str| Err(LoadgenError::Usage(m.into()));
        if self.sessions_per_socket == 0 {
            return usage("--sessions-per-socket must be at least 1");
        }
        if self.batch == 0 {
            return usage("--batch must be at least 1");
        }
        if self.viewers > 0 && self.sessions == 0 {
            return usage("viewers follow the sessions' runs: give --sessions too");
        }
        if !(self.duration >= 0.0 && self.settle >= 0.0 && self.drain_timeout > 0.0) {
            return usage("durations must be positive");
        }
        Ok(())
    }
}

/// The order of a run; tasks watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Connect,
    Prefill,
    Resume,
    Traffic,
    Stop,
    Close,
}

/// What the load tasks share.
pub(crate) struct Shared {
    pub stats: Stats,
    pub phase: watch::Receiver<Phase>,
    /// The loadgen clock: event timestamps are µs since this.
    pub clock: Instant,
    pub target: std::net::SocketAddr,
    pub sources: net::Sources,
    /// Where viewers connect: `target`, or `--viewer-url`'s address with
    /// source addresses of its own.
    pub viewer_target: std::net::SocketAddr,
    pub viewer_sources: Option<net::Sources>,
    pub runtime_url: String,
    pub viewer_url: String,
    /// Runtime tokens: socket `i` uses `tokens[i / SOCKETS_PER_TOKEN]`
    /// (wrapping), so no token holds more than the gateway allows one.
    pub tokens: Vec<String>,
    pub viewer_tokens: Vec<String>,
    pub prefix: String,
    pub connect_gate: Semaphore,
    pub args: LoadgenArgs,
    pub publishers: usize,
    /// Events accepted per publishing run (prefill included), by index.
    pub accepted: Vec<AtomicU64>,
    /// Viewers following each publishing run, by index.
    pub followers: Vec<AtomicU64>,
    /// When the last follow caught up, µs on the loadgen clock.
    pub last_caught_up_us: AtomicU64,
}

/// Sockets loadgen opens with one token it minted: half the gateway's
/// default `--max-sockets-per-token`.
const SOCKETS_PER_TOKEN: usize = 500;

/// The token of socket `index` out of `tokens`.
fn token_for(tokens: &[String], index: usize) -> &str {
    match tokens.len() {
        0 => "",
        n => &tokens[(index / SOCKETS_PER_TOKEN) % n],
    }
}

impl Shared {
    pub(crate) fn runtime_token(&self, index: usize) -> &str {
        token_for(&self.tokens, index)
    }

    pub(crate) fn viewer_token(&self, index: usize) -> &str {
        token_for(&self.viewer_tokens, index)
    }

    pub(crate) fn viewer_sources(&self) -> &net::Sources {
        self.viewer_sources.as_ref().unwrap_or(&self.sources)
    }

    pub(crate) fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    pub(crate) fn run_id(&self, socket: usize, sub: usize) -> String {
        if sub == 0 {
            format!("{}{socket}", self.prefix)
        } else {
            format!("{}{socket}-s{sub}", self.prefix)
        }
    }

    /// Deliveries to expect so far: every accepted event of a run, once
    /// per viewer following it, from where that viewer started.
    pub(crate) fn expected_deliveries(&self) -> u64 {
        let all: u64 = self
            .accepted
            .iter()
            .zip(&self.followers)
            .map(|(a, f)| get(a) * get(f))
            .sum();
        all.saturating_sub(get(&self.stats.start_offsets))
    }
}

/// Timings the driver measures, for the report.
pub(crate) struct Timings {
    pub connect: Duration,
    pub resume_storm_start_us: u64,
    pub traffic_start_us: u64,
    pub traffic: Duration,
    pub viewers_connect: Duration,
}

/// The runtime and viewer tokens: the ones given, or as many minted as
/// keep each under [`SOCKETS_PER_TOKEN`] sockets.
fn mint_tokens(
    args: &LoadgenArgs,
    prefix: &str,
) -> Result<(Vec<String>, Vec<String>), LoadgenError> {
    let key = match &args.auth_key_file {
        Some(path) => Some(AuthKey::load_or_create(path)?),
        None => None,
    };
    let scope = RunScope::parse_list(&format!("{prefix}*"))?;
    let day = Duration::from_secs(86_400);
    let mint = |kind: TokenKind, caps: Capabilities| -> Result<String, LoadgenError> {
        match &key {
            Some(k) => Ok(k.mint(kind, &scope, caps, day)?),
            None => Err(LoadgenError::Usage(
                "give --token and --viewer-token, or --auth-key-file to mint them".into(),
            )),
        }
    };
    let needed = |sockets: usize| sockets.div_ceil(SOCKETS_PER_TOKEN).max(1);
    let runtime = match &args.token {
        Some(t) => vec![t.clone()],
        None => (0..needed(args.runtime_sockets()))
            .map(|_| mint(TokenKind::Runtime, Capability::ALL.into_iter().collect()))
            .collect::<Result<_, _>>()?,
    };
    let viewer = match &args.viewer_token {
        Some(t) => vec![t.clone()],
        None if args.viewers == 0 => Vec::new(),
        None => (0..needed(args.viewers))
            .map(|_| mint(TokenKind::Viewer, Capabilities::default()))
            .collect::<Result<_, _>>()?,
    };
    Ok((runtime, viewer))
}

fn default_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let salt = (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff;
    format!("lg-{salt:06x}-")
}

/// Waits until `done` holds, checking every 20 ms, for at most `limit`;
/// answers whether it held.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Runs one load test and reports on it.
pub async fn run(args: LoadgenArgs) -> Result<Report, LoadgenError> {
    args.check()?;
    let runtime_sockets = args.runtime_sockets();
    let sockets = runtime_sockets + args.viewers;
    let (fd_before, fd_limit) = net::raise_nofile_limit()
        .map_err(|e| LoadgenError::Limit(format!("cannot raise the descriptor limit: {e}")))?;
    if sockets as u64 + 64 > fd_limit {
        return Err(LoadgenError::Limit(format!(
            "{sockets} sockets need more descriptors than the {fd_limit} this process may open \
             (the hard limit; it was {fd_before} soft); raise `ulimit -Hn` (as root) or run fewer"
        )));
    }
    let base = args.url.trim_end_matches('/').to_owned();
    let target = net::resolve(&base)
        .await
        .map_err(|source| LoadgenError::Resolve {
            url: base.clone(),
            source,
        })?;
    let viewer_base = args
        .viewer_url
        .as_deref()
        .map(|u| u.trim_end_matches('/').to_owned());
    let viewer_target = match &viewer_base {
        Some(url) => net::resolve(url)
            .await
            .map_err(|source| LoadgenError::Resolve {
                url: url.clone(),
                source,
            })?,
        None => target,
    };
    let prefix = args.run_prefix.clone().unwrap_or_else(default_prefix);
    let (tokens, viewer_tokens) = mint_tokens(&args, &prefix)?;
    let publishers = args.publishers();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let shared = Arc::new(Shared {
        stats: Stats::default(),
        phase: phase_rx,
        clock: Instant::now(),
        target,
        sources: net::Sources::new(
            target,
            args.sources,
            if viewer_base.is_some() {
                runtime_sockets
            } else {
                sockets
            },
        ),
        viewer_target,
        viewer_sources: viewer_base
            .is_some()
            .then(|| net::Sources::new(viewer_target, args.sources, args.viewers)),
        runtime_url: format!("{base}/v1/runtime"),
        viewer_url: format!("{}/v1/stream", viewer_base.as_deref().unwrap_or(&base)),
        tokens,
        viewer_tokens,
        prefix,
        connect_gate: Semaphore::new(args.connect_concurrency.max(1)),
        publishers,
        accepted: (0..publishers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        followers: (0..publishers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        last_caught_up_us: AtomicU64::new(0),
        args: args.clone(),
    });
    let st = &shared.stats;
    let phase_limit = secs(args.drain_timeout).max(Duration::from_secs(60));
    let progress = progress::Progress::start(shared.clone(), args.quiet);
    let gateway = args.gateway_pid.map(|p| p.to_string());
    let sample_gateway = || gateway.as_deref().and_then(|p| procfs::sample(p).ok());
    let sample_watched = || -> Vec<Option<procfs::Sample>> {
        args.watch_pid
            .iter()
            .map(|(_, pid)| procfs::sample(&pid.to_string()).ok())
            .collect()
    };
    let gw_before = sample_gateway();

    // 1. Connect and attach.
    progress.phase(
        Phase::Connect,
        &format!("{runtime_sockets} runtime sockets"),
    );
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..runtime_sockets {
        tasks.spawn(runtime::run_socket(shared.clone(), i));
    }
    wait_for(
        phase_limit.max(secs(runtime_sockets as f64 / 100.0)),
        || get(&st.runtime_sockets_settled) == runtime_sockets as u64,
    )
    .await;
    let connect = started.elapsed();
    progress.note(&format!(
        "{} sessions attached in {:.2} s",
        get(&st.sessions_attached),
        connect.as_secs_f64()
    ));
    sleep(secs(args.settle)).await;
    let gw_attached = sample_gateway();

    // 2. Prefill.
    if args.prefill > 0 && publishers > 0 {
        progress.phase(Phase::Prefill, &format!("{} events per run", args.prefill));
        let _ = phase_tx.send(Phase::Prefill);
        wait_for(phase_limit, || get(&st.prefill_done) == publishers as u64).await;
    }

    // 3. Viewers connect, then resume all at once.
    let viewers_started = Instant::now();
    if args.viewers > 0 {
        progress.phase(Phase::Resume, &format!("{} viewers", args.viewers));
        for j in 0..args.viewers {
            tasks.spawn(viewer::run_socket(shared.clone(), j));
        }
        wait_for(phase_limit.max(secs(args.viewers as f64 / 100.0)), || {
            get(&st.viewer_sockets_settled) == args.viewers as u64
        })
        .await;
    }
    let viewers_connect = viewers_started.elapsed();
    // A replay is the work to measure: CPU from the storm on.
    let replay_only = args.rate == Rate::Off && args.viewers > 0 && args.from.offset().is_some();
    let storm_samples = (
        sample_gateway(),
        procfs::sample("self").ok(),
        sample_watched(),
    );
    let resume_storm_start_us = shared.now_us();
    let _ = phase_tx.send(Phase::Resume);
    if args.viewers > 0 {
        wait_for(phase_limit, || {
            get(&st.viewers_ready) + get(&st.viewers_failed) >= get(&st.viewer_sockets)
        })
        .await;
    }

    // 4. Traffic.
    progress.phase(
        Phase::Traffic,
        &if replay_only {
            "until every viewer caught up".to_owned()
        } else {
            format!("{} s", args.duration)
        },
    );
    let (gw_t0, self_t0, watched_t0) = if replay_only {
        storm_samples
    } else {
        (
            sample_gateway(),
            procfs::sample("self").ok(),
            sample_watched(),
        )
    };
    let traffic_start_us = shared.now_us();
    let traffic_started = Instant::now();
    let _ = phase_tx.send(Phase::Traffic);
    let follows = get(&st.follows_started);
    wait_for(secs(args.duration), || {
        if replay_only {
            return get(&st.follows_caught_up) >= follows;
        }
        args.count.is_some() && publishers > 0 && get(&st.publishers_done) == publishers as u64
    })
    .await;
    let traffic = traffic_started.elapsed();

    // 5. Stop, drain, close.
    progress.phase(Phase::Stop, "waiting for acknowledgements and deliveries");
    let _ = phase_tx.send(Phase::Stop);
    wait_for(secs(args.drain_timeout), || {
        get(&st.publishers_done) == publishers as u64
    })
    .await;
    let gw_t1 = sample_gateway();
    let self_t1 = procfs::sample("self").ok();
    let watched_t1 = sample_watched();
    if args.viewers > 0 {
        wait_for(secs(args.drain_timeout), || {
            get(&st.events_delivered) + get(&st.events_missed) >= shared.expected_deliveries()
        })
        .await;
    }
    // Nothing measured may wait behind the closing of thousands of other
    // sockets (a gateway's work per close delays replies still in flight).
    wait_for(secs(args.drain_timeout), || get(&st.counted_in_flight) == 0).await;
    progress.phase(Phase::Close, "closing sockets");
    let _ = phase_tx.send(Phase::Close);
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    progress.finish();

    let timings = Timings {
        connect,
        resume_storm_start_us,
        traffic_start_us,
        traffic,
        viewers_connect,
    };
    let samples = report::Samples {
        gateway_pid: args.gateway_pid,
        gw_before,
        gw_attached,
        gw_t0,
        gw_t1,
        self_t0,
        self_t1,
        watched: args
            .watch_pid
            .iter()
            .zip(watched_t0.into_iter().zip(watched_t1))
            .map(|((name, pid), (t0, t1))| (name.clone(), *pid, t0, t1))
            .collect(),
        fd_limit,
    };
    Ok(Report::build(&shared, &timings, &samples))
}
