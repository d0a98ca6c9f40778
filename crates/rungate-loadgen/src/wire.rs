//! The frames the load generator writes and the little it reads of the
//! frames it gets back, both through the protocol crate: every request is
//! one of its typed payloads, encoded by [`envelope::encode_command`].
//!
//! The hot paths stay cheap without writing JSON by hand. A session's
//! heartbeat payload is serialized once ([`Encoded`]) and only wrapped in
//! an envelope with a fresh id per beat. A publish's events are borrowed
//! [`EventRef`]s over typed data ([`LoadEventData`]), serialized straight
//! into the frame: no `serde_json::Value` and no buffer per event, and the
//! padding is kept between batches ([`PublishScratch`]). What arrives is only *classified*: a reply's
//! numeric id, an error's code, and for a `stream.events` push the run, the
//! first and last offsets and the send timestamp embedded in the first
//! event, read by [`stream_frame::summarize_events`] without parsing every
//! event, so a viewer reading a million events a second does not parse a
//! million events a second. Must not keep state between frames.

use std::borrow::Cow;

use rungate_protocol::commands::{
    EventRef, HeartbeatCommand, PublishOutputEventsRequest, RuntimeAttachRequest,
    RuntimeAttachResponse, StreamResumeCommand,
};
use rungate_protocol::ids::{Capability, OpaqueId, RunId, SessionId};
use rungate_protocol::push::{self, Push};
use rungate_protocol::{CommandPayload, Encoded, envelope, stream_frame};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// One attached session: what every command after attach names, and its
/// heartbeat payload, serialized once.
#[derive(Debug, Clone)]
pub(crate) struct SessionRef {
    pub run: RunId,
    session_id: SessionId,
    heartbeat: Encoded<HeartbeatCommand>,
}

impl SessionRef {
    /// The session an attach answered.
    pub(crate) fn new(attached: RuntimeAttachResponse) -> Result<SessionRef, String> {
        let heartbeat = Encoded::new(&HeartbeatCommand {
            session_id: attached.session_id.clone(),
            run_id: attached.run_id.clone(),
            runtime_instance_id: None,
            metadata: None,
        })
        .map_err(|_| "heartbeat:encode".to_owned())?;
        Ok(SessionRef {
            run: attached.run_id,
            session_id: attached.session_id,
            heartbeat,
        })
    }
}

/// A typed request under the numeric id `id`.
pub(crate) fn request<C: CommandPayload>(id: u64, payload: &C) -> Message {
    message(envelope::encode_command(&id.to_string(), payload).into_bytes())
}

/// Bytes the protocol crate's codec or frame builder wrote, as a text
/// message, without copying them.
pub(crate) fn message(bytes: bytes::Bytes) -> Message {
    Message::Text(text(bytes))
}

/// [`message`]'s text: the codec writes JSON, which is UTF-8; should that
/// ever break, an empty text draws a `BAD_FRAME` rather than a panic.
pub(crate) fn text(bytes: bytes::Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(bytes).unwrap_or_default()
}

/// `runtime.attach` of `run` for runtime instance `instance`; `Err` (the
/// error to count) if either is not an identifier the protocol allows.
pub(crate) fn attach(
    id: u64,
    run: &str,
    instance: &str,
    capabilities: &[Capability],
    reconnect: bool,
    epoch: u64,
) -> Result<Message, String> {
    let attach = RuntimeAttachRequest {
        run_id: RunId::new(run).map_err(|_| "attach:invalid_run_id".to_owned())?,
        attempt_id: None,
        runtime_instance_id: OpaqueId::new(instance)
            .map_err(|_| "attach:invalid_instance_id".to_owned())?,
        protocol_version: "1".into(),
        reconnect,
        connection_epoch: Some(epoch),
        capabilities: capabilities.to_vec(),
    };
    Ok(request(id, &attach))
}

/// The session an attach reply (the whole frame's text) names.
pub(crate) fn attached(text: &str) -> Option<RuntimeAttachResponse> {
    match envelope::decode_incoming(text)? {
        envelope::Incoming::Reply { payload, .. } => {
            serde_json::from_str::<<RuntimeAttachRequest as CommandPayload>::Reply>(payload.get())
                .ok()
        }
        _ => None,
    }
}

pub(crate) fn heartbeat(id: u64, session: &SessionRef) -> Message {
    request(id, &session.heartbeat)
}

/// `stream.resume` for a viewer socket: live (`from` = `None`) or from an
/// offset; `Err` (the error to count) if `run` is not a run id.
pub(crate) fn resume(id: u64, run: &str, from: Option<u64>) -> Result<Message, String> {
    let resume = StreamResumeCommand {
        run_id: RunId::new(run).map_err(|_| "resume:invalid_run_id".to_owned())?,
        from_offset: from,
        stream_epoch: None,
        session_id: None,
    };
    Ok(request(id, &resume))
}

/// The `data` of a load event: `t`, the loadgen clock when the batch was
/// sent, first (so a viewer finds it in the event's first bytes), then
/// padding to the asked size.
#[derive(Serialize)]
pub(crate) struct LoadEventData<'a> {
    t: u64,
    p: &'a str,
}

/// Fixed bytes of one event besides the digits of `seq` and `t` and the
/// padding: `{"type":"lg","seq":,"data":{"t":,"p":""}}`.
const EVENT_FIXED: usize = r#"{"type":"lg","seq":,"data":{"t":,"p":""}}"#.len();

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// What a publisher keeps between batches: the padding text, sliced for
/// each event, never rebuilt.
#[derive(Default)]
pub(crate) struct PublishScratch {
    pad: String,
}

/// An `events.publish` of `count` events numbered from `seq`, each
/// `event_bytes` bytes of JSON (or the smallest possible, if that is
/// less) and carrying `t_us`, the loadgen clock when it was sent, as the
/// first member of its `data`. The events are borrowed [`EventRef`]s,
/// serialized straight into the frame.
pub(crate) fn publish(
    scratch: &mut PublishScratch,
    id: u64,
    session: &SessionRef,
    seq: u64,
    count: usize,
    event_bytes: usize,
    t_us: u64,
) -> Message {
    let pad_len = |seq: u64| event_bytes.saturating_sub(EVENT_FIXED + digits(seq) + digits(t_us));
    // The first event has the fewest digits, so the longest padding.
    let longest = pad_len(seq);
    if scratch.pad.len() < longest {
        scratch.pad = "x".repeat(longest);
    }
    let seqs = seq..seq + count as u64;
    let data: Vec<LoadEventData> = seqs
        .clone()
        .map(|seq| LoadEventData {
            t: t_us,
            p: &scratch.pad[..pad_len(seq)],
        })
        .collect();
    let events = seqs
        .zip(&data)
        .map(|(seq, data)| EventRef {
            kind: "lg",
            seq: Some(seq),
            timestamp: None,
            data: Some(data),
        })
        .collect();
    request(
        id,
        &PublishOutputEventsRequest {
            session_id: session.session_id.clone(),
            run_id: session.run.clone(),
            events,
        },
    )
}

/// What one frame from the server is, as far as the load generator cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    /// A reply to request `id` (ids are numbers in this tool).
    Reply {
        id: Option<u64>,
    },
    Error {
        id: Option<u64>,
        code: Cow<'a, str>,
    },
    /// A `stream.events` push: events `first..=last` of `run`; `t_us` is
    /// the send time embedded in the first event, if it has one.
    Events {
        run: Cow<'a, str>,
        first: u64,
        last: u64,
        t_us: Option<u64>,
    },
    /// A `stream.gap`: `from..=to` were missed.
    Gap {
        run: Cow<'a, str>,
        from: u64,
        to: u64,
    },
    /// Any other push.
    Push {
        kind: Cow<'a, str>,
    },
    /// Not a frame of the protocol.
    Unknown,
}

/// Sorts one text frame.
pub(crate) fn classify(text: &str) -> Incoming<'_> {
    if let Some(events) = stream_frame::summarize_events(text) {
        return Incoming::Events {
            run: events.run,
            first: events.first,
            last: events.last,
            t_us: sent_at(events.first_event),
        };
    }
    match envelope::decode_incoming(text) {
        None => Incoming::Unknown,
        Some(envelope::Incoming::Reply { id, .. }) => Incoming::Reply {
            id: id.parse().ok(),
        },
        Some(envelope::Incoming::Error { id, error }) => Incoming::Error {
            id: id.and_then(|i| i.parse().ok()),
            code: Cow::Borrowed(error.code.as_str()),
        },
        Some(envelope::Incoming::Push { kind, payload }) if kind == push::STREAM_GAP => {
            match Push::parse(&kind, payload) {
                Ok(Push::StreamGap(g)) => Incoming::Gap {
                    run: Cow::Owned(g.run_id.to_string()),
                    from: g.from_offset,
                    to: g.to_offset,
                },
                _ => Incoming::Unknown,
            }
        }
        Some(envelope::Incoming::Push { kind, .. }) => Incoming::Push { kind },
    }
}

/// The `t` of an event written by [`publish`] (`{"type":"lg","seq":N,
/// "data":{"t":T,…}}`), read from its first bytes; any other event
/// through serde.
fn sent_at(event: &str) -> Option<u64> {
    let head = &event[..event.len().min(64)];
    if let Some(at) = head.find(r#""data":{"t":"#) {
        let digits = &head[at + r#""data":{"t":"#.len()..];
        let end = digits.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(t) = digits[..end].parse() {
            return Some(t);
        }
    }
    #[derive(Deserialize)]
    struct Data {
        t: u64,
    }
    #[derive(Deserialize)]
    struct Ev {
        data: Data,
    }
    serde_json::from_str::<Ev>(event).ok().map(|e| e.data.t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionRef {
        SessionRef::new(attached_reply()).unwrap()
    }

    #[test]
    fn events_have_the_asked_size_and_parse() {
        let s = session();
        let mut scratch = PublishScratch::default();
        for (count, bytes, seq) in [(3, 200, 1), (2, 120, 9_999), (1, 10, 1)] {
            let frame = publish(&mut scratch, 7, &s, seq, count, bytes, 123_456);
            let v: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
            let events = v["payload"]["events"].as_array().unwrap();
            assert_eq!(events.len(), count);
            for (i, e) in events.iter().enumerate() {
                // Or the smallest possible, which is bigger than 10 bytes.
                let smallest = EVENT_FIXED + digits(seq + i as u64) + digits(123_456);
                assert_eq!(e.to_string().len(), bytes.max(smallest), "{e}");
                assert_eq!(e["data"]["t"], 123_456);
                assert_eq!(e["seq"], seq + i as u64);
                // The viewer's fast path finds `t` in the event's first bytes.
                assert_eq!(sent_at(&e.to_string()), Some(123_456));
            }
            assert_eq!(v["id"], "7");
            assert_eq!(v["type"], "events.publish");
            assert_eq!(v["payload"]["runId"], "lg-1");
        }
    }

    /// Every request the load generator writes is a typed payload the
    /// gateway's own parser reads back.
    #[test]
    fn every_request_is_typed_and_reads_back() {
        use rungate_protocol::{Command, CommandKind, decode};
        let s = session();
        let read = |m: Message| {
            let text = m.to_text().unwrap().to_owned();
            let req = decode(&text).unwrap();
            let kind = CommandKind::parse(&req.kind).unwrap();
            format!("{:?}", Command::parse(kind, req.payload).unwrap())
        };
        let attaching = attach(1, "lg-1", "inst-1", &[Capability::SubtasksRun], false, 0).unwrap();
        assert!(read(attaching).starts_with("RuntimeAttach("));
        assert!(read(heartbeat(2, &s)).starts_with("RuntimeHeartbeat("));
        assert_eq!(
            heartbeat(3, &s).to_text().unwrap(),
            envelope::encode_command(
                "3",
                &HeartbeatCommand {
                    session_id: s.session_id.clone(),
                    run_id: s.run.clone(),
                    runtime_instance_id: None,
                    metadata: None,
                }
            )
            .as_str(),
            "the heartbeat encoded once is the heartbeat"
        );
        assert!(read(resume(4, "lg-1", Some(3)).unwrap()).starts_with("StreamResume("));
        let mut scratch = PublishScratch::default();
        assert!(read(publish(&mut scratch, 5, &s, 1, 2, 100, 9)).starts_with("EventsPublish("));
        assert_eq!(
            attach(6, "bad run", "i", &[], false, 0).unwrap_err(),
            "attach:invalid_run_id"
        );
        assert!(resume(7, "", None).is_err());
        let reply = envelope::encode_reply("1", &{
            let mut a = attached_reply();
            a.heartbeat_interval_ms = 250;
            a
        });
        assert_eq!(attached(reply.as_str()).unwrap().heartbeat_interval_ms, 250);
        assert!(attached(r#"{"id":"1","type":"reply","payload":{"sessionId":"x"}}"#).is_none());
    }

    fn attached_reply() -> RuntimeAttachResponse {
        RuntimeAttachResponse {
            session_id: SessionId::new("0123456789abcdef0123456789abcdef").unwrap(),
            run_id: RunId::new("lg-1").unwrap(),
            heartbeat_interval_ms: 1000,
            lease_expires_at: rungate_protocol::time::Timestamp::from_unix_millis(0),
            config_version: None,
        }
    }

    #[test]
    fn gateway_layouts_take_the_fast_path() {
        let frame = r#"{"type":"stream.events","payload":{"runId":"r-1","streamEpoch":"ab","events":[{"offset":5,"event":{"type":"lg","seq":1,"data":{"t":99,"p":"x"}}},{"offset":6,"event":{"type":"lg"}}]}}"#;
        let want = Incoming::Events {
            run: Cow::Borrowed("r-1"),
            first: 5,
            last: 6,
            t_us: Some(99),
        };
        assert_eq!(classify(frame), want);
        assert_eq!(
            classify(r#"{"id":"12","type":"reply","payload":{"accepted":true}}"#),
            Incoming::Reply { id: Some(12) }
        );
        assert_eq!(
            classify(
                r#"{"id":"3","type":"error","error":{"code":"CONFLICT","message":"m","retryable":false}}"#
            ),
            Incoming::Error {
                id: Some(3),
                code: Cow::Borrowed("CONFLICT")
            }
        );
    }

    #[test]
    fn other_layouts_take_the_slow_path() {
        let frame = r#"{"payload":{"streamEpoch":"ab","runId":"r-1","events":[{"event":{"data":{"t":7}},"offset":1}]},"type":"stream.events"}"#;
        assert_eq!(
            classify(frame),
            Incoming::Events {
                run: Cow::Borrowed("r-1"),
                first: 1,
                last: 1,
                t_us: Some(7)
            }
        );
        let gap = r#"{"type":"stream.gap","payload":{"runId":"r","streamEpoch":"00112233445566778899aabbccddeeff","fromOffset":3,"toOffset":9}}"#;
        assert_eq!(
            classify(gap),
            Incoming::Gap {
                run: Cow::Borrowed("r"),
                from: 3,
                to: 9
            }
        );
        assert_eq!(
            classify(r#"{"type":"error","id":null,"error":{"code":"BAD_FRAME"}}"#),
            Incoming::Error {
                id: None,
                code: Cow::Borrowed("BAD_FRAME")
            }
        );
        assert_eq!(classify("nope"), Incoming::Unknown);
    }
}
