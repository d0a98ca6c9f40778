//! The one task that changes this node's replicas.
//!
//! Owns applying what Redis stored to the local hub (through its inbox,
//! the door every backend comes back in by), in one order: the
//! notices on the channel, the results of this node's own publishes, and
//! resyncs. A batch is applied only at the local head; one already held is
//! skipped; one beyond the head (a notice missed or still in flight) makes
//! the applier read the missing range from Redis instead. Anything that
//! does not match (another epoch, a stream Redis has and this node has not,
//! or the reverse) is settled the same way: read the run's stream from
//! Redis and make the replica agree, since Redis is the authority.
//! Must not write to Redis (that is the writer's, so this node's changes
//! keep one order), except to propose again a stream Redis lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::notice::{BatchNotice, Idle, Notice, parse_seq};
use super::writer::{EndReply, Op, PublishReply, end_of};
use super::{Shared, StreamEpoch, instant_at, wall_ms};
use crate::ids::RunId;
use crate::stream::hub::{ReplicaBatch, Shown, Visible};
use crate::stream::ring::Ring;
use crate::stream::{PublishOutcome, RunEnd, StreamError};

/// Stream entries (batches, each within the per-run byte bound) read per
/// round trip when catching up.
const PAGE: usize = 16;
/// How soon a run whose catch-up failed is tried again.
const STALE_RETRY: Duration = Duration::from_secs(1);

pub enum Apply {
    Notice(Notice),
    /// This node's publish, as Redis stored it; answered once applied.
    Published {
        batch: BatchNotice,
        outcome: PublishOutcome,
        reply: PublishReply,
    },
    /// This node's `runtime.finish`, as Redis recorded the run's end; the
    /// reply (with the answer decided from Redis's reply) goes once the
    /// replica shows it.
    Ended {
        run: RunId,
        epoch: StreamEpoch,
        end: Arc<RunEnd>,
        reply: Option<(EndReply, Result<(), StreamError>)>,
    },
    /// Make `run`'s replica agree with Redis.
    Check(RunId),
    /// Make every replica agree with Redis (at start, and after the
    /// channel was lost, since notices were missed). Answered with the
    /// first failure, if any.
    ResyncAll(Option<oneshot::Sender<Result<(), String>>>),
    /// Answered when reached: everything sent before it was applied.
    Flush(oneshot::Sender<()>),
}

pub struct Applier {
    pub conn: ConnectionManager,
    pub shared: Arc<Shared>,
    pub writer: mpsc::UnboundedSender<Op>,
    pub cancel: CancellationToken,
    /// Runs whose catch-up failed (Redis away): tried again on a timer.
    pub stale: HashSet<RunId>,
}

/// A run's stream as Redis holds it.
struct Remote {
    epoch: StreamEpoch,
    next: u64,
    last_seq: Option<u64>,
    idle: Idle,
    /// Kept entries from where the read started: (first offset, the
    /// events' JSON), each a batch (or part of one) as published.
    entries: Vec<(u64, Vec<String>)>,
    /// The run's end, if it ended.
    end: Option<RunEnd>,
    /// Epochs other nodes proposed for this history and lost with (see
    /// `create.lua`): viewers may name them.
    aliases: Vec<StreamEpoch>,
}

impl Applier {
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Apply>) {
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(msg) => Some(msg),
                    None => return,
                },
                _ = tokio::time::sleep(STALE_RETRY), if !self.stale.is_empty() => None,
            };
            match msg {
                Some(msg) => self.handle(msg).await,
                None => {
                    for run in std::mem::take(&mut self.stale) {
                        self.sync_run(&run).await;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: Apply) {
        match msg {
            Apply::Notice(Notice::Batch(batch)) => self.apply_batch(&batch).await,
            Apply::Published {
                batch,
                outcome,
                reply,
            } => {
                self.apply_batch(&batch).await;
                let _ = reply.send(Ok(outcome));
            }
            Apply::Notice(Notice::Created { run, epoch, idle }) => {
                match self.shared.hub.head(&run) {
                    None => {
                        // New at offset 0: whatever it holds by now follows
                        // on the channel.
                        let ring = Ring::with_epoch(run, epoch, self.shared.hub.ring_limits());
                        self.shared
                            .hub
                            .replace(ring, idle_instant(idle), Instant::now());
                    }
                    Some((local, _, _))
                        if local == epoch || self.shared.hub.adopt_epoch(&run, &local, &epoch) =>
                    {
                        self.shared.hub.set_idle(&run, &epoch, idle_instant(idle));
                    }
                    Some(_) => self.sync_run(&run).await,
                }
            }
            Apply::Notice(Notice::Lifecycle { run, epoch, idle }) => {
                match self.shared.hub.head(&run) {
                    Some((local, _, _)) if local == epoch => {
                        self.shared.hub.set_idle(&run, &epoch, idle_instant(idle));
                    }
                    _ => self.sync_run(&run).await,
                }
            }
            Apply::Notice(Notice::Aliased { run, epoch, alias }) => {
                self.shared.hub.add_aliases(&run, &epoch, &[alias]);
            }
            Apply::Notice(Notice::Dropped { run, epoch }) => {
                self.shared.hub.remove_replica(&run, &epoch);
            }
            // The end itself is in the meta hash: read it with what the
            // replica may still lack.
            Apply::Notice(Notice::Ended { run, .. }) => self.sync_run(&run).await,
            Apply::Ended {
                run,
                epoch,
                end,
                reply,
            } => {
                let shown = Visible::StoredEnd(end.clone());
                if self.shared.hub.show(&run, &epoch, shown, Instant::now()) != Shown::Applied {
                    self.sync_run(&run).await;
                }
                if let Some((reply, answer)) = reply {
                    let _ = reply.send(answer.map(|()| end));
                }
            }
            Apply::Check(run) => self.sync_run(&run).await,
            Apply::Flush(done) => {
                let _ = done.send(());
            }
            Apply::ResyncAll(done) => {
                let result = self.resync_all().await;
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    }

    async fn apply_batch(&mut self, b: &BatchNotice) {
        let batch = ReplicaBatch {
            first_offset: b.first_offset,
            events: b.events.iter().map(String::as_str).collect(),
        };
        let stored = Visible::Stored {
            batches: &[batch],
            last_seq: b.last_seq,
            authoritative: false,
        };
        let done = self
            .shared
            .hub
            .show(&b.run, &b.epoch, stored, Instant::now());
        if done != Shown::Applied {
            self.sync_run(&b.run).await;
        }
    }

    async fn resync_all(&mut self) -> Result<(), String> {
        let listed: Result<Vec<String>, _> = redis::cmd("SMEMBERS")
            .arg(self.shared.keys.streams())
            .query_async(&mut self.conn)
            .await;
        let mut runs: HashSet<RunId> = self.shared.hub.run_ids().into_iter().collect();
        let mut failure = None;
        match listed {
            Ok(listed) => runs.extend(listed.iter().filter_map(|r| RunId::new(r).ok())),
            Err(e) => failure = Some(format!("Redis: {e}")),
        }
        for run in runs {
            if let Err(e) = self.try_sync_run(&run).await {
                failure.get_or_insert(e);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn sync_run(&mut self, run: &RunId) {
        if let Err(e) = self.try_sync_run(run).await {
            tracing::warn!(run = %run, error = %e, "Redis streams: cannot catch up with Redis; will retry");
        }
    }

    /// Makes `run`'s replica agree with Redis. On failure the run is
    /// tried again later and the replica stays as it was (still served).
    async fn try_sync_run(&mut self, run: &RunId) -> Result<(), String> {
        self.stale.remove(run);
        let local = self.shared.hub.head(run);
        let mut remote = self
            .fetch(run, local.as_ref().map(|(e, h, _)| (e, *h)))
            .await;
        if let (Ok(Some(r)), Some((epoch, head, _))) = (&remote, &local)
            && r.epoch == *epoch
            && r.next < *head
        {
            // Redis holds less of this history than this node shows (it was
            // restored from an older snapshot): start over from Redis's.
            remote = self.fetch(run, None).await;
        }
        let remote = match remote {
            Ok(remote) => remote,
            Err(e) => {
                self.stale.insert(run.clone());
                return Err(e);
            }
        };
        let hub = &self.shared.hub;
        let now = Instant::now();
        let Some(remote) = remote else {
            if let Some((epoch, head, idle_since)) = local {
                if head == 0 {
                    // Never published to: a proposal of this node's that
                    // Redis lost or has not seen yet. Propose it (again).
                    let idle = match idle_since {
                        None => Idle::Active,
                        Some(at) => Idle::Since(wall_ms(at)),
                    };
                    let _ = self.writer.send(Op::Create {
                        run: run.clone(),
                        epoch,
                        idle,
                    });
                } else {
                    // Dropped (or lost) in Redis: the history is gone.
                    tracing::warn!(run = %run, epoch = %epoch, head, "Redis streams: Redis has no stream for this replica; dropping it");
                    hub.remove_replica(run, &epoch);
                }
            }
            return Ok(());
        };
        // A stream this node proposed that lost the race to create it
        // (another node's proposal reached Redis first) is still empty:
        // it takes Redis's epoch in place, keeping its followers.
        let adopted = local.as_ref().is_some_and(|(epoch, _, _)| {
            *epoch != remote.epoch && hub.adopt_epoch(run, epoch, &remote.epoch)
        });
        // Otherwise the replica goes on from where it is only if it holds
        // the same history and no more of it than Redis does.
        let continues = adopted
            || local
                .as_ref()
                .is_some_and(|(epoch, head, _)| *epoch == remote.epoch && *head <= remote.next);
        if !continues {
            if let Some((epoch, head, _)) = &local {
                // Its viewers are closed and resume into Redis's history:
                // worth a line, since it should only follow a loss in Redis.
                tracing::warn!(
                    run = %run, local_epoch = %epoch, local_head = head,
                    redis_epoch = %remote.epoch, redis_next = remote.next,
                    "Redis streams: the replica holds another history than Redis; replacing it"
                );
            }
            let start = remote.entries.first().map_or(remote.next, |e| e.0);
            let ring = Ring::restored(
                run.clone(),
                remote.epoch.clone(),
                hub.ring_limits(),
                start,
                None,
            );
            hub.replace(ring, idle_instant(remote.idle), now);
        }
        hub.add_aliases(run, &remote.epoch, &remote.aliases);
        let mut batches: Vec<ReplicaBatch<'_>> = remote
            .entries
            .iter()
            .map(|(first, events)| ReplicaBatch {
                first_offset: *first,
                events: events.iter().map(String::as_str).collect(),
            })
            .collect();
        // Ends at Redis's head even if nothing is kept before it.
        batches.push(ReplicaBatch {
            first_offset: remote.next,
            events: Vec::new(),
        });
        let stored = Visible::Stored {
            batches: &batches,
            last_seq: remote.last_seq,
            authoritative: true,
        };
        hub.show(run, &remote.epoch, stored, now);
        hub.set_idle(run, &remote.epoch, idle_instant(remote.idle));
        if let Some(end) = remote.end {
            hub.show(run, &remote.epoch, Visible::StoredEnd(Arc::new(end)), now);
        }
        Ok(())
    }

    /// Reads `run`'s stream from Redis: from `local`'s head if Redis still
    /// has that history, else all of it. `None` if Redis has no stream.
    async fn fetch(
        &mut self,
        run: &RunId,
        local: Option<(&StreamEpoch, u64)>,
    ) -> Result<Option<Remote>, String> {
        let (mut expect, mut from) = match local {
            Some((epoch, head)) => (epoch.to_string(), head),
            None => (String::new(), 0),
        };
        let mut got: Option<Remote> = None;
        // The first page starts at the entry holding `from`; the next ones
        // after the last entry read.
        let mut position = "at";
        loop {
            let mut call = self.shared.scripts.fetch.key(self.shared.keys.meta(run));
            call.key(self.shared.keys.events(run))
                .arg(&expect)
                .arg(from)
                .arg(PAGE)
                .arg(position);
            let reply: Value = call
                .invoke_async(&mut self.conn)
                .await
                .map_err(|e| format!("Redis: {e}"))?;
            if matches!(reply, Value::Nil) {
                return Ok(None);
            }
            #[allow(clippy::type_complexity)]
            let (epoch, next, seq, idle, entries, outcome, ended_at, message, aliases): (
                String,
                u64,
                String,
                String,
                Value,
                String,
                String,
                String,
                String,
            ) = redis::from_redis_value(reply).map_err(|e| format!("Redis fetch reply: {e}"))?;
            let epoch = StreamEpoch::new(epoch).map_err(|e| format!("Redis epoch: {e}"))?;
            if !expect.is_empty() && epoch.as_str() != expect {
                // Another history than the one asked for (or than the first
                // page's): read it all from its start.
                expect = epoch.to_string();
                from = 0;
                position = "at";
                got = None;
                continue;
            }
            expect = epoch.to_string();
            let entries = parse_entries(entries)?;
            let page_full = entries.len() >= PAGE;
            let remote = got.get_or_insert_with(|| Remote {
                epoch: epoch.clone(),
                next,
                last_seq: None,
                idle: Idle::Active,
                entries: Vec::new(),
                end: None,
                aliases: Vec::new(),
            });
            remote.aliases = aliases
                .split_ascii_whitespace()
                .filter_map(|a| StreamEpoch::new(a).ok())
                .collect();
            remote.end = match (outcome.as_str(), ended_at.parse::<u64>()) {
                ("", _) | (_, Err(_)) => None,
                (outcome, Ok(ms)) => end_of(run, &epoch, next, outcome, ms, &message),
            };
            remote.next = next;
            remote.last_seq = parse_seq(&seq);
            remote.idle = Idle::parse(&idle).unwrap_or(Idle::Active);
            if let Some(last) = entries.last() {
                from = last.0;
                position = "after";
            }
            remote.entries.extend(entries);
            if !page_full {
                return Ok(got);
            }
        }
    }
}

/// XRANGE's shape: `[[id, [field, value, ...]], ...]`, each entry a
/// batch's first offset (its id) and its events (the `e` fields, in order).
fn parse_entries(value: Value) -> Result<Vec<(u64, Vec<String>)>, String> {
    let raw: Vec<(String, Vec<String>)> =
        redis::from_redis_value(value).map_err(|e| format!("Redis entries: {e}"))?;
    raw.into_iter()
        .map(|(id, fields)| {
            let first = id
                .split_once('-')
                .and_then(|(o, _)| o.parse().ok())
                .ok_or_else(|| format!("Redis entry id {id:?}"))?;
            let events: Vec<String> = fields
                .chunks_exact(2)
                .filter(|pair| pair[0] == "e")
                .map(|pair| pair[1].clone())
                .collect();
            if events.is_empty() {
                return Err(format!("Redis entry {id} has no event"));
            }
            Ok((first, events))
        })
        .collect()
}

fn idle_instant(idle: Idle) -> Option<Instant> {
    match idle {
        Idle::Active => None,
        Idle::Since(ms) => Some(instant_at(ms)),
    }
}
