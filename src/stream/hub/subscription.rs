//! Readers: where a resume starts, and [`Subscription`], a stream and a
//! cursor.
//!
//! Owns the resume rules (the table on [`StreamHub::resume`]) and the
//! race-free wait (see the module docs of [`crate::stream`], *Replay and
//! live are one loop*). A subscription reads only what its ring shows
//! ([`Ring::next_offset`] and [`Ring::visible_end`]), so what a backend has
//! not made visible yet never reaches a reader, whichever backend it is.
//! Must not change a ring or the map: reading only.

use std::pin::pin;
use std::sync::Arc;

use tokio::time::Instant;

use super::{Origin, RunStream, StreamHub};
use crate::ids::RunId;
use crate::stream::ring::{Read, Ring};
use crate::stream::{Delivery, EventDelivery, ResumeInfo, RunEnd};

impl StreamHub {
    /// Starts a subscription to `run`'s stream; creates an empty stream if
    /// the run has none yet, so its epoch is fixed from now on and its first
    /// events reach this subscriber.
    ///
    /// Synchronous on purpose: the answer comes from the stream's metadata
    /// (epoch, kept range), never from reading history, so a socket can
    /// apply `stream.resume` and `stream.cancel` strictly in arrival order.
    ///
    /// Where it starts (`start_offset`), with `first`/`next` the kept range:
    ///
    /// | request | start | truncated |
    /// |---|---|---|
    /// | no `from_offset` | `next` (live only) | epoch given and different |
    /// | epoch given and different | `first` | true |
    /// | `from_offset < first` | `first` | true |
    /// | `first <= from_offset <= next` | `from_offset` | false |
    /// | `from_offset > next`, epoch given (and equal) | `from_offset` | false |
    /// | `from_offset > next`, no epoch | `first` | true |
    ///
    /// With the same epoch, offsets beyond the head are ones this gateway's
    /// copy has not applied yet: a viewer moving from another gateway over
    /// the same Redis may have seen more than this replica holds so far. The
    /// subscription waits at `from_offset` until the copy gets there, so
    /// the viewer is handed nothing twice (clamping to the head would repeat
    /// what it already had). Without an epoch to compare (SSE's
    /// `Last-Event-ID`) an offset beyond the head may as well come from
    /// another history, so what is kept is replayed; the SSE route first
    /// catches the replica up ([`StreamHub::catch_up`]) so that this case
    /// means what it says.
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
            let epoch_differs = epoch.is_some_and(|e| !ring.is_epoch(e));
            let (start_offset, truncated) = match from_offset {
                None => (next, epoch_differs),
                Some(_) if epoch_differs => (first, true),
                Some(from) if from < first => (first, true),
                Some(from) if from <= next || epoch.is_some() => (from, false),
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
    /// gap, the end once every event before it was delivered, or `Closed`
    /// once the stream was dropped from the hub (history gone; resume again
    /// for the run's new stream).
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
    /// ring, and sleep only if there was nothing. A change that lands after
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
