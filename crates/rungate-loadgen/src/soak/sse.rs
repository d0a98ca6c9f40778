//! A Server-Sent Events follower for the soak: `GET
//! /v1/runs/{runId}/events` over plain HTTP/1.1, resumed with
//! `Last-Event-ID` after every break, as a browser's `EventSource` would.
//!
//! Owns the event-stream parsing and the reconnect loop; hands each block
//! to the caller as an [`SseItem`]. Must not judge what it reads (the
//! checker does).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// One event block of the stream, as far as the soak cares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SseItem {
    /// `event: stream`: the resume reply.
    Stream(Value),
    /// `event: output`, `id:` its offset.
    Output { offset: u64, event: Value },
    /// `event: gap` (inclusive range).
    Gap { from: u64, to: u64 },
    /// `event: closed`: the stream was dropped.
    Closed,
    /// `event: draining`, or the body ended: reconnect.
    End,
    /// A block that does not parse: named for the report.
    Malformed(String),
}

/// Splits a byte stream into SSE blocks (lines ended by `\n` or `\r\n`,
/// blocks by a blank line); comments are skipped.
#[derive(Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    ready: std::collections::VecDeque<SseItem>,
}

impl SseParser {
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            self.line(&line);
        }
    }

    pub(crate) fn pop(&mut self) -> Option<SseItem> {
        self.ready.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self) {
        let id = self.id.take();
        let event = self.event.take();
        let data = std::mem::take(&mut self.data).join("\n");
        if id.is_none() && event.is_none() && data.is_empty() {
            return;
        }
        let json = || serde_json::from_str::<Value>(&data).ok();
        let item = match event.as_deref() {
            Some("stream") => json().map(SseItem::Stream),
            Some("output") => id
                .as_deref()
                .and_then(|i| i.parse().ok())
                .zip(json())
                .map(|(offset, event)| SseItem::Output { offset, event }),
            Some("gap") => json().and_then(|g| {
                Some(SseItem::Gap {
                    from: g["fromOffset"].as_u64()?,
                    to: g["toOffset"].as_u64()?,
                })
            }),
            Some("closed") => Some(SseItem::Closed),
            Some("draining") => Some(SseItem::End),
            _ => None,
        };
        self.ready.push_back(item.unwrap_or_else(|| {
            SseItem::Malformed(format!("event {event:?} id {id:?} data {data:?}"))
        }));
    }
}

/// Where a response starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// `?from=N`.
    From(u64),
    /// `Last-Event-ID: N` (resume after offset N).
    After(u64),
}

/// Why one response ended.
#[derive(Debug)]
pub(crate) enum SseError {
    /// No connection, no response, or a status other than 200.
    Connect(String),
    /// The caller said stop.
    Stopped,
}

/// Reads one SSE response for `run` through `addr`, starting at `start`; hands every item to `on_item`
/// until the body ends, breaks, or stays silent for `idle` (keepalives
/// count). Returns `Ok` when the response ended (reconnect), `Err` when it
/// never started.
pub(crate) async fn read_once(
    addr: SocketAddr,
    run: &str,
    token: &str,
    start: Start,
    idle: Duration,
    mut on_item: impl FnMut(SseItem) -> bool,
) -> Result<(), SseError> {
    let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr));
    let tcp = connect
        .await
        .map_err(|_| SseError::Connect("connect timed out".into()))?
        .map_err(|e| SseError::Connect(e.to_string()))?;
    let handshake = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp));
    let (mut sender, conn) = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| SseError::Connect("handshake timed out".into()))?
        .map_err(|e| SseError::Connect(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = match start {
        Start::From(n) => format!("/v1/runs/{run}/events?from={n}"),
        Start::After(_) => format!("/v1/runs/{run}/events"),
    };
    let mut req = Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "text/event-stream");
    if let Start::After(last) = start {
        req = req.header("last-event-id", last.to_string());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| SseError::Connect(e.to_string()))?;
    let result = async {
        let resp = tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
            .await
            .map_err(|_| SseError::Connect("no response in time".into()))?
            .map_err(|e| SseError::Connect(e.to_string()))?;
        if resp.status() != 200 {
            return Err(SseError::Connect(format!("status {}", resp.status())));
        }
        let mut body = resp.into_body();
        let mut parser = SseParser::default();
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                parser.feed(&data);
            }
            while let Some(item) = parser.pop() {
                let end = matches!(item, SseItem::End | SseItem::Closed);
                if !on_item(item) {
                    return Err(SseError::Stopped);
                }
                if end {
                    return Ok(());
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocks_split_anywhere() {
        let text = b": keepalive\n\nevent: stream\ndata: {\"streamEpoch\":\"e\"}\n\n\
id: 7\r\nevent: output\r\ndata: {\"type\":\"t\",\r\ndata: \"data\":1}\r\n\r\n\
event: gap\ndata: {\"fromOffset\":8,\"toOffset\":9}\n\nevent: draining\ndata: {}\n\n";
        let mut p = SseParser::default();
        for chunk in text.chunks(5) {
            p.feed(chunk);
        }
        let items: Vec<SseItem> = std::iter::from_fn(|| p.pop()).collect();
        assert_eq!(
            items,
            vec![
                SseItem::Stream(serde_json::json!({"streamEpoch": "e"})),
                SseItem::Output {
                    offset: 7,
                    event: serde_json::json!({"type": "t", "data": 1})
                },
                SseItem::Gap { from: 8, to: 9 },
                SseItem::End,
            ]
        );
    }
}
