//! What differs between the stream engines, behind one small trait:
//! [`Backend`]. The hub ([`super::StreamHub`]) is the same for all of them.
//!
//! A backend decides three things and nothing else:
//!
//! - **Who assigns a batch's offsets, and when it is visible.**
//!   [`Backend::publish`] is handed the run's ring under the stream's lock.
//!   [`Memory`] appends the batch there, visible at once. The durable log
//!   ([`super::log`]) appends it invisibly, queues it for the disk and
//!   shows it once it is written. Redis ([`super::redis`]) leaves the ring
//!   alone and sends the batch to the script that assigns offsets for every
//!   gateway; the batch is shown when it comes back.
//! - **How a run's end is made durable**, the same way ([`Backend::end`]).
//! - **Who hears of a stream created or dropped here, and of a session's
//!   start and end** ([`Backend::tell`]): the log records creations and
//!   drops so epochs survive a restart; Redis tells the other gateways.
//!
//! What a backend's own tasks learn later (a batch or an end is durable, or
//! the authority stored one, or holds another history) comes back through
//! the hub's one door, [`super::hub::Inbox`], like centrifuge's
//! `HandlePublication`: readers, resume, gaps and ends exist once.
//! A backend must not lock streams, wake readers, or read the hub
//! synchronously from inside these calls: the hub calls it under its locks.

use std::sync::Arc;

use tokio::time::Instant;

use super::ring::Ring;
use super::{
    EndRequest, PublishOutcome, PublishedEvent, Publisher, RunEnd, StreamEpoch, StreamError,
    StreamFuture,
};
use crate::ids::RunId;

/// Where a stream's offsets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// This process's rings (memory, the log). The hub holds its byte
    /// budget around each publish: it makes room first and refuses a batch
    /// it has no room for.
    Local,
    /// An authority several gateways share (Redis); the rings are its
    /// replicas. What it stored is shown here whatever this gateway's budget
    /// says; only idle streams make room.
    Remote,
}

/// When what a backend stored becomes visible to readers.
pub enum Stored<T> {
    /// Now: the hub wakes the readers.
    Now(T),
    /// Later: the backend shows it through the [`super::hub::Inbox`] once it
    /// is durable (the log) or once the authority stored it (Redis); the
    /// future answers the caller then.
    Later(StreamFuture<Result<T, StreamError>>),
}

/// A change the hub tells its backend of.
#[derive(Debug, Clone, Copy)]
pub enum News<'a> {
    /// A new, empty stream (by a publish, a session's start, a resume).
    /// Told under the map's lock for its run, so creations, appends and
    /// drops of one run arrive in the order they happened.
    Created(&'a Ring),
    /// A stream dropped by retention or the budget (not one the authority
    /// dropped). Told under the map's lock, as `Created`.
    Dropped {
        run: &'a RunId,
        epoch: &'a StreamEpoch,
    },
    /// A session for the run is active.
    SessionStarted(&'a RunId),
    /// The run's session ended at `at`: retention counts from then.
    SessionEnded { run: &'a RunId, at: Instant },
}

/// How one engine stores streams. The hub holds one and calls only this;
/// see the module docs for what each call decides. Calls that get a ring
/// are made under that stream's write lock: they must not block.
pub trait Backend: Send + Sync + 'static {
    /// Where offsets come from.
    fn authority(&self) -> Authority {
        Authority::Local
    }

    /// Stores `events` as the next batch of `ring`'s run. A local backend
    /// appends it to `ring` ([`Ring::append`] if visible now,
    /// [`Ring::append_uncommitted`] if later); a remote one sends it to the
    /// authority and leaves `ring` alone. `publisher` is who publishes, for
    /// a backend that fences (see [`Publisher`]).
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        publisher: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError>;

    /// Ends `ring`'s run (it has no end yet) after every event stored so
    /// far: a local backend sets the end on the ring ([`Ring::finish`]),
    /// a remote one asks the authority.
    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError>;

    /// Hears of a change; see [`News`]. Must not block.
    fn tell(&self, news: News<'_>) {
        let _ = news;
    }

    /// Resolves once everything handed to the backend so far is durable
    /// (or failed to be).
    fn flush(&self) -> StreamFuture<()> {
        StreamFuture::ready(())
    }

    /// Resolves once this gateway's copy of `run` holds at least what the
    /// authority held when asked. Only a remote authority has anything to
    /// catch up; the local backends' rings are the history itself.
    fn catch_up(&self, run: &RunId) -> StreamFuture<()> {
        let _ = run;
        StreamFuture::ready(())
    }

    /// Bytes the backend holds on disk, for metrics.
    fn disk_bytes(&self) -> u64 {
        0
    }

    /// Whether publishes can be stored.
    fn healthy(&self) -> bool {
        true
    }

    /// Makes everything accepted durable and stops the backend's tasks;
    /// called once, at the end of a drain.
    fn close(&self) -> StreamFuture<()> {
        StreamFuture::ready(())
    }
}

/// Streams in memory only: the ring assigns offsets and every batch and end
/// is visible at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory;

impl Backend for Memory {
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        _: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError> {
        Ok(Stored::Now(ring.append(events)?.outcome()))
    }

    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError> {
        Ok(Stored::Now(ring.finish(end, true)))
    }
}
