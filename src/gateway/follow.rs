//! The runs one socket follows: at most one stream subscription per run,
//! polled by the socket's own task.
//!
//! Owns a socket's subscriptions and the turning of what they deliver into
//! frames. Subscriptions are polled inside the connection task, not by a
//! task each, because that makes the protocol's ordering promises plain
//! sequential code:
//!
//! - `stream.resume` adds the subscription while the request is handled and
//!   the connection queues the reply before it polls subscriptions again, so
//!   the reply precedes the first `stream.events` of that subscription;
//! - `stream.cancel` removes it synchronously, so once the cancel reply is
//!   queued no later frame of that run can be.
//!
//! A subscription's future is raced against a per-subscription cancel
//! token, so a removed subscription stops holding its stream at once
//! instead of lingering until that stream's next event.
//! Must not decide who may follow what (`cmd::stream` does) or touch the
//! socket.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::push;
use crate::ids::RunId;
use crate::stream::{Delivery, StreamEpoch, Subscription};

/// One socket's subscriptions, by run.
///
/// One pointer until the socket first follows a run: most sockets (every
/// runtime that only publishes) never do, and the set lives inline in the
/// connection task of every socket, idle ones included (BENCHMARKS.md,
/// idle sessions).
#[derive(Default)]
pub(crate) struct Following {
    set: Option<Box<Set>>,
}

#[derive(Default)]
struct Set {
    /// The live subscription of each followed run: its generation (to tell
    /// it from a replaced one) and the token that stops its future.
    active: HashMap<RunId, Live>,
    /// One future per subscription waiting for its next delivery, plus
    /// removed ones that resolve at once because their token fired.
    waiting: FuturesUnordered<BoxFuture<'static, Polled>>,
    next_generation: u64,
}

struct Live {
    generation: u64,
    epoch: StreamEpoch,
    stop: CancellationToken,
}

struct Polled {
    run: RunId,
    generation: u64,
    /// `None` if the subscription was removed while it waited.
    delivered: Option<(Subscription, Delivery)>,
}

/// What the connection should send for one delivery, and what it was.
pub(crate) struct Sent {
    pub frames: Vec<Bytes>,
    /// The offsets missed, if this was a gap.
    pub gap: Option<(u64, u64)>,
}

impl Following {
    pub fn len(&self) -> usize {
        self.set.as_ref().map_or(0, |s| s.active.len())
    }

    pub fn follows(&self, run: &RunId) -> bool {
        self.set
            .as_ref()
            .is_some_and(|s| s.active.contains_key(run))
    }

    /// Whether [`Following::next`] has anything to wait for. `select!` guards
    /// on it: `next` on an empty set would end at once.
    pub fn is_waiting(&self) -> bool {
        self.set.as_ref().is_some_and(|s| !s.waiting.is_empty())
    }

    /// Follows `run` with `subscription`, replacing any earlier one.
    pub fn insert(&mut self, run: RunId, epoch: StreamEpoch, subscription: Subscription) {
        self.remove(&run);
        let set = self.set.get_or_insert_default();
        set.next_generation += 1;
        let generation = set.next_generation;
        let stop = CancellationToken::new();
        set.waiting
            .push(wait(run.clone(), generation, subscription, stop.clone()));
        set.active.insert(
            run,
            Live {
                generation,
                epoch,
                stop,
            },
        );
    }

    /// Stops following `run`; true if it was followed.
    pub fn remove(&mut self, run: &RunId) -> bool {
        match self.set.as_mut().and_then(|s| s.active.remove(run)) {
            Some(live) => {
                live.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// The next delivery of any followed run, as frames to send.
    ///
    /// Cancel-safe: a delivery is taken from its subscription only in the
    /// same poll that returns it.
    pub async fn next(&mut self) -> Option<(RunId, Sent)> {
        let set = self.set.as_mut()?;
        loop {
            let polled = set.waiting.next().await?;
            let current = set
                .active
                .get(&polled.run)
                .is_some_and(|l| l.generation == polled.generation);
            let Some((subscription, delivery)) = polled.delivered else {
                continue;
            };
            if !current {
                continue;
            }
            let run = polled.run;
            let sent = match delivery {
                Delivery::Frames(frames) => Sent { frames, gap: None },
                Delivery::Gap { frame, from, to } => Sent {
                    frames: vec![frame],
                    gap: Some((from, to)),
                },
                Delivery::Ended(end) => {
                    // Every event of the run was delivered: the shared
                    // `stream.ended` frame, and the subscription is over.
                    if set.active.remove(&run).is_none() {
                        continue;
                    }
                    return Some((
                        run,
                        Sent {
                            frames: vec![end.frame.clone()],
                            gap: None,
                        },
                    ));
                }
                Delivery::Closed => {
                    // The stream was dropped: nothing more will come.
                    let Some(live) = set.active.remove(&run) else {
                        continue;
                    };
                    let frame = push::stream_closed(&run, &live.epoch).into_bytes();
                    return Some((
                        run,
                        Sent {
                            frames: vec![frame],
                            gap: None,
                        },
                    ));
                }
            };
            if let Some(live) = set.active.get(&run) {
                let stop = live.stop.clone();
                set.waiting
                    .push(wait(run.clone(), polled.generation, subscription, stop));
            }
            return Some((run, sent));
        }
    }
}

impl Drop for Set {
    fn drop(&mut self) {
        for live in self.active.values() {
            live.stop.cancel();
        }
    }
}

/// Waits for a subscription's next delivery, or for its removal.
fn wait(
    run: RunId,
    generation: u64,
    mut subscription: Subscription,
    stop: CancellationToken,
) -> BoxFuture<'static, Polled> {
    async move {
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            d = subscription.next() => Some(d),
        };
        Polled {
            run,
            generation,
            delivered: delivery.map(|d| (subscription, d)),
        }
    }
    .boxed()
}
