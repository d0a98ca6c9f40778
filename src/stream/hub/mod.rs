//! All runs' streams in memory: publish, resume, subscriptions, lifecycle
//! and the global byte budget.
//!
//! Owns the map from run to stream, each stream's lock and wake-up, the
//! total byte count across runs, and the policy for dropping whole streams
//! (retention after the session ended, global budget). The history itself
//! is a [`Ring`] per run.
//! Must not read a clock (`now` comes in), spawn tasks or know about
//! sockets: the gateway drives [`StreamHub::sweep`] from its own timer and
//! turns [`Delivery`] values into socket writes.
//!
//! Locking: the map's shard lock may be held while taking a stream's lock
//! (dropping a stream decides and closes it atomically inside
//! `DashMap::remove_if`), never the other way round. A stream's lock is
//! held only to append, to read one delivery, or to change lifecycle
//! state; no lock is held across an `.await`.
//!
//! Replication (an engine whose authority is elsewhere, [`super::redis`])
//! uses [`StreamHub::replicate`], [`StreamHub::replace`],
//! [`StreamHub::set_idle`] and [`StreamHub::remove_replica`]: the same
//! rules, and none of them calls the hooks (the change came from the
//! authority, so telling it again would echo).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ring::{Read, Ring, RingLimits};
use super::{
    Delivery, EndRequest, EventDelivery, NewEvent, PublishOutcome, ResumeInfo, RunEnd,
    StreamEngine, StreamError, StreamFuture, StreamLimits, StreamStats, StreamSubscription,
    StreamSummary, SweepOutcome,
};
use crate::ids::RunId;

/// One run's stream as the hub shares it with subscriptions.
struct RunStream {
    state: RwLock<StreamState>,
    /// Woken (all waiters) after every append that accepted events and when
    /// the stream is dropped from the hub.
    notify: Notify,
}

struct StreamState {
    ring: Ring,
    /// Set once, when the hub drops this stream (retention or budget).
    /// Subscriptions still holding it get [`Delivery::Closed`]; a publisher
    /// that finds it set goes back to the map for the run's new stream.
    closed: bool,
    /// `None` while a session for the run is active; otherwise when the
    /// stream became idle (session ended, or created by a resume alone).
    idle_since: Option<Instant>,
    /// The last publish that accepted events (creation time before that):
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
    /// By a publish or session start: a session is active.
    Session,
    /// By a resume: nobody publishes yet.
    Viewer,
}

/// The in-memory [`StreamEngine`]: one ring per run. Shared as
/// `Arc<StreamHub>`; every method takes `&self`.
pub struct StreamHub {
    streams: DashMap<RunId, Arc<RunStream>>,
    /// The keys of `streams`, ordered, for listings by id and prefix.
    /// Changed only under the shard lock of the entry it mirrors (taken
    /// after it, never the other way round).
    ids: parking_lot::RwLock<std::collections::BTreeSet<RunId>>,
    limits: StreamLimits,
    /// Sum of every live stream's [`Ring::bytes`]. Changed only while
    /// holding that stream's write lock, so it never counts a dropped ring.
    total_bytes: AtomicUsize,
    /// Serializes budget enforcement: concurrent publishes over budget need
    /// one pass, not one each.
    budget: Mutex<()>,
    /// Events evicted by per-run bounds or the global budget (for metrics).
    evicted_events: AtomicU64,
    /// Told whenever a stream is created or dropped (a durable engine logs
    /// both, so a stream's epoch is the same after a restart even if nothing
    /// was ever published to it).
    hooks: Option<Hooks>,
}

/// See [`StreamHub::with_hooks`]. Both are called under the map's lock, so
/// they see creations, drops and appends of one run in the order they
/// happened; they must not block.
pub struct Hooks {
    /// A new, empty stream: its ring as created.
    pub created: Box<dyn Fn(&Ring) + Send + Sync>,
    /// A stream dropped by retention or the budget: its run and epoch.
    pub dropped: DroppedHook,
}

/// See [`Hooks::dropped`].
pub type DroppedHook = Box<dyn Fn(&RunId, &super::StreamEpoch) + Send + Sync>;

/// See [`StreamHub::publish_logged`]: called with the ring just after an
/// append that accepted events.
pub type LogAppend<'a> = &'a mut dyn FnMut(&Ring, &PublishOutcome);

/// See [`StreamHub::finish_logged`]: called with the ring just after it
/// was marked ended.
pub type LogEnd<'a> = &'a mut dyn FnMut(&Ring, &Arc<RunEnd>);

impl StreamHub {
    pub fn new(limits: StreamLimits) -> StreamHub {
        StreamHub {
            streams: DashMap::new(),
            ids: Default::default(),
            limits,
            total_bytes: AtomicUsize::new(0),
            budget: Mutex::new(()),
            evicted_events: AtomicU64::new(0),
            hooks: None,
        }
    }

    /// A hub that tells `hooks` of every stream it creates and drops.
    pub fn with_hooks(limits: StreamLimits, hooks: Hooks) -> StreamHub {
        StreamHub {
            hooks: Some(hooks),
            ..StreamHub::new(limits)
        }
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
                if let Some(hooks) = &self.hooks {
                    (hooks.created)(&ring);
                }
                self.ids.write().insert(run.clone());
                Arc::new(RunStream::new(ring, idle_since, now))
            })
            .clone()
    }

    /// Appends `events` to `run`'s stream (creating it if needed) as one
    /// atomic batch, then wakes its subscribers. See [`Ring::append`] for
    /// `seq` de-duplication and when a batch is [`StreamError::TooLarge`].
    pub fn publish<'a>(
        &self,
        run: &RunId,
        events: impl IntoIterator<Item = NewEvent<'a>>,
        now: Instant,
    ) -> Result<PublishOutcome, StreamError> {
        let events: Vec<NewEvent<'a>> = events.into_iter().collect();
        self.append(run, &events, now, None)
    }

    /// As [`StreamHub::publish`] for a durable engine: the batch is appended
    /// but stays invisible to readers until [`StreamHub::commit`]. `log` is
    /// called under the stream's lock with the ring just after the append
    /// (when anything was accepted), so batches reach the log in offset
    /// order.
    pub fn publish_logged(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        now: Instant,
        log: LogAppend<'_>,
    ) -> Result<PublishOutcome, StreamError> {
        self.append(run, events, now, Some(log))
    }

    fn append(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        now: Instant,
        mut log: Option<LogAppend<'_>>,
    ) -> Result<PublishOutcome, StreamError> {
        // Room is made before the batch goes in, and only at the expense of
        // idle streams and this run's own history: another run with a live
        // session never loses events to this publish. If that is not enough
        // room, the batch is refused and nothing is stored.
        let limit = self.limits.global_max_bytes;
        // At most what the run's ring can hold (it trims itself past that;
        // a batch larger still is the ring's TooLarge, not the budget's).
        let incoming = events
            .iter()
            .map(|e| e.json.len())
            .sum::<usize>()
            .min(self.limits.max_bytes_per_run);
        if self.total_bytes().saturating_add(incoming) > limit {
            self.enforce_budget(Some(run), incoming);
            let own = self
                .streams
                .get(run)
                .map_or(0, |s| s.state.read().ring.bytes());
            // Refused only if the others alone leave no room: this run can
            // always give up its own history.
            let others = self.total_bytes().saturating_sub(own);
            if others.saturating_add(incoming.min(limit)) > limit {
                return Err(StreamError::BudgetFull { max_bytes: limit });
            }
        }
        let (stream, appended, outcome) = loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if state.closed {
                // Dropped between the map lookup and the lock: the map has
                // no entry for it any more, so the next lookup makes a new one.
                continue;
            }
            let before = state.ring.bytes();
            let appended = match log {
                Some(_) => state.ring.append_uncommitted(events)?,
                None => state.ring.append(events)?,
            };
            self.account(before, state.ring.bytes());
            if appended.accepted > 0 {
                state.last_publish = now;
            }
            let outcome = PublishOutcome {
                first_offset: appended.first_offset,
                accepted: appended.accepted,
                duplicates: appended.duplicates,
                next_offset: state.ring.appended_head(),
            };
            if let Some(log) = log.as_mut()
                && appended.accepted > 0
            {
                log(&state.ring, &outcome);
            }
            drop(state);
            break (stream, appended, outcome);
        };
        self.evicted_events
            .fetch_add(appended.evicted, Ordering::Relaxed);
        if appended.accepted > 0 && log.is_none() {
            stream.notify.notify_waiters();
        }
        if self.total_bytes() > self.limits.global_max_bytes {
            self.enforce_budget(Some(run), 0);
        }
        Ok(outcome)
    }

    /// Ends `run`'s stream (see [`StreamEngine::finish`]); the end is
    /// visible at once. Answers the end and whether this call made it.
    pub fn finish(
        &self,
        run: &RunId,
        end: EndRequest,
        now: Instant,
    ) -> Result<(Arc<RunEnd>, bool), StreamError> {
        self.end(run, end, now, None)
    }

    /// As [`StreamHub::finish`] for a durable engine: the end stays
    /// invisible until [`StreamHub::commit_end`]; `log` is called under the
    /// stream's lock, so the end reaches the log after every batch before it.
    pub fn finish_logged(
        &self,
        run: &RunId,
        end: EndRequest,
        now: Instant,
        log: LogEnd<'_>,
    ) -> Result<(Arc<RunEnd>, bool), StreamError> {
        self.end(run, end, now, Some(log))
    }

    fn end(
        &self,
        run: &RunId,
        req: EndRequest,
        now: Instant,
        log: Option<LogEnd<'_>>,
    ) -> Result<(Arc<RunEnd>, bool), StreamError> {
        loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if state.closed {
                continue;
            }
            if let Some(end) = state.ring.end() {
                return if end.outcome == req.outcome {
                    Ok((end.clone(), false))
                } else {
                    Err(StreamError::EndConflict {
                        outcome: end.outcome,
                    })
                };
            }
            let head = state.ring.appended_head();
            let end = Arc::new(RunEnd::new(run, state.ring.epoch(), req, head));
            let visible = log.is_none();
            state.ring.set_end(end.clone(), visible);
            if let Some(log) = log {
                log(&state.ring, &end);
            }
            // Retention counts from the end.
            if state.idle_since.is_none() {
                state.idle_since = Some(now);
            }
            drop(state);
            if visible {
                stream.notify.notify_waiters();
            }
            return Ok((end, true));
        }
    }

    /// Makes `run`'s end visible (it is in the log) and wakes its
    /// subscribers. Ignored if the stream is gone or has another epoch.
    pub fn commit_end(&self, run: &RunId, epoch: &super::StreamEpoch) {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return;
        };
        let moved = {
            let mut state = stream.state.write();
            !state.closed && state.ring.epoch() == epoch && state.ring.commit_end()
        };
        if moved {
            stream.notify.notify_waiters();
        }
    }

    /// `run`'s end, visible or not.
    pub fn ended(&self, run: &RunId) -> Option<Arc<RunEnd>> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        if state.closed {
            return None;
        }
        state.ring.end().cloned()
    }

    /// Makes `run`'s batches up to `up_to` visible (they are in the log)
    /// and wakes its subscribers. Ignored if the stream is gone or has
    /// another epoch by now.
    pub fn commit(&self, run: &RunId, epoch: &super::StreamEpoch, up_to: u64) {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return;
        };
        let moved = {
            let mut state = stream.state.write();
            !state.closed && state.ring.epoch() == epoch && state.ring.commit(up_to)
        };
        if moved {
            stream.notify.notify_waiters();
        }
    }

    /// Puts back a ring recovered from storage, idle (its session, if any,
    /// re-announces itself on reattach).
    pub fn restore(&self, ring: Ring, now: Instant) {
        let run = ring.run().clone();
        let bytes = ring.bytes();
        let stream = Arc::new(RunStream::new(ring, Some(now), now));
        self.ids.write().insert(run.clone());
        if let Some(old) = self.streams.insert(run, stream) {
            let before = old.state.read().ring.bytes();
            self.account(before, 0);
        }
        self.account(0, bytes);
    }

    /// Calls `f` with `run`'s ring under its read lock, if it has a stream.
    pub fn with_ring<T>(&self, run: &RunId, f: impl FnOnce(&Ring) -> T) -> Option<T> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        (!state.closed).then(|| f(&state.ring))
    }

    /// Calls `f` with every stream's ring, each under its read lock.
    pub fn for_each_ring(&self, mut f: impl FnMut(&Ring)) {
        let streams: Vec<Arc<RunStream>> = self.streams.iter().map(|e| e.value().clone()).collect();
        for stream in streams {
            let state = stream.state.read();
            if !state.closed {
                f(&state.ring);
            }
        }
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

    /// Starts a subscription to `run`'s stream; creates an empty stream if
    /// the run has none yet, so its epoch is fixed from now on and its first
    /// events reach this subscriber.
    ///
    /// Where it starts (`start_offset`), with `first`/`next` the kept range:
    ///
    /// | request | start | truncated |
    /// |---|---|---|
    /// | no `from_offset` | `next` (live only) | epoch given and different |
    /// | epoch given and different | `first` | true |
    /// | `from_offset < first` | `first` | true |
    /// | `first <= from_offset <= next` | `from_offset` | false |
    /// | `from_offset > next`, epoch given (and equal) | `next` | false |
    /// | `from_offset > next`, no epoch | `first` | true |
    ///
    /// A client can only have seen offsets beyond the head in another epoch's
    /// history. Without an epoch to compare (SSE's `Last-Event-ID`, say)
    /// that is the only explanation, so it is treated like an epoch change:
    /// replay what is kept. With the same epoch it is a client bug; clamping
    /// to the head neither invents nor repeats anything.
    pub fn resume(
        &self,
        run: &RunId,
        from_offset: Option<u64>,
        epoch: Option<&str>,
        now: Instant,
    ) -> (ResumeInfo, Subscription) {
        loop {
            let stream = self.get_or_create(run, Origin::Viewer, now);
            let state = stream.state.read();
            if state.closed {
                continue;
            }
            let ring = &state.ring;
            let (first, next) = (ring.first_offset(), ring.next_offset());
            let epoch_differs = epoch.is_some_and(|e| e != ring.epoch().as_str());
            let (start_offset, truncated) = match from_offset {
                None => (next, epoch_differs),
                Some(_) if epoch_differs => (first, true),
                Some(from) if from < first => (first, true),
                Some(from) if from <= next => (from, false),
                Some(_) if epoch.is_some() => (next, false),
                Some(_) => (first, true),
            };
            let info = ResumeInfo {
                run_id: run.clone(),
                stream_epoch: ring.epoch().clone(),
                first_offset: first,
                next_offset: next,
                start_offset,
                truncated,
                ended: ring.visible_end().is_some(),
            };
            drop(state);
            let sub = Subscription {
                stream,
                cursor: start_offset,
                max_events: self.limits.max_events_per_delivery,
            };
            return (info, sub);
        }
    }

    /// The kept range of every run's stream, ordered by run id.
    pub fn runs(&self) -> Vec<StreamSummary> {
        let mut all: Vec<StreamSummary> = self
            .streams
            .iter()
            .map(|entry| summarize(&entry.value().state.read().ring))
            .collect();
        all.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        all
    }

    /// See [`super::StreamEngine::runs_matching`]: from the ordered index,
    /// at most `limit` ids per selector, so the cost follows the page and
    /// the selectors, not the number of streams.
    pub fn runs_matching(
        &self,
        selectors: &[super::RunSelector<'_>],
        after: Option<&RunId>,
        limit: usize,
    ) -> Vec<StreamSummary> {
        use std::ops::Bound;
        let mut picked = std::collections::BTreeSet::new();
        {
            let ids = self.ids.read();
            for sel in selectors {
                if !sel.prefix {
                    if let Ok(id) = RunId::new(sel.text)
                        && after.is_none_or(|a| id > *a)
                        && ids.contains(&id)
                    {
                        picked.insert(id);
                    }
                    continue;
                }
                // From the later of the cursor and the prefix: every id
                // with the prefix sorts at or after the prefix itself.
                let from_prefix = RunId::new(sel.text).ok();
                let start = match (after, from_prefix) {
                    (Some(a), Some(p)) if p > *a => Bound::Included(p),
                    (Some(a), _) => Bound::Excluded(a.clone()),
                    (None, Some(p)) => Bound::Included(p),
                    (None, None) => Bound::Unbounded,
                };
                let matching = ids
                    .range((start, Bound::Unbounded))
                    .take_while(|id| id.as_str().starts_with(sel.text))
                    .take(limit);
                picked.extend(matching.cloned());
            }
        }
        // The index lock is released before any stream is locked.
        picked
            .into_iter()
            .filter_map(|id| self.summary(&id))
            .take(limit)
            .collect()
    }

    /// The kept range of `run`'s stream, if it has one.
    pub fn summary(&self, run: &RunId) -> Option<StreamSummary> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        Some(summarize(&state.ring))
    }

    /// A session for `run` became active: its stream is kept regardless of
    /// retention until [`StreamHub::session_ended`]. Creates the stream if
    /// needed, so viewers that resume before the first publish share its epoch.
    pub fn session_started(&self, run: &RunId, now: Instant) {
        loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let mut state = stream.state.write();
            if !state.closed {
                // An ended run stays idle: its retention already runs.
                if state.ring.end().is_none() {
                    state.idle_since = None;
                }
                return;
            }
        }
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
    }

    /// Drops streams idle for at least the retention period, then holds
    /// the global byte budget (see [`StreamHub::enforce_budget`]).
    ///
    /// An idle stream that holds no events but has subscribers is kept:
    /// dropping it frees nothing and would only send a dashboard that waits
    /// for a run to start a needless `Closed`.
    pub fn sweep(&self, now: Instant) -> SweepOutcome {
        let retention = self.limits.retention;
        let candidates: Vec<(RunId, Arc<RunStream>)> = self
            .streams
            .iter()
            .filter(|e| {
                let state = e.value().state.read();
                state
                    .idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= retention)
            })
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut expired = 0;
        for (run, stream) in candidates {
            let dropped = self.drop_stream(&run, &stream, |s, state| {
                let expired = state
                    .idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= retention);
                // The map holds one reference and `candidates` another.
                let watched = Arc::strong_count(s) > 2;
                expired && !(state.ring.is_empty() && watched)
            });
            if dropped {
                expired += 1;
            }
        }
        let budget = self.enforce_budget(None, 0);
        SweepOutcome {
            expired_streams: expired,
            ..budget
        }
    }

    /// Brings total bytes within `global_max_bytes` less `room` (a batch
    /// about to be appended): drops whole idle streams (no live session),
    /// least recently published first; if still over, evicts the oldest
    /// events of `publisher`'s own stream, and of no other: a run with a
    /// live session never loses history to another run's publishing (issue
    /// #19). Does nothing if another call is already at it.
    fn enforce_budget(&self, publisher: Option<&RunId>, room: usize) -> SweepOutcome {
        let mut outcome = SweepOutcome::default();
        let Some(_guard) = self.budget.try_lock() else {
            return outcome;
        };
        let limit = self.limits.global_max_bytes.saturating_sub(room);
        if self.total_bytes() <= limit {
            return outcome;
        }
        let mut idle = Vec::new();
        let mut active = Vec::new();
        for entry in self.streams.iter() {
            let state = entry.value().state.read();
            if state.ring.bytes() == 0 {
                continue;
            }
            let item = (
                state.last_publish,
                entry.key().clone(),
                entry.value().clone(),
            );
            // The publisher's own stream is trimmed, never dropped whole
            // for its own batch (even when idle: no session yet).
            if publisher == Some(entry.key()) {
                active.push(item);
            } else if state.idle_since.is_some() {
                idle.push(item);
            }
        }
        idle.sort_by_key(|(at, _, _)| *at);
        active.sort_by_key(|(at, _, _)| *at);

        for (_, run, stream) in &idle {
            if self.total_bytes() <= limit {
                return outcome;
            }
            if self.drop_stream(run, stream, |_, state| state.idle_since.is_some()) {
                outcome.evicted_streams += 1;
            }
        }
        for (_, _, stream) in &active {
            let over = self.total_bytes().saturating_sub(limit);
            if over == 0 {
                break;
            }
            let mut state = stream.state.write();
            if state.closed {
                continue;
            }
            let before = state.ring.bytes();
            let (events, _) = state.ring.trim(over);
            self.account(before, state.ring.bytes());
            drop(state);
            // Subscribers waiting at the head are unaffected; the others
            // find the gap on their next read, so nobody needs waking.
            outcome.trimmed_events += events;
            self.evicted_events.fetch_add(events, Ordering::Relaxed);
        }
        outcome
    }

    /// Removes `stream` from the map if it is still `run`'s stream and
    /// `keep_going` agrees (checked under the stream's lock, so no publish
    /// slips in between), frees its events and wakes its subscribers with
    /// `Closed`. Returns whether it was dropped.
    fn drop_stream(
        &self,
        run: &RunId,
        stream: &Arc<RunStream>,
        keep_going: impl FnOnce(&Arc<RunStream>, &StreamState) -> bool,
    ) -> bool {
        self.drop_stream_telling(run, stream, keep_going, true)
    }

    /// As [`StreamHub::drop_stream`]; `tell` says whether the dropped hook
    /// hears of it.
    fn drop_stream_telling(
        &self,
        run: &RunId,
        stream: &Arc<RunStream>,
        keep_going: impl FnOnce(&Arc<RunStream>, &StreamState) -> bool,
        tell: bool,
    ) -> bool {
        let removed = self.streams.remove_if(run, |_, current| {
            if !Arc::ptr_eq(current, stream) {
                return false;
            }
            let mut state = current.state.write();
            if state.closed || !keep_going(current, &state) {
                return false;
            }
            state.closed = true;
            let before = state.ring.bytes();
            state.ring.clear();
            self.account(before, 0);
            if tell && let Some(hooks) = &self.hooks {
                (hooks.dropped)(run, state.ring.epoch());
            }
            self.ids.write().remove(run);
            true
        });
        if removed.is_some() {
            stream.notify.notify_waiters();
        }
        removed.is_some()
    }
}

/// One batch as the authority stored it, for [`StreamHub::replicate`].
#[derive(Debug, Clone)]
pub struct ReplicaBatch<'a> {
    pub first_offset: u64,
    pub events: Vec<&'a str>,
}

/// What [`StreamHub::replicate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// Every batch is now held (some may have been held already).
    Applied,
    /// A batch starts beyond the head: offsets `head..` are missing here.
    /// Batches before it were applied, none after.
    Hole { head: u64 },
    /// The run has no stream here, or one with another epoch.
    Absent,
}

impl StreamHub {
    /// `run`'s stream, created (as by a publish: not idle) if it has none;
    /// its epoch. For an engine that must know the epoch before it stores
    /// a publish elsewhere.
    pub fn ensure(&self, run: &RunId, now: Instant) -> super::StreamEpoch {
        loop {
            let stream = self.get_or_create(run, Origin::Session, now);
            let state = stream.state.read();
            if !state.closed {
                return state.ring.epoch().clone();
            }
        }
    }

    /// `run`'s stream's epoch, head and idle time (`None`: a session is
    /// active), if it has one.
    pub fn head(&self, run: &RunId) -> Option<(super::StreamEpoch, u64, Option<Instant>)> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        (!state.closed).then(|| {
            (
                state.ring.epoch().clone(),
                state.ring.appended_head(),
                state.idle_since,
            )
        })
    }

    /// Appends batches another node stored to `run`'s stream, if it has
    /// `epoch`, and wakes its subscribers. Events are appended without
    /// their `seq` (the authority de-duplicated them); `last_seq` is the
    /// authority's mark after them.
    ///
    /// Events already held are skipped, so a batch may arrive twice (its
    /// publisher's own result and the broadcast). A batch beyond the head:
    /// if `authoritative` (the batches come from reading the authority's
    /// kept range, so what lies between was evicted there) the ring starts
    /// over at it with the same epoch, and readers behind get a gap as on
    /// any eviction; otherwise it stops and answers [`Replicated::Hole`].
    pub fn replicate(
        &self,
        run: &RunId,
        epoch: &super::StreamEpoch,
        batches: &[ReplicaBatch<'_>],
        last_seq: Option<u64>,
        authoritative: bool,
        now: Instant,
    ) -> Replicated {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return Replicated::Absent;
        };
        let mut state = stream.state.write();
        if state.closed || state.ring.epoch() != epoch {
            return Replicated::Absent;
        }
        let before = state.ring.bytes();
        let mut evicted = 0;
        let mut moved = false;
        let mut answer = Replicated::Applied;
        for batch in batches {
            let head = state.ring.appended_head();
            let end = batch.first_offset + batch.events.len() as u64;
            if end <= head {
                continue;
            }
            if batch.first_offset > head {
                if !authoritative {
                    answer = Replicated::Hole { head };
                    break;
                }
                let last = state.ring.last_seq();
                evicted += state.ring.len();
                state.ring = Ring::restored(
                    run.clone(),
                    epoch.clone(),
                    self.ring_limits(),
                    batch.first_offset,
                    last,
                );
            }
            let skip = (state.ring.appended_head() - batch.first_offset) as usize;
            let events: Vec<NewEvent<'_>> = batch.events[skip..]
                .iter()
                .map(|json| NewEvent { json, seq: None })
                .collect();
            match state.ring.append(&events) {
                Ok(appended) => evicted += appended.evicted,
                Err(e) => {
                    // This node's limits are smaller than the publisher's:
                    // the batch cannot be held here, and a ring cannot have
                    // a hole, so it starts over after it (readers get a gap).
                    tracing::warn!(run = %run, error = %e, "replica: a batch exceeds this node's stream limits; skipped");
                    let last = state.ring.last_seq();
                    evicted += state.ring.len();
                    state.ring =
                        Ring::restored(run.clone(), epoch.clone(), self.ring_limits(), end, last);
                }
            }
            moved = true;
        }
        state.ring.set_last_seq(last_seq);
        self.account(before, state.ring.bytes());
        if moved {
            state.last_publish = now;
        }
        drop(state);
        self.evicted_events.fetch_add(evicted, Ordering::Relaxed);
        if moved {
            stream.notify.notify_waiters();
            if self.total_bytes() > self.limits.global_max_bytes {
                // A replica keeps what the authority kept; only idle
                // streams make room here.
                self.enforce_budget(None, 0);
            }
        }
        answer
    }

    /// Makes `ring` `run`'s stream, closing the one it had (its
    /// subscribers get [`super::Delivery::Closed`] and resume into this
    /// one): the authority holds another history of the run.
    pub fn replace(&self, ring: Ring, idle_since: Option<Instant>, now: Instant) {
        let run = ring.run().clone();
        // Counted before anyone can see it, so a drop can never subtract
        // bytes that were not added.
        self.account(0, ring.bytes());
        let stream = Arc::new(RunStream::new(ring, idle_since, now));
        self.ids.write().insert(run.clone());
        let Some(old) = self.streams.insert(run, stream) else {
            return;
        };
        let mut state = old.state.write();
        if !state.closed {
            state.closed = true;
            let before = state.ring.bytes();
            state.ring.clear();
            self.account(before, 0);
        }
        drop(state);
        old.notify.notify_waiters();
    }

    /// Sets whether `run`'s stream (if it has `epoch`) is idle, and since
    /// when, as the authority recorded it.
    pub fn set_idle(&self, run: &RunId, epoch: &super::StreamEpoch, idle_since: Option<Instant>) {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return;
        };
        let mut state = stream.state.write();
        if !state.closed && state.ring.epoch() == epoch {
            state.idle_since = idle_since;
        }
    }

    /// Drops `run`'s stream if it has `epoch` (the authority dropped it),
    /// closing its subscribers; the hooks are not told.
    pub fn remove_replica(&self, run: &RunId, epoch: &super::StreamEpoch) -> bool {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return false;
        };
        self.drop_stream_telling(run, &stream, |_, state| state.ring.epoch() == epoch, false)
    }

    /// Marks `run`'s stream (if it has `epoch`) ended as the authority
    /// recorded it, and wakes its subscribers. False if this replica does
    /// not hold every event before the end yet (catch up first: nothing is
    /// appended to an ended ring).
    pub fn apply_end(&self, run: &RunId, epoch: &super::StreamEpoch, end: Arc<RunEnd>) -> bool {
        let Some(stream) = self.streams.get(run).map(|s| s.clone()) else {
            return false;
        };
        let mut state = stream.state.write();
        if state.closed || state.ring.epoch() != epoch {
            return false;
        }
        if state.ring.end().is_some() {
            return true;
        }
        if state.ring.appended_head() < end.next_offset {
            return false;
        }
        state.ring.set_end(end, true);
        drop(state);
        stream.notify.notify_waiters();
        true
    }

    /// Every run with a stream here.
    pub fn run_ids(&self) -> Vec<RunId> {
        self.streams.iter().map(|e| e.key().clone()).collect()
    }
}

fn summarize(ring: &Ring) -> StreamSummary {
    StreamSummary {
        run_id: ring.run().clone(),
        stream_epoch: ring.epoch().clone(),
        first_offset: ring.first_offset(),
        next_offset: ring.next_offset(),
        end: ring.visible_end().cloned(),
    }
}

/// A reader of one run's stream: nothing but the stream and a cursor.
///
/// There is no replay phase and no per-subscriber queue: each
/// [`Subscription::next`] reads the ring from the cursor, and a slow reader
/// costs nothing until it reads again (by then it may get a gap).
pub struct Subscription {
    stream: Arc<RunStream>,
    /// The next offset this subscriber is owed.
    cursor: u64,
    max_events: usize,
}

impl Subscription {
    /// The next offset this subscriber will be sent.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Waits until there is something for the cursor and returns it: frames
    /// covering the next (up to about `max_events_per_delivery`) events, a
    /// gap, or `Closed` once the stream was dropped from the hub (history
    /// gone; resume again for the run's new stream).
    ///
    /// Cancel-safe: the cursor moves only when a delivery is returned, so
    /// dropping the future (in a `select!`) loses nothing.
    pub async fn next(&mut self) -> Delivery {
        let max = self.max_events;
        self.wait(|ring, cursor| match ring.read_frames(cursor, max) {
            Read::UpToDate => ended(ring, cursor).map(|e| (Delivery::Ended(e), cursor)),
            Read::Gap {
                from,
                to,
                resume_at,
            } => Some((
                Delivery::Gap {
                    frame: ring.gap_frame(from, to),
                    from,
                    to,
                },
                resume_at,
            )),
            Read::Items { items, next_cursor } => Some((Delivery::Frames(items), next_cursor)),
        })
        .await
        .unwrap_or(Delivery::Closed)
    }

    /// As [`Subscription::next`], but single events (for SSE) instead of
    /// frames; each event's JSON is a slice of the stored frame.
    pub async fn next_events(&mut self) -> EventDelivery {
        let max = self.max_events;
        self.wait(|ring, cursor| match ring.read_events(cursor, max) {
            Read::UpToDate => ended(ring, cursor).map(|e| (EventDelivery::Ended(e), cursor)),
            Read::Gap {
                from,
                to,
                resume_at,
            } => Some((EventDelivery::Gap { from, to }, resume_at)),
            Read::Items { items, next_cursor } => Some((EventDelivery::Events(items), next_cursor)),
        })
        .await
        .unwrap_or(EventDelivery::Closed)
    }

    /// The race-free wait: register for the wake-up, *then* look at the
    /// ring, and sleep only if there was nothing. An append that lands after
    /// the look finds this waiter registered and wakes it; one that landed
    /// before is seen by the look. `None` means the stream was closed.
    async fn wait<T>(&mut self, mut read: impl FnMut(&Ring, u64) -> Option<(T, u64)>) -> Option<T> {
        loop {
            let mut notified = pin!(self.stream.notify.notified());
            notified.as_mut().enable();
            {
                let state = self.stream.state.read();
                if state.closed {
                    return None;
                }
                if let Some((delivery, next_cursor)) = read(&state.ring, self.cursor) {
                    self.cursor = next_cursor;
                    return Some(delivery);
                }
            }
            notified.await;
        }
    }
}

/// The end, for a reader at the head of an ended ring.
fn ended(ring: &Ring, cursor: u64) -> Option<Arc<RunEnd>> {
    ring.visible_end()
        .filter(|e| cursor >= e.next_offset)
        .cloned()
}

impl StreamSubscription for Subscription {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Delivery> + Send + '_>> {
        Box::pin(Subscription::next(self))
    }

    fn next_events(&mut self) -> Pin<Box<dyn Future<Output = EventDelivery> + Send + '_>> {
        Box::pin(Subscription::next_events(self))
    }

    fn cursor(&self) -> u64 {
        self.cursor
    }
}

impl StreamEngine for StreamHub {
    fn publish(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        let result = StreamHub::publish(self, run, events.iter().copied(), now);
        Box::pin(std::future::ready(result))
    }

    fn resume(
        &self,
        run: &RunId,
        from_offset: Option<u64>,
        epoch: Option<&str>,
        now: Instant,
    ) -> Result<(ResumeInfo, Box<dyn StreamSubscription>), StreamError> {
        let (info, sub) = StreamHub::resume(self, run, from_offset, epoch, now);
        Ok((info, Box::new(sub)))
    }

    fn runs(&self) -> Vec<StreamSummary> {
        StreamHub::runs(self)
    }

    fn runs_matching(
        &self,
        selectors: &[super::RunSelector<'_>],
        after: Option<&RunId>,
        limit: usize,
    ) -> Vec<StreamSummary> {
        StreamHub::runs_matching(self, selectors, after, limit)
    }

    fn summary(&self, run: &RunId) -> Option<StreamSummary> {
        StreamHub::summary(self, run)
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            streams: self.len(),
            bytes: self.total_bytes(),
            evicted_events: self.evicted_events(),
            log_bytes: 0,
        }
    }

    fn session_started(&self, run: &RunId, now: Instant) {
        StreamHub::session_started(self, run, now);
    }

    fn session_ended(&self, run: &RunId, now: Instant) {
        StreamHub::session_ended(self, run, now);
    }

    fn sweep(&self, now: Instant) -> SweepOutcome {
        StreamHub::sweep(self, now)
    }

    fn finish(
        &self,
        run: &RunId,
        end: EndRequest,
        now: Instant,
    ) -> StreamFuture<Result<Arc<RunEnd>, StreamError>> {
        let result = StreamHub::finish(self, run, end, now).map(|(e, _)| e);
        Box::pin(std::future::ready(result))
    }

    fn ended(&self, run: &RunId) -> Option<Arc<RunEnd>> {
        StreamHub::ended(self, run)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::FutureExt;

    use super::*;
    use crate::stream::tests::decode;

    fn run(name: &str) -> RunId {
        RunId::new(name).unwrap()
    }

    fn ev(i: u64) -> String {
        format!(r#"{{"type":"t","data":{i}}}"#)
    }

    fn publish(
        hub: &StreamHub,
        r: &RunId,
        range: std::ops::Range<u64>,
        now: Instant,
    ) -> PublishOutcome {
        let texts: Vec<String> = range.map(ev).collect();
        hub.publish(
            r,
            texts.iter().map(|t| NewEvent { json: t, seq: None }),
            now,
        )
        .unwrap()
    }

    fn frames(d: Delivery) -> Vec<Bytes> {
        match d {
            Delivery::Frames(f) => f,
            other => panic!("expected frames, got {other:?}"),
        }
    }

    fn offsets(frames: &[Bytes]) -> Vec<u64> {
        frames
            .iter()
            .flat_map(|f| decode(f))
            .map(|(o, _)| o)
            .collect()
    }

    fn small(max_events: usize) -> StreamLimits {
        StreamLimits {
            max_events_per_run: max_events,
            ..StreamLimits::default()
        }
    }

    #[test]
    fn hub_and_subscriptions_are_shareable() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<StreamHub>();
        send_sync::<Arc<dyn StreamEngine>>();
        let hub = StreamHub::new(StreamLimits::default());
        let (_, mut sub) = hub.resume(&run("r"), None, None, Instant::now());
        send(&sub.next());
        send(&sub.next_events());
    }

    #[test]
    fn resume_at_head_then_receive_next_publish() {
        let hub = StreamHub::new(StreamLimits::default());
        let r = run("r");
        let now = Instant::now();
        publish(&hub, &r, 0..3, now);
        let (info, mut sub) = hub.resume(&r, Some(3), None, now);
        assert_eq!((info.start_offset, info.truncated), (3, false));
        assert!(sub.next().now_or_never().is_none());
        publish(&hub, &r, 3..5, now);
        assert_eq!(
            offsets(&frames(sub.next().now_or_never().unwrap())),
            vec![3, 4]
        );
        assert!(sub.next().now_or_never().is_none());
        assert_eq!(sub.cursor(), 5);
    }

    #[tokio::test]
    async fn resume_before_the_run_exists_then_first_events_arrive() {
        let hub = Arc::new(StreamHub::new(StreamLimits::default()));
        let r = run("not-yet");
        assert!(hub.summary(&r).is_none());
        let (info, mut sub) = hub.resume(&r, None, None, Instant::now());
        assert_eq!(
            (info.first_offset, info.next_offset, info.start_offset),
            (0, 0, 0)
        );
        assert!(!info.truncated);
        // The stream now exists with that epoch, so a publish lands in it.
        assert_eq!(hub.summary(&r).unwrap().stream_epoch, info.stream_epoch);
        let waiter = tokio::spawn(async move { sub.next().await });
        tokio::task::yield_now().await;
        let texts = [r#"{"type":"first"}"#];
        hub.publish(
            &r,
            texts.iter().map(|t| NewEvent {
                json: t,
                seq: Some(1),
            }),
            Instant::now(),
        )
        .unwrap();
        let got = frames(waiter.await.unwrap());
        assert_eq!(decode(&got[0]), vec![(0, texts[0].to_owned())]);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_is_woken_by_every_publish() {
        let hub = Arc::new(StreamHub::new(StreamLimits::default()));
        let r = run("r");
        let (_, mut sub) = hub.resume(&r, Some(0), None, Instant::now());
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 200 {
                seen.extend(offsets(&frames(sub.next().await)));
            }
            seen
        });
        for i in 0..100 {
            publish(&hub, &r, i * 2..i * 2 + 2, Instant::now());
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(reader.await.unwrap(), (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn all_subscribers_at_a_boundary_share_one_frame() {
        let hub = StreamHub::new(StreamLimits::default());
        let r = run("r");
        let now = Instant::now();
        let mut subs: Vec<Subscription> =
            (0..10).map(|_| hub.resume(&r, None, None, now).1).collect();
        publish(&hub, &r, 0..100, now);
        let got: Vec<Bytes> = subs
            .iter_mut()
            .map(|s| frames(s.next().now_or_never().unwrap()).remove(0))
            .collect();
        for f in &got {
            assert_eq!(f.as_ptr(), got[0].as_ptr());
            assert_eq!(f.len(), got[0].len());
        }
        // A resume from 0 later still gets the very same bytes.
        let (_, mut late) = hub.resume(&r, Some(0), None, now);
        assert_eq!(
            frames(late.next().now_or_never().unwrap())[0].as_ptr(),
            got[0].as_ptr()
        );
        // Mid-batch: a fresh frame, same events.
        let (_, mut mid) = hub.resume(&r, Some(40), None, now);
        let f = frames(mid.next().now_or_never().unwrap());
        assert_ne!(f[0].as_ptr(), got[0].as_ptr());
        assert_eq!(offsets(&f), (40..100).collect::<Vec<_>>());
    }

    #[test]
    fn resume_rules() {
        let hub = StreamHub::new(small(5));
        let r = run("r");
        let now = Instant::now();
        publish(&hub, &r, 0..4, now);
        publish(&hub, &r, 4..8, now); // keeps 3..8
        let s = hub.summary(&r).unwrap();
        assert_eq!((s.first_offset, s.next_offset), (3, 8));
        let epoch = s.stream_epoch.to_string();
        let wrong = "f".repeat(32);
        let case = |from, e: Option<&str>| {
            let (i, sub) = hub.resume(&r, from, e, now);
            assert_eq!(sub.cursor(), i.start_offset);
            assert_eq!((i.first_offset, i.next_offset), (3, 8));
            (i.start_offset, i.truncated)
        };
        assert_eq!(case(None, None), (8, false));
        assert_eq!(case(None, Some(&epoch)), (8, false));
        assert_eq!(case(None, Some(&wrong)), (8, true));
        assert_eq!(case(Some(5), Some(&wrong)), (3, true));
        assert_eq!(case(Some(0), Some(&epoch)), (3, true));
        assert_eq!(case(Some(2), None), (3, true));
        assert_eq!(case(Some(3), None), (3, false));
        assert_eq!(case(Some(6), Some(&epoch)), (6, false));
        assert_eq!(case(Some(8), Some(&epoch)), (8, false));
        assert_eq!(case(Some(50), Some(&epoch)), (8, false));
        assert_eq!(case(Some(50), None), (3, true));
    }

    #[test]
    fn too_large_batches_are_refused_whole() {
        let hub = StreamHub::new(small(5));
        let r = run("r");
        let texts: Vec<String> = (0..6).map(ev).collect();
        let err = hub
            .publish(
                &r,
                texts.iter().map(|t| NewEvent { json: t, seq: None }),
                Instant::now(),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            StreamError::TooLarge {
                events: 6,
                max_events: 5,
                ..
            }
        ));
        assert_eq!(hub.summary(&r).unwrap().next_offset, 0);
        assert_eq!(hub.total_bytes(), 0);
    }

    #[test]
    fn slow_subscriber_gets_exact_gap_then_continues() {
        let hub = StreamHub::new(small(4));
        let r = run("r");
        let now = Instant::now();
        let (_, mut slow) = hub.resume(&r, Some(0), None, now);
        for i in 0..5 {
            publish(&hub, &r, i * 2..i * 2 + 2, now);
        }
        match slow.next().now_or_never().unwrap() {
            Delivery::Gap { frame, from, to } => {
                assert_eq!((from, to), (0, 5));
                let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                assert_eq!(v["type"], "stream.gap");
                assert_eq!(v["payload"]["runId"], "r");
                assert_eq!(v["payload"]["fromOffset"], 0);
                assert_eq!(v["payload"]["toOffset"], 5);
            }
            other => panic!("expected a gap, got {other:?}"),
        }
        assert_eq!(
            offsets(&frames(slow.next().now_or_never().unwrap())),
            vec![6, 7, 8, 9]
        );
        // SSE readers see the same gap.
        let (_, mut sse) = hub.resume(&r, Some(6), None, now);
        publish(&hub, &r, 10..13, now);
        assert_eq!(
            sse.next_events().now_or_never().unwrap(),
            EventDelivery::Gap { from: 6, to: 8 }
        );
        let EventDelivery::Events(events) = sse.next_events().now_or_never().unwrap() else {
            panic!("expected events")
        };
        assert_eq!(
            events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![9, 10, 11, 12]
        );
        assert_eq!(&events[1].json[..], ev(10).as_bytes());
    }

    #[test]
    fn retention_drops_idle_streams_and_closes_subscribers() {
        let limits = StreamLimits {
            retention: Duration::from_secs(60),
            ..StreamLimits::default()
        };
        let hub = StreamHub::new(limits);
        let r = run("r");
        let t0 = Instant::now();
        hub.session_started(&r, t0);
        publish(&hub, &r, 0..3, t0);
        let old_epoch = hub.summary(&r).unwrap().stream_epoch;
        let (_, mut sub) = hub.resume(&r, None, None, t0);
        // Active sessions are never expired.
        assert_eq!(hub.sweep(t0 + Duration::from_secs(3600)).expired_streams, 0);
        hub.session_ended(&r, t0 + Duration::from_secs(10));
        assert_eq!(hub.sweep(t0 + Duration::from_secs(69)).expired_streams, 0);
        assert!(sub.next().now_or_never().is_none());
        assert_eq!(hub.sweep(t0 + Duration::from_secs(70)).expired_streams, 1);
        assert!(hub.summary(&r).is_none());
        assert_eq!(hub.total_bytes(), 0);
        assert_eq!(sub.next().now_or_never(), Some(Delivery::Closed));
        assert_eq!(
            sub.next_events().now_or_never(),
            Some(EventDelivery::Closed)
        );
        // The run's next stream is a new history.
        let (info, _) = hub.resume(&r, Some(3), Some(old_epoch.as_str()), t0);
        assert_ne!(info.stream_epoch, old_epoch);
        assert_eq!(
            (info.start_offset, info.next_offset, info.truncated),
            (0, 0, true)
        );
    }

    #[tokio::test]
    async fn a_waiting_subscriber_is_woken_with_closed() {
        let limits = StreamLimits {
            retention: Duration::ZERO,
            ..StreamLimits::default()
        };
        let hub = StreamHub::new(limits);
        let r = run("r");
        let now = Instant::now();
        publish(&hub, &r, 0..1, now);
        let (_, mut sub) = hub.resume(&r, None, None, now);
        let waiter = tokio::spawn(async move { sub.next().await });
        tokio::task::yield_now().await;
        hub.session_ended(&r, now);
        assert_eq!(hub.sweep(now).expired_streams, 1);
        assert_eq!(waiter.await.unwrap(), Delivery::Closed);
    }

    #[test]
    fn an_empty_watched_stream_outlives_retention() {
        let limits = StreamLimits {
            retention: Duration::from_secs(1),
            ..StreamLimits::default()
        };
        let hub = StreamHub::new(limits);
        let r = run("later");
        let now = Instant::now();
        let (info, sub) = hub.resume(&r, None, None, now);
        let later = now + Duration::from_secs(5);
        assert_eq!(hub.sweep(later).expired_streams, 0);
        assert_eq!(hub.summary(&r).unwrap().stream_epoch, info.stream_epoch);
        drop(sub);
        assert_eq!(hub.sweep(later).expired_streams, 1);
    }

    #[test]
    fn global_budget_drops_idle_streams_first_then_trims_active() {
        // Measure one 10-event frame (run ids all 6 characters long, so
        // every stream's frame has this size), then allow three and a half.
        let probe = StreamHub::new(StreamLimits::default());
        publish(&probe, &run("same-6"), 0..10, Instant::now());
        let one = probe.total_bytes();
        let limits = StreamLimits {
            global_max_bytes: one * 3 + one / 2,
            ..StreamLimits::default()
        };
        let hub = StreamHub::new(limits);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let (idle_old, idle_new, active_old, active_new) =
            (run("idle-1"), run("idle-2"), run("actv-1"), run("actv-2"));
        publish(&hub, &active_old, 0..10, at(1));
        publish(&hub, &idle_old, 0..10, at(2));
        publish(&hub, &idle_new, 0..10, at(3));
        hub.session_ended(&idle_old, at(4));
        hub.session_ended(&idle_new, at(4));
        let (_, mut watcher) = hub.resume(&idle_old, Some(0), None, at(4));
        assert_eq!(hub.total_bytes(), one * 3);
        // Over budget: the least recently published idle stream goes.
        publish(&hub, &active_new, 0..10, at(5));
        assert!(hub.summary(&idle_old).is_none());
        assert!(hub.summary(&idle_new).is_some());
        assert_eq!(hub.total_bytes(), one * 3);
        assert_eq!(watcher.next().now_or_never(), Some(Delivery::Closed));
        // Again: the other idle one, before any active stream is touched.
        publish(&hub, &active_new, 10..20, at(6));
        assert!(hub.summary(&idle_new).is_none());
        assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
        // No idle streams left: the publisher pays with its own oldest
        // events; the other active stream keeps all of its history.
        publish(&hub, &active_new, 20..30, at(7));
        assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
        assert!(
            hub.summary(&active_new).unwrap().first_offset > 0,
            "the publisher's own oldest events trimmed"
        );
        assert!(hub.total_bytes() <= hub.limits().global_max_bytes);
        // A third active run with no history to give: refused, nothing
        // stored, nobody else trimmed.
        let third = run("actv-3");
        hub.session_started(&third, at(8));
        let texts: Vec<String> = (0..10).map(ev).collect();
        let refused = hub.publish(
            &third,
            texts.iter().map(|t| NewEvent { json: t, seq: None }),
            at(8),
        );
        assert!(
            matches!(refused, Err(StreamError::BudgetFull { .. })),
            "{refused:?}"
        );
        assert!(hub.summary(&third).is_none_or(|s| s.next_offset == 0));
        assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
        assert!(hub.total_bytes() <= hub.limits().global_max_bytes);
        let listed: Vec<String> = hub.runs().iter().map(|s| s.run_id.to_string()).collect();
        assert_eq!(listed, vec!["actv-1", "actv-2", "actv-3"]);
    }

    #[test]
    fn a_publish_after_a_drop_starts_a_new_history() {
        let limits = StreamLimits {
            retention: Duration::ZERO,
            ..StreamLimits::default()
        };
        let hub = StreamHub::new(limits);
        let r = run("r");
        let now = Instant::now();
        let seq = [(r#"{"a":1}"#, Some(1))];
        hub.publish(
            &r,
            seq.iter().map(|(json, seq)| NewEvent { json, seq: *seq }),
            now,
        )
        .unwrap();
        let old = hub.summary(&r).unwrap();
        hub.session_ended(&r, now);
        hub.sweep(now);
        let out = hub
            .publish(
                &r,
                seq.iter().map(|(json, seq)| NewEvent { json, seq: *seq }),
                now,
            )
            .unwrap();
        // History (and with it dedupe state) is gone; the epoch says so.
        assert_eq!((out.first_offset, out.accepted), (0, 1));
        assert_ne!(hub.summary(&r).unwrap().stream_epoch, old.stream_epoch);
    }

    #[test]
    fn replicate_skips_what_it_holds_and_stops_at_a_hole() {
        let hub = StreamHub::new(StreamLimits::default());
        let r = run("r");
        let now = Instant::now();
        let epoch = hub.ensure(&r, now);
        let (_, mut sub) = hub.resume(&r, Some(0), None, now);
        let texts: Vec<String> = (0..6).map(ev).collect();
        let batch = |first: u64, to: u64| ReplicaBatch {
            first_offset: first,
            events: texts[first as usize..to as usize]
                .iter()
                .map(String::as_str)
                .collect(),
        };
        let other = super::super::StreamEpoch::generate();
        assert_eq!(
            hub.replicate(&r, &other, &[batch(0, 2)], None, false, now),
            Replicated::Absent
        );
        assert_eq!(
            hub.replicate(&r, &epoch, &[batch(0, 2)], Some(2), false, now),
            Replicated::Applied
        );
        // Again (the broadcast after the publisher's own result), and one
        // that overlaps: only the new part is appended.
        assert_eq!(
            hub.replicate(&r, &epoch, &[batch(0, 2), batch(1, 3)], None, false, now),
            Replicated::Applied
        );
        assert_eq!(
            hub.replicate(&r, &epoch, &[batch(4, 6)], None, false, now),
            Replicated::Hole { head: 3 }
        );
        assert_eq!(
            offsets(&frames(sub.next().now_or_never().unwrap())),
            vec![0, 1, 2]
        );
        // From the authority's kept range: 3 was evicted there.
        assert_eq!(
            hub.replicate(&r, &epoch, &[batch(4, 6)], Some(6), true, now),
            Replicated::Applied
        );
        assert!(matches!(
            sub.next().now_or_never(),
            Some(Delivery::Gap { from: 3, to: 3, .. })
        ));
        assert_eq!(
            offsets(&frames(sub.next().now_or_never().unwrap())),
            vec![4, 5]
        );
        let s = hub.summary(&r).unwrap();
        assert_eq!((s.first_offset, s.next_offset), (4, 6));
    }

    #[test]
    fn replace_closes_the_old_history_and_keeps_the_byte_count() {
        let hub = StreamHub::new(StreamLimits::default());
        let r = run("r");
        let now = Instant::now();
        publish(&hub, &r, 0..3, now);
        let (_, mut sub) = hub.resume(&r, Some(0), None, now);
        let epoch = super::super::StreamEpoch::generate();
        hub.replace(
            Ring::restored(r.clone(), epoch.clone(), hub.ring_limits(), 7, None),
            None,
            now,
        );
        assert_eq!(hub.total_bytes(), 0);
        assert_eq!(
            sub.next().now_or_never(),
            Some(Delivery::Closed),
            "the old history's reader is told"
        );
        let (info, _) = hub.resume(&r, Some(0), None, now);
        assert_eq!((info.stream_epoch, info.first_offset), (epoch.clone(), 7));
        assert!(hub.remove_replica(&r, &epoch));
        assert!(hub.summary(&r).is_none());
    }

    #[tokio::test]
    async fn the_engine_trait_delegates() {
        let engine: Arc<dyn StreamEngine> = Arc::new(StreamHub::new(StreamLimits::default()));
        let r = run("r");
        let now = Instant::now();
        engine.session_started(&r, now);
        let (info, mut sub) = engine.resume(&r, Some(0), None, now).unwrap();
        assert_eq!(info.start_offset, 0);
        let out = engine
            .publish(
                &r,
                &[NewEvent {
                    json: "{}",
                    seq: None,
                }],
                now,
            )
            .await
            .unwrap();
        assert_eq!(
            out,
            PublishOutcome {
                first_offset: 0,
                accepted: 1,
                duplicates: 0,
                next_offset: 1
            }
        );
        assert_eq!(offsets(&frames(sub.next().await)), vec![0]);
        assert_eq!(sub.cursor(), 1);
        assert_eq!(engine.runs().len(), 1);
        assert_eq!(engine.stats().streams, 1);
        assert_eq!(engine.summary(&r).unwrap().next_offset, 1);
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["streamEpoch"], info.stream_epoch.as_str());
        assert_eq!(json["startOffset"], 0);
    }
}
