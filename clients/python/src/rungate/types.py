"""Payload types of protocol v1, as TypedDicts named after their spec/
definitions.

Each class mirrors one ``$defs`` entry of the JSON Schemas under the repo's
``spec/v1/schemas``: required members are the schema's ``required``, the
others are optional (``total=False`` in a subclass, which Python 3.10 can
express without ``NotRequired``). ``tests/test_spec_types.py`` holds every
class to its definition, through the index ``spec/v1/commands.json``
(``COMMANDS`` and ``PUSHES`` below map wire types to classes the same way).

Must not carry behaviour: these describe JSON objects, nothing more.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, Union

Outcome = Literal["completed", "failed", "cancelled"]
RunState = Literal["attached", "detached", "expired", "ended"]
Capability = Literal[
    "secrets.read",
    "kv.read",
    "kv.write",
    "checkpoint.save",
    "checkpoint.load",
    "subtasks.run",
    "stream.resume",
]


# ---------------------------------------------------------------- envelope


class _ErrorBodyRequired(TypedDict):
    code: str
    message: str
    retryable: bool


class ErrorBody(_ErrorBodyRequired, total=False):
    details: dict[str, Any]


# ---------------------------------------------------------------- events


class _OutputEventRequired(TypedDict):
    type: str


class OutputEvent(_OutputEventRequired, total=False):
    """An output event exactly as published (``seq`` is added by the client)."""

    seq: int
    timestamp: str
    data: Any


# ---------------------------------------------------------------- runtime session


class _RuntimeAttachRequestRequired(TypedDict):
    runId: str
    runtimeInstanceId: str
    protocolVersion: str


class RuntimeAttachRequest(_RuntimeAttachRequestRequired, total=False):
    attemptId: str
    reconnect: bool
    connectionEpoch: int
    capabilities: list[str]


class _RuntimeAttachResponseRequired(TypedDict):
    sessionId: str
    runId: str
    heartbeatIntervalMs: int
    leaseExpiresAt: str


class RuntimeAttachResponse(_RuntimeAttachResponseRequired, total=False):
    configVersion: str


class _HeartbeatCommandRequired(TypedDict):
    sessionId: str
    runId: str


class HeartbeatCommand(_HeartbeatCommandRequired, total=False):
    runtimeInstanceId: str
    metadata: dict[str, Any]


class HeartbeatResponse(TypedDict):
    accepted: bool
    nextHeartbeatDueAt: str


class _RecoverConnectionsCommandRequired(TypedDict):
    sessionId: str
    mainRunId: str


class RecoverConnectionsCommand(_RecoverConnectionsCommandRequired, total=False):
    subRunIds: list[str]
    connectionEpoch: int


class RecoverConnectionsResponse(TypedDict):
    accepted: bool


class _GetSecretsCommandRequired(TypedDict):
    sessionId: str
    runId: str


class GetSecretsCommand(_GetSecretsCommandRequired, total=False):
    names: list[str]


class GetSecretsResponse(TypedDict):
    secrets: dict[str, str]


class GetConfigCommand(TypedDict):
    sessionId: str
    runId: str


class GetConfigResponse(TypedDict):
    config: dict[str, Any]


class GetKVCommand(TypedDict):
    sessionId: str
    runId: str
    keys: list[str]


class GetKVResponse(TypedDict):
    kv: dict[str, str]


class SetKVCommand(TypedDict):
    sessionId: str
    runId: str
    kv: dict[str, str]


class SetKVResponse(TypedDict):
    accepted: bool


class DeleteKVCommand(TypedDict):
    sessionId: str
    runId: str
    keys: list[str]


class DeleteKVResponse(TypedDict):
    deleted: int


class PublishOutputEventsRequest(TypedDict):
    sessionId: str
    runId: str
    events: list[OutputEvent]


class PublishOutputEventsResponse(TypedDict):
    accepted: bool


# ---------------------------------------------------------------- checkpoints


class _CheckpointSaveCommandRequired(TypedDict):
    sessionId: str
    runId: str
    data: Any


class CheckpointSaveCommand(_CheckpointSaveCommandRequired, total=False):
    checkpointId: str


class CheckpointSaveResponse(TypedDict):
    checkpointId: str
    savedAt: str


class _CheckpointLoadCommandRequired(TypedDict):
    sessionId: str
    runId: str


class CheckpointLoadCommand(_CheckpointLoadCommandRequired, total=False):
    checkpointId: str


class CheckpointLoadResponse(TypedDict):
    checkpointId: str
    savedAt: str
    data: Any


# ---------------------------------------------------------------- streams


class _StreamResumeCommandRequired(TypedDict):
    runId: str


class StreamResumeCommand(_StreamResumeCommandRequired, total=False):
    fromOffset: int
    streamEpoch: str
    sessionId: str


class StreamResumeResponse(TypedDict):
    runId: str
    streamEpoch: str
    firstOffset: int
    nextOffset: int
    startOffset: int
    truncated: bool
    #: The run ended: replay, then stream.ended at once (lifecycle decisions;
    #: a gateway from before them does not send it, and the client never
    #: reads it: stream.ended itself ends an iterator).
    ended: bool


class _StreamCancelCommandRequired(TypedDict):
    runId: str


class StreamCancelCommand(_StreamCancelCommandRequired, total=False):
    sessionId: str


class StreamCancelResponse(TypedDict):
    accepted: Literal[True]


class RunsListCommand(TypedDict, total=False):
    cursor: str
    limit: int


class _RunSummaryRequired(TypedDict):
    runId: str
    state: RunState
    streamEpoch: str
    firstOffset: int
    nextOffset: int


class RunSummary(_RunSummaryRequired, total=False):
    outcome: Outcome
    endedAt: str
    message: str


class _RunsListResponseRequired(TypedDict):
    runs: list[RunSummary]


class RunsListResponse(_RunsListResponseRequired, total=False):
    nextCursor: str


# ---------------------------------------------------------------- run lifecycle


class _RuntimeFinishCommandRequired(TypedDict):
    sessionId: str
    runId: str
    outcome: Outcome


class RuntimeFinishCommand(_RuntimeFinishCommandRequired, total=False):
    message: str


class RuntimeFinishResponse(TypedDict):
    accepted: bool
    nextOffset: int


class _RunCancelCommandRequired(TypedDict):
    runId: str


class RunCancelCommand(_RunCancelCommandRequired, total=False):
    reason: str


class RunCancelResponse(TypedDict):
    delivered: bool
    ended: bool


# ---------------------------------------------------------------- pushes


class SessionSuperseded(TypedDict):
    sessionId: str
    runId: str
    connectionEpoch: int


class SessionExpired(TypedDict):
    sessionId: str
    runId: str


class GatewayDraining(TypedDict):
    reconnectAfterMs: int


class StreamEvent(TypedDict):
    offset: int
    event: OutputEvent


class StreamEvents(TypedDict):
    runId: str
    streamEpoch: str
    events: list[StreamEvent]


class StreamGap(TypedDict):
    runId: str
    streamEpoch: str
    fromOffset: int
    toOffset: int


class StreamClosed(TypedDict):
    runId: str
    streamEpoch: str


class _StreamEndedRequired(TypedDict):
    runId: str
    streamEpoch: str
    nextOffset: int
    outcome: Outcome
    endedAt: str


class StreamEnded(_StreamEndedRequired, total=False):
    message: str


class _RunCancelRequestedRequired(TypedDict):
    sessionId: str
    runId: str
    requestedAt: str


class RunCancelRequested(_RunCancelRequestedRequired, total=False):
    reason: str


# ---------------------------------------------------------------- the index


#: Command type -> (request payload, reply payload), as spec/v1/commands.json.
COMMANDS: dict[str, tuple[type[Any], type[Any]]] = {
    "runtime.attach": (RuntimeAttachRequest, RuntimeAttachResponse),
    "runtime.heartbeat": (HeartbeatCommand, HeartbeatResponse),
    "runtime.recoverConnections": (RecoverConnectionsCommand, RecoverConnectionsResponse),
    "secrets.get": (GetSecretsCommand, GetSecretsResponse),
    "config.get": (GetConfigCommand, GetConfigResponse),
    "kv.get": (GetKVCommand, GetKVResponse),
    "kv.set": (SetKVCommand, SetKVResponse),
    "kv.delete": (DeleteKVCommand, DeleteKVResponse),
    "events.publish": (PublishOutputEventsRequest, PublishOutputEventsResponse),
    "checkpoint.save": (CheckpointSaveCommand, CheckpointSaveResponse),
    "checkpoint.load": (CheckpointLoadCommand, CheckpointLoadResponse),
    "stream.resume": (StreamResumeCommand, StreamResumeResponse),
    "stream.cancel": (StreamCancelCommand, StreamCancelResponse),
    "runs.list": (RunsListCommand, RunsListResponse),
    "runtime.finish": (RuntimeFinishCommand, RuntimeFinishResponse),
    "run.cancel": (RunCancelCommand, RunCancelResponse),
}

#: Push type -> payload, as spec/v1/commands.json.
PUSHES: dict[str, type[Any]] = {
    "stream.events": StreamEvents,
    "stream.gap": StreamGap,
    "stream.closed": StreamClosed,
    "stream.ended": StreamEnded,
    "session.superseded": SessionSuperseded,
    "session.expired": SessionExpired,
    "gateway.draining": GatewayDraining,
    "run.cancelRequested": RunCancelRequested,
}

#: Definitions reached only through another one, by their spec/ name.
NESTED: dict[str, type[Any]] = {
    "ErrorBody": ErrorBody,
    "OutputEvent": OutputEvent,
    "StreamEvent": StreamEvent,
    "RunSummary": RunSummary,
}
