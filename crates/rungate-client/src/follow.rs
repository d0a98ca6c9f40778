//! One followed stream, as both clients follow it: what the caller gets
//! ([`StreamItem`] through a [`Follower`]) and where the stream stands
//! ([`StreamState`]: the next offset owed and the epoch last seen), so that
//! a resume after any reconnect starts exactly where delivery stopped.
//!
//! Owns the position and the turning of stream replies and pushes into
//! items. Must not connect, send or wait: the drivers of
//! [`crate::RuntimeClient`] and [`crate::ViewerClient`] do.

use serde_json::Value;
use tokio::sync::mpsc;

use super::ClientError;
use rungate_protocol::commands::{StreamResumeCommand, StreamResumeResponse};
use rungate_protocol::ids::{RunId, RunOutcome, SessionId, StreamEpoch};
use rungate_protocol::push::{self, Push, PushError};

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

/// A caller's end of one followed stream.
pub struct Follower {
    items: FollowerRx,
}

enum FollowerRx {
    /// A viewer's: the driver waits for a slow caller.
    Bounded(mpsc::Receiver<Result<StreamItem, ClientError>>),
    /// A runtime's: its driver must never wait on a caller.
    Unbounded(mpsc::UnboundedReceiver<Result<StreamItem, ClientError>>),
}

impl Follower {
    /// The caller's end of a runtime client's follow.
    pub(crate) fn unbounded(
        items: mpsc::UnboundedReceiver<Result<StreamItem, ClientError>>,
    ) -> Follower {
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
    /// gateway refused the token or the run, or sent a stream push the
    /// protocol does not allow ([`ClientError::BadPush`]).
    pub async fn next(&mut self) -> Option<Result<StreamItem, ClientError>> {
        match &mut self.items {
            FollowerRx::Bounded(rx) => rx.recv().await,
            FollowerRx::Unbounded(rx) => rx.recv().await,
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

    /// A stream push for this run (`stream.events`, `stream.gap`,
    /// `stream.closed`, `stream.ended`; any other push is nothing here): the
    /// items to deliver, and whether the stream must be resumed (it was
    /// closed). `Err` for an event that is not JSON a [`Value`] can hold,
    /// which no gateway of the protocol stores.
    pub(crate) fn pushed(&mut self, push: Push) -> Result<(Vec<StreamItem>, bool), PushError> {
        Ok(match push {
            Push::StreamEvents(batch) => {
                // Nothing of a batch is taken unless all of it reads.
                let mut next = self.next;
                let mut items = Vec::new();
                for (i, e) in batch.events.into_iter().enumerate() {
                    // Never hand the caller an offset twice.
                    if next.is_some_and(|n| e.offset < n) {
                        continue;
                    }
                    let event = serde_json::from_str(e.event.get()).map_err(|why| PushError {
                        kind: push::STREAM_EVENTS.to_owned(),
                        path: format!("/payload/events/{i}/event"),
                        reason: why.to_string(),
                    })?;
                    next = Some(e.offset + 1);
                    items.push(StreamItem::Event {
                        offset: e.offset,
                        event,
                    });
                }
                self.next = next;
                // The epoch these offsets belong to is the one to resume
                // with (a stream two gateways created at once may take the
                // other's epoch while still empty, without a close).
                self.epoch = Some(batch.stream_epoch);
                (items, false)
            }
            Push::StreamGap(gap) => {
                self.next = Some(gap.to_offset + 1);
                (
                    vec![StreamItem::Gap {
                        from: gap.from_offset,
                        to: gap.to_offset,
                    }],
                    false,
                )
            }
            Push::StreamClosed(closed) => (
                vec![StreamItem::Closed {
                    stream_epoch: closed.stream_epoch.to_string(),
                }],
                true,
            ),
            Push::StreamEnded(end) if !self.ended => {
                self.ended = true;
                (
                    vec![StreamItem::Ended {
                        outcome: end.outcome,
                        message: end.message,
                        next_offset: end.next_offset,
                        ended_at: end.ended_at.to_string(),
                    }],
                    false,
                )
            }
            _ => (Vec::new(), false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    const EPOCH: &str = "00112233445566778899aabbccddeeff";

    fn typed(kind: &str, payload: &str) -> Push {
        let raw: Box<RawValue> = serde_json::from_str(payload).unwrap();
        Push::parse(kind, &raw).unwrap()
    }

    fn events(from: u64, events: &[&str]) -> Push {
        let entries: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(i, e)| format!(r#"{{"offset":{},"event":{e}}}"#, from + i as u64))
            .collect();
        typed(
            push::STREAM_EVENTS,
            &format!(
                r#"{{"runId":"r","streamEpoch":"{EPOCH}","events":[{}]}}"#,
                entries.join(",")
            ),
        )
    }

    #[test]
    fn typed_stream_pushes_become_items_in_order_and_once() {
        let mut state = StreamState::new(Some(0));
        let (items, resume) = state.pushed(events(0, &["1", r#"{"a":[2]}"#])).unwrap();
        assert!(!resume);
        assert_eq!(
            items,
            [
                StreamItem::Event {
                    offset: 0,
                    event: 1.into()
                },
                StreamItem::Event {
                    offset: 1,
                    event: serde_json::json!({"a": [2]})
                },
            ]
        );
        // A batch that overlaps what was delivered yields only what is new.
        let (items, _) = state.pushed(events(1, &["2", "3"])).unwrap();
        assert_eq!(
            items,
            [StreamItem::Event {
                offset: 2,
                event: 3.into()
            }]
        );
        assert_eq!(
            state
                .resume_request(RunId::new("r").unwrap(), None)
                .stream_epoch,
            Some(StreamEpoch::new(EPOCH).unwrap()),
            "resumed in the epoch of the offsets delivered"
        );
        let gap = typed(
            push::STREAM_GAP,
            &format!(r#"{{"runId":"r","streamEpoch":"{EPOCH}","fromOffset":3,"toOffset":9}}"#),
        );
        assert_eq!(
            state.pushed(gap).unwrap(),
            (vec![StreamItem::Gap { from: 3, to: 9 }], false)
        );
        assert_eq!(
            state
                .resume_request(RunId::new("r").unwrap(), None)
                .from_offset,
            Some(10)
        );
        let closed = typed(
            push::STREAM_CLOSED,
            &format!(r#"{{"runId":"r","streamEpoch":"{EPOCH}"}}"#),
        );
        assert_eq!(
            state.pushed(closed).unwrap(),
            (
                vec![StreamItem::Closed {
                    stream_epoch: EPOCH.into()
                }],
                true
            )
        );
        let ended = format!(
            r#"{{"runId":"r","streamEpoch":"{EPOCH}","nextOffset":10,"outcome":"completed","endedAt":"2026-11-25T10:00:00.123Z"}}"#
        );
        let (items, _) = state.pushed(typed(push::STREAM_ENDED, &ended)).unwrap();
        assert_eq!(
            items,
            [StreamItem::Ended {
                outcome: RunOutcome::Completed,
                message: None,
                next_offset: 10,
                ended_at: "2026-11-25T10:00:00.123Z".into()
            }]
        );
        assert!(state.is_ended());
        // Ended once only.
        let (items, _) = state.pushed(typed(push::STREAM_ENDED, &ended)).unwrap();
        assert!(items.is_empty());
    }

    /// An event a `Value` cannot hold (a number beyond f64, which a
    /// gateway of the protocol refuses at publish) is the push's error,
    /// and nothing of its batch is taken.
    #[test]
    fn an_unreadable_event_is_a_typed_error_and_changes_nothing() {
        let mut state = StreamState::new(Some(0));
        let e = state.pushed(events(0, &["1", "1e400"])).unwrap_err();
        assert_eq!(
            (e.kind.as_str(), e.path.as_str()),
            (push::STREAM_EVENTS, "/payload/events/1/event")
        );
        let resume = state.resume_request(RunId::new("r").unwrap(), None);
        assert_eq!((resume.from_offset, resume.stream_epoch), (Some(0), None));
    }
}
