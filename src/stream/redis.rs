//! [`RedisStreams`], the stream engine for several gateways sharing one
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
//! a *replica* of every stream in an ordinary [`StreamHub`], so `resume`
//! stays synchronous, and readers, frames and fan-out are the hub's: one
//! frame per batch per node, shared by all its viewers.
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
//! Must not know about sockets or sessions beyond the trait's calls. Redis
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

use super::frame::events_frame_bound;
use super::hub::{Hooks, StreamHub};
use super::{
    EndRequest, NewEvent, PublishOutcome, Publisher, ResumeInfo, RunEnd, StreamEngine, StreamEpoch,
    StreamError, StreamFuture, StreamLimits, StreamStats, StreamSubscription, StreamSummary,
    SweepOutcome,
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

/// Why [`RedisStreams::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStreamsError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot reach Redis at {url}: {why}")]
    Connect { url: String, why: String },
    #[error("cannot load the output streams from Redis at {url}: {why}")]
    Load { url: String, why: String },
}

/// What every task of one engine shares.
struct Shared {
    hub: Arc<StreamHub>,
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

/// The Redis stream engine. See the module docs.
pub struct RedisStreams {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Op>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Held so the subscriber's receiver stays open; only tests send.
    #[cfg_attr(not(test), allow(dead_code))]
    paused: watch::Sender<bool>,
    /// The node id publishes are fenced with ([`RedisStreams::fenced_as`]).
    node: Option<String>,
}

impl RedisStreams {
    /// Connects to `url`, subscribes to the channel, loads every stream
    /// Redis holds into the local replicas, and starts the tasks. A wrong
    /// address or an unreachable Redis is an error here, not at the first
    /// publish.
    pub async fn connect(
        url: &str,
        prefix: &str,
        limits: StreamLimits,
    ) -> Result<RedisStreams, RedisStreamsError> {
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
        let hub = Arc::new(StreamHub::with_hooks(limits.clone(), hooks(&writer_tx)));
        let shared = Arc::new(Shared {
            hub,
            keys,
            scripts: Scripts::new(),
            limits,
            health: Health {
                redis: AtomicBool::new(true),
                subscribed: AtomicBool::new(true),
            },
        });
        let cancel = CancellationToken::new();
        let (paused, paused_rx) = watch::channel(false);
        let tasks = vec![
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
                    writer: writer_tx.clone(),
                    cancel: cancel.clone(),
                    stale: Default::default(),
                }
                .run(applier_rx),
            ),
            tokio::spawn(
                Subscriber {
                    client,
                    shared: shared.clone(),
                    applier: applier_tx.clone(),
                    cancel: cancel.clone(),
                    paused: paused_rx,
                }
                .run(pubsub),
            ),
        ];
        let engine = RedisStreams {
            shared,
            writer: writer_tx,
            cancel,
            tasks: Mutex::new(tasks),
            paused,
            node: None,
        };
        // Subscribed first, loaded second: see `subscriber`.
        let (done, loaded) = oneshot::channel();
        let _ = applier_tx.send(Apply::ResyncAll(Some(done)));
        let load_error = |why: String| RedisStreamsError::Load {
            url: shown.clone(),
            why,
        };
        match tokio::time::timeout(LOAD_TIMEOUT, loaded).await {
            Ok(Ok(Ok(()))) => Ok(engine),
            Ok(Ok(Err(why))) => Err(load_error(why)),
            Ok(Err(_)) => Err(load_error("the applier stopped".into())),
            Err(_) => Err(load_error("timed out".into())),
        }
    }

    /// Publishes made with [`StreamEngine::publish_as`] are fenced by the
    /// session store of node `node` (see [`crate::store::redis`]): refused
    /// once that node no longer holds the publisher's session at its epoch.
    pub fn fenced_as(mut self, node: &str) -> RedisStreams {
        self.node = Some(node.to_owned());
        self
    }

    /// Holds this node's channel down (`true`) or lets it reconnect, as a
    /// network fault between this node and Redis would.
    #[cfg(test)]
    fn pause_channel(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// A publish, fenced or not (see [`Publisher`]).
    fn submit_publish(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        fence: Option<(String, String)>,
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        // The local stream's epoch is what Redis takes if it has none.
        let epoch = self.shared.hub.ensure(run, now);
        let limits = &self.shared.limits;
        let json_bytes: usize = events.iter().map(|e| e.json.len()).sum();
        let bound = events_frame_bound(run.as_str(), epoch.as_str(), events.len(), json_bytes);
        if events.len() > limits.max_events_per_run || bound > limits.max_bytes_per_run {
            return Box::pin(std::future::ready(Err(StreamError::TooLarge {
                events: events.len(),
                bytes: bound,
                max_events: limits.max_events_per_run,
                max_bytes: limits.max_bytes_per_run,
            })));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Op::Publish {
            run: run.clone(),
            epoch,
            events: events.iter().map(|e| (e.seq, e.json.to_owned())).collect(),
            fence,
            reply,
        });
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(StreamError::Unavailable(
                    "the Redis stream engine has stopped".into(),
                ))
            })
        })
    }

    fn send(&self, op: Op) {
        // Fails only after close: nothing is left to tell.
        let _ = self.writer.send(op);
    }
}

impl Drop for RedisStreams {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Tells the writer about streams the hub creates and drops itself.
fn hooks(writer: &mpsc::UnboundedSender<Op>) -> Hooks {
    let (created, dropped) = (writer.clone(), writer.clone());
    Hooks {
        created: Box::new(move |ring| {
            // Proposed as idle from now: a session's start follows at once
            // and marks it active (see `session_started`).
            let _ = created.send(Op::Create {
                run: ring.run().clone(),
                epoch: ring.epoch().clone(),
                idle: Idle::Since(wall_ms(Instant::now())),
            });
        }),
        dropped: Box::new(move |run, epoch| {
            let _ = dropped.send(Op::Drop {
                run: run.clone(),
                epoch: epoch.clone(),
            });
        }),
    }
}

impl StreamEngine for RedisStreams {
    fn publish(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        self.submit_publish(run, events, None, now)
    }

    fn publish_as(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        publisher: Publisher<'_>,
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        let fence = self.node.as_deref().map(|node| {
            (
                publisher.session_id.to_owned(),
                crate::redis::keys::holder_entry_prefix(node, publisher.epoch),
            )
        });
        self.submit_publish(run, events, fence, now)
    }

    fn resume(
        &self,
        run: &RunId,
        from_offset: Option<u64>,
        stream_epoch: Option<&str>,
        now: Instant,
    ) -> Result<(ResumeInfo, Box<dyn StreamSubscription>), StreamError> {
        StreamEngine::resume(&*self.shared.hub, run, from_offset, stream_epoch, now)
    }

    fn runs(&self) -> Vec<StreamSummary> {
        self.shared.hub.runs()
    }

    fn runs_matching(
        &self,
        selectors: &[super::RunSelector<'_>],
        after: Option<&RunId>,
        limit: usize,
    ) -> Vec<StreamSummary> {
        self.shared.hub.runs_matching(selectors, after, limit)
    }

    fn summary(&self, run: &RunId) -> Option<StreamSummary> {
        self.shared.hub.summary(run)
    }

    fn stats(&self) -> StreamStats {
        StreamEngine::stats(&*self.shared.hub)
    }

    fn session_started(&self, run: &RunId, now: Instant) {
        self.shared.hub.session_started(run, now);
        self.send(Op::Lifecycle {
            run: run.clone(),
            idle: Idle::Active,
        });
    }

    fn session_ended(&self, run: &RunId, now: Instant) {
        self.shared.hub.session_ended(run, now);
        self.send(Op::Lifecycle {
            run: run.clone(),
            idle: Idle::Since(wall_ms(now)),
        });
    }

    fn sweep(&self, now: Instant) -> SweepOutcome {
        self.shared.hub.sweep(now)
    }

    fn finish(
        &self,
        run: &RunId,
        end: EndRequest,
        now: Instant,
    ) -> StreamFuture<Result<Arc<RunEnd>, StreamError>> {
        // An end this node already shows is the answer: Redis has it.
        if let Some(ended) = self.shared.hub.ended(run) {
            let answer = if ended.outcome == end.outcome {
                Ok(ended)
            } else {
                Err(StreamError::EndConflict {
                    outcome: ended.outcome,
                })
            };
            return Box::pin(std::future::ready(answer));
        }
        let epoch = self.shared.hub.ensure(run, now);
        let (reply, answer) = oneshot::channel();
        self.send(Op::End {
            run: run.clone(),
            epoch,
            end,
            reply,
        });
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(StreamError::Unavailable(
                    "the Redis stream engine has stopped".into(),
                ))
            })
        })
    }

    fn ended(&self, run: &RunId) -> Option<Arc<RunEnd>> {
        self.shared.hub.ended(run)
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
        Box::pin(async move {
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

/// `url` without its password, for messages.
#[cfg(test)]
#[path = "redis_tests.rs"]
mod tests;
