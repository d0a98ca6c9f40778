//! The soak's load: runtimes on [`RuntimeClient`] publishing at a steady
//! pace (and now and then taken over by a successor with a higher epoch),
//! viewers on [`ViewerClient`] and on SSE, every socket through the fault
//! proxy.
//!
//! Owns the tasks and what they count; each viewer feeds its own
//! [`Tail`], each acknowledged publish goes into the [`Ledger`]. Must not
//! judge (the checker does) or inject faults (the scheduler does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rungate_client::{
    Backoff, ClientError, ClientEvent, Event, RuntimeClient, RuntimeOptions, StreamItem,
    ViewerClient, ViewerOptions,
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checker::{Ledger, Tail};
use super::sse::{self, SseError, SseItem};

/// A bug planted on the viewer side, to show the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewerFault {
    /// The first WebSocket viewer forgets its 10th event.
    Drop,
    /// The first WebSocket viewer counts its 10th event twice.
    Duplicate,
}

/// Counters of the load side.
#[derive(Debug, Default)]
pub(crate) struct LoadStats {
    /// Publish round trips (µs), every outcome.
    pub(crate) publish_us: Option<Histogram<u64>>,
    pub(crate) publishes_ok: u64,
    pub(crate) events_sent: u64,
    pub(crate) publish_errors: BTreeMap<String, u64>,
    pub(crate) reattaches: u64,
    pub(crate) takeovers: u64,
    /// Old clients that heard `session.superseded` after a takeover.
    pub(crate) superseded_told: u64,
    /// Publishes tried by a superseded client: refused / accepted.
    pub(crate) fenced_refused: u64,
    pub(crate) fenced_accepted: u64,
    pub(crate) viewer_errors: BTreeMap<String, u64>,
    pub(crate) sse_responses: u64,
    pub(crate) gap_checks_failed: u64,
    /// Events acknowledged to each runtime program of another client
    /// library (`ts-6`, `py-8`).
    pub(crate) client_acked: BTreeMap<String, u64>,
    /// What went wrong with those programs (an early exit, a bad line).
    pub(crate) runtime_failures: Vec<String>,
}

impl LoadStats {
    /// One publish's round trip, whatever its outcome.
    pub(crate) fn round_trip(&mut self, took: Duration) {
        let h = self.publish_us.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
        });
        let _ = h.record((took.as_micros() as u64).max(1));
    }
}

pub(crate) fn bump(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_insert(0) += 1;
}

/// What every load task shares.
pub(crate) struct Ctx {
    /// `ws://PROXY` the runtimes connect to.
    pub(crate) url_base: String,
    /// `ws://PROXY` the WebSocket viewers connect to (another node's proxy
    /// with `--redis`).
    pub(crate) viewer_url_base: String,
    /// The viewers' proxy, for SSE.
    pub(crate) proxy_addr: SocketAddr,
    pub(crate) runtime_token: String,
    pub(crate) viewer_token: String,
    pub(crate) runs: Vec<String>,
    pub(crate) ledger: Ledger,
    pub(crate) stats: Mutex<LoadStats>,
    /// Set by the scheduler: this slot's run is to be taken over (one per
    /// Rust runtime; the runtimes on other clients come after them).
    pub(crate) takeover: Vec<AtomicBool>,
    pub(crate) next_publisher: AtomicU64,
    /// Events per second, per runtime.
    pub(crate) rate: f64,
    pub(crate) batch: usize,
    pub(crate) pad: String,
    pub(crate) gaps_allowed: bool,
    pub(crate) debug: Option<ViewerFault>,
    pub(crate) debug_done: AtomicBool,
    /// Publishers stop.
    pub(crate) stop_load: CancellationToken,
    /// Viewers stop (after the drain).
    pub(crate) stop_view: CancellationToken,
}

fn backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    }
}

impl Ctx {
    fn runtime_options(&self, slot: usize) -> RuntimeOptions {
        let mut o = RuntimeOptions::new(
            format!("{}/v1/runtime", self.url_base),
            self.runtime_token.clone(),
            format!("soak-{slot}"),
        );
        o.request_timeout = Duration::from_secs(30);
        o.backoff = backoff();
        o
    }

    /// A client holding `slot`'s run, retried until it works or the load
    /// stops.
    async fn attached_client(&self, slot: usize) -> Option<RuntimeClient> {
        let run = &self.runs[slot];
        loop {
            if self.stop_load.is_cancelled() {
                return None;
            }
            match RuntimeClient::connect(self.runtime_options(slot)).await {
                Ok(c) => match c.attach(run, &[]).await {
                    Ok(_) => return Some(c),
                    Err(e) => {
                        bump(
                            &mut self.stats.lock().publish_errors,
                            format!("attach: {}", kind(&e)),
                        );
                        c.close().await;
                    }
                },
                Err(e) => bump(
                    &mut self.stats.lock().publish_errors,
                    format!("connect: {}", kind(&e)),
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn record_publish(&self, took: Duration, result: &Result<(), ClientError>, events: usize) {
        let mut s = self.stats.lock();
        s.round_trip(took);
        s.events_sent += events as u64;
        match result {
            Ok(()) => s.publishes_ok += 1,
            Err(e) => bump(&mut s.publish_errors, format!("publish: {}", kind(e))),
        }
    }
}

/// A short name for an error, for counting.
fn kind(e: &ClientError) -> String {
    match e {
        ClientError::Gateway { code, .. } => code.to_string(),
        ClientError::Timeout(_) => "timeout".into(),
        ClientError::ConnectionLost => "connection lost".into(),
        ClientError::Closed => "closed".into(),
        ClientError::NoSession(_) => "no session".into(),
        ClientError::Connect(_) => "connect".into(),
        ClientError::BadReply(_) => "bad reply".into(),
        ClientError::BadPush(_) => "bad push".into(),
        ClientError::InvalidRequest(_) => "invalid request".into(),
    }
}

fn soak_event(p: u64, n: u64, fenced: bool, pad: &str) -> Event {
    Event::new("soak").data(json!({"p": p, "n": n, "f": fenced, "pad": pad}))
}

/// One runtime: holds `slot`'s run and publishes `batch` events at a time,
/// one publish after another, at `rate` events per second.
pub(crate) async fn runtime_slot(ctx: Arc<Ctx>, slot: usize) {
    let run = ctx.runs[slot].clone();
    let mut p = ctx.next_publisher.fetch_add(1, Ordering::SeqCst);
    let Some(mut client) = ctx.attached_client(slot).await else {
        return;
    };
    let mut n = 0u64;
    let every = Duration::from_secs_f64(ctx.batch as f64 / ctx.rate.max(0.001));
    // Spread the slots' phases so publishes do not come in waves.
    let phase = every.mul_f64(slot as f64 / ctx.runs.len().max(1) as f64);
    let mut tick = tokio::time::interval_at(Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.stop_load.cancelled() => break,
            _ = tick.tick() => {}
        }
        if ctx.takeover[slot].swap(false, Ordering::SeqCst) {
            match take_over(&ctx, slot, client, p, n).await {
                Some((c, new_p)) => {
                    client = c;
                    p = new_p;
                    n = 0;
                }
                None => return,
            }
        }
        let first = n + 1;
        let events = (first..first + ctx.batch as u64)
            .map(|k| soak_event(p, k, false, &ctx.pad))
            .collect();
        n += ctx.batch as u64;
        let t0 = Instant::now();
        let result = client.publish(&run, events).await;
        ctx.record_publish(t0.elapsed(), &result, ctx.batch);
        match result {
            Ok(()) => ctx.ledger.acked(slot, p, first, n),
            Err(ClientError::NoSession(_)) => {
                // The lease ran out during an outage: attach afresh (a new
                // session of the same run; the stream goes on).
                if client.attach(&run, &[]).await.is_ok() {
                    ctx.stats.lock().reattaches += 1;
                }
            }
            Err(_) => {}
        }
    }
    client.close().await;
}

/// A successor client (same runtime instance, a higher epoch) takes the
/// run over; the old one, once told it is superseded, tries one more
/// publish, marked fenced, which must be refused and never appear.
async fn take_over(
    ctx: &Ctx,
    slot: usize,
    old: RuntimeClient,
    old_p: u64,
    old_n: u64,
) -> Option<(RuntimeClient, u64)> {
    let run = ctx.runs[slot].clone();
    let mut events = old.events();
    let new_p = ctx.next_publisher.fetch_add(1, Ordering::SeqCst);
    let new = ctx.attached_client(slot).await?;
    let told = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match events.recv().await {
                Ok(ClientEvent::SessionSuperseded { run_id }) if run_id == run => return true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                _ => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    let fenced = vec![soak_event(old_p, old_n + 1, true, &ctx.pad)];
    let late = tokio::time::timeout(Duration::from_secs(10), old.publish(&run, fenced)).await;
    {
        let mut s = ctx.stats.lock();
        s.takeovers += 1;
        s.superseded_told += u64::from(told);
        if matches!(late, Ok(Ok(()))) {
            s.fenced_accepted += 1;
        } else {
            s.fenced_refused += 1;
        }
    }
    old.close().await;
    Some((new, new_p))
}

/// Applies the planted bug, if any, to the first viewer's 10th event:
/// how many times to feed it (0, 1 or 2).
fn debug_copies(ctx: &Ctx, tail: &Tail) -> usize {
    match ctx.debug {
        Some(f) if tail.viewer == "ws-0" && tail.counts.events == 9 => {
            if ctx.debug_done.swap(true, Ordering::SeqCst) {
                return 1;
            }
            match f {
                ViewerFault::Drop => 0,
                ViewerFault::Duplicate => 2,
            }
        }
        _ => 1,
    }
}

/// Asks the gateway (over SSE, `?from=from`) whether offset `from` is
/// still kept: `Some(true)` if it is gone (the gap was real).
async fn really_dropped(ctx: &Ctx, run: usize, from: u64) -> Option<bool> {
    let mut first = None;
    let _ = sse::read_once(
        ctx.proxy_addr,
        &ctx.runs[run],
        &ctx.viewer_token,
        sse::Start::From(from),
        Duration::from_secs(10),
        |item| {
            if let SseItem::Stream(v) = item {
                first = v["firstOffset"].as_u64();
            }
            false
        },
    )
    .await;
    first.map(|f| f > from)
}

/// One WebSocket follow of `run` by viewer `client`, from offset 0.
pub(crate) async fn ws_follow(ctx: Arc<Ctx>, client: ViewerClient, tail: Arc<Mutex<Tail>>) {
    let run = tail.lock().run;
    let mut follower = client.follow(&ctx.runs[run], Some(0));
    loop {
        let item = tokio::select! {
            _ = ctx.stop_view.cancelled() => return,
            item = follower.next() => item,
        };
        match item {
            Some(Ok(StreamItem::Resumed {
                stream_epoch,
                truncated,
                start_offset,
                first_offset,
                ..
            })) => tail
                .lock()
                .on_resumed(&stream_epoch, truncated, start_offset, first_offset),
            Some(Ok(StreamItem::Event { offset, event })) => {
                let mut t = tail.lock();
                for _ in 0..debug_copies(&ctx, &t) {
                    t.on_event(offset, &event);
                }
            }
            Some(Ok(StreamItem::Gap { from, to })) => {
                tail.lock().on_gap(from, to, None);
                if ctx.gaps_allowed {
                    check_gap(&ctx, run, from, &tail).await;
                }
            }
            Some(Ok(StreamItem::Closed { .. })) => tail.lock().on_closed(),
            // The soak never finishes a run: an end is an error of its own.
            Some(Ok(StreamItem::Ended { .. })) => {
                bump(
                    &mut ctx.stats.lock().viewer_errors,
                    "ws: stream.ended of a run nobody finished".to_owned(),
                );
                return;
            }
            Some(Err(e)) => {
                bump(
                    &mut ctx.stats.lock().viewer_errors,
                    format!("ws: {}", kind(&e)),
                );
                return;
            }
            None => return,
        }
    }
}

async fn check_gap(ctx: &Ctx, run: usize, from: u64, tail: &Mutex<Tail>) {
    match really_dropped(ctx, run, from).await {
        Some(true) => {}
        Some(false) => tail.lock().counts.false_gaps += 1,
        None => ctx.stats.lock().gap_checks_failed += 1,
    }
}

/// One SSE viewer of `run`: from offset 0, then `Last-Event-ID` after
/// every break, until the viewers stop.
pub(crate) async fn sse_follow(ctx: Arc<Ctx>, tail: Arc<Mutex<Tail>>) {
    let run = tail.lock().run;
    let mut failures = 0u32;
    while !ctx.stop_view.is_cancelled() {
        let start = match tail.lock().next_offset() {
            None | Some(0) => sse::Start::From(0),
            Some(n) => sse::Start::After(n - 1),
        };
        let mut gaps = Vec::new();
        let read = sse::read_once(
            ctx.proxy_addr,
            &ctx.runs[run],
            &ctx.viewer_token,
            start,
            Duration::from_secs(30),
            |item| {
                if ctx.stop_view.is_cancelled() {
                    return false;
                }
                let mut t = tail.lock();
                match item {
                    SseItem::Stream(v) => t.on_resumed(
                        v["streamEpoch"].as_str().unwrap_or_default(),
                        v["truncated"].as_bool().unwrap_or(false),
                        v["startOffset"].as_u64().unwrap_or(0),
                        v["firstOffset"].as_u64().unwrap_or(0),
                    ),
                    SseItem::Output { offset, event } => t.on_event(offset, &event),
                    SseItem::Gap { from, to } => {
                        t.on_gap(from, to, None);
                        gaps.push(from);
                    }
                    SseItem::Closed => t.on_closed(),
                    SseItem::End => {}
                    SseItem::Malformed(_) => t.counts.foreign += 1,
                }
                true
            },
        );
        let read = tokio::select! {
            _ = ctx.stop_view.cancelled() => return,
            r = read => r,
        };
        if ctx.gaps_allowed {
            for from in gaps {
                check_gap(&ctx, run, from, &tail).await;
            }
        }
        match read {
            Ok(()) => {
                failures = 0;
                ctx.stats.lock().sse_responses += 1;
            }
            Err(SseError::Stopped) => return,
            Err(SseError::Connect(e)) => {
                failures += 1;
                let short: String = e.chars().take(40).collect();
                bump(&mut ctx.stats.lock().viewer_errors, format!("sse: {short}"));
            }
        }
        let wait = backoff().bound(failures);
        tokio::time::sleep(Duration::from_millis(rand::random_range(
            0..=wait.as_millis() as u64,
        )))
        .await;
    }
}

/// A WebSocket viewer client through the proxy.
pub(crate) fn viewer_client(ctx: &Ctx) -> ViewerClient {
    let mut o = ViewerOptions::new(
        format!("{}/v1/stream", ctx.viewer_url_base),
        ctx.viewer_token.clone(),
    );
    o.backoff = backoff();
    ViewerClient::new(o)
}
