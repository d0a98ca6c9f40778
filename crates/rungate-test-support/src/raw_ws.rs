//! A WebSocket client written on a bare TCP socket, for inputs no library
//! client will send: text frames holding invalid UTF-8, unmasked frames,
//! reserved bits and opcodes, stray continuation frames, control frames too
//! big or fragmented. It does the handshake by hand and reads frames
//! itself, so a test sees exactly what the gateway put on the wire
//! (including the close code).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

pub const OP_CONTINUE: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One frame as the gateway sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// What a socket ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code (`None`: a close frame without one).
    Close(Option<u16>),
    /// The TCP connection ended without a close frame.
    Eof,
}

pub struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl RawWs {
    /// Upgrades `path` on `addr` with `token`; panics unless the answer is 101.
    pub async fn connect(addr: std::net::SocketAddr, path: &str, token: &str) -> RawWs {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        Self::connect_over(tcp, addr, path, token).await
    }

    /// [`RawWs::connect`] over a TCP connection the caller made (see
    /// `http::connect_with_small_window`).
    pub async fn connect_over(
        mut tcp: TcpStream,
        addr: std::net::SocketAddr,
        path: &str,
        token: &str,
    ) -> RawWs {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .expect("send handshake");
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
            next_id: 0,
        };
        let head = loop {
            if let Some(end) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&ws.buf[..end]).into_owned();
                ws.buf.drain(..end + 4);
                break head;
            }
            assert!(ws.fill().await, "connection closed during the handshake");
        };
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused: {head}"
        );
        ws
    }

    /// Reads more bytes into the buffer; false at EOF (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("bytes from the gateway in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Writes one frame exactly as described. Clients must mask (`masked`
    /// false breaks RFC 6455 on purpose); the key is fixed, which is fine
    /// for tests.
    pub async fn send_frame(
        &mut self,
        fin: bool,
        rsv: u8,
        opcode: u8,
        payload: &[u8],
        masked: bool,
    ) {
        let _ = self
            .tcp
            .write_all(&encode_frame(fin, rsv, opcode, payload, masked))
            .await;
    }

    /// Writes bytes as they are (several frames at once, or half of one).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.tcp.write_all(bytes).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 0, OP_TEXT, text.as_bytes(), true)
            .await;
    }

    /// Sends a request; returns its id.
    pub async fn send(&mut self, kind: &str, payload: Value) -> String {
        self.next_id += 1;
        let id = format!("raw{}", self.next_id);
        let frame = json!({ "id": id, "type": kind, "payload": payload });
        self.send_text(&frame.to_string()).await;
        id
    }

    /// The next frame, or `None` at EOF.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next text frame as JSON, skipping pongs; `None` if the socket
    /// closed first.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            let frame = self.read_frame().await?;
            match frame.opcode {
                OP_TEXT => {
                    return Some(
                        serde_json::from_slice(&frame.payload).expect("gateway sends JSON"),
                    );
                }
                OP_CLOSE => return None,
                _ => continue,
            }
        }
    }

    /// The frame answering request `id`; panics if the socket closes first.
    pub async fn answer(&mut self, id: &str) -> Value {
        loop {
            let v = self
                .next_json()
                .await
                .unwrap_or_else(|| panic!("socket closed while waiting for {id}"));
            if v["id"] == id {
                return v;
            }
        }
    }

    pub async fn call(&mut self, kind: &str, payload: Value) -> Value {
        let id = self.send(kind, payload).await;
        self.answer(&id).await
    }

    /// Reads until the socket ends; returns the text frames seen and how it
    /// ended.
    pub async fn until_end(&mut self) -> (Vec<Value>, Ending) {
        let mut texts = Vec::new();
        loop {
            match self.read_frame().await {
                None => return (texts, Ending::Eof),
                Some(f) if f.opcode == OP_CLOSE => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    return (texts, Ending::Close(code));
                }
                Some(f) if f.opcode == OP_TEXT => {
                    texts.push(serde_json::from_slice(&f.payload).expect("gateway sends JSON"));
                }
                Some(_) => {}
            }
        }
    }

    /// Reads frames for `quiet` and returns them (for "nothing happened").
    pub async fn frames_for(&mut self, quiet: Duration) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, self.read_frame()).await {
            frames.push(f);
        }
        frames
    }
}

pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xF));
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// One complete server frame at the start of `buf`, and its length.
fn decode_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if masked {
        let k: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(k) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        at + len,
    ))
}
