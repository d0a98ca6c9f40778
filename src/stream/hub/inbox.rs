//! [`Inbox`]: the one door by which a backend's own tasks come back into
//! the hub, like centrifuge's `HandlePublication`.
//!
//! Owns what a backend may tell the hub after the fact: that something it
//! stored became visible ([`Inbox::show`], for the log's writer once a
//! batch or an end is written, and for Redis's applier once the authority
//! stored one), and, for a backend whose rings are replicas, what the
//! authority holds (another history, idle times, a drop). Everything shown
//! ends in `StreamHub::settle`, the same as a publish the memory backend
//! shows at once, so readers, gaps and ends work one way for every engine.
//! The log's writer also reads rings here to write snapshots.
//!
//! An inbox holds the hub weakly: a backend's tasks keep it without keeping
//! the hub alive, and once the hub is gone every call does nothing.
//! Nothing here tells the backend of what it did (it knows), except a
//! stream the budget drops to make room for a replica's batch.

use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::{Mark, RunStream, StreamHub};
use crate::ids::RunId;
use crate::stream::ring::{Ring, RingLimits};
use crate::stream::{PublishedEvent, RunEnd, StreamEpoch};

/// A backend's handle on its hub; see the module docs.
#[derive(Clone)]
pub struct Inbox {
    hub: Weak<StreamHub>,
    ring_limits: RingLimits,
}

/// What became visible in a run's stream.
#[derive(Debug, Clone)]
pub enum Visible<'a> {
    /// The batches the ring took (and assigned offsets to) up to `up_to`
    /// are durable: the log's writer wrote them.
    Committed { up_to: u64 },
    /// The end the ring took is durable.
    CommittedEnd,
    /// Batches the authority stored, to append at their offsets. Events
    /// already held are skipped, so a batch may arrive twice (its
    /// publisher's own result and the broadcast). A batch beyond the head:
    /// if `authoritative` (read from the authority's kept range, so what
    /// lies between was evicted there) the ring goes on from it with the
    /// same epoch and readers behind get a gap as on any eviction;
    /// otherwise it stops there and answers [`Shown::Hole`]. Events are
    /// appended without their `seq` (the authority de-duplicated them);
    /// `last_seq` is the authority's mark after them.
    Stored {
        batches: &'a [ReplicaBatch<'a>],
        last_seq: Option<u64>,
        authoritative: bool,
    },
    /// The end the authority recorded. Shown only once the ring holds every
    /// event before it (nothing is appended to an ended ring): otherwise
    /// [`Shown::Hole`], catch up first.
    StoredEnd(Arc<RunEnd>),
}

/// One batch as the authority stored it, for [`Visible::Stored`].
#[derive(Debug, Clone)]
pub struct ReplicaBatch<'a> {
    pub first_offset: u64,
    pub events: Vec<&'a str>,
}

/// The readers of a stream that [`Inbox::show_quietly`] made something
/// visible in, still to be woken. Dropping it wakes them too, so they are
/// never left waiting for what is already there.
#[must_use = "the stream's readers wait until this is woken"]
pub struct Wake(Option<Arc<RunStream>>);

impl Wake {
    /// Wakes the readers waiting on the stream.
    pub fn now(mut self) {
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(stream) = self.0.take() {
            stream.notify.notify_waiters();
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.wake();
    }
}

/// What [`Inbox::show`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Everything is now held and visible (some may have been already).
    Applied,
    /// Offsets `head..` are missing here: a batch starts beyond the head
    /// (batches before it were applied, none after), or an end comes after
    /// it.
    Hole { head: u64 },
    /// The run has no stream here, or one with another epoch.
    Absent,
}

impl Inbox {
    /// The inbox of the hub `hub` will point to (for a backend built with
    /// the hub, in `Arc::new_cyclic`); `ring_limits` are the hub's.
    pub fn new(hub: &Weak<StreamHub>, ring_limits: RingLimits) -> Inbox {
        Inbox {
            hub: hub.clone(),
            ring_limits,
        }
    }

    /// The inbox of `hub`.
    pub fn of(hub: &Arc<StreamHub>) -> Inbox {
        Inbox::new(&Arc::downgrade(hub), hub.ring_limits())
    }

    /// The bounds every ring of the hub has.
    pub fn ring_limits(&self) -> RingLimits {
        self.ring_limits
    }

    /// `run`'s stream, if the hub is still there and has one.
    fn stream(&self, run: &RunId) -> Option<(Arc<StreamHub>, Arc<RunStream>)> {
        let hub = self.hub.upgrade()?;
        let stream = hub.streams.get(run)?.clone();
        Some((hub, stream))
    }

    /// Shows what became visible in `run`'s stream, if it still has
    /// `epoch`, and wakes its readers; see [`Visible`].
    pub fn show(
        &self,
        run: &RunId,
        epoch: &StreamEpoch,
        visible: Visible<'_>,
        now: Instant,
    ) -> Shown {
        let (shown, wake) = self.show_quietly(run, epoch, visible, now);
        wake.now();
        shown
    }

    /// [`Self::show`], leaving the readers to wake to the caller: what is
    /// shown is visible to every read from now on (a resume finds it), but
    /// a reader already waiting hears of it only at [`Wake::now`].
    ///
    /// For the log's writer, which acknowledges a group's publishers
    /// before it wakes the group's readers: a batch followed by a thousand
    /// viewers otherwise queued its publisher's answer behind a thousand
    /// woken sockets (issue #18, fan-out (d)).
    pub fn show_quietly(
        &self,
        run: &RunId,
        epoch: &StreamEpoch,
        visible: Visible<'_>,
        now: Instant,
    ) -> (Shown, Wake) {
        let Some((hub, stream)) = self.stream(run) else {
            return (Shown::Absent, Wake(None));
        };
        let mut state = stream.state.write();
        if state.closed || state.ring.epoch() != epoch {
            return (Shown::Absent, Wake(None));
        }
        let before = Mark::of(&state.ring);
        let appended = matches!(visible, Visible::Stored { .. });
        let ring = &mut state.ring;
        let answer = match visible {
            Visible::Committed { up_to } => {
                ring.commit(up_to);
                Shown::Applied
            }
            Visible::CommittedEnd => {
                ring.commit_end();
                Shown::Applied
            }
            Visible::Stored {
                batches,
                last_seq,
                authoritative,
            } => append_stored(ring, batches, last_seq, authoritative),
            Visible::StoredEnd(end) => {
                if ring.end().is_some() {
                    Shown::Applied
                } else if ring.appended_head() < end.next_offset {
                    Shown::Hole {
                        head: ring.appended_head(),
                    }
                } else {
                    ring.set_end(end, true);
                    Shown::Applied
                }
            }
        };
        let shown = hub.settle_quietly(state, before, now);
        if shown && appended && hub.total_bytes() > hub.limits.global_max_bytes {
            // A replica keeps what the authority kept; only idle streams
            // make room here.
            hub.enforce_budget(None, 0);
        }
        (answer, Wake(shown.then_some(stream)))
    }

    /// Makes `ring` `run`'s stream, closing the one it had (its
    /// subscribers get [`crate::stream::Delivery::Closed`] and resume into
    /// this one): the authority holds another history of the run.
    pub fn replace(&self, ring: Ring, idle_since: Option<Instant>, now: Instant) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let run = ring.run().clone();
        // Counted before anyone can see it, so a drop can never subtract
        // bytes that were not added.
        hub.account(0, ring.bytes());
        let stream = Arc::new(RunStream::new(ring, idle_since, now));
        hub.ids.write().insert(run.clone());
        let Some(old) = hub.streams.insert(run, stream) else {
            return;
        };
        let mut state = old.state.write();
        if !state.closed {
            state.closed = true;
            let before = state.ring.bytes();
            state.ring.clear();
            hub.account(before, 0);
        }
        drop(state);
        old.notify.notify_waiters();
    }

    /// Moves `run`'s stream from `provisional`, an epoch this node proposed
    /// that lost to another node's, to the authority's `epoch`, in place,
    /// if it never held an event: its subscribers stay (a viewer that
    /// follows a run before it starts must not see it closed because two
    /// nodes raced to create it). False if the stream has another epoch or
    /// holds history; then it must be [replaced](Inbox::replace).
    pub fn adopt_epoch(&self, run: &RunId, provisional: &StreamEpoch, epoch: &StreamEpoch) -> bool {
        let Some((_, stream)) = self.stream(run) else {
            return false;
        };
        let mut state = stream.state.write();
        !state.closed && state.ring.epoch() == provisional && state.ring.adopt_epoch(epoch.clone())
    }

    /// Lets `run`'s stream (if it has `epoch`) answer to `aliases` too:
    /// epochs other nodes proposed for it and lost with, which their viewers
    /// were told (a viewer moving here, or staying on a node that
    /// restarted, names one).
    pub fn add_aliases(&self, run: &RunId, epoch: &StreamEpoch, aliases: &[StreamEpoch]) {
        if aliases.is_empty() {
            return;
        }
        let Some((_, stream)) = self.stream(run) else {
            return;
        };
        let mut state = stream.state.write();
        if !state.closed && state.ring.epoch() == epoch {
            state.ring.add_aliases(aliases);
        }
    }

    /// Sets whether `run`'s stream (if it has `epoch`) is idle, and since
    /// when, as the authority recorded it.
    pub fn set_idle(&self, run: &RunId, epoch: &StreamEpoch, idle_since: Option<Instant>) {
        let Some((_, stream)) = self.stream(run) else {
            return;
        };
        let mut state = stream.state.write();
        if !state.closed && state.ring.epoch() == epoch {
            state.idle_since = idle_since;
        }
    }

    /// Drops `run`'s stream if it has `epoch` (the authority dropped it),
    /// closing its subscribers; the backend is not told.
    pub fn remove_replica(&self, run: &RunId, epoch: &StreamEpoch) -> bool {
        let Some((hub, stream)) = self.stream(run) else {
            return false;
        };
        hub.drop_stream(run, &stream, false, |_, state| state.ring.epoch() == epoch)
    }

    /// `run`'s stream's epoch, appended head and idle time (`None`: a
    /// session is active), if it has one.
    pub fn head(&self, run: &RunId) -> Option<(StreamEpoch, u64, Option<Instant>)> {
        let (_, stream) = self.stream(run)?;
        let state = stream.state.read();
        (!state.closed).then(|| {
            (
                state.ring.epoch().clone(),
                state.ring.appended_head(),
                state.idle_since,
            )
        })
    }

    /// Every run with a stream here.
    pub fn run_ids(&self) -> Vec<RunId> {
        let Some(hub) = self.hub.upgrade() else {
            return Vec::new();
        };
        hub.streams.iter().map(|e| e.key().clone()).collect()
    }

    /// Bytes held by all streams.
    pub fn total_bytes(&self) -> usize {
        self.hub.upgrade().map_or(0, |hub| hub.total_bytes())
    }

    /// Calls `f` with `run`'s ring under its read lock, if it has a stream.
    pub fn with_ring<T>(&self, run: &RunId, f: impl FnOnce(&Ring) -> T) -> Option<T> {
        let (_, stream) = self.stream(run)?;
        let state = stream.state.read();
        (!state.closed).then(|| f(&state.ring))
    }

    /// Calls `f` with every stream's ring, each under its read lock.
    pub fn for_each_ring(&self, mut f: impl FnMut(&Ring)) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let streams: Vec<Arc<RunStream>> = hub.streams.iter().map(|e| e.value().clone()).collect();
        for stream in streams {
            let state = stream.state.read();
            if !state.closed {
                f(&state.ring);
            }
        }
    }
}

/// Appends the batches the authority stored that `ring` does not hold yet;
/// see [`Visible::Stored`].
fn append_stored(
    ring: &mut Ring,
    batches: &[ReplicaBatch<'_>],
    last_seq: Option<u64>,
    authoritative: bool,
) -> Shown {
    let mut answer = Shown::Applied;
    for batch in batches {
        let head = ring.appended_head();
        let end = batch.first_offset + batch.events.len() as u64;
        if end <= head {
            continue;
        }
        if batch.first_offset > head {
            if !authoritative {
                answer = Shown::Hole { head };
                break;
            }
            ring.restart_at(batch.first_offset);
        }
        let skip = (ring.appended_head() - batch.first_offset) as usize;
        let events: Vec<PublishedEvent<'_>> = batch.events[skip..]
            .iter()
            .map(|json| PublishedEvent { json, seq: None })
            .collect();
        if let Err(e) = ring.append(&events) {
            // This node's limits are smaller than the publisher's: the
            // batch cannot be held here, and a ring cannot have a hole, so
            // it starts over after it (readers get a gap).
            tracing::warn!(run = %ring.run(), error = %e, "replica: a batch exceeds this node's stream limits; skipped");
            ring.restart_at(end);
        }
    }
    ring.set_last_seq(last_seq);
    answer
}
