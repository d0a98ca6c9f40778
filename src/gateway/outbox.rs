//! One socket's outbox: the bounded queue of frames for its writer, its
//! byte budget, and the signals other tasks leave for its connection task
//! (close it; it lost a run's session).
//!
//! Owns the hand-off between whoever has something for a socket and the
//! socket's two halves, in one allocation per socket: an idle socket holds
//! an empty queue (no buffer) and a few words, where a pair of tokio
//! channels held about 2.9 KiB before its first frame (BENCHMARKS.md, idle
//! sessions). The queue is bounded in frames; pushes from other tasks never
//! wait ([`Outbox::try_push`]); the connection task's own replies wait for
//! room ([`Outbox::offer`], then [`Outbox::room`]). Must not know what
//! frames mean, touch the socket, or decide when a socket closes: it
//! carries requests to do so.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::budget::Budget;
use super::state::Outgoing;
use crate::ids::RunId;

/// How to reach one open socket, shared by its connection task, its
/// writer and the table of open sockets.
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    /// Most frames the queue holds.
    capacity: usize,
    /// The socket's bytes in flight and queued; a push is charged to it.
    /// Released through [`Outbox::release`], which wakes the connection
    /// task when room comes back.
    budget: Budget,
    /// Wakes the writer: a frame was queued into an empty queue, or the
    /// queue was closed.
    to_writer: Notify,
    /// Wakes the connection task: a signal, or room in a full queue.
    to_reader: Notify,
}

struct Inner {
    queue: VecDeque<Outgoing>,
    /// Runs whose session this socket lost (superseded or expired): the
    /// socket's task stops following them, since reading a run's stream on
    /// `/v1/runtime` needs that run's session on the socket.
    lost_runs: Vec<RunId>,
    /// The connection task is done: nothing more is queued, and the writer
    /// ends once it has sent what is.
    closed: bool,
    /// The writer is gone (the socket failed or stalled): nothing queued
    /// will be sent.
    writer_gone: bool,
    /// Asked to close the socket (a peer that stopped reading while pushes
    /// pile up, or its writer gone).
    killed: bool,
    /// The connection task waits for room in a full queue.
    reader_waits: bool,
}

/// Why [`Outbox::try_push`] did not queue a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds its capacity of frames.
    Full,
    /// The socket is closing: its connection task or writer is done.
    Closed,
}

/// What [`Outbox::offer`] did with an item.
pub(crate) enum Offer {
    Queued,
    /// The socket is closing; the item is dropped.
    Closed,
    /// No room: the item, to offer again after [`Outbox::room`].
    Full(Outgoing),
}

/// What other tasks asked of the connection task since it last looked.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    pub killed: bool,
    pub lost_runs: Vec<RunId>,
}

impl Outbox {
    /// An empty outbox of at most `capacity` frames and `max_bytes` bytes.
    pub fn new(capacity: usize, max_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                lost_runs: Vec::new(),
                closed: false,
                writer_gone: false,
                killed: false,
                reader_waits: false,
            }),
            capacity: capacity.max(1),
            budget: Budget::new(max_bytes),
            to_writer: Notify::new(),
            to_reader: Notify::new(),
        })
    }

    /// The socket's byte budget (charge it here; release through
    /// [`Outbox::release`]).
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// `bytes` charged to the budget are no longer held. If that gave a
    /// spent budget room again, the connection task is woken (through the
    /// same wake-up as its signals, so it waits on one thing, not two).
    pub fn release(&self, bytes: usize) {
        if self.budget.release(bytes) {
            self.to_reader.notify_one();
        }
    }

    /// Queues `item` if there is room, without waiting.
    pub fn try_push(&self, item: Outgoing) -> Result<(), Refused> {
        self.push_or_wait(item, false).map_err(|(_, why)| why)
    }

    /// Queues `item`, waiting for room. False if the socket is closing
    /// (the item is dropped). The loop the connection task runs (its
    /// replies may wait; pushes from other tasks must not), for the tests.
    #[cfg(test)]
    async fn push(&self, item: Outgoing) -> bool {
        let mut offer = self.offer(item);
        loop {
            match offer {
                Offer::Queued => return true,
                Offer::Closed => return false,
                Offer::Full(back) => {
                    self.room().await;
                    offer = self.offer(back);
                }
            }
        }
    }

    /// Queues `item` now if there is room ([`Offer::Full`] hands it back and
    /// marks the connection task as waiting for [`Outbox::room`]): the steps
    /// of [`Outbox::push`], for a caller that keeps its own future small.
    pub fn offer(&self, item: Outgoing) -> Offer {
        match self.push_or_wait(item, true) {
            Ok(()) => Offer::Queued,
            Err((_, Refused::Closed)) => Offer::Closed,
            Err((back, Refused::Full)) => Offer::Full(back),
        }
    }

    /// Completes once a full queue may have room after an [`Offer::Full`]
    /// (or the writer is gone, or a signal came): offer again. Marked
    /// under the lock before this wait, so the writer's next take wakes it,
    /// or leaves a permit if it runs first.
    pub fn room(&self) -> Notified<'_> {
        self.to_reader.notified()
    }

    fn push_or_wait(&self, item: Outgoing, wait: bool) -> Result<(), (Outgoing, Refused)> {
        let mut inner = self.inner.lock();
        if inner.closed || inner.writer_gone {
            return Err((item, Refused::Closed));
        }
        if inner.queue.len() >= self.capacity {
            inner.reader_waits |= wait;
            return Err((item, Refused::Full));
        }
        let was_empty = inner.queue.is_empty();
        inner.queue.push_back(item);
        drop(inner);
        // The writer waits only after it found the queue empty.
        if was_empty {
            self.to_writer.notify_one();
        }
        Ok(())
    }

    /// The next queued item for the writer, waiting for one; `None` once the
    /// queue is closed and empty.
    pub async fn next(&self) -> Option<Outgoing> {
        loop {
            {
                let mut inner = self.inner.lock();
                if let Some(item) = self.take(&mut inner) {
                    return Some(item);
                }
                if inner.closed {
                    return None;
                }
                // Idle: give the queue's buffer back rather than keep it
                // for every idle socket.
                inner.queue = VecDeque::new();
            }
            self.to_writer.notified().await;
        }
    }

    /// The next queued item, if one is there now.
    pub fn try_next(&self) -> Option<Outgoing> {
        let mut inner = self.inner.lock();
        self.take(&mut inner)
    }

    fn take(&self, inner: &mut Inner) -> Option<Outgoing> {
        let item = inner.queue.pop_front()?;
        if std::mem::take(&mut inner.reader_waits) {
            self.to_reader.notify_one();
        }
        Some(item)
    }

    /// The connection task is done: the writer sends what is queued, then
    /// ends; later pushes are refused.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.to_writer.notify_one();
    }

    /// The writer is gone: pushes are refused, and the connection task is
    /// told to close the socket.
    pub fn writer_done(&self) {
        {
            let mut inner = self.inner.lock();
            inner.writer_gone = true;
            inner.killed = true;
        }
        self.to_reader.notify_one();
    }

    /// Asks the connection task to close the socket.
    pub fn kill(&self) {
        self.inner.lock().killed = true;
        self.to_reader.notify_one();
    }

    /// Tells the connection task the socket lost its session of `run`.
    pub fn lost_run(&self, run: RunId) {
        self.inner.lock().lost_runs.push(run);
        self.to_reader.notify_one();
    }

    /// What was asked of the connection task since it last looked (the kill
    /// stays set).
    pub fn take_signals(&self) -> Signals {
        let mut inner = self.inner.lock();
        Signals {
            killed: inner.killed,
            lost_runs: std::mem::take(&mut inner.lost_runs),
        }
    }

    /// Completes when there may be new signals, room in the queue or room
    /// in the budget: the connection
    /// task calls [`Outbox::take_signals`] after it, and before waiting
    /// again, since a wait for room can use up a wake-up meant for a signal.
    pub fn signalled(&self) -> Notified<'_> {
        self.to_reader.notified()
    }

    /// Frames queued now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(s: &'static str) -> Outgoing {
        Outgoing::Frame(Bytes::from_static(s.as_bytes()))
    }

    fn text(item: Option<Outgoing>) -> Option<Bytes> {
        match item {
            Some(Outgoing::Frame(b)) => Some(b),
            _ => None,
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_a_full_queue_refuses_pushes() {
        let o = Outbox::new(2, 1 << 20);
        assert_eq!(o.try_push(frame("a")), Ok(()));
        assert_eq!(o.try_push(frame("b")), Ok(()));
        assert_eq!(o.try_push(frame("c")), Err(Refused::Full));
        assert_eq!(text(o.next().await).as_deref(), Some(&b"a"[..]));
        assert_eq!(o.try_push(frame("c")), Ok(()));
        assert_eq!(text(o.try_next()).as_deref(), Some(&b"b"[..]));
        assert_eq!(text(o.try_next()).as_deref(), Some(&b"c"[..]));
        assert!(o.try_next().is_none());
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame_and_ends_once_closed_and_drained() {
        let o = Outbox::new(4, 1 << 20);
        let writer = tokio::spawn({
            let o = o.clone();
            async move {
                let mut got = Vec::new();
                while let Some(item) = o.next().await {
                    got.extend(text(Some(item)));
                }
                got
            }
        });
        tokio::task::yield_now().await;
        assert!(o.try_push(frame("a")).is_ok());
        assert!(o.try_push(frame("b")).is_ok());
        o.close();
        assert_eq!(o.try_push(frame("late")), Err(Refused::Closed));
        let got = writer.await.unwrap();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }

    #[tokio::test]
    async fn a_push_waits_for_room_and_fails_once_the_writer_is_gone() {
        let o = Outbox::new(1, 1 << 20);
        assert!(o.push(frame("a")).await);
        let pusher = tokio::spawn({
            let o = o.clone();
            async move { o.push(frame("b")).await }
        });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished());
        assert_eq!(o.len(), 1);
        assert!(o.try_next().is_some());
        assert!(pusher.await.unwrap());
        assert_eq!(o.len(), 1);

        let blocked = tokio::spawn({
            let o = o.clone();
            async move { o.push(frame("c")).await }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        o.writer_done();
        assert!(!blocked.await.unwrap());
        assert!(o.take_signals().killed);
    }

    #[tokio::test]
    async fn the_connection_task_wakes_once_enough_of_a_spent_budget_is_released() {
        let o = Outbox::new(4, 100);
        o.budget().charge(150);
        assert!(!o.budget().has_room());
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.signalled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        o.release(40);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still spent: no wake-up");
        o.release(20);
        waiter.await.unwrap();
        assert!(o.budget().has_room());
        assert!(!o.budget().try_charge(20, 100));
        assert!(o.budget().try_charge(10, 100));
    }

    #[tokio::test]
    async fn signals_are_kept_until_taken_and_wake_the_connection_task() {
        let o = Outbox::new(1, 1 << 20);
        let run = RunId::new("r1").unwrap();
        o.lost_run(run.clone());
        // The wake-up was left as a permit: this completes at once.
        o.signalled().await;
        let s = o.take_signals();
        assert_eq!(s.lost_runs, vec![run]);
        assert!(!s.killed);
        assert!(o.take_signals().lost_runs.is_empty());
        o.kill();
        assert!(o.take_signals().killed);
        assert!(o.take_signals().killed, "a kill stays set");
    }
}
