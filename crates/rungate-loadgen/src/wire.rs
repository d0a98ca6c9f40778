//! The frames the load generator writes and the little it reads of the
//! frames it gets back.
//!
//! Requests are built by hand into one `String` (no `serde_json::Value`
//! per frame): a publish of 100 events is one allocation. What arrives is
//! only *classified*: a reply's numeric id, an error's code, and for a
//! `stream.events` push the run, the first and last offsets and the send
//! timestamp embedded in the first event. Those are found by scanning the
//! known layout of the gateway's frames (serde's field order for replies,
//! `stream::frame` for stream pushes), with a serde fallback for any frame
//! laid out differently, so a viewer reading a million events a second
//! does not parse a million events a second. Must not keep state between
//! frames.

use std::borrow::Cow;
use std::fmt::Write;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The part of every command that names a session:
/// `"sessionId":"…","runId":"…"`, written once per session.
#[derive(Debug, Clone)]
pub struct SessionRef {
    pub run: String,
    /// `{"sessionId":"…","runId":"…"}`.
    heartbeat_payload: String,
    /// `"sessionId":"…","runId":"…",` for the publish payload.
    members: String,
}

impl SessionRef {
    pub fn new(session_id: &str, run: &str) -> SessionRef {
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
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `{"id":"N","type":KIND,"payload":PAYLOAD}`.
pub fn request(id: u64, kind: &str, payload: &str) -> String {
    format!(r#"{{"id":"{id}","type":"{kind}","payload":{payload}}}"#)
}

pub fn attach(
    id: u64,
    run: &str,
    instance: &str,
    capabilities: &[&str],
    reconnect: bool,
    epoch: u64,
) -> String {
    let caps: Vec<String> = capabilities.iter().map(|c| json_str(c)).collect();
    let payload = format!(
        r#"{{"runId":{},"runtimeInstanceId":{},"protocolVersion":"1","reconnect":{reconnect},"connectionEpoch":{epoch},"capabilities":[{}]}}"#,
        json_str(run),
        json_str(instance),
        caps.join(",")
    );
    request(id, "runtime.attach", &payload)
}

pub fn heartbeat(id: u64, session: &SessionRef) -> String {
    request(id, "runtime.heartbeat", &session.heartbeat_payload)
}

/// `stream.resume` for a viewer socket: live (`from` = `None`) or from an
/// offset.
pub fn resume(id: u64, run: &str, from: Option<u64>) -> String {
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
/// first member of its `data`.
pub fn publish(
    buf: &mut String,
    id: u64,
    session: &SessionRef,
    seq: u64,
    count: usize,
    event_bytes: usize,
    t_us: u64,
) {
    buf.clear();
    let _ = write!(
        buf,
        r#"{{"id":"{id}","type":"events.publish","payload":{{{},"events":["#,
        session.members
    );
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
    buf.push_str("]}}");
}

/// What one frame from the server is, as far as the load generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
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

/// Reads the decimal digits at the start of `s`.
fn leading_u64(s: &str) -> Option<(u64, usize)> {
    let end = s.bytes().take_while(u8::is_ascii_digit).count();
    if end == 0 {
        return None;
    }
    s[..end].parse().ok().map(|n| (n, end))
}

const REPLY_HEAD: &str = r#"{"id":""#;
const EVENTS_HEAD: &str = r#"{"type":"stream.events","payload":{"runId":""#;
const FIRST_ENTRY: &str = r#""events":[{"offset":"#;
const ENTRY: &str = r#"{"offset":"#;

/// Sorts one text frame.
pub fn classify(text: &str) -> Incoming<'_> {
    fast(text).unwrap_or_else(|| slow(text))
}

/// The gateway's own layouts; `None` sends the frame to [`slow`].
fn fast(text: &str) -> Option<Incoming<'_>> {
    if let Some(rest) = text.strip_prefix(REPLY_HEAD) {
        let (id, n) = leading_u64(rest)?;
        let rest = rest[n..].strip_prefix(r#"","type":""#)?;
        if rest.starts_with(r#"reply""#) {
            return Some(Incoming::Reply { id: Some(id) });
        }
        let rest = rest.strip_prefix(r#"error","error":{"code":""#)?;
        let end = rest.find('"')?;
        return Some(Incoming::Error {
            id: Some(id),
            code: Cow::Borrowed(&rest[..end]),
        });
    }
    let rest = text.strip_prefix(EVENTS_HEAD)?;
    let run_end = rest.find('"')?;
    let run = &rest[..run_end];
    let at = rest.find(FIRST_ENTRY)? + FIRST_ENTRY.len();
    let (first, n) = leading_u64(&rest[at..])?;
    let event = rest[at + n..].strip_prefix(r#","event":"#)?;
    let last_at = rest.rfind(ENTRY)? + ENTRY.len();
    let (last, _) = leading_u64(&rest[last_at..])?;
    Some(Incoming::Events {
        run: Cow::Borrowed(run),
        first,
        last,
        t_us: sent_at(event),
    })
}

/// The `"t":N` near the start of an event written by [`publish`].
fn sent_at(event: &str) -> Option<u64> {
    let head = &event[..event.len().min(64)];
    let at = head.find(r#""data":{"t":"#)? + r#""data":{"t":"#.len();
    leading_u64(&head[at..]).map(|(t, _)| t)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<ErrorBody<'a>>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsPayload<'a> {
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    events: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    offset: u64,
    #[serde(borrow)]
    event: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GapPayload<'a> {
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    from_offset: u64,
    to_offset: u64,
}

/// Any layout, through serde.
fn slow(text: &str) -> Incoming<'_> {
    let Ok(env) = serde_json::from_str::<Envelope>(text) else {
        return Incoming::Unknown;
    };
    let id = env.id.as_deref().and_then(|i| i.parse().ok());
    match env.kind.as_ref() {
        "reply" => Incoming::Reply { id },
        "error" => Incoming::Error {
            id,
            code: env
                .error
                .map(|e| Cow::Owned(e.code.into_owned()))
                .unwrap_or(Cow::Borrowed("?")),
        },
        "stream.events" => {
            let Some(p) = env
                .payload
                .and_then(|p| serde_json::from_str::<EventsPayload>(p.get()).ok())
            else {
                return Incoming::Unknown;
            };
            let (Some(f), Some(l)) = (p.events.first(), p.events.last()) else {
                return Incoming::Unknown;
            };
            #[derive(Deserialize)]
            struct Data {
                t: u64,
            }
            #[derive(Deserialize)]
            struct Ev {
                data: Data,
            }
            let t_us = serde_json::from_str::<Ev>(f.event.get())
                .ok()
                .map(|e| e.data.t);
            Incoming::Events {
                run: Cow::Owned(p.run_id.into_owned()),
                first: f.offset,
                last: l.offset,
                t_us,
            }
        }
        "stream.gap" => match env
            .payload
            .and_then(|p| serde_json::from_str::<GapPayload>(p.get()).ok())
        {
            Some(g) => Incoming::Gap {
                run: Cow::Owned(g.run_id.into_owned()),
                from: g.from_offset,
                to: g.to_offset,
            },
            None => Incoming::Unknown,
        },
        other => Incoming::Push {
            kind: Cow::Owned(other.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_asked_size_and_parse() {
        let s = SessionRef::new("0123456789abcdef0123456789abcdef", "lg-1");
        let mut buf = String::new();
        publish(&mut buf, 7, &s, 1, 3, 200, 123_456);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
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
        assert_eq!(fast(frame), Some(want));
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
