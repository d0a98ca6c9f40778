//! Resumable output streams: each run's published events, kept in order
//! with offsets, fanned out to any number of subscribers.
//!
//! One concrete hub, one small seam. The gateway holds an
//! `Arc<`[`StreamHub`]`>` and calls only it; resume, tailing, gaps, the end
//! and the budget exist once, there ([`hub`]), and every reader is a
//! concrete [`Subscription`]. What differs between engines sits behind the
//! [`Backend`] trait ([`backend`]): who assigns a batch's offsets and when
//! it becomes durable and visible, how an end is made durable, and who
//! hears of streams created and dropped. Three backends:
//!
//! - [`backend::Memory`]: the ring assigns offsets; everything is visible
//!   at once.
//! - [`log`]: the durable log. The ring assigns offsets; the batch stays
//!   invisible until the log's writer has written (and per policy synced)
//!   it, then comes back through the hub's [`hub::Inbox`].
//! - [`redis`]: several gateways on one Redis. A script there assigns
//!   offsets; every gateway's rings are replicas, and a stored batch comes
//!   back through the same inbox on every gateway.
//!
//! Must not know about sockets, sessions, tokens or capabilities: callers
//! have already checked that the caller may publish to or read `run`.
//!
//! # Offsets, epochs, duplicates
//!
//! Each accepted event gets the run's next offset (0, 1, 2, … with no
//! holes). A stream's [`StreamEpoch`] is random and changes whenever its
//! history is lost (the stream was dropped by retention or the global
//! budget, or the process restarted), so a client can tell "resumed" from
//! "history gone". An event whose `seq` is not above the highest accepted
//! for the run is a duplicate and dropped, so a runtime may resend a batch.
//!
//! # Fan-out without copies
//!
//! A publish builds its `stream.events` push frame once ([`frame`]) and the
//! ring stores the batch *as* that frame. Every subscriber at a batch
//! boundary is handed the same [`Bytes`]; only a subscriber that enters a
//! batch in the middle (a resume mid-batch, or after eviction trimmed the
//! batch's head) gets a fresh frame for the rest of it. SSE takes single
//! events as slices of the frame.
//!
//! # Replay and live are one loop
//!
//! A [`Subscription`] is a stream and a cursor, nothing more. There is no
//! separate replay phase to hand over from, so there is no hand-over to
//! race: [`Subscription::next`] always reads the ring from the cursor under
//! the stream's lock, and sleeps only if the cursor is at the head. It
//! registers for the wake-up *before* it reads (`Notify::notified()` pinned
//! and `enable()`d), and whatever makes a batch visible (a publish the
//! memory backend shows at once, a backend's task through the inbox) does so
//! under the write lock and then calls `notify_waiters()`, in one place
//! ([`StreamHub`]'s `settle`). So a batch either became visible before the
//! read (the read sees it) or after the registration (the wake-up reaches
//! the waiter): it cannot fall between the two. Every offset from the start is
//! delivered exactly once and in order, whether it was published before or
//! after the resume.
//!
//! A slow subscriber never blocks the publisher (who holds the lock only to
//! append) and costs no memory beyond the ring: if eviction overtakes its
//! cursor, its next read is a [`Delivery::Gap`] naming exactly the offsets
//! it missed, and it goes on from the oldest kept event.
//!
//! # The end of a run
//!
//! [`StreamHub::finish`] marks a stream ended ([`RunEnd`]): its head at
//! that moment is the run's whole output, nothing is appended after it, and
//! every subscription that reaches that head is handed
//! [`Delivery::Ended`] (the `stream.ended` push, built once per stream)
//! instead of waiting. A durable backend makes the mark visible only once it
//! is in the log, after every batch before it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

pub use crate::ids::StreamEpoch;
use crate::ids::{RunId, RunOutcome};
use crate::time::Timestamp;

pub mod backend;
pub mod hub;
pub mod log;
pub mod redis;
/// The `stream.events` / `stream.gap` frame builders the ring stores.
pub use rungate_protocol::stream_frame as frame;
pub mod ring;

pub use backend::Backend;
pub use hub::{StreamHub, Subscription};

/// A stream operation in flight. The hub fixes the operation's place (a
/// batch's order, an end's) before it returns the future; the future
/// resolves once the backend made it durable and visible. An answer known
/// at once (the memory backend, a batch of duplicates, a refusal) is not
/// boxed.
#[must_use = "the operation's answer comes through the future"]
pub struct StreamFuture<T>(Answer<T>);

enum Answer<T> {
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'static>>),
}

impl<T> StreamFuture<T> {
    /// A future that resolves to `value` at once.
    pub fn ready(value: T) -> StreamFuture<T> {
        StreamFuture(Answer::Ready(Some(value)))
    }

    /// A future that resolves when `later` does.
    pub fn new(later: impl Future<Output = T> + Send + 'static) -> StreamFuture<T> {
        StreamFuture(Answer::Later(Box::pin(later)))
    }
}

// The value is moved out, never pinned in place.
impl<T> Unpin for StreamFuture<T> {}

impl<T> Future for StreamFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Answer::Ready(value) => Poll::Ready(
                value
                    .take()
                    .expect("a stream future is not polled after it resolved"),
            ),
            Answer::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// One event as published: the protocol's own type, so a publish's
/// events reach the stream as the reader left them (borrowed from the
/// frame), with no copy in between. Its `json` is one valid JSON value,
/// copied into frames verbatim.
pub use rungate_protocol::commands::PublishedEvent;

/// One stored event, for readers that send events singly (SSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub offset: u64,
    /// The event's JSON as published: a slice of the stored frame. It may
    /// contain newlines if the runtime sent pretty-printed JSON.
    pub json: Bytes,
}

/// Bounds on what streams may hold and hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// Events kept per run; the oldest are evicted beyond it.
    pub max_events_per_run: usize,
    /// Bytes kept per run (counted as stored frame bytes); the oldest events
    /// are evicted beyond it. One batch may not exceed it.
    pub max_bytes_per_run: usize,
    /// Bytes kept across all runs: see [`StreamHub::sweep`].
    pub global_max_bytes: usize,
    /// How long a stream is kept after its run's session ended.
    pub retention: Duration,
    /// Roughly how many events one [`Delivery`] carries (a whole batch is
    /// never split to honour it; a partial batch is).
    pub max_events_per_delivery: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_events_per_run: 10_000,
            max_bytes_per_run: 16 << 20,
            global_max_bytes: 512 << 20,
            retention: Duration::from_secs(3600),
            max_events_per_delivery: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The batch's accepted events alone exceed a per-run bound; nothing was
    /// stored. The gateway answers `PAYLOAD_TOO_LARGE`.
    #[error(
        "batch of {events} events ({bytes} bytes) exceeds the per-run stream limit of {max_events} events / {max_bytes} bytes"
    )]
    TooLarge {
        events: usize,
        bytes: usize,
        max_events: usize,
        max_bytes: usize,
    },
    /// The engine's storage failed; nothing was stored and the caller may
    /// retry. The in-memory hub never returns it.
    #[error("stream storage unavailable: {0}")]
    Unavailable(String),
    /// Only from an engine several gateways share: the publisher's fence
    /// ([`Publisher`]) no longer holds (its session moved on); nothing was
    /// stored.
    #[error("the publisher's session is held at another epoch or by another gateway")]
    Fenced,
    /// The run's stream ended (`runtime.finish`): nothing more is stored.
    #[error("the run ended ({outcome}); nothing more is stored")]
    Ended { outcome: RunOutcome },
    /// A finish with another outcome than the one the run ended with.
    #[error("the run already ended with outcome {outcome}")]
    EndConflict { outcome: RunOutcome },
    /// The engine cannot end streams.
    #[error("this stream engine cannot end runs")]
    EndUnsupported,
    /// The gateway's stream budget (`global_max_bytes`) is held by runs
    /// with live sessions, and this run's own history cannot make room for
    /// the batch; nothing was stored. Retryable: room comes back as
    /// sessions end and their streams go idle.
    #[error(
        "the gateway's stream budget of {max_bytes} bytes is held by other live runs; nothing was stored, retry later"
    )]
    BudgetFull { max_bytes: usize },
}

/// What `runtime.finish` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndRequest {
    pub outcome: RunOutcome,
    pub message: Option<String>,
    pub ended_at: Timestamp,
}

/// How a run's stream ended: its final head, and the `stream.ended` push
/// every follower is sent, built once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub outcome: RunOutcome,
    pub message: Option<String>,
    pub ended_at: Timestamp,
    /// The head when the run ended: offsets below it are all its output.
    pub next_offset: u64,
    /// The `stream.ended` payload's JSON (SSE's `data:` of `event: end`).
    pub payload: Bytes,
    /// The complete `stream.ended` push frame.
    pub frame: Bytes,
}

impl RunEnd {
    pub fn new(run: &RunId, epoch: &StreamEpoch, req: EndRequest, next_offset: u64) -> RunEnd {
        let ended = rungate_protocol::push::StreamEnded {
            run_id: run.clone(),
            stream_epoch: epoch.clone(),
            next_offset,
            outcome: req.outcome,
            message: req.message,
            ended_at: req.ended_at,
        };
        let (payload, frame) = frame::ended_frame(&ended);
        RunEnd {
            outcome: ended.outcome,
            message: ended.message,
            ended_at: ended.ended_at,
            next_offset,
            payload,
            frame,
        }
    }
}

/// Who publishes: the fencing token an engine shared by several gateways
/// checks atomically with the append, so a gateway that lost a session to
/// another cannot add to its run's stream afterwards, not even in the
/// moment before it hears of the loss. An engine of one gateway's own
/// ignores it (the session registry already checked the publisher).
#[derive(Debug, Clone, Copy)]
pub struct Publisher<'a> {
    /// The session published under.
    pub session_id: &'a str,
    /// The connection epoch this gateway holds it at.
    pub epoch: u64,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The offset of the first accepted event (the old head).
    pub first_offset: u64,
    pub accepted: usize,
    /// Events dropped as duplicates by `seq`.
    pub duplicates: usize,
    /// The head after the publish.
    pub next_offset: u64,
}

/// The answer to a resume is the `stream.resume` reply itself, so the wire
/// shape has one definition (the protocol crate's). `ended` set means the
/// subscription replays, then delivers [`Delivery::Ended`] without waiting.
pub use rungate_protocol::commands::StreamResumeResponse;

/// One run's stream as `runs.list` and `GET /v1/runs` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSummary {
    pub run_id: RunId,
    pub stream_epoch: StreamEpoch,
    pub first_offset: u64,
    pub next_offset: u64,
    /// Set once the run ended.
    #[serde(skip)]
    pub end: Option<Arc<RunEnd>>,
}

/// One run pattern of a listing: an exact run id, or an id prefix (`""`
/// for every run).
#[derive(Debug, Clone, Copy)]
pub struct RunSelector<'a> {
    pub text: &'a str,
    pub prefix: bool,
}

impl RunSelector<'_> {
    pub fn matches(&self, run: &RunId) -> bool {
        if self.prefix {
            run.as_str().starts_with(self.text)
        } else {
            run.as_str() == self.text
        }
    }
}

/// What the engine holds, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Runs with a stream.
    pub streams: usize,
    /// Bytes held across all streams.
    pub bytes: usize,
    /// Events evicted so far by per-run bounds or the global budget.
    pub evicted_events: u64,
    /// Bytes of the stream log on disk (0 for an in-memory engine).
    pub log_bytes: u64,
}

/// What one sweep did (for logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Streams dropped because their session ended longer than the
    /// retention period ago.
    pub expired_streams: usize,
    /// Idle streams dropped to get within the global byte budget.
    pub evicted_streams: usize,
    /// Events evicted from active streams for the same reason.
    pub trimmed_events: u64,
}

/// What a subscription hands the gateway next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Complete `stream.events` push frames, in offset order, to send as
    /// they are.
    Frames(Vec<Bytes>),
    /// The subscriber missed offsets `from..=to` (evicted before it read
    /// them); `frame` is the `stream.gap` push saying so. The subscription
    /// goes on from `to + 1`, the oldest kept offset.
    Gap { frame: Bytes, from: u64, to: u64 },
    /// The stream was dropped (retention or the global budget): its history
    /// is gone and nothing more will come. The run's next stream has a new
    /// epoch; a client resumes to get it.
    Closed,
    /// The run ended and every event before its end was delivered:
    /// `frame` of the [`RunEnd`] is the `stream.ended` push. Nothing more
    /// comes.
    Ended(Arc<RunEnd>),
}

/// As [`Delivery`], for readers that send events singly (SSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventDelivery {
    Events(Vec<StreamEvent>),
    Gap { from: u64, to: u64 },
    Closed,
    Ended(Arc<RunEnd>),
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "end_tests.rs"]
mod end_tests;
