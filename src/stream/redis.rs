//! [`RedisBackend`], the stream backend for several gateways sharing one
//! Redis (`--store redis://…`): every run's output stream with the same
//! guarantees as on one gateway (offsets contiguous from 0, `streamEpoch`,
//! `seq` de-duplication, resume then tail with no gap and no duplicate,
//! `stream.gap` past the cap), whichever gateway a runtime publishes to and
//! whichever a viewer reads from.
//!
//! Owns how the nodes agree. Redis is the authority for each stream's
//! epoch, offsets, `seq` mark and idle state, and keeps the batches within
//! its last `max_events_per_run` offsets, one stream entry per batch
//! ([`crate::redis::keys`] has the keys). Every node keeps
//! a *replica* of every stream in its ordinary [`StreamHub`] (the backend
//! says [`Authority::Remote`]), so `resume` stays synchronous, and
//! readers, frames and fan-out are the hub's: one frame per batch per
//! node, shared by all its viewers. What Redis stored comes back into the
//! hub through its [`Inbox`], as on every engine.
//!
//! - A publish is one script in Redis ([`writer`]): de-duplicate, take
//!   offsets, store, and announce the batch on the channel, atomically. Its
//!   future resolves once this node's replica holds the batch, so the
//!   publisher's own node shows it at once.
//! - Every node applies the announcements and its own results in one
//!   order ([`applier`]); a batch beyond the local head means something was
//!   missed, and the missing range is read from Redis instead.
//! - A stream created here (a viewer resuming a run nobody published to, a
//!   session starting) is proposed to Redis; if Redis already has another
//!   history, the replica takes Redis's (its subscribers get `Closed` and
//!   resume into it).
//! - Session start and end are recorded in Redis too, so every node (and
//!   one that starts later) counts retention from the same moment; a drop
//!   by retention or the budget on any node deletes the stream in Redis
//!   (if it still has that epoch and no session is active) and every node
//!   drops its replica. Dropped anywhere is dropped everywhere.
//! - A run's end (`runtime.finish`) is one script too: it records the
//!   outcome in the stream's meta hash (after every batch stored before
//!   it; publishes refuse once it is there) and announces it; every node
//!   reads it back with whatever its replica still lacks and marks the
//!   replica ended, so `stream.ended` comes after the last event anywhere.
//! - If the channel is lost, the replicas are served as they are and
//!   caught up from Redis once it is back ([`subscriber`]).
//!
//! Must not know about sockets or sessions beyond the backend's calls. Redis
//! away is a retryable [`StreamError::Unavailable`]; a publish that timed
//! out may still have been stored, and a resend with the same `seq` is then
//! dropped as a duplicate, as on one gateway.
//!
//! Differences from one gateway: a batch is refused as too large on its
//! whole size, duplicates included, with every offset counted at 20 digits
//! (the offsets are only known inside Redis); Redis bounds the kept events
//! by count, each node's replica also by bytes and the global budget, so a
//! replica may keep fewer events than Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backend::{Authority, Backend, News, Stored};
use super::frame::events_frame_bound;
use super::hub::{Inbox, StreamHub};
use super::ring::Ring;
use super::{
    EndRequest, PublishOutcome, PublishedEvent, Publisher, RunEnd, StreamEpoch, StreamError,
    StreamFuture, StreamLimits,
};
use crate::ids::RunId;
use crate::redis::conn::{OpenError, open, redacted, subscribe};
use crate::redis::keys::Keys;

mod applier;
mod notice;
mod scripts;
mod subscriber;
mod writer;

use applier::{Applier, Apply};
use notice::Idle;
use scripts::Scripts;
use subscriber::Subscriber;
use writer::{Op, Writer};

/// Loading every stream at start may take a while with many of them.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStreamsError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot reach Redis at {url}: {why}")]
    Connect { url: String, why: String },
    #[error("cannot load the output streams from Redis at {url}: {why}")]
    Load { url: String, why: String },
}

/// What every task of one backend shares.
struct Shared {
    /// Where what Redis stored comes back into this node's hub.
    hub: Inbox,
    keys: Keys,
    scripts: Scripts,
    limits: StreamLimits,
    health: Health,
}

struct Health {
    /// The last command pipeline reached Redis.
    redis: AtomicBool,
    /// The channel is subscribed.
    subscribed: AtomicBool,
}

/// The Redis stream backend. See the module docs.
pub struct RedisBackend {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Op>,
    cancel: CancellationToken,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Held so the subscriber's receiver stays open (only tests send, on
    /// the handle [`start`] gave them).
    _paused: Arc<watch::Sender<bool>>,
    /// The node id publishes are fenced with (see [`connect`]).
    node: Option<String>,
    /// The applier, asked directly only to catch one run up.
    applier: mpsc::UnboundedSender<Apply>,
}

/// Connects to `url`, subscribes to the channel, loads every stream Redis
/// holds into the local replicas, starts the tasks, and answers the hub
/// whose streams Redis holds. A wrong address or an unreachable Redis is an
/// error here, not at the first publish.
///
/// With `fenced_as`, publishes made with [`StreamHub::publish_as`] are
/// fenced by the session store of that node (see [`crate::store::redis`]):
/// refused once the node no longer holds the publisher's session at its
/// epoch.
pub async fn connect(
    url: &str,
    prefix: &str,
    limits: StreamLimits,
    fenced_as: Option<&str>,
) -> Result<Arc<StreamHub>, RedisStreamsError> {
    start(url, prefix, limits, fenced_as)
        .await
        .map(|(hub, _)| hub)
}

/// As [`connect`]; also answers the switch that holds this node's channel
/// down (`true`) or lets it reconnect, as a network fault between this node
/// and Redis would (tests use it).
async fn start(
    url: &str,
    prefix: &str,
    limits: StreamLimits,
    fenced_as: Option<&str>,
) -> Result<(Arc<StreamHub>, Arc<watch::Sender<bool>>), RedisStreamsError> {
    let shown = redacted(url);
    let (client, conn) = open(url).await?;
    let connect_error = |why: String| RedisStreamsError::Connect {
        url: shown.clone(),
        why,
    };
    let keys = Keys::new(prefix);
    let pubsub = subscribe(&client, &keys.channel())
        .await
        .map_err(|e| connect_error(format!("cannot subscribe: {e}")))?;

    let (writer_tx, writer_rx) = mpsc::unbounded_channel();
    let (applier_tx, applier_rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let (paused, paused_rx) = watch::channel(false);
    let paused = Arc::new(paused);
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let mut shared = None;
    let hub = Arc::new_cyclic(|hub| {
        let ring_limits = super::ring::RingLimits {
            max_events: limits.max_events_per_run,
            max_bytes: limits.max_bytes_per_run,
        };
        let made = Arc::new(Shared {
            hub: Inbox::new(hub, ring_limits),
            keys,
            scripts: Scripts::new(),
            limits: limits.clone(),
            health: Health {
                redis: AtomicBool::new(true),
                subscribed: AtomicBool::new(true),
            },
        });
        shared = Some(made.clone());
        let backend = RedisBackend {
            shared: made,
            writer: writer_tx.clone(),
            cancel: cancel.clone(),
            tasks: tasks.clone(),
            _paused: paused.clone(),
            node: fenced_as.map(str::to_owned),
            applier: applier_tx.clone(),
        };
        StreamHub::with_backend(limits, Box::new(backend))
    });
    let Some(shared) = shared else {
        unreachable!("Arc::new_cyclic runs its closure");
    };
    // Started only once the hub exists: the applier shows what it applies
    // through the hub's inbox from its first message on.
    tasks.lock().extend([
        tokio::spawn(
            Writer {
                conn: conn.clone(),
                shared: shared.clone(),
                applier: applier_tx.clone(),
                cancel: cancel.clone(),
                retry: Default::default(),
            }
            .run(writer_rx),
        ),
        tokio::spawn(
            Applier {
                conn,
                shared: shared.clone(),
                writer: writer_tx,
                cancel: cancel.clone(),
                stale: Default::default(),
            }
            .run(applier_rx),
        ),
        tokio::spawn(
            Subscriber {
                client,
                shared,
                applier: applier_tx.clone(),
                cancel,
                paused: paused_rx,
            }
            .run(pubsub),
        ),
    ]);
    // Subscribed first, loaded second: see `subscriber`.
    let (done, loaded) = oneshot::channel();
    let _ = applier_tx.send(Apply::ResyncAll(Some(done)));
    let load_error = |why: String| RedisStreamsError::Load {
        url: shown.clone(),
        why,
    };
    match tokio::time::timeout(LOAD_TIMEOUT, loaded).await {
        Ok(Ok(Ok(()))) => Ok((hub, paused)),
        Ok(Ok(Err(why))) => Err(load_error(why)),
        Ok(Err(_)) => Err(load_error("the applier stopped".into())),
        Err(_) => Err(load_error("timed out".into())),
    }
}

impl RedisBackend {
    fn send(&self, op: Op) {
        // Fails only after close: nothing is left to tell.
        let _ = self.writer.send(op);
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The answer the writer or the applier sends back, or why none came.
fn answered<T: Send + 'static>(
    answer: oneshot::Receiver<Result<T, StreamError>>,
) -> StreamFuture<Result<T, StreamError>> {
    StreamFuture::new(async move {
        answer.await.unwrap_or_else(|_| {
            Err(StreamError::Unavailable(
                "the Redis stream engine has stopped".into(),
            ))
        })
    })
}

impl Backend for RedisBackend {
    fn authority(&self) -> Authority {
        Authority::Remote
    }

    /// Sends the batch to the publish script; the ring (the local stream's
    /// epoch is what Redis takes if it has none) is left as it is until the
    /// applier shows what Redis stored.
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        publisher: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError> {
        let (run, epoch) = (ring.run(), ring.epoch());
        let limits = &self.shared.limits;
        let json_bytes: usize = events.iter().map(|e| e.json.len()).sum();
        let bound = events_frame_bound(run.as_str(), epoch.as_str(), events.len(), json_bytes);
        if events.len() > limits.max_events_per_run || bound > limits.max_bytes_per_run {
            return Err(StreamError::TooLarge {
                events: events.len(),
                bytes: bound,
                max_events: limits.max_events_per_run,
                max_bytes: limits.max_bytes_per_run,
            });
        }
        let fence = publisher.and_then(|publisher| {
            self.node.as_deref().map(|node| {
                (
                    publisher.session_id.to_owned(),
                    crate::redis::keys::holder_entry_prefix(node, publisher.epoch),
                )
            })
        });
        let (reply, answer) = oneshot::channel();
        self.send(Op::Publish {
            run: run.clone(),
            epoch: epoch.clone(),
            events: events.iter().map(|e| (e.seq, e.json.to_owned())).collect(),
            fence,
            reply,
        });
        Ok(Stored::Later(answered(answer)))
    }

    /// Asks the end script; the answer comes once this node shows the end.
    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::End {
            run: ring.run().clone(),
            epoch: ring.epoch().clone(),
            end,
            reply,
        });
        Ok(Stored::Later(answered(answer)))
    }

    fn tell(&self, news: News<'_>) {
        let op = match news {
            // Proposed as idle from now: a session's start follows at once
            // and marks it active.
            News::Created(ring) => Op::Create {
                run: ring.run().clone(),
                epoch: ring.epoch().clone(),
                idle: Idle::Since(wall_ms(Instant::now())),
            },
            News::Dropped { run, epoch } => Op::Drop {
                run: run.clone(),
                epoch: epoch.clone(),
            },
            News::SessionStarted(run) => Op::Lifecycle {
                run: run.clone(),
                idle: Idle::Active,
            },
            News::SessionEnded { run, at } => Op::Lifecycle {
                run: run.clone(),
                idle: Idle::Since(wall_ms(at)),
            },
        };
        self.send(op);
    }

    /// A check of the run and then a flush, in the applier's one order:
    /// the flush is answered once the check has read Redis and applied
    /// what this replica lacked (or failed to: the replica is then served
    /// as it is, and retried later).
    fn catch_up(&self, run: &RunId) -> StreamFuture<()> {
        let (done, caught_up) = oneshot::channel();
        let _ = self.applier.send(Apply::Check(run.clone()));
        let _ = self.applier.send(Apply::Flush(done));
        StreamFuture::new(async move {
            let _ = caught_up.await;
        })
    }

    fn healthy(&self) -> bool {
        let health = &self.shared.health;
        health.redis.load(Ordering::Relaxed) && health.subscribed.load(Ordering::Relaxed)
    }

    fn close(&self) -> StreamFuture<()> {
        let (done, stopped) = oneshot::channel();
        self.send(Op::Stop(done));
        let cancel = self.cancel.clone();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        StreamFuture::new(async move {
            // Every change queued before the close reaches Redis (or fails)
            // first.
            let _ = stopped.await;
            cancel.cancel();
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

/// `at` on the wall clock, in milliseconds since the Unix epoch: what other
/// nodes can compare.
fn wall_ms(at: Instant) -> u64 {
    let (now, wall) = (Instant::now(), unix_ms());
    if at >= now {
        wall.saturating_add((at - now).as_millis() as u64)
    } else {
        wall.saturating_sub((now - at).as_millis() as u64)
    }
}

/// The inverse of [`wall_ms`] on this node's monotonic clock.
fn instant_at(ms: u64) -> Instant {
    let (now, wall) = (Instant::now(), unix_ms());
    if ms >= wall {
        return now + Duration::from_millis(ms - wall);
    }
    let mut ago = Duration::from_millis(wall - ms);
    // The monotonic clock may not reach back that far (it starts near
    // boot): the earliest it can say is just as expired.
    loop {
        if let Some(at) = now.checked_sub(ago) {
            return at;
        }
        ago /= 2;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
#[path = "redis_tests.rs"]
mod tests;
