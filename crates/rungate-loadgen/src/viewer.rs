//! One viewer socket of the load: connect to `/v1/stream`, wait for the
//! resume storm, `stream.resume` its runs, then count what arrives.
//!
//! For each followed run it checks that offsets come contiguous (no gap
//! unannounced, no duplicate), counts events, gaps and missed events,
//! records publish-to-viewer latency for live events (those at or past the
//! head the resume reply named) from the send time in the first event of
//! each frame, and records how long the replay up to that head took.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use super::net;
use super::stats::{Kind, add};
use super::wire::{self, Incoming};
use super::{Phase, Shared};

/// One followed run.
struct Follow {
    /// Index of the publishing run.
    index: usize,
    run: String,
    resume_id: u64,
    sent: Instant,
    answered: bool,
    /// The next offset expected.
    expected: Option<u64>,
    /// The head when the resume was answered; events before it are replay.
    head: Option<u64>,
    caught_up: bool,
}

/// Runs each viewer follows: `--follow`, at most the publishing runs
/// (or one, with no publisher) and the gateway's default 256 per socket.
pub(crate) fn follows_per_viewer(sh: &Shared) -> usize {
    let pool = sh.publishers.max(1);
    match sh.args.follow {
        0 => pool,
        f => f.min(pool),
    }
    .min(256)
}

/// The publishing runs viewer `j` follows.
fn runs_of(sh: &Shared, j: usize) -> Vec<usize> {
    let pool = sh.publishers.max(1);
    let n = follows_per_viewer(sh);
    (0..n).map(|k| (j * n + k) % pool).collect()
}

/// Drives viewer socket `j` through every phase.
pub(crate) async fn run_socket(sh: Arc<Shared>, j: usize) {
    let stats = &sh.stats;
    let mut phase_rx = sh.phase.clone();
    let permit = sh.connect_gate.acquire().await;
    let started = Instant::now();
    let connected = net::connect(
        sh.viewer_target,
        sh.viewer_sources(),
        &sh.viewer_url,
        sh.viewer_token(j),
        net::ws_config(8 * 1024),
        Duration::from_secs(60),
    )
    .await;
    drop(permit);
    add(&stats.viewer_sockets_settled, 1);
    let mut ws = match connected {
        Ok(ws) => ws,
        Err(code) => {
            stats.error(&code);
            return;
        }
    };
    stats.connect.since(started);
    add(&stats.viewer_sockets, 1);

    // Wait for the storm.
    while *phase_rx.borrow_and_update() < Phase::Resume {
        if phase_rx.changed().await.is_err() {
            return;
        }
    }
    let mut follows: Vec<Follow> = Vec::new();
    let mut failed = false;
    for (k, index) in runs_of(&sh, j).into_iter().enumerate() {
        let run = sh.run_id(index, 0);
        let resume_id = k as u64 + 1;
        let resume = match wire::resume(resume_id, &run, sh.args.from.offset()) {
            Ok(resume) => resume,
            Err(code) => {
                stats.error(&code);
                continue;
            }
        };
        if ws.feed(resume).await.is_err() {
            failed = true;
            break;
        }
        follows.push(Follow {
            index,
            run,
            resume_id,
            sent: Instant::now(),
            answered: false,
            expected: None,
            head: None,
            caught_up: false,
        });
    }
    if failed || ws.flush().await.is_err() {
        stats.error("socket_closed");
        add(&stats.viewers_failed, 1);
        return;
    }
    let mut unanswered = follows.len();

    loop {
        tokio::select! {
            changed = phase_rx.changed() => {
                if changed.is_err() || *phase_rx.borrow_and_update() >= Phase::Close {
                    break;
                }
            }
            message = ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        stats.error("socket_closed");
                        if unanswered > 0 {
                            add(&stats.viewers_failed, 1);
                        }
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                match wire::classify(text.as_str()) {
                    Incoming::Events { run, first, last, t_us } => {
                        let Some(f) = follows.iter_mut().find(|f| f.run == run) else {
                            stats.error("events_for_unknown_run");
                            continue;
                        };
                        let n = last.saturating_sub(first) + 1;
                        if f.expected.is_some_and(|e| e != first) {
                            add(&stats.sequence_errors, 1);
                        }
                        f.expected = Some(last + 1);
                        add(&stats.frames_delivered, 1);
                        add(&stats.events_delivered, n);
                        let now = sh.now_us();
                        stats.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                        if let (Some(t), Some(head)) = (t_us, f.head) {
                            let live = (last + 1).saturating_sub(first.max(head));
                            stats.publish_to_viewer.record_n(now.saturating_sub(t), live);
                        }
                        check_caught_up(&sh, f);
                    }
                    Incoming::Reply { id: Some(id) } => {
                        let Some(f) = follows.iter_mut().find(|f| f.resume_id == id && !f.answered) else {
                            continue;
                        };
                        f.answered = true;
                        unanswered -= 1;
                        stats.rtt(Kind::Resume).since(f.sent);
                        let reply: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                        let start = reply["payload"]["startOffset"].as_u64().unwrap_or(0);
                        let head = reply["payload"]["nextOffset"].as_u64().unwrap_or(start);
                        f.head = Some(head);
                        if f.expected.is_none() {
                            f.expected = Some(start);
                        }
                        add(&stats.follows_started, 1);
                        add(&stats.start_offsets, start);
                        add(&sh.followers[f.index], 1);
                        check_caught_up(&sh, f);
                        if unanswered == 0 {
                            add(&stats.viewers_ready, 1);
                        }
                    }
                    Incoming::Error { id, code } => {
                        if let Some(f) = id.and_then(|id| follows.iter_mut().find(|f| f.resume_id == id && !f.answered)) {
                            f.answered = true;
                            unanswered -= 1;
                            stats.error(&format!("resume:{code}"));
                            if unanswered == 0 {
                                add(&stats.viewers_ready, 1);
                            }
                        } else {
                            stats.error(&code);
                        }
                    }
                    Incoming::Gap { run, from, to } => {
                        add(&stats.gaps, 1);
                        add(&stats.events_missed, to.saturating_sub(from) + 1);
                        if let Some(f) = follows.iter_mut().find(|f| f.run == run) {
                            f.expected = Some(to + 1);
                            check_caught_up(&sh, f);
                        }
                    }
                    Incoming::Push { kind } => stats.error(&format!("push:{kind}")),
                    _ => {}
                }
            }
        }
    }
    let _ = timeout(Duration::from_secs(5), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Counts a follow as caught up once it has everything up to the head its
/// resume reply named; records how long the replay took when there was one.
fn check_caught_up(sh: &Shared, f: &mut Follow) {
    let (Some(head), Some(next)) = (f.head, f.expected) else {
        return;
    };
    if f.caught_up || next < head {
        return;
    }
    f.caught_up = true;
    add(&sh.stats.follows_caught_up, 1);
    if sh.args.from.offset().is_some() {
        sh.stats.caught_up.since(f.sent);
        sh.last_caught_up_us
            .fetch_max(sh.now_us(), Ordering::Relaxed);
    }
}
