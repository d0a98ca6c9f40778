//! The bytes of the stream pushes, `stream.events`, `stream.gap` and
//! `stream.ended`.
//!
//! Every other frame is encoded by `protocol`; these two live beside the
//! ring because a `stream.events` frame is built exactly once, at append
//! time, and stored in the ring as the batch itself: every subscriber is
//! sent that same [`Bytes`] (a reference-count clone), and SSE slices single
//! events out of it. Building it later, per subscriber, in the protocol
//! layer would mean one serialization and one copy per viewer.
//!
//! The encoding is written by hand rather than through serde: run ids and
//! stream epochs are restricted to characters JSON never escapes (see
//! [`crate::ids`]), and each event is already
//! valid JSON text (it arrived as a `RawValue`), so the frame is plain
//! concatenation and an event's bytes inside it are exactly the bytes the
//! runtime sent.
//! Must not parse, validate or re-encode events, and must not know about
//! subscribers or limits.

use std::ops::Range;

use bytes::Bytes;

/// Builds one `stream.events` frame:
/// `{"type":"stream.events","payload":{"runId":"…","streamEpoch":"…","events":[{"offset":N,"event":…},…]}}`.
///
/// Events are pushed in offset order; [`FrameBuilder::push`] answers where
/// the event's JSON landed, so the ring can slice it out later.
pub struct FrameBuilder {
    buf: Vec<u8>,
    next_offset: u64,
    count: usize,
}

const EVENTS_HEAD: &[u8] = br#"{"type":"stream.events","payload":{"runId":""#;
const GAP_HEAD: &[u8] = br#"{"type":"stream.gap","payload":{"runId":""#;
const EPOCH_KEY: &[u8] = br#"","streamEpoch":""#;
const EVENTS_KEY: &[u8] = br#"","events":["#;
const ENTRY_HEAD: &[u8] = br#"{"offset":"#;
const ENTRY_EVENT: &[u8] = br#","event":"#;
const EVENTS_TAIL: &[u8] = b"]}}";

/// Frame bytes around each event besides its JSON and its offset's digits:
/// `{"offset":`, `,"event":`, `}` and the separating `,`.
const ENTRY_OVERHEAD: usize = ENTRY_HEAD.len() + ENTRY_EVENT.len() + 2;

impl FrameBuilder {
    /// Starts a frame whose first event has offset `first_offset`.
    /// `json_bytes` and `events` size the buffer so it is allocated once.
    pub fn new(
        run: &str,
        epoch: &str,
        first_offset: u64,
        events: usize,
        json_bytes: usize,
    ) -> FrameBuilder {
        let capacity = events_frame_bound(run, epoch, events, json_bytes);
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(EVENTS_HEAD);
        buf.extend_from_slice(run.as_bytes());
        buf.extend_from_slice(EPOCH_KEY);
        buf.extend_from_slice(epoch.as_bytes());
        buf.extend_from_slice(EVENTS_KEY);
        FrameBuilder {
            buf,
            next_offset: first_offset,
            count: 0,
        }
    }

    /// Appends the next event (its JSON text, unchanged) and returns the
    /// byte range it occupies in the finished frame.
    pub fn push(&mut self, json: &[u8]) -> Range<usize> {
        if self.count > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(ENTRY_HEAD);
        push_decimal(&mut self.buf, self.next_offset);
        self.buf.extend_from_slice(ENTRY_EVENT);
        let start = self.buf.len();
        self.buf.extend_from_slice(json);
        let end = self.buf.len();
        self.buf.push(b'}');
        self.next_offset += 1;
        self.count += 1;
        start..end
    }

    /// Closes the frame and hands back its bytes.
    pub fn finish(mut self) -> Bytes {
        self.buf.extend_from_slice(EVENTS_TAIL);
        Bytes::from(self.buf)
    }
}

/// The most bytes a `stream.events` frame of `events` events holding
/// `json_bytes` of JSON can take, whatever their offsets (each counted at
/// 20 digits). An engine that must refuse a batch before its offsets are
/// known checks this against the per-run byte bound.
pub fn events_frame_bound(run: &str, epoch: &str, events: usize, json_bytes: usize) -> usize {
    EVENTS_HEAD.len()
        + run.len()
        + EPOCH_KEY.len()
        + epoch.len()
        + EVENTS_KEY.len()
        + EVENTS_TAIL.len()
        + json_bytes
        + events * (ENTRY_OVERHEAD + 20)
}

/// The `stream.gap` push: the subscriber missed offsets `from..=to`
/// (`toOffset` is inclusive: the last offset it will never see).
pub fn gap_frame(run: &str, epoch: &str, from: u64, to: u64) -> Bytes {
    let mut buf = Vec::with_capacity(GAP_HEAD.len() + run.len() + epoch.len() + 80);
    buf.extend_from_slice(GAP_HEAD);
    buf.extend_from_slice(run.as_bytes());
    buf.extend_from_slice(EPOCH_KEY);
    buf.extend_from_slice(epoch.as_bytes());
    buf.extend_from_slice(br#"","fromOffset":"#);
    push_decimal(&mut buf, from);
    buf.extend_from_slice(br#","toOffset":"#);
    push_decimal(&mut buf, to);
    buf.extend_from_slice(b"}}");
    Bytes::from(buf)
}

/// What a reader that only counts needs of a `stream.events` frame: its
/// run, the offsets of its first and last events, and where the first
/// event's JSON text starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsSummary<'a> {
    /// The run the events belong to.
    pub run: std::borrow::Cow<'a, str>,
    /// Offset of the first event in the frame.
    pub first: u64,
    /// Offset of the last event in the frame.
    pub last: u64,
    /// Text that begins with the first event's JSON as published and may
    /// run on past it (to the end of the frame): enough to peek at the
    /// event's first members without finding where it ends.
    pub first_event: &'a str,
}

/// Reads an [`EventsSummary`] out of one `stream.events` frame without
/// parsing its events, by the layout [`FrameBuilder`] writes: a load
/// generator reading millions of events a second must not parse each.
/// Any other layout (another gateway's, or a push of another type) goes
/// through serde instead; `None` means the text is not a `stream.events`
/// frame at all. The layout path finds the last entry by searching back for
/// `{"offset":`, so an event whose JSON text contains that string can make
/// it report a later `last`: exact for events the caller wrote itself, not
/// for a viewer that must trust what it reads (it parses the frame).
pub fn summarize_events(text: &str) -> Option<EventsSummary<'_>> {
    by_layout(text).or_else(|| by_serde(text))
}

fn by_layout(text: &str) -> Option<EventsSummary<'_>> {
    let head = std::str::from_utf8(EVENTS_HEAD).ok()?;
    let entry = std::str::from_utf8(ENTRY_HEAD).ok()?;
    let rest = text.strip_prefix(head)?;
    let run_end = rest.find('"')?;
    let run = &rest[..run_end];
    let first_entry = r#""events":[{"offset":"#;
    let at = rest.find(first_entry)? + first_entry.len();
    let (first, n) = leading_u64(&rest[at..])?;
    let event = rest[at + n..].strip_prefix(r#","event":"#)?;
    let last_at = rest.rfind(entry)? + entry.len();
    let (last, _) = leading_u64(&rest[last_at..])?;
    Some(EventsSummary {
        run: std::borrow::Cow::Borrowed(run),
        first,
        last,
        first_event: event,
    })
}

fn by_serde(text: &str) -> Option<EventsSummary<'_>> {
    use serde::Deserialize;
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        payload: Payload<'a>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Payload<'a> {
        #[serde(borrow)]
        run_id: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        events: Vec<Entry<'a>>,
    }
    #[derive(Deserialize)]
    struct Entry<'a> {
        offset: u64,
        #[serde(borrow)]
        event: &'a RawValue,
    }
    let frame: Frame<'_> = serde_json::from_str(text).ok()?;
    if frame.kind != "stream.events" {
        return None;
    }
    let (first, last) = (frame.payload.events.first()?, frame.payload.events.last()?);
    Some(EventsSummary {
        run: frame.payload.run_id,
        first: first.offset,
        last: last.offset,
        first_event: first.event.get(),
    })
}

/// The decimal digits at the start of `s`, and how many there were.
fn leading_u64(s: &str) -> Option<(u64, usize)> {
    let end = s.bytes().take_while(u8::is_ascii_digit).count();
    if end == 0 {
        return None;
    }
    s[..end].parse().ok().map(|n| (n, end))
}

/// Writes `n` in decimal without going through `fmt` (which would allocate
/// or need a `Write` adapter per event).
fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// The `stream.ended` push of a run, once per stream: its payload JSON
/// (what SSE sends as `data:`) and the whole frame around it. Built with
/// serde because the message is free text that needs escaping.
pub fn ended_frame(ended: &crate::push::StreamEnded) -> (Bytes, Bytes) {
    // Ids, numbers, an enum, a timestamp and a string: serializing cannot
    // fail.
    let json = serde_json::to_vec(ended).unwrap_or_default();
    let mut frame = Vec::with_capacity(json.len() + 40);
    frame.extend_from_slice(br#"{"type":"stream.ended","payload":"#);
    frame.extend_from_slice(&json);
    frame.push(b'}');
    (Bytes::from(json), Bytes::from(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn events_frame_is_valid_json_with_raw_events_in_place() {
        let events = [
            r#"{"type":"a","data":{"x":[1, 2]}}"#,
            r#"{"type":"b" , "seq":7}"#,
            "\"é\\n\"",
        ];
        let total: usize = events.iter().map(|e| e.len()).sum();
        let mut b = FrameBuilder::new("run-1", "00ff", u64::MAX - 3, events.len(), total);
        let ranges: Vec<_> = events.iter().map(|e| b.push(e.as_bytes())).collect();
        let frame = b.finish();
        for (e, r) in events.iter().zip(&ranges) {
            assert_eq!(&frame[r.clone()], e.as_bytes());
        }
        let v: Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["type"], "stream.events");
        assert_eq!(v["payload"]["runId"], "run-1");
        assert_eq!(v["payload"]["streamEpoch"], "00ff");
        let evs = v["payload"]["events"].as_array().unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0]["offset"].as_u64(), Some(u64::MAX - 3));
        assert_eq!(evs[2]["offset"].as_u64(), Some(u64::MAX - 1));
        assert_eq!(evs[1]["event"]["seq"], 7);
    }

    #[test]
    fn empty_events_frame_is_valid() {
        let frame = FrameBuilder::new("r", "e", 0, 0, 0).finish();
        let v: Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["payload"]["events"].as_array().map(Vec::len), Some(0));
    }

    #[test]
    fn gap_frame_shape() {
        let v: Value = serde_json::from_slice(&gap_frame("r:1", "ab", 0, 41)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"stream.gap","payload":{"runId":"r:1","streamEpoch":"ab","fromOffset":0,"toOffset":41}})
        );
        // The typed payload other transports serialize is the same.
        let (run, epoch) = (
            crate::ids::RunId::new("r:1").unwrap(),
            crate::ids::StreamEpoch::new("00000000000000ab").unwrap(),
        );
        let v: Value =
            serde_json::from_slice(&gap_frame(run.as_str(), epoch.as_str(), 0, 41)).unwrap();
        let typed = crate::push::StreamGap {
            run_id: run.clone(),
            stream_epoch: epoch.clone(),
            from_offset: 0,
            to_offset: 41,
        };
        assert_eq!(v["payload"], serde_json::to_value(&typed).unwrap());
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 99, 100, 123_456_789, u64::MAX] {
            let mut buf = Vec::new();
            push_decimal(&mut buf, n);
            assert_eq!(buf, n.to_string().as_bytes());
        }
    }

    #[test]
    fn a_summary_reads_the_builders_layout_and_any_other_through_serde() {
        let events = [r#"{"type":"a","data":{"t":5}}"#, r#"{"type":"b"}"#, "3"];
        let total: usize = events.iter().map(|e| e.len()).sum();
        let mut b = FrameBuilder::new("run-1", "00ff", 40, events.len(), total);
        for e in events {
            b.push(e.as_bytes());
        }
        let frame = b.finish();
        let text = std::str::from_utf8(&frame).unwrap();
        let got = summarize_events(text).expect("the builder's layout");
        assert_eq!((got.run.as_ref(), got.first, got.last), ("run-1", 40, 42));
        assert!(
            got.first_event.starts_with(events[0]),
            "{}",
            got.first_event
        );
        // Another gateway's layout: members in another order, spaces.
        let other = r#"{ "payload": {"events": [{"event": {"type":"a","data":{"t":5}}, "offset": 40},
            {"offset": 41, "event": 1}, {"offset": 42, "event": 2}], "streamEpoch": "00ff", "runId": "run-1"},
            "type": "stream.events" }"#;
        let got = summarize_events(other).expect("read through serde");
        assert_eq!((got.run.as_ref(), got.first, got.last), ("run-1", 40, 42));
        assert_eq!(got.first_event, r#"{"type":"a","data":{"t":5}}"#);
        let gap = gap_frame("run-1", "00ff", 1, 2);
        assert_eq!(summarize_events(std::str::from_utf8(&gap).unwrap()), None);
        assert_eq!(summarize_events("not json"), None);
    }
}
