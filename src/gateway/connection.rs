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

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::future::poll_fn;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep, sleep, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::cmd::{ConnCtx, Endpoint};
use super::dispatch::{self, Answer};
use super::follow::Following;
use super::outbox::{Offer, Outbox};
use super::push;
use super::read_ahead::ReadAhead;
use super::state::{Outgoing, Shared};
use crate::auth::Grant;
use crate::protocol::{CommandError, ErrorCode, Frame, encode_error};

pub(crate) type Socket = WebSocketStream<ReadAhead<TokioIo<Upgraded>>>;

/// Most frames the writer hands to the socket before one flush.
const WRITE_BATCH: usize = 64;

/// Replies the store is still building, each with the bytes it was charged.
/// Made on the first such request: most sockets only ever wait on a few,
/// and an idle one on none.
type Inflight = Option<FuturesUnordered<BoxFuture<'static, (Frame, usize)>>>;

/// Serves one upgraded socket until either side ends it; `hold` (its
/// admission) is dropped when it does.
///
/// The setup runs here, before the future exists, and the future keeps
/// only what the socket's life needs: an async fn would keep its
/// arguments (the socket itself, ~350 bytes, already split) beside its
/// locals for as long as it runs, on every one of thousands of idle
/// sockets.
pub(crate) fn serve(
    shared: Arc<Shared>,
    socket: Socket,
    endpoint: Endpoint,
    grant: Grant,
    hold: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    let limits = &shared.config.limits;
    let outbox = Outbox::new(limits.outbound_queue, limits.max_socket_buffer_bytes);
    let id = shared.conns.register(outbox.clone());
    shared.metrics.connection_opened(endpoint.label());
    let writer = tokio::spawn(write_loop(sink, outbox.clone(), limits.write_timeout));
    // A socket is as good as the token it opened with: it closes when the
    // token expires (the client reconnects with a fresh one; its sessions
    // wait, detached, for their leases).
    let token_expires = shared.clock.instant(grant.expires_at);
    let ctx = ConnCtx::new(id, endpoint, grant, shared.clone());
    read_loop(shared, stream, outbox, writer, ctx, token_expires, hold)
}

/// The connection task proper: reads, answers, follows, until the socket
/// or the gateway ends it, then hands the writer its last frame.
// Not an async fn: see `serve`.
#[allow(clippy::manual_async_fn)]
fn read_loop(
    shared: Arc<Shared>,
    mut stream: SplitStream<Socket>,
    outbox: Arc<Outbox>,
    writer: JoinHandle<()>,
    mut ctx: ConnCtx,
    token_expires: Instant,
    hold: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        // Only what changes is kept in locals: a copy of something `ctx` or
        // `shared` already holds (the socket's id, its limits) would be held
        // again, across every wait, by every socket's task (BENCHMARKS.md,
        // idle sessions). The same goes for what one turn of the loop works
        // out before it waits (the signals, the next deadline): scoped to
        // a block, so it is not kept across the wait.
        let limits = &shared.config.limits;
        // Runtime sockets only: a viewer socket following nothing is a
        // dashboard with no run selected, which is fine.
        let mut idle_check =
            (ctx.endpoint == Endpoint::Runtime).then(|| Instant::now() + limits.idle_timeout);
        // Subscriptions counted in the metrics for this socket so far.
        let mut counted_subscriptions = 0;
        let mut inflight: Inflight = None;
        // Once draining: when to close, if nothing is in flight by then.
        let mut close_at: Option<Instant> = None;
        // One timer for the earliest of the deadlines above, moved only when
        // that changes (not made afresh for every frame).
        let mut timer: Pin<&mut Sleep> = std::pin::pin!(sleep_until(token_expires));
        let close_reason = loop {
            // What other tasks asked, before waiting: a wait for queue room may
            // have used up the wake-up that came with it.
            {
                let signals = outbox.take_signals();
                if signals.killed {
                    break Some((CloseCode::Policy, "not reading"));
                }
                if !signals.lost_runs.is_empty() {
                    // A stream of a run whose session this socket lost sends
                    // nothing more.
                    for run in &signals.lost_runs {
                        ctx.following.remove(run);
                    }
                    count_subscriptions(&shared, &ctx.following, &mut counted_subscriptions);
                }
            }
            let nothing_inflight = inflight.as_ref().is_none_or(|f| f.is_empty());
            {
                let due = [idle_check, close_at.filter(|_| nothing_inflight)]
                    .into_iter()
                    .flatten()
                    .fold(token_expires, Instant::min);
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
            }
            tokio::select! {
                biased;
                _ = outbox.signalled() => {}
                _ = timer.as_mut() => {
                    let now = Instant::now();
                    if now >= token_expires {
                        shared.metrics.refused("token_expired");
                        break Some((CloseCode::Policy, "token expired"));
                    }
                    if let Some(at) = idle_check
                        && now >= at
                    {
                        // Checked once per timeout rather than on every change: a
                        // socket that held a session at any time since the last
                        // check gets another full period, so none is closed sooner
                        // than the timeout after losing its last session (and none
                        // later than twice that).
                        let bound = shared.sessions.with(|r| r.sessions_on(ctx.id));
                        if bound == 0 && !std::mem::take(&mut ctx.bound_session) {
                            tracing::debug!(conn = ctx.id.0, "no session within the idle timeout; closing");
                            shared.metrics.refused("idle_timeout");
                            break Some((CloseCode::Policy, "no session on this socket within the idle timeout"));
                        }
                        ctx.bound_session = bound > 0;
                        idle_check = Some(Instant::now() + shared.config.limits.idle_timeout);
                    }
                    if close_at.is_some_and(|at| now >= at) && nothing_inflight {
                        break Some((CloseCode::Away, "draining"));
                    }
                }
                Some((frame, reserved)) = next_reply(&mut inflight), if !nothing_inflight => {
                    if inflight.as_ref().is_some_and(|f| f.is_empty()) {
                        // Nothing more in flight: an idle socket keeps no set.
                        inflight = None;
                    }
                    // The frame is charged before its reservation is returned,
                    // so the budget never shows room it does not have.
                    let sent = enqueue(&outbox, frame.into_bytes()).await;
                    outbox.release(reserved);
                    if !sent {
                        break None;
                    }
                }
                _ = shared.draining.cancelled(), if !ctx.draining => {
                    ctx.draining = true;
                    let frame = push::gateway_draining(shared.config.reconnect_after);
                    if !enqueue(&outbox, frame.into_bytes()).await {
                        break None;
                    }
                    close_at = Some(Instant::now() + shared.config.reconnect_after);
                }
                message = stream.next(), if inflight.as_ref().map_or(0, |f| f.len()) < shared.config.limits.max_inflight_per_socket && outbox.budget().has_room() => {
                    let answer = match message {
                        None | Some(Ok(Message::Close(_))) => break None,
                        Some(Ok(Message::Text(text))) => dispatch::handle_text(&mut ctx, text.as_str()),
                        Some(Ok(Message::Binary(_))) => {
                            Answer::Now(encode_error(None, &CommandError::bad_frame("binary frames are not part of the protocol; send JSON as text")))
                        }
                        // tungstenite answers pings itself; pongs need nothing.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Err(WsError::Capacity(e))) => {
                            tracing::debug!(conn = ctx.id.0, error = %e, "message over the size limit");
                            let err = CommandError::new(ErrorCode::PayloadTooLarge, format!("{e}; the limit is {} bytes", shared.config.limits.max_frame_bytes));
                            let _ = enqueue(&outbox, encode_error(None, &err).into_bytes()).await;
                            break Some((CloseCode::Size, "message too large"));
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            let _ = enqueue(&outbox, encode_error(None, &CommandError::bad_frame("text frame is not valid UTF-8")).into_bytes()).await;
                            break Some((CloseCode::Invalid, "invalid UTF-8"));
                        }
                        Some(Err(WsError::Protocol(e))) if e != ProtocolError::ResetWithoutClosingHandshake => {
                            // RFC 6455 §7.4.1: a framing violation (reserved bits
                            // or opcodes, an unmasked or stray frame) fails the
                            // connection with 1002, so the peer learns why.
                            tracing::debug!(conn = ctx.id.0, error = %e, "WebSocket protocol violation");
                            let _ = enqueue(&outbox, encode_error(None, &CommandError::bad_frame(format!("WebSocket protocol violation: {e}"))).into_bytes()).await;
                            break Some((CloseCode::Protocol, "protocol error"));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(conn = ctx.id.0, error = %e, "socket read failed");
                            break None;
                        }
                    };
                    count_subscriptions(&shared, &ctx.following, &mut counted_subscriptions);
                    match answer {
                        Answer::Now(frame) => {
                            if !enqueue(&outbox, frame.into_bytes()).await {
                                break None;
                            }
                        }
                        Answer::Later(pending, worst) => {
                            // Charged now, while the store builds it.
                            outbox.budget().charge(worst);
                            inflight
                                .get_or_insert_with(FuturesUnordered::new)
                                .push(pending.map(move |frame| (frame, worst)).boxed());
                        }
                    }
                }
                // After the reader: a stream that always has more must not keep
                // this socket's requests (heartbeats, cancels) waiting.
                Some((_run, sent)) = ctx.following.next(), if ctx.following.is_waiting() && outbox.budget().has_room() => {
                    if sent.gap.is_some() {
                        shared.metrics.gap_sent();
                    }
                    // Waiting for room here is the backpressure: the stream keeps
                    // its events in the ring meanwhile, and a subscriber that falls
                    // too far behind gets a gap rather than more memory.
                    let mut writer_gone = false;
                    for frame in sent.frames {
                        if !enqueue(&outbox, frame).await {
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
        let (id, endpoint) = (ctx.id, ctx.endpoint);
        let detached = shared.sessions.with(|r| r.connection_closed(id));
        // Per socket, so `debug` like the other per-session lines: a
        // deploy that drops 10,000 sockets would write 10,000 lines.
        if !detached.is_empty() {
            tracing::debug!(
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
            let _ = outbox.try_push(Outgoing::Close(code.into(), reason));
        }
        outbox.close();
        let _ = writer.await;
        drop(hold);
    }
}

/// The next reply the store finished building; `None` if none is waiting.
async fn next_reply(inflight: &mut Inflight) -> Option<(Frame, usize)> {
    match inflight {
        Some(pending) => pending.next().await,
        None => None,
    }
}

/// Queues `frame` for the writer, charged to the socket's budget until the
/// writer hands it to the socket. False when the writer is gone.
fn enqueue(outbox: &Outbox, frame: bytes::Bytes) -> impl Future<Output = bool> + Send + '_ {
    let bytes = frame.len();
    outbox.budget().charge(bytes);
    // Offered here and waited on in place: awaiting a future made outside
    // the block would hold it twice in the connection task (the largest
    // of its states, on every socket).
    let mut offer = outbox.offer(Outgoing::Frame(frame));
    async move {
        loop {
            match offer {
                Offer::Queued => return true,
                Offer::Closed => {
                    outbox.release(bytes);
                    return false;
                }
                Offer::Full(item) => {
                    outbox.room().await;
                    offer = outbox.offer(item);
                }
            }
        }
    }
}

/// Moves the subscriptions gauge by what changed since `counted`.
fn count_subscriptions(shared: &Shared, following: &Following, counted: &mut i64) {
    let now = following.len() as i64;
    if now != *counted {
        shared.metrics.subscriptions("websocket", now - *counted);
        *counted = now;
    }
}

/// Sends queued frames, several per flush, until the outbox closes, the
/// socket fails, or the peer stops taking data for `stall` (a dead or
/// stuck peer would otherwise hold its queued frames, and the stream
/// batches they share, forever).
#[allow(clippy::manual_async_fn)]
fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    outbox: Arc<Outbox>,
    stall: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    // A block, not an async fn, for the reason `serve` gives.
    async move {
        'outer: while let Some(mut item) = outbox.next().await {
            let mut fed = 0;
            loop {
                // Room in the sink first, then the message, handed over
                // at once: the wait holds only the queued item, not a
                // message too (a `feed` future holds its message for as
                // long as it waits, and the largest wait sets the size
                // of every writer's task, idle ones included).
                match within(stall, poll_fn(|cx| sink.poll_ready_unpin(cx))).await {
                    Some(Ok(())) => {}
                    Some(Err(_)) => break 'outer,
                    None => {
                        tracing::info!("peer took no data for {stall:?}; closing its socket");
                        break 'outer;
                    }
                }
                match item {
                    Outgoing::Frame(bytes) => {
                        let charged = bytes.len();
                        if sink.start_send_unpin(Message::Text(text(bytes))).is_err() {
                            break 'outer;
                        }
                        outbox.release(charged);
                    }
                    Outgoing::Close(code, reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: Utf8Bytes::from_static(reason),
                        };
                        if sink.start_send_unpin(Message::Close(Some(frame))).is_ok() {
                            let _ = within(stall, sink.flush()).await;
                        }
                        break 'outer;
                    }
                }
                fed += 1;
                if fed >= WRITE_BATCH {
                    break;
                }
                match outbox.try_next() {
                    Some(next) => item = next,
                    None => break,
                }
            }
            match within(stall, sink.flush()).await {
                Some(Ok(())) => {}
                Some(Err(_)) => break,
                None => {
                    tracing::info!("peer took no data for {stall:?}; closing its socket");
                    break;
                }
            }
        }
        // Pushes fail from here on, and the connection task is told to end
        // (it may be paused on a spent budget).
        outbox.writer_done();
        let _ = within(stall, sink.close()).await;
    }
}

/// `op`'s output, or `None` if it waited `stall` without completing (the
/// peer took no data for that long). The timer is made only once `op` has
/// to wait, and boxed, so a writer between bursts does not carry one: a
/// `tokio::time::timeout` per write held 112 bytes in every idle writer.
fn within<F: Future + Unpin>(
    stall: Duration,
    mut op: F,
) -> impl Future<Output = Option<F::Output>> {
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = Pin::new(&mut op).poll(cx) {
            return Poll::Ready(Some(out));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(sleep(stall)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(None)
    })
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
