//! The run session API: [`RuntimeClient`], the handle an application
//! calls, and the values it takes and gives ([`Attached`], [`Event`],
//! [`Checkpoint`]).
//!
//! Owns turning each call into the protocol's typed request and its typed
//! reply into the answer. Must not touch the socket or the driver's state:
//! it only sends operations ([`super::op`]) and waits for their answers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::driver::Driver;
use super::events::{CancelRequest, ClientEvent, ConnectionState};
use super::op::{EncodeCall, Op};
use super::options::RuntimeOptions;
use super::runs::AttachSpec;
use crate::follow::Follower;
use crate::{ClientError, link, token};
use rungate_protocol::CommandPayload;
use rungate_protocol::commands::{
    CheckpointLoadCommand, CheckpointSaveCommand, DeleteKVCommand, GetConfigCommand, GetKVCommand,
    GetSecretsCommand, HeartbeatCommand, OutputEvent, RuntimeFinishCommand, SetKVCommand,
    ShortText,
};
use rungate_protocol::envelope;
use rungate_protocol::ids::{OpaqueId, RunId, RunOutcome, SessionId};

type Result<T> = std::result::Result<T, ClientError>;

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

    /// The protocol's output event, numbered `seq`.
    pub(super) fn to_output_event(&self, seq: u64) -> Result<OutputEvent> {
        OutputEvent::new(
            &self.kind,
            Some(seq),
            self.timestamp.as_deref(),
            self.data.as_ref(),
        )
        .map_err(|e| ClientError::invalid("event", &self.kind, e))
    }
}

/// A checkpoint as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The checkpoint's id (`checkpointId`).
    pub checkpoint_id: String,
    /// When it was saved (`savedAt`), RFC 3339.
    pub saved_at: String,
    /// The JSON value saved (`data`).
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

impl RuntimeClient {
    /// Connects (one attempt, within `connect_timeout`) and starts the
    /// driver, which reconnects on its own from then on. A
    /// `runtime_instance_id` the protocol does not allow is refused before
    /// connecting.
    pub async fn connect(options: RuntimeOptions) -> Result<RuntimeClient> {
        let instance = OpaqueId::new(options.runtime_instance_id.as_str()).map_err(|e| {
            ClientError::invalid("runtimeInstanceId", &options.runtime_instance_id, e)
        })?;
        let socket = link::connect(
            &options.url,
            &token::for_connection(&options.token, options.token_source.as_ref()),
            options.connect_timeout,
        )
        .await?;
        let (ops_tx, ops_rx) = mpsc::channel(1024);
        let (events_tx, _) = broadcast::channel(256);
        let (cancels_tx, _) = broadcast::channel(64);
        let request_timeout = options.request_timeout;
        let state = Driver::spawn(
            options,
            instance,
            socket,
            ops_rx,
            events_tx.clone(),
            cancels_tx.clone(),
        );
        Ok(RuntimeClient {
            ops: ops_tx,
            state,
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

    /// Sends an operation and waits (at most the request timeout) for its
    /// answer.
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

    /// A command on the attached `run`: `request` builds its typed payload
    /// for the run's session (known to the driver only); the reply comes
    /// back typed.
    async fn call<C: CommandPayload>(
        &self,
        run: &str,
        request: impl FnOnce(SessionId, RunId) -> C + Send + 'static,
    ) -> Result<C::Reply> {
        let encode: EncodeCall = Box::new(move |id, session_id, run_id| {
            envelope::encode_command(id, &request(session_id, run_id))
        });
        let run = run.to_owned();
        let payload = self.ask(|reply| Op::Call { run, encode, reply }).await?;
        link::reply::<C>(&payload)
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
        let spec = AttachSpec::parse(run, capabilities, attempt_id)?;
        self.ask(|reply| Op::Attach { spec, reply }).await
    }

    /// Renews the run's lease now (the client also does it on its own).
    pub async fn heartbeat(&self, run: &str) -> Result<()> {
        self.call(run, |session_id, run_id| HeartbeatCommand {
            session_id,
            run_id,
            runtime_instance_id: None,
            metadata: None,
        })
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
        let names: Option<Vec<String>> = names.map(|n| n.iter().map(|s| (*s).to_owned()).collect());
        let reply = self
            .call(run, |session_id, run_id| GetSecretsCommand {
                session_id,
                run_id,
                names,
            })
            .await?;
        Ok(reply
            .secrets
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect())
    }

    /// The run's effective config object.
    pub async fn config(&self, run: &str) -> Result<Map<String, Value>> {
        let reply = self
            .call(run, |session_id, run_id| GetConfigCommand {
                session_id,
                run_id,
            })
            .await?;
        Ok(reply.config.into_owned())
    }

    /// The values of `keys` that exist. Needs `kv.read`.
    pub async fn kv_get(&self, run: &str, keys: &[&str]) -> Result<BTreeMap<String, String>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let reply = self
            .call(run, |session_id, run_id| GetKVCommand {
                session_id,
                run_id,
                keys,
            })
            .await?;
        Ok(reply.kv)
    }

    /// Sets keys. Needs `kv.write`.
    pub async fn kv_set(&self, run: &str, kv: &BTreeMap<String, String>) -> Result<()> {
        let kv = kv.clone();
        self.call(run, |session_id, run_id| SetKVCommand {
            session_id,
            run_id,
            kv,
        })
        .await
        .map(drop)
    }

    /// Deletes keys (absent ones are ignored); returns how many held a
    /// value. Needs `kv.write`. Gives their bytes back to the quota of the
    /// run's owner.
    pub async fn kv_delete(&self, run: &str, keys: &[&str]) -> Result<u64> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let reply = self
            .call(run, |session_id, run_id| DeleteKVCommand {
                session_id,
                run_id,
                keys,
            })
            .await?;
        Ok(reply.deleted)
    }

    /// Saves a checkpoint (replacing `id` if given); returns its id.
    /// Needs `checkpoint.save`.
    pub async fn checkpoint_save(
        &self,
        run: &str,
        id: Option<&str>,
        data: &Value,
    ) -> Result<String> {
        let checkpoint_id = checkpoint_id(id)?;
        let data = serde_json::value::to_raw_value(data)
            .map_err(|e| ClientError::InvalidRequest(format!("checkpoint data: {e}")))?;
        let reply = self
            .call(run, |session_id, run_id| CheckpointSaveCommand {
                session_id,
                run_id,
                data,
                checkpoint_id,
            })
            .await?;
        Ok(reply.checkpoint_id)
    }

    /// Loads the latest checkpoint, or the one named `id`. Needs
    /// `checkpoint.load`; `NOT_FOUND` if there is none.
    pub async fn checkpoint_load(&self, run: &str, id: Option<&str>) -> Result<Checkpoint> {
        let checkpoint_id = checkpoint_id(id)?;
        let reply = self
            .call(run, |session_id, run_id| CheckpointLoadCommand {
                session_id,
                run_id,
                checkpoint_id,
            })
            .await?;
        let data = serde_json::from_str(reply.data.get())
            .map_err(|e| ClientError::BadReply(format!("checkpoint.load answered: {e}")))?;
        Ok(Checkpoint {
            checkpoint_id: reply.checkpoint_id,
            saved_at: reply.saved_at.to_string(),
            data,
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
    /// [`crate::ViewerClient`], which applies backpressure instead.
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
        Ok(Follower::unbounded(items_rx))
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
        // Its length is the gateway's to check, as for any client.
        let message = message.map(|m| ShortText(m.to_owned()));
        let reply = self
            .call(run, move |session_id, run_id| RuntimeFinishCommand {
                session_id,
                run_id,
                outcome,
                message,
            })
            .await?;
        let _ = self
            .ops
            .send(Op::Ended {
                run: run.to_owned(),
            })
            .await;
        Ok(reply.next_offset)
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

/// A checkpoint id as the protocol types it.
fn checkpoint_id(id: Option<&str>) -> Result<Option<OpaqueId>> {
    id.map(|id| OpaqueId::new(id).map_err(|e| ClientError::invalid("checkpointId", id, e)))
        .transpose()
}
