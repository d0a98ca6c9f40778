//! The connection driver: the task that owns a [`super::RuntimeClient`]'s
//! socket and every piece of its state, takes the handles' operations,
//! sends their typed requests, and routes what the gateway sends back
//! (replies by request id, pushes by type).
//!
//! Reconnecting and restoring the sessions on a new socket is
//! [`restore`]'s. Must not wait on a caller (it also heartbeats): answers
//! go out on oneshot or unbounded channels.

mod restore;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use super::client::Attached;
use super::events::{CancelRequest, ClientEvent, ConnectionState};
use super::follows::Follows;
use super::heartbeat::{Heartbeats, Silence};
use super::op::Op;
use super::options::RuntimeOptions;
use super::outbox::Outbox;
use super::runs::{AttachSpec, Runs};
use crate::ClientError;
use crate::link::{self, Incoming, Socket};
use rungate_protocol::commands::{
    HeartbeatCommand, PublishOutputEventsRequest, RuntimeAttachRequest, StreamResumeCommand,
};
use rungate_protocol::ids::OpaqueId;
use rungate_protocol::push::{self, Push};
use rungate_protocol::{ErrorCode, Frame, envelope};

type Result<T> = std::result::Result<T, ClientError>;

/// A request sent and not answered yet: what to do with its answer.
enum Pending {
    /// An attach of a run this client does not hold yet. `take_over`: sent
    /// with `reconnect: true`, after a fresh attach met `CONFLICT` (the run
    /// is held by this instance's predecessor, or by this client's own
    /// earlier send whose answer was lost). `tries` bounds the back and
    /// forth between the two.
    Attach {
        spec: AttachSpec,
        reply: oneshot::Sender<Result<Attached>>,
        take_over: bool,
        tries: u8,
    },
    Call(oneshot::Sender<Result<Box<RawValue>>>),
    /// A publish: the outbox knows which by the request id.
    Publish,
    Heartbeat,
    Resume {
        run: String,
    },
}

/// Why a run's session ended for good.
#[derive(Clone, Copy)]
enum SessionEnd {
    /// Its lease ran out.
    Expired,
    /// Another connection took it over with a higher epoch.
    Superseded,
    /// The run ended.
    RunEnded,
}

pub(super) struct Driver {
    options: RuntimeOptions,
    /// `runtimeInstanceId`, typed once at connect.
    instance: OpaqueId,
    ops: mpsc::Receiver<Op>,
    state: watch::Sender<ConnectionState>,
    events: broadcast::Sender<ClientEvent>,
    cancels: broadcast::Sender<CancelRequest>,
    socket: Option<Socket>,
    epoch: u64,
    next_id: u64,
    runs: Runs,
    pending: HashMap<String, Pending>,
    outbox: Outbox,
    /// Operations that arrived while the socket was down.
    waiting: VecDeque<Op>,
    follows: Follows,
    /// After `gateway.draining`: do not reconnect before this.
    reconnect_not_before: Option<Instant>,
    heartbeats: Heartbeats,
    silence: Silence,
    /// A `close()` waiting for the shutdown to finish.
    closing: Option<oneshot::Sender<()>>,
}

impl Driver {
    /// Starts the driver on a connected `socket`; answers the connection
    /// state it keeps.
    pub(super) fn spawn(
        options: RuntimeOptions,
        instance: OpaqueId,
        socket: Socket,
        ops: mpsc::Receiver<Op>,
        events: broadcast::Sender<ClientEvent>,
        cancels: broadcast::Sender<CancelRequest>,
    ) -> watch::Receiver<ConnectionState> {
        let epoch = initial_epoch();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connected { epoch });
        let driver = Driver {
            options,
            instance,
            ops,
            state: state_tx,
            events,
            cancels,
            socket: Some(socket),
            epoch,
            next_id: 0,
            runs: Runs::default(),
            pending: HashMap::new(),
            outbox: Outbox::default(),
            waiting: VecDeque::new(),
            follows: Follows::default(),
            reconnect_not_before: None,
            heartbeats: Heartbeats::default(),
            silence: Silence::new(),
            closing: None,
        };
        tokio::spawn(driver.run());
        state_rx
    }

    async fn run(mut self) {
        loop {
            if self.socket.is_none() && !self.reconnect().await {
                break;
            }
            let heartbeat = self.heartbeats.due();
            let silence = self.silence_deadline();
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
                        self.silence.heard();
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

    /// Sends request `id` (already in `pending`); on a dead socket, marks
    /// the connection lost (the pending entry is then failed or kept by
    /// [`Driver::lost`]).
    async fn send(&mut self, id: &str, frame: Frame) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        if self.pending.len() == 1 && self.pending.contains_key(id) {
            self.silence.owed();
        }
        if !link::send(socket, link::message(frame)).await {
            self.lost();
        }
    }

    /// When to give up a socket that has delivered nothing while answers
    /// are owed: twice the heartbeat interval, and never sooner than the
    /// request timeout.
    fn silence_deadline(&self) -> Option<Instant> {
        let patience = self
            .options
            .request_timeout
            .max(self.heartbeats.interval() * 2);
        self.silence.deadline(!self.pending.is_empty(), patience)
    }

    async fn handle_op(&mut self, op: Op) {
        if self.socket.is_none() {
            // Publishes join the outbox in order now; the rest wait.
            match op {
                Op::Publish { run, events, reply } => {
                    self.enqueue_publish(&run, &events, reply);
                }
                op => self.waiting.push_back(op),
            }
            return;
        }
        match op {
            Op::Attach { spec, reply } => {
                // Already held here (an earlier attach whose answer came
                // after its caller gave up, say): the same session.
                if let Some(run) = self.runs.get(spec.run_id.as_str()) {
                    let _ = reply.send(Ok(run.attached.clone()));
                    return;
                }
                self.send_attach(spec, reply, false, 0).await
            }
            Op::Ended { run } => self.session_ended(&run, SessionEnd::RunEnded),
            Op::Call { run, encode, reply } => {
                let Some(r) = self.runs.get(&run) else {
                    let _ = reply.send(Err(ClientError::NoSession(run)));
                    return;
                };
                let (session_id, run_id) = (r.session_id.clone(), r.spec.run_id.clone());
                let id = self.next_id();
                self.pending.insert(id.clone(), Pending::Call(reply));
                let frame = encode(&id, session_id, run_id);
                self.send(&id, frame).await;
            }
            Op::Publish { run, events, reply } => {
                if let Some(index) = self.enqueue_publish(&run, &events, reply) {
                    self.send_publication(index).await;
                }
            }
            Op::Follow {
                run,
                from_offset,
                items,
                reply,
            } => {
                if self.runs.get(&run).is_none() {
                    let _ = reply.send(Err(ClientError::NoSession(run)));
                    return;
                }
                self.follows.start(run.clone(), from_offset, items);
                let _ = reply.send(Ok(()));
                self.send_resume(&run).await;
            }
            Op::Close { reply } => {
                // Handled in the loop; kept for completeness.
                let _ = reply.send(());
            }
        }
    }

    /// The `runtime.attach` for `spec` at the current epoch.
    fn attach_request(&self, spec: &AttachSpec, reconnect: bool) -> RuntimeAttachRequest {
        spec.request(&self.instance, self.epoch, reconnect)
    }

    async fn send_attach(
        &mut self,
        spec: AttachSpec,
        reply: oneshot::Sender<Result<Attached>>,
        take_over: bool,
        tries: u8,
    ) {
        let id = self.next_id();
        let frame = envelope::encode_command(&id, &self.attach_request(&spec, take_over));
        self.pending.insert(
            id.clone(),
            Pending::Attach {
                spec,
                reply,
                take_over,
                tries,
            },
        );
        self.send(&id, frame).await;
    }

    /// Adds a publish to the outbox (numbering its events); its index, or
    /// `None` if it cannot be sent (the caller is answered at once).
    fn enqueue_publish(
        &mut self,
        run: &str,
        events: &[super::client::Event],
        reply: oneshot::Sender<Result<()>>,
    ) -> Option<usize> {
        match self.runs.publication(run, events) {
            Ok(request) => Some(self.outbox.push(request, reply)),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }

    async fn send_publication(&mut self, index: usize) {
        let id = self.next_id();
        self.pending.insert(id.clone(), Pending::Publish);
        let frame = envelope::encode_command(&id, self.outbox.sending(index, id.clone()));
        self.send(&id, frame).await;
    }

    async fn send_resume(&mut self, run: &str) {
        let Some(request) = self
            .runs
            .get(run)
            .and_then(|r| self.follows.resume_request(r))
        else {
            return;
        };
        self.send_new(
            Pending::Resume {
                run: run.to_owned(),
            },
            &request,
        )
        .await;
    }

    /// Sends `request` under a fresh id, its answer going to `pending`.
    async fn send_new<C: rungate_protocol::CommandPayload>(
        &mut self,
        pending: Pending,
        request: &C,
    ) {
        let id = self.next_id();
        self.pending.insert(id.clone(), pending);
        self.send(&id, envelope::encode_command(&id, request)).await;
    }

    async fn send_heartbeats(&mut self) {
        let beats: Vec<HeartbeatCommand> = self
            .runs
            .all()
            .map(|r| HeartbeatCommand {
                session_id: r.session_id.clone(),
                run_id: r.spec.run_id.clone(),
                runtime_instance_id: None,
                metadata: None,
            })
            .collect();
        for beat in beats {
            self.send_new(Pending::Heartbeat, &beat).await;
        }
        self.heartbeats.sent();
    }

    async fn handle_frame(&mut self, frame: Incoming) {
        match frame {
            Incoming::Reply { id, payload } => {
                if let Some(pending) = self.pending.remove(&id) {
                    self.answered(&id, pending, Ok(payload)).await;
                }
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
                if let Some(run) = self.pushed(&kind, &payload) {
                    self.send_resume(&run).await;
                }
            }
        }
    }

    async fn answered(&mut self, id: &str, pending: Pending, result: Result<Box<RawValue>>) {
        match pending {
            Pending::Call(reply) => {
                if let Err(e) = &result {
                    self.note_session_error(e, None);
                }
                let _ = reply.send(result);
            }
            Pending::Heartbeat => {
                if let Err(e) = result.and_then(|r| link::reply::<HeartbeatCommand>(&r)) {
                    tracing::debug!(error = %e, "heartbeat refused");
                    self.note_session_error(&e, None);
                }
            }
            Pending::Publish => {
                let Some(publication) = self.outbox.answered(id) else {
                    return;
                };
                let result = result
                    .and_then(|r| link::reply::<PublishOutputEventsRequest>(&r))
                    .map(drop);
                if let Err(e) = &result {
                    let run = publication.run_id().to_string();
                    self.note_session_error(e, Some(&run));
                }
                publication.answer(result);
            }
            Pending::Resume { run } => {
                match result.and_then(|r| link::reply::<StreamResumeCommand>(&r)) {
                    Ok(info) => self.follows.resumed(&run, info),
                    Err(e) => {
                        tracing::warn!(run = %run, error = %e, "stream.resume refused");
                        self.follows.stop(&run);
                    }
                }
            }
            Pending::Attach {
                spec,
                reply,
                take_over,
                tries,
            } => match result.and_then(|r| link::reply::<RuntimeAttachRequest>(&r)) {
                Ok(answer) => {
                    let attached = self.runs.attached(spec, &answer);
                    self.heartbeats.attached(attached.heartbeat_interval);
                    let _ = reply.send(Ok(attached));
                }
                // Held by this instance already (a restarted process of the
                // same worker, or our own lost send): take it over; this
                // client's epoch is above any its predecessors used. Another
                // instance holding the run gets CONFLICT again, as it should.
                Err(e) if !take_over && tries < 2 && e.code() == Some(ErrorCode::Conflict) => {
                    self.send_attach(spec, reply, true, tries + 1).await;
                }
                // Nothing to take over after all: attach afresh.
                Err(e) if take_over && tries < 2 && e.code() == Some(ErrorCode::SessionExpired) => {
                    self.send_attach(spec, reply, false, tries + 1).await;
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
            ErrorCode::SessionExpired => self.session_ended(&run, SessionEnd::Expired),
            ErrorCode::StaleEpoch => self.session_ended(&run, SessionEnd::Superseded),
            ErrorCode::RunEnded => self.session_ended(&run, SessionEnd::RunEnded),
            _ => {}
        }
    }

    /// Handles a push; answers a run whose stream must be resumed again.
    fn pushed(&mut self, kind: &str, payload: &RawValue) -> Option<String> {
        let push = match link::push(kind, payload) {
            Ok(push) => push,
            Err(bad) => {
                tracing::warn!(error = %bad.error, "the gateway sent a push the protocol does not allow");
                let stream_push = push::STREAM_PUSHES.contains(&kind);
                if kind == push::GATEWAY_DRAINING {
                    // That the gateway is going away is in the type.
                    self.draining(None);
                } else if let Some(run) = bad.run.filter(|_| stream_push) {
                    // Its follower can no longer trust what it was given.
                    self.follows.malformed(&run, bad.error);
                }
                return None;
            }
        };
        match push {
            Push::SessionExpired(p) => self.session_ended(p.run_id.as_str(), SessionEnd::Expired),
            Push::SessionSuperseded(p) => {
                self.session_ended(p.run_id.as_str(), SessionEnd::Superseded)
            }
            Push::GatewayDraining(p) => self.draining(Some(p.reconnect_after_ms)),
            Push::StreamEvents(_)
            | Push::StreamGap(_)
            | Push::StreamClosed(_)
            | Push::StreamEnded(_) => return self.follows.pushed(push),
            Push::RunCancelRequested(p) => {
                let _ = self.cancels.send(CancelRequest::from(p));
            }
            Push::Unknown { .. } => {}
        }
        None
    }

    /// `gateway.draining`: reconnect no sooner than it asked.
    fn draining(&mut self, reconnect_after_ms: Option<u64>) {
        let after = crate::backoff::after_draining(reconnect_after_ms);
        self.reconnect_not_before = Some(Instant::now() + after);
        let _ = self.events.send(ClientEvent::Draining {
            reconnect_after: after,
        });
    }

    /// The run's session ended for good: forget the run (no reattach, no
    /// heartbeats) and fail its unacknowledged publishes. A run that ended
    /// keeps its followed stream, which `stream.ended` closes after the
    /// last event.
    fn session_ended(&mut self, run: &str, end: SessionEnd) {
        if self.runs.remove(run).is_none() {
            return;
        }
        if self.runs.is_empty() {
            self.heartbeats.stop();
        }
        let run_id = run.to_owned();
        let (why, event) = match end {
            SessionEnd::Expired => ("its lease expired", ClientEvent::SessionExpired { run_id }),
            SessionEnd::Superseded => (
                "taken over by another connection",
                ClientEvent::SessionSuperseded { run_id },
            ),
            SessionEnd::RunEnded => ("the run ended", ClientEvent::RunEnded { run_id }),
        };
        self.outbox
            .fail_run(run, &ClientError::NoSession(format!("{run} ({why})")));
        if !matches!(end, SessionEnd::RunEnded) {
            self.follows.stop(run);
        }
        let _ = self.events.send(event);
    }

    /// Every run's session ended (the main one could not be restored).
    fn all_sessions_ended(&mut self, end: SessionEnd) {
        let all: Vec<String> = self.runs.all().map(|r| r.spec.run_id.to_string()).collect();
        for run in all {
            self.session_ended(&run, end);
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
        self.outbox.fail_all(&ClientError::Closed);
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
