//! Losing a socket and restoring everything on the next one: reconnecting
//! with backoff, attaching the main run again at a higher epoch, moving the
//! sub-runs, attaching afresh a run whose session the gateway forgot (its
//! unacknowledged publishes move to the new session), then resending the
//! outbox, resuming followed streams and running the operations that
//! waited.
//!
//! Owns the order of a restore. Must not fail a publish for a lost socket:
//! only a session that is gone for good fails its publishes.

use tokio::time::{Instant, sleep_until};

use super::{Driver, Pending, Result, SessionEnd};
use crate::link::{self, Incoming};
use crate::runtime::events::{ClientEvent, ConnectionState};
use crate::runtime::op::Op;
use crate::{ClientError, token};
use rungate_protocol::CommandPayload;
use rungate_protocol::ErrorCode;
use rungate_protocol::commands::RecoverConnectionsCommand;

impl Driver {
    /// The socket is gone: answer what cannot be resent, keep the rest.
    pub(super) fn lost(&mut self) {
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
                Pending::Attach { spec, reply, .. } => {
                    self.waiting.push_back(Op::Attach { spec, reply })
                }
                // Publishes stay in the outbox; heartbeats and resumes are
                // sent again anyway.
                Pending::Publish | Pending::Heartbeat | Pending::Resume { .. } => {}
            }
        }
        self.outbox.unsent();
    }

    /// Reconnects (with backoff) and restores every session; false if the
    /// client was closed meanwhile or the gateway refuses the token.
    pub(super) async fn reconnect(&mut self) -> bool {
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
                    self.silence.heard();
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
        for run in self.follows.runs() {
            self.send_resume(&run).await;
        }
        self.heartbeats.restart(!self.runs.is_empty());
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
        let Some(main) = self.runs.main() else {
            return true;
        };
        let request = self.attach_request(&main.spec, true);
        let main_run = main.spec.run_id.clone();
        match self.exchange(&request).await {
            None => return false,
            Some(Err(e)) if e.code() == Some(ErrorCode::SessionExpired) => {
                match self.renew(main_run.as_str()).await {
                    None => return false,
                    Some(true) => {}
                    Some(false) => {
                        self.all_sessions_ended(SessionEnd::Expired);
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
                let end = if e.code() == Some(ErrorCode::StaleEpoch) {
                    SessionEnd::Superseded
                } else {
                    SessionEnd::Expired
                };
                self.all_sessions_ended(end);
                return true;
            }
            Some(Ok(_)) => {}
        }
        loop {
            let subs = self.runs.subs();
            if subs.is_empty() {
                return true;
            }
            let Some(main) = self.runs.main() else {
                return true;
            };
            let request = RecoverConnectionsCommand {
                session_id: main.session_id.clone(),
                main_run_id: main_run.clone(),
                sub_run_ids: Some(subs.clone()),
                connection_epoch: Some(self.epoch),
            };
            match self.exchange(&request).await {
                None => return false,
                Some(Ok(_)) => return true,
                Some(Err(e)) if e.is_retryable() => return false,
                Some(Err(e)) => {
                    // All or nothing: drop the sub-run the gateway named and
                    // try the rest; without a name, none can move.
                    match e.run_id() {
                        Some(run) if subs.iter().any(|s| s.as_str() == run) => {
                            let renewed = if e.code() == Some(ErrorCode::SessionExpired) {
                                match self.renew(&run).await {
                                    None => return false,
                                    Some(ok) => ok,
                                }
                            } else {
                                false
                            };
                            if !renewed {
                                self.session_ended(&run, SessionEnd::Expired);
                            }
                        }
                        _ => {
                            for run in subs {
                                self.session_ended(run.as_str(), SessionEnd::Expired);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Attaches `run` afresh after the gateway forgot its session; its
    /// unacknowledged publishes move to the new session (the same typed
    /// requests, now carrying the new session id). `Some(false)` if the
    /// gateway refuses (another instance holds the run now, say); `None`
    /// if the socket failed.
    async fn renew(&mut self, run: &str) -> Option<bool> {
        let Some(r) = self.runs.get(run) else {
            return Some(false);
        };
        let request = self.attach_request(&r.spec, false);
        let run_id = r.spec.run_id.clone();
        match self.exchange(&request).await? {
            Ok(reply) => {
                self.runs.renewed(run, &reply.session_id);
                self.outbox.move_to_session(&run_id, &reply.session_id);
                tracing::info!(run = %run_id, "session renewed after the gateway forgot it");
                let _ = self.events.send(ClientEvent::SessionRenewed {
                    run_id: run_id.to_string(),
                    session_id: reply.session_id.to_string(),
                });
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
    async fn exchange<C: CommandPayload>(&mut self, request: &C) -> Option<Result<C::Reply>> {
        let id = self.next_id();
        let socket = self.socket.as_mut()?;
        if !link::send(socket, link::request(&id, request)).await {
            return None;
        }
        let deadline = Instant::now() + self.options.request_timeout;
        loop {
            let socket = self.socket.as_mut()?;
            let frame = tokio::time::timeout_at(deadline, link::next(socket))
                .await
                .ok()??;
            self.silence.heard();
            match frame {
                Incoming::Reply { id: got, payload } if got == id => {
                    return Some(link::reply::<C>(&payload));
                }
                Incoming::Error {
                    id: Some(got),
                    error,
                } if got == id => return Some(Err(error)),
                // A stream to resume again will be, with the others.
                Incoming::Push { kind, payload } => {
                    self.pushed(&kind, &payload);
                }
                _ => {}
            }
        }
    }
}
