"""``ViewerClient``: reads runs' output streams on ``/v1/stream`` and resumes
them after any disconnect (a cut, a stall, a gateway restart) from the last
offset it delivered, so the caller sees every event once, in order.

Each ``events()`` iterator has its own socket: it remembers the next offset
owed to the caller and the stream epoch, and after a lost socket (or
``gateway.draining``) reconnects with backoff and sends ``stream.resume``
from exactly there. What it cannot hide it hands over as typed items: a
resume that comes back ``truncated`` (history gone, or a new stream epoch),
a ``stream.gap`` (the reader fell behind the ring), a ``stream.closed`` (the
stream was dropped; the iterator follows the run's next stream by itself).
It ends by itself after ``stream.ended``.

The iterator reads its socket only when the caller asks for the next item,
so a slow caller makes the gateway, not this process, hold the backlog (and
answer with a gap when it is too much).

``runs()`` and ``cancel()`` use one more socket, opened when needed.
Must not know gateway internals: only frames.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, AsyncGenerator, Literal, Union, cast

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
    RequestTimeoutError,
    RungateError,
)

log = logging.getLogger("rungate")


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class EventItem:
    """One output event, in offset order; ``event`` is the OutputEvent dict
    exactly as the runtime published it (``seq`` included)."""

    offset: int
    event: t.OutputEvent
    stream_epoch: str
    kind: Literal["event"] = "event"


@dataclass(frozen=True)
class GapItem:
    """Offsets ``from_offset`` to ``to_offset`` (both inclusive) were dropped
    before this reader got them; delivery goes on at ``to_offset + 1``."""

    from_offset: int
    to_offset: int
    stream_epoch: str
    kind: Literal["gap"] = "gap"

    @property
    def missed(self) -> int:
        return self.to_offset - self.from_offset + 1


@dataclass(frozen=True)
class TruncatedItem:
    """A (re)subscription could not start where the reader was: the events
    from ``requested_offset`` to ``start_offset - 1`` are gone, or the stream's
    history was replaced (``previous_epoch`` differs from ``stream_epoch``,
    and offsets start over). Delivery goes on at ``start_offset``."""

    requested_offset: int | None
    start_offset: int
    first_offset: int
    next_offset: int
    stream_epoch: str
    previous_epoch: str | None
    kind: Literal["truncated"] = "truncated"

    @property
    def epoch_changed(self) -> bool:
        return self.previous_epoch is not None and self.previous_epoch != self.stream_epoch


@dataclass(frozen=True)
class ClosedItem:
    """The gateway dropped the stream being read (``stream.closed``); the
    iterator resumes the run's next stream (a ``TruncatedItem`` follows)."""

    stream_epoch: str
    kind: Literal["closed"] = "closed"


@dataclass(frozen=True)
class EndedItem:
    """The run ended (``stream.ended``): the last item of the iterator."""

    outcome: t.Outcome
    message: str | None
    next_offset: int
    ended_at: str
    stream_epoch: str
    kind: Literal["ended"] = "ended"


StreamItem = Union[EventItem, GapItem, TruncatedItem, ClosedItem, EndedItem]


# ---------------------------------------------------------------- one stream


class EventStream:
    """An async iterator over one run's stream (``ViewerClient.events``).

    After it ends, ``outcome`` (and ``ended``) tell how the run ended.
    ``next_offset`` is the offset it would deliver next; ``stream_epoch`` the
    epoch of what it delivered."""

    def __init__(self, viewer: ViewerClient, run_id: str, from_offset: int | None) -> None:
        self._viewer = viewer
        self.run_id = run_id
        self.next_offset: int | None = from_offset
        self.stream_epoch: str | None = None
        self.ended: EndedItem | None = None
        #: How many sockets it opened (1 + reconnects), for the curious.
        self.connections = 0
        #: How many of its sockets were lost (cut, stalled, closed).
        self.losses = 0
        self._gen: AsyncGenerator[StreamItem, None] = self._run()

    @property
    def outcome(self) -> t.Outcome | None:
        return self.ended.outcome if self.ended is not None else None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamItem:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _resume_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"runId": self.run_id}
        if self.next_offset is not None:
            payload["fromOffset"] = self.next_offset
        if self.stream_epoch is not None:
            payload["streamEpoch"] = self.stream_epoch
        return payload

    async def _run(self) -> AsyncGenerator[StreamItem, None]:
        v = self._viewer
        loop = asyncio.get_running_loop()
        attempt = 0
        not_before = 0.0
        rid = 0
        while True:
            v._check_open()
            if attempt > 0 or not_before > loop.time():
                wake = max(loop.time() + v._backoff.delay(attempt - 1 if attempt else 0), not_before)
                await asyncio.sleep(max(0.0, wake - loop.time()))
            try:
                ws = await v._open()
            except ConnectError as e:
                if e.is_refusal:
                    raise
                attempt += 1
                continue
            self.connections += 1
            v._sockets.add(ws)
            try:
                rid += 1
                waiting_for = f"resume-{rid}"
                await ws.send(request_frame(waiting_for, "stream.resume", self._resume_payload()))
                async for message in ws:
                    frame = sort(message)
                    if isinstance(frame, Reply) and frame.id == waiting_for:
                        info = cast(t.StreamResumeResponse, frame.payload)
                        attempt = 0
                        truncated = self._resumed(info)
                        if truncated is not None:
                            yield truncated
                    elif isinstance(frame, ErrorFrame) and frame.id == waiting_for:
                        if frame.error.retryable:
                            break
                        raise frame.error  # the token does not cover the run, say
                    elif isinstance(frame, Push):
                        p = frame.payload
                        if frame.type == "gateway.draining":
                            ms = p.get("reconnectAfterMs")
                            not_before = loop.time() + (ms if isinstance(ms, int) else 1000) / 1000
                            continue
                        if p.get("runId") != self.run_id:
                            continue
                        if frame.type == "stream.events":
                            # The epoch these offsets belong to is the one to
                            # resume with (a stream two gateways created at
                            # once may take the other's epoch while still
                            # empty, without a close: spec/README.md).
                            self.stream_epoch = cast(t.StreamEvents, p)["streamEpoch"]
                            for event_item in self._events(cast(t.StreamEvents, p)):
                                # Moved per item, so it always names what the
                                # caller is owed next.
                                self.next_offset = event_item.offset + 1
                                yield event_item
                        elif frame.type == "stream.gap":
                            g = cast(t.StreamGap, p)
                            self.next_offset = g["toOffset"] + 1
                            yield GapItem(g["fromOffset"], g["toOffset"], g["streamEpoch"])
                        elif frame.type == "stream.closed":
                            c = cast(t.StreamClosed, p)
                            yield ClosedItem(c["streamEpoch"])
                            rid += 1
                            waiting_for = f"resume-{rid}"
                            await ws.send(request_frame(waiting_for, "stream.resume", self._resume_payload()))
                        elif frame.type == "stream.ended":
                            end = cast(t.StreamEnded, p)
                            self.ended = EndedItem(
                                end["outcome"],
                                end.get("message"),
                                end["nextOffset"],
                                end["endedAt"],
                                end["streamEpoch"],
                            )
                            yield self.ended
                            return
            except ConnectionClosed:
                pass
            finally:
                v._sockets.discard(ws)
                await ws.close()
            self.losses += 1
            attempt += 1

    def _resumed(self, info: t.StreamResumeResponse) -> TruncatedItem | None:
        previous_epoch, requested = self.stream_epoch, self.next_offset
        self.stream_epoch = info["streamEpoch"]
        self.next_offset = info["startOffset"]
        if info["truncated"]:
            return TruncatedItem(
                requested,
                info["startOffset"],
                info["firstOffset"],
                info["nextOffset"],
                info["streamEpoch"],
                previous_epoch,
            )
        return None

    def _events(self, push: t.StreamEvents) -> list[EventItem]:
        out: list[EventItem] = []
        floor = self.next_offset
        for e in push["events"]:
            offset = e["offset"]
            # Never hand the caller an offset twice.
            if floor is not None and offset < floor:
                continue
            floor = offset + 1
            out.append(EventItem(offset, e["event"], push["streamEpoch"]))
        return out


# ---------------------------------------------------------------- the client


class ViewerClient:
    """Reads runs' output on ``/v1/stream`` (``ws://HOST:PORT`` or the full
    URL) with a viewer token; ``token_source`` as for ``RuntimeClient``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        token_source: TokenSource | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.url = endpoint(url, "/v1/stream")
        self._token = token
        self._token_source = token_source
        self.request_timeout = request_timeout
        self._link = LinkOptions(connect_timeout, ping_interval, ping_timeout)
        self._backoff = backoff
        self._closed = False
        self._sockets: set[ClientConnection] = set()
        self._control: ClientConnection | None = None
        self._control_reader: asyncio.Task[None] | None = None
        self._control_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0

    async def __aenter__(self) -> ViewerClient:
        # Connect once now, so a refused token fails here, not later.
        await self._control_socket()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes every socket; open ``events()`` iterators raise
        ``ClientClosedError`` at their next step."""
        self._closed = True
        for ws in list(self._sockets):
            await ws.close()
        if self._control is not None:
            await self._control.close()
        if self._control_reader is not None:
            await asyncio.gather(self._control_reader, return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError()

    async def _open(self) -> ClientConnection:
        token = await token_for_connection(self._token, self._token_source)
        return await open_socket(self.url, token, self._link)

    def events(self, run_id: str, from_offset: int | None = 0) -> EventStream:
        """The run's events from ``from_offset`` (0: everything kept; None:
        live from the head), resuming across reconnects and restarts, until
        the run ends."""
        self._check_open()
        return EventStream(self, run_id, from_offset)

    async def runs(self) -> list[t.RunSummary]:
        """Every run this token covers (``runs.list``, page after page)."""
        runs: list[t.RunSummary] = []
        payload: dict[str, Any] = {}
        while True:
            page = cast(t.RunsListResponse, await self.request("runs.list", payload))
            runs.extend(page["runs"])
            cursor = page.get("nextCursor")
            if cursor is None:
                return runs
            payload = {"cursor": cursor}

    async def cancel(self, run_id: str, reason: str | None = None) -> t.RunCancelResponse:
        """Asks the run's runtime to stop (``run.cancel``; the token needs the
        ``run.cancel`` capability). ``delivered``: its socket got the push now
        (otherwise it gets it when it reattaches); ``ended``: the run had
        already ended."""
        payload: dict[str, Any] = {"runId": run_id}
        if reason is not None:
            payload["reason"] = reason
        return cast(t.RunCancelResponse, await self.request("run.cancel", payload))

    async def request(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Any command of ``/v1/stream``, answered on the control socket; a
        lost socket is replaced and the request asked again (the viewer's
        commands are safe to repeat)."""
        lost = 0
        while True:
            ws = await self._control_socket()
            self._next_id += 1
            rid = f"v{self._next_id}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                await ws.send(request_frame(rid, kind, payload))
                return await asyncio.wait_for(asyncio.shield(fut), self.request_timeout)
            except (ConnectionClosed, ConnectionLostError):
                lost += 1
                if lost > 3:
                    raise ConnectionLostError() from None
                await asyncio.sleep(self._backoff.delay(lost))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(self.request_timeout) from None
            finally:
                self._pending.pop(rid, None)

    async def _control_socket(self) -> ClientConnection:
        self._check_open()
        async with self._control_lock:
            ws = self._control
            if ws is not None and ws.close_code is None and self._control_reader is not None and not self._control_reader.done():
                return ws
            ws = await self._open()
            self._control = ws
            self._control_reader = asyncio.create_task(self._read_control(ws))
            return ws

    async def _read_control(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = sort(message)
                if isinstance(frame, (Reply, ErrorFrame)) and frame.id is not None:
                    fut = self._pending.get(frame.id)
                    if fut is None or fut.done():
                        continue
                    if isinstance(frame, Reply):
                        fut.set_result(frame.payload)
                    else:
                        fut.set_exception(frame.error)
        except ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionLostError())


__all__ = [
    "ClosedItem",
    "EndedItem",
    "EventItem",
    "EventStream",
    "GapItem",
    "StreamItem",
    "TruncatedItem",
    "ViewerClient",
    "GatewayError",
    "RungateError",
]
