//! The one task that changes streams in Redis for this node.
//!
//! Owns the order of this node's changes: every publish, creation,
//! lifecycle change and drop is an [`Op`] sent down one channel before the
//! engine's method returns, and the task runs what has queued up as one
//! pipeline (one round trip, in order, each op one atomic script). So a
//! socket's publishes are stored in the order they arrived, whatever order
//! their futures are polled in.
//! Must not touch the hub: what Redis stored goes to the applier, which is
//! the only one that changes the local replicas.
//!
//! A publish that fails is answered `Unavailable` and never retried here
//! (the runtime resends; `seq` drops what was stored after all, e.g. when
//! Redis applied the script but the reply was lost). The other ops carry
//! no answer, so a connection failure keeps them, in order, ahead of newer
//! ops until Redis is back.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::applier::Apply;
use super::notice::{BatchNotice, Idle, parse_seq, seq_arg};
use super::{Shared, StreamEpoch};
use crate::ids::{RunId, RunOutcome};
use crate::stream::{EndRequest, PublishOutcome, RunEnd, StreamError};

/// Ops sent in one pipeline at most.
const GROUP_MAX: usize = 512;
/// How soon kept ops are tried again after Redis failed them.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Ops kept for retry at most while Redis is away; the oldest go first
/// (a resync after the outage repairs what they would have done, except
/// idle times).
const RETRY_MAX: usize = 10_000;
/// A script error (not a connection failure) is tried this often at most.
const ATTEMPTS_MAX: u32 = 3;

pub type PublishReply = oneshot::Sender<Result<PublishOutcome, StreamError>>;
pub type EndReply = oneshot::Sender<Result<Arc<RunEnd>, StreamError>>;

pub enum Op {
    Publish {
        run: RunId,
        /// The local stream's epoch: Redis takes it if the run has none.
        epoch: StreamEpoch,
        events: Vec<(Option<u64>, String)>,
        /// The publisher's session id and how its holder entry must begin
        /// (see the publish script); `None`: not fenced.
        fence: Option<(String, String)>,
        reply: PublishReply,
    },
    /// A stream created here: propose its epoch.
    Create {
        run: RunId,
        epoch: StreamEpoch,
        idle: Idle,
    },
    Lifecycle {
        run: RunId,
        idle: Idle,
    },
    /// `runtime.finish`: end the run's stream after what it holds.
    End {
        run: RunId,
        /// The local stream's epoch: Redis takes it if the run has none.
        epoch: StreamEpoch,
        end: EndRequest,
        reply: EndReply,
    },
    /// Retention or the budget dropped the stream here.
    Drop {
        run: RunId,
        epoch: StreamEpoch,
    },
    /// Answered once every op before it ran and every publish before it
    /// was answered; the task then ends.
    Stop(oneshot::Sender<()>),
}

pub struct Writer {
    pub conn: ConnectionManager,
    pub shared: Arc<Shared>,
    pub applier: mpsc::UnboundedSender<Apply>,
    pub cancel: CancellationToken,
    /// Ops Redis could not run yet, oldest first, with their attempts.
    pub retry: VecDeque<(Op, u32)>,
}

impl Writer {
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        loop {
            let first = tokio::select! {
                _ = self.cancel.cancelled() => return,
                op = rx.recv() => match op {
                    Some(op) => Some(op),
                    None => return,
                },
                _ = tokio::time::sleep(RETRY_EVERY), if !self.retry.is_empty() => None,
            };
            let mut group: Vec<(Op, u32)> = self.retry.drain(..).collect();
            group.extend(first.map(|op| (op, 0)));
            while group.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(op) => group.push((op, 0)),
                    Err(_) => break,
                }
            }
            if self.execute(group).await {
                return;
            }
        }
    }

    /// Runs one group; true if it held a `Stop`.
    async fn execute(&mut self, group: Vec<(Op, u32)>) -> bool {
        let shared = self.shared.clone();
        let (keys, scripts) = (&shared.keys, &shared.scripts);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Loading a script is idempotent and cheap; doing it in the same
        // pipeline means EVALSHA can never meet an empty script cache (a
        // restarted Redis), and never half a pipeline runs before a retry.
        let used = |pick: fn(&Op) -> bool| group.iter().any(|(op, _)| pick(op));
        for (script, is_used) in [
            (
                &scripts.publish,
                used(|op| matches!(op, Op::Publish { .. })),
            ),
            (&scripts.create, used(|op| matches!(op, Op::Create { .. }))),
            (
                &scripts.lifecycle,
                used(|op| matches!(op, Op::Lifecycle { .. })),
            ),
            (&scripts.drop, used(|op| matches!(op, Op::Drop { .. }))),
            (&scripts.end, used(|op| matches!(op, Op::End { .. }))),
        ] {
            if is_used {
                pipe.load_script(script).ignore();
            }
        }
        let channel = keys.channel();
        let maxlen = shared.limits.max_events_per_run.max(1);
        let mut stop = Vec::new();
        let mut sent = Vec::with_capacity(group.len());
        for (op, attempts) in group {
            match &op {
                Op::Publish {
                    run,
                    epoch,
                    events,
                    fence,
                    ..
                } => {
                    let (session, holder) = fence.clone().unwrap_or_default();
                    let mut call = scripts.publish.key(keys.meta(run));
                    call.key(keys.events(run))
                        .key(keys.streams())
                        .key(keys.session_holders())
                        .arg(&channel)
                        .arg(run.as_str())
                        .arg(epoch.as_str())
                        .arg(maxlen)
                        .arg(session)
                        .arg(holder)
                        .arg(super::scripts::EVENTS_PER_ENTRY);
                    for (seq, json) in events {
                        call.arg(seq_arg(*seq)).arg(json);
                    }
                    pipe.invoke_script(&call);
                }
                Op::Create { run, epoch, idle } => {
                    let mut call = scripts.create.key(keys.meta(run));
                    call.key(keys.streams())
                        .arg(&channel)
                        .arg(run.as_str())
                        .arg(epoch.as_str())
                        .arg(idle.to_arg())
                        .arg(crate::stream::ring::MAX_ALIASES);
                    pipe.invoke_script(&call);
                }
                Op::Lifecycle { run, idle } => {
                    let mut call = scripts.lifecycle.key(keys.meta(run));
                    call.arg(&channel).arg(run.as_str()).arg(idle.to_arg());
                    pipe.invoke_script(&call);
                }
                Op::End {
                    run, epoch, end, ..
                } => {
                    let message = end
                        .message
                        .as_ref()
                        .map(|m| format!("+{m}"))
                        .unwrap_or_default();
                    let mut call = scripts.end.key(keys.meta(run));
                    call.key(keys.streams())
                        .arg(&channel)
                        .arg(run.as_str())
                        .arg(epoch.as_str())
                        .arg(end.outcome.as_str())
                        .arg(end.ended_at.unix_millis())
                        .arg(message);
                    pipe.invoke_script(&call);
                }
                Op::Drop { run, epoch } => {
                    let mut call = scripts.drop.key(keys.meta(run));
                    call.key(keys.events(run))
                        .key(keys.streams())
                        .arg(&channel)
                        .arg(run.as_str())
                        .arg(epoch.as_str());
                    pipe.invoke_script(&call);
                }
                Op::Stop(_) => {}
            }
            match op {
                Op::Stop(done) => stop.push(done),
                op => sent.push((op, attempts)),
            }
        }
        if !sent.is_empty() {
            match pipe.query_async::<Vec<Value>>(&mut self.conn).await {
                Ok(replies) if replies.len() == sent.len() => {
                    self.shared.health.redis.store(true, Ordering::Relaxed);
                    for ((op, attempts), reply) in sent.into_iter().zip(replies) {
                        self.answer(op, attempts, reply);
                    }
                }
                Ok(replies) => {
                    // Cannot happen with a sane server; do not guess which
                    // reply is whose.
                    let why = format!("{} replies to {} ops", replies.len(), sent.len());
                    self.failed(sent, &why);
                }
                Err(e) => {
                    self.shared.health.redis.store(false, Ordering::Relaxed);
                    self.failed(sent, &e.to_string());
                }
            }
        }
        let stopping = !stop.is_empty();
        for done in stop {
            // Answered once the applier has answered the publishes before
            // it too.
            if let Err(mpsc::error::SendError(Apply::Flush(done))) =
                self.applier.send(Apply::Flush(done))
            {
                let _ = done.send(());
            }
        }
        stopping
    }

    /// The whole pipeline failed (Redis away, or a timeout: whether it ran
    /// is unknown).
    fn failed(&mut self, sent: Vec<(Op, u32)>, why: &str) {
        for (op, attempts) in sent {
            match op {
                Op::Publish { reply, .. } => {
                    let _ = reply.send(Err(StreamError::Unavailable(format!("Redis: {why}"))));
                }
                Op::End { reply, .. } => {
                    let _ = reply.send(Err(StreamError::Unavailable(format!("Redis: {why}"))));
                }
                op => self.keep(op, attempts),
            }
        }
    }

    fn keep(&mut self, op: Op, attempts: u32) {
        if self.retry.len() >= RETRY_MAX {
            tracing::warn!(
                "Redis streams: too many changes waiting for Redis; forgetting the oldest"
            );
            self.retry.pop_front();
        }
        self.retry.push_back((op, attempts));
    }

    fn answer(&mut self, op: Op, attempts: u32, reply: Value) {
        if let Value::ServerError(e) = &reply {
            let why = e.to_string();
            match op {
                Op::Publish { reply, .. } => {
                    let _ = reply.send(Err(StreamError::Unavailable(format!("Redis: {why}"))));
                }
                Op::End { reply, .. } => {
                    let _ = reply.send(Err(StreamError::Unavailable(format!("Redis: {why}"))));
                }
                op if attempts + 1 < ATTEMPTS_MAX => self.keep(op, attempts + 1),
                _ => tracing::error!(error = %why, "Redis streams: a change failed for good"),
            }
            return;
        }
        match op {
            Op::Publish { reply: answer, .. }
                if reply == Value::SimpleString("fenced".into())
                    || reply == Value::BulkString(b"fenced".to_vec()) =>
            {
                let _ = answer.send(Err(StreamError::Fenced));
            }
            Op::Publish { reply: answer, .. } if ended_outcome(&reply).is_some() => {
                let outcome = ended_outcome(&reply).unwrap_or(RunOutcome::Completed);
                let _ = answer.send(Err(StreamError::Ended { outcome }));
            }
            Op::End {
                run,
                end: asked,
                reply: answer,
                ..
            } => match parse_end(&run, &reply) {
                Some((epoch, end)) => {
                    let answer_with = if end.outcome == asked.outcome {
                        Ok(())
                    } else {
                        Err(StreamError::EndConflict {
                            outcome: end.outcome,
                        })
                    };
                    // Answered once this node shows the end.
                    let _ = self.applier.send(Apply::Ended {
                        run,
                        epoch,
                        end: Arc::new(end),
                        reply: Some((answer, answer_with)),
                    });
                }
                None => {
                    let _ = answer.send(Err(StreamError::Unavailable(format!(
                        "Redis answered the end with {reply:?}"
                    ))));
                }
            },
            Op::Publish {
                run,
                events,
                reply: answer,
                ..
            } => match parse_publish(&reply) {
                Some(p) if p.flags.len() == events.len() => {
                    let kept = events
                        .into_iter()
                        .zip(p.flags.bytes())
                        .filter(|(_, flag)| *flag == b'1')
                        .map(|((_, json), _)| json)
                        .collect();
                    let batch = BatchNotice {
                        run,
                        epoch: p.epoch,
                        first_offset: p.outcome.first_offset,
                        last_seq: p.last_seq,
                        events: kept,
                    };
                    // The publish is answered once this node shows it.
                    let _ = self.applier.send(Apply::Published {
                        batch,
                        outcome: p.outcome,
                        reply: answer,
                    });
                }
                _ => {
                    let _ = answer.send(Err(StreamError::Unavailable(format!(
                        "Redis answered the publish with {reply:?}"
                    ))));
                }
            },
            Op::Create { run, epoch, .. } => {
                let stored: Option<String> = redis::from_redis_value(reply).ok();
                if stored.as_deref() != Some(epoch.as_str()) {
                    // Another node's history won: take it.
                    let _ = self.applier.send(Apply::Check(run));
                }
            }
            Op::Drop { run, .. } => {
                // 0: a session is active somewhere, so Redis kept it; this
                // node dropped its copy and must load it back.
                if matches!(reply, Value::Int(0)) {
                    let _ = self.applier.send(Apply::Check(run));
                }
            }
            Op::Lifecycle { .. } | Op::Stop(_) => {}
        }
    }
}

/// The outcome of a publish refused because the run ended (`ended:...`).
fn ended_outcome(reply: &Value) -> Option<RunOutcome> {
    let text: String = redis::from_redis_value_ref(reply).ok()?;
    RunOutcome::parse(text.strip_prefix("ended:")?)
}

/// `{epoch, next, outcome, endedAt, endMsg, made}`: see the end script.
fn parse_end(run: &RunId, reply: &Value) -> Option<(StreamEpoch, RunEnd)> {
    let (epoch, next, outcome, ended_at, message, _made): (String, u64, String, u64, String, i64) =
        redis::from_redis_value_ref(reply).ok()?;
    let epoch = StreamEpoch::new(epoch).ok()?;
    let end = end_of(run, &epoch, next, &outcome, ended_at, &message)?;
    Some((epoch, end))
}

/// A run's end from the fields Redis keeps for it.
pub fn end_of(
    run: &RunId,
    epoch: &StreamEpoch,
    next: u64,
    outcome: &str,
    ended_at_ms: u64,
    message: &str,
) -> Option<RunEnd> {
    let req = EndRequest {
        outcome: RunOutcome::parse(outcome)?,
        message: message.strip_prefix('+').map(str::to_owned),
        ended_at: crate::time::Timestamp::from_unix_millis(ended_at_ms),
    };
    Some(RunEnd::new(run, epoch, req, next))
}

struct Published {
    epoch: StreamEpoch,
    outcome: PublishOutcome,
    last_seq: Option<u64>,
    flags: String,
}

/// `{epoch, first, accepted, duplicates, next, seq, flags}`: see the
/// publish script.
fn parse_publish(reply: &Value) -> Option<Published> {
    let (epoch, first, accepted, duplicates, next, seq, flags): (
        String,
        u64,
        usize,
        usize,
        u64,
        String,
        String,
    ) = redis::from_redis_value_ref(reply).ok()?;
    Some(Published {
        epoch: StreamEpoch::new(epoch).ok()?,
        outcome: PublishOutcome {
            first_offset: first,
            accepted,
            duplicates,
            next_offset: next,
        },
        last_seq: parse_seq(&seq),
        flags,
    })
}
