//! A runtime written against the wire protocol alone (PROTOCOL.md), with
//! nothing from the rungate crate: plain `tokio-tungstenite` for the socket
//! and `serde_json` for the frames. Use it as a template for a runtime in any
//! language: everything it does is visible on the wire.
//!
//! What it does, printing each step:
//!
//! 1. opens `/v1/runtime` with `Authorization: Bearer TOKEN` and attaches to
//!    RUN at connection epoch 1, asking for the KV and checkpoint capabilities;
//! 2. reads the run's config (`config.get`);
//! 3. writes a KV key and reads it back (`kv.set`, `kv.get`);
//! 4. saves a checkpoint and loads the latest one back (`checkpoint.save`,
//!    `checkpoint.load`);
//! 5. heartbeats a few times at the interval the attach reply gave;
//! 6. reconnects on a second socket with `reconnect: true` and
//!    `connectionEpoch: 2`, as a runtime does after a network blip: the
//!    session (and its id) moves to the new socket, the old socket receives a
//!    `session.superseded` push and is fenced off (`STALE_EPOCH`).
//!
//! Run it against a gateway (the token needs the four capabilities below):
//!
//! ```text
//! rungate serve --data-dir /tmp/rg &
//! TOKEN=$(rungate token --auth-key-file /tmp/rg/auth.key --kind runtime --runs 'demo-*' \
//!         --caps kv.read,kv.write,checkpoint.save,checkpoint.load)
//! cargo run --example raw_runtime -- --url ws://127.0.0.1:7700/v1/runtime \
//!         --token "$TOKEN" --run demo-1
//! ```
//!
//! Options: `--url URL`, `--token TOKEN`, `--run RUN` (all required) and
//! `--heartbeats N` (default 3).

use std::collections::VecDeque;
use std::error::Error;
use std::fmt;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Longest wait for any one frame from the gateway.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The capabilities this runtime asks for at attach. A command whose
/// capability was not asked for is refused with `FORBIDDEN`.
const CAPABILITIES: [&str; 4] = ["kv.read", "kv.write", "checkpoint.save", "checkpoint.load"];

const USAGE: &str =
    "usage: raw_runtime --url ws://ADDR/v1/runtime --token TOKEN --run RUN [--heartbeats N]";

// ------------------------------------------------------------ arguments

struct Args {
    url: String,
    token: String,
    run: String,
    heartbeats: u32,
}

/// `--name value` pairs, by hand (no argument-parsing dependency).
fn parse_args() -> Result<Args> {
    let (mut url, mut token, mut run, mut heartbeats) = (None, None, None, 3);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--token" => token = Some(value),
            "--run" => run = Some(value),
            "--heartbeats" => {
                heartbeats = value
                    .parse()
                    .map_err(|e| format!("--heartbeats {value:?}: {e}"))?
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}").into()),
        }
    }
    let missing = |name: &str| format!("{name} is required\n{USAGE}");
    Ok(Args {
        url: url.ok_or_else(|| missing("--url"))?,
        token: token.ok_or_else(|| missing("--token"))?,
        run: run.ok_or_else(|| missing("--run"))?,
        heartbeats,
    })
}

// ------------------------------------------------------- the connection

/// An error frame from the gateway:
/// `{"id", "type": "error", "error": {"code", "message", "retryable"}}`.
#[derive(Debug)]
struct ProtocolError {
    code: String,
    message: String,
    retryable: bool,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if self.retryable {
            f.write_str(" (retryable)")?;
        }
        Ok(())
    }
}

impl Error for ProtocolError {}

impl ProtocolError {
    /// Reads the `error` member of an error frame, tolerating a malformed one.
    fn from_frame(frame: &Value) -> ProtocolError {
        let body = &frame["error"];
        ProtocolError {
            code: body["code"].as_str().unwrap_or("?").to_owned(),
            message: body["message"].as_str().unwrap_or_default().to_owned(),
            retryable: body["retryable"].as_bool().unwrap_or(false),
        }
    }
}

/// One WebSocket to `/v1/runtime`. Every message is a text frame holding one
/// JSON object: requests go out as `{"id", "type", "payload"}`; what comes
/// back is a reply or an error under the request's id, or a push (no id).
struct Conn {
    name: &'static str,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Pushes that arrived while waiting for a reply, oldest first.
    pushes: VecDeque<Value>,
}

impl Conn {
    /// Opens the socket. The token goes in the `Authorization` header; a bad
    /// one is refused with HTTP 401 (403 for a viewer token) before the
    /// upgrade.
    async fn connect(name: &'static str, url: &str, token: &str) -> Result<Conn> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let (ws, _response) =
            tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .map_err(|_| format!("{name}: no handshake answer from {url}"))??;
        Ok(Conn {
            name,
            ws,
            next_id: 0,
            pushes: VecDeque::new(),
        })
    }

    /// The next JSON frame from the gateway.
    async fn read_frame(&mut self) -> Result<Value> {
        loop {
            let message = tokio::time::timeout(READ_TIMEOUT, self.ws.next())
                .await
                .map_err(|_| format!("{}: nothing from the gateway in time", self.name))?
                .ok_or_else(|| format!("{}: the gateway closed the socket", self.name))??;
            match message {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Close(frame) => {
                    return Err(
                        format!("{}: the gateway closed the socket: {frame:?}", self.name).into(),
                    );
                }
                // Pings are answered by tungstenite; nothing else is expected.
                _ => continue,
            }
        }
    }

    /// Sends one request and returns the whole answer frame (a reply or an
    /// error). Pushes that arrive meanwhile are kept for [`Conn::push`].
    async fn call(&mut self, kind: &str, payload: Value) -> Result<Value> {
        // Any string of 1 to 128 characters is a valid id; it only has to
        // be unique among this socket's requests in flight.
        self.next_id += 1;
        let id = format!("{}-{}", self.name.replace(' ', "-"), self.next_id);
        let frame = json!({ "id": id, "type": kind, "payload": payload });
        self.ws.send(Message::text(frame.to_string())).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.get("id") {
                // No id: a push.
                None => self.pushes.push_back(frame),
                Some(got) if got == &json!(id) => return Ok(frame),
                // `"id": null` is an error about a frame the gateway could
                // not read at all; with one request in flight, it is ours.
                Some(Value::Null) => return Ok(frame),
                Some(other) => eprintln!("{}: ignoring an answer to {other}", self.name),
            }
        }
    }

    /// Sends one request; its reply payload, or the error frame as an error.
    async fn request(&mut self, kind: &str, payload: Value) -> Result<Value> {
        let frame = self.call(kind, payload).await?;
        match frame["type"].as_str() {
            Some("reply") => Ok(frame["payload"].clone()),
            Some("error") => Err(Box::new(ProtocolError::from_frame(&frame))),
            _ => Err(format!("{kind}: unexpected answer {frame}").into()),
        }
    }

    /// Waits for the next push of type `kind`; pushes of other types are
    /// ignored, as the protocol asks of clients.
    async fn push(&mut self, kind: &str) -> Result<Value> {
        loop {
            let frame = match self.pushes.pop_front() {
                Some(frame) => frame,
                None => self.read_frame().await?,
            };
            if frame.get("id").is_none() && frame["type"] == kind {
                return Ok(frame["payload"].clone());
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A string member of a payload, or an error naming it.
fn str_at<'a>(payload: &'a Value, key: &str) -> Result<&'a str> {
    payload[key]
        .as_str()
        .ok_or_else(|| format!("expected a string {key:?} in {payload}").into())
}

/// An unsigned integer member of a payload, or an error naming it.
fn u64_at(payload: &Value, key: &str) -> Result<u64> {
    payload[key]
        .as_u64()
        .ok_or_else(|| format!("expected an integer {key:?} in {payload}").into())
}

// ------------------------------------------------------------ the runtime

/// An error as `main` returns it: Rust prints `Error: {:?}` on the way out,
/// so this Debug shows the readable Display text instead.
struct Failure(Box<dyn Error>);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for Failure {}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn Error>> {
    let args = parse_args().map_err(|e| Box::new(Failure(e)))?;
    run(args).await.map_err(|e| Box::new(Failure(e)).into())
}

async fn run(args: Args) -> Result<()> {
    let run = args.run.as_str();
    // Names this process; a reconnect must present the same one.
    let instance = format!("raw-runtime-{}", std::process::id());

    // 1. Attach. The first attach on a socket starts the run's session;
    //    `connectionEpoch` numbers our connections (a fresh attach may pick
    //    any start; reconnects must go higher).
    println!("connecting to {}", args.url);
    let mut first = Conn::connect("socket 1", &args.url, &args.token).await?;
    let attached = first
        .request(
            "runtime.attach",
            json!({
                "runId": run,
                "runtimeInstanceId": instance,
                "protocolVersion": "1",
                "connectionEpoch": 1,
                "capabilities": CAPABILITIES,
            }),
        )
        .await?;
    let session_id = str_at(&attached, "sessionId")?.to_owned();
    let interval_ms = u64_at(&attached, "heartbeatIntervalMs")?;
    println!(
        "attached: run {run}, session {session_id}, epoch 1, heartbeat every {interval_ms} ms, lease until {}",
        str_at(&attached, "leaseExpiresAt")?
    );
    // Every later command names the session and its run.
    let session = json!({ "sessionId": session_id, "runId": run });
    let with = |extra: Value| {
        let mut payload = session.clone();
        if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), extra) {
            p.extend(extra);
        }
        payload
    };

    // 2. The run's config, as the gateway's --config file resolves it.
    let config = first.request("config.get", with(json!({}))).await?;
    println!("config: {}", config["config"]);

    // 3. KV: string keys to string values, per run.
    let greeting = "hello from raw_runtime";
    first
        .request("kv.set", with(json!({ "kv": { "greeting": greeting } })))
        .await?;
    println!("kv.set greeting: accepted");
    let got = first
        .request("kv.get", with(json!({ "keys": ["greeting"] })))
        .await?;
    // Keys that do not exist are simply absent from the answer.
    let value = got["kv"]["greeting"].as_str();
    if value != Some(greeting) {
        return Err(format!("kv.get returned {got}, expected greeting = {greeting:?}").into());
    }
    println!("kv.get greeting = {greeting:?}");

    // 4. Checkpoints: any JSON, stored durably; without a checkpointId the
    //    gateway picks one, and load without one returns the latest.
    let state = json!({ "step": 3, "done": ["fetch", "parse"], "cursor": null });
    let saved = first
        .request("checkpoint.save", with(json!({ "data": state })))
        .await?;
    let checkpoint_id = str_at(&saved, "checkpointId")?.to_owned();
    println!(
        "checkpoint saved: {checkpoint_id} at {}",
        str_at(&saved, "savedAt")?
    );
    let loaded = first.request("checkpoint.load", with(json!({}))).await?;
    if str_at(&loaded, "checkpointId")? != checkpoint_id || loaded["data"] != state {
        return Err(format!("checkpoint.load returned {loaded}, expected {state}").into());
    }
    println!(
        "checkpoint loaded (latest): {checkpoint_id}, data {}",
        loaded["data"]
    );

    // 5. Heartbeats renew the lease; the reply says when the next is due.
    //    Without them the session expires (the socket gets session.expired).
    for i in 1..=args.heartbeats {
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        let beat = first.request("runtime.heartbeat", session.clone()).await?;
        println!(
            "heartbeat {i}/{}: accepted, next due {}",
            args.heartbeats,
            str_at(&beat, "nextHeartbeatDueAt")?
        );
    }

    // 6. Reconnect on a new socket at a higher epoch. The gateway moves the
    //    session here (same sessionId) and fences the old socket.
    let mut second = Conn::connect("socket 2", &args.url, &args.token).await?;
    let moved = second
        .request(
            "runtime.attach",
            json!({
                "runId": run,
                "runtimeInstanceId": instance,
                "protocolVersion": "1",
                "reconnect": true,
                "connectionEpoch": 2,
                "capabilities": CAPABILITIES,
            }),
        )
        .await?;
    if str_at(&moved, "sessionId")? != session_id {
        return Err(format!("the reconnect returned another session: {moved}").into());
    }
    println!("reconnected on a new socket at epoch 2: same session {session_id}");

    let superseded = first.push("session.superseded").await?;
    println!(
        "old socket got session.superseded: session {}, now at epoch {}",
        str_at(&superseded, "sessionId")?,
        u64_at(&superseded, "connectionEpoch")?
    );
    // The old socket may no longer speak for the session.
    let fenced = first.call("runtime.heartbeat", session.clone()).await?;
    match fenced["type"].as_str() {
        Some("error") => println!(
            "old socket heartbeat refused: {}",
            ProtocolError::from_frame(&fenced)
        ),
        _ => return Err(format!("the old socket was not fenced: {fenced}").into()),
    }
    second.request("runtime.heartbeat", session.clone()).await?;
    println!("new socket heartbeat accepted");
    // State lives with the run, not the socket.
    let got = second
        .request("kv.get", with(json!({ "keys": ["greeting"] })))
        .await?;
    println!("kv.get on the new socket: {}", got["kv"]);

    first.close().await;
    second.close().await;
    println!("done");
    Ok(())
}
