//! The baseline: the least a server can do to answer the same load, so
//! every gateway figure has a ratio beside it (`rungate baseline`).
//!
//! A bare tokio-tungstenite server. It checks no token, keeps no session
//! and validates nothing beyond reading the envelope (and the run id that
//! an attach or resume reply names); it answers every request with the
//! protocol crate's typed reply, of the gateway's shape and size (the
//! request's id, a 32-hex `sessionId`, a fixed timestamp, …). What it does do is what any server of this protocol
//! must: parse each request's envelope, split a publish into its events,
//! give them offsets, build the `stream.events` frame once (the gateway's
//! exact layout) and hand the same bytes to every viewer of the run, keep
//! the last `--stream-max-events` events for replay, and write through a
//! bounded queue per socket, several frames per flush. Each subscription
//! is a `tokio::sync::broadcast` receiver plus a task; a receiver that
//! lags gets a `stream.gap`.
//!
//! Differences that favour the baseline, and so count against the
//! gateway in the ratios: no authentication or schema checks, no leases,
//! no metrics, no logging, no `seq` de-duplication, no byte budget;
//! WebSocket handshakes by tungstenite directly, not through hyper.
//! Resume at an offset inside a batch starts at that batch's first event.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{message, text};
use rungate_protocol::commands::{
    Accepted, HeartbeatResponse, RuntimeAttachResponse, StreamResumeResponse,
};
use rungate_protocol::envelope;
use rungate_protocol::ids::{RunId, SessionId, StreamEpoch};
use rungate_protocol::stream_frame::{FrameBuilder, gap_frame};
use rungate_protocol::time::Timestamp;
use rungate_protocol::{CommandError, ErrorCode};

/// `rungate baseline` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "baseline")]
pub struct BaselineArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub listen: SocketAddr,
    /// heartbeatIntervalMs told to runtimes in attach replies
    #[arg(long, default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,
    /// Events kept per run for replay
    #[arg(long, default_value_t = 10_000)]
    pub stream_max_events: usize,
    /// Frames queued per socket
    #[arg(long, default_value_t = 1024)]
    pub outbound_queue: usize,
}

impl BaselineArgs {
    /// Defaults, listening on `listen`.
    pub fn on(listen: SocketAddr) -> BaselineArgs {
        use clap::Parser;
        let mut a = BaselineArgs::parse_from(["baseline"]);
        a.listen = listen;
        a
    }
}

/// Frames a subscription may fall behind before it gets a gap.
const LAG_FRAMES: usize = 1024;
/// Most frames the writer hands to the socket before one flush (as the
/// gateway).
const WRITE_BATCH: usize = 64;
/// A fixed timestamp (2026-11-28T00:00:00.000Z, the gateway's length), in
/// every reply that has one.
const TIMESTAMP_MS: u64 = 1_795_824_000_000;

/// One stored batch: offsets `first..=last` and its frame.
#[derive(Clone)]
struct Batch {
    first: u64,
    last: u64,
    frame: Utf8Bytes,
}

struct Ring {
    next: u64,
    batches: VecDeque<Batch>,
    events: usize,
}

struct RunStream {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Batch>,
}

struct Hub {
    runs: Mutex<HashMap<String, Arc<RunStream>>>,
    epoch: StreamEpoch,
    sessions: AtomicU64,
    args: BaselineArgs,
}

impl Hub {
    fn run(&self, run: &str) -> Arc<RunStream> {
        self.runs
            .lock()
            .entry(run.to_owned())
            .or_insert_with(|| {
                Arc::new(RunStream {
                    ring: Mutex::new(Ring {
                        next: 0,
                        batches: VecDeque::new(),
                        events: 0,
                    }),
                    tx: broadcast::channel(LAG_FRAMES).0,
                })
            })
            .clone()
    }

    /// Appends `events` to `run`, builds the frame once, hands it to every
    /// subscriber.
    fn publish(&self, run: &str, events: &[&RawValue]) {
        if events.is_empty() {
            return;
        }
        let stream = self.run(run);
        let mut ring = stream.ring.lock();
        let first = ring.next;
        let json_bytes: usize = events.iter().map(|e| e.get().len()).sum();
        let mut frame =
            FrameBuilder::new(run, self.epoch.as_str(), first, events.len(), json_bytes);
        for e in events {
            frame.push(e.get().as_bytes());
        }
        let batch = Batch {
            first,
            last: first + events.len() as u64 - 1,
            frame: text(frame.finish()),
        };
        ring.next = batch.last + 1;
        ring.events += events.len();
        ring.batches.push_back(batch.clone());
        while ring.events > self.args.stream_max_events && ring.batches.len() > 1 {
            if let Some(old) = ring.batches.pop_front() {
                ring.events -= (old.last - old.first + 1) as usize;
            }
        }
        // Under the ring's lock, so a resume sees each batch exactly once:
        // in its snapshot or from its receiver.
        let _ = stream.tx.send(batch);
    }

    /// The replay from `from` (`None`: live), a receiver for what comes
    /// after, and the reply's (first, next, start, truncated).
    fn subscribe(
        &self,
        run: &str,
        from: Option<u64>,
    ) -> (Vec<Batch>, broadcast::Receiver<Batch>, [u64; 3], bool) {
        let stream = self.run(run);
        let ring = stream.ring.lock();
        let first = ring.batches.front().map_or(ring.next, |b| b.first);
        let next = ring.next;
        let (replay, start, truncated) = match from {
            None => (Vec::new(), next, false),
            Some(o) => {
                let replay: Vec<Batch> = ring
                    .batches
                    .iter()
                    .filter(|b| b.last >= o)
                    .cloned()
                    .collect();
                let start = replay.first().map_or(next, |b| b.first);
                (replay, start, o < first)
            }
        };
        (
            replay,
            stream.tx.subscribe(),
            [first, next, start],
            truncated,
        )
    }
}

/// A running baseline server.
pub struct Baseline {
    local_addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    accept: JoinHandle<()>,
}

impl Baseline {
    /// Binds `args.listen` and serves until [`Baseline::stop`].
    pub async fn start(args: BaselineArgs) -> io::Result<Baseline> {
        let listener = TcpListener::bind(args.listen).await?;
        let local_addr = listener.local_addr()?;
        let hub = Arc::new(Hub {
            runs: Mutex::new(HashMap::new()),
            epoch: StreamEpoch::new(format!(
                "{:032x}",
                std::process::id() as u128 * 0x9e37_79b9_7f4a_7c15
            ))
            .unwrap_or_else(|_| StreamEpoch::generate()),
            sessions: AtomicU64::new(0),
            args,
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(listener, hub, stop.clone(), tasks.clone()));
        Ok(Baseline {
            local_addr,
            stop,
            tasks,
            accept,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every socket.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.accept.await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    hub: Arc<Hub>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(serve(hub.clone(), stream, stop.child_token(), tasks.clone()));
                }
                // Out of descriptors, say: wait a little rather than spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }
}

/// The gateway's per-socket WebSocket settings.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

async fn serve(hub: Arc<Hub>, stream: TcpStream, done: CancellationToken, tasks: TaskTracker) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    let (sink, mut incoming) = ws.split();
    let (queue, rx) = mpsc::channel(hub.args.outbound_queue.max(1));
    let writer = tokio::spawn(write_loop(sink, rx));
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            message = incoming.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if !answer(&hub, &queue, &done, &tasks, text.as_str()).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    }
    done.cancel();
    drop(queue);
    let _ = writer.await;
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunPayload<'a> {
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    #[serde(default)]
    from_offset: Option<u64>,
}

/// The run a request names, as the reply types it; `None` if it names
/// none the protocol allows.
fn run_of(payload: &RawValue) -> Option<RunId> {
    let p = serde_json::from_str::<RunPayload>(payload.get()).ok()?;
    RunId::new(p.run_id.as_ref()).ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishPayload<'a> {
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

fn reply(id: &str, payload: &impl serde::Serialize) -> Message {
    message(envelope::encode_reply(id, payload).into_bytes())
}

fn error(code: ErrorCode) -> Message {
    let error = CommandError::new(code, "baseline: unreadable request");
    message(envelope::encode_error(None, &error).into_bytes())
}

/// Answers one request; `false` once the writer is gone.
async fn answer(
    hub: &Arc<Hub>,
    queue: &mpsc::Sender<Message>,
    done: &CancellationToken,
    tasks: &TaskTracker,
    text: &str,
) -> bool {
    let Ok(req) = rungate_protocol::decode(text) else {
        return queue.send(error(ErrorCode::BadFrame)).await.is_ok();
    };
    let id = req.id.as_str();
    let out = match req.kind.as_ref() {
        "runtime.attach" => match run_of(req.payload) {
            Some(run_id) => {
                let n = hub.sessions.fetch_add(1, Ordering::Relaxed);
                let session_id =
                    SessionId::new(format!("{n:032x}")).unwrap_or_else(|_| SessionId::generate());
                reply(
                    id,
                    &RuntimeAttachResponse {
                        session_id,
                        run_id,
                        heartbeat_interval_ms: hub.args.heartbeat_interval_ms,
                        lease_expires_at: Timestamp::from_unix_millis(TIMESTAMP_MS),
                        config_version: Some(format!("{:016x}", 0xcbf2_9ce4_8422_2325u64)),
                    },
                )
            }
            None => error(ErrorCode::InvalidPayload),
        },
        "runtime.heartbeat" => reply(
            id,
            &HeartbeatResponse {
                accepted: true,
                next_heartbeat_due_at: Timestamp::from_unix_millis(TIMESTAMP_MS),
            },
        ),
        "events.publish" => match serde_json::from_str::<PublishPayload>(req.payload.get()) {
            Ok(p) => {
                hub.publish(&p.run_id, &p.events);
                reply(id, &Accepted::YES)
            }
            Err(_) => error(ErrorCode::InvalidPayload),
        },
        "stream.resume" => match serde_json::from_str::<RunPayload>(req.payload.get()) {
            Ok(p) => {
                let Ok(run_id) = RunId::new(p.run_id.as_ref()) else {
                    return queue.send(error(ErrorCode::InvalidPayload)).await.is_ok();
                };
                let (replay, rx, [first, next, start], truncated) =
                    hub.subscribe(&p.run_id, p.from_offset);
                let answer = reply(
                    id,
                    &StreamResumeResponse {
                        run_id,
                        stream_epoch: hub.epoch.clone(),
                        first_offset: first,
                        next_offset: next,
                        start_offset: start,
                        truncated,
                        // Runs never end here.
                        ended: false,
                    },
                );
                if queue.send(answer).await.is_err() {
                    return false;
                }
                tasks.spawn(follow(
                    p.run_id.into_owned(),
                    hub.epoch.to_string(),
                    replay,
                    rx,
                    queue.clone(),
                    done.clone(),
                ));
                return true;
            }
            Err(_) => error(ErrorCode::InvalidPayload),
        },
        _ => reply(id, &Accepted::YES),
    };
    queue.send(out).await.is_ok()
}

/// One subscription: the replay, then live batches; a `stream.gap` when
/// the receiver lagged.
async fn follow(
    run: String,
    epoch: String,
    replay: Vec<Batch>,
    mut rx: broadcast::Receiver<Batch>,
    queue: mpsc::Sender<Message>,
    done: CancellationToken,
) {
    let mut next = replay.first().map(|b| b.first);
    for b in replay {
        next = Some(b.last + 1);
        if queue.send(Message::Text(b.frame)).await.is_err() {
            return;
        }
    }
    loop {
        let batch = tokio::select! {
            _ = done.cancelled() => return,
            got = rx.recv() => match got {
                Ok(b) => b,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(n) = next.filter(|n| batch.first > *n) {
            let gap = text(gap_frame(&run, &epoch, n, batch.first - 1));
            if queue.send(Message::Text(gap)).await.is_err() {
                return;
            }
        }
        next = Some(batch.last + 1);
        if queue.send(Message::Text(batch.frame)).await.is_err() {
            return;
        }
    }
}

/// Writes queued messages, up to [`WRITE_BATCH`] per flush.
async fn write_loop(mut sink: Sink, mut rx: mpsc::Receiver<Message>) {
    while let Some(first) = rx.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        let mut fed = 1;
        while fed < WRITE_BATCH {
            let Ok(m) = rx.try_recv() else { break };
            if sink.feed(m).await.is_err() {
                return;
            }
            fed += 1;
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
