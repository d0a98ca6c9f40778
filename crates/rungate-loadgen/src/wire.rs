//! The frames the load generator writes and the little it reads of the
//! frames it gets back, both through the protocol crate's codec.
//!
//! Payloads are written by hand into one `String` (a publish of 100
//! events is one buffer, no `serde_json::Value` per event) and wrapped in
//! the envelope by [`envelope::encode_request_raw`]. What arrives is only
//! *classified*: a reply's numeric id, an error's code, and for a
//! `stream.events` push the run, the first and last offsets and the send
//! timestamp embedded in the first event, read by
//! [`stream_frame::summarize_events`] without parsing every event, so a
//! viewer reading a million events a second does not parse a million
//! events a second. Must not keep state between frames.

use std::borrow::Cow;
use std::fmt::Write;

use rungate_protocol::{envelope, stream_frame};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The part of every command that names a session:
/// `"sessionId":"…","runId":"…"`, written once per session.
#[derive(Debug, Clone)]
pub(crate) struct SessionRef {
    pub run: String,
    /// `{"sessionId":"…","runId":"…"}`.
    heartbeat_payload: String,
    /// `"sessionId":"…","runId":"…",` for the publish payload.
    members: String,
}

impl SessionRef {
    pub(crate) fn new(session_id: &str, run: &str) -> SessionRef {
        let members = format!(
            r#""sessionId":{},"runId":{}"#,
            json_str(session_id),
            json_str(run)
        );
        SessionRef {
            run: run.to_owned(),
            heartbeat_payload: format!("{{{members}}}"),
            members,
        }
    }
}

/// A JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `{"id":"N","type":KIND,"payload":PAYLOAD}`, `payload` being JSON text
/// this module wrote.
pub(crate) fn request(id: u64, kind: &str, payload: &str) -> Message {
    message(envelope::encode_request_raw(&id.to_string(), kind, payload).into_bytes())
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

pub(crate) fn attach(
    id: u64,
    run: &str,
    instance: &str,
    capabilities: &[&str],
    reconnect: bool,
    epoch: u64,
) -> Message {
    let caps: Vec<String> = capabilities.iter().map(|c| json_str(c)).collect();
    let payload = format!(
        r#"{{"runId":{},"runtimeInstanceId":{},"protocolVersion":"1","reconnect":{reconnect},"connectionEpoch":{epoch},"capabilities":[{}]}}"#,
        json_str(run),
        json_str(instance),
        caps.join(",")
    );
    request(id, "runtime.attach", &payload)
}

pub(crate) fn heartbeat(id: u64, session: &SessionRef) -> Message {
    request(id, "runtime.heartbeat", &session.heartbeat_payload)
}

/// `stream.resume` for a viewer socket: live (`from` = `None`) or from an
/// offset.
pub(crate) fn resume(id: u64, run: &str, from: Option<u64>) -> Message {
    let payload = match from {
        Some(offset) => format!(r#"{{"runId":{},"fromOffset":{offset}}}"#, json_str(run)),
        None => format!(r#"{{"runId":{}}}"#, json_str(run)),
    };
    request(id, "stream.resume", &payload)
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

/// An `events.publish` of `count` events numbered from `seq`, each
/// `event_bytes` bytes of JSON (or the smallest possible, if that is
/// less) and carrying `t_us`, the loadgen clock when it was sent, as the
/// first member of its `data`. `buf` is scratch space for the payload,
/// kept between calls.
pub(crate) fn publish(
    buf: &mut String,
    id: u64,
    session: &SessionRef,
    seq: u64,
    count: usize,
    event_bytes: usize,
    t_us: u64,
) -> Message {
    buf.clear();
    let _ = write!(buf, r#"{{{},"events":["#, session.members);
    for i in 0..count as u64 {
        if i > 0 {
            buf.push(',');
        }
        let seq = seq + i;
        let pad = event_bytes.saturating_sub(EVENT_FIXED + digits(seq) + digits(t_us));
        let _ = write!(
            buf,
            r#"{{"type":"lg","seq":{seq},"data":{{"t":{t_us},"p":""#
        );
        buf.extend(std::iter::repeat_n('x', pad));
        buf.push_str(r#""}}"#);
    }
    buf.push_str("]}");
    request(id, "events.publish", buf)
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
        Some(envelope::Incoming::Push { kind, payload }) if kind == "stream.gap" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Gap<'a> {
                #[serde(borrow)]
                run_id: Cow<'a, str>,
                from_offset: u64,
                to_offset: u64,
            }
            match serde_json::from_str::<Gap>(payload.get()) {
                Ok(g) => Incoming::Gap {
                    run: Cow::Owned(g.run_id.into_owned()),
                    from: g.from_offset,
                    to: g.to_offset,
                },
                Err(_) => Incoming::Unknown,
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

    #[test]
    fn events_have_the_asked_size_and_parse() {
        let s = SessionRef::new("0123456789abcdef0123456789abcdef", "lg-1");
        let mut buf = String::new();
        let frame = publish(&mut buf, 7, &s, 1, 3, 200, 123_456);
        let v: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        let events = v["payload"]["events"].as_array().unwrap();
        assert_eq!(events.len(), 3);
        for e in events {
            assert_eq!(e.to_string().len(), 200);
            assert_eq!(e["data"]["t"], 123_456);
        }
        assert_eq!(v["id"], "7");
        assert_eq!(v["payload"]["runId"], "lg-1");
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
        let gap = r#"{"type":"stream.gap","payload":{"runId":"r","streamEpoch":"e","fromOffset":3,"toOffset":9}}"#;
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
