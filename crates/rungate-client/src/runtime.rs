//! [`RuntimeClient`]: one runtime's persistent socket, kept alive across
//! network failures.
//!
//! The handle sends operations to a driver task that owns the socket and
//! all mutable state: the runs attached through this client, requests in
//! flight, and publishes not yet acknowledged. The driver:
//!
//! - matches replies to requests by id (replies may come in any order);
//! - heartbeats every run at the interval the gateway gave;
//! - on a lost socket, reconnects with [`Backoff`], attaches the main run
//!   again with `reconnect: true` and a higher `connectionEpoch`, moves the
//!   sub-runs with `runtime.recoverConnections` (dropping, one by one, any
//!   the gateway refuses), resends every unacknowledged publish in its
//!   original order, and resumes the streams it was following;
//! - numbers every published event with a per-run `seq`, so a resent batch
//!   is stored once: a network cut loses nothing and duplicates nothing.
//!
//! Requests that were sent but not answered when the socket dropped fail
//! with [`ClientError::ConnectionLost`] (they may have been applied); those
//! not yet sent wait for the new connection. Publishes never fail that way.
//!
//! A run ends with [`RuntimeClient::finish`]; a viewer's stop arrives on
//! [`RuntimeClient::cancel_requests`] (the runtime decides how to stop,
//! then finishes the run, usually `cancelled`).
//! Must not know gateway internals: only frames.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use super::link::{self, Incoming, Socket};
use super::viewer::{Follower, StreamItem, StreamState};
use super::{Backoff, ClientError, TokenSource, token};
use rungate_protocol::ErrorCode;
use rungate_protocol::ids::RunOutcome;

type Result<T> = std::result::Result<T, ClientError>;

/// How to reach the gateway and how patient to be.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `ws://HOST:PORT/v1/runtime`.
    pub url: String,
    /// A runtime token covering the runs this client attaches (unless
    /// `token_source` is set).
    pub token: String,
    /// Asked for a token at every connection, so a client outlives any one
    /// token ([`RuntimeOptions::with_token_source`]).
    pub token_source: Option<TokenSource>,
    /// This runtime's identity; a reconnect must present the same one.
    pub runtime_instance_id: String,
    /// Longest a call waits for its answer.
    pub request_timeout: Duration,
    /// Longest one connection attempt (TCP + handshake) may take.
    pub connect_timeout: Duration,
    /// Delays between reconnect attempts after the socket is lost.
    pub backoff: Backoff,
}

impl RuntimeOptions {
    /// Options for `url` with a fixed `token` and this runtime's `runtimeInstanceId`; 30 s request
    /// timeout, 10 s connect timeout, default backoff.
    pub fn new(
        url: impl Into<String>,
        token: impl Into<String>,
        runtime_instance_id: impl Into<String>,
    ) -> RuntimeOptions {
        RuntimeOptions {
            url: url.into(),
            token: token.into(),
            token_source: None,
            runtime_instance_id: runtime_instance_id.into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }

    /// Takes each connection's token from `source` instead of `token`: the
    /// gateway closes a socket when its token expires, and the client's
    /// reconnect then presents a fresh one (its sessions carry on).
    pub fn with_token_source(mut self, source: TokenSource) -> RuntimeOptions {
        self.token_source = Some(source);
        self
    }
}

/// The connection as the application sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected at this `connectionEpoch`, sessions restored.
    Connected {
        /// The socket's `connectionEpoch`.
        epoch: u64,
    },
    /// The socket is gone; reconnect attempt `attempt` is pending.
    Reconnecting {
        /// How many reconnect attempts failed before this one (0 for the first).
        attempt: u32,
    },
    /// [`RuntimeClient::close`] was called or every handle was dropped.
    Closed,
}

/// Things that happened to the connection or a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The socket was lost.
    Disconnected,
    /// A new socket carries the sessions again, at this epoch.
    Reconnected {
        /// The new socket's `connectionEpoch`.
        epoch: u64,
    },
    /// The gateway is shutting down; the client will reconnect.
    Draining {
        /// The push's `reconnectAfterMs`: how long the client waits before reconnecting.
        reconnect_after: Duration,
    },
    /// The run's lease ran out; its unacknowledged publishes failed.
    SessionExpired {
        /// The run whose session expired (`runId`).
        run_id: String,
    },
    /// Another connection took the run over with a higher epoch.
    SessionSuperseded {
        /// The run whose session moved (`runId`).
        run_id: String,
    },
    /// After a reconnect the gateway no longer knew the run's session (its
    /// lease ran out, or the gateway restarted without durable sessions),
    /// so the client attached the run afresh: a new session, the same run.
    SessionRenewed {
        /// The run attached afresh (`runId`).
        run_id: String,
        /// Its new session (`sessionId`).
        session_id: String,
    },
    /// The run ended (finished here, or the gateway said `RUN_ENDED`): its
    /// session is gone for good and the client forgot it.
    RunEnded {
        /// The run that ended (`runId`).
        run_id: String,
    },
}

/// A viewer asked a run to stop (the `run.cancelRequested` push).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The session holding the run (`sessionId`).
    pub session_id: String,
    /// The run a viewer asked to stop (`runId`).
    pub run_id: String,
    /// The viewer's `reason`, if it gave one (at most 1024 UTF-8 bytes).
    #[serde(default)]
    pub reason: Option<String>,
    /// RFC 3339.
    pub requested_at: String,
}

/// The `runtime.finish` payload (the driver adds `sessionId` and `runId`).
#[derive(Debug, serde::Serialize)]
struct FinishPayload<'a> {
    outcome: RunOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// The `runtime.finish` reply.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FinishReply {
    next_offset: u64,
}

/// The answer to [`RuntimeClient::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The session the gateway bound the run to (`sessionId`); later commands for the run carry it.
    pub session_id: String,
    /// The run attached (`runId`).
    pub run_id: String,
    /// How often to heartbeat (`heartbeatIntervalMs`); the client's driver does it.
    pub heartbeat_interval: Duration,
    /// The version of the run's config (`configVersion`), when the gateway has one.
    pub config_version: Option<String>,
}

/// An output event to publish. The client adds `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's `type`, 1 to 128 characters ('log', 'token', 'tool.call'…); the gateway does not
    /// interpret it.
    pub kind: String,
    /// The event's `data`: any JSON value; omitted when `None`.
    pub data: Option<Value>,
    /// RFC 3339; the gateway checks it.
    pub timestamp: Option<String>,
}

impl Event {
    /// An event of type `kind` with no `data` and no `timestamp`.
    pub fn new(kind: impl Into<String>) -> Event {
        Event {
            kind: kind.into(),
            data: None,
            timestamp: None,
        }
    }

    /// Sets the event's `data`.
    pub fn data(mut self, data: Value) -> Event {
        self.data = Some(data);
        self
    }

    /// Sets the event's `timestamp` (RFC 3339), when the runtime produced it.
    pub fn timestamp(mut self, rfc3339: impl Into<String>) -> Event {
        self.timestamp = Some(rfc3339.into());
        self
    }

    fn to_json(&self, seq: u64) -> Value {
        let mut e = Map::new();
        e.insert("type".into(), Value::String(self.kind.clone()));
        e.insert("seq".into(), json!(seq));
        if let Some(t) = &self.timestamp {
            e.insert("timestamp".into(), Value::String(t.clone()));
        }
        if let Some(d) = &self.data {
            e.insert("data".into(), d.clone());
        }
        Value::Object(e)
    }
}

/// A checkpoint as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub checkpoint_id: String,
    pub saved_at: String,
    pub data: Value,
}

/// A runtime's connection to the gateway. Cheap to clone; every clone uses
/// the same socket. The socket closes when the last clone is dropped or
/// [`RuntimeClient::close`] is called.
#[derive(Clone)]
pub struct RuntimeClient {
    ops: mpsc::Sender<Op>,
    state: watch::Receiver<ConnectionState>,
    events: broadcast::Sender<ClientEvent>,
    cancels: broadcast::Sender<CancelRequest>,
    request_timeout: Duration,
}

enum Op {
    Attach {
        run: String,
        capabilities: Vec<String>,
        attempt_id: Option<String>,
        reply: oneshot::Sender<Result<Attached>>,
    },
    /// A command on an attached run: the driver adds `sessionId` and `runId`.
    Call {
        run: String,
        kind: &'static str,
        payload: Map<String, Value>,
        reply: oneshot::Sender<Result<Value>>,
    },
    Publish {
        run: String,
        events: Vec<Event>,
        reply: oneshot::Sender<Result<()>>,
    },
    Follow {
        run: String,
        from_offset: Option<u64>,
        items: mpsc::UnboundedSender<StreamItem>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The run was finished: forget it.
    Ended {
        run: String,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl RuntimeClient {
    /// Connects (retrying with backoff until `connect_timeout` has passed
    /// on the first attempt only if the gateway refuses the token) and
    /// starts the driver.
    pub async fn connect(options: RuntimeOptions) -> Result<RuntimeClient> {
        let socket = link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await?;
        let (ops_tx, ops_rx) = mpsc::channel(1024);
        let epoch = initial_epoch();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connected { epoch });
        let (events_tx, _) = broadcast::channel(256);
        let (cancels_tx, _) = broadcast::channel(64);
        let request_timeout = options.request_timeout;
        let driver = Driver {
            options,
            ops: ops_rx,
            state: state_tx,
            events: events_tx.clone(),
            cancels: cancels_tx.clone(),
            socket: Some(socket),
            epoch,
            next_id: 0,
            runs: Vec::new(),
            pending: HashMap::new(),
            outbox: VecDeque::new(),
            waiting: VecDeque::new(),
            follows: HashMap::new(),
            reconnect_not_before: None,
            heartbeat_due: None,
            heartbeat_every: None,
            last_heard: Instant::now(),
            owed_since: Instant::now(),
            closing: None,
        };
        tokio::spawn(driver.run());
        Ok(RuntimeClient {
            ops: ops_tx,
            state: state_rx,
            events: events_tx,
            cancels: cancels_tx,
            request_timeout,
        })
    }

    /// The connection state, as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Session and connection events from now on.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Viewers' stop requests (`run.cancelRequested`) from now on, for
    /// every run of this client; a pending one comes again after each
    /// reconnect until the run ends.
    pub fn cancel_requests(&self) -> broadcast::Receiver<CancelRequest> {
        self.cancels.subscribe()
    }

    /// Ends `run` (`runtime.finish`) with `outcome` and an optional message
    /// (at most 1024 UTF-8 bytes): viewers get `stream.ended` after its
    /// last event, and its session ends (finishing the main run also ends
    /// its open sub-runs, `cancelled`). Answers the run's final head. The
    /// client forgets the run; publish everything before calling this.
    pub async fn finish(
        &self,
        run: &str,
        outcome: RunOutcome,
        message: Option<&str>,
    ) -> Result<u64> {
        let payload = serde_json::to_value(FinishPayload { outcome, message })
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        let reply = self.call(run, "runtime.finish", payload).await?;
        let reply: FinishReply = serde_json::from_value(reply.clone())
            .map_err(|e| ClientError::BadReply(format!("runtime.finish answered {reply}: {e}")))?;
        let _ = self
            .ops
            .send(Op::Ended {
                run: run.to_owned(),
            })
            .await;
        Ok(reply.next_offset)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => Err(ClientError::Timeout(self.request_timeout)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// Attaches `run` (the first run attached is the main run; later ones
    /// are its sub-runs and need `subtasks.run` on the main session).
    pub async fn attach(&self, run: &str, capabilities: &[&str]) -> Result<Attached> {
        self.attach_attempt(run, capabilities, None).await
    }

    /// As [`RuntimeClient::attach`], naming the run's attempt.
    pub async fn attach_attempt(
        &self,
        run: &str,
        capabilities: &[&str],
        attempt_id: Option<&str>,
    ) -> Result<Attached> {
        let run = run.to_owned();
        let capabilities = capabilities.iter().map(|c| (*c).to_owned()).collect();
        let attempt_id = attempt_id.map(str::to_owned);
        self.ask(|reply| Op::Attach {
            run,
            capabilities,
            attempt_id,
            reply,
        })
        .await
    }

    async fn call(&self, run: &str, kind: &'static str, payload: Value) -> Result<Value> {
        let payload = match payload {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let run = run.to_owned();
        self.ask(|reply| Op::Call {
            run,
            kind,
            payload,
            reply,
        })
        .await
    }

    /// Renews the run's lease now (the client also does it on its own).
    pub async fn heartbeat(&self, run: &str) -> Result<()> {
        self.call(run, "runtime.heartbeat", json!({}))
            .await
            .map(drop)
    }

    /// The run's secrets: all of them, or the named ones (`NOT_FOUND` if
    /// any is missing). Needs `secrets.read`.
    pub async fn secrets(
        &self,
        run: &str,
        names: Option<&[&str]>,
    ) -> Result<BTreeMap<String, String>> {
        let payload = match names {
            Some(n) => json!({ "names": n }),
            None => json!({}),
        };
        let reply = self.call(run, "secrets.get", payload).await?;
        string_map(&reply["secrets"])
    }

    /// The run's effective config object.
    pub async fn config(&self, run: &str) -> Result<Map<String, Value>> {
        let reply = self.call(run, "config.get", json!({})).await?;
        match &reply["config"] {
            Value::Object(m) => Ok(m.clone()),
            other => Err(ClientError::BadReply(format!("config is {other}"))),
        }
    }

    /// The values of `keys` that exist. Needs `kv.read`.
    pub async fn kv_get(&self, run: &str, keys: &[&str]) -> Result<BTreeMap<String, String>> {
        let reply = self.call(run, "kv.get", json!({ "keys": keys })).await?;
        string_map(&reply["kv"])
    }

    /// Sets keys. Needs `kv.write`.
    pub async fn kv_set(&self, run: &str, kv: &BTreeMap<String, String>) -> Result<()> {
        self.call(run, "kv.set", json!({ "kv": kv }))
            .await
            .map(drop)
    }

    /// Saves a checkpoint (replacing `id` if given); returns its id.
    /// Needs `checkpoint.save`.
    pub async fn checkpoint_save(
        &self,
        run: &str,
        id: Option<&str>,
        data: &Value,
    ) -> Result<String> {
        let mut payload = json!({ "data": data });
        if let Some(id) = id {
            payload["checkpointId"] = json!(id);
        }
        let reply = self.call(run, "checkpoint.save", payload).await?;
        reply["checkpointId"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::BadReply(format!("checkpoint.save answered {reply}")))
    }

    /// Loads the latest checkpoint, or the one named `id`. Needs
    /// `checkpoint.load`; `NOT_FOUND` if there is none.
    pub async fn checkpoint_load(&self, run: &str, id: Option<&str>) -> Result<Checkpoint> {
        let payload = match id {
            Some(id) => json!({ "checkpointId": id }),
            None => json!({}),
        };
        let reply = self.call(run, "checkpoint.load", payload).await?;
        Ok(Checkpoint {
            checkpoint_id: reply["checkpointId"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            saved_at: reply["savedAt"].as_str().unwrap_or_default().to_owned(),
            data: reply["data"].clone(),
        })
    }

    /// Publishes `events` as one batch, in order after every earlier
    /// publish of this client. Returns once the gateway stored them. If the
    /// socket drops first, the batch is resent on the next one (stored once,
    /// thanks to `seq`); a timeout here does not cancel it.
    pub async fn publish(&self, run: &str, events: Vec<Event>) -> Result<()> {
        let run = run.to_owned();
        self.ask(|reply| Op::Publish { run, events, reply }).await
    }

    /// Follows the run's own output stream from `from_offset` (or live),
    /// resuming after reconnects. Needs `stream.resume`. The items are
    /// buffered without bound (the driver must never wait on a caller:
    /// heartbeats go through it); a caller that cannot keep up should use a
    /// [`super::ViewerClient`], which applies backpressure instead.
    pub async fn follow(&self, run: &str, from_offset: Option<u64>) -> Result<Follower> {
        let (items_tx, items_rx) = mpsc::unbounded_channel();
        let run = run.to_owned();
        self.ask(|reply| Op::Follow {
            run,
            from_offset,
            items: items_tx,
            reply,
        })
        .await?;
        Ok(Follower::new(items_rx))
    }

    /// Closes the socket. Unacknowledged publishes fail with
    /// [`ClientError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Close { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn string_map(v: &Value) -> Result<BTreeMap<String, String>> {
    serde_json::from_value(v.clone()).map_err(|e| ClientError::BadReply(format!("{e}: {v}")))
}

// ------------------------------------------------------------------ driver

/// A run attached through this client.
struct Run {
    run_id: String,
    session_id: String,
    /// The attach reply, answered again to a repeated attach of the run.
    attached: Attached,
    capabilities: Vec<String>,
    attempt_id: Option<String>,
    /// The `seq` the next published event gets.
    next_seq: u64,
}

/// A publish not yet acknowledged, kept to be resent after a reconnect.
struct Publication {
    /// Id of its latest send (changes on resend).
    id: Option<String>,
    run: String,
    payload: Value,
    reply: Option<oneshot::Sender<Result<()>>>,
}

enum Pending {
    /// An attach of a run this client does not hold yet. `take_over`: sent
    /// with `reconnect: true`, after a fresh attach met `CONFLICT` (the run
    /// is held by this instance's predecessor, or by this client's own
    /// earlier send whose answer was lost). `tries` bounds the back and
    /// forth between the two.
    Attach {
        run: String,
        capabilities: Vec<String>,
        attempt_id: Option<String>,
        reply: oneshot::Sender<Result<Attached>>,
        take_over: bool,
        tries: u8,
    },
    Call(oneshot::Sender<Result<Value>>),
    Publish,
    Heartbeat,
    Resume {
        run: String,
    },
}

/// A stream this client follows and where its items go.
struct Followed {
    state: StreamState,
    items: mpsc::UnboundedSender<StreamItem>,
}

struct Driver {
    options: RuntimeOptions,
    ops: mpsc::Receiver<Op>,
    state: watch::Sender<ConnectionState>,
    events: broadcast::Sender<ClientEvent>,
    cancels: broadcast::Sender<CancelRequest>,
    socket: Option<Socket>,
    epoch: u64,
    next_id: u64,
    /// Attached runs; the first is the main run.
    runs: Vec<Run>,
    pending: HashMap<String, Pending>,
    /// Unacknowledged publishes, oldest first.
    outbox: VecDeque<Publication>,
    /// Operations that arrived while the socket was down.
    waiting: VecDeque<Op>,
    /// Streams followed, by run.
    follows: HashMap<String, Followed>,
    /// After `gateway.draining`: do not reconnect before this.
    reconnect_not_before: Option<Instant>,
    /// When the next round of heartbeats is due (none before an attach).
    heartbeat_due: Option<Instant>,
    /// The interval the gateway asked for.
    heartbeat_every: Option<Duration>,
    /// When the socket last delivered a frame: a socket that carries
    /// nothing while answers are owed is given up (see [`Driver::silence`]).
    last_heard: Instant,
    /// When answers became owed after none were (see [`Driver::silence`]).
    owed_since: Instant,
    /// A `close()` waiting for the shutdown to finish.
    closing: Option<oneshot::Sender<()>>,
}

impl Driver {
    async fn run(mut self) {
        loop {
            if self.socket.is_none() && !self.reconnect().await {
                break;
            }
            let heartbeat = self.heartbeat_due;
            let silence = self.silence();
            let socket = match self.socket.as_mut() {
                Some(s) => s,
                None => continue,
            };
            tokio::select! {
                op = self.ops.recv() => match op {
                    None => break,
                    Some(Op::Close { reply }) => {
                        self.closing = Some(reply);
                        break;
                    }
                    Some(op) => self.handle_op(op).await,
                },
                frame = link::next(socket) => match frame {
                    Some(frame) => {
                        self.last_heard = Instant::now();
                        self.handle_frame(frame).await;
                    }
                    None => self.lost(),
                },
                _ = sleep_until(silence.unwrap_or_else(far_future)), if silence.is_some() => {
                    tracing::warn!("no frame from the gateway while answers are owed; reconnecting");
                    self.lost();
                }
                _ = sleep_until(heartbeat.unwrap_or_else(far_future)), if heartbeat.is_some() => {
                    self.send_heartbeats().await;
                }
            }
        }
        self.shut_down().await;
        // Answered only now: when close() returns, the client is closed.
        if let Some(reply) = self.closing.take() {
            let _ = reply.send(());
        }
    }

    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("c{}", self.next_id)
    }

    /// Sends a request; on a dead socket, marks the connection lost (the
    /// caller's pending entry is then failed or kept by [`Driver::lost`]).
    async fn send(&mut self, id: &str, kind: &str, payload: &Value) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        // The first answer owed after a quiet spell starts the silence
        // window; an idle socket has said nothing because nothing was asked.
        if self.pending.len() == 1 && self.pending.contains_key(id) {
            self.owed_since = Instant::now();
        }
        if !link::send(socket, link::request(id, kind, payload)).await {
            self.lost();
        }
    }

    fn run_index(&self, run: &str) -> Option<usize> {
        self.runs.iter().position(|r| r.run_id == run)
    }

    async fn handle_op(&mut self, op: Op) {
        if self.socket.is_none() {
            // Publishes join the outbox in order now; the rest wait.
            match op {
                Op::Publish { run, events, reply } => {
                    self.enqueue_publish(run, events, reply);
                }
                op => self.waiting.push_back(op),
            }
            return;
        }
        match op {
            Op::Attach {
                run,
                capabilities,
                attempt_id,
                reply,
            } => {
                // Already held here (an earlier attach whose answer came
                // after its caller gave up, say): the same session.
                if let Some(i) = self.run_index(&run) {
                    let _ = reply.send(Ok(self.runs[i].attached.clone()));
                    return;
                }
                self.send_attach(run, capabilities, attempt_id, reply, false, 0)
                    .await
            }
            Op::Ended { run } => self.run_ended(&run),
            Op::Call {
                run,
                kind,
                mut payload,
                reply,
            } => {
                let Some(i) = self.run_index(&run) else {
                    let _ = reply.send(Err(ClientError::NoSession(run)));
                    return;
                };
                payload.insert("sessionId".into(), json!(self.runs[i].session_id));
                payload.insert("runId".into(), json!(run));
                let id = self.next_id();
                self.pending.insert(id.clone(), Pending::Call(reply));
                self.send(&id, kind, &Value::Object(payload)).await;
            }
            Op::Publish { run, events, reply } => {
                if self.enqueue_publish(run, events, reply) {
                    self.send_publication(self.outbox.len() - 1).await;
                }
            }
            Op::Follow {
                run,
                from_offset,
                items,
                reply,
            } => {
                if self.run_index(&run).is_none() {
                    let _ = reply.send(Err(ClientError::NoSession(run)));
                    return;
                }
                self.follows.insert(
                    run.clone(),
                    Followed {
                        state: StreamState::new(from_offset),
                        items,
                    },
                );
                let _ = reply.send(Ok(()));
                self.send_resume(&run).await;
            }
            Op::Close { reply } => {
                // Handled in the loop; kept for completeness.
                let _ = reply.send(());
            }
        }
    }

    async fn send_attach(
        &mut self,
        run: String,
        capabilities: Vec<String>,
        attempt_id: Option<String>,
        reply: oneshot::Sender<Result<Attached>>,
        take_over: bool,
        tries: u8,
    ) {
        let payload = self.attach_payload(&run, &capabilities, attempt_id.as_deref(), take_over);
        let id = self.next_id();
        self.pending.insert(
            id.clone(),
            Pending::Attach {
                run,
                capabilities,
                attempt_id,
                reply,
                take_over,
                tries,
            },
        );
        self.send(&id, "runtime.attach", &payload).await;
    }

    /// A `runtime.attach` payload for `run` at the current epoch; `reconnect`
    /// to take an existing session over.
    fn attach_payload(
        &self,
        run: &str,
        capabilities: &[String],
        attempt_id: Option<&str>,
        reconnect: bool,
    ) -> Value {
        let mut payload = json!({
            "runId": run,
            "runtimeInstanceId": self.options.runtime_instance_id,
            "protocolVersion": "1",
            "connectionEpoch": self.epoch,
            "capabilities": capabilities,
        });
        if let Some(a) = attempt_id {
            payload["attemptId"] = json!(a);
        }
        if reconnect {
            payload["reconnect"] = json!(true);
        }
        payload
    }

    /// Adds a publish to the outbox (numbering its events); false if the
    /// run has no session here (the caller is answered at once).
    fn enqueue_publish(
        &mut self,
        run: String,
        events: Vec<Event>,
        reply: oneshot::Sender<Result<()>>,
    ) -> bool {
        let Some(i) = self.run_index(&run) else {
            let _ = reply.send(Err(ClientError::NoSession(run)));
            return false;
        };
        let r = &mut self.runs[i];
        let events: Vec<Value> = events
            .iter()
            .map(|e| {
                let v = e.to_json(r.next_seq);
                r.next_seq += 1;
                v
            })
            .collect();
        let payload = json!({ "sessionId": r.session_id, "runId": run, "events": events });
        self.outbox.push_back(Publication {
            id: None,
            run,
            payload,
            reply: Some(reply),
        });
        true
    }

    async fn send_publication(&mut self, index: usize) {
        let id = self.next_id();
        self.outbox[index].id = Some(id.clone());
        self.pending.insert(id.clone(), Pending::Publish);
        let payload = self.outbox[index].payload.clone();
        self.send(&id, "events.publish", &payload).await;
    }

    async fn send_resume(&mut self, run: &str) {
        let (Some(i), Some(follow)) = (self.run_index(run), self.follows.get(run)) else {
            return;
        };
        let mut payload = json!({ "sessionId": self.runs[i].session_id, "runId": run });
        follow.state.add_position(&mut payload);
        let id = self.next_id();
        self.pending.insert(
            id.clone(),
            Pending::Resume {
                run: run.to_owned(),
            },
        );
        self.send(&id, "stream.resume", &payload).await;
    }

    async fn send_heartbeats(&mut self) {
        let runs: Vec<(String, String)> = self
            .runs
            .iter()
            .map(|r| (r.session_id.clone(), r.run_id.clone()))
            .collect();
        for (sid, run) in runs {
            let id = self.next_id();
            self.pending.insert(id.clone(), Pending::Heartbeat);
            self.send(
                &id,
                "runtime.heartbeat",
                &json!({ "sessionId": sid, "runId": run }),
            )
            .await;
        }
        self.heartbeat_due = self
            .heartbeat_due
            .map(|_| Instant::now() + self.heartbeat_interval());
    }

    /// When to give up a socket that has delivered nothing while answers
    /// are owed (a black-holed link sends no FIN): twice the heartbeat
    /// interval, and never sooner than the request timeout. `None` while
    /// nothing is owed.
    fn silence(&self) -> Option<Instant> {
        if self.pending.is_empty() {
            return None;
        }
        let patience = self
            .options
            .request_timeout
            .max(self.heartbeat_interval() * 2);
        Some(self.last_heard.max(self.owed_since) + patience)
    }

    fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_every.unwrap_or(Duration::from_secs(10))
    }
}

impl Driver {
    async fn handle_frame(&mut self, frame: Incoming) {
        match frame {
            Incoming::Reply { id, payload } => {
                let Some(pending) = self.pending.remove(&id) else {
                    return;
                };
                let payload: Value = serde_json::from_str(payload.get()).unwrap_or(Value::Null);
                self.answered(&id, pending, Ok(payload)).await;
            }
            Incoming::Error {
                id: Some(id),
                error,
            } => {
                if let Some(pending) = self.pending.remove(&id) {
                    self.answered(&id, pending, Err(error)).await;
                }
            }
            // An error the gateway could not tie to a request (a frame it
            // could not read): nothing to answer.
            Incoming::Error { id: None, error } => {
                tracing::warn!(%error, "the gateway refused a frame of this client");
            }
            Incoming::Push { kind, payload } => {
                if let Some(run) = self.pushed(&kind, payload.get()) {
                    self.send_resume(&run).await;
                }
            }
        }
    }

    async fn answered(&mut self, id: &str, pending: Pending, result: Result<Value>) {
        match pending {
            Pending::Call(reply) => {
                if let Err(e) = &result {
                    self.note_session_error(e, None);
                }
                let _ = reply.send(result);
            }
            Pending::Heartbeat => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "heartbeat refused");
                    self.note_session_error(&e, None);
                }
            }
            Pending::Publish => {
                let Some(at) = self.outbox.iter().position(|p| p.id.as_deref() == Some(id)) else {
                    return;
                };
                let Some(mut publication) = self.outbox.remove(at) else {
                    return;
                };
                if let Err(e) = &result {
                    self.note_session_error(e, Some(&publication.run));
                }
                if let Some(reply) = publication.reply.take() {
                    let _ = reply.send(result.map(drop));
                }
            }
            Pending::Resume { run } => match result {
                Ok(info) => {
                    if let Some(f) = self.follows.get_mut(&run) {
                        let item = f.state.resumed(&info);
                        let _ = f.items.send(item);
                    }
                }
                Err(e) => {
                    // Ending the channel ends the follower.
                    tracing::warn!(run = %run, error = %e, "stream.resume refused");
                    self.follows.remove(&run);
                }
            },
            Pending::Attach {
                run,
                capabilities,
                attempt_id,
                reply,
                take_over,
                tries,
            } => match result {
                Ok(payload) => {
                    let attached = Attached {
                        session_id: payload["sessionId"].as_str().unwrap_or_default().to_owned(),
                        run_id: run.clone(),
                        heartbeat_interval: Duration::from_millis(
                            payload["heartbeatIntervalMs"].as_u64().unwrap_or(10_000),
                        ),
                        config_version: payload["configVersion"].as_str().map(str::to_owned),
                    };
                    if self.heartbeat_every.is_none() {
                        self.heartbeat_every = Some(attached.heartbeat_interval);
                        self.heartbeat_due = Some(Instant::now() + attached.heartbeat_interval);
                    }
                    if let Some(i) = self.run_index(&run) {
                        self.runs[i].session_id = attached.session_id.clone();
                        self.runs[i].attached = attached.clone();
                    } else {
                        self.runs.push(Run {
                            run_id: run,
                            session_id: attached.session_id.clone(),
                            attached: attached.clone(),
                            capabilities,
                            attempt_id,
                            next_seq: initial_seq(),
                        });
                    }
                    let _ = reply.send(Ok(attached));
                }
                // Held by this instance already (a restarted process of the
                // same worker, or our own lost send): take it over; this
                // client's epoch is above any its predecessors used. Another
                // instance holding the run gets CONFLICT again, as it should.
                Err(e) if !take_over && tries < 2 && e.code() == Some(ErrorCode::Conflict) => {
                    self.send_attach(run, capabilities, attempt_id, reply, true, tries + 1)
                        .await;
                }
                // Nothing to take over after all: attach afresh.
                Err(e) if take_over && tries < 2 && e.code() == Some(ErrorCode::SessionExpired) => {
                    self.send_attach(run, capabilities, attempt_id, reply, false, tries + 1)
                        .await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// A session-ending error on `run` (or on whatever run the error names).
    fn note_session_error(&mut self, e: &ClientError, run: Option<&str>) {
        let Some(code) = e.code() else {
            return;
        };
        let Some(run) = e.run_id().or(run.map(str::to_owned)) else {
            return;
        };
        match code {
            ErrorCode::SessionExpired => self.session_gone(&run, false),
            ErrorCode::StaleEpoch => self.session_gone(&run, true),
            ErrorCode::RunEnded => self.run_ended(&run),
            _ => {}
        }
    }

    /// Handles a push; answers a run whose stream must be resumed again.
    fn pushed(&mut self, kind: &str, payload: &str) -> Option<String> {
        let payload: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
        match kind {
            "session.expired" => {
                if let Some(run) = payload["runId"].as_str() {
                    self.session_gone(run, false);
                }
            }
            "session.superseded" => {
                if let Some(run) = payload["runId"].as_str() {
                    self.session_gone(run, true);
                }
            }
            "gateway.draining" => {
                let after =
                    Duration::from_millis(payload["reconnectAfterMs"].as_u64().unwrap_or(1000));
                self.reconnect_not_before = Some(Instant::now() + after);
                let _ = self.events.send(ClientEvent::Draining {
                    reconnect_after: after,
                });
            }
            "stream.events" | "stream.gap" | "stream.closed" | "stream.ended" => {
                if let Some(run) = payload["runId"].as_str()
                    && let Some(f) = self.follows.get_mut(run)
                {
                    let (items, resume) = f.state.pushed(kind, &payload);
                    for item in items {
                        let _ = f.items.send(item);
                    }
                    if f.state.is_ended() {
                        self.follows.remove(run);
                        return None;
                    }
                    return resume.then(|| run.to_owned());
                }
            }
            "run.cancelRequested" => {
                if let Ok(request) = serde_json::from_value::<CancelRequest>(payload) {
                    let _ = self.cancels.send(request);
                }
            }
            _ => {}
        }
        None
    }

    /// The run's session ended for good: forget it, fail its publishes.
    fn session_gone(&mut self, run: &str, superseded: bool) {
        let Some(i) = self.run_index(run) else {
            return;
        };
        self.runs.remove(i);
        if self.runs.is_empty() {
            self.heartbeat_due = None;
            self.heartbeat_every = None;
        }
        let error = if superseded {
            ClientError::NoSession(format!("{run} (taken over by another connection)"))
        } else {
            ClientError::NoSession(format!("{run} (its lease expired)"))
        };
        self.outbox.retain_mut(|p| {
            if p.run != run {
                return true;
            }
            if let Some(reply) = p.reply.take() {
                let _ = reply.send(Err(error.clone()));
            }
            false
        });
        self.follows.remove(run);
        let event = if superseded {
            ClientEvent::SessionSuperseded {
                run_id: run.to_owned(),
            }
        } else {
            ClientEvent::SessionExpired {
                run_id: run.to_owned(),
            }
        };
        let _ = self.events.send(event);
    }

    /// The run ended: forget it quietly (no reattach, no heartbeats); its
    /// unacknowledged publishes, if any, fail.
    fn run_ended(&mut self, run: &str) {
        let Some(i) = self.run_index(run) else {
            return;
        };
        self.runs.remove(i);
        if self.runs.is_empty() {
            self.heartbeat_due = None;
            self.heartbeat_every = None;
        }
        let error = ClientError::NoSession(format!("{run} (the run ended)"));
        self.outbox.retain_mut(|p| {
            if p.run != run {
                return true;
            }
            if let Some(reply) = p.reply.take() {
                let _ = reply.send(Err(error.clone()));
            }
            false
        });
        let _ = self.events.send(ClientEvent::RunEnded {
            run_id: run.to_owned(),
        });
    }

    /// Every run's session ended (the main one could not be restored).
    fn all_sessions_gone(&mut self, superseded: bool) {
        let all: Vec<String> = self.runs.iter().map(|r| r.run_id.clone()).collect();
        for run in all {
            self.session_gone(&run, superseded);
        }
    }

    /// The socket is gone: answer what cannot be resent, keep the rest.
    fn lost(&mut self) {
        if self.socket.take().is_none() {
            return;
        }
        let _ = self.events.send(ClientEvent::Disconnected);
        let _ = self
            .state
            .send(ConnectionState::Reconnecting { attempt: 0 });
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Call(reply) => {
                    let _ = reply.send(Err(ClientError::ConnectionLost));
                }
                Pending::Attach {
                    run,
                    capabilities,
                    attempt_id,
                    reply,
                    ..
                } => self.waiting.push_back(Op::Attach {
                    run,
                    capabilities,
                    attempt_id,
                    reply,
                }),
                // Publishes stay in the outbox; heartbeats and resumes are
                // sent again anyway.
                Pending::Publish | Pending::Heartbeat | Pending::Resume { .. } => {}
            }
        }
        for p in &mut self.outbox {
            p.id = None;
        }
    }

    /// Reconnects (with backoff) and restores every session; false if the
    /// client was closed meanwhile or the gateway refuses the token.
    async fn reconnect(&mut self) -> bool {
        let mut attempt = 0u32;
        loop {
            let mut wake = Instant::now() + self.options.backoff.delay(attempt);
            if let Some(t) = self.reconnect_not_before.take() {
                wake = wake.max(t);
            }
            let _ = self.state.send(ConnectionState::Reconnecting { attempt });
            // Keep taking operations while waiting, so callers are not stuck
            // behind the backoff and a close is honoured at once.
            loop {
                tokio::select! {
                    _ = sleep_until(wake) => break,
                    op = self.ops.recv() => match op {
                        None => return false,
                        Some(Op::Close { reply }) => {
                            self.closing = Some(reply);
                            return false;
                        }
                        Some(op) => self.handle_op(op).await,
                    },
                }
            }
            match link::connect(
                &self.options.url,
                &token::for_connection(&self.options.token, self.options.token_source.as_ref()),
                self.options.connect_timeout,
            )
            .await
            {
                Ok(socket) => {
                    self.socket = Some(socket);
                    self.last_heard = Instant::now();
                    self.epoch += 1;
                    if self.restore().await {
                        let _ = self
                            .state
                            .send(ConnectionState::Connected { epoch: self.epoch });
                        let _ = self
                            .events
                            .send(ClientEvent::Reconnected { epoch: self.epoch });
                        return true;
                    }
                    self.socket = None;
                }
                Err(e) if link::is_refusal(&e) => {
                    tracing::warn!(error = %e, "the gateway refuses this client's token; giving up");
                    return false;
                }
                Err(e) => tracing::debug!(error = %e, attempt, "reconnect failed"),
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// On a fresh socket: main run, sub-runs, unacknowledged publishes,
    /// followed streams, then the operations that waited. False if the
    /// socket failed meanwhile.
    async fn restore(&mut self) -> bool {
        if !self.runs.is_empty() && !self.restore_sessions().await {
            return false;
        }
        for i in 0..self.outbox.len() {
            self.send_publication(i).await;
        }
        let followed: Vec<String> = self.follows.keys().cloned().collect();
        for run in followed {
            self.send_resume(&run).await;
        }
        if self.runs.is_empty() {
            self.heartbeat_due = None;
        } else {
            self.heartbeat_due = Some(Instant::now() + self.heartbeat_interval());
        }
        while let Some(op) = self.waiting.pop_front() {
            if self.socket.is_none() {
                self.waiting.push_front(op);
                return false;
            }
            self.handle_op(op).await;
        }
        self.socket.is_some()
    }

    /// Re-attaches the main run at the new epoch and moves the sub-runs.
    async fn restore_sessions(&mut self) -> bool {
        let main = &self.runs[0];
        let payload = self.attach_payload(
            &main.run_id,
            &main.capabilities,
            main.attempt_id.as_deref(),
            true,
        );
        let main_run = main.run_id.clone();
        match self.exchange("runtime.attach", payload).await {
            None => return false,
            Some(Err(e)) if e.code() == Some(ErrorCode::SessionExpired) => {
                match self.renew(0).await {
                    None => return false,
                    Some(true) => {}
                    Some(false) => {
                        self.all_sessions_gone(false);
                        return true;
                    }
                }
            }
            // Draining, rate limited, a storage hiccup: try again later on
            // another socket, keeping every session.
            Some(Err(e)) if e.is_retryable() => {
                tracing::info!(run = %main_run, error = %e, "reattach refused for now; retrying");
                return false;
            }
            Some(Err(e)) => {
                tracing::warn!(run = %main_run, error = %e, "main run could not be reattached");
                // Without the main session its sub-runs cannot move either.
                self.all_sessions_gone(e.code() == Some(ErrorCode::StaleEpoch));
                return true;
            }
            Some(Ok(_)) => {}
        }
        loop {
            let subs: Vec<String> = self.runs[1..].iter().map(|r| r.run_id.clone()).collect();
            if subs.is_empty() {
                return true;
            }
            let payload = json!({
                "sessionId": self.runs[0].session_id,
                "mainRunId": main_run,
                "subRunIds": subs,
                "connectionEpoch": self.epoch,
            });
            match self.exchange("runtime.recoverConnections", payload).await {
                None => return false,
                Some(Ok(_)) => return true,
                Some(Err(e)) if e.is_retryable() => return false,
                Some(Err(e)) => {
                    // All or nothing: drop the sub-run the gateway named and
                    // try the rest; without a name, none can move.
                    match e.run_id() {
                        Some(run) if subs.contains(&run) => {
                            let expired = e.code() == Some(ErrorCode::SessionExpired);
                            let renewed = match self.run_index(&run) {
                                Some(i) if expired => match self.renew(i).await {
                                    None => return false,
                                    Some(ok) => ok,
                                },
                                _ => false,
                            };
                            if !renewed {
                                self.session_gone(&run, false);
                            }
                        }
                        _ => {
                            for run in subs {
                                self.session_gone(&run, false);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Attaches run `i` afresh after the gateway forgot its session; its
    /// unacknowledged publishes move to the new session. `Some(false)` if
    /// the gateway refuses (another instance holds the run now, say);
    /// `None` if the socket failed.
    async fn renew(&mut self, i: usize) -> Option<bool> {
        let run = &self.runs[i];
        let payload = self.attach_payload(
            &run.run_id,
            &run.capabilities,
            run.attempt_id.as_deref(),
            false,
        );
        let run_id = run.run_id.clone();
        match self.exchange("runtime.attach", payload).await? {
            Ok(reply) => {
                let Some(session_id) = reply["sessionId"].as_str().map(str::to_owned) else {
                    return Some(false);
                };
                self.runs[i].session_id = session_id.clone();
                self.runs[i].attached.session_id = session_id.clone();
                for p in self.outbox.iter_mut().filter(|p| p.run == run_id) {
                    p.payload["sessionId"] = json!(session_id);
                }
                tracing::info!(run = %run_id, "session renewed after the gateway forgot it");
                let _ = self
                    .events
                    .send(ClientEvent::SessionRenewed { run_id, session_id });
                Some(true)
            }
            Err(e) => {
                tracing::warn!(run = %run_id, error = %e, "could not attach the run afresh");
                Some(false)
            }
        }
    }

    /// Sends one request and reads until its answer, handling pushes on
    /// the way. `None` if the socket failed.
    async fn exchange(&mut self, kind: &str, payload: Value) -> Option<Result<Value>> {
        let id = self.next_id();
        let socket = self.socket.as_mut()?;
        if !link::send(socket, link::request(&id, kind, &payload)).await {
            return None;
        }
        let deadline = Instant::now() + self.options.request_timeout;
        loop {
            let socket = self.socket.as_mut()?;
            let frame = tokio::time::timeout_at(deadline, link::next(socket))
                .await
                .ok()??;
            self.last_heard = Instant::now();
            match frame {
                Incoming::Reply { id: got, payload } if got == id => {
                    return Some(Ok(
                        serde_json::from_str(payload.get()).unwrap_or(Value::Null)
                    ));
                }
                Incoming::Error {
                    id: Some(got),
                    error,
                } if got == id => return Some(Err(error)),
                // A stream to resume again will be, with the others.
                Incoming::Push { kind, payload } => {
                    self.pushed(&kind, payload.get());
                }
                _ => {}
            }
        }
    }

    /// The client is closing: answer everyone still waiting.
    async fn shut_down(&mut self) {
        let _ = self.state.send(ConnectionState::Closed);
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Call(reply) => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                Pending::Attach { reply, .. } => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                _ => {}
            }
        }
        for p in &mut self.outbox {
            if let Some(reply) = p.reply.take() {
                let _ = reply.send(Err(ClientError::Closed));
            }
        }
        if let Some(mut socket) = self.socket.take() {
            let _ = socket.close(None).await;
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// The first `connectionEpoch`: the wall clock in milliseconds, so a
/// restarted process of the same runtime instance starts above every epoch
/// its predecessor used (each reconnect adds one, and no process reconnects
/// more than once a millisecond) and can take its sessions over, fencing
/// the predecessor off if it is still alive.
fn initial_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

/// A starting `seq` above any this runtime used for the run before: the
/// wall clock in microseconds. A restarted runtime continues above its
/// predecessor as long as it published, on average, fewer than a million
/// events per second since then.
fn initial_seq() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}
