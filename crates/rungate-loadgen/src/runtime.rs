//! One runtime socket of the load: connect, attach its sessions,
//! heartbeat them, publish if it is a publisher, close.
//!
//! One task owns the socket (no split, no channels): a `select!` over the
//! socket, the heartbeat timer, the publish timer and the phase. Requests
//! in flight are a short queue searched from the front, since replies
//! mostly come back in order. Publishers are the sockets with the lowest
//! indexes; only their main run publishes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rungate_protocol::ids::Capability;
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::tungstenite::Message;

use super::net::{self, Ws};
use super::stats::{Kind, Stats, add};
use super::wire::{self, Incoming, PublishScratch, SessionRef};
use super::{Phase, Rate, Shared};

/// Longest wait for an attach reply.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches in flight per publisher at a fixed rate before ticks are skipped.
const RATE_WINDOW: usize = 64;
/// How long a socket waits, once told to close, for the answers to what it
/// already sent.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

struct Pending {
    id: u64,
    kind: Kind,
    sent: Instant,
    /// Events in a publish.
    events: u32,
    /// Sent in the traffic phase: its round trip is recorded (not those of
    /// the connect phase, when thousands of handshakes compete with it,
    /// nor the prefill), and a publish's events count as accepted.
    counted: bool,
}

/// What the publisher is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    /// Publishing the prefill; events still to send.
    Prefill(u64),
    Publish,
    /// Stopped; done once nothing is in flight.
    Stopping,
    Done,
}

struct Conn {
    ws: Ws,
    next_id: u64,
    pending: VecDeque<Pending>,
}

impl Conn {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Records a request just sent.
    fn sent(&mut self, stats: &Stats, pending: Pending) {
        if pending.counted {
            add(&stats.counted_in_flight, 1);
        }
        self.pending.push_back(pending);
    }

    /// The request `id` was answered.
    fn take(&mut self, stats: &Stats, id: u64) -> Option<Pending> {
        let at = self.pending.iter().position(|p| p.id == id)?;
        let p = self.pending.remove(at)?;
        if p.counted {
            stats.counted_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        Some(p)
    }

    /// The socket is done: what is still pending will not be answered.
    fn abandon(&mut self, stats: &Stats) {
        let counted = self.pending.iter().filter(|p| p.counted).count() as u64;
        stats
            .counted_in_flight
            .fetch_sub(counted, Ordering::Relaxed);
        add(&stats.unanswered, self.pending.len() as u64);
        self.pending.clear();
    }

    fn publishes_in_flight(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.kind == Kind::Publish)
            .count()
    }
}

/// Counts the end of a publisher for the driver's waits, if its prefill
/// or its traffic was not counted yet.
fn settle_publisher(sh: &Shared, publisher: bool, prefill_counted: bool, done_counted: bool) {
    if !publisher {
        return;
    }
    if !prefill_counted && sh.args.prefill > 0 {
        add(&sh.stats.prefill_done, 1);
    }
    if !done_counted {
        add(&sh.stats.publishers_done, 1);
    }
}

/// Attaches `run`; answers the session's reference and heartbeat interval.
async fn attach(
    sh: &Shared,
    conn: &mut Conn,
    run: &str,
    instance: &str,
    caps: &[Capability],
) -> Result<(SessionRef, u64), String> {
    let id = conn.id();
    let sent = Instant::now();
    let frame = wire::attach(id, run, instance, caps, false, 0)?;
    conn.ws
        .send(frame)
        .await
        .map_err(|_| "socket_closed".to_owned())?;
    let answer = timeout(ATTACH_TIMEOUT, async {
        while let Some(message) = conn.ws.next().await {
            let Ok(Message::Text(text)) = message else {
                if message.is_err() {
                    break;
                }
                continue;
            };
            match wire::classify(text.as_str()) {
                Incoming::Reply { id: Some(got) } if got == id => {
                    return wire::attached(text.as_str())
                        .ok_or_else(|| "attach:bad_reply".to_owned());
                }
                Incoming::Error {
                    id: Some(got),
                    code,
                } if got == id => {
                    return Err(format!("attach:{code}"));
                }
                _ => {}
            }
        }
        Err("socket_closed".to_owned())
    })
    .await
    .map_err(|_| "attach:timeout".to_owned())??;
    sh.stats.rtt(Kind::Attach).since(sent);
    let interval = answer.heartbeat_interval_ms;
    Ok((SessionRef::new(answer)?, interval))
}

/// Drives runtime socket `index` through every phase.
pub(crate) async fn run_socket(sh: Arc<Shared>, index: usize) {
    let publisher = index < sh.publishers;
    let mut phase_rx = sh.phase.clone();
    let permit = sh.connect_gate.acquire().await;
    let started = Instant::now();
    let ws = match net::connect(
        sh.target,
        &sh.sources,
        &sh.runtime_url,
        sh.runtime_token(index),
        net::ws_config(4 * 1024),
        ATTACH_TIMEOUT,
    )
    .await
    {
        Ok(ws) => ws,
        Err(code) => {
            sh.stats.error(&code);
            add(&sh.stats.runtime_sockets_settled, 1);
            settle_publisher(&sh, publisher, false, false);
            return;
        }
    };
    sh.stats.connect.since(started);
    add(&sh.stats.runtime_sockets, 1);
    let mut conn = Conn {
        ws,
        next_id: 0,
        pending: VecDeque::new(),
    };

    // Attach the main run, then the sub-runs.
    let per_socket = sh.args.sessions_per_socket.max(1);
    let here = per_socket.min(sh.args.sessions - index * per_socket);
    let instance = format!("{}inst-{index}", sh.prefix);
    let mut sessions = Vec::with_capacity(here);
    let mut interval_ms = 10_000;
    for sub in 0..here {
        let caps: &[Capability] = if sub == 0 && here > 1 {
            &[Capability::SubtasksRun]
        } else {
            &[]
        };
        let run = sh.run_id(index, sub);
        match attach(&sh, &mut conn, &run, &instance, caps).await {
            Ok((session, interval)) => {
                add(&sh.stats.sessions_attached, 1);
                interval_ms = interval;
                sessions.push(session);
            }
            Err(code) => {
                sh.stats.error(&code);
                if sub == 0 || code == "socket_closed" {
                    break;
                }
            }
        }
    }
    drop(permit);
    add(&sh.stats.runtime_sockets_settled, 1);
    if sessions.is_empty() || sessions[0].run.as_str() != sh.run_id(index, 0) {
        settle_publisher(&sh, publisher, false, false);
        let _ = conn.ws.close(None).await;
        return;
    }

    // Heartbeats at the interval, at a phase spread over it by index.
    let period = Duration::from_millis(sh.args.heartbeat_ms.unwrap_or(interval_ms).max(1));
    let offset = Duration::from_micros(
        (index as u64).wrapping_mul(7_919_993) % (period.as_micros() as u64).max(1),
    );
    let mut beat = interval_at(Instant::now() + offset, period);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let tick = match sh.args.rate {
        Rate::PerSec(r) => Duration::from_secs_f64(1.0 / r),
        _ => Duration::from_secs(3600),
    };
    let mut pace = interval_at(Instant::now() + tick, tick);
    pace.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let window = match sh.args.rate {
        Rate::PerSec(_) => sh.args.window.max(RATE_WINDOW),
        _ => sh.args.window.max(1),
    };

    let mut mode = Mode::Idle;
    let mut prefill_counted = false;
    let mut seq: u64 = 1;
    let mut sent_batches: u64 = 0;
    let mut scratch = PublishScratch::default();
    let mut closing: Option<Instant> = None;
    let mut phase = *phase_rx.borrow_and_update();
    let stats = &sh.stats;
    let main = sessions[0].clone();
    let batch = sh.args.batch;

    loop {
        // Follow the phase.
        if publisher {
            mode = match (mode, phase) {
                (Mode::Idle, Phase::Prefill) if sh.args.prefill > 0 && !prefill_counted => {
                    Mode::Prefill(sh.args.prefill)
                }
                (Mode::Idle | Mode::Prefill(_), Phase::Traffic)
                    if sh.args.rate != Rate::Off && sh.args.count != Some(0) =>
                {
                    Mode::Publish
                }
                (Mode::Idle | Mode::Prefill(_) | Mode::Publish, p) if p >= Phase::Stop => {
                    Mode::Stopping
                }
                (m, _) => m,
            };
        }
        if phase >= Phase::Close {
            // Requests already sent (a heartbeat of the last tick) get
            // their answers before the socket closes, or a grace period
            // passes: a request counts as unanswered only if the server
            // really left it so, however late the tick fell.
            let deadline = *closing.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
            if conn.pending.is_empty() || Instant::now() >= deadline {
                break;
            }
        }
        // Send what the window allows.
        let mut failed = false;
        loop {
            let (count, counted) = match mode {
                Mode::Prefill(left) if left > 0 => (left.min(batch as u64) as usize, false),
                Mode::Publish if sh.args.rate == Rate::Max => (batch, true),
                _ => break,
            };
            if conn.publishes_in_flight() >= window {
                break;
            }
            if !send_publish(
                &sh,
                &mut conn,
                &main,
                &mut scratch,
                &mut seq,
                count,
                counted,
            )
            .await
            {
                failed = true;
                break;
            }
            mode = match mode {
                Mode::Prefill(left) => Mode::Prefill(left - count as u64),
                m => {
                    sent_batches += 1;
                    if sh.args.count.is_some_and(|c| sent_batches >= c) {
                        Mode::Stopping
                    } else {
                        m
                    }
                }
            };
        }
        if failed {
            stats.error("socket_closed");
            break;
        }
        if mode == Mode::Prefill(0) && conn.publishes_in_flight() == 0 {
            add(&stats.prefill_done, 1);
            prefill_counted = true;
            mode = Mode::Idle;
        }
        if mode == Mode::Stopping && conn.publishes_in_flight() == 0 {
            add(&stats.publishers_done, 1);
            mode = Mode::Done;
        }

        let rate_publishing = mode == Mode::Publish && matches!(sh.args.rate, Rate::PerSec(_));
        tokio::select! {
            changed = phase_rx.changed() => {
                phase = if changed.is_ok() { *phase_rx.borrow_and_update() } else { Phase::Close };
            }
            message = conn.ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        stats.error("socket_closed");
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                match wire::classify(text.as_str()) {
                    Incoming::Reply { id: Some(id) } => {
                        if let Some(p) = conn.take(stats, id) {
                            if p.counted {
                                stats.rtt(p.kind).since(p.sent);
                            }
                            if p.kind == Kind::Publish {
                                add(&sh.accepted[index], p.events as u64);
                                if p.counted {
                                    add(&stats.batches_accepted, 1);
                                    add(&stats.events_accepted, p.events as u64);
                                }
                            }
                        }
                    }
                    Incoming::Error { id, code } => {
                        let p = id.and_then(|id| conn.take(stats, id));
                        if p.as_ref().is_some_and(|p| p.kind == Kind::Publish) {
                            add(&stats.batches_refused, 1);
                        }
                        stats.error(&code);
                    }
                    Incoming::Push { kind } => stats.error(&format!("push:{kind}")),
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {}
            _ = beat.tick(), if closing.is_none() => {
                let now = Instant::now();
                // The phase now, not as this loop last saw it: a tick
                // taken just after the stop is not traffic.
                let counted = *phase_rx.borrow() == Phase::Traffic;
                for s in &sessions {
                    let id = conn.id();
                    conn.sent(stats, Pending { id, kind: Kind::Heartbeat, sent: now, events: 0, counted });
                    if conn.ws.feed(wire::heartbeat(id, s)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || conn.ws.flush().await.is_err() {
                    stats.error("socket_closed");
                    break;
                }
            }
            _ = pace.tick(), if rate_publishing => {
                if conn.publishes_in_flight() >= window {
                    add(&stats.publishes_skipped, 1);
                } else if !send_publish(&sh, &mut conn, &main, &mut scratch, &mut seq, batch, true).await {
                    stats.error("socket_closed");
                    break;
                } else {
                    sent_batches += 1;
                    if sh.args.count.is_some_and(|c| sent_batches >= c) {
                        mode = Mode::Stopping;
                    }
                }
            }
        }
    }

    conn.abandon(stats);
    settle_publisher(&sh, publisher, prefill_counted, mode == Mode::Done);
    let _ = timeout(Duration::from_secs(5), async {
        let _ = conn.ws.close(None).await;
        while let Some(Ok(_)) = conn.ws.next().await {}
    })
    .await;
}

/// Sends one publish of `count` events; `false` if the socket is gone.
async fn send_publish(
    sh: &Shared,
    conn: &mut Conn,
    session: &SessionRef,
    scratch: &mut PublishScratch,
    seq: &mut u64,
    count: usize,
    counted: bool,
) -> bool {
    let id = conn.id();
    let frame = wire::publish(
        scratch,
        id,
        session,
        *seq,
        count,
        sh.args.event_bytes,
        sh.now_us(),
    );
    *seq += count as u64;
    conn.sent(
        &sh.stats,
        Pending {
            id,
            kind: Kind::Publish,
            sent: Instant::now(),
            events: count as u32,
            counted,
        },
    );
    conn.ws.send(frame).await.is_ok()
}
