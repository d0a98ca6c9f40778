//! `GET /v1/runs/{runId}/events`: one run's output stream as Server-Sent
//! Events, for browsers and `curl`.
//!
//! Owns where an SSE reader starts and the event-stream wire format. The
//! reading itself is the same [`Subscription`] a WebSocket follower
//! uses, so replay and live tail hand over exactly as they do there.
//!
//! What a reader receives, in order:
//! - `event: stream` once, `data:` the `stream.resume` reply (epoch, kept
//!   range, where this response starts, `truncated`);
//! - `event: output` per event, `id:` its offset, `data:` its JSON as
//!   published (split over several `data:` lines if the runtime sent
//!   pretty-printed JSON; SSE joins them back with newlines);
//! - `event: gap` with `{"fromOffset","toOffset"}` (inclusive) if this reader
//!   fell behind the ring;
//! - a `: keepalive` comment whenever the stream has been idle for the
//!   keepalive interval;
//! - `event: closed` (the stream was dropped) or `event: draining` (the
//!   gateway is shutting down), after which the response ends. A browser's
//!   `EventSource` then reconnects with `Last-Event-ID` by itself.
//! - `event: end`, `id: end`, `data:` the `stream.ended` payload, once the
//!   run ended and every event before its end was sent; then the response
//!   ends. The id is the literal `end`, so a browser that reconnects says
//!   `Last-Event-ID: end` and is answered 204 No Content, which makes
//!   `EventSource` stop (see [`Start::past_end`]).
//!
//! The response also ends when the viewer's token expires (`http` says
//! when). Must not check tokens (`http` does) or know about sessions.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::admission::Permit;
use super::http::Body;
use super::push;
use super::state::Shared;
use crate::ids::RunId;
use crate::stream::{EventDelivery, ResumeInfo, StreamError, StreamEvent, Subscription};

/// A start position that is not an offset: where it was and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadStart {
    pub path: &'static str,
    pub message: &'static str,
}

/// Where a reader asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// `Last-Event-ID: N`: continue after offset `N`.
    After(u64),
    /// `?from=N`: start at offset `N`.
    At(u64),
    /// Neither: everything still kept, then live.
    Oldest,
    /// `Last-Event-ID: end`: the reader saw the run's end. On a run that
    /// has not ended (a new history after a restart lost it) it means
    /// "from the beginning".
    AfterEnd,
}

impl Start {
    /// `Last-Event-ID` wins over `?from=`: a browser reconnecting sends the
    /// former but keeps the original URL, whose `from` is now stale.
    pub fn from_request(
        last_event_id: Option<&str>,
        from: Option<&str>,
    ) -> Result<Start, BadStart> {
        if let Some(id) = last_event_id {
            if id.trim() == "end" {
                return Ok(Start::AfterEnd);
            }
            return id
                .trim()
                .parse::<u64>()
                .map(Start::After)
                .map_err(|_| BadStart {
                    path: "/headers/last-event-id",
                    message: "Last-Event-ID must be an offset (a non-negative integer)",
                });
        }
        match from {
            Some(n) => n.parse::<u64>().map(Start::At).map_err(|_| BadStart {
                path: "/query/from",
                message: "from must be an offset (a non-negative integer)",
            }),
            None => Ok(Start::Oldest),
        }
    }

    /// The `fromOffset` of the equivalent `stream.resume`.
    pub(crate) fn first_wanted(self) -> u64 {
        match self {
            Start::After(n) => n.saturating_add(1),
            Start::At(n) => n,
            Start::Oldest | Start::AfterEnd => 0,
        }
    }

    /// Whether a reader starting here has already seen all of a run that
    /// ended at `next_offset`: it gets 204 No Content.
    pub fn past_end(self, next_offset: u64) -> bool {
        match self {
            Start::AfterEnd => true,
            Start::After(n) => n.saturating_add(1) >= next_offset,
            Start::At(n) => n >= next_offset,
            Start::Oldest => false,
        }
    }
}

/// The streaming response for `run`, starting at `start`; it holds
/// `permit` (its place among the open connections) until it ends.
pub(crate) fn respond(
    shared: Arc<Shared>,
    run: RunId,
    start: Start,
    permit: Permit,
    token_expires: Instant,
) -> Result<Response<Body>, StreamError> {
    let (mut info, subscription) =
        shared
            .streams
            .resume(&run, Some(start.first_wanted()), None, Instant::now());
    if matches!(start, Start::Oldest | Start::AfterEnd) {
        // The reader asked for whatever is kept, so nothing it wanted is gone.
        info.truncated = false;
    }
    let mut keepalive = tokio::time::interval_at(
        Instant::now() + shared.config.limits.sse_keepalive,
        shared.config.limits.sse_keepalive,
    );
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    shared.metrics.subscriptions("sse", 1);
    let reader = Reader {
        opening: Some(opening(&info)),
        draining: shared.draining.clone(),
        reconnect_after: shared.config.reconnect_after,
        info,
        subscription,
        keepalive,
        finished: false,
        token_expires,
        shared,
        _permit: permit,
    };
    let body = futures_util::stream::unfold(reader, |mut reader| async move {
        let chunk = reader.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), reader))
    });
    let mut response = Response::new(StreamBody::new(body).boxed_unsync());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Tell nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One SSE response's state between chunks.
struct Reader {
    shared: Arc<Shared>,
    info: ResumeInfo,
    subscription: Subscription,
    /// The `event: stream` chunk, sent first.
    opening: Option<Bytes>,
    keepalive: Interval,
    draining: CancellationToken,
    reconnect_after: Duration,
    /// A final event was sent; the next poll ends the response.
    finished: bool,
    /// The response ends when the viewer's token expires.
    token_expires: Instant,
    /// This response's place among the open connections, freed with it.
    _permit: Permit,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.metrics.subscriptions("sse", -1);
    }
}

impl Reader {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(opening) = self.opening.take() {
            return Some(opening);
        }
        if self.finished {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.draining.cancelled() => {
                self.finished = true;
                let data = push::json(&push::draining(self.reconnect_after));
                Some(named_event("draining", &data))
            }
            delivery = self.subscription.next_events() => {
                self.keepalive.reset();
                Some(match delivery {
                    EventDelivery::Events(events) => output_events(&events),
                    EventDelivery::Gap { from, to } => {
                        self.shared.metrics.gap_sent();
                        let gap = push::gap(&self.info.run_id, &self.info.stream_epoch, from, to);
                        named_event("gap", &push::json(&gap))
                    }
                    EventDelivery::Ended(end) => {
                        self.finished = true;
                        end_event(&end.payload)
                    }
                    EventDelivery::Closed => {
                        self.finished = true;
                        let closed = push::closed(&self.info.run_id, &self.info.stream_epoch);
                        named_event("closed", &push::json(&closed))
                    }
                })
            }
            _ = self.keepalive.tick() => Some(Bytes::from_static(b": keepalive\n\n")),
            _ = tokio::time::sleep_until(self.token_expires) => {
                self.shared.metrics.refused("token_expired");
                None
            }
        }
    }
}

/// The first chunk: how long a browser waits before reconnecting, and the
/// resume information.
fn opening(info: &ResumeInfo) -> Bytes {
    let data = serde_json::to_string(info).unwrap_or_default();
    let mut buf = BytesMut::with_capacity(data.len() + 40);
    buf.put_slice(b"retry: 1000\n");
    buf.put_slice(&named_event("stream", &data));
    buf.freeze()
}

fn named_event(name: &str, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(name.len() + data.len() + 16);
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\n");
    put_data(&mut buf, data.as_bytes());
    buf.put_slice(b"\n");
    buf.freeze()
}

/// `event: end` with `id: end`, so a reconnecting browser says so.
fn end_event(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 32);
    buf.put_slice(b"id: end\nevent: end\n");
    put_data(&mut buf, payload);
    buf.put_slice(b"\n");
    buf.freeze()
}

/// `id:`, `event: output` and `data:` lines for each event, in one chunk.
fn output_events(events: &[StreamEvent]) -> Bytes {
    let size: usize = events.iter().map(|e| e.json.len() + 48).sum();
    let mut buf = BytesMut::with_capacity(size);
    for event in events {
        buf.put_slice(b"id: ");
        buf.put_slice(event.offset.to_string().as_bytes());
        buf.put_slice(b"\nevent: output\n");
        put_data(&mut buf, &event.json);
        buf.put_slice(b"\n");
    }
    buf.freeze()
}

/// `data:` lines for a JSON text. SSE ends a line at CR or LF, so the text
/// is split there. Outside strings JSON allows CR and LF only as
/// insignificant whitespace (inside strings they are escaped), so dropping
/// them and letting the reader join lines with LF keeps the same JSON.
fn put_data(buf: &mut BytesMut, json: &[u8]) {
    for line in json
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter(|l| !l.is_empty())
    {
        buf.put_slice(b"data: ");
        buf.put_slice(line);
        buf.put_slice(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_wins_and_bad_numbers_are_refused() {
        assert_eq!(
            Start::from_request(Some("7"), Some("2")),
            Ok(Start::After(7))
        );
        assert_eq!(Start::from_request(None, Some("2")), Ok(Start::At(2)));
        assert_eq!(Start::from_request(None, None), Ok(Start::Oldest));
        assert!(Start::from_request(Some("x"), None).is_err());
        assert!(Start::from_request(None, Some("-1")).is_err());
        assert_eq!(Start::After(u64::MAX).first_wanted(), u64::MAX);
        assert_eq!(Start::After(4).first_wanted(), 5);
        assert_eq!(
            Start::from_request(Some("end"), Some("2")),
            Ok(Start::AfterEnd)
        );
        assert_eq!(Start::AfterEnd.first_wanted(), 0);
    }

    #[test]
    fn who_has_seen_the_whole_of_an_ended_run() {
        // A run that ended with offsets 0..=4 (nextOffset 5).
        assert!(Start::AfterEnd.past_end(5));
        assert!(Start::After(4).past_end(5));
        assert!(!Start::After(3).past_end(5));
        assert!(Start::At(5).past_end(5));
        assert!(!Start::At(4).past_end(5));
        assert!(!Start::Oldest.past_end(5));
        // No events at all: any offset is past it, "everything" is not.
        assert!(Start::After(0).past_end(0));
        assert!(!Start::Oldest.past_end(0));
    }

    #[test]
    fn pretty_printed_json_becomes_several_data_lines() {
        let events = [StreamEvent {
            offset: 3,
            json: Bytes::from_static(b"{\r\n  \"type\": \"t\",\n  \"data\": 1\n}"),
        }];
        let text = output_events(&events);
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "id: 3\nevent: output\ndata: {\ndata:   \"type\": \"t\",\ndata:   \"data\": 1\ndata: }\n\n"
        );
        let joined: String = std::str::from_utf8(&text)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<Vec<_>>()
            .join("\n");
        let v: serde_json::Value = serde_json::from_str(&joined).unwrap();
        assert_eq!(v["data"], 1);
    }
}
