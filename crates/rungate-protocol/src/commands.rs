//! Typed command payloads and replies, mirroring `spec/v1/schemas/`.
//!
//! Owns the mapping from a request's `type` to its payload type, and the
//! strictness rules: unknown members, missing required members and
//! out-of-range numbers are refused exactly where the schemas refuse them
//! (every request type is `deny_unknown_fields`; identifiers validate through
//! [`crate::ids`]). Must not do I/O or apply commands: the gateway's
//! `dispatch` routes a decoded [`Command`] to the domain.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::any_json::AnyJson;
use super::cursor::Cursor;
use super::error::{CommandError, ErrorCode};
use crate::ids::{Capability, OpaqueId, RunId, RunOutcome, SessionId, StreamEpoch};

/// Every request type the gateway knows, by its wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `runtime.attach`: start or move a session.
    RuntimeAttach,
    /// `runtime.heartbeat`: renew a session's lease.
    RuntimeHeartbeat,
    /// `runtime.recoverConnections`: move sub-run sessions onto this socket after the main session
    /// reattached.
    RuntimeRecoverConnections,
    /// `secrets.get`: read the run's secrets (capability `secrets.read`).
    SecretsGet,
    /// `config.get`: read the run's config.
    ConfigGet,
    /// `kv.get`: read keys of the run's KV store (capability `kv.read`).
    KvGet,
    /// `kv.set`: write keys of the run's KV store (capability `kv.write`).
    KvSet,
    /// `kv.delete`: remove keys of the run's KV store (capability `kv.write`).
    KvDelete,
    /// `events.publish`: append output events to the run's stream.
    EventsPublish,
    /// `checkpoint.save`: save a checkpoint of the run (capability `checkpoint.save`).
    CheckpointSave,
    /// `checkpoint.load`: load a checkpoint of the run (capability `checkpoint.load`).
    CheckpointLoad,
    /// `stream.resume`: subscribe this socket to a run's stream.
    StreamResume,
    /// `stream.cancel`: end this socket's subscription to a run's stream.
    StreamCancel,
    /// `runs.list`: one page of the runs the token covers.
    RunsList,
    /// `runtime.finish`: end the run with an outcome.
    RuntimeFinish,
    /// `run.cancel`: a viewer asks the run's runtime to stop.
    RunCancel,
}

impl CommandKind {
    /// Every kind, in the order of the enum.
    pub const ALL: [CommandKind; 16] = [
        CommandKind::RuntimeAttach,
        CommandKind::RuntimeHeartbeat,
        CommandKind::RuntimeRecoverConnections,
        CommandKind::SecretsGet,
        CommandKind::ConfigGet,
        CommandKind::KvGet,
        CommandKind::KvSet,
        CommandKind::KvDelete,
        CommandKind::EventsPublish,
        CommandKind::CheckpointSave,
        CommandKind::CheckpointLoad,
        CommandKind::StreamResume,
        CommandKind::StreamCancel,
        CommandKind::RunsList,
        CommandKind::RuntimeFinish,
        CommandKind::RunCancel,
    ];

    /// The wire name, the request's `type` (`runtime.attach`, `kv.get`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::RuntimeAttach => "runtime.attach",
            CommandKind::RuntimeHeartbeat => "runtime.heartbeat",
            CommandKind::RuntimeRecoverConnections => "runtime.recoverConnections",
            CommandKind::SecretsGet => "secrets.get",
            CommandKind::ConfigGet => "config.get",
            CommandKind::KvGet => "kv.get",
            CommandKind::KvSet => "kv.set",
            CommandKind::KvDelete => "kv.delete",
            CommandKind::EventsPublish => "events.publish",
            CommandKind::CheckpointSave => "checkpoint.save",
            CommandKind::CheckpointLoad => "checkpoint.load",
            CommandKind::StreamResume => "stream.resume",
            CommandKind::StreamCancel => "stream.cancel",
            CommandKind::RunsList => "runs.list",
            CommandKind::RuntimeFinish => "runtime.finish",
            CommandKind::RunCancel => "run.cancel",
        }
    }

    /// The kind whose wire name is `s`, if any (`None` is `UNKNOWN_TYPE`).
    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The capability a session must have asked for at attach, if any.
    pub fn required_capability(self) -> Option<Capability> {
        match self {
            CommandKind::SecretsGet => Some(Capability::SecretsRead),
            CommandKind::KvGet => Some(Capability::KvRead),
            CommandKind::KvSet | CommandKind::KvDelete => Some(Capability::KvWrite),
            CommandKind::CheckpointSave => Some(Capability::CheckpointSave),
            CommandKind::CheckpointLoad => Some(Capability::CheckpointLoad),
            CommandKind::StreamResume | CommandKind::StreamCancel => Some(Capability::StreamResume),
            // Of the viewer token, on /v1/stream (there are no sessions).
            CommandKind::RunCancel => Some(Capability::RunCancel),
            _ => None,
        }
    }
}

/// A request with its payload typed. A publish's events borrow the
/// frame's text (`'a`), so a batch is copied once, into the stream.
#[derive(Debug)]
pub enum Command<'a> {
    /// A `runtime.attach` payload.
    RuntimeAttach(RuntimeAttachRequest),
    /// A `runtime.heartbeat` payload.
    RuntimeHeartbeat(HeartbeatCommand),
    /// A `runtime.recoverConnections` payload.
    RuntimeRecoverConnections(RecoverConnectionsCommand),
    /// A `secrets.get` payload.
    SecretsGet(GetSecretsCommand),
    /// A `config.get` payload.
    ConfigGet(GetConfigCommand),
    /// A `kv.get` payload.
    KvGet(GetKVCommand),
    /// A `kv.set` payload.
    KvSet(SetKVCommand),
    /// A `kv.delete` payload.
    KvDelete(DeleteKVCommand),
    /// An `events.publish` payload.
    EventsPublish(PublishOutputEventsRequest<PublishedEvent<'a>>),
    /// A `checkpoint.save` payload.
    CheckpointSave(CheckpointSaveCommand),
    /// A `checkpoint.load` payload.
    CheckpointLoad(CheckpointLoadCommand),
    /// A `stream.resume` payload.
    StreamResume(StreamResumeCommand),
    /// A `stream.cancel` payload.
    StreamCancel(StreamCancelCommand),
    /// A `runs.list` payload.
    RunsList(RunsListCommand),
    /// A `runtime.finish` payload.
    RuntimeFinish(RuntimeFinishCommand),
    /// A `run.cancel` payload.
    RunCancel(RunCancelCommand),
}

impl<'a> Command<'a> {
    /// Types `payload` as the command `kind` names, or explains where it
    /// breaks the schema (`details.path` is a JSON pointer into the frame).
    pub fn parse(kind: CommandKind, payload: &'a RawValue) -> Result<Command<'a>, CommandError> {
        let text = payload.get();
        // serde's derived structs also read arrays (one element per field);
        // the schemas say object. A RawValue has no leading whitespace.
        if !text.starts_with('{') {
            return Err(CommandError::invalid_payload(
                "/payload",
                "payload must be a JSON object",
            ));
        }
        // One read for a valid payload: every type in it refuses a repeated
        // member itself (crate::duplicates), so one that types has none. One
        // that fails is walked for its first repeat, which is answered
        // ahead of anything else wrong with it.
        Command::read(kind, text).map_err(|e| match super::duplicates::first_duplicate(text) {
            Some(path) => CommandError::invalid_payload(&path, super::duplicates::REPEATED),
            None => e,
        })
    }

    /// The payload of a `kind` request at `cursor`, typed as it is read;
    /// `None` for anything [`Self::parse`] would refuse, and for some it
    /// would take (the caller then reads the frame the ordinary way).
    /// Only a publish is read in one pass; any other payload is cut out
    /// and typed from its text, as `parse` does.
    pub(crate) fn read_at(kind: CommandKind, cursor: &mut Cursor<'a>) -> Option<Command<'a>> {
        if cursor.peek() != Some(b'{') {
            return None;
        }
        if kind == CommandKind::EventsPublish {
            return publish_from(cursor).map(Command::EventsPublish);
        }
        let (_, text) = cursor.value::<serde::de::IgnoredAny>()?;
        Command::read(kind, text).ok()
    }

    fn read(kind: CommandKind, text: &'a str) -> Result<Command<'a>, CommandError> {
        Ok(match kind {
            CommandKind::RuntimeAttach => Command::RuntimeAttach(typed(text)?),
            CommandKind::RuntimeHeartbeat => Command::RuntimeHeartbeat(typed(text)?),
            CommandKind::RuntimeRecoverConnections => {
                Command::RuntimeRecoverConnections(typed(text)?)
            }
            CommandKind::SecretsGet => Command::SecretsGet(typed(text)?),
            CommandKind::ConfigGet => Command::ConfigGet(typed(text)?),
            CommandKind::KvGet => Command::KvGet(typed(text)?),
            CommandKind::KvSet => Command::KvSet(typed(text)?),
            CommandKind::KvDelete => Command::KvDelete(typed(text)?),
            CommandKind::EventsPublish => Command::EventsPublish(read_publish(text)?),
            CommandKind::CheckpointSave => Command::CheckpointSave(typed(text)?),
            CommandKind::CheckpointLoad => Command::CheckpointLoad(typed(text)?),
            CommandKind::StreamResume => Command::StreamResume(typed(text)?),
            CommandKind::StreamCancel => Command::StreamCancel(typed(text)?),
            CommandKind::RunsList => Command::RunsList(typed(text)?),
            CommandKind::RuntimeFinish => Command::RuntimeFinish(typed(text)?),
            CommandKind::RunCancel => Command::RunCancel(typed(text)?),
        })
    }
}

/// A request payload of one command: which command it is the payload of,
/// and what its reply's payload is. A client encodes one with
/// [`crate::envelope::encode_command`] and reads the answer as
/// [`CommandPayload::Reply`]; the gateway reads the same types through
/// [`Command::parse`], so both sides share one definition of each frame.
pub trait CommandPayload: Serialize {
    /// The command (`type` of the request frame).
    const KIND: CommandKind;
    /// The payload of the command's reply.
    type Reply: DeserializeOwned;
}

macro_rules! command_payloads {
    ($($payload:ty => $kind:ident, $reply:ty;)*) => {
        $(
            impl CommandPayload for $payload {
                const KIND: CommandKind = CommandKind::$kind;
                type Reply = $reply;
            }
        )*
    };
}

command_payloads! {
    RuntimeAttachRequest => RuntimeAttach, RuntimeAttachResponse;
    HeartbeatCommand => RuntimeHeartbeat, HeartbeatResponse;
    RecoverConnectionsCommand => RuntimeRecoverConnections, RecoverConnectionsResponse;
    GetSecretsCommand => SecretsGet, GetSecretsResponse<'static>;
    GetConfigCommand => ConfigGet, GetConfigResponse<'static>;
    GetKVCommand => KvGet, GetKVResponse;
    SetKVCommand => KvSet, SetKVResponse;
    DeleteKVCommand => KvDelete, DeleteKVResponse;
    CheckpointSaveCommand => CheckpointSave, CheckpointSaveResponse;
    CheckpointLoadCommand => CheckpointLoad, CheckpointLoadResponse;
    StreamResumeCommand => StreamResume, StreamResumeResponse;
    StreamCancelCommand => StreamCancel, StreamCancelResponse;
    RunsListCommand => RunsList, RunsListResponse;
    RuntimeFinishCommand => RuntimeFinish, RuntimeFinishResponse;
    RunCancelCommand => RunCancel, RunCancelResponse;
}

/// Whatever form a writer holds its events in, a publish is the same
/// command.
impl<E: Serialize> CommandPayload for PublishOutputEventsRequest<E> {
    const KIND: CommandKind = CommandKind::EventsPublish;
    type Reply = PublishOutputEventsResponse;
}

/// Deserializes with the failing member's path, for `details.path`.
fn typed<'de, T: Deserialize<'de>>(text: &'de str) -> Result<T, CommandError> {
    typed_at(text, "/payload")
}

/// As [`typed`], with paths under `root`.
fn typed_at<'de, T: Deserialize<'de>>(text: &'de str, root: &str) -> Result<T, CommandError> {
    deserialize_at(text, root).map_err(|(path, why)| CommandError::invalid_payload(&path, why))
}

/// Deserializes `text`, or answers the JSON pointer (under `root`) of the
/// member that broke the type and serde's reason: requests' `details.path`
/// and [`crate::push::PushError`] both come from here.
///
/// A valid payload is typed by serde alone; only one that fails is read
/// again through `serde_path_to_error` to find where. Tracking the path on
/// every frame cost a wrapper call per member and per element of every
/// frame, most of which are fine (BENCHMARKS.md, the command parse).
pub(crate) fn deserialize_at<'de, T: Deserialize<'de>>(
    text: &'de str,
    root: &str,
) -> Result<T, (String, String)> {
    // The same deserializer as below, so the same values are accepted; a
    // `RawValue`'s text has no trailing characters to check.
    if let Ok(value) = T::deserialize(&mut serde_json::Deserializer::from_str(text)) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut pointer = String::from(root);
        for seg in e.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    pointer.push('/');
                    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                }
                Segment::Unknown => {}
            }
        }
        (pointer, e.inner().to_string())
    })
}

/// Accepts protocol `"1"` and any `"1.x"`.
pub fn protocol_version_supported(v: &str) -> bool {
    v == "1" || v.strip_prefix("1.").is_some_and(|rest| !rest.is_empty())
}

/// The `UNSUPPORTED_PROTOCOL` error for `protocolVersion` `v`, with `details.supported` listing
/// `"1"`.
pub fn unsupported_protocol(v: &str) -> CommandError {
    CommandError::new(
        ErrorCode::UnsupportedProtocol,
        format!("protocol version {v:?} is not supported; this gateway speaks \"1\""),
    )
    .with_details(serde_json::json!({ "supported": ["1"] }))
}

/// Deserializers that make serde refuse what the schemas refuse.
mod wire {
    use serde::{Deserialize, Deserializer};

    /// An optional member that, when present, must hold a value: `null` is
    /// refused as the schemas refuse it (serde's `Option` would take it as
    /// absent). Pair with `#[serde(default)]` for the absent case.
    pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }

    /// [`present`] for a free-form object: a repeated member at any depth
    /// is refused (see [`crate::duplicates`]).
    pub(super) fn present_strict_object<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, D::Error> {
        crate::duplicates::strict_object(d).map(Some)
    }

    /// A non-negative integer as JSON Schema counts them: `3`, and also
    /// `3.0` or `3e0`, which are integers to a schema but not to serde.
    pub(super) fn present_whole_u64<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Number {
            Int(u64),
            Float(f64),
        }
        match Number::deserialize(d) {
            Ok(Number::Int(n)) => Ok(Some(n)),
            // 2^64 is exactly representable; anything below it with no
            // fraction converts without loss of meaning.
            Ok(Number::Float(f))
                if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) =>
            {
                Ok(Some(f as u64))
            }
            _ => Err(serde::de::Error::custom(
                "expected a non-negative integer below 2^64",
            )),
        }
    }
}

// ---------------------------------------------------------------- requests

/// `runtime.attach`: binds a run to this runtime instance, as a fresh session or (with `reconnect`)
/// by moving its session to this socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeAttachRequest {
    /// The run to attach (`runId`).
    pub run_id: RunId,
    /// This attempt at the run, chosen by the runtime (`attemptId`); opaque to the gateway.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<OpaqueId>,
    /// The runtime instance the session belongs to (`runtimeInstanceId`); a reconnect must present
    /// the same one.
    pub runtime_instance_id: OpaqueId,
    /// The protocol version the runtime speaks (`protocolVersion`): `"1"` or `"1.x"`.
    pub protocol_version: String,
    /// `reconnect`: move the run's existing session to this socket instead of starting one (default
    /// false; not written when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconnect: bool,
    /// `connectionEpoch`: a fresh session's epoch (default 0); a reconnect's must be greater than
    /// the session's current one.
    #[serde(default, deserialize_with = "wire::present_whole_u64")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_epoch: Option<u64>,
    /// Runtime capabilities only: the viewer's `run.cancel` is unknown here.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

/// The longest `message` (runtime.finish) or `reason` (run.cancel), in
/// UTF-8 bytes.
pub const MAX_LIFECYCLE_TEXT_BYTES: usize = 1024;

/// A `message` or `reason`: at most [`MAX_LIFECYCLE_TEXT_BYTES`] bytes.
///
/// The bound holds for what is read. What a client writes is written as
/// given, so a longer text is the reader's to refuse (`INVALID_PAYLOAD`
/// from the gateway), as for any other client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ShortText(pub String);

impl<'de> Deserialize<'de> for ShortText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > MAX_LIFECYCLE_TEXT_BYTES {
            return Err(serde::de::Error::custom(format!(
                "{} bytes; at most {MAX_LIFECYCLE_TEXT_BYTES} UTF-8 bytes",
                s.len()
            )));
        }
        Ok(ShortText(s))
    }
}

/// `runtime.finish`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeFinishCommand {
    /// The session holding the run (`sessionId`).
    pub session_id: SessionId,
    /// The run to end (`runId`).
    pub run_id: RunId,
    /// How the run ended (`outcome`): `completed`, `failed` or `cancelled`.
    pub outcome: RunOutcome,
    /// Free text for humans about the end (`message`), kept with the run.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ShortText>,
}

/// `run.cancel` (viewers, on /v1/stream).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunCancelCommand {
    /// The run to stop (`runId`).
    pub run_id: RunId,
    /// Why (`reason`), passed on in the `run.cancelRequested` push.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ShortText>,
}

/// The body of `POST /v1/runs/{runId}/cancel`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunCancelBody {
    /// Why (`reason`), passed on in the `run.cancelRequested` push.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ShortText>,
}

impl RunCancelBody {
    /// Types an HTTP body, or says where it breaks the schema (the path is
    /// into the body: `/reason`). An empty body is `{}`.
    pub fn parse(body: &[u8]) -> Result<RunCancelBody, CommandError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| CommandError::invalid_payload("", "the body is not UTF-8"))?;
        let text = if text.trim().is_empty() { "{}" } else { text };
        if !text.trim_start().starts_with('{') {
            return Err(CommandError::invalid_payload(
                "",
                "the body must be a JSON object",
            ));
        }
        typed_at(text, "")
    }
}

/// `config.get`: only the session.
pub type GetConfigCommand = SessionRef;

/// The two members every command after attach carries.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionRef {
    /// The session the command is for (`sessionId`).
    pub session_id: SessionId,
    /// The run bound to that session (`runId`).
    pub run_id: RunId,
}

/// `runtime.heartbeat`: renews the session's lease.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeartbeatCommand {
    /// The session whose lease to renew (`sessionId`).
    pub session_id: SessionId,
    /// The run bound to that session (`runId`).
    pub run_id: RunId,
    /// The runtime instance sending it (`runtimeInstanceId`), if given.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_instance_id: Option<OpaqueId>,
    /// Free-form `metadata` object from the runtime, if any.
    #[serde(default, deserialize_with = "wire::present_strict_object")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `runtime.recoverConnections`: after the main session reattached, moves the listed sub-run
/// sessions of the same runtime instance onto this socket, all or none.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RecoverConnectionsCommand {
    /// The main run's session (`sessionId`).
    pub session_id: SessionId,
    /// The main run (`mainRunId`).
    pub main_run_id: RunId,
    /// The sub-runs whose sessions to move (`subRunIds`); absent means every unexpired sub-run
    /// of the main session.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_run_ids: Option<Vec<RunId>>,
    /// The main session's current epoch, which the sub-runs move to (`connectionEpoch`); any
    /// other value is `STALE_EPOCH`.
    #[serde(default, deserialize_with = "wire::present_whole_u64")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_epoch: Option<u64>,
}

/// `secrets.get`: the run's secrets (capability `secrets.read`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetSecretsCommand {
    /// The session asking (`sessionId`).
    pub session_id: SessionId,
    /// The run whose secrets to read (`runId`).
    pub run_id: RunId,
    /// Only these secrets (`names`); absent means all of the run's.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

/// `kv.get`: values of the run's KV store (capability `kv.read`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetKVCommand {
    /// The session asking (`sessionId`).
    pub session_id: SessionId,
    /// The run whose KV store to read (`runId`).
    pub run_id: RunId,
    /// The keys to read (`keys`).
    pub keys: Vec<String>,
}

/// `kv.set`: writes to the run's KV store (capability `kv.write`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetKVCommand {
    /// The session asking (`sessionId`).
    pub session_id: SessionId,
    /// The run whose KV store to write (`runId`).
    pub run_id: RunId,
    /// The keys and the values to store under them (`kv`).
    #[serde(deserialize_with = "super::duplicates::strict_map")]
    pub kv: BTreeMap<String, String>,
}

/// `kv.delete`: removes keys from the run's KV store, all or none
/// (capability `kv.write`; `spec/v1/schemas/commands/kv.json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteKVCommand {
    /// The session asking (`sessionId`).
    pub session_id: SessionId,
    /// The run whose KV store to change (`runId`).
    pub run_id: RunId,
    /// The keys to delete (`keys`); absent ones are ignored.
    pub keys: Vec<String>,
}

/// `events.publish`. As read (the default `E`), events stay raw JSON (as
/// received) after validation, so the stream can store and forward them
/// without re-serializing. A writer may hold them as [`OutputEvent`]s too
/// (a client keeps them to resend), or as borrowed [`EventRef`]s, written
/// straight into the frame (a load generator's, with no buffer per event).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PublishOutputEventsRequest<E = OutputEvent> {
    /// The publishing session (`sessionId`).
    pub session_id: SessionId,
    /// The run whose stream the events join (`runId`).
    pub run_id: RunId,
    /// The batch (`events`), appended in order, atomically.
    pub events: Vec<E>,
}

/// One output event as published: its raw JSON plus the members the gateway
/// itself reads.
#[derive(Debug)]
pub struct OutputEvent {
    /// The event's JSON exactly as received (member order and spacing included).
    pub raw: Box<RawValue>,
    /// The event's `seq`, the runtime's per-run sequence number used to drop duplicates.
    pub seq: Option<u64>,
}

/// The members of `spec/v1/schemas/events/output-event.json`, used only to
/// validate; the event itself is kept raw.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields exist to be validated, not read
struct OutputEventShape {
    #[serde(rename = "type")]
    kind: EventType,
    #[serde(default, deserialize_with = "wire::present_whole_u64")]
    seq: Option<u64>,
    #[serde(default, deserialize_with = "wire::present")]
    timestamp: Option<crate::time::Timestamp>,
    /// Any JSON, but one every viewer's parser can read back.
    data: Option<AnyJson>,
}

/// An event's `type`: 1 to 128 characters.
struct EventType;

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        let n = s.chars().count();
        if (1..=128).contains(&n) {
            Ok(EventType)
        } else {
            Err(serde::de::Error::custom(
                "event type must be 1 to 128 characters",
            ))
        }
    }
}

impl<'de> Deserialize<'de> for OutputEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if !raw.get().starts_with('{') {
            return Err(serde::de::Error::custom(
                "an output event must be a JSON object",
            ));
        }
        let shape: OutputEventShape =
            serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
        let seq = shape.seq;
        Ok(OutputEvent { raw, seq })
    }
}

/// One output event as the gateway reads it from a publish, and as its
/// stream appends it: its JSON borrowed from the frame, exactly as
/// received (one valid JSON value, copied into frames verbatim), and its
/// `seq`.
#[derive(Debug, Clone, Copy)]
pub struct PublishedEvent<'a> {
    /// The event's JSON as received (member order and spacing included).
    pub json: &'a str,
    /// The event's `seq`, the runtime's per-run sequence number used to drop duplicates.
    pub seq: Option<u64>,
}

/// Reads an `events.publish` payload in one pass: each event's shape is
/// checked as the cursor steps over it, and its text is kept where it
/// lies. A payload the cursor does not take is read again as
/// [`PublishOutputEventsRequest`] (owned events), whose error is the
/// answer, so both reads answer alike (issue #18: each event was skimmed,
/// copied, then parsed again from the copy).
fn read_publish(
    text: &str,
) -> Result<PublishOutputEventsRequest<PublishedEvent<'_>>, CommandError> {
    if let Some(publish) = read_publish_at_once(text) {
        return Ok(publish);
    }
    match typed::<PublishOutputEventsRequest>(text) {
        Err(e) => Err(e),
        // Not expected: the two reads take the same payloads (the unit
        // tests feed both every refused and accepted shape).
        Ok(_) => Err(CommandError::invalid_payload(
            "/payload",
            "the payload could not be read",
        )),
    }
}

fn read_publish_at_once(text: &str) -> Option<PublishOutputEventsRequest<PublishedEvent<'_>>> {
    let mut cursor = Cursor::new(text);
    let publish = publish_from(&mut cursor)?;
    cursor.at_end().then_some(publish)
}

/// The publish payload at `cursor`, read in one pass, or `None` (see
/// [`read_publish`]).
fn publish_from<'a>(
    cursor: &mut Cursor<'a>,
) -> Option<PublishOutputEventsRequest<PublishedEvent<'a>>> {
    let (mut session_id, mut run_id, mut events) = (None, None, None);
    cursor.object(|name, c| {
        match name {
            "sessionId" if session_id.is_none() => session_id = Some(c.value::<SessionId>()?.0),
            "runId" if run_id.is_none() => run_id = Some(c.value::<RunId>()?.0),
            "events" if events.is_none() => {
                let mut read = Vec::new();
                c.array(|c| {
                    // serde's derived structs read arrays too; an event is an object.
                    if c.peek() != Some(b'{') {
                        return None;
                    }
                    let (shape, json) = c.value::<OutputEventShape>()?;
                    read.push(PublishedEvent {
                        json,
                        seq: shape.seq,
                    });
                    Some(())
                })?;
                events = Some(read);
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(PublishOutputEventsRequest {
        session_id: session_id?,
        run_id: run_id?,
        events: events?,
    })
}

impl Serialize for OutputEvent {
    /// The raw JSON, unchanged: what was received is what is forwarded.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl OutputEvent {
    /// An event as a runtime writes it ([`EventRef`]'s JSON), in a buffer
    /// of its own. Nothing is checked here (the `timestamp` is left as
    /// text): the reader of the frame decides, as for any other client.
    pub fn new(
        kind: &str,
        seq: Option<u64>,
        timestamp: Option<&str>,
        data: Option<&Value>,
    ) -> Result<OutputEvent, serde_json::Error> {
        let raw = serde_json::value::to_raw_value(&EventRef {
            kind,
            seq,
            timestamp,
            data,
        })?;
        Ok(OutputEvent { raw, seq })
    }
}

/// An output event as a writer serializes it, borrowing every member:
/// `type`, then `seq`, `timestamp` and `data` where given. `data` is
/// anything serde writes, so a writer with typed data builds no
/// `serde_json::Value` for it.
#[derive(Debug, Serialize)]
pub struct EventRef<'a, D: ?Sized> {
    /// The event's `type`.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The runtime's per-run sequence number (`seq`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// RFC 3339 (`timestamp`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<&'a str>,
    /// The event's `data`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a D>,
}

/// `checkpoint.save`: saves `data` as the run's latest checkpoint (capability `checkpoint.save`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckpointSaveCommand {
    /// The session saving (`sessionId`).
    pub session_id: SessionId,
    /// The run the checkpoint belongs to (`runId`).
    pub run_id: RunId,
    /// Any JSON, but one the runtime's parser can read back at load.
    #[serde(deserialize_with = "super::any_json::raw")]
    pub data: Box<RawValue>,
    /// The checkpoint to replace (`checkpointId`); absent means the gateway picks a fresh id.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<OpaqueId>,
}

/// `checkpoint.load`: a checkpoint of the run back, as saved (capability `checkpoint.load`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckpointLoadCommand {
    /// The session loading (`sessionId`).
    pub session_id: SessionId,
    /// The run the checkpoint belongs to (`runId`).
    pub run_id: RunId,
    /// The checkpoint to load (`checkpointId`); absent means the run's latest.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<OpaqueId>,
}

/// `stream.resume`: subscribes this socket to the run's stream from an offset.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamResumeCommand {
    /// The run whose stream to follow (`runId`).
    pub run_id: RunId,
    /// The first offset wanted (`fromOffset`); absent means live from the head.
    #[serde(default, deserialize_with = "wire::present_whole_u64")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<u64>,
    /// The `streamEpoch` the client last saw for this run, if any.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_epoch: Option<StreamEpoch>,
    /// The session asking (`sessionId`): required on /v1/runtime, absent on /v1/stream.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
}

/// `stream.cancel`: ends this socket's subscription to the run (idempotent).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamCancelCommand {
    /// The run whose subscription to end (`runId`).
    pub run_id: RunId,
    /// The session asking (`sessionId`): required on /v1/runtime, absent on /v1/stream.
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
}

/// One page of the covered runs, in run id order (see spec/README.md).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunsListCommand {
    /// Runs after this one (the previous page's `nextCursor`).
    #[serde(default, deserialize_with = "wire::present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<RunId>,
    /// At most this many runs in the page (1 to [`RUNS_LIST_MAX_LIMIT`]).
    #[serde(default, deserialize_with = "wire::present_whole_u64")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// Largest `limit` of a `runs.list` page.
pub const RUNS_LIST_MAX_LIMIT: u64 = 10_000;

// ----------------------------------------------------------------- replies
//
// Replies are read leniently (no `deny_unknown_fields`): a client must take
// a newer gateway's reply that carries members it does not know yet.

/// The `runtime.attach` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeAttachResponse {
    /// The session now bound to the run (`sessionId`); the same one on a reconnect.
    pub session_id: SessionId,
    /// The run attached (`runId`).
    pub run_id: RunId,
    /// How often to heartbeat, in milliseconds (`heartbeatIntervalMs`).
    pub heartbeat_interval_ms: u64,
    /// When the lease runs out unless a heartbeat renews it (`leaseExpiresAt`).
    pub lease_expires_at: crate::time::Timestamp,
    /// The version of the run's config (`configVersion`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
}

/// The `runtime.heartbeat` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// Whether the lease was renewed (`accepted`).
    pub accepted: bool,
    /// When the next heartbeat is due (`nextHeartbeatDueAt`).
    pub next_heartbeat_due_at: crate::time::Timestamp,
}

/// `{"accepted": true}`: the reply of recoverConnections, kv.set,
/// events.publish and stream.cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Always true in a reply (`accepted`).
    pub accepted: bool,
}

impl Accepted {
    /// `{"accepted": true}`.
    pub const YES: Accepted = Accepted { accepted: true };
}

/// `kv.set`'s reply.
pub type SetKVResponse = Accepted;
/// `events.publish`'s reply.
pub type PublishOutputEventsResponse = Accepted;
/// `runtime.recoverConnections`' reply.
pub type RecoverConnectionsResponse = Accepted;
/// `stream.cancel`'s reply.
pub type StreamCancelResponse = Accepted;

/// The `secrets.get` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetSecretsResponse<'a> {
    /// Borrowed where the gateway writes it, so the plaintext is never
    /// copied into a longer-lived value; owned where a client reads it.
    pub secrets: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
}

/// The `config.get` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetConfigResponse<'a> {
    /// The run's config object (`config`): borrowed where the gateway
    /// writes it, owned where a client reads it.
    pub config: Cow<'a, serde_json::Map<String, Value>>,
}

/// The `kv.get` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetKVResponse {
    /// The keys asked for that hold a value, with their values (`kv`).
    pub kv: BTreeMap<String, String>,
}

/// The `kv.delete` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteKVResponse {
    /// How many of the keys named held a value and were deleted (`deleted`).
    pub deleted: u64,
}

/// The `checkpoint.save` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSaveResponse {
    /// The id the checkpoint was saved under (`checkpointId`).
    pub checkpoint_id: String,
    /// When it was saved (`savedAt`).
    pub saved_at: crate::time::Timestamp,
}

/// The `checkpoint.load` reply.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointLoadResponse {
    /// The id of the checkpoint loaded (`checkpointId`).
    pub checkpoint_id: String,
    /// When it was saved (`savedAt`).
    pub saved_at: crate::time::Timestamp,
    /// The JSON value saved, unchanged (`data`).
    pub data: Box<RawValue>,
}

/// The `stream.resume` reply: sent before the first `stream.events` push of
/// the subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamResumeResponse {
    /// The run followed (`runId`).
    pub run_id: RunId,
    /// The history being followed (`streamEpoch`).
    pub stream_epoch: StreamEpoch,
    /// The oldest offset still kept (`firstOffset`; equal to `nextOffset` when nothing is kept).
    pub first_offset: u64,
    /// The head: the offset the next published event will get (`nextOffset`).
    pub next_offset: u64,
    /// The offset of the first event this subscription delivers (`startOffset`).
    pub start_offset: u64,
    /// History the client asked for is gone (`truncated`): `fromOffset` older than
    /// `firstOffset`, or another `streamEpoch`.
    pub truncated: bool,
    /// The run ended (`ended`): the subscription replays, then `stream.ended` follows at once.
    pub ended: bool,
}

/// The `runtime.finish` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeFinishResponse {
    /// Always true in a reply (`accepted`).
    pub accepted: bool,
    /// The run's final head: its events are the offsets below it.
    pub next_offset: u64,
}

/// The `run.cancel` reply (also the body of `POST /v1/runs/{runId}/cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCancelResponse {
    /// The socket holding the run's session was sent the push now.
    pub delivered: bool,
    /// The run had already ended: nothing was sent or kept.
    pub ended: bool,
}

/// `runs.list` and `GET /v1/runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunsListResponse {
    /// The runs of this page, in run id order (`runs`).
    pub runs: Vec<RunSummary>,
    /// Set when more runs follow: the `cursor` of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<RunId>,
}

/// One run in [`RunsListResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// The run (`runId`).
    pub run_id: RunId,
    /// Where the run's session stands (`state`).
    pub state: RunState,
    /// The current history of the run's stream (`streamEpoch`).
    pub stream_epoch: StreamEpoch,
    /// The oldest offset still kept (`firstOffset`; equal to `nextOffset` when nothing is kept).
    pub first_offset: u64,
    /// The head: the offset the next published event will get (`nextOffset`).
    pub next_offset: u64,
    /// Set on an ended run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<RunOutcome>,
    /// When the run ended (`endedAt`); only on an ended run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<crate::time::Timestamp>,
    /// The finish's `message`; only on an ended run whose finish carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A run's `state` in [`RunSummary`], as the schema's closed list names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// `attached`: a runtime's socket holds the session.
    Attached,
    /// `detached`: the socket is gone and the lease still runs (the reconnect window).
    Detached,
    /// `expired`: the lease ran out; the stream stays readable while the gateway keeps it.
    Expired,
    /// `ended`: the runtime finished the run (`runtime.finish`).
    Ended,
}

impl RunState {
    /// Every state, in the schema's order.
    pub const ALL: [RunState; 4] = [
        RunState::Attached,
        RunState::Detached,
        RunState::Expired,
        RunState::Ended,
    ];
}

#[cfg(test)]
mod tests;
