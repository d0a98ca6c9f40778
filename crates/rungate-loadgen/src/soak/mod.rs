//! `rungate-loadgen soak`: the gateway under steady load for a long time,
//! through a fault proxy, killed and drained now and then, with a checker
//! that says whether anything acknowledged was lost, duplicated, reordered
//! or leaked.
//!
//! # What a soak does
//!
//! 1. Starts the gateway binary (`--gateway-bin`) on a free 127.0.0.1 port
//!    with its own data directory and auth key, and one
//!    two [`rungate_fault_proxy::Proxy`]s in front of it: one for the
//!    runtimes, one for the viewers, so each side's network faults are its
//!    own (with `--redis`, two nodes, one proxy each). Every client
//!    connects through a proxy.
//! 2. `--runtimes` runtimes on `rungate-client` each hold one run and
//!    publish `--batch` events at a time at `--rate` events per second,
//!    one publish after another; `--ws-viewers` WebSocket viewers follow
//!    `--follow` runs each and `--sse-viewers` SSE viewers one run each,
//!    all from offset 0. Every run has at least one viewer.
//!    `--ts-runtimes` and `--py-runtimes` add runtimes on the TypeScript
//!    and Python clients, child processes with a run each (`external`),
//!    whose acknowledged publishes go into the same ledger; takeovers
//!    leave them alone.
//! 3. For `--duration-secs`, three schedulers inject faults at random
//!    (uniform between half and one and a half times their mean period):
//!    - network (`--net-fault-every`): cut every connection, cut about a
//!      third of them, partition (cut, then refuse reconnects 1–5 s),
//!      stall everything 1–4 s, add 50–300 ms latency per
//!      chunk for 5–15 s, or cap bandwidth at 16–128 KiB/s for 5–15 s;
//!    - gateway (`--gateway-fault-every`, during the first
//!      `--gateway-faults-until` of the run only, so the second half
//!      measures one process for leaks): `kill -9` then restart, or
//!      `SIGTERM` (drain) then restart, on the same address and data dir;
//!    - takeover (`--takeover-every`): a successor client (same runtime
//!      instance, higher epoch) takes a run over; the old client, told it
//!      is superseded, tries one more publish marked fenced.
//! 4. Every 5 s, the gateway's RSS (`VmRSS`) and open descriptors
//!    (`/proc/PID/fd`) are sampled.
//! 5. Then publishers stop, faults end, and viewers get up to
//!    `--drain-secs` to catch up with every acknowledged event.
//!
//! # The verdict
//!
//! It passes when: nothing acknowledged is lost and nothing is delivered
//! twice, at any viewer; offsets are contiguous and events in publish
//! order; no gap is reported (with `--tiny-ring`: every reported gap is
//! real, checked by asking the gateway whether the first offset of the
//! gap is still kept); no history is replaced under a viewer; no fenced
//! publish is accepted or delivered; no older publisher's event follows a
//! newer one's; every drain exits 0; no panic in the gateway's log; and
//! RSS and descriptors are *flat over the second half*: the last sample
//! is at most `1.2 × the midpoint sample + 16 MiB` (RSS) and
//! `1.2 × midpoint + 16` (descriptors), when both samples are of the same
//! process (the gateway faults stop before the midpoint for this).
//!
//! Owns the orchestration, fault scheduling and the report. The rules are
//! in `checker`, the clients in `load`, the process in `gateway`. Must not
//! use gateway internals beyond minting tokens with its key type.

mod checker;
mod external;
mod gateway;
mod load;
mod sse;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rungate::auth::{AuthKey, RunScope, TokenKind};
use rungate_fault_proxy::Proxy;
use rungate_protocol::ids::{Capabilities, Capability};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use checker::{Ledger, Tail, TailCounts, Verdict};
pub use load::ViewerFault;

use gateway::Gateway;
use load::Ctx;

/// `rungate-loadgen soak` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// The gateway binary to start.
    #[arg(long, default_value = "target/release/rungate")]
    pub gateway_bin: PathBuf,
    /// How long the load and the faults last, seconds.
    #[arg(long, default_value_t = 120)]
    pub duration_secs: u64,
    /// Runtimes, one run each.
    #[arg(long, default_value_t = 6)]
    pub runtimes: usize,
    /// Runtimes on the TypeScript client (`soak/runtime.mjs` of
    /// `--ts-client-dir`, which must be built), one run each, never taken
    /// over.
    #[arg(long, default_value_t = 0)]
    pub ts_runtimes: usize,
    /// Runtimes on the Python client (`tools/soak_runtime.py` of
    /// `--py-client-dir`), one run each, never taken over.
    #[arg(long, default_value_t = 0)]
    pub py_runtimes: usize,
    /// The Node.js the TypeScript runtimes run under.
    #[arg(long, default_value = "node")]
    pub node_bin: PathBuf,
    /// The Python the Python runtimes run under [default: the client's
    /// `.venv/bin/python` if its test.sh made one, else `python3`; the
    /// client's `src` is put on `PYTHONPATH`, so it needs only `websockets`].
    #[arg(long)]
    pub python_bin: Option<PathBuf>,
    /// The TypeScript client [default: `clients/typescript` of the
    /// repository this soak was built from].
    #[arg(long)]
    pub ts_client_dir: Option<PathBuf>,
    /// The Python client [default: `clients/python` of the repository this
    /// soak was built from].
    #[arg(long)]
    pub py_client_dir: Option<PathBuf>,
    /// Events per second per runtime.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Events per publish.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Bytes of padding in each event.
    #[arg(long, default_value_t = 64)]
    pub event_bytes: usize,
    /// WebSocket viewers.
    #[arg(long, default_value_t = 3)]
    pub ws_viewers: usize,
    /// Runs each WebSocket viewer follows.
    #[arg(long, default_value_t = 3)]
    pub follow: usize,
    /// SSE viewers (one run each).
    #[arg(long, default_value_t = 2)]
    pub sse_viewers: usize,
    /// Events kept per run's stream (`--stream-max-events`); large enough
    /// that no viewer should ever fall out of it.
    #[arg(long, default_value_t = 2000)]
    pub ring_events: usize,
    /// A ring of 8 events: gaps happen, and each reported one must be real.
    #[arg(long)]
    pub tiny_ring: bool,
    /// Mean seconds between network faults (0: none).
    #[arg(long, default_value_t = 6.0)]
    pub net_fault_every: f64,
    /// Mean seconds between gateway kills/drains (0: none).
    #[arg(long, default_value_t = 20.0)]
    pub gateway_fault_every: f64,
    /// Gateway faults only before this fraction of the duration.
    #[arg(long, default_value_t = 0.4)]
    pub gateway_faults_until: f64,
    /// Mean seconds between takeovers (0: none).
    #[arg(long, default_value_t = 15.0)]
    pub takeover_every: f64,
    /// Longest the viewers get to catch up at the end, seconds.
    #[arg(long, default_value_t = 90)]
    pub drain_secs: u64,
    /// Where the gateway's data and log go [default: a temporary directory,
    /// kept if the soak fails].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Plant a bug on the viewer side (to see the checker fail).
    #[arg(long, value_enum)]
    pub debug_viewer_fault: Option<ViewerFault>,
    /// Two gateways over one redis-server (append-only, fsync always):
    /// runtimes on one node, viewers on the other, so every event crosses
    /// Redis. Gateway faults then also kill a node (its proxy fails over
    /// to the other node until it is back) and restart Redis.
    #[arg(long)]
    pub redis: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for SoakArgs {
    fn default() -> SoakArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: SoakArgs,
        }
        Wrap::parse_from(["soak"]).args
    }
}

/// One reading of the gateway process.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcSample {
    /// Seconds since the load began.
    pub at_secs: f64,
    /// Which gateway node (0; 1 is the viewers' node with `--redis`).
    pub node: usize,
    /// Which process.
    pub pid: u32,
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Publish round trips, milliseconds, over the whole run (under faults).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Publishes measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

/// What a soak found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Seconds of load and faults.
    pub duration_secs: u64,
    /// The settings, as flags would give them.
    pub settings: BTreeMap<String, String>,
    /// Events sent in publishes (acknowledged or not).
    pub events_sent: u64,
    /// Publishes answered `accepted`.
    pub publishes_ok: u64,
    /// Failed publishes, attaches and connects, by kind.
    pub publish_errors: BTreeMap<String, u64>,
    /// Viewer-side errors, by kind.
    pub viewer_errors: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Runs taken over, and how many old clients were told so.
    pub takeovers: u64,
    /// Old clients that got `session.superseded`.
    pub superseded_told: u64,
    /// Fenced publishes refused (good) and accepted (a violation).
    pub fenced_refused: u64,
    /// Fenced publishes the gateway accepted. Goal: 0.
    pub fenced_accepted: u64,
    /// Fresh attaches after a lease ran out.
    pub reattaches: u64,
    /// Events acknowledged to each runtime program on the TypeScript or
    /// Python client (`ts-6`, `py-8`: language and slot). They count in
    /// `events_sent` and `publishes_ok` only when acknowledged.
    pub client_acked: BTreeMap<String, u64>,
    /// SSE responses that ended and were resumed.
    pub sse_responses: u64,
    /// Reported gaps that could not be checked (the gateway could not be
    /// asked in time); neither a pass nor a violation.
    pub gap_checks_failed: u64,
    /// The event checker's verdict.
    pub verdict: Verdict,
    /// Publish latency under faults.
    pub publish_latency: Latency,
    /// Gateway readings at start, one per node.
    pub start: Vec<ProcSample>,
    /// The midpoint readings, one per node.
    pub mid: Vec<ProcSample>,
    /// The last readings before the load stopped, one per node.
    pub end: Vec<ProcSample>,
    /// Every reading.
    pub samples: Vec<ProcSample>,
    /// RSS and descriptors flat over the second half, per node (`None`:
    /// not comparable, the process changed after the midpoint).
    pub flat: Vec<Option<bool>>,
    /// Gateway starts (1 + restarts), all nodes.
    pub gateway_starts: u32,
    /// Redis starts (1 + restarts; 0 without `--redis`).
    pub redis_starts: u32,
    /// Drains that did not exit 0 in time.
    pub bad_drains: u64,
    /// Panic lines in the gateway's log.
    pub panics: Vec<String>,
    /// Whether viewers caught up with everything acknowledged in the drain.
    pub caught_up: bool,
    /// Where the gateway's log and data are.
    pub work_dir: String,
    /// Every violation, in words. Empty: the soak passed.
    pub failures: Vec<String>,
}

impl SoakReport {
    /// Whether the checker found nothing wrong.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs a soak and returns its report (a failed check is in the report,
/// not an error; errors are for a soak that could not run at all).
pub async fn soak(args: SoakArgs) -> anyhow::Result<SoakReport> {
    let (work_dir, temp) = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("rungate-soak-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let key_path = work_dir.join("auth.key");
    let key = AuthKey::load_or_create(&key_path)?;
    let prefix = "soak-";
    let scope = RunScope::parse_list(&format!("{prefix}*"))?;
    let day = Duration::from_secs(86_400);
    let runtime_token = key.mint(
        TokenKind::Runtime,
        &scope,
        Capability::ALL.into_iter().collect(),
        day,
    )?;
    let viewer_token = key.mint(TokenKind::Viewer, &scope, Capabilities::default(), day)?;

    let ring = if args.tiny_ring { 8 } else { args.ring_events };
    let redis = if args.redis {
        let mut r = gateway::RedisServer::new(work_dir.join("redis"))?;
        r.start().await?;
        Some(r)
    } else {
        None
    };
    let mut gateway_args: Vec<String> = [
        "--auth-key-file".to_owned(),
        key_path.display().to_string(),
        "--heartbeat-interval-ms".to_owned(),
        "2000".to_owned(),
        "--lease-ttl-ms".to_owned(),
        "20000".to_owned(),
        "--reconnect-after-ms".to_owned(),
        "200".to_owned(),
        "--drain-timeout-secs".to_owned(),
        "10".to_owned(),
        "--sse-keepalive-secs".to_owned(),
        "5".to_owned(),
        "--stream-max-events".to_owned(),
        ring.to_string(),
    ]
    .into();
    if let Some(r) = &redis {
        gateway_args.extend(["--store".to_owned(), r.url()]);
    }
    let mut nodes = Vec::new();
    let mut proxies = Vec::new();
    for node in 0..if args.redis { 2 } else { 1 } {
        let mut node_args = gateway_args.clone();
        let name = if node == 0 {
            "data".to_owned()
        } else {
            format!("data-{node}")
        };
        node_args.extend([
            "--data-dir".to_owned(),
            work_dir.join(name).display().to_string(),
        ]);
        let log = if node == 0 {
            "gateway.log".to_owned()
        } else {
            format!("gateway-{node}.log")
        };
        let mut gw = Gateway::new(
            &args.gateway_bin,
            gateway::free_addr()?,
            node_args,
            work_dir.join(log),
        );
        gw.start().await?;
        proxies.push(Arc::new(Proxy::try_start(gw.addr()).await?));
        nodes.push(gw);
    }
    let node_addrs: Vec<_> = nodes.iter().map(Gateway::addr).collect();
    if nodes.len() == 1 {
        // Viewers get a proxy of their own, so network faults hit them and
        // the runtimes independently (a viewer can fall behind a publisher).
        proxies.push(Arc::new(Proxy::try_start(node_addrs[0]).await?));
    }
    let viewer_proxy = proxies[proxies.len() - 1].clone();

    // The Rust runtimes' runs first (slots 0..runtimes, the ones takeovers
    // pick from), then one per TypeScript and per Python runtime program.
    let mut programs: Vec<Arc<external::Program>> = Vec::new();
    if args.ts_runtimes > 0 {
        let dir = client_dir(&args.ts_client_dir, "typescript");
        let node = args.node_bin.clone();
        let program = Arc::new(external::Program::typescript(node, &dir, &work_dir)?);
        programs.extend(std::iter::repeat_n(program, args.ts_runtimes));
    }
    if args.py_runtimes > 0 {
        let dir = client_dir(&args.py_client_dir, "python");
        let python = args.python_bin.clone();
        let program = Arc::new(external::Program::python(python, &dir, &work_dir)?);
        programs.extend(std::iter::repeat_n(program, args.py_runtimes));
    }
    let runs: Vec<String> = (0..args.runtimes)
        .map(|i| format!("{prefix}run-{i}"))
        .chain(
            programs
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{prefix}{}-{}", p.lang.short(), args.runtimes + i)),
        )
        .collect();
    let ctx = Arc::new(Ctx {
        url_base: format!("ws://{}", proxies[0].addr()),
        viewer_url_base: format!("ws://{}", viewer_proxy.addr()),
        proxy_addr: viewer_proxy.addr(),
        runtime_token,
        viewer_token,
        runs: runs.clone(),
        ledger: Ledger::new(),
        stats: Mutex::new(load::LoadStats::default()),
        takeover: (0..args.runtimes).map(|_| AtomicBool::new(false)).collect(),
        next_publisher: AtomicU64::new(1),
        rate: args.rate,
        batch: args.batch.max(1),
        pad: "x".repeat(args.event_bytes),
        gaps_allowed: args.tiny_ring,
        debug: args.debug_viewer_fault,
        debug_done: AtomicBool::new(false),
        stop_load: CancellationToken::new(),
        stop_view: CancellationToken::new(),
    });

    // Viewers first, so every one sees the streams from their start.
    let mut tails: Vec<Arc<Mutex<Tail>>> = Vec::new();
    let mut viewers = JoinSet::new();
    let mut covered = vec![false; runs.len()];
    let mut next_run = 0usize;
    for v in 0..args.ws_viewers {
        let client = load::viewer_client(&ctx);
        for _ in 0..args.follow.min(runs.len()) {
            let run = next_run % runs.len().max(1);
            next_run += 1;
            covered[run] = true;
            let tail = Arc::new(Mutex::new(Tail::new(
                run,
                format!("ws-{v}"),
                args.tiny_ring,
            )));
            tails.push(tail.clone());
            viewers.spawn(load::ws_follow(ctx.clone(), client.clone(), tail));
        }
    }
    for v in 0..args.sse_viewers {
        let run = covered
            .iter()
            .position(|c| !c)
            .unwrap_or(v % runs.len().max(1));
        if run < covered.len() {
            covered[run] = true;
        }
        let tail = Arc::new(Mutex::new(Tail::new(
            run,
            format!("sse-{v}"),
            args.tiny_ring,
        )));
        tails.push(tail.clone());
        viewers.spawn(load::sse_follow(ctx.clone(), tail));
    }
    // Any run still unwatched gets a WebSocket viewer of its own.
    for (run, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        let tail = Arc::new(Mutex::new(Tail::new(
            run,
            format!("ws-extra-{run}"),
            args.tiny_ring,
        )));
        tails.push(tail.clone());
        viewers.spawn(load::ws_follow(
            ctx.clone(),
            load::viewer_client(&ctx),
            tail,
        ));
    }

    let began = Instant::now();
    let mut publishers = JoinSet::new();
    for slot in 0..args.runtimes {
        publishers.spawn(load::runtime_slot(ctx.clone(), slot));
    }
    for (i, program) in programs.iter().enumerate() {
        let slot = args.runtimes + i;
        publishers.spawn(external::runtime_process(
            ctx.clone(),
            slot,
            program.clone(),
        ));
    }

    let faults: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let duration = Duration::from_secs(args.duration_secs);
    let end_at = began + duration;
    let nodes: Vec<Arc<tokio::sync::Mutex<Gateway>>> = nodes
        .into_iter()
        .map(|g| Arc::new(tokio::sync::Mutex::new(g)))
        .collect();
    let redis = redis.map(|r| Arc::new(tokio::sync::Mutex::new(r)));
    let bad_drains = Arc::new(AtomicU64::new(0));
    let mut schedulers = JoinSet::new();
    if args.net_fault_every > 0.0 {
        for proxy in &proxies {
            let schedule = Schedule {
                every: args.net_fault_every,
                until: end_at,
            };
            schedulers.spawn(net_faults(proxy.clone(), schedule, faults.clone()));
        }
    }
    if args.gateway_fault_every > 0.0 {
        let until = began + duration.mul_f64(args.gateway_faults_until.clamp(0.0, 1.0));
        schedulers.spawn(gateway_faults(
            Cluster {
                nodes: nodes.clone(),
                proxies: proxies.clone(),
                addrs: node_addrs.clone(),
                redis: redis.clone(),
            },
            Schedule {
                every: args.gateway_fault_every,
                until,
            },
            faults.clone(),
            bad_drains.clone(),
        ));
    }
    if args.takeover_every > 0.0 && args.runtimes > 0 {
        let schedule = Schedule {
            every: args.takeover_every,
            until: end_at,
        };
        schedulers.spawn(takeovers(ctx.clone(), schedule, faults.clone()));
    }

    // Sample the gateway every 5 s until the end.
    let mut samples: Vec<ProcSample> = Vec::new();
    let mut mid: Vec<ProcSample> = Vec::new();
    let mut mid_taken = false;
    let half = duration / 2;
    loop {
        let at_mid = !mid_taken && began.elapsed() >= half;
        for (node, gw) in nodes.iter().enumerate() {
            let pid = gw.lock().await.pid();
            if let Some(pid) = pid
                && let (Ok(p), Ok(fds)) = (
                    crate::procfs::sample(&pid.to_string()),
                    gateway::fd_count(pid),
                )
            {
                let s = ProcSample {
                    at_secs: began.elapsed().as_secs_f64(),
                    node,
                    pid,
                    rss_kib: p.rss_kib,
                    fds,
                };
                if at_mid {
                    mid.push(s);
                }
                samples.push(s);
            }
        }
        mid_taken |= at_mid;
        if Instant::now() >= end_at {
            break;
        }
        let next = (Instant::now() + Duration::from_secs(5)).min(end_at);
        // Take the midpoint reading on time, not up to 5 s late.
        let next = if !mid_taken && began + half < next {
            began + half
        } else {
            next
        };
        tokio::time::sleep_until(next).await;
    }

    // Stop: faults end, publishers finish their last publish, viewers
    // catch up.
    let mut scheduler_errors = Vec::new();
    while let Some(r) = schedulers.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => scheduler_errors.push(format!("{e:#}")),
            Err(e) => scheduler_errors.push(e.to_string()),
        }
    }
    for proxy in &proxies {
        proxy.unstall();
        proxy.shape(Duration::ZERO, None);
    }
    ctx.stop_load.cancel();
    while publishers.join_next().await.is_some() {}
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    let caught_up = loop {
        let behind: u64 = tails
            .iter()
            .map(|t| {
                let t = t.lock();
                let missing = ctx.ledger.missing(&t);
                if args.tiny_ring {
                    missing.saturating_sub(t.counts.reported_gap_events)
                } else {
                    missing
                }
            })
            .sum();
        if behind == 0 {
            break true;
        }
        if Instant::now() >= drain_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // A moment more, so a duplicate sent right after the last event is seen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.stop_view.cancel();
    while viewers.join_next().await.is_some() {}

    let mut panics = Vec::new();
    let mut gateway_starts = 0;
    for gw in &nodes {
        let mut gw = gw.lock().await;
        if !gw.drain(Duration::from_secs(30)).await? {
            bad_drains.fetch_add(1, Ordering::SeqCst);
        }
        panics.extend(gw.panics());
        gateway_starts += gw.starts;
    }
    let redis_starts = match &redis {
        Some(r) => {
            let mut r = r.lock().await;
            r.kill().await?;
            r.starts
        }
        None => 0,
    };

    // Every viewer task has been joined, so each tail has one owner left.
    let tails: Vec<Tail> = tails
        .into_iter()
        .map(|t| Arc::try_unwrap(t).map(Mutex::into_inner))
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("a viewer task outlived the soak"))?;
    let verdict = ctx.ledger.verdict(tails.iter());
    let stats = std::mem::take(&mut *ctx.stats.lock());

    let pick = |node: usize, last: bool| {
        let mut it = samples.iter().filter(|s| s.node == node);
        if last { it.next_back() } else { it.next() }.copied()
    };
    let start: Vec<ProcSample> = (0..nodes.len()).filter_map(|n| pick(n, false)).collect();
    let end: Vec<ProcSample> = (0..nodes.len()).filter_map(|n| pick(n, true)).collect();
    let flat: Vec<Option<bool>> = (0..nodes.len())
        .map(|n| {
            let m = mid.iter().find(|s| s.node == n)?;
            let e = end.iter().find(|s| s.node == n)?;
            (m.pid == e.pid).then_some(
                (e.rss_kib as f64) <= 1.2 * m.rss_kib as f64 + 16.0 * 1024.0
                    && (e.fds as f64) <= 1.2 * m.fds as f64 + 16.0,
            )
        })
        .collect();
    let publish_latency = stats
        .publish_us
        .as_ref()
        .map(|h| Latency {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
            max_ms: h.max() as f64 / 1000.0,
        })
        .unwrap_or_default();

    let mut failures: Vec<String> = scheduler_errors
        .into_iter()
        .map(|e| format!("a fault could not be injected or undone: {e}"))
        .collect();
    if verdict.lost > 0 {
        failures.push(format!(
            "{} acknowledged event deliveries lost",
            verdict.lost
        ));
    }
    if verdict.duplicated > 0 {
        failures.push(format!("{} events delivered twice", verdict.duplicated));
    }
    let t = &verdict.totals;
    if t.reordered > 0 {
        failures.push(format!("{} events out of order", t.reordered));
    }
    if t.unreported_gap_events > 0 {
        failures.push(format!(
            "{} offsets skipped without a gap report",
            t.unreported_gap_events
        ));
    }
    if !args.tiny_ring && t.gaps_reported > 0 {
        failures.push(format!(
            "{} gaps reported with a ring no viewer should fall out of",
            t.gaps_reported
        ));
    }
    if t.false_gaps > 0 {
        failures.push(format!(
            "{} reported gaps whose events were still kept",
            t.false_gaps
        ));
    }
    if !args.tiny_ring && t.history_lost > 0 {
        failures.push(format!(
            "{} resumes found history truncated or replaced (first: {})",
            t.history_lost,
            t.first_history_loss.as_deref().unwrap_or("?")
        ));
    }
    if t.fenced_landed > 0 {
        failures.push(format!(
            "{} fenced publishes reached viewers",
            t.fenced_landed
        ));
    }
    if t.foreign > 0 {
        failures.push(format!("{} events or SSE blocks not understood", t.foreign));
    }
    if stats.fenced_accepted > 0 {
        failures.push(format!(
            "{} publishes from superseded clients accepted",
            stats.fenced_accepted
        ));
    }
    if !stats.viewer_errors.keys().all(|k| k.starts_with("sse: ")) {
        failures.push(format!(
            "a WebSocket viewer ended on an error: {:?}",
            stats.viewer_errors
        ));
    }
    if bad_drains.load(Ordering::SeqCst) > 0 {
        failures.push(format!(
            "{} drains did not exit 0 in time",
            bad_drains.load(Ordering::SeqCst)
        ));
    }
    if !panics.is_empty() {
        failures.push(format!("the gateway panicked: {}", panics[0]));
    }
    if flat.contains(&Some(false)) {
        failures.push("RSS or descriptors grew over the second half".to_owned());
    }
    if !caught_up {
        failures.push("viewers did not catch up within the drain".to_owned());
    }
    failures.extend(
        stats
            .runtime_failures
            .iter()
            .map(|f| format!("runtime program {f}")),
    );
    for (label, acked) in &stats.client_acked {
        if *acked == 0 {
            failures.push(format!("runtime program {label} had nothing acknowledged"));
        }
    }
    if verdict.acked == 0 {
        failures.push("nothing was acknowledged: the soak measured nothing".to_owned());
    }

    let work_dir_shown = match temp {
        // Keep the gateway's log and data of a failed soak for a look.
        Some(t) if !failures.is_empty() => t.keep().display().to_string(),
        Some(t) => format!("{} (removed)", t.path().display()),
        None => work_dir.display().to_string(),
    };
    let mut settings = BTreeMap::new();
    for (k, v) in [
        ("runtimes", args.runtimes.to_string()),
        ("ts_runtimes", args.ts_runtimes.to_string()),
        ("py_runtimes", args.py_runtimes.to_string()),
        ("rate", args.rate.to_string()),
        ("batch", args.batch.to_string()),
        ("event_bytes", args.event_bytes.to_string()),
        ("ws_viewers", args.ws_viewers.to_string()),
        ("follow", args.follow.to_string()),
        ("sse_viewers", args.sse_viewers.to_string()),
        ("ring_events", ring.to_string()),
        ("net_fault_every", args.net_fault_every.to_string()),
        ("gateway_fault_every", args.gateway_fault_every.to_string()),
        (
            "gateway_faults_until",
            args.gateway_faults_until.to_string(),
        ),
        ("takeover_every", args.takeover_every.to_string()),
        ("redis", args.redis.to_string()),
    ] {
        settings.insert(k.to_owned(), v);
    }
    let faults = faults.lock().clone();
    Ok(SoakReport {
        duration_secs: args.duration_secs,
        settings,
        events_sent: stats.events_sent,
        publishes_ok: stats.publishes_ok,
        publish_errors: stats.publish_errors,
        viewer_errors: stats.viewer_errors,
        faults,
        takeovers: stats.takeovers,
        superseded_told: stats.superseded_told,
        fenced_refused: stats.fenced_refused,
        fenced_accepted: stats.fenced_accepted,
        reattaches: stats.reattaches,
        client_acked: stats.client_acked,
        sse_responses: stats.sse_responses,
        gap_checks_failed: stats.gap_checks_failed,
        verdict,
        publish_latency,
        start,
        mid,
        end,
        samples,
        flat,
        gateway_starts,
        redis_starts,
        bad_drains: bad_drains.load(Ordering::SeqCst),
        panics,
        caught_up,
        work_dir: work_dir_shown,
        failures,
    })
}

/// When a fault scheduler acts: at random moments around every `every`
/// seconds (uniform over half to one and a half times it), until `until`.
struct Schedule {
    every: f64,
    until: Instant,
}

impl Schedule {
    /// Sleeps until the next moment to act; false once it would fall past
    /// the end.
    async fn next(&self) -> bool {
        let ms = (self.every * 1000.0).max(1.0) as u64;
        let at = Instant::now() + Duration::from_millis(rand::random_range(ms / 2..=ms + ms / 2));
        if at >= self.until {
            return false;
        }
        tokio::time::sleep_until(at).await;
        true
    }

    /// Holds a fault for a random time within `ms` milliseconds, cut short
    /// at the end.
    async fn hold(&self, ms: std::ops::RangeInclusive<u64>) {
        let hold = Duration::from_millis(rand::random_range(ms));
        tokio::time::sleep_until((Instant::now() + hold).min(self.until)).await;
    }
}

/// A client library's directory: the flag's, else `clients/<name>` of the
/// repository this crate was built from.
fn client_dir(flag: &Option<PathBuf>, name: &str) -> PathBuf {
    flag.clone().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../clients")
            .join(name)
    })
}

fn count(faults: &Mutex<BTreeMap<String, u64>>, kind: &str) {
    *faults.lock().entry(kind.to_owned()).or_insert(0) += 1;
}

/// Network faults through the proxy until `end_at`.
async fn net_faults(
    proxy: Arc<Proxy>,
    schedule: Schedule,
    faults: Arc<Mutex<BTreeMap<String, u64>>>,
) -> anyhow::Result<()> {
    while schedule.next().await {
        match rand::random_range(0..6u32) {
            5 => {
                // A partition: connections reset and reconnects refused
                // for a while, so clients come back behind the stream.
                proxy.refuse(true);
                proxy.cut_all().await;
                schedule.hold(1000..=5000).await;
                proxy.refuse(false);
                count(&faults, "net: partition 1-5 s (cut, reconnects refused)");
            }
            0 => {
                proxy.cut_all().await;
                count(&faults, "net: cut all connections");
            }
            1 => {
                let k = rand::random_range(0..3u64);
                proxy.cut_matching(|id| id % 3 == k).await;
                count(&faults, "net: cut a third of connections");
            }
            2 => {
                proxy.stall(Duration::from_millis(rand::random_range(1000..=4000)));
                count(&faults, "net: stall 1-4 s");
            }
            3 => {
                let latency = Duration::from_millis(rand::random_range(50..=300));
                proxy.shape(latency, None);
                count(&faults, "net: latency 50-300 ms");
                schedule.hold(5000..=15000).await;
                proxy.shape(Duration::ZERO, None);
            }
            _ => {
                let cap = rand::random_range(16..=128u64) * 1024;
                proxy.shape(Duration::ZERO, Some(cap));
                count(&faults, "net: bandwidth 16-128 KiB/s");
                schedule.hold(5000..=15000).await;
                proxy.shape(Duration::ZERO, None);
            }
        }
    }
    Ok(())
}

/// The processes gateway faults act on.
struct Cluster {
    nodes: Vec<Arc<tokio::sync::Mutex<Gateway>>>,
    /// `proxies[i]` fronts `nodes[i]` (at `addrs[i]`); with one node, a
    /// second proxy fronts it too (the viewers').
    proxies: Vec<Arc<Proxy>>,
    addrs: Vec<std::net::SocketAddr>,
    redis: Option<Arc<tokio::sync::Mutex<gateway::RedisServer>>>,
}

/// Gateway kills and drains, each followed by a restart, until `until`;
/// with two nodes, a killed node's proxy sends new connections to the
/// other node until it is back, and Redis is restarted too.
async fn gateway_faults(
    cluster: Cluster,
    schedule: Schedule,
    faults: Arc<Mutex<BTreeMap<String, u64>>>,
    bad_drains: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let many = cluster.nodes.len() > 1;
    while schedule.next().await {
        let kinds = if cluster.redis.is_some() { 3 } else { 2 };
        let kind = rand::random_range(0..kinds);
        if kind == 2 {
            if let Some(r) = &cluster.redis {
                let mut r = r.lock().await;
                r.kill().await?;
                tokio::time::sleep(Duration::from_millis(rand::random_range(500..=3000))).await;
                r.start().await?;
                count(&faults, "redis: kill -9 + restart (AOF)");
            }
            continue;
        }
        let n = rand::random_range(0..cluster.nodes.len());
        let other = (n + 1) % cluster.nodes.len();
        let mut g = cluster.nodes[n].lock().await;
        if many {
            cluster.proxies[n].retarget(cluster.addrs[other]);
        }
        let node = if many {
            format!(" node {n}")
        } else {
            String::new()
        };
        if kind == 0 {
            g.kill().await?;
            count(&faults, &format!("gateway{node}: kill -9 + restart"));
        } else {
            if !g.drain(Duration::from_secs(30)).await? {
                bad_drains.fetch_add(1, Ordering::SeqCst);
            }
            count(&faults, &format!("gateway{node}: SIGTERM drain + restart"));
        }
        g.start().await?;
        if many {
            cluster.proxies[n].retarget(cluster.addrs[n]);
        }
    }
    Ok(())
}

/// Takeovers of random runs until `end_at`.
async fn takeovers(
    ctx: Arc<Ctx>,
    schedule: Schedule,
    faults: Arc<Mutex<BTreeMap<String, u64>>>,
) -> anyhow::Result<()> {
    while schedule.next().await {
        let slot = rand::random_range(0..ctx.takeover.len());
        ctx.takeover[slot].store(true, Ordering::SeqCst);
        count(&faults, "runtime: takeover by a higher epoch");
    }
    Ok(())
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.verdict;
        writeln!(
            f,
            "soak: {} s, {}",
            self.duration_secs,
            if self.passed() { "PASSED" } else { "FAILED" }
        )?;
        let s: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(f, "  settings: {}", s.join(" "))?;
        writeln!(
            f,
            "  events: {} sent, {} acknowledged ({} publishes ok); deliveries checked: {}",
            self.events_sent, v.acked, self.publishes_ok, v.totals.events
        )?;
        writeln!(
            f,
            "  lost: {}   duplicated: {}   (goal 0 and 0)",
            v.lost, v.duplicated
        )?;
        writeln!(
            f,
            "  reordered {}, unreported gaps {}, gaps reported {} ({} events, {} in lost acked), false gaps {}, history lost {}, fenced landed {}",
            v.totals.reordered,
            v.totals.unreported_gap_events,
            v.totals.gaps_reported,
            v.totals.reported_gap_events,
            v.lost_in_reported_gaps,
            v.totals.false_gaps,
            v.totals.history_lost,
            v.totals.fenced_landed
        )?;
        if self.gap_checks_failed > 0 {
            writeln!(
                f,
                "  gaps that could not be checked: {}",
                self.gap_checks_failed
            )?;
        }
        writeln!(f, "  faults injected:")?;
        for (k, n) in &self.faults {
            writeln!(f, "    {k}: {n}")?;
        }
        writeln!(
            f,
            "  takeovers {} (old client told superseded: {}), fenced publishes refused {} / accepted {}",
            self.takeovers, self.superseded_told, self.fenced_refused, self.fenced_accepted
        )?;
        writeln!(
            f,
            "  gateway starts {}, redis starts {}, bad drains {}, panics {}",
            self.gateway_starts,
            self.redis_starts,
            self.bad_drains,
            self.panics.len()
        )?;
        if !self.client_acked.is_empty() {
            let each: Vec<String> = self
                .client_acked
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(
                f,
                "  acknowledged to the TypeScript/Python runtimes: {}",
                each.join(", ")
            )?;
        }
        if !self.publish_errors.is_empty() {
            writeln!(
                f,
                "  client errors (expected under faults): {:?}",
                self.publish_errors
            )?;
        }
        if !self.viewer_errors.is_empty() {
            writeln!(f, "  viewer errors: {:?}", self.viewer_errors)?;
        }
        let l = &self.publish_latency;
        writeln!(
            f,
            "  publish under faults: {} publishes, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            l.count, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
        )?;
        for (name, list) in [
            ("start", &self.start),
            ("mid", &self.mid),
            ("end", &self.end),
        ] {
            for s in list {
                writeln!(
                    f,
                    "  gateway node {} {name:>5} (t={:.0}s, pid {}): RSS {:.1} MiB, fds {}",
                    s.node,
                    s.at_secs,
                    s.pid,
                    s.rss_kib as f64 / 1024.0,
                    s.fds
                )?;
            }
        }
        for (node, flat) in self.flat.iter().enumerate() {
            writeln!(
                f,
                "  node {node} flat over the second half (end <= 1.2 x mid + 16 MiB / 16 fds): {}",
                match flat {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "not comparable (the process changed after the midpoint)",
                }
            )?;
        }
        writeln!(f, "  viewers caught up: {}", self.caught_up)?;
        writeln!(f, "  work dir: {}", self.work_dir)?;
        for t in &v.failing_tails {
            writeln!(f, "  failing tail: {t}")?;
        }
        for x in &self.failures {
            writeln!(f, "  VIOLATION: {x}")?;
        }
        Ok(())
    }
}
