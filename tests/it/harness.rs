//! A gateway on 127.0.0.1:0 and a raw WebSocket client that speaks the
//! protocol by hand (as an outside runtime would), for integration tests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rungate::auth::{AuthKey, RunScope, TokenKind};
use rungate::config::{Config, StoreKind};
use rungate::gateway::RunningGateway;
use rungate::ids::{Capabilities, Capability};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous: tests share two busy cores.
pub use rungate_test_support::WAIT;

pub struct TestGateway {
    pub gateway: Option<RunningGateway>,
    pub addr: SocketAddr,
    pub key: AuthKey,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    /// Starts with the embedded store in a fresh directory; `tweak` may
    /// change anything first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
        config.store = StoreKind::Embedded;
        tweak(&mut config);
        let gateway = rungate::gateway::start(config)
            .await
            .expect("gateway starts");
        let addr = gateway.local_addr();
        let key = AuthKey::load_or_create(&dir.path().join("data/auth.key")).expect("key");
        TestGateway {
            gateway: Some(gateway),
            addr,
            key,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn token(&self, kind: TokenKind, runs: &str, caps: &[Capability]) -> String {
        mint(&self.key, kind, runs, caps)
    }

    /// A runtime socket whose token covers `runs` with every capability.
    pub async fn runtime(&self, runs: &str) -> Client {
        let token = self.token(TokenKind::Runtime, runs, &Capability::ALL);
        Client::connect(&self.url("/v1/runtime"), &token).await
    }

    pub async fn drain(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.drain().await.expect("drain flushes the store");
        }
    }
}

/// Every capability's wire name, from [`Capability::ALL`]: what a runtime
/// asks for at attach to be allowed everything.
#[allow(dead_code)] // Not every test binary uses it.
pub fn all_caps() -> Vec<&'static str> {
    Capability::ALL.iter().map(|c| c.as_str()).collect()
}

pub fn mint(key: &AuthKey, kind: TokenKind, runs: &str, caps: &[Capability]) -> String {
    let scope = RunScope::parse_list(runs).expect("pattern");
    let caps: Capabilities = caps.iter().copied().collect();
    key.mint(kind, &scope, caps, Duration::from_secs(3600))
        .expect("mint")
}

/// A protocol client with no conveniences beyond matching replies by id.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Frames read while waiting for something else.
    backlog: VecDeque<Value>,
    /// Every frame this client received, for schema checks.
    pub seen: Vec<Value>,
}

/// One raw HTTP/1.1 request, written as given (it should say
/// `Connection: close`), on a fresh connection: the status and the body,
/// read to the end.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// The outcome of an HTTP handshake that was refused.
pub async fn connect_status(url: &str, token: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

impl Client {
    pub async fn connect(url: &str, token: &str) -> Client {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("handshake accepted");
        Client {
            ws,
            next_id: 0,
            backlog: VecDeque::new(),
            seen: Vec::new(),
        }
    }

    /// A client over a socket the test opened itself (a token in the
    /// query string, extra headers).
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            ws,
            next_id: 0,
            backlog: VecDeque::new(),
            seen: Vec::new(),
        }
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_raw(Message::text(text)).await;
    }

    /// Sends a request and returns its id without waiting.
    pub async fn send(&mut self, kind: &str, payload: Value) -> String {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        let frame = json!({ "id": id, "type": kind, "payload": payload });
        self.send_text(&frame.to_string()).await;
        id
    }

    /// The next frame from the socket (not the backlog).
    async fn read(&mut self) -> Option<Value> {
        self.read_within(WAIT).await.expect("a frame in time")
    }

    /// The next frame from the socket (not the backlog): `Err` when none
    /// came within `limit`, `Ok(None)` when the socket closed.
    async fn read_within(&mut self, limit: Duration) -> Result<Option<Value>, ()> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(until, self.ws.next())
                .await
                .map_err(|_| ())?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("gateway sends JSON");
                    self.seen.push(v.clone());
                    return Ok(Some(v));
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Every frame that arrives within `window` (the backlog's first),
    /// for checks that something does *not* come; stops early if the
    /// socket closes.
    pub async fn frames_within(&mut self, window: Duration) -> Vec<Value> {
        let until = tokio::time::Instant::now() + window;
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.read_within(left).await {
                Ok(Some(v)) => frames.push(v),
                Ok(None) | Err(()) => return frames,
            }
        }
    }

    /// Like [`Self::call`], but waits up to `limit` for the answer (for a
    /// gateway whose backend is away and answers only after its own
    /// timeout).
    pub async fn call_within(&mut self, kind: &str, payload: Value, limit: Duration) -> Value {
        let id = self.send(kind, payload).await;
        if let Some(pos) = self.backlog.iter().position(|v| v["id"] == id) {
            return self.backlog.remove(pos).unwrap();
        }
        let until = tokio::time::Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let v = self
                .read_within(left)
                .await
                .unwrap_or_else(|()| panic!("no answer to {kind} within {limit:?}"))
                .expect("socket closed while waiting for an answer");
            if v["id"] == id {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    /// The next text frame exactly as sent (backlog not consulted), for
    /// checks on bytes rather than values.
    pub async fn next_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("read");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).expect("gateway sends JSON");
                self.seen.push(v);
                return t.as_str().to_owned();
            }
        }
    }

    /// Waits for the first frame (backlog first) matching `pred`.
    pub async fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos).unwrap();
        }
        loop {
            let v = self
                .read()
                .await
                .expect("socket closed while waiting for a frame");
            if pred(&v) {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    /// The whole frame answering request `id` (a reply or an error).
    pub async fn answer(&mut self, id: &str) -> Value {
        self.wait_for(|v| v["id"] == id).await
    }

    /// Sends and waits for the answer frame.
    pub async fn call(&mut self, kind: &str, payload: Value) -> Value {
        let id = self.send(kind, payload).await;
        self.answer(&id).await
    }

    /// Sends and returns the reply payload; panics on an error frame.
    pub async fn ok(&mut self, kind: &str, payload: Value) -> Value {
        let frame = self.call(kind, payload).await;
        assert_eq!(frame["type"], "reply", "{kind} should succeed: {frame}");
        frame["payload"].clone()
    }

    /// Sends and returns the error code; panics on a reply.
    pub async fn err(&mut self, kind: &str, payload: Value) -> String {
        let frame = self.call(kind, payload).await;
        assert_eq!(frame["type"], "error", "{kind} should fail: {frame}");
        frame["error"]["code"].as_str().unwrap().to_owned()
    }

    /// The next push of type `kind`.
    pub async fn push(&mut self, kind: &str) -> Value {
        self.wait_for(|v| v["type"] == kind && v.get("id").is_none())
            .await["payload"]
            .clone()
    }

    /// Reads until the gateway closes the socket; returns the frames seen.
    pub async fn until_closed(&mut self) -> Vec<Value> {
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        while let Some(v) = self.read().await {
            frames.push(v);
        }
        frames
    }

    /// Fresh attach; returns the reply payload.
    pub async fn attach(&mut self, run: &str, instance: &str, caps: &[&str]) -> Value {
        self.ok(
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": instance, "protocolVersion": "1", "capabilities": caps }),
        )
        .await
    }

    /// Reconnect at `epoch`; returns the whole answer frame.
    pub async fn reattach(
        &mut self,
        run: &str,
        instance: &str,
        epoch: u64,
        caps: &[&str],
    ) -> Value {
        self.call(
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": instance, "protocolVersion": "1",
                    "reconnect": true, "connectionEpoch": epoch, "capabilities": caps }),
        )
        .await
    }

    /// Reads until the gateway closes the socket; its close frame, if it
    /// sent one (waits up to `limit`).
    #[allow(dead_code)] // Not every test binary uses it.
    pub async fn close_frame(
        &mut self,
        limit: Duration,
    ) -> Option<tungstenite::protocol::CloseFrame> {
        tokio::time::timeout(limit, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        })
        .await
        .expect("the socket closed in time")
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A run's whole stream as a viewer resuming from offset 0 sees it: its
/// epoch and each event's `data`, in offset order. Asserts that nothing was
/// evicted or lost (`firstOffset` 0, not truncated, offsets contiguous).
pub async fn read_stream(url: &str, token: &str, run: &str) -> (String, Vec<Value>) {
    let mut viewer = Client::connect(url, token).await;
    let info = viewer
        .ok("stream.resume", json!({ "runId": run, "fromOffset": 0 }))
        .await;
    assert_eq!(info["firstOffset"], 0, "nothing evicted: {info}");
    assert_eq!(info["truncated"], false, "{info}");
    let next = info["nextOffset"].as_u64().expect("nextOffset");
    let mut data = Vec::new();
    while (data.len() as u64) < next {
        let push = viewer.push("stream.events").await;
        for e in push["events"].as_array().expect("events") {
            assert_eq!(e["offset"], data.len() as u64, "contiguous offsets");
            data.push(e["event"]["data"].clone());
        }
    }
    let epoch = info["streamEpoch"]
        .as_str()
        .expect("streamEpoch")
        .to_owned();
    (epoch, data)
}

/// The `rungate` binary as a child process, for restart and signal tests.
pub struct GatewayProcess {
    child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// `rungate serve --listen 127.0.0.1:0 --data-dir DIR extra...`; an
    /// `--listen` in `extra` replaces the default (to restart on the same
    /// address).
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> GatewayProcess {
        GatewayProcess::start(GatewayProcess::command(data_dir, extra)).await
    }

    /// The command [`Self::spawn`] runs, for a test that changes it
    /// (environment, log level, where stderr goes) before [`Self::start`].
    pub fn command(data_dir: &Path, extra: &[&str]) -> tokio::process::Command {
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rungate"));
        command
            .arg("serve")
            .args(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // RUNGATE_TEST_LOG (e.g. `rungate=debug`) shows more of a
            // gateway process's log when a test needs explaining.
            .env(
                "RUNGATE_LOG",
                std::env::var("RUNGATE_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stderr(Stdio::inherit());
        command
    }

    /// Runs a `rungate serve` command and waits for the address it prints.
    pub async fn start(mut command: tokio::process::Command) -> GatewayProcess {
        let mut child = command
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rungate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("gateway prints its address in time")
            .expect("read stdout")
            .expect("a line");
        let addr = line
            .strip_prefix("listening on ")
            .expect("'listening on ADDR'")
            .parse()
            .expect("an address");
        GatewayProcess { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The process id, for reading its `/proc` entries.
    #[allow(dead_code)] // Not every test binary uses it.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().expect("running") as i32;
        // std has no way to send a signal; the `kill` command does.
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        status.code()
    }

    /// Kills the process without letting it drain (like `kill -9`).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// `n` gateway processes sharing one Redis (`--store URL`) and one auth
/// key file: `rungate serve --store URL --auth-key-file KEY extra...`,
/// each with a data directory of its own (kept while this lives).
pub struct GatewaysOnRedis {
    /// `None` once killed.
    nodes: Vec<Option<GatewayProcess>>,
    pub key: AuthKey,
    _dirs: Vec<tempfile::TempDir>,
    _key_dir: tempfile::TempDir,
}

impl GatewaysOnRedis {
    pub async fn spawn(redis_url: &str, n: usize, extra: &[&str]) -> GatewaysOnRedis {
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("auth.key");
        let key = AuthKey::load_or_create(&key_file).unwrap();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let args: Vec<&str> = [
                "--store",
                redis_url,
                "--auth-key-file",
                key_file.to_str().unwrap(),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
            nodes.push(Some(GatewayProcess::spawn(&data_dir(&dir), &args).await));
            dirs.push(dir);
        }
        GatewaysOnRedis {
            nodes,
            key,
            _dirs: dirs,
            _key_dir: key_dir,
        }
    }

    /// Node `i`, which must still be running.
    pub fn node(&self, i: usize) -> &GatewayProcess {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// `kill -9` of node `i`.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("node is running").kill().await;
    }

    /// SIGTERM to every node still running, each waited for.
    pub async fn terminate(self) {
        for node in self.nodes.into_iter().flatten() {
            node.terminate().await;
        }
    }
}

pub fn data_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("data")
}

/// `name` made unique to this test run: tests on a shared `REDIS_URL`
/// (and runs of the suite one after another) never meet each other's runs.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A command running example `name`: the binary `cargo test` built beside
/// this test's own executable, or `cargo run --example` if it is not there
/// (a test run filtered to one target). Running the built file directly
/// keeps the test from waiting on cargo's build lock.
pub fn example_command(name: &str) -> tokio::process::Command {
    let built = std::env::current_exe().ok().and_then(|exe| {
        // target/<profile>/deps/<test> → target/<profile>/examples/<name>
        let path = exe.parent()?.parent()?.join("examples").join(name);
        path.is_file().then_some(path)
    });
    match built {
        Some(path) => tokio::process::Command::new(path),
        None => {
            let mut cargo = tokio::process::Command::new(env!("CARGO"));
            cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "run",
                "--quiet",
                "--example",
                name,
                "--",
            ]);
            cargo
        }
    }
}
