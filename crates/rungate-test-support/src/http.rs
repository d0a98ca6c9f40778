//! A small HTTP/1.1 client for integration tests: one `GET` per TCP
//! connection, the whole body as text, or the body read incrementally as a
//! Server-Sent Events stream.
//!
//! Built on hyper's low-level client (`hyper::client::conn::http1`), so what
//! a test sees is what went over the socket: the status, the headers and the
//! body bytes, with no redirects, retries or decompression in between. Every
//! wait is bounded by [`WAIT`], so a test that expects something the gateway
//! never sends fails instead of hanging.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue};
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};

use crate::WAIT;

/// `GET path_and_query` on a fresh connection to `addr`, with `headers`
/// added (name, value). Panics if the gateway does not answer with a status
/// line and headers within [`WAIT`].
pub async fn get(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> Response {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    get_over(tcp, addr, path_and_query, headers).await
}

/// [`get`] with `Authorization: Bearer <token>`.
pub async fn get_with_token(addr: SocketAddr, path_and_query: &str, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    get(addr, path_and_query, &[("authorization", &auth)]).await
}

/// A TCP connection to `addr` whose receive buffer is fixed at about
/// `bytes` (the kernel may double it), instead of growing with the
/// kernel's autotuning. With it a reader that stops reading makes the
/// sender's socket fill, and so makes the gateway see a slow reader,
/// after a bounded amount of data.
pub async fn connect_with_small_window(addr: SocketAddr, bytes: u32) -> TcpStream {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    // Must be set before connecting: the window scale is agreed in the
    // handshake.
    socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect")
}

/// [`get`] over a connection the caller made (see
/// [`connect_with_small_window`]); `addr` is only used for the `Host` header.
pub async fn get_over(
    tcp: TcpStream,
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Response {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 client handshake");
    // The connection is driven by its own task; it ends when the response
    // body has been read to the end or dropped, or the server closes.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::get(path_and_query);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    request.headers_mut().insert(
        HOST,
        HeaderValue::from_str(&addr.to_string()).expect("host header"),
    );
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("response headers in time")
        .expect("an HTTP response");
    let (parts, body) = response.into_parts();
    Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A response whose status line and headers have arrived; the body is
/// read by [`Response::text`], [`Response::json`] or [`Response::sse`].
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    body: Incoming,
}

impl Response {
    /// A header's value as text (`None` if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The whole body as UTF-8 text; panics if it does not end within
    /// [`WAIT`] or is not UTF-8.
    pub async fn text(self) -> String {
        let bytes = tokio::time::timeout(WAIT, self.body.collect())
            .await
            .expect("the whole body in time")
            .expect("read the body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("a UTF-8 body")
    }

    /// The whole body parsed as JSON; panics if it is not JSON.
    pub async fn json(self) -> Value {
        let text = self.text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("a JSON body ({e}): {text:?}"))
    }

    /// The body as an event stream, read incrementally.
    pub fn sse(self) -> SseReader {
        SseReader {
            body: self.body,
            parser: SseParser::default(),
            ended: false,
        }
    }
}

/// One thing read from an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// A block of fields ended by a blank line.
    Event(SseEvent),
    /// A comment line (`: text`), without the colon and one following
    /// space. Surfaced, unlike in a browser, so tests can see keepalives.
    Comment(String),
}

impl SseItem {
    /// The event, or a panic naming what came instead.
    pub fn event(self) -> SseEvent {
        match self {
            SseItem::Event(e) => e,
            SseItem::Comment(c) => panic!("expected an SSE event, got the comment {c:?}"),
        }
    }
}

/// The fields of one event block, as sent. Unlike a browser's
/// `EventSource`, nothing carries over from earlier blocks: `id` is the
/// `id:` of this block only, and `retry:` is reported with the block it
/// came in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `id:`, if the block has one.
    pub id: Option<String>,
    /// `event:`, if the block has one (a browser would say `"message"`).
    pub event: Option<String>,
    /// Every `data:` line's value, joined with `"\n"`.
    pub data: String,
    /// How many `data:` lines there were.
    pub data_lines: usize,
    /// `retry:`, if the block has one with a valid number.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// `event:`, or `""` if the block has none.
    pub fn name(&self) -> &str {
        self.event.as_deref().unwrap_or("")
    }

    /// `id:` as an offset; panics if absent or not a number.
    pub fn offset(&self) -> u64 {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("no id: {self:?}"));
        id.parse()
            .unwrap_or_else(|_| panic!("id {id:?} is not an offset"))
    }

    /// `data` parsed as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

/// The event block being read.
#[derive(Default)]
struct Block {
    event: SseEvent,
    /// Whether any field line was seen since the last blank line.
    any: bool,
}

/// An event stream read from a response body, item by item.
pub struct SseReader {
    body: Incoming,
    parser: SseParser,
    ended: bool,
}

impl SseReader {
    /// The next item; `None` once the body has ended (an unfinished block
    /// at the end is dropped, as a browser does). Panics if nothing arrives
    /// within [`WAIT`] or the body fails (the connection broke mid-stream).
    pub async fn next(&mut self) -> Option<SseItem> {
        match self.next_within(WAIT).await {
            Ok(item) => item,
            Err(Elapsed) => panic!("no SSE item within {WAIT:?}"),
        }
    }

    /// The next event, skipping comments; `None` once the body has ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.next().await? {
                SseItem::Event(e) => return Some(e),
                SseItem::Comment(_) => continue,
            }
        }
    }

    /// Like [`SseReader::next`], but gives up after `limit` (for tests that
    /// expect nothing, or want their own deadline).
    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<SseItem>, Elapsed> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(item) = self.parser.pop() {
                return Ok(Some(item));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Err(Elapsed),
                Ok(None) => {
                    self.ended = true;
                    self.parser.finish();
                }
                Ok(Some(frame)) => {
                    let frame = frame.unwrap_or_else(|e| panic!("the SSE body failed: {e}"));
                    // Trailers carry no events.
                    if let Ok(data) = frame.into_data() {
                        self.parser.feed(&data);
                    }
                }
            }
        }
    }

    /// Every item until the body ends.
    pub async fn until_end(&mut self) -> Vec<SseItem> {
        let mut items = Vec::new();
        while let Some(item) = self.next().await {
            items.push(item);
        }
        items
    }
}

/// Parses an event stream fed in arbitrary pieces, per the WHATWG "event
/// stream interpretation": lines end at CRLF, LF or CR; a blank line ends a
/// block; `name: value` sets a field (one space after the colon is dropped;
/// a line without a colon is a field with an empty value); unknown fields
/// are ignored. A block with no fields is not reported; comment lines are,
/// as they come.
#[derive(Default)]
pub struct SseParser {
    /// Bytes received and not yet split into lines.
    buf: Vec<u8>,
    /// How many bytes at the start of `buf` are known to hold no line end,
    /// so a long line arriving in many pieces is scanned once.
    scanned: usize,
    block: Block,
    /// Items parsed and not yet taken.
    ready: VecDeque<SseItem>,
}

impl SseParser {
    /// Takes the next piece of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.parse(false);
    }

    /// The stream ended: a final lone CR ends its line; an unfinished block
    /// is dropped.
    pub fn finish(&mut self) {
        self.parse(true);
        self.buf.clear();
        self.scanned = 0;
        self.block = Block::default();
    }

    /// The oldest item parsed and not yet taken.
    pub fn pop(&mut self) -> Option<SseItem> {
        self.ready.pop_front()
    }

    /// Every item in `text`, as if it were the whole stream.
    pub fn parse_all(text: &[u8]) -> Vec<SseItem> {
        let mut parser = SseParser::default();
        parser.feed(text);
        parser.finish();
        parser.ready.into_iter().collect()
    }

    /// Splits complete lines off `buf` and interprets them. A CR as the
    /// last byte may be the first half of a CRLF, so it waits for the next
    /// chunk unless the body has ended.
    fn parse(&mut self, at_end: bool) {
        // `start`: where the current line begins; `from`: where to look for
        // its end (bytes before it are known to hold none).
        let mut start = 0;
        let mut from = self.scanned;
        loop {
            let Some(pos) = self.buf[from..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
            else {
                from = self.buf.len();
                break;
            };
            let end = from + pos;
            let next = match self.buf[end] {
                b'\r' if end + 1 == self.buf.len() && !at_end => {
                    from = end;
                    break;
                }
                b'\r' if self.buf.get(end + 1) == Some(&b'\n') => end + 2,
                _ => end + 1,
            };
            let line =
                String::from_utf8(self.buf[start..end].to_vec()).expect("an event stream is UTF-8");
            self.line(&line);
            start = next;
            from = next;
        }
        self.buf.drain(..start);
        self.scanned = from - start;
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            let block = std::mem::take(&mut self.block);
            if block.any {
                self.ready.push_back(SseItem::Event(block.event));
            }
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            self.ready.push_back(SseItem::Comment(comment.to_owned()));
            return;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        let event = &mut self.block.event;
        match name {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => {
                if event.data_lines > 0 {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                event.data_lines += 1;
            }
            "retry" => event.retry = value.parse().ok(),
            _ => return,
        }
        self.block.any = true;
    }
}

/// [`SseReader::next_within`] gave up waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;
