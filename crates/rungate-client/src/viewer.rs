//! [`ViewerClient`]: tails runs' output streams and resumes them after any
//! disconnect from the last offset it delivered.
//!
//! Each [`Follower`] has its own socket on `/v1/stream` and a driver task.
//! The driver remembers the next offset owed to the caller and the stream
//! epoch, and after a lost socket (or `gateway.draining`) reconnects with
//! backoff and sends `stream.resume` from exactly there, so the caller sees
//! every event once, in order. What it cannot hide it reports: a resume that
//! comes back `truncated` (history gone or a new epoch), a `stream.gap` (the
//! caller fell behind the ring), a `stream.closed` (the stream was dropped;
//! the follower resumes the run's next stream by itself). A `stream.ended`
//! is the last item: the run is over and the follower ends after it.
//!
//! The channel to the caller is bounded: a caller that does not read stops
//! the driver reading its socket, and the gateway, not this process, holds
//! the backlog (and answers with a gap if it is too much).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::link::{self, Incoming};
use super::{Backoff, ClientError, TokenSource, token};
use rungate_protocol::ids::RunOutcome;

/// Where and how to connect as a viewer.
#[derive(Debug, Clone)]
pub struct ViewerOptions {
    /// `ws://HOST:PORT/v1/stream`.
    pub url: String,
    /// A viewer token covering the runs to follow (unless `token_source`
    /// is set).
    pub token: String,
    /// Asked for a token at every connection ([`ViewerOptions::with_token_source`]).
    pub token_source: Option<TokenSource>,
    /// Longest one connection attempt (TCP + handshake) may take.
    pub connect_timeout: Duration,
    /// Delays between reconnect attempts after the socket is lost.
    pub backoff: Backoff,
    /// Items buffered for a caller that reads slowly.
    pub buffer: usize,
}

impl ViewerOptions {
    /// Options for `url` with a fixed `token`; 10 s connect timeout, default backoff, 256 buffered
    /// items.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> ViewerOptions {
        ViewerOptions {
            url: url.into(),
            token: token.into(),
            token_source: None,
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            buffer: 256,
        }
    }

    /// Takes each connection's token from `source` (see
    /// [`super::RuntimeOptions::with_token_source`]).
    pub fn with_token_source(mut self, source: TokenSource) -> ViewerOptions {
        self.token_source = Some(source);
        self
    }
}

/// What a follower hands its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// The subscription (re)started. `truncated`: events the caller was
    /// owed are gone (older than the oldest kept, or the stream's history
    /// was replaced: `stream_epoch` differs from the previous one).
    Resumed {
        /// The stream's history being followed (`streamEpoch`).
        stream_epoch: String,
        /// The oldest offset still kept (`firstOffset`).
        first_offset: u64,
        /// The head: the offset the next published event will get (`nextOffset`).
        next_offset: u64,
        /// The offset of the first event this subscription delivers (`startOffset`).
        start_offset: u64,
        /// History the caller asked for is gone (`truncated`).
        truncated: bool,
    },
    /// One event, in offset order.
    Event {
        /// The event's position in the run's stream (`offset`).
        offset: u64,
        /// The JSON the runtime published (`event`).
        event: Value,
    },
    /// Offsets `from..=to` were dropped before they could be delivered.
    Gap {
        /// The first missed offset (`fromOffset`).
        from: u64,
        /// The last missed offset, inclusive (`toOffset`).
        to: u64,
    },
    /// The stream's history was dropped by the gateway; a `Resumed` with
    /// the run's new stream follows.
    Closed {
        /// The epoch of the stream that was dropped (`streamEpoch`).
        stream_epoch: String,
    },
    /// The run ended (`stream.ended`) and every event before its end was
    /// delivered. The last item: the follower ends after it.
    Ended {
        /// How the run ended (`outcome`).
        outcome: RunOutcome,
        /// The finish's `message`, if it carried one.
        message: Option<String>,
        /// The run's final head.
        next_offset: u64,
        /// RFC 3339.
        ended_at: String,
    },
}

/// The `stream.ended` payload.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndedPayload {
    outcome: RunOutcome,
    #[serde(default)]
    message: Option<String>,
    next_offset: u64,
    ended_at: String,
}

/// The `run.cancel` request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelPayload<'a> {
    run_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The answer to [`ViewerClient::cancel`] (`run.cancel`'s reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct CancelAnswer {
    /// The runtime's socket was sent the request now.
    pub delivered: bool,
    /// The run had already ended.
    pub ended: bool,
}

/// A caller's end of one followed stream.
pub struct Follower {
    items: FollowerRx,
}

enum FollowerRx {
    Bounded(mpsc::Receiver<Result<StreamItem, ClientError>>),
    Unbounded(mpsc::UnboundedReceiver<StreamItem>),
}

impl Follower {
    pub(crate) fn new(items: mpsc::UnboundedReceiver<StreamItem>) -> Follower {
        Follower {
            items: FollowerRx::Unbounded(items),
        }
    }

    /// The next item; `None` once the follower ended (the client closed, or
    /// the run's session on a runtime client ended). `Err` is final: the
    /// gateway refused the token or the run.
    pub async fn next(&mut self) -> Option<Result<StreamItem, ClientError>> {
        match &mut self.items {
            FollowerRx::Bounded(rx) => rx.recv().await,
            FollowerRx::Unbounded(rx) => rx.recv().await.map(Ok),
        }
    }
}

/// The position of one followed stream: what the caller is owed next.
pub(crate) struct StreamState {
    /// The next offset to deliver; `None` until the first resume answered
    /// (then the first request may be "live from the head").
    next: Option<u64>,
    epoch: Option<String>,
    /// `stream.ended` came: nothing more will.
    ended: bool,
}

impl StreamState {
    pub(crate) fn new(from_offset: Option<u64>) -> StreamState {
        StreamState {
            next: from_offset,
            epoch: None,
            ended: false,
        }
    }

    /// Whether the run ended (the follower is done).
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// Adds `fromOffset` / `streamEpoch` to a `stream.resume` payload.
    pub(crate) fn add_position(&self, payload: &mut Value) {
        if let Some(n) = self.next {
            payload["fromOffset"] = json!(n);
        }
        if let Some(e) = &self.epoch {
            payload["streamEpoch"] = json!(e);
        }
    }

    /// The `stream.resume` reply.
    pub(crate) fn resumed(&mut self, info: &Value) -> StreamItem {
        let epoch = info["streamEpoch"].as_str().unwrap_or_default().to_owned();
        let start = info["startOffset"].as_u64().unwrap_or(0);
        self.next = Some(start);
        self.epoch = Some(epoch.clone());
        StreamItem::Resumed {
            stream_epoch: epoch,
            first_offset: info["firstOffset"].as_u64().unwrap_or(0),
            next_offset: info["nextOffset"].as_u64().unwrap_or(0),
            start_offset: start,
            truncated: info["truncated"].as_bool().unwrap_or(false),
        }
    }

    /// A stream push for this run: the items to deliver, and whether the
    /// stream must be resumed (it was closed).
    pub(crate) fn pushed(&mut self, kind: &str, payload: &Value) -> (Vec<StreamItem>, bool) {
        match kind {
            "stream.events" => {
                // The epoch these offsets belong to is the one to resume
                // with (a stream two gateways created at once may take the
                // other's epoch while still empty, without a close).
                if let Some(epoch) = payload["streamEpoch"].as_str() {
                    self.epoch = Some(epoch.to_owned());
                }
                let mut items = Vec::new();
                for e in payload["events"].as_array().into_iter().flatten() {
                    let Some(offset) = e["offset"].as_u64() else {
                        continue;
                    };
                    // Never hand the caller an offset twice.
                    if self.next.is_some_and(|n| offset < n) {
                        continue;
                    }
                    self.next = Some(offset + 1);
                    items.push(StreamItem::Event {
                        offset,
                        event: e["event"].clone(),
                    });
                }
                (items, false)
            }
            "stream.gap" => {
                let (Some(from), Some(to)) =
                    (payload["fromOffset"].as_u64(), payload["toOffset"].as_u64())
                else {
                    return (Vec::new(), false);
                };
                self.next = Some(to + 1);
                (vec![StreamItem::Gap { from, to }], false)
            }
            "stream.closed" => {
                let epoch = payload["streamEpoch"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (
                    vec![StreamItem::Closed {
                        stream_epoch: epoch,
                    }],
                    true,
                )
            }
            "stream.ended" => match serde_json::from_value::<EndedPayload>(payload.clone()) {
                Ok(end) if !self.ended => {
                    self.ended = true;
                    (
                        vec![StreamItem::Ended {
                            outcome: end.outcome,
                            message: end.message,
                            next_offset: end.next_offset,
                            ended_at: end.ended_at,
                        }],
                        false,
                    )
                }
                _ => (Vec::new(), false),
            },
            _ => (Vec::new(), false),
        }
    }
}

/// Follows runs' streams on `/v1/stream`.
#[derive(Debug, Clone)]
pub struct ViewerClient {
    options: ViewerOptions,
}

impl ViewerClient {
    /// A client with these options; it connects when a run is followed.
    pub fn new(options: ViewerOptions) -> ViewerClient {
        ViewerClient { options }
    }

    /// Asks `run`'s runtime to stop (`run.cancel`, on a socket of its own).
    /// Needs a viewer token with the `run.cancel` capability.
    pub async fn cancel(
        &self,
        run: &str,
        reason: Option<&str>,
    ) -> Result<CancelAnswer, ClientError> {
        let options = &self.options;
        let mut socket = link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await?;
        let payload = serde_json::to_value(CancelPayload {
            run_id: run,
            reason,
        })
        .map_err(|e| ClientError::BadReply(e.to_string()))?;
        if !link::send(
            &mut socket,
            link::request("cancel-1", "run.cancel", &payload),
        )
        .await
        {
            return Err(ClientError::ConnectionLost);
        }
        let deadline = Instant::now() + options.connect_timeout;
        loop {
            let frame = tokio::select! {
                f = link::next(&mut socket) => f,
                _ = sleep_until(deadline) => return Err(ClientError::Timeout(options.connect_timeout)),
            };
            match frame {
                None => return Err(ClientError::ConnectionLost),
                Some(Incoming::Reply { id, payload }) if id == "cancel-1" => {
                    let _ = socket.close(None).await;
                    return serde_json::from_str(payload.get())
                        .map_err(|e| ClientError::BadReply(format!("run.cancel: {e}")));
                }
                Some(Incoming::Error {
                    id: Some(id),
                    error,
                }) if id == "cancel-1" => {
                    return Err(error);
                }
                Some(_) => {}
            }
        }
    }

    /// Follows `run` from `from_offset` (or live from the head) until the
    /// returned [`Follower`] is dropped, or until the run ended
    /// ([`StreamItem::Ended`] is then the last item).
    pub fn follow(&self, run: &str, from_offset: Option<u64>) -> Follower {
        let (tx, rx) = mpsc::channel(self.options.buffer.max(1));
        tokio::spawn(follow(
            self.options.clone(),
            run.to_owned(),
            StreamState::new(from_offset),
            tx,
        ));
        Follower {
            items: FollowerRx::Bounded(rx),
        }
    }
}

type Items = mpsc::Sender<Result<StreamItem, ClientError>>;

/// One follower's driver: connect, resume, deliver, repeat.
async fn follow(options: ViewerOptions, run: String, mut state: StreamState, items: Items) {
    let mut attempt: u32 = 0;
    let mut not_before: Option<Instant> = None;
    loop {
        if attempt > 0 || not_before.is_some() {
            let mut wake = Instant::now() + options.backoff.delay(attempt.saturating_sub(1));
            if let Some(t) = not_before.take() {
                wake = wake.max(t);
            }
            tokio::select! {
                _ = sleep_until(wake) => {}
                _ = items.closed() => return,
            }
        }
        let mut socket = match link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) if link::is_refusal(&e) => {
                let _ = items.send(Err(e)).await;
                return;
            }
            Err(_) => {
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        let mut resume_id = 0u64;
        let mut send_resume =
            async |socket: &mut link::Socket, state: &StreamState| -> Option<String> {
                resume_id += 1;
                let id = format!("resume-{resume_id}");
                let mut payload = json!({ "runId": run });
                state.add_position(&mut payload);
                link::send(socket, link::request(&id, "stream.resume", &payload))
                    .await
                    .then_some(id)
            };
        let Some(mut waiting_for) = send_resume(&mut socket, &state).await else {
            attempt = attempt.saturating_add(1);
            continue;
        };
        loop {
            let frame = tokio::select! {
                frame = link::next(&mut socket) => frame,
                _ = items.closed() => return,
            };
            let Some(frame) = frame else {
                break;
            };
            let mut out = Vec::new();
            let mut resume_again = false;
            match frame {
                Incoming::Reply { id, payload } if id == waiting_for => {
                    let info: Value = serde_json::from_str(payload.get()).unwrap_or(Value::Null);
                    out.push(state.resumed(&info));
                    attempt = 0;
                }
                Incoming::Error {
                    id: Some(id),
                    error,
                } if id == waiting_for => {
                    if error.is_retryable() {
                        break;
                    }
                    // The token does not cover the run, or the like: final.
                    let _ = items.send(Err(error)).await;
                    return;
                }
                Incoming::Push { kind, payload } if kind == "gateway.draining" => {
                    let p: Value = serde_json::from_str(payload.get()).unwrap_or(Value::Null);
                    let after = p["reconnectAfterMs"].as_u64().unwrap_or(1000);
                    not_before = Some(Instant::now() + Duration::from_millis(after));
                }
                Incoming::Push { kind, payload } => {
                    let p: Value = serde_json::from_str(payload.get()).unwrap_or(Value::Null);
                    if p["runId"] == run.as_str() {
                        let (items, again) = state.pushed(&kind, &p);
                        out = items;
                        resume_again = again;
                    }
                }
                _ => {}
            }
            for item in out {
                if items.send(Ok(item)).await.is_err() {
                    return;
                }
            }
            if state.is_ended() {
                return;
            }
            if resume_again {
                match send_resume(&mut socket, &state).await {
                    Some(id) => waiting_for = id,
                    None => break,
                }
            }
        }
        attempt = attempt.saturating_add(1);
    }
}
