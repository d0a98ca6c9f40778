//! Push payloads: the frames without an id that the gateway sends unasked,
//! typed as `spec/v1/schemas/frames/pushes.json` defines them, for the
//! gateway that writes them and the clients that read them.
//!
//! Owns each push type's wire name, its payload type, and [`Push::parse`],
//! the one way a client turns a push frame's payload into a typed value (or
//! a [`PushError`] saying which member broke the schema). Pushes are read
//! leniently, like replies: members a newer gateway adds are ignored, and a
//! type this crate does not know is [`Push::Unknown`], not an error.
//!
//! The `stream.events`, `stream.gap` and `stream.ended` frames a ring
//! stores are written by [`crate::stream_frame`] (byte splicing, once per
//! batch); the types here describe the same payloads, so a reader has one
//! definition of them. Must not do I/O or decide who is pushed what.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{RunId, RunOutcome, SessionId, StreamEpoch};
use crate::time::Timestamp;

/// Push type of a batch of a followed run's events (built by [`crate::stream_frame`]).
pub const STREAM_EVENTS: &str = "stream.events";
/// Push type of offsets a follower missed (built by [`crate::stream_frame::gap_frame`]).
pub const STREAM_GAP: &str = "stream.gap";
/// Push type sent to the old socket when a reconnect moved the session elsewhere.
pub const SESSION_SUPERSEDED: &str = "session.superseded";
/// Push type sent when a session's lease ran out.
pub const SESSION_EXPIRED: &str = "session.expired";
/// Push type sent to every socket when the gateway starts shutting down.
pub const GATEWAY_DRAINING: &str = "gateway.draining";
/// Push type sent when the stream a socket followed was dropped.
pub const STREAM_CLOSED: &str = "stream.closed";
/// Push type sent once per subscription after an ended run's last event.
pub const STREAM_ENDED: &str = "stream.ended";
/// Push type sent to the runtime socket holding a run a viewer asked to stop.
pub const RUN_CANCEL_REQUESTED: &str = "run.cancelRequested";

/// The pushes about a followed run's stream, which a follower handles.
pub const STREAM_PUSHES: [&str; 4] = [STREAM_EVENTS, STREAM_GAP, STREAM_CLOSED, STREAM_ENDED];

/// A viewer asked the run to stop (`run.cancel`); pushed on the socket
/// holding the run's session, and again after each reattach until the
/// run ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCancelRequested {
    /// The session holding the run (`sessionId`).
    pub session_id: SessionId,
    /// The run asked to stop (`runId`).
    pub run_id: RunId,
    /// The viewer's `reason`, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the viewer asked (`requestedAt`).
    pub requested_at: Timestamp,
}

/// `session.superseded`: a reconnect with a greater `connectionEpoch` moved the session to
/// another socket; this one now gets `STALE_EPOCH` for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSuperseded {
    /// The session that moved (`sessionId`).
    pub session_id: SessionId,
    /// The run bound to it (`runId`).
    pub run_id: RunId,
    /// The epoch the session moved to.
    pub connection_epoch: u64,
}

/// `session.expired`: the session's lease ran out; attach afresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionExpired {
    /// The session that expired (`sessionId`).
    pub session_id: SessionId,
    /// The run bound to it (`runId`).
    pub run_id: RunId,
}

/// `gateway.draining`: the gateway is shutting down; new requests get `DRAINING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayDraining {
    /// How long to wait before reconnecting, in milliseconds (`reconnectAfterMs`).
    pub reconnect_after_ms: u64,
}

/// `stream.events`: events of one run, in offset order. The WebSocket
/// frame is spliced by [`crate::stream_frame::FrameBuilder`]; this is its
/// payload as a client reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamEvents {
    /// The run the events belong to (`runId`).
    pub run_id: RunId,
    /// The history they belong to (`streamEpoch`): the one to resume with.
    pub stream_epoch: StreamEpoch,
    /// The events, contiguous offsets (`events`).
    pub events: Vec<StreamEvent>,
}

/// One event of a [`StreamEvents`] push.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEvent {
    /// The event's position in the run's stream (`offset`).
    pub offset: u64,
    /// The JSON the runtime published, byte for byte (`event`).
    pub event: Box<RawValue>,
}

/// `stream.gap`: the subscriber fell behind the ring and missed
/// `fromOffset..=toOffset`; it continues after them. The WebSocket frame
/// is spliced by [`crate::stream_frame::gap_frame`], which the ring
/// stores; this is the same payload for a transport that serializes it
/// (SSE's `event: gap`) and for a client reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamGap {
    /// The run whose events were missed (`runId`).
    pub run_id: RunId,
    /// The epoch of its stream (`streamEpoch`).
    pub stream_epoch: StreamEpoch,
    /// The first offset missed (`fromOffset`).
    pub from_offset: u64,
    /// The last offset missed, inclusive (`toOffset`).
    pub to_offset: u64,
}

/// The stream a socket followed was dropped (retention after its
/// session ended, or the memory budget): nothing more comes from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamClosed {
    /// The run whose stream was dropped (`runId`).
    pub run_id: RunId,
    /// The epoch of the stream that was dropped (`streamEpoch`).
    pub stream_epoch: StreamEpoch,
}

/// `stream.ended`: the run ended and every event before its end was
/// delivered; the subscription is over. Written once per stream by
/// [`crate::stream_frame::ended_frame`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamEnded {
    /// The run that ended (`runId`).
    pub run_id: RunId,
    /// The history that ended (`streamEpoch`).
    pub stream_epoch: StreamEpoch,
    /// The run's final head: its output is every offset below it (`nextOffset`).
    pub next_offset: u64,
    /// How the run ended (`outcome`).
    pub outcome: RunOutcome,
    /// The finish's `message`, if it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the run ended (`endedAt`).
    pub ended_at: Timestamp,
}

/// A push as a client reads it: its payload typed by the push's `type`.
#[derive(Debug, Clone)]
pub enum Push {
    /// `stream.events`.
    StreamEvents(StreamEvents),
    /// `stream.gap`.
    StreamGap(StreamGap),
    /// `stream.closed`.
    StreamClosed(StreamClosed),
    /// `stream.ended`.
    StreamEnded(StreamEnded),
    /// `session.superseded`.
    SessionSuperseded(SessionSuperseded),
    /// `session.expired`.
    SessionExpired(SessionExpired),
    /// `gateway.draining`.
    GatewayDraining(GatewayDraining),
    /// `run.cancelRequested`.
    RunCancelRequested(RunCancelRequested),
    /// A push type this crate does not know (a newer gateway's): a client
    /// ignores it, as it ignores members it does not know.
    Unknown {
        /// The push's `type`.
        kind: String,
    },
}

/// A push whose payload does not have the shape its type promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} push at {path}: {reason}")]
pub struct PushError {
    /// The push's `type`.
    pub kind: String,
    /// A JSON pointer into the frame to the member that broke the schema
    /// (`/payload` for the payload as a whole).
    pub path: String,
    /// What was wrong there, as serde put it.
    pub reason: String,
}

impl Push {
    /// Types the `payload` of a push of type `kind`. A type this crate does
    /// not know is [`Push::Unknown`], never an error.
    pub fn parse(kind: &str, payload: &RawValue) -> Result<Push, PushError> {
        fn typed<T: serde::de::DeserializeOwned>(kind: &str, text: &str) -> Result<T, PushError> {
            crate::commands::deserialize_at(text, "/payload").map_err(|(path, reason)| PushError {
                kind: kind.to_owned(),
                path,
                reason,
            })
        }
        let text = payload.get();
        Ok(match kind {
            STREAM_EVENTS => Push::StreamEvents(typed(kind, text)?),
            STREAM_GAP => Push::StreamGap(typed(kind, text)?),
            STREAM_CLOSED => Push::StreamClosed(typed(kind, text)?),
            STREAM_ENDED => Push::StreamEnded(typed(kind, text)?),
            SESSION_SUPERSEDED => Push::SessionSuperseded(typed(kind, text)?),
            SESSION_EXPIRED => Push::SessionExpired(typed(kind, text)?),
            GATEWAY_DRAINING => Push::GatewayDraining(typed(kind, text)?),
            RUN_CANCEL_REQUESTED => Push::RunCancelRequested(typed(kind, text)?),
            other => Push::Unknown {
                kind: other.to_owned(),
            },
        })
    }

    /// The run a push is about, if its type names one.
    pub fn run_id(&self) -> Option<&RunId> {
        match self {
            Push::StreamEvents(p) => Some(&p.run_id),
            Push::StreamGap(p) => Some(&p.run_id),
            Push::StreamClosed(p) => Some(&p.run_id),
            Push::StreamEnded(p) => Some(&p.run_id),
            Push::SessionSuperseded(p) => Some(&p.run_id),
            Push::SessionExpired(p) => Some(&p.run_id),
            Push::RunCancelRequested(p) => Some(&p.run_id),
            Push::GatewayDraining(_) | Push::Unknown { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Incoming, decode_incoming, encode_push};

    /// What the gateway encodes, a client parses back into the same value.
    fn read_back(kind: &str, payload: &impl Serialize) -> Push {
        let frame = encode_push(kind, payload);
        let Some(Incoming::Push { kind, payload }) = decode_incoming(frame.as_str()) else {
            panic!("{} is not a push", frame.as_str())
        };
        Push::parse(&kind, payload).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ids() -> (SessionId, RunId, StreamEpoch) {
        (
            SessionId::generate(),
            RunId::new("r-1").unwrap(),
            StreamEpoch::generate(),
        )
    }

    /// `value`, encoded as push `kind`, parses back as `Push::$variant`
    /// holding an equal value.
    macro_rules! reads_back {
        ($kind:expr, $variant:ident, $value:expr) => {{
            let value = $value;
            match read_back($kind, &value) {
                Push::$variant(read) => assert_eq!(read, value),
                other => panic!("{}: {other:?}", $kind),
            }
        }};
    }

    #[test]
    fn every_push_the_gateway_writes_reads_back_typed() {
        let (sid, run, epoch) = ids();
        let now = Timestamp::from_unix_millis(1_764_064_800_123);
        let (session_id, run_id, stream_epoch) = (|| sid.clone(), || run.clone(), || epoch.clone());
        reads_back!(
            SESSION_SUPERSEDED,
            SessionSuperseded,
            SessionSuperseded {
                session_id: session_id(),
                run_id: run_id(),
                connection_epoch: 9
            }
        );
        reads_back!(
            SESSION_EXPIRED,
            SessionExpired,
            SessionExpired {
                session_id: session_id(),
                run_id: run_id()
            }
        );
        reads_back!(
            GATEWAY_DRAINING,
            GatewayDraining,
            GatewayDraining {
                reconnect_after_ms: 1500
            }
        );
        for reason in [None, Some("user asked".to_owned())] {
            reads_back!(
                RUN_CANCEL_REQUESTED,
                RunCancelRequested,
                RunCancelRequested {
                    session_id: session_id(),
                    run_id: run_id(),
                    reason,
                    requested_at: now
                }
            );
        }
        reads_back!(
            STREAM_GAP,
            StreamGap,
            StreamGap {
                run_id: run_id(),
                stream_epoch: stream_epoch(),
                from_offset: 3,
                to_offset: 7
            }
        );
        reads_back!(
            STREAM_CLOSED,
            StreamClosed,
            StreamClosed {
                run_id: run_id(),
                stream_epoch: stream_epoch()
            }
        );
    }

    #[test]
    fn the_spliced_stream_frames_read_back_typed() {
        let (_, run, epoch) = ids();
        let events = [
            r#"{"type":"a","data":{"x":[1, 2]}}"#,
            r#"{"type":"b","seq":7}"#,
        ];
        let mut b = crate::stream_frame::FrameBuilder::new(run.as_str(), epoch.as_str(), 40, 2, 64);
        for e in events {
            b.push(e.as_bytes());
        }
        let frame = b.finish();
        let text = std::str::from_utf8(&frame).unwrap();
        let Some(Incoming::Push { kind, payload }) = decode_incoming(text) else {
            panic!("{text}")
        };
        let Ok(Push::StreamEvents(read)) = Push::parse(&kind, payload) else {
            panic!("{text}")
        };
        assert_eq!((&read.run_id, &read.stream_epoch), (&run, &epoch));
        let got: Vec<(u64, &str)> = read
            .events
            .iter()
            .map(|e| (e.offset, e.event.get()))
            .collect();
        assert_eq!(got, [(40, events[0]), (41, events[1])]);
        // The typed payload serializes to the builder's bytes exactly.
        let typed = serde_json::to_string(&read).unwrap();
        assert_eq!(typed, payload.get());

        let gap = crate::stream_frame::gap_frame(run.as_str(), epoch.as_str(), 1, 2);
        let Some(Incoming::Push { kind, payload }) =
            decode_incoming(std::str::from_utf8(&gap).unwrap())
        else {
            panic!("gap")
        };
        assert!(matches!(
            Push::parse(&kind, payload),
            Ok(Push::StreamGap(StreamGap {
                from_offset: 1,
                to_offset: 2,
                ..
            }))
        ));

        let ended = StreamEnded {
            run_id: run.clone(),
            stream_epoch: epoch.clone(),
            next_offset: 42,
            outcome: RunOutcome::Failed,
            message: Some("oom \"x\"".into()),
            ended_at: Timestamp::from_unix_millis(5),
        };
        let (data, frame) = crate::stream_frame::ended_frame(&ended);
        let Some(Incoming::Push { kind, payload }) =
            decode_incoming(std::str::from_utf8(&frame).unwrap())
        else {
            panic!("ended")
        };
        assert_eq!(payload.get().as_bytes(), &data[..]);
        assert!(matches!(Push::parse(&kind, payload), Ok(Push::StreamEnded(p)) if p == ended));
    }

    #[test]
    fn a_malformed_push_is_an_error_that_names_the_member() {
        let cases = [
            (
                STREAM_EVENTS,
                r#"{"runId":"r","streamEpoch":"00000000000000ab","events":[{"offset":-1,"event":{}}]}"#,
                "/payload/events/0/offset",
            ),
            (STREAM_EVENTS, r#"{"runId":"r","events":[]}"#, "/payload"),
            (
                STREAM_GAP,
                r#"{"runId":"r","streamEpoch":"00000000000000ab","fromOffset":"3","toOffset":4}"#,
                "/payload/fromOffset",
            ),
            (
                SESSION_SUPERSEDED,
                r#"{"sessionId":"not a session","runId":"r","connectionEpoch":1}"#,
                "/payload/sessionId",
            ),
            (SESSION_EXPIRED, r#"[]"#, "/payload"),
            (
                RUN_CANCEL_REQUESTED,
                r#"{"sessionId":"0123456789abcdef0123456789abcdef","runId":"r","requestedAt":"yesterday"}"#,
                "/payload/requestedAt",
            ),
            (
                STREAM_ENDED,
                r#"{"runId":"r","streamEpoch":"00000000000000ab","nextOffset":1,"outcome":"exploded","endedAt":"2026-01-01T00:00:00Z"}"#,
                "/payload/outcome",
            ),
            (
                GATEWAY_DRAINING,
                r#"{"reconnectAfterMs":null}"#,
                "/payload/reconnectAfterMs",
            ),
        ];
        for (kind, payload, path) in cases {
            let raw: Box<RawValue> = serde_json::from_str(payload).unwrap();
            let e = Push::parse(kind, &raw).expect_err(payload);
            assert_eq!((e.kind.as_str(), e.path.as_str()), (kind, path), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("malformed {kind} push at {path}: "))
            );
        }
    }

    #[test]
    fn unknown_types_and_members_are_not_errors() {
        let raw: Box<RawValue> = serde_json::from_str(r#"{"anything":1}"#).unwrap();
        assert!(matches!(
            Push::parse("gateway.fromTheFuture", &raw),
            Ok(Push::Unknown { kind }) if kind == "gateway.fromTheFuture"
        ));
        let raw: Box<RawValue> =
            serde_json::from_str(r#"{"reconnectAfterMs":5,"newMember":true}"#).unwrap();
        assert!(matches!(
            Push::parse(GATEWAY_DRAINING, &raw),
            Ok(Push::GatewayDraining(GatewayDraining {
                reconnect_after_ms: 5
            }))
        ));
    }
}
