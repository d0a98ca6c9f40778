"""``RuntimeClient``: one runtime's persistent socket on ``/v1/runtime``,
kept up across network failures, and the ``Run`` handles attached through it.

A background task (the driver) owns the socket. It reads every frame and
matches replies to requests by id (replies may come in any order); it
heartbeats every attached run at the interval the gateway gave; when the
socket is lost it reconnects with jittered exponential backoff, attaches the
main run again with ``reconnect: true`` and a higher ``connectionEpoch``,
moves the sub-runs with ``runtime.recoverConnections`` (dropping, one by one,
those the gateway refuses), and then resends every publish not yet
acknowledged, in its original order, before anything new is sent. Every
published event carries a per-run ``seq``, so the gateway stores a resent
batch once: a cut loses nothing and duplicates nothing.

Requests that were sent but not answered when the socket dropped fail with
``ConnectionLostError`` (they may have been applied); those not yet sent wait
for the next connection. Publishes never fail that way.

Must not know gateway internals: only the frames of PROTOCOL.md and spec/.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence, Union, cast, get_args

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from . import types as t
from ._link import (
    Backoff,
    ErrorFrame,
    LinkOptions,
    Push,
    Reply,
    TokenSource,
    endpoint,
    open_socket,
    request_frame,
    sort,
    token_for_connection,
)
from .errors import (
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    GatewayError,
    NoSessionError,
    RequestTimeoutError,
    RunEndedError,
    RungateError,
    SessionExpiredError,
    StaleEpochError,
)

log = logging.getLogger("rungate")

PROTOCOL_VERSION = "1"
OUTCOMES: tuple[str, ...] = get_args(t.Outcome)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Disconnected:
    """The socket was lost (``code``/``reason``: its close frame, if any;
    1008 ``token expired`` when the token ran out)."""

    code: int | None
    reason: str


@dataclass(frozen=True)
class Reconnected:
    """A new socket carries the sessions again, at this ``connectionEpoch``."""

    epoch: int


@dataclass(frozen=True)
class Draining:
    """The gateway is shutting down; the client reconnects no sooner than
    ``reconnect_after_ms`` from now."""

    reconnect_after_ms: int


@dataclass(frozen=True)
class SessionSuperseded:
    """Another connection took the run over with a higher epoch."""

    run_id: str
    connection_epoch: int | None


@dataclass(frozen=True)
class SessionExpired:
    """The run's lease ran out and its session could not be renewed."""

    run_id: str


@dataclass(frozen=True)
class SessionRenewed:
    """After a reconnect the gateway no longer knew the run's session (its
    lease ran out while the socket was down), so the client attached the run
    afresh: a new session of the same run; unacknowledged publishes follow."""

    run_id: str
    session_id: str


@dataclass(frozen=True)
class RunEnded:
    """The run ended (``finish`` here, or found ended at a reattach)."""

    run_id: str
    outcome: str | None


@dataclass(frozen=True)
class ClientFailed:
    """The client gave up (the gateway refuses its token); every call now
    raises ``error``."""

    error: RungateError


ClientEvent = Union[
    Disconnected,
    Reconnected,
    Draining,
    SessionSuperseded,
    SessionExpired,
    SessionRenewed,
    RunEnded,
    ClientFailed,
]


@dataclass(frozen=True)
class CancelRequest:
    """A viewer asked the run to stop (push ``run.cancelRequested``)."""

    run_id: str
    session_id: str
    reason: str | None
    requested_at: str


# ---------------------------------------------------------------- internals


@dataclass
class _Publication:
    """A publish not yet acknowledged, kept to be resent after a reconnect."""

    run: Run
    events: list[dict[str, Any]]
    future: asyncio.Future[None]
    #: Id of its latest send; None while it waits to be (re)sent.
    rid: str | None = None


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]] | None
    publication: _Publication | None = None


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Marks a future's exception as retrieved (nobody may be waiting)."""
    if not fut.cancelled():
        fut.exception()


def _initial_epoch() -> int:
    # The wall clock in ms: a restarted process of the same runtime instance
    # starts above every epoch its predecessor used (each reconnect adds
    # one), so it can take its sessions over, fencing the predecessor off.
    return max(1, time.time_ns() // 1_000_000)


def _initial_seq() -> int:
    # The wall clock in µs: a restarted runtime continues above the seq its
    # predecessor used for the run, as long as that one published fewer than
    # a million events a second on average.
    return time.time_ns() // 1_000


class _Broadcast:
    """Client events to every ``events()`` iterator open at the time."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[ClientEvent | None]] = []

    def send(self, event: ClientEvent) -> None:
        for q in self._queues:
            q.put_nowait(event)

    def close(self) -> None:
        for q in self._queues:
            q.put_nowait(None)
        self._queues.clear()

    def listen(self) -> AsyncIterator[ClientEvent]:
        # Registered now, not at the first step of the iterator: an event
        # that happens between events() and the first __anext__ is kept.
        q: asyncio.Queue[ClientEvent | None] = asyncio.Queue()
        self._queues.append(q)
        return self._drain(q)

    async def _drain(self, q: asyncio.Queue[ClientEvent | None]) -> AsyncIterator[ClientEvent]:
        try:
            while (item := await q.get()) is not None:
                yield item
        finally:
            if q in self._queues:
                self._queues.remove(q)


# ---------------------------------------------------------------- the run


class KV:
    """A run's key-value store (``kv.get`` needs ``kv.read``, ``kv.set``
    and ``kv.delete`` ``kv.write``). What it holds counts against the
    token's tenant's KV quota (``QuotaExceededError`` past it)."""

    def __init__(self, run: Run) -> None:
        self._run = run

    async def get(self, keys: Iterable[str]) -> dict[str, str]:
        """The values of those of ``keys`` that exist."""
        if isinstance(keys, str):
            raise TypeError("kv.get takes a list of keys")
        reply = await self._run._call("kv.get", {"keys": list(keys)})
        return cast(t.GetKVResponse, reply)["kv"]

    async def set(self, values: Mapping[str, str]) -> None:
        """Sets every key of ``values`` at once (all or nothing)."""
        await self._run._call("kv.set", {"kv": dict(values)})

    async def delete(self, keys: Iterable[str]) -> int:
        """Deletes ``keys`` at once (absent ones are ignored), giving their
        bytes back to the tenant's quota; returns how many held a value."""
        if isinstance(keys, str):
            raise TypeError("kv.delete takes a list of keys")
        reply = await self._run._call("kv.delete", {"keys": list(keys)})
        return cast(t.DeleteKVResponse, reply)["deleted"]


class Checkpoints:
    """A run's checkpoints (``checkpoint.save`` / ``checkpoint.load``
    capabilities)."""

    def __init__(self, run: Run) -> None:
        self._run = run

    async def save(self, data: Any, checkpoint_id: str | None = None) -> t.CheckpointSaveResponse:
        """Saves ``data`` (any JSON value) as the run's latest checkpoint,
        replacing ``checkpoint_id`` if given."""
        payload: dict[str, Any] = {"data": data}
        if checkpoint_id is not None:
            payload["checkpointId"] = checkpoint_id
        return cast(t.CheckpointSaveResponse, await self._run._call("checkpoint.save", payload))

    async def load(self, checkpoint_id: str | None = None) -> t.CheckpointLoadResponse:
        """The latest checkpoint, or the one named; ``NotFoundError`` if none."""
        payload: dict[str, Any] = {}
        if checkpoint_id is not None:
            payload["checkpointId"] = checkpoint_id
        return cast(t.CheckpointLoadResponse, await self._run._call("checkpoint.load", payload))


class Run:
    """One attached run: its session on the client's socket, whichever
    socket that is at the moment."""

    def __init__(
        self,
        client: RuntimeClient,
        reply: t.RuntimeAttachResponse,
        capabilities: list[str],
        attempt_id: str | None,
    ) -> None:
        self._client = client
        self.run_id: str = reply["runId"]
        self.session_id: str = reply["sessionId"]
        self.heartbeat_interval_ms: int = reply["heartbeatIntervalMs"]
        self.config_version: str | None = reply.get("configVersion")
        self.capabilities = capabilities
        self.attempt_id = attempt_id
        self.kv = KV(self)
        self.checkpoints = Checkpoints(self)
        self._next_seq = _initial_seq()
        #: Why the session is over, once it is: every call raises it.
        self._gone: RungateError | None = None
        self._finished: t.RuntimeFinishResponse | None = None
        self._finished_outcome: str | None = None
        self._cancels: asyncio.Queue[CancelRequest | None] = asyncio.Queue()
        self._cancels_seen: set[tuple[str, str | None]] = set()

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, session={self.session_id[:8]}…)"

    @property
    def active(self) -> bool:
        """Whether this client still holds the run's session."""
        return self._gone is None

    @property
    def ended_error(self) -> RungateError | None:
        """Why the session is over (``None`` while it is held)."""
        return self._gone

    def _payload(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"sessionId": self.session_id, "runId": self.run_id, **extra}

    async def _call(self, kind: str, extra: Mapping[str, Any]) -> dict[str, Any]:
        c = self._client
        deadline = c._loop_time() + c.request_timeout
        await c._wait_ready(deadline)
        if self._gone is not None:
            raise self._gone
        ws = c._ws
        if ws is None:
            raise ConnectionLostError()
        try:
            return await c._request(ws, kind, self._payload(extra), deadline - c._loop_time())
        except GatewayError as e:
            c._note_session_error(e, self)
            raise

    # -- commands

    async def heartbeat(self) -> t.HeartbeatResponse:
        """Renews the lease now (the client does it on its own anyway)."""
        return cast(t.HeartbeatResponse, await self._call("runtime.heartbeat", {}))

    async def secrets(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """The run's secrets: all, or the named ones (``NotFoundError`` if one
        is missing). Needs ``secrets.read``."""
        extra: dict[str, Any] = {} if names is None else {"names": list(names)}
        return cast(t.GetSecretsResponse, await self._call("secrets.get", extra))["secrets"]

    async def config(self) -> dict[str, Any]:
        """The run's effective config object."""
        return cast(t.GetConfigResponse, await self._call("config.get", {}))["config"]

    async def publish(self, events: Iterable[Mapping[str, Any]], *, timeout: float | None = None) -> None:
        """Publishes ``events`` (OutputEvent dicts: ``type``, optional
        ``data`` and ``timestamp``) as one batch, after every earlier publish
        of this run. The client assigns ``seq``. Returns once the gateway
        stored them; if the socket drops first, the batch is resent on the
        next one and stored once. ``timeout`` (None: wait as long as it
        takes) raises ``RequestTimeoutError`` but does not withdraw the batch.
        Raises the session's end (``StaleEpochError``, ``SessionExpiredError``,
        ``RunEndedError``) if it ends before the batch is stored."""
        c = self._client
        c._check_open()
        if self._gone is not None:
            raise self._gone
        batch: list[dict[str, Any]] = []
        for e in events:
            if not isinstance(e, Mapping) or not isinstance(e.get("type"), str):
                raise TypeError(f"an output event is a dict with a string 'type': {e!r}")
            if "seq" in e:
                raise ValueError("the client assigns seq; publish events without it")
            batch.append(dict(e))
        if not batch:
            return
        for ev in batch:
            ev["seq"] = self._next_seq
            self._next_seq += 1
        pub = _Publication(self, batch, asyncio.get_running_loop().create_future())
        pub.future.add_done_callback(_quiet)
        c._outbox.append(pub)
        if c._ready.is_set() and c._ws is not None:
            await c._send_publication(c._ws, pub)
        try:
            await asyncio.wait_for(asyncio.shield(pub.future), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(timeout or 0.0) from None

    async def sub_run(
        self,
        run_id: str,
        capabilities: Sequence[str] | None = None,
        attempt_id: str | None = None,
    ) -> Run:
        """Attaches ``run_id`` as a sub-run beside this one (the main session
        must hold ``subtasks.run``); ``capabilities`` default to this run's."""
        caps = list(self.capabilities if capabilities is None else capabilities)
        return await self._client.attach(run_id, capabilities=caps, attempt_id=attempt_id)

    async def cancel_requests(self) -> AsyncIterator[CancelRequest]:
        """Cancels asked for by viewers (``run.cancel``), as they arrive;
        ends when the run's session ends. A pending cancel is pushed again at
        every reattach: each distinct request is yielded once."""
        while (req := await self._cancels.get()) is not None:
            yield req
        self._cancels.put_nowait(None)  # a later iterator ends at once too

    async def finish(self, outcome: str, message: str | None = None) -> t.RuntimeFinishResponse:
        """Ends the run (``"completed"``, ``"failed"`` or ``"cancelled"``)
        once every publish made before has been stored. Safe to repeat; a
        lost answer is asked again after a reconnect (the gateway answers a
        repeated finish of the same outcome the same way). Finishing the main
        run ends its open sub-runs as ``cancelled``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        if self._finished is not None and self._finished_outcome == outcome:
            return self._finished
        if self._gone is not None and not isinstance(self._gone, RunEndedError):
            raise self._gone
        c = self._client
        earlier = [p.future for p in c._outbox if p.run is self]
        if earlier:
            await asyncio.wait(earlier)
        extra: dict[str, Any] = {"outcome": outcome}
        if message is not None:
            extra["message"] = message
        lost = 0
        while True:
            deadline = c._loop_time() + c.request_timeout
            await c._wait_ready(deadline)
            ws = c._ws
            try:
                if ws is None:
                    raise ConnectionLostError()
                reply = await c._request(ws, "runtime.finish", self._payload(extra), deadline - c._loop_time())
                break
            except ConnectionLostError:
                # Idempotent by run: ask again on the next socket.
                lost += 1
                if lost > 10:
                    raise
        result = cast(t.RuntimeFinishResponse, reply)
        self._finished, self._finished_outcome = result, outcome
        c._run_ended(self, outcome, message)
        return result

    # -- session end

    def _end(self, error: RungateError) -> None:
        """The session is over for good: fail its publishes, end its cancels."""
        if self._gone is not None:
            return
        self._gone = error
        c = self._client
        keep: list[_Publication] = []
        for p in c._outbox:
            if p.run is self:
                if not p.future.done():
                    p.future.set_exception(error)
            else:
                keep.append(p)
        c._outbox[:] = keep
        self._cancels.put_nowait(None)

    def _cancel_pushed(self, payload: Mapping[str, Any]) -> None:
        reason = payload.get("reason")
        reason = reason if isinstance(reason, str) else None
        at = str(payload.get("requestedAt", ""))
        if (at, reason) in self._cancels_seen or self._gone is not None:
            return
        self._cancels_seen.add((at, reason))
        self._cancels.put_nowait(
            CancelRequest(self.run_id, str(payload.get("sessionId", "")), reason, at)
        )


# ---------------------------------------------------------------- the client


class RuntimeClient:
    """A runtime's connection to the gateway (``ws://HOST:PORT``, or the full
    ``.../v1/runtime`` URL).

    ``async with RuntimeClient(url, token) as rt: run = await rt.attach(...)``.
    ``token_source`` (a plain or async callable returning a token) is asked at
    every connection instead of using ``token``: the gateway closes a socket
    when its token expires, and the reconnect presents a fresh one.
    ``runtime_instance_id`` is this runtime's identity (a random one by
    default); a process that restarts with the same one takes its runs over.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        token_source: TokenSource | None = None,
        runtime_instance_id: str | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.url = endpoint(url, "/v1/runtime")
        self._token = token
        self._token_source = token_source
        self.runtime_instance_id = runtime_instance_id or f"py-{uuid.uuid4().hex}"
        self.request_timeout = request_timeout
        self._link = LinkOptions(connect_timeout, ping_interval, ping_timeout)
        self._backoff = backoff
        self._epoch = _initial_epoch()
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._runs: dict[str, Run] = {}
        self._main: Run | None = None
        self._pending: dict[str, _Pending] = {}
        self._outbox: list[_Publication] = []
        self._next_id = 0
        self._send_lock = asyncio.Lock()
        self._driver: asyncio.Task[None] | None = None
        self._fatal: RungateError | None = None
        self._heartbeat_s: float | None = None
        self._not_before = 0.0
        self._events = _Broadcast()
        self._beats: set[asyncio.Task[None]] = set()

    # -- public

    @property
    def epoch(self) -> int:
        """The ``connectionEpoch`` of the current (or next) socket."""
        return self._epoch

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._ws is not None and self._fatal is None

    @property
    def runs(self) -> list[Run]:
        """The runs whose sessions this client holds, the main run first."""
        return [r for r in self._runs.values() if r.active]

    def events(self) -> AsyncIterator[ClientEvent]:
        """Connection and session events from now on, until the client closes."""
        return self._events.listen()

    async def __aenter__(self) -> RuntimeClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Opens the first socket (``ConnectError`` if that fails) and starts
        the driver; later losses are handled by the driver."""
        if self._driver is not None:
            return
        token = await token_for_connection(self._token, self._token_source)
        ws = await open_socket(self.url, token, self._link)
        self._ws = ws
        self._ready.set()
        self._driver = asyncio.create_task(self._drive(ws), name="rungate-runtime-driver")

    async def close(self) -> None:
        """Closes the socket. Unacknowledged publishes fail with
        ``ClientClosedError``; the sessions stay on the gateway until their
        leases run out (finish a run to end it)."""
        if self._fatal is None:
            self._fatal = ClientClosedError()
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        self._shut_down(self._fatal)

    async def attach(
        self,
        run_id: str,
        capabilities: Sequence[str] = (),
        attempt_id: str | None = None,
    ) -> Run:
        """Attaches ``run_id``. The first run attached is the main run; later
        ones are its sub-runs (the main session needs ``subtasks.run``).
        Attaching a run this client holds returns the same ``Run``. A run held
        by an earlier process of the same ``runtime_instance_id`` is taken
        over (``reconnect: true`` at this client's higher epoch)."""
        existing = self._runs.get(run_id)
        if existing is not None and existing.active:
            return existing
        caps = list(capabilities)
        take_over = False
        tries = 0
        while True:
            deadline = self._loop_time() + self.request_timeout
            await self._wait_ready(deadline)
            ws = self._ws
            payload = self._attach_payload(run_id, caps, attempt_id, take_over)
            try:
                if ws is None:
                    raise ConnectionLostError()
                reply = await self._request(ws, "runtime.attach", payload, deadline - self._loop_time())
                break
            except ConnectionLostError:
                # The attach may have been applied on the lost socket: the
                # retry meets CONFLICT and takes our own session over.
                tries += 1
                if tries > 10:
                    raise
            except GatewayError as e:
                tries += 1
                if e.code == "CONFLICT" and not take_over and tries <= 3:
                    take_over = True
                elif e.code == "SESSION_EXPIRED" and take_over and tries <= 3:
                    take_over = False
                else:
                    raise
        run = Run(self, cast(t.RuntimeAttachResponse, reply), caps, attempt_id)
        self._runs[run_id] = run
        if self._main is None or not self._main.active:
            self._main = run
        if self._heartbeat_s is None:
            self._heartbeat_s = run.heartbeat_interval_ms / 1000
        return run

    # -- plumbing used by Run

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_open()
            if self._ready.is_set() and self._ws is not None:
                return
            remaining = deadline - self._loop_time()
            if remaining <= 0:
                raise RequestTimeoutError(self.request_timeout)
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(self.request_timeout) from None

    def _new_id(self) -> str:
        self._next_id += 1
        return f"p{self._next_id}"

    async def _send(self, ws: ClientConnection, rid: str, kind: str, payload: dict[str, Any]) -> None:
        # One lock, taken in call order, keeps frames in the order they
        # were made: publishes of a run must reach the gateway in seq order.
        async with self._send_lock:
            await ws.send(request_frame(rid, kind, payload))

    async def _request(
        self, ws: ClientConnection, kind: str, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        rid = self._new_id()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_quiet)
        self._pending[rid] = _Pending(fut)
        try:
            await self._send(ws, rid, kind, payload)
        except ConnectionClosed:
            self._pending.pop(rid, None)
            raise ConnectionLostError() from None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(timeout, 0.001))
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise RequestTimeoutError(self.request_timeout) from None

    async def _send_publication(self, ws: ClientConnection, pub: _Publication) -> None:
        rid = self._new_id()
        pub.rid = rid
        self._pending[rid] = _Pending(None, pub)
        payload = pub.run._payload({"events": pub.events})
        try:
            await self._send(ws, rid, "events.publish", payload)
        except ConnectionClosed:
            # The reader sees the loss too; the publication stays queued.
            pass

    def _attach_payload(
        self, run_id: str, caps: list[str], attempt_id: str | None, reconnect: bool
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "runId": run_id,
            "runtimeInstanceId": self.runtime_instance_id,
            "protocolVersion": PROTOCOL_VERSION,
            "connectionEpoch": self._epoch,
            "capabilities": caps,
        }
        if attempt_id is not None:
            payload["attemptId"] = attempt_id
        if reconnect:
            payload["reconnect"] = True
        return payload

    def _note_session_error(self, e: GatewayError, run: Run | None) -> None:
        """A session-ending error on ``run`` (or the run the error names)."""
        named = self._runs.get(e.run_id or "") or run
        if named is None:
            return
        if e.code == "STALE_EPOCH":
            self._session_gone(named, e)
        elif e.code == "SESSION_EXPIRED":
            self._session_gone(named, e)
        elif e.code == "RUN_ENDED":
            outcome = e.details.get("outcome")
            self._session_gone(named, e)
            self._events.send(RunEnded(named.run_id, outcome if isinstance(outcome, str) else None))

    def _session_gone(self, run: Run, error: RungateError) -> None:
        if not run.active:
            return
        run._end(error)
        if isinstance(error, StaleEpochError):
            epoch = error.details.get("connectionEpoch")
            self._events.send(SessionSuperseded(run.run_id, epoch if isinstance(epoch, int) else None))
        elif isinstance(error, SessionExpiredError):
            self._events.send(SessionExpired(run.run_id))

    def _run_ended(self, run: Run, outcome: str, message: str | None) -> None:
        run._end(
            RunEndedError(
                f"run {run.run_id} finished ({outcome})",
                details={"runId": run.run_id, "outcome": outcome},
            )
        )
        self._events.send(RunEnded(run.run_id, outcome))
        if run is self._main:
            for sub in list(self._runs.values()):
                if sub is not run and sub.active:
                    sub._end(
                        RunEndedError(
                            f"run {sub.run_id} ended with its main run",
                            details={"runId": sub.run_id, "outcome": "cancelled"},
                        )
                    )
                    self._events.send(RunEnded(sub.run_id, "cancelled"))

    # -- the driver

    async def _drive(self, ws: ClientConnection | None) -> None:
        restore = False
        attempt = 0
        try:
            while True:
                if ws is None:
                    ws = await self._dial(attempt)
                    if ws is None:
                        attempt += 1
                        continue
                    restore = True
                self._ws = ws
                restored = await self._serve(ws, restore)
                self._lost(ws)
                attempt = 0 if restored else attempt + 1
                ws = None
        except asyncio.CancelledError:
            raise
        except _GiveUp as g:
            self._fatal = g.error
            self._events.send(ClientFailed(g.error))
            self._shut_down(g.error)
        except Exception as e:  # a bug here must not leave callers hanging
            log.exception("rungate runtime driver failed")
            err = ClientClosedError(f"the client's driver failed: {e!r}")
            self._fatal = err
            self._shut_down(err)

    async def _dial(self, attempt: int) -> ClientConnection | None:
        loop = asyncio.get_running_loop()
        wake = max(loop.time() + self._backoff.delay(attempt), self._not_before)
        await asyncio.sleep(max(0.0, wake - loop.time()))
        try:
            token = await token_for_connection(self._token, self._token_source)
            ws = await open_socket(self.url, token, self._link)
        except ConnectError as e:
            if e.is_refusal:
                raise _GiveUp(e) from None
            log.debug("reconnect attempt %d failed: %s", attempt, e)
            return None
        except Exception as e:  # a token source that failed this time
            log.warning("reconnect attempt %d failed: %r", attempt, e)
            return None
        self._epoch += 1
        return ws

    async def _serve(self, ws: ClientConnection, restore: bool) -> bool:
        """Reads ``ws`` until it is lost; restores the sessions first on a new
        socket. False if the socket failed before the restore finished."""
        reader = asyncio.create_task(self._read(ws), name="rungate-runtime-reader")
        heartbeats: asyncio.Task[None] | None = None
        try:
            if restore:
                ok = await self._restore(ws)
                if not ok:
                    await ws.close()
                    await reader
                    return False
                self._ready.set()
                self._events.send(Reconnected(self._epoch))
            heartbeats = asyncio.create_task(self._heartbeat_loop(ws), name="rungate-heartbeats")
            await reader
            return True
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = sort(message)
                if frame is not None:
                    self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            # At once, not when the driver gets to it: a restore waiting for
            # an answer on this socket must learn now that none will come.
            self._fail_pending()

    def _dispatch(self, frame: Reply | ErrorFrame | Push) -> None:
        if isinstance(frame, Push):
            self._pushed(frame)
            return
        if frame.id is None:
            assert isinstance(frame, ErrorFrame)
            log.warning("the gateway refused a frame of this client: %s", frame.error)
            return
        pending = self._pending.pop(frame.id, None)
        if pending is None:
            return
        pub = pending.publication
        if pub is not None:
            if isinstance(frame, ErrorFrame) and frame.error.code == "DRAINING":
                # The gateway refuses every request after its draining push,
                # so no later batch of ours was stored either: this one and
                # those after it go out again, in order, on the next socket.
                pub.rid = None
                return
            if pub in self._outbox:
                self._outbox.remove(pub)
            if isinstance(frame, Reply):
                if not pub.future.done():
                    pub.future.set_result(None)
            else:
                self._note_session_error(frame.error, pub.run)
                if not pub.future.done():
                    pub.future.set_exception(frame.error)
            return
        fut = pending.future
        if fut is None or fut.done():
            return
        if isinstance(frame, Reply):
            fut.set_result(frame.payload)
        else:
            fut.set_exception(frame.error)

    def _pushed(self, push: Push) -> None:
        p = push.payload
        run = self._runs.get(str(p.get("runId", "")))
        same_session = run is not None and p.get("sessionId") == run.session_id
        if push.type == "session.superseded" and run is not None and same_session:
            epoch = p.get("connectionEpoch")
            self._session_gone(
                run,
                StaleEpochError(
                    f"run {run.run_id} was taken over by connection epoch {epoch}",
                    details={"runId": run.run_id, "connectionEpoch": epoch},
                ),
            )
        elif push.type == "session.expired" and run is not None and same_session:
            self._session_gone(
                run,
                SessionExpiredError(f"the lease of run {run.run_id} ran out", details={"runId": run.run_id}),
            )
        elif push.type == "gateway.draining":
            ms = p.get("reconnectAfterMs")
            ms = ms if isinstance(ms, int) else 1000
            self._not_before = asyncio.get_running_loop().time() + ms / 1000
            self._events.send(Draining(ms))
        elif push.type == "run.cancelRequested" and run is not None:
            run._cancel_pushed(p)
        # Anything else (stream pushes, types added later) is ignored.

    async def _heartbeat_loop(self, ws: ClientConnection) -> None:
        while True:
            if self._heartbeat_s is None:
                # Nothing attached yet: the first attach reply sets it.
                await asyncio.sleep(0.1)
                continue
            await asyncio.sleep(self._heartbeat_s)
            for run in self.runs:
                # Each in its own task: a slow answer must not delay the
                # others. Kept referenced until done (asyncio holds only weak
                # references to tasks).
                task = asyncio.create_task(self._heartbeat(ws, run))
                self._beats.add(task)
                task.add_done_callback(self._beats.discard)

    async def _heartbeat(self, ws: ClientConnection, run: Run) -> None:
        try:
            await self._request(ws, "runtime.heartbeat", run._payload({}), self.request_timeout)
        except GatewayError as e:
            log.debug("heartbeat of %s refused: %s", run.run_id, e)
            self._note_session_error(e, run)
        except RungateError:
            pass  # the socket is going; the reconnect heartbeats again

    def _lost(self, ws: ClientConnection) -> None:
        """The socket is gone: answer what cannot be resent, keep the rest."""
        if self._ws is ws:
            self._ws = None
        self._fail_pending()
        self._events.send(Disconnected(ws.close_code, ws.close_reason or ""))

    def _fail_pending(self) -> None:
        """Requests in flight on the lost socket: calls fail with
        ``ConnectionLostError``, publishes wait to be sent again."""
        self._ready.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.publication is not None:
                entry.publication.rid = None
            elif entry.future is not None and not entry.future.done():
                # Closing: say so, rather than "lost".
                entry.future.set_exception(self._fatal or ConnectionLostError())

    async def _restore(self, ws: ClientConnection) -> bool:
        """On a new socket: main run, sub-runs, then the unacknowledged
        publishes in order. False if the socket failed meanwhile (or the
        gateway said "later"), to try again on another."""
        timeout = self.request_timeout
        main = self._main
        live = self.runs
        if live and (main is None or not main.active):
            # Sub-runs cannot move without their main session.
            for r in live:
                self._session_gone(r, SessionExpiredError(f"the main run of {r.run_id} is gone"))
        elif main is not None and main.active:
            try:
                await self._request(
                    ws,
                    "runtime.attach",
                    self._attach_payload(main.run_id, main.capabilities, main.attempt_id, True),
                    timeout,
                )
            except (ConnectionLostError, RequestTimeoutError):
                return False
            except GatewayError as e:
                if e.code == "SESSION_EXPIRED":
                    renewed = await self._renew(ws, main)
                    if renewed is None:
                        return False
                    if not renewed:
                        self._all_gone(e)
                elif e.code == "RUN_ENDED":
                    self._all_gone(e)
                elif e.retryable:
                    log.info("reattach of %s refused for now: %s", main.run_id, e)
                    return False
                else:
                    log.warning("main run %s could not be reattached: %s", main.run_id, e)
                    self._all_gone(e)
            if main.active and not await self._recover_subs(ws, main):
                return False
        # Publishes, oldest first; one made meanwhile joins the end of the
        # queue and is sent here too (nothing else sends until ready).
        while True:
            pub = next((p for p in self._outbox if p.rid is None), None)
            if pub is None:
                break
            await self._send_publication(ws, pub)
            if ws.close_code is not None:
                return False
        return True

    async def _recover_subs(self, ws: ClientConnection, main: Run) -> bool:
        while True:
            subs = [r for r in self.runs if r is not main]
            if not subs:
                return True
            try:
                await self._request(
                    ws,
                    "runtime.recoverConnections",
                    {
                        "sessionId": main.session_id,
                        "mainRunId": main.run_id,
                        "subRunIds": [r.run_id for r in subs],
                        "connectionEpoch": self._epoch,
                    },
                    self.request_timeout,
                )
                return True
            except (ConnectionLostError, RequestTimeoutError):
                return False
            except GatewayError as e:
                if e.retryable:
                    return False
                named = next((r for r in subs if r.run_id == e.run_id), None)
                if named is None:
                    for r in subs:
                        self._session_gone(r, e)
                    continue
                if e.code == "SESSION_EXPIRED":
                    renewed = await self._renew(ws, named)
                    if renewed is None:
                        return False
                    if renewed:
                        continue
                self._session_gone(named, e)
                if e.code == "RUN_ENDED":
                    outcome = e.details.get("outcome")
                    self._events.send(RunEnded(named.run_id, outcome if isinstance(outcome, str) else None))

    async def _renew(self, ws: ClientConnection, run: Run) -> bool | None:
        """Attaches ``run`` afresh after the gateway forgot its session; its
        unacknowledged publishes move to the new session. None if the socket
        failed."""
        try:
            reply = await self._request(
                ws,
                "runtime.attach",
                self._attach_payload(run.run_id, run.capabilities, run.attempt_id, False),
                self.request_timeout,
            )
        except (ConnectionLostError, RequestTimeoutError):
            return None
        except GatewayError as e:
            log.warning("could not attach %s afresh: %s", run.run_id, e)
            return False
        sid = reply.get("sessionId")
        if not isinstance(sid, str):
            return False
        run.session_id = sid
        self._events.send(SessionRenewed(run.run_id, sid))
        return True

    def _all_gone(self, error: GatewayError) -> None:
        """The main run could not be restored: without it no sub-run can be."""
        outcome = error.details.get("outcome")
        for r in self.runs:
            self._session_gone(r, error)
            if error.code == "RUN_ENDED":
                ended = outcome if r is self._main and isinstance(outcome, str) else "cancelled"
                self._events.send(RunEnded(r.run_id, ended))

    def _shut_down(self, error: RungateError) -> None:
        """The client is closing (or gave up): answer everyone still waiting."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)
        for r in list(self._runs.values()):
            r._end(error)
        for p in self._outbox:
            if not p.future.done():
                p.future.set_exception(error)
        self._outbox.clear()
        self._ready.set()  # wakes waiters, who then see the error
        self._events.close()


class _GiveUp(Exception):
    def __init__(self, error: RungateError) -> None:
        super().__init__(str(error))
        self.error = error


__all__ = [
    "CancelRequest",
    "ClientEvent",
    "ClientFailed",
    "Disconnected",
    "Draining",
    "KV",
    "Checkpoints",
    "NoSessionError",
    "Reconnected",
    "Run",
    "RunEnded",
    "RuntimeClient",
    "SessionExpired",
    "SessionRenewed",
    "SessionSuperseded",
]
