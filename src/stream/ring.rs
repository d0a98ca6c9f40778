//! One run's output history: a bounded ring of published batches.
//!
//! Owns offsets (contiguous from 0, never reused within an epoch), the
//! stream epoch, `seq` de-duplication, the per-run count and byte bounds and
//! their eviction, and answering "what does a reader at offset N get next".
//! A batch is stored as the `stream.events` frame built for it at append
//! time (see [`super::frame`]) plus where each event's JSON sits inside it,
//! so fan-out and SSE never copy an event.
//! Must not lock, wait, wake anyone or read a clock: it is a plain value the
//! hub keeps behind a lock, and it is tested as one.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::frame::{FrameBuilder, gap_frame};
use super::{
    EndRequest, PublishOutcome, PublishedEvent, RunEnd, StreamEpoch, StreamError, StreamEvent,
};
use crate::ids::RunId;

/// Epochs a ring answers to besides its own, at most: each a proposal
/// that lost a race to create the stream (Redis keeps as many: the
/// create script is given this bound).
pub const MAX_ALIASES: usize = 8;

/// The per-run bounds. The oldest events are evicted, whole, to stay
/// within both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLimits {
    pub max_events: usize,
    /// Counted as the bytes of the stored frames (see [`Ring::bytes`]).
    pub max_bytes: usize,
}

/// What [`Ring::append`] did with a batch.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The offset of the first accepted event (the old head; also the head
    /// when nothing was accepted).
    pub first_offset: u64,
    pub accepted: usize,
    /// Events dropped because their `seq` was not above the highest seen.
    pub duplicates: usize,
    /// The frame every subscriber at the batch boundary is sent; `None`
    /// when nothing was accepted.
    pub frame: Option<Bytes>,
    /// Older events evicted to make room.
    pub evicted: u64,
    /// The offset the next accepted event gets, after this batch.
    pub next_offset: u64,
}

impl Appended {
    /// What the publish did, as its publisher is told.
    pub fn outcome(&self) -> PublishOutcome {
        PublishOutcome {
            first_offset: self.first_offset,
            accepted: self.accepted,
            duplicates: self.duplicates,
            next_offset: self.next_offset,
        }
    }
}

/// What a reader at some cursor gets next: see [`Ring::read_frames`] and
/// [`Ring::read_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// The cursor is at the head: nothing to send until the next append.
    UpToDate,
    /// Offsets `from..=to` were evicted before the reader got them; it goes
    /// on at `resume_at` (the oldest kept offset, `to + 1`).
    Gap { from: u64, to: u64, resume_at: u64 },
    /// The next items in offset order; the reader goes on at `next_cursor`.
    Items { items: Vec<T>, next_cursor: u64 },
}

/// One publish's accepted events, as stored.
#[derive(Debug)]
struct Batch {
    /// The complete `stream.events` frame for the whole batch.
    frame: Bytes,
    /// The offset of the batch's first event. Eviction may have removed some
    /// of its head already; the batch leaves the ring with its last event.
    first_offset: u64,
    /// Where each event's JSON sits in `frame`, in offset order.
    spans: Vec<Range<usize>>,
    /// The ring's `seq` high-water mark just after this batch.
    last_seq: Option<u64>,
}

impl Batch {
    fn end_offset(&self) -> u64 {
        self.first_offset + self.spans.len() as u64
    }

    /// The bytes of `frame` charged to event `i`: its own entry, the comma
    /// before it, the frame's header for the first event and its tail for
    /// the last, so a batch's charges add up to exactly `frame.len()`.
    fn charge(&self, i: usize) -> usize {
        let end = |j: usize| {
            if j + 1 == self.spans.len() {
                self.frame.len()
            } else {
                self.spans[j].end
            }
        };
        if i == 0 {
            end(0)
        } else {
            end(i) - self.spans[i - 1].end
        }
    }

    fn event(&self, offset: u64) -> &[u8] {
        &self.frame[self.spans[(offset - self.first_offset) as usize].clone()]
    }
}

/// One run's ring buffer. See the module docs.
#[derive(Debug)]
pub struct Ring {
    run: RunId,
    epoch: StreamEpoch,
    limits: RingLimits,
    /// Oldest first. Only the front batch may be partly evicted.
    batches: VecDeque<Batch>,
    /// The oldest kept offset; equals `next_offset` when empty.
    first_offset: u64,
    /// The head readers see: every offset below it is readable (unless
    /// evicted). Equal to `appended_head` except in a durable engine, where
    /// batches become visible once they are in the log ([`Ring::commit`]).
    next_offset: u64,
    /// The offset the next accepted event gets.
    appended_head: u64,
    /// Sum of the charges of the kept events.
    bytes: usize,
    /// The highest `seq` ever accepted (also across evictions: dedupe must
    /// not forget what it has stored, only what it still holds).
    last_seq: Option<u64>,
    /// The high-water mark as of the visible head: what a snapshot may
    /// promise (appended batches not yet committed may never be).
    committed_last_seq: Option<u64>,
    /// Set once the run ended: nothing is appended after it.
    end: Option<Arc<RunEnd>>,
    /// Whether readers see the end yet (a durable engine shows it once it
    /// is in the log).
    end_visible: bool,
    /// Other epochs that name this history: the one this ring had before
    /// it [adopted](Ring::adopt_epoch) the authority's while still empty,
    /// and those other nodes did ([`Ring::add_aliases`]). A reader told one
    /// lost nothing. At most [`MAX_ALIASES`].
    aliases: Vec<StreamEpoch>,
    /// Events this ring dropped from its kept range by itself: its bounds
    /// on append, or a restart at a later offset (the hub counts the
    /// budget's trims on its own). The hub reads the difference a change
    /// made, for metrics.
    evicted: u64,
}

impl Ring {
    /// An empty ring with a fresh random epoch.
    pub fn new(run: RunId, limits: RingLimits) -> Ring {
        Ring::with_epoch(run, StreamEpoch::generate(), limits)
    }

    /// An empty ring with a given epoch (for an engine that restores one).
    pub fn with_epoch(run: RunId, epoch: StreamEpoch, limits: RingLimits) -> Ring {
        Ring {
            run,
            epoch,
            limits,
            batches: VecDeque::new(),
            first_offset: 0,
            next_offset: 0,
            appended_head: 0,
            bytes: 0,
            last_seq: None,
            committed_last_seq: None,
            end: None,
            end_visible: false,
            aliases: Vec::new(),
            evicted: 0,
        }
    }

    /// An empty ring continuing a history that was persisted: its kept
    /// range starts at `next_offset` and `seq` de-duplication remembers
    /// `last_seq`. The kept batches are then appended in order.
    pub fn restored(
        run: RunId,
        epoch: StreamEpoch,
        limits: RingLimits,
        next_offset: u64,
        last_seq: Option<u64>,
    ) -> Ring {
        let mut ring = Ring::with_epoch(run, epoch, limits);
        ring.first_offset = next_offset;
        ring.next_offset = next_offset;
        ring.appended_head = next_offset;
        ring.last_seq = last_seq;
        ring.committed_last_seq = last_seq;
        ring
    }

    /// The highest `seq` accepted so far.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Raises the `seq` high-water mark to `seq` (recovery replays events
    /// without their `seq` and restores the mark the log recorded).
    pub fn set_last_seq(&mut self, seq: Option<u64>) {
        if seq > self.last_seq {
            self.last_seq = seq;
        }
        if seq > self.committed_last_seq {
            self.committed_last_seq = seq;
        }
    }

    /// The `seq` high-water mark as of the visible head.
    pub fn committed_last_seq(&self) -> Option<u64> {
        self.committed_last_seq
    }

    /// The offset the next appended event gets (beyond [`Ring::next_offset`]
    /// while appended batches wait to be committed).
    pub fn appended_head(&self) -> u64 {
        self.appended_head
    }

    /// Makes appended batches up to `up_to` visible to readers; true if the
    /// head moved. Batches are committed in append order, whole.
    pub fn commit(&mut self, up_to: u64) -> bool {
        let up_to = up_to.min(self.appended_head);
        if up_to > self.next_offset {
            self.next_offset = up_to;
            if let Some(b) = self.batches.iter().rev().find(|b| b.end_offset() <= up_to)
                && b.last_seq > self.committed_last_seq
            {
                self.committed_last_seq = b.last_seq;
            }
            true
        } else {
            false
        }
    }

    /// The most recently appended batch: its first offset and event texts.
    pub fn last_batch(&self) -> Option<(u64, Vec<&[u8]>)> {
        let batch = self.batches.back()?;
        let from = batch.first_offset.max(self.first_offset);
        Some((
            from,
            (from..batch.end_offset()).map(|o| batch.event(o)).collect(),
        ))
    }

    /// The visible batches as (first offset, event JSON texts), oldest
    /// first; a partly evicted front batch is cut to its kept events. For
    /// writing a snapshot of the ring.
    pub fn visible_batches(&self) -> Vec<(u64, Vec<&[u8]>)> {
        let mut out = Vec::new();
        for batch in &self.batches {
            if batch.first_offset >= self.next_offset {
                break;
            }
            let from = batch.first_offset.max(self.first_offset);
            let events = (from..batch.end_offset()).map(|o| batch.event(o)).collect();
            out.push((from, events));
        }
        out
    }

    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// Takes `epoch` in place of a provisional one this node made up, if
    /// the ring never held anything (nothing appended, no end): no reader
    /// can have seen an offset of the old epoch, so readers stay and lose
    /// nothing. False (ring unchanged) otherwise.
    pub fn adopt_epoch(&mut self, epoch: StreamEpoch) -> bool {
        if self.appended_head != 0 || self.first_offset != 0 || self.end.is_some() {
            return false;
        }
        if self.epoch != epoch {
            let provisional = std::mem::replace(&mut self.epoch, epoch);
            self.add_aliases(&[provisional]);
        }
        true
    }

    /// Records `aliases` as naming this history too (see
    /// [`Ring::is_epoch`]), up to [`MAX_ALIASES`] in all.
    pub fn add_aliases(&mut self, aliases: &[StreamEpoch]) {
        for alias in aliases {
            if self.aliases.len() < MAX_ALIASES
                && *alias != self.epoch
                && !self.aliases.contains(alias)
            {
                self.aliases.push(alias.clone());
            }
        }
    }

    /// Whether `epoch` names this ring's history: its epoch, or an alias.
    pub fn is_epoch(&self, epoch: &str) -> bool {
        self.epoch.as_str() == epoch || self.aliases.iter().any(|a| a.as_str() == epoch)
    }

    pub fn epoch(&self) -> &StreamEpoch {
        &self.epoch
    }

    /// The oldest offset still kept (equal to [`Ring::next_offset`] when
    /// nothing is kept).
    pub fn first_offset(&self) -> u64 {
        // Eviction may reach batches not yet committed (a burst beyond the
        // ring's bounds while the log catches up); readers never see past
        // the visible head, so neither does the kept range.
        self.first_offset.min(self.next_offset)
    }

    /// The head: the offset the next accepted event will get.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// How many visible events are kept.
    pub fn len(&self) -> u64 {
        self.next_offset.saturating_sub(self.first_offset)
    }

    /// Events held, visible or not: what the bounds apply to.
    fn held(&self) -> u64 {
        self.appended_head - self.first_offset
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes charged to kept events: the frames' bytes, split among their
    /// events. While the oldest batch is partly evicted its frame is still
    /// held whole, so memory may exceed this by at most one batch (itself
    /// at most `max_bytes`); per-event bookkeeping (a range, 16 bytes) is
    /// not counted and is bounded by `max_events`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends the batch's events in order, atomically: either every event
    /// that is not a duplicate is stored, or (on error) nothing is and the
    /// `seq` high-water mark is unchanged.
    ///
    /// An event with `seq` not above the highest accepted so far (counting
    /// earlier events of the same batch) is a duplicate and dropped.
    /// A batch whose accepted events alone exceed either per-run bound is
    /// refused whole with [`StreamError::TooLarge`]: storing part of it would
    /// break atomicity, and storing all of it would evict it at once.
    pub fn append(&mut self, events: &[PublishedEvent<'_>]) -> Result<Appended, StreamError> {
        let appended = self.append_uncommitted(events)?;
        self.commit(self.appended_head);
        Ok(appended)
    }

    /// As [`Ring::append`], but readers do not see the batch until
    /// [`Ring::commit`] (a durable engine commits once the batch is logged).
    pub fn append_uncommitted(
        &mut self,
        events: &[PublishedEvent<'_>],
    ) -> Result<Appended, StreamError> {
        if let Some(end) = &self.end {
            return Err(StreamError::Ended {
                outcome: end.outcome,
            });
        }
        let mut last_seq = self.last_seq;
        let mut accepted: Vec<&str> = Vec::with_capacity(events.len());
        for event in events {
            if let Some(seq) = event.seq {
                if last_seq.is_some_and(|last| seq <= last) {
                    continue;
                }
                last_seq = Some(seq);
            }
            accepted.push(event.json);
        }
        let duplicates = events.len() - accepted.len();
        let first_offset = self.appended_head;
        if accepted.is_empty() {
            return Ok(Appended {
                first_offset,
                accepted: 0,
                duplicates,
                frame: None,
                evicted: 0,
                next_offset: first_offset,
            });
        }

        let json_bytes: usize = accepted.iter().map(|e| e.len()).sum();
        let too_large = |bytes| StreamError::TooLarge {
            events: accepted.len(),
            bytes,
            max_events: self.limits.max_events,
            max_bytes: self.limits.max_bytes,
        };
        // The raw JSON is a lower bound on the frame: refuse before building.
        if accepted.len() > self.limits.max_events || json_bytes > self.limits.max_bytes {
            return Err(too_large(json_bytes));
        }
        let mut builder = FrameBuilder::new(
            self.run.as_str(),
            self.epoch.as_str(),
            first_offset,
            accepted.len(),
            json_bytes,
        );
        let spans: Vec<Range<usize>> = accepted
            .iter()
            .map(|e| builder.push(e.as_bytes()))
            .collect();
        let frame = builder.finish();
        if frame.len() > self.limits.max_bytes {
            return Err(too_large(frame.len()));
        }

        let count = accepted.len();
        self.last_seq = last_seq;
        self.bytes += frame.len();
        self.appended_head += count as u64;
        self.batches.push_back(Batch {
            frame: frame.clone(),
            first_offset,
            spans,
            last_seq,
        });
        let mut evicted = 0;
        // The new batch fits on its own, so this never reaches into it.
        while self.held() > self.limits.max_events as u64 || self.bytes > self.limits.max_bytes {
            self.evict_oldest();
            evicted += 1;
        }
        self.evicted += evicted;
        Ok(Appended {
            first_offset,
            accepted: count,
            duplicates,
            frame: Some(frame),
            evicted,
            next_offset: self.appended_head,
        })
    }

    /// Evicts the oldest kept event, if any; returns the bytes freed.
    fn evict_oldest(&mut self) -> usize {
        let Some(front) = self.batches.front() else {
            return 0;
        };
        let i = (self.first_offset - front.first_offset) as usize;
        let freed = front.charge(i);
        let last_of_batch = i + 1 == front.spans.len();
        self.first_offset += 1;
        self.bytes -= freed;
        if last_of_batch {
            self.batches.pop_front();
        }
        freed
    }

    /// Evicts oldest events until at least `bytes` are freed or the ring
    /// is empty; returns (events evicted, bytes freed). Used by the hub to
    /// hold the global budget.
    pub fn trim(&mut self, bytes: usize) -> (u64, usize) {
        let (mut events, mut freed) = (0, 0);
        // Only visible events: the others are not in the log yet.
        while freed < bytes && self.first_offset < self.next_offset {
            freed += self.evict_oldest();
            events += 1;
        }
        (events, freed)
    }

    /// The run's end, visible to readers or not (see [`Ring::visible_end`]).
    pub fn end(&self) -> Option<&Arc<RunEnd>> {
        self.end.as_ref()
    }

    /// The end as readers see it: set, committed, and every event before it
    /// visible.
    pub fn visible_end(&self) -> Option<&Arc<RunEnd>> {
        self.end
            .as_ref()
            .filter(|e| self.end_visible && self.next_offset >= e.next_offset)
    }

    /// Ends the ring after every event appended so far (its head then is
    /// the run's whole output) and answers the end; `visible` as for
    /// [`Ring::set_end`].
    pub fn finish(&mut self, req: EndRequest, visible: bool) -> Arc<RunEnd> {
        let end = Arc::new(RunEnd::new(&self.run, &self.epoch, req, self.appended_head));
        self.set_end(end.clone(), visible);
        end
    }

    /// Marks the ring ended; `visible` false keeps readers from seeing it
    /// until [`Ring::commit_end`].
    pub fn set_end(&mut self, end: Arc<RunEnd>, visible: bool) {
        self.end = Some(end);
        self.end_visible = visible;
    }

    /// Lets readers see the end (it is durable). False if there is none or
    /// it was already visible.
    pub fn commit_end(&mut self) -> bool {
        let moved = self.end.is_some() && !self.end_visible;
        self.end_visible |= self.end.is_some();
        moved
    }

    /// Events this ring evicted by itself so far (see the field).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Drops every kept event and goes on at `next_offset`, beyond the
    /// head, with the same epoch and `seq` mark, as [`Ring::restored`]
    /// would: what a replica does when its authority no longer keeps what
    /// lies between. The dropped events count as evicted; readers behind
    /// get a gap as on any eviction.
    pub fn restart_at(&mut self, next_offset: u64) {
        let evicted = self.evicted + self.len();
        let (run, epoch) = (self.run.clone(), self.epoch.clone());
        *self = Ring::restored(run, epoch, self.limits, next_offset, self.last_seq);
        self.evicted = evicted;
    }

    /// Drops every kept event at once (offsets and epoch stay); returns the
    /// bytes freed.
    pub fn clear(&mut self) -> usize {
        let freed = self.bytes;
        self.batches.clear();
        self.first_offset = self.appended_head;
        self.next_offset = self.appended_head;
        self.bytes = 0;
        freed
    }

    /// Classifies `cursor`: `Err(read)` when it is not inside the kept range.
    ///
    /// A cursor beyond the head cannot come from a subscription (the hub
    /// clamps at resume and cursors only advance to the head); it is read
    /// as "up to date" rather than skipping offsets that do not exist yet.
    fn locate<T>(&self, cursor: u64) -> Result<usize, Read<T>> {
        if cursor < self.first_offset {
            return Err(Read::Gap {
                from: cursor,
                to: self.first_offset - 1,
                resume_at: self.first_offset,
            });
        }
        if cursor >= self.next_offset {
            // At the head, or beyond it: a reader resumed at an offset
            // another gateway's copy of this history already showed, which
            // this one has not applied yet. It waits until the head passes.
            return Err(Read::UpToDate);
        }
        Ok(self.batches.partition_point(|b| b.end_offset() <= cursor))
    }

    /// The frames a subscriber at `cursor` is sent next.
    ///
    /// At a batch boundary that is the batch's own shared frame (a reference
    /// count, no copy). In the middle of a batch (a resume mid-batch, or
    /// right after a gap into a partly evicted batch) it is a fresh frame for
    /// at most `max_events` of the batch's remaining events; after that the
    /// reader is on a boundary again. Whole batches are added while the total
    /// stays within `max_events`; the first is sent even if larger, since
    /// splitting it would cost a copy for nothing (a batch is itself bounded
    /// by the per-run limits).
    pub fn read_frames(&self, cursor: u64, max_events: usize) -> Read<Bytes> {
        let first_batch = match self.locate(cursor) {
            Ok(i) => i,
            Err(read) => return read,
        };
        let max_events = max_events.max(1) as u64;
        let mut cursor = cursor;
        let mut sent = 0u64;
        let mut frames = Vec::new();
        for batch in self.batches.range(first_batch..) {
            if batch.first_offset >= self.next_offset {
                break; // appended, not yet committed
            }
            let len = batch.spans.len() as u64;
            if cursor == batch.first_offset {
                if !frames.is_empty() && sent + len > max_events {
                    break;
                }
                frames.push(batch.frame.clone());
                sent += len;
                cursor += len;
            } else {
                // Only the first batch visited can be entered mid-way.
                let take = (batch.end_offset() - cursor).min(max_events - sent);
                frames.push(self.partial_frame(batch, cursor, take));
                sent += take;
                cursor += take;
                if cursor < batch.end_offset() {
                    break;
                }
            }
            if sent >= max_events {
                break;
            }
        }
        Read::Items {
            items: frames,
            next_cursor: cursor,
        }
    }

    /// A new frame for `count` events of `batch` starting at `from`.
    fn partial_frame(&self, batch: &Batch, from: u64, count: u64) -> Bytes {
        let offsets = from..from + count;
        let json_bytes = offsets.clone().map(|o| batch.event(o).len()).sum();
        let mut builder = FrameBuilder::new(
            self.run.as_str(),
            self.epoch.as_str(),
            from,
            count as usize,
            json_bytes,
        );
        for offset in offsets {
            builder.push(batch.event(offset));
        }
        builder.finish()
    }

    /// Up to `max_events` single events from `cursor`, each a slice of its
    /// batch's frame (for SSE, which sends one event per message).
    pub fn read_events(&self, cursor: u64, max_events: usize) -> Read<StreamEvent> {
        let first_batch = match self.locate(cursor) {
            Ok(i) => i,
            Err(read) => return read,
        };
        let end = self
            .next_offset
            .min(cursor.saturating_add(max_events.max(1) as u64));
        let mut items = Vec::with_capacity((end - cursor) as usize);
        let mut offset = cursor;
        for batch in self.batches.range(first_batch..) {
            while offset < end && offset < batch.end_offset() {
                let span = batch.spans[(offset - batch.first_offset) as usize].clone();
                items.push(StreamEvent {
                    offset,
                    json: batch.frame.slice(span),
                });
                offset += 1;
            }
            if offset >= end {
                break;
            }
        }
        Read::Items {
            items,
            next_cursor: offset,
        }
    }

    /// The `stream.gap` push for this ring.
    pub fn gap_frame(&self, from: u64, to: u64) -> Bytes {
        gap_frame(self.run.as_str(), self.epoch.as_str(), from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::tests::decode;

    fn run() -> RunId {
        RunId::new("run-1").unwrap()
    }

    fn ring(max_events: usize, max_bytes: usize) -> Ring {
        Ring::new(
            run(),
            RingLimits {
                max_events,
                max_bytes,
            },
        )
    }

    fn ev(i: u64) -> String {
        format!(r#"{{"type":"t","data":{i}}}"#)
    }

    fn publish(r: &mut Ring, range: Range<u64>) -> Appended {
        let texts: Vec<String> = range.map(ev).collect();
        let events: Vec<PublishedEvent<'_>> = texts
            .iter()
            .map(|t| PublishedEvent { json: t, seq: None })
            .collect();
        r.append(&events).unwrap()
    }

    #[test]
    fn only_a_ring_that_never_held_anything_adopts_another_epoch() {
        let mut empty = ring(10, 1 << 20);
        let provisional = empty.epoch().clone();
        let authority = StreamEpoch::generate();
        assert!(empty.adopt_epoch(authority.clone()));
        assert_eq!(empty.epoch(), &authority);
        assert!(empty.is_epoch(provisional.as_str()) && empty.is_epoch(authority.as_str()));
        assert!(!empty.is_epoch(StreamEpoch::generate().as_str()));
        // Its appends carry the adopted epoch.
        publish(&mut empty, 0..1);
        let (frames, _) = frames(empty.read_frames(0, 10));
        assert!(
            std::str::from_utf8(&frames[0])
                .unwrap()
                .contains(authority.as_str())
        );

        let mut held = ring(10, 1 << 20);
        publish(&mut held, 0..1);
        let before = held.epoch().clone();
        assert!(!held.adopt_epoch(StreamEpoch::generate()));
        assert_eq!(held.epoch(), &before);

        let mut restored = Ring::restored(run(), StreamEpoch::generate(), held.limits, 5, None);
        assert!(
            !restored.adopt_epoch(StreamEpoch::generate()),
            "offsets below 5 were someone's"
        );
    }

    fn with_seq<'a>(texts: &'a [(&'a str, Option<u64>)]) -> Vec<PublishedEvent<'a>> {
        texts
            .iter()
            .map(|(json, seq)| PublishedEvent { json, seq: *seq })
            .collect()
    }

    fn frames(read: Read<Bytes>) -> (Vec<Bytes>, u64) {
        match read {
            Read::Items { items, next_cursor } => (items, next_cursor),
            other => panic!("expected frames, got {other:?}"),
        }
    }

    fn all_events(frames: &[Bytes]) -> Vec<(u64, String)> {
        frames.iter().flat_map(|f| decode(f)).collect()
    }

    #[test]
    fn offsets_are_contiguous_and_frames_carry_raw_events() {
        let mut r = ring(100, 1 << 20);
        assert_eq!(r.epoch().as_str().len(), 32);
        let a = publish(&mut r, 0..3);
        assert_eq!((a.first_offset, a.accepted, a.duplicates), (0, 3, 0));
        let b = publish(&mut r, 3..5);
        assert_eq!((b.first_offset, b.accepted), (3, 2));
        assert_eq!((r.first_offset(), r.next_offset(), r.len()), (0, 5, 5));
        let got = decode(a.frame.as_ref().unwrap());
        assert_eq!(got, (0..3).map(|i| (i, ev(i))).collect::<Vec<_>>());
        // Odd but valid JSON text survives byte for byte.
        let odd = "{ \"type\" : \"x\",\n \"data\": \"\\u00e9\" }";
        let c = r
            .append(&[PublishedEvent {
                json: odd,
                seq: None,
            }])
            .unwrap();
        assert_eq!(decode(c.frame.as_ref().unwrap()), vec![(5, odd.to_owned())]);
        assert_eq!(
            r.bytes(),
            [a, b, c]
                .iter()
                .map(|x| x.frame.as_ref().unwrap().len())
                .sum::<usize>()
        );
    }

    #[test]
    fn reads_at_boundaries_share_the_batch_frame() {
        let mut r = ring(100, 1 << 20);
        let a = publish(&mut r, 0..3);
        let b = publish(&mut r, 3..5);
        let (fs, next) = frames(r.read_frames(0, 256));
        assert_eq!(next, 5);
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].as_ptr(), a.frame.as_ref().unwrap().as_ptr());
        assert_eq!(fs[1].as_ptr(), b.frame.as_ref().unwrap().as_ptr());
        let (fs, _) = frames(r.read_frames(3, 256));
        assert_eq!(fs[0].as_ptr(), b.frame.as_ref().unwrap().as_ptr());
        assert_eq!(r.read_frames(5, 256), Read::UpToDate);
    }

    #[test]
    fn mid_batch_reads_get_partial_frames_then_shared_ones() {
        let mut r = ring(100, 1 << 20);
        publish(&mut r, 0..4);
        let b = publish(&mut r, 4..6);
        let (fs, next) = frames(r.read_frames(2, 256));
        assert_eq!(next, 6);
        assert_eq!(
            all_events(&fs),
            (2..6).map(|i| (i, ev(i))).collect::<Vec<_>>()
        );
        assert_eq!(fs[1].as_ptr(), b.frame.as_ref().unwrap().as_ptr());
        // A partial read honours max_events exactly.
        let (fs, next) = frames(r.read_frames(1, 2));
        assert_eq!(next, 3);
        assert_eq!(all_events(&fs), vec![(1, ev(1)), (2, ev(2))]);
    }

    #[test]
    fn max_events_caps_whole_batches_but_always_sends_one() {
        let mut r = ring(100, 1 << 20);
        publish(&mut r, 0..5);
        publish(&mut r, 5..7);
        publish(&mut r, 7..8);
        let (fs, next) = frames(r.read_frames(0, 3));
        assert_eq!((fs.len(), next), (1, 5));
        let (fs, next) = frames(r.read_frames(5, 3));
        assert_eq!((fs.len(), next), (2, 8));
    }

    #[test]
    fn seq_dedupe() {
        let mut r = ring(100, 1 << 20);
        let batch = [
            ("{\"a\":1}", Some(1)),
            ("{\"a\":2}", Some(2)),
            ("{\"n\":0}", None),
        ];
        let a = r.append(&with_seq(&batch)).unwrap();
        assert_eq!((a.accepted, a.duplicates), (3, 0));
        // Resent whole: nothing stored, except events without seq.
        let resent = [("{\"a\":1}", Some(1)), ("{\"a\":2}", Some(2))];
        let b = r.append(&with_seq(&resent)).unwrap();
        assert_eq!((b.accepted, b.duplicates, b.frame.is_none()), (0, 2, true));
        assert_eq!(r.next_offset(), 3);
        // Partial overlap keeps only the new ones.
        let overlap = [
            ("{\"a\":2}", Some(2)),
            ("{\"a\":3}", Some(3)),
            ("{\"a\":4}", Some(4)),
        ];
        let c = r.append(&with_seq(&overlap)).unwrap();
        assert_eq!((c.first_offset, c.accepted, c.duplicates), (3, 2, 1));
        assert_eq!(
            decode(c.frame.as_ref().unwrap()),
            vec![(3, "{\"a\":3}".to_owned()), (4, "{\"a\":4}".to_owned())]
        );
        // Within one batch, a seq not above the previous one is dropped.
        let inner = [
            ("{\"a\":9}", Some(9)),
            ("{\"a\":9}", Some(9)),
            ("{\"a\":5}", Some(5)),
            ("{}", None),
        ];
        let d = r.append(&with_seq(&inner)).unwrap();
        assert_eq!((d.accepted, d.duplicates), (2, 2));
        assert_eq!(
            decode(d.frame.as_ref().unwrap()),
            vec![(5, "{\"a\":9}".to_owned()), (6, "{}".to_owned())]
        );
    }

    #[test]
    fn refused_batch_changes_nothing() {
        let mut r = ring(3, 1 << 20);
        r.append(&with_seq(&[("{}", Some(1))])).unwrap();
        let big = [
            ("{}", Some(2)),
            ("{}", Some(3)),
            ("{}", Some(4)),
            ("{}", Some(5)),
        ];
        assert!(matches!(
            r.append(&with_seq(&big)),
            Err(StreamError::TooLarge { events: 4, .. })
        ));
        assert_eq!(r.next_offset(), 1);
        // seq 2 was not recorded: the retry of a smaller batch is accepted.
        let a = r.append(&with_seq(&big[..3])).unwrap();
        assert_eq!(a.accepted, 3);

        let mut r = ring(100, 64);
        let huge = "\"".to_owned() + &"x".repeat(100) + "\"";
        assert!(matches!(
            r.append(&[PublishedEvent {
                json: &huge,
                seq: None
            }]),
            Err(StreamError::TooLarge { .. })
        ));
        // Fits as raw JSON but not as a frame.
        let near = "\"".to_owned() + &"x".repeat(40) + "\"";
        assert!(
            r.append(&[PublishedEvent {
                json: &near,
                seq: None
            }])
            .is_err()
        );
        assert_eq!((r.next_offset(), r.bytes()), (0, 0));
    }

    #[test]
    fn eviction_by_count_gives_exact_gap() {
        let mut r = ring(4, 1 << 20);
        publish(&mut r, 0..3);
        let b = publish(&mut r, 3..6);
        assert_eq!(b.evicted, 2);
        assert_eq!((r.first_offset(), r.next_offset()), (2, 6));
        assert_eq!(
            r.read_frames(0, 256),
            Read::Gap {
                from: 0,
                to: 1,
                resume_at: 2
            }
        );
        assert_eq!(
            r.read_events(1, 256),
            Read::Gap {
                from: 1,
                to: 1,
                resume_at: 2
            }
        );
        // Offset 2 lives in a batch whose head is gone: partial frame.
        let (fs, next) = frames(r.read_frames(2, 256));
        assert_eq!(next, 6);
        assert_eq!(
            all_events(&fs),
            (2..6).map(|i| (i, ev(i))).collect::<Vec<_>>()
        );
        assert_eq!(fs[1].as_ptr(), b.frame.as_ref().unwrap().as_ptr());
    }

    #[test]
    fn eviction_by_bytes_keeps_accounting_exact() {
        let mut probe = ring(100, 1 << 20);
        let one = publish(&mut probe, 0..1).frame.unwrap().len();
        let mut r = ring(100, one * 3);
        let mut frames_len = Vec::new();
        for i in 0..10u64 {
            let a = publish(&mut r, i * 2..i * 2 + 2);
            frames_len.push(a.frame.unwrap().len());
            assert!(r.bytes() <= one * 3);
            let kept: usize = r
                .batches
                .iter()
                .map(|b| {
                    ((r.first_offset.max(b.first_offset) - b.first_offset) as usize..b.spans.len())
                        .map(|i| b.charge(i))
                        .sum::<usize>()
                })
                .sum();
            assert_eq!(r.bytes(), kept);
        }
        assert!(r.first_offset() > 0);
        assert_eq!(r.next_offset(), 20);
        let first = r.first_offset();
        assert_eq!(
            r.read_frames(0, 256),
            Read::Gap {
                from: 0,
                to: first - 1,
                resume_at: first
            }
        );
        let (fs, _) = frames(r.read_frames(first, 256));
        assert_eq!(
            all_events(&fs),
            (first..20).map(|i| (i, ev(i))).collect::<Vec<_>>()
        );
        let held = r.bytes();
        assert_eq!(r.clear(), held);
        assert_eq!((r.bytes(), r.first_offset(), r.next_offset()), (0, 20, 20));
        assert_eq!(r.read_frames(20, 10), Read::UpToDate);
    }

    #[test]
    fn charges_sum_to_the_frame() {
        let mut r = ring(100, 1 << 20);
        let a = publish(&mut r, 0..7);
        let b = &r.batches[0];
        let total: usize = (0..7).map(|i| b.charge(i)).sum();
        assert_eq!(total, a.frame.unwrap().len());
        // The first event's charge includes the frame header.
        let first = b.charge(0);
        assert_eq!(first, b.spans[0].end);
        assert_eq!(r.trim(1), (1, first));
        assert_eq!(r.bytes(), total - first);
        assert_eq!(r.trim(usize::MAX), (6, total - first));
        assert_eq!((r.bytes(), r.batches.len()), (0, 0));
    }

    #[test]
    fn events_are_slices_of_the_frame() {
        let mut r = ring(100, 1 << 20);
        let a = publish(&mut r, 0..3);
        publish(&mut r, 3..4);
        let frame = a.frame.unwrap();
        let Read::Items { items, next_cursor } = r.read_events(1, 2) else {
            panic!()
        };
        assert_eq!(next_cursor, 3);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].offset, 1);
        assert_eq!(&items[0].json[..], ev(1).as_bytes());
        let base = frame.as_ptr() as usize;
        let p = items[0].json.as_ptr() as usize;
        assert!(p > base && p < base + frame.len(), "a slice, not a copy");
        let Read::Items { items, next_cursor } = r.read_events(2, 256) else {
            panic!()
        };
        assert_eq!(next_cursor, 4);
        assert_eq!(
            items.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn gap_frame_names_the_ring() {
        let r = ring(1, 1);
        let v: serde_json::Value = serde_json::from_slice(&r.gap_frame(3, 9)).unwrap();
        assert_eq!(v["payload"]["runId"], "run-1");
        assert_eq!(v["payload"]["streamEpoch"], r.epoch().as_str());
        assert_eq!(v["payload"]["toOffset"], 9);
    }
}
