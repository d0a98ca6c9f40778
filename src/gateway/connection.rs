//! One WebSocket: a reader that turns messages into answers, and a writer
//! fed by a bounded queue.
//!
//! The reader applies requests in arrival order (see `dispatch`) and keeps
//! the ones waiting on the store in a `FuturesUnordered`, so many requests
//! are in flight at once and replies go out as they complete. Everything the
//! socket sends — replies, errors, pushes from other tasks — passes through
//! the one queue, and only the writer task touches the sink. When the queue
//! is full, or the socket's byte budget is spent (replies being built count
//! at their worst case, queued frames at their size), the reader stops
//! reading: a client that does not read its replies slows only itself and
//! holds a bounded number of bytes. A runtime socket that holds no session for the idle
//! timeout is closed (1008): it costs a place and a task and does nothing.
//! Must not know protocol rules or leases: it moves frames, asks the
//! registry how many sessions the socket holds, and tells it when the
//! socket is gone.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::sync::mpsc;

use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::budget::Budget;
use super::cmd::{ConnCtx, Endpoint};
use super::dispatch::{self, Answer};
use super::follow::Following;
use super::push;
use super::state::{Outbox, Outgoing, Shared};
use crate::auth::Grant;
use crate::protocol::{CommandError, ErrorCode, Frame, encode_error};

pub(crate) type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Most frames the writer hands to the socket before one flush.
const WRITE_BATCH: usize = 64;

/// Serves one upgraded socket until either side ends it.
pub(crate) async fn serve(shared: Arc<Shared>, socket: Socket, endpoint: Endpoint, grant: Grant) {
    let (sink, mut stream) = socket.split();
    let (queue, rx) = mpsc::channel(shared.config.limits.outbound_queue);
    let budget = Arc::new(Budget::new(shared.config.limits.max_socket_buffer_bytes));
    let kill = tokio_util::sync::CancellationToken::new();
    let (lost_runs, mut lost_rx) = mpsc::unbounded_channel();
    let id = shared.conns.register(Outbox {
        queue: queue.clone(),
        kill: kill.clone(),
        lost_runs,
        budget: budget.clone(),
    });
    shared.metrics.connection_opened(endpoint.label());
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        shared.config.limits.write_timeout,
        budget.clone(),
        kill.clone(),
    ));

    let limits = &shared.config.limits;
    // A socket is as good as the token it opened with: it closes when the
    // token expires (the client reconnects with a fresh one; its sessions
    // wait, detached, for their leases).
    let token_expires = shared.clock.instant(grant.expires_at);
    let mut ctx = ConnCtx::new(id, endpoint, grant, shared.clone());
    // Runtime sockets only: a viewer socket following nothing is a
    // dashboard with no run selected, which is fine.
    let idle_timeout = limits.idle_timeout;
    let mut idle_check = (endpoint == Endpoint::Runtime).then(|| Instant::now() + idle_timeout);
    // Subscriptions counted in the metrics for this socket so far.
    let mut counted_subscriptions = 0;
    let max_inflight = shared.config.limits.max_inflight_per_socket;
    let mut inflight: FuturesUnordered<BoxFuture<'static, (Frame, usize)>> =
        FuturesUnordered::new();
    // Once draining: when to close, if nothing is in flight by then.
    let mut close_at: Option<Instant> = None;
    let close_reason = loop {
        let close_timer = async {
            match close_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let idle_timer = async {
            match idle_check {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = kill.cancelled() => break Some((CloseCode::Policy, "not reading")),
            _ = sleep_until(token_expires) => {
                shared.metrics.refused("token_expired");
                break Some((CloseCode::Policy, "token expired"));
            }
            _ = idle_timer => {
                // Checked once per timeout rather than on every change: a
                // socket that held a session at any time since the last
                // check gets another full period, so none is closed sooner
                // than the timeout after losing its last session (and none
                // later than twice that).
                let bound = shared.sessions.with(|r| r.sessions_on(id));
                if bound == 0 && !std::mem::take(&mut ctx.bound_session) {
                    tracing::debug!(conn = id.0, "no session within the idle timeout; closing");
                    shared.metrics.refused("idle_timeout");
                    break Some((CloseCode::Policy, "no session on this socket within the idle timeout"));
                }
                ctx.bound_session = bound > 0;
                idle_check = Some(Instant::now() + idle_timeout);
            }
            // Before the subscriptions: a stream of a run whose session
            // this socket lost sends nothing more.
            Some(run) = lost_rx.recv(), if endpoint == Endpoint::Runtime => {
                ctx.following.remove(&run);
                count_subscriptions(&shared, &ctx.following, &mut counted_subscriptions);
            }
            Some((frame, reserved)) = inflight.next(), if !inflight.is_empty() => {
                // The frame is charged before its reservation is returned,
                // so the budget never shows room it does not have.
                let sent = enqueue(&queue, &budget, frame.into_bytes()).await;
                budget.release(reserved);
                if !sent {
                    break None;
                }
            }
            // Wakes the loop when the writer frees room; reading resumes.
            _ = budget.room(), if !budget.has_room() => {}
            _ = shared.draining.cancelled(), if !ctx.draining => {
                ctx.draining = true;
                let frame = push::gateway_draining(shared.config.reconnect_after);
                if !enqueue(&queue, &budget, frame.into_bytes()).await {
                    break None;
                }
                close_at = Some(Instant::now() + shared.config.reconnect_after);
            }
            _ = close_timer, if inflight.is_empty() => break Some((CloseCode::Away, "draining")),
            message = stream.next(), if inflight.len() < max_inflight && budget.has_room() => {
                let answer = match message {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Text(text))) => dispatch::handle_text(&mut ctx, text.as_str()),
                    Some(Ok(Message::Binary(_))) => {
                        Answer::Now(encode_error(None, &CommandError::bad_frame("binary frames are not part of the protocol; send JSON as text")))
                    }
                    // tungstenite answers pings itself; pongs need nothing.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::debug!(conn = id.0, error = %e, "message over the size limit");
                        let err = CommandError::new(ErrorCode::PayloadTooLarge, format!("{e}; the limit is {} bytes", shared.config.limits.max_frame_bytes));
                        let _ = enqueue(&queue, &budget, encode_error(None, &err).into_bytes()).await;
                        break Some((CloseCode::Size, "message too large"));
                    }
                    Some(Err(WsError::Utf8(_))) => {
                        let _ = enqueue(&queue, &budget, encode_error(None, &CommandError::bad_frame("text frame is not valid UTF-8")).into_bytes()).await;
                        break Some((CloseCode::Invalid, "invalid UTF-8"));
                    }
                    Some(Err(WsError::Protocol(e))) if e != ProtocolError::ResetWithoutClosingHandshake => {
                        // RFC 6455 §7.4.1: a framing violation (reserved bits
                        // or opcodes, an unmasked or stray frame) fails the
                        // connection with 1002, so the peer learns why.
                        tracing::debug!(conn = id.0, error = %e, "WebSocket protocol violation");
                        let _ = enqueue(&queue, &budget, encode_error(None, &CommandError::bad_frame(format!("WebSocket protocol violation: {e}"))).into_bytes()).await;
                        break Some((CloseCode::Protocol, "protocol error"));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(conn = id.0, error = %e, "socket read failed");
                        break None;
                    }
                };
                count_subscriptions(&shared, &ctx.following, &mut counted_subscriptions);
                match answer {
                    Answer::Now(frame) => {
                        if !enqueue(&queue, &budget, frame.into_bytes()).await {
                            break None;
                        }
                    }
                    Answer::Later(pending, worst) => {
                        // Charged now, while the store builds it.
                        budget.charge(worst);
                        inflight.push(pending.map(move |frame| (frame, worst)).boxed());
                    }
                }
            }
            // After the reader: a stream that always has more must not keep
            // this socket's requests (heartbeats, cancels) waiting.
            Some((_run, sent)) = ctx.following.next(), if ctx.following.is_waiting() && budget.has_room() => {
                if sent.gap.is_some() {
                    shared.metrics.gap_sent();
                }
                // Waiting for room here is the backpressure: the stream keeps
                // its events in the ring meanwhile, and a subscriber that falls
                // too far behind gets a gap rather than more memory.
                let mut writer_gone = false;
                for frame in sent.frames {
                    if !enqueue(&queue, &budget, frame).await {
                        writer_gone = true;
                        break;
                    }
                }
                count_subscriptions(&shared, &ctx.following, &mut counted_subscriptions);
                if writer_gone {
                    break None;
                }
            }
        }
    };

    // The socket is done: its sessions live on until their leases run out.
    let detached = shared.sessions.with(|r| r.connection_closed(id));
    if !detached.is_empty() {
        tracing::info!(
            conn = id.0,
            runs = detached.len(),
            "socket closed; sessions detached"
        );
    }
    shared.conns.remove(id);
    shared.metrics.connection_closed(endpoint.label());
    shared
        .metrics
        .subscriptions("websocket", -counted_subscriptions);
    drop(ctx);
    if let Some((code, reason)) = close_reason {
        let _ = queue.try_send(Outgoing::Close(code.into(), reason));
    }
    drop(queue);
    let _ = writer.await;
}

/// Queues `frame` for the writer, charged to the socket's budget until the
/// writer hands it to the socket. False when the writer is gone.
async fn enqueue(queue: &mpsc::Sender<Outgoing>, budget: &Budget, frame: bytes::Bytes) -> bool {
    let bytes = frame.len();
    budget.charge(bytes);
    if queue.send(Outgoing::Frame(frame)).await.is_err() {
        budget.release(bytes);
        return false;
    }
    true
}

/// Moves the subscriptions gauge by what changed since `counted`.
fn count_subscriptions(shared: &Shared, following: &Following, counted: &mut i64) {
    let now = following.len() as i64;
    if now != *counted {
        shared.metrics.subscriptions("websocket", now - *counted);
        *counted = now;
    }
}

/// Sends queued frames, several per flush, until the queue closes, the
/// socket fails, or the peer stops taking data for `stall` (a dead or
/// stuck peer would otherwise hold its queued frames, and the stream
/// batches they share, forever).
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    stall: Duration,
    budget: Arc<Budget>,
    gone: tokio_util::sync::CancellationToken,
) {
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(item) = next.take() {
            let (message, charged) = match item {
                Outgoing::Frame(bytes) => {
                    let charged = bytes.len();
                    (Message::Text(text(bytes)), charged)
                }
                Outgoing::Close(code, reason) => {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: Utf8Bytes::from_static(reason),
                    };
                    let _ = timeout(stall, sink.send(Message::Close(Some(frame)))).await;
                    break 'outer;
                }
            };
            match timeout(stall, sink.feed(message)).await {
                Ok(Ok(())) => budget.release(charged),
                Ok(Err(_)) => break 'outer,
                Err(_) => {
                    tracing::info!("peer took no data for {stall:?}; closing its socket");
                    break 'outer;
                }
            }
            fed += 1;
            if fed < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        match timeout(stall, sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::info!("peer took no data for {stall:?}; closing its socket");
                break;
            }
        }
    }
    // Dropping the receiver makes the reader's next queue send fail, and
    // the cancel wakes a reader paused on a spent budget: either ends the
    // connection task too.
    drop(rx);
    gone.cancel();
    let _ = timeout(stall, sink.close()).await;
}

/// Turns frame bytes into a text message without re-checking UTF-8.
fn text(bytes: bytes::Bytes) -> Utf8Bytes {
    debug_assert!(std::str::from_utf8(&bytes).is_ok());
    // SAFETY: every `Outgoing::Frame` is built by serde_json or by splicing
    // together JSON texts that were already `str`s (protocol::envelope and
    // the stream frames), so it is valid UTF-8. Skipping the check matters
    // for fan-out, where one frame goes to many sockets.
    unsafe { Utf8Bytes::from_bytes_unchecked(bytes) }
}
