//! [`ViewerClient`]: tails runs' output streams and resumes them after any
//! disconnect from the last offset it delivered.
//!
//! Each [`Follower`] has its own socket on `/v1/stream` and a driver task.
//! The driver remembers the next offset owed to the caller and the stream
//! epoch, and after a lost socket (or `gateway.draining`) reconnects with
//! backoff and sends `stream.resume` from exactly there, so the caller sees
//! every event once, in order. What it cannot hide it reports: a resume that
//! comes back `truncated` (history gone or a new epoch), a `stream.gap` (the
//! caller fell behind the ring), a `stream.closed` (the stream was dropped;
//! the follower resumes the run's next stream by itself). A `stream.ended`
//! is the last item: the run is over and the follower ends after it.
//!
//! The channel to the caller is bounded: a caller that does not read stops
//! the driver reading its socket, and the gateway, not this process, holds
//! the backlog (and answers with a gap if it is too much).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::follow::{Follower, StreamItem, StreamState};
use super::link::{self, Incoming};
use super::{Backoff, ClientError, TokenSource, backoff, token};
use rungate_protocol::commands::{
    RunCancelCommand, RunCancelResponse, ShortText, StreamResumeCommand,
};
use rungate_protocol::ids::RunId;
use rungate_protocol::push::{self, Push};

/// Where and how to connect as a viewer.
#[derive(Debug, Clone)]
pub struct ViewerOptions {
    /// `ws://HOST:PORT/v1/stream`.
    pub url: String,
    /// A viewer token covering the runs to follow (unless `token_source`
    /// is set).
    pub token: String,
    /// Asked for a token at every connection ([`ViewerOptions::with_token_source`]).
    pub token_source: Option<TokenSource>,
    /// Longest one connection attempt (TCP + handshake) may take.
    pub connect_timeout: Duration,
    /// Delays between reconnect attempts after the socket is lost.
    pub backoff: Backoff,
    /// Items buffered for a caller that reads slowly.
    pub buffer: usize,
}

impl ViewerOptions {
    /// Options for `url` with a fixed `token`; 10 s connect timeout, default backoff, 256 buffered
    /// items.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> ViewerOptions {
        ViewerOptions {
            url: url.into(),
            token: token.into(),
            token_source: None,
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            buffer: 256,
        }
    }

    /// Takes each connection's token from `source` (see
    /// [`super::RuntimeOptions::with_token_source`]).
    pub fn with_token_source(mut self, source: TokenSource) -> ViewerOptions {
        self.token_source = Some(source);
        self
    }
}

/// The answer to [`ViewerClient::cancel`]: the protocol's `run.cancel` reply.
pub type CancelAnswer = RunCancelResponse;

/// Follows runs' streams on `/v1/stream`.
#[derive(Debug, Clone)]
pub struct ViewerClient {
    options: ViewerOptions,
}

impl ViewerClient {
    /// A client with these options; it connects when a run is followed.
    pub fn new(options: ViewerOptions) -> ViewerClient {
        ViewerClient { options }
    }

    /// Asks `run`'s runtime to stop (`run.cancel`, on a socket of its own).
    /// Needs a viewer token with the `run.cancel` capability.
    pub async fn cancel(
        &self,
        run: &str,
        reason: Option<&str>,
    ) -> Result<CancelAnswer, ClientError> {
        let request = RunCancelCommand {
            run_id: RunId::new(run).map_err(|e| ClientError::invalid("runId", run, e))?,
            // Its length is the gateway's to check, as for any client.
            reason: reason.map(|r| ShortText(r.to_owned())),
        };
        let options = &self.options;
        let mut socket = link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await?;
        if !link::send(&mut socket, link::request("cancel-1", &request)).await {
            return Err(ClientError::ConnectionLost);
        }
        let deadline = Instant::now() + options.connect_timeout;
        loop {
            let frame = tokio::select! {
                f = link::next(&mut socket) => f,
                _ = sleep_until(deadline) => return Err(ClientError::Timeout(options.connect_timeout)),
            };
            match frame {
                None => return Err(ClientError::ConnectionLost),
                Some(Incoming::Reply { id, payload }) if id == "cancel-1" => {
                    let _ = socket.close(None).await;
                    return link::reply::<RunCancelCommand>(&payload);
                }
                Some(Incoming::Error {
                    id: Some(id),
                    error,
                }) if id == "cancel-1" => {
                    return Err(error);
                }
                Some(_) => {}
            }
        }
    }

    /// Follows `run` from `from_offset` (or live from the head) until the
    /// returned [`Follower`] is dropped, or until the run ended
    /// ([`StreamItem::Ended`] is then the last item).
    /// A run id the protocol does not allow is the follower's only item
    /// (an `Err`).
    pub fn follow(&self, run: &str, from_offset: Option<u64>) -> Follower {
        let (tx, rx) = mpsc::channel(self.options.buffer.max(1));
        match RunId::new(run).map_err(|e| ClientError::invalid("runId", run, e)) {
            Ok(run) => {
                tokio::spawn(follow(
                    self.options.clone(),
                    run,
                    StreamState::new(from_offset),
                    tx,
                ));
            }
            // The channel holds at least one item and is new: this fits.
            Err(e) => drop(tx.try_send(Err(e))),
        }
        Follower::bounded(rx)
    }
}

type Items = mpsc::Sender<Result<StreamItem, ClientError>>;

/// One follower's driver: connect, resume, deliver, repeat.
async fn follow(options: ViewerOptions, run: RunId, mut state: StreamState, items: Items) {
    let mut attempt: u32 = 0;
    let mut not_before: Option<Instant> = None;
    loop {
        if attempt > 0 || not_before.is_some() {
            let mut wake = Instant::now() + options.backoff.delay(attempt.saturating_sub(1));
            if let Some(t) = not_before.take() {
                wake = wake.max(t);
            }
            tokio::select! {
                _ = sleep_until(wake) => {}
                _ = items.closed() => return,
            }
        }
        let mut socket = match link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) if link::is_refusal(&e) => {
                let _ = items.send(Err(e)).await;
                return;
            }
            Err(_) => {
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        let mut resume_id = 0u64;
        let mut send_resume =
            async |socket: &mut link::Socket, state: &StreamState| -> Option<String> {
                resume_id += 1;
                let id = format!("resume-{resume_id}");
                let request = state.resume_request(run.clone(), None);
                link::send(socket, link::request(&id, &request))
                    .await
                    .then_some(id)
            };
        let Some(mut waiting_for) = send_resume(&mut socket, &state).await else {
            attempt = attempt.saturating_add(1);
            continue;
        };
        loop {
            let frame = tokio::select! {
                frame = link::next(&mut socket) => frame,
                _ = items.closed() => return,
            };
            let Some(frame) = frame else {
                break;
            };
            let mut out = Vec::new();
            let mut resume_again = false;
            match frame {
                Incoming::Reply { id, payload } if id == waiting_for => {
                    match link::reply::<StreamResumeCommand>(&payload) {
                        Ok(info) => out.push(state.resumed(info)),
                        // Not what the protocol promises: retrying will not help.
                        Err(e) => {
                            let _ = items.send(Err(e)).await;
                            return;
                        }
                    }
                    attempt = 0;
                }
                Incoming::Error {
                    id: Some(id),
                    error,
                } if id == waiting_for => {
                    if error.is_retryable() {
                        break;
                    }
                    // The token does not cover the run, or the like: final.
                    let _ = items.send(Err(error)).await;
                    return;
                }
                Incoming::Push { kind, payload } => {
                    let pushed = match link::push(&kind, &payload) {
                        Ok(Push::GatewayDraining(d)) => {
                            not_before = Some(draining_until(Some(d.reconnect_after_ms)));
                            Ok((Vec::new(), false))
                        }
                        Ok(p) if p.run_id() == Some(&run) => state.pushed(p),
                        Ok(_) => Ok((Vec::new(), false)),
                        Err(_) if kind == push::GATEWAY_DRAINING => {
                            not_before = Some(draining_until(None));
                            Ok((Vec::new(), false))
                        }
                        // This socket follows this run only: a stream push
                        // that does not read and names no other run was its.
                        Err(bad)
                            if push::STREAM_PUSHES.contains(&kind.as_str())
                                && bad.run.as_deref().is_none_or(|r| r == run.as_str()) =>
                        {
                            Err(bad.error)
                        }
                        Err(_) => Ok((Vec::new(), false)),
                    };
                    match pushed {
                        Ok((items, again)) => {
                            out = items;
                            resume_again = again;
                        }
                        // Not what the protocol promises: retrying will not help.
                        Err(e) => {
                            let _ = items.send(Err(ClientError::BadPush(e))).await;
                            return;
                        }
                    }
                }
                _ => {}
            }
            for item in out {
                if items.send(Ok(item)).await.is_err() {
                    return;
                }
            }
            if state.is_ended() {
                return;
            }
            if resume_again {
                match send_resume(&mut socket, &state).await {
                    Some(id) => waiting_for = id,
                    None => break,
                }
            }
        }
        attempt = attempt.saturating_add(1);
    }
}

/// When to reconnect after a `gateway.draining` (see [`backoff::after_draining`]).
fn draining_until(reconnect_after_ms: Option<u64>) -> Instant {
    Instant::now() + backoff::after_draining(reconnect_after_ms)
}
