//! [`StreamHub`]: every run's stream in this process, the one type the
//! gateway calls, whichever [`Backend`] stores the streams.
//!
//! Owns the map from run to stream (each a [`Ring`] behind its own lock,
//! with its wake-up), the gateway's calls (publish, finish, sessions,
//! listings, totals), and the one place where a change to a ring is
//! accounted and its readers woken (`StreamHub::settle`). The rest is
//! split by idea: [`subscription`] (resume and readers), `listing`
//! (summaries, by id and prefix), `retention` (dropping whole streams),
//! `budget` (the global byte budget), [`inbox`] (the door a backend's own
//! tasks come back in by).
//!
//! What differs between memory, the log and Redis is only the backend: it
//! is handed the ring to publish to or end, and told of creations, drops
//! and sessions. The hub never asks which backend it has, except
//! [`Backend::authority`] for whose offsets (and so whose budget) rule.
//!
//! Must not read a clock (`now` comes in), spawn tasks or know about
//! sockets: the gateway drives [`StreamHub::sweep`] from its own timer and
//! turns [`super::Delivery`] values into socket writes.
//!
//! Locking: the map's shard lock may be held while taking a stream's lock
//! (dropping a stream decides and closes it atomically inside
//! `DashMap::remove_if`, and a new stream is told to the backend inside
//! `entry`), never the other way round. A stream's lock is held only to
//! change it (the backend's `publish` and `end` included) or to read one
//! delivery; no lock is held across an `.await`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::{Authority, Backend, Memory, News, Stored};
use super::ring::{Ring, RingLimits};
use super::{
    EndRequest, PublishOutcome, PublishedEvent, Publisher, RunEnd, StreamError, StreamFuture,
    StreamLimits, StreamStats,
};
use crate::ids::RunId;

mod budget;
pub mod inbox;
mod listing;
mod retention;
pub mod subscription;

pub use inbox::{Inbox, ReplicaBatch, Shown, Visible, Wake};
pub use subscription::Subscription;

/// One run's stream as the hub shares it with subscriptions.
struct RunStream {
    state: RwLock<StreamState>,
    /// Woken (all waiters) whenever something becomes visible (a batch,
    /// the end) and when the stream is dropped from the hub.
    notify: Notify,
}

struct StreamState {
    ring: Ring,
    /// Set once, when the hub drops this stream (retention or budget) or
    /// replaces it. Subscriptions still holding it get
    /// [`super::Delivery::Closed`]; a publisher that finds it set goes back
    /// to the map for the run's new stream.
    closed: bool,
    /// `None` while a session for the run is active; otherwise when the
    /// stream became idle (session ended, or created by a resume alone).
    idle_since: Option<Instant>,
    /// The last change that appended events (creation time before that):
    /// the budget drops the least recently published streams first.
    last_publish: Instant,
}

impl RunStream {
    fn new(ring: Ring, idle_since: Option<Instant>, now: Instant) -> RunStream {
        RunStream {
            state: RwLock::new(StreamState {
                ring,
                closed: false,
                idle_since,
                last_publish: now,
            }),
            notify: Notify::new(),
        }
    }
}

/// How a stream comes into being when an operation finds none.
#[derive(Clone, Copy)]
enum Origin {
    /// By a publish, a finish or a session start: a session is active.
    Session,
    /// By a resume: nobody publishes yet.
    Viewer,
}

/// What a ring looked like before a change, so [`StreamHub::settle`] can
/// tell what the change did.
#[derive(Clone, Copy)]
struct Mark {
    bytes: usize,
    evicted: u64,
    appended: u64,
    visible: u64,
    end_visible: bool,
}

impl Mark {
    fn of(ring: &Ring) -> Mark {
        Mark {
            bytes: ring.bytes(),
            evicted: ring.evicted(),
            appended: ring.appended_head(),
            visible: ring.next_offset(),
            end_visible: ring.visible_end().is_some(),
        }
    }
}

/// Every run's stream: one ring per run, stored by one [`Backend`]. Shared
/// as `Arc<StreamHub>`; every method takes `&self`.
pub struct StreamHub {
    streams: DashMap<RunId, Arc<RunStream>>,
    /// The keys of `streams`, ordered, for listings by id and prefix.
    /// Changed only under the shard lock of the entry it mirrors (taken
    /// after it, never the other way round).
    ids: RwLock<BTreeSet<RunId>>,
    limits: StreamLimits,
    /// Sum of every live stream's [`Ring::bytes`]. Changed only while
    /// holding that stream's write lock, so it never counts a dropped ring.
    total_bytes: AtomicUsize,
    /// Serializes budget enforcement: concurrent publishes over budget need
    /// one pass, not one each.
    budget: Mutex<()>,
    /// Events evicted by per-run bounds or the global budget (for metrics).
    evicted_events: AtomicU64,
    backend: Box<dyn Backend>,
    /// The backend's, read once.
    authority: Authority,
}

impl StreamHub {
    /// A hub in memory only.
    pub fn new(limits: StreamLimits) -> StreamHub {
        StreamHub::with_backend(limits, Box::new(Memory))
    }

    /// A hub whose streams `backend` stores, empty.
    pub fn with_backend(limits: StreamLimits, backend: Box<dyn Backend>) -> StreamHub {
        let authority = backend.authority();
        StreamHub {
            streams: DashMap::new(),
            ids: Default::default(),
            limits,
            total_bytes: AtomicUsize::new(0),
            budget: Mutex::new(()),
            evicted_events: AtomicU64::new(0),
            backend,
            authority,
        }
    }

    /// This hub holding `rings` (recovered from storage), idle since `now`:
    /// a restored session re-announces itself on reattach. The backend is
    /// not told of them (they came from it).
    pub fn with_rings(self, rings: impl IntoIterator<Item = Ring>, now: Instant) -> StreamHub {
        for ring in rings {
            let run = ring.run().clone();
            self.account(0, ring.bytes());
            self.ids.write().insert(run.clone());
            let stream = Arc::new(RunStream::new(ring, Some(now), now));
            if let Some(old) = self.streams.insert(run, stream) {
                let before = old.state.read().ring.bytes();
                self.account(before, 0);
            }
        }
        self
    }

    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// Bytes held by all streams (see [`Ring::bytes`]).
    pub fn total_bytes(&self) -> usize {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Events evicted so far, by per-run bounds or the global budget.
    pub fn evicted_events(&self) -> u64 {
        self.evicted_events.load(Ordering::Relaxed)
    }

    /// How many runs have a stream.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The bounds every ring of this hub has.
    pub fn ring_limits(&self) -> RingLimits {
        RingLimits {
            max_events: self.limits.max_events_per_run,
            max_bytes: self.limits.max_bytes_per_run,
        }
    }

    fn get_or_create(&self, run: &RunId, origin: Origin, now: Instant) -> Arc<RunStream> {
        if let Some(s) = self.streams.get(run) {
            return s.clone();
        }
        self.streams
            .entry(run.clone())
            .or_insert_with(|| {
                let idle_since = match origin {
                    Origin::Session => None,
                    Origin::Viewer => Some(now),
                };
                let ring = Ring::new(run.clone(), self.ring_limits());
                self.backend.tell(News::Created(&ring));
                self.ids.write().insert(run.clone());
                Arc::new(RunStream::new(ring, idle_since, now))
            })
            .clone()
    }

    /// The one path every change to a ring ends in, whoever made it (a
    /// publish here, a backend's commit, a replica's catch-up, an end):
    /// moves the global byte count and the eviction count by what the
    /// change did, stamps the publish time if events were appended, then
    /// releases the stream's lock and wakes its readers if anything became
    /// visible (a batch or the end). Answers whether it woke them.
    fn settle(
        &self,
        stream: &RunStream,
        state: RwLockWriteGuard<'_, StreamState>,
        before: Mark,
        now: Instant,
    ) -> bool {
        let shown = self.settle_quietly(state, before, now);
        if shown {
            stream.notify.notify_waiters();
        }
        shown
    }

    /// [`Self::settle`] without waking the readers: true if something
    /// became visible, and then the caller must wake them
    /// ([`inbox::Wake`]).
    fn settle_quietly(
        &self,
        mut state: RwLockWriteGuard<'_, StreamState>,
        before: Mark,
        now: Instant,
    ) -> bool {
        let after = Mark::of(&state.ring);
        self.account(before.bytes, after.bytes);
        self.evicted_events
            .fetch_add(after.evicted - before.evicted, Ordering::Relaxed);
        if after.appended != before.appended {
            state.last_publish = now;
        }
        drop(state);
        after.visible != before.visible || after.end_visible != before.end_visible
    }

    /// Moves the global count from a ring's old size to its new one. Call
    /// only under that ring's write lock.
    fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.total_bytes
                .fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.total_bytes
                .fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Appends `events` to `run`'s stream (creating it if needed) as one
    /// atomic batch, dropping duplicates by `seq` (see [`Ring::append`]),
    /// and shows it to its subscribers once the backend made it visible.
    /// The future resolves then; the batch's place in the stream is fixed
    /// before this returns, so publishes are ordered as they were made.
    pub fn publish(
        &self,
        run: &RunId,
        events: &[PublishedEvent<'_>],
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        self.store_batch(run, events, None, now)
    }

    /// [`StreamHub::publish`] on behalf of `publisher`: a backend shared by
    /// several gateways refuses the batch with [`StreamError::Fenced`] if
    /// `publisher` no longer holds its session there.
    pub fn publish_as(
        &self,
        run: &RunId,
        events: &[PublishedEvent<'_>],
        publisher: Publisher<'_>,
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        self.store_batch(run, events, Some(publisher), now)
    }

    fn store_batch(
        &self,
        run: &RunId,
        events: &[PublishedEvent<'_>],
        publisher: Option<Publisher<'_>>,
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        let local = self.authority == Authority::Local;
        if local && let Err(e) = self.make_room(run, events) {
            return StreamFuture::ready(Err(e));
        }
        let stored = loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if state.closed {
                // Dropped between the map lookup and the lock: the map has
                // no entry for it any more, so the next lookup makes a new one.
                continue;
            }
            let before = Mark::of(&state.ring);
            let stored = self.backend.publish(&mut state.ring, events, publisher);
            self.settle(&stream, state, before, now);
            break stored;
        };
        match stored {
            Err(e) => StreamFuture::ready(Err(e)),
            Ok(stored) => {
                if local && self.total_bytes() > self.limits.global_max_bytes {
                    self.enforce_budget(Some(run), 0);
                }
                match stored {
                    Stored::Now(outcome) => StreamFuture::ready(Ok(outcome)),
                    Stored::Later(pending) => pending,
                }
            }
        }
    }

    /// Ends `run`'s stream (creating an empty one if it has none) after
    /// every event stored so far; see [`RunEnd`]. Once ended it takes no
    /// more events ([`StreamError::Ended`]). Idempotent: ending an ended
    /// stream with the same outcome answers the first end (once it is
    /// durable); another outcome is [`StreamError::EndConflict`]. The future
    /// resolves once the end is durable and visible to readers. Retention
    /// counts from the end.
    pub fn finish(
        &self,
        run: &RunId,
        req: EndRequest,
        now: Instant,
    ) -> StreamFuture<Result<Arc<RunEnd>, StreamError>> {
        loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if state.closed {
                continue;
            }
            if let Some(end) = state.ring.end() {
                if end.outcome != req.outcome {
                    return StreamFuture::ready(Err(StreamError::EndConflict {
                        outcome: end.outcome,
                    }));
                }
                let end = end.clone();
                if state.ring.visible_end().is_some() {
                    return StreamFuture::ready(Ok(end));
                }
                drop(state);
                return self.once_shown(stream, end);
            }
            let before = Mark::of(&state.ring);
            let stored = self.backend.end(&mut state.ring, req);
            // Retention counts from the end (an authority elsewhere records
            // it with the end, and its replica takes it from there).
            if state.ring.end().is_some() && state.idle_since.is_none() {
                state.idle_since = Some(now);
            }
            self.settle(&stream, state, before, now);
            return match stored {
                Err(e) => StreamFuture::ready(Err(e)),
                Ok(Stored::Now(end)) => StreamFuture::ready(Ok(end)),
                Ok(Stored::Later(pending)) => pending,
            };
        }
    }

    /// The answer to a finish that found the end set but not yet visible
    /// (the backend is still making it durable): `end` once the backend has
    /// flushed, if that showed it. An end the backend failed to store is
    /// not one: the caller is told to retry.
    fn once_shown(
        &self,
        stream: Arc<RunStream>,
        end: Arc<RunEnd>,
    ) -> StreamFuture<Result<Arc<RunEnd>, StreamError>> {
        let flushed = self.backend.flush();
        StreamFuture::new(async move {
            flushed.await;
            let state = stream.state.read();
            if state.closed || state.ring.visible_end().is_some() {
                Ok(end)
            } else {
                Err(StreamError::Unavailable(
                    "the run's end could not be stored".into(),
                ))
            }
        })
    }

    /// `run`'s end, visible or not yet.
    pub fn ended(&self, run: &RunId) -> Option<Arc<RunEnd>> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        if state.closed {
            return None;
        }
        state.ring.end().cloned()
    }

    /// A session for `run` became active: its stream is kept regardless of
    /// retention until [`StreamHub::session_ended`]. Creates the stream if
    /// needed, so viewers that resume before the first publish share its
    /// epoch.
    pub fn session_started(&self, run: &RunId, now: Instant) {
        loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if !state.closed {
                // An ended run stays idle: its retention already runs.
                if state.ring.end().is_none() {
                    state.idle_since = None;
                }
                break;
            }
        }
        self.backend.tell(News::SessionStarted(run));
    }

    /// `run`'s session ended (expired or closed for good): retention starts
    /// counting now.
    pub fn session_ended(&self, run: &RunId, now: Instant) {
        let stream = self.streams.get(run).map(|s| s.clone());
        if let Some(stream) = stream {
            let mut state = stream.state.write();
            if state.idle_since.is_none() {
                state.idle_since = Some(now);
            }
        }
        self.backend.tell(News::SessionEnded { run, at: now });
    }

    /// Totals, for metrics.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            streams: self.len(),
            bytes: self.total_bytes(),
            evicted_events: self.evicted_events(),
            log_bytes: self.backend.disk_bytes(),
        }
    }

    /// Resolves once this gateway's copy of `run` holds at least what the
    /// authority (Redis) held when asked; at once where this gateway's
    /// rings are the history (memory, the log). For a reader that says
    /// only an offset (SSE) and may have come from another gateway.
    pub fn catch_up(&self, run: &RunId) -> StreamFuture<()> {
        self.backend.catch_up(run)
    }

    /// Whether publishes can be stored (false after a storage failure).
    pub fn healthy(&self) -> bool {
        self.backend.healthy()
    }

    /// Makes everything accepted durable and stops the backend's tasks;
    /// called once, at the end of a drain.
    pub fn close(&self) -> StreamFuture<()> {
        self.backend.close()
    }
}

#[cfg(test)]
mod tests;
