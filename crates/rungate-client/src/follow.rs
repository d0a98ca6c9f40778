//! One followed stream, as both clients follow it: what the caller gets
//! ([`StreamItem`] through a [`Follower`]) and where the stream stands
//! ([`StreamState`]: the next offset owed and the epoch last seen), so that
//! a resume after any reconnect starts exactly where delivery stopped.
//!
//! Owns the position and the turning of stream replies and pushes into
//! items. Must not connect, send or wait: the drivers of
//! [`crate::RuntimeClient`] and [`crate::ViewerClient`] do.

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::ClientError;
use rungate_protocol::commands::{StreamResumeCommand, StreamResumeResponse, push};
use rungate_protocol::ids::{RunId, RunOutcome, SessionId, StreamEpoch};

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

/// A caller's end of one followed stream.
pub struct Follower {
    items: FollowerRx,
}

enum FollowerRx {
    /// A viewer's: the driver waits for a slow caller.
    Bounded(mpsc::Receiver<Result<StreamItem, ClientError>>),
    /// A runtime's: its driver must never wait on a caller.
    Unbounded(mpsc::UnboundedReceiver<StreamItem>),
}

impl Follower {
    /// The caller's end of a runtime client's follow.
    pub(crate) fn unbounded(items: mpsc::UnboundedReceiver<StreamItem>) -> Follower {
        Follower {
            items: FollowerRx::Unbounded(items),
        }
    }

    /// The caller's end of a viewer's follow.
    pub(crate) fn bounded(items: mpsc::Receiver<Result<StreamItem, ClientError>>) -> Follower {
        Follower {
            items: FollowerRx::Bounded(items),
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
    epoch: Option<StreamEpoch>,
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

    /// The `stream.resume` that continues from here: from the next offset
    /// owed, in the epoch last seen. `session_id` on `/v1/runtime` only.
    pub(crate) fn resume_request(
        &self,
        run_id: RunId,
        session_id: Option<SessionId>,
    ) -> StreamResumeCommand {
        StreamResumeCommand {
            run_id,
            from_offset: self.next,
            stream_epoch: self.epoch.clone(),
            session_id,
        }
    }

    /// The `stream.resume` reply.
    pub(crate) fn resumed(&mut self, info: StreamResumeResponse) -> StreamItem {
        self.next = Some(info.start_offset);
        let stream_epoch = info.stream_epoch.to_string();
        self.epoch = Some(info.stream_epoch);
        StreamItem::Resumed {
            stream_epoch,
            first_offset: info.first_offset,
            next_offset: info.next_offset,
            start_offset: info.start_offset,
            truncated: info.truncated,
        }
    }

    /// A stream push for this run: the items to deliver, and whether the
    /// stream must be resumed (it was closed).
    pub(crate) fn pushed(&mut self, kind: &str, payload: &Value) -> (Vec<StreamItem>, bool) {
        match kind {
            push::STREAM_EVENTS => {
                // The epoch these offsets belong to is the one to resume
                // with (a stream two gateways created at once may take the
                // other's epoch while still empty, without a close).
                if let Some(epoch) = payload["streamEpoch"]
                    .as_str()
                    .and_then(|e| StreamEpoch::new(e).ok())
                {
                    self.epoch = Some(epoch);
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
            push::STREAM_GAP => {
                let (Some(from), Some(to)) =
                    (payload["fromOffset"].as_u64(), payload["toOffset"].as_u64())
                else {
                    return (Vec::new(), false);
                };
                self.next = Some(to + 1);
                (vec![StreamItem::Gap { from, to }], false)
            }
            push::STREAM_CLOSED => {
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
            push::STREAM_ENDED => match serde_json::from_value::<EndedPayload>(payload.clone()) {
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
