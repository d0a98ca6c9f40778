"""One client socket: opening it with a token, writing request frames and
sorting what arrives into replies, errors and pushes.

Owns the client's view of the frame envelope and of the handshake. Must not
know what any command means or keep state between frames: the runtime and
viewer clients do.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Union
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from .errors import ConnectError, GatewayError, error_from_body

#: A token, or something that hands out a fresh one for each connection
#: (plain or async callable): the gateway closes a socket when its token
#: expires, so a long-lived client asks again at every reconnect.
TokenSource = Callable[[], Union[str, Awaitable[str]]]


async def token_for_connection(fixed: str, source: TokenSource | None) -> str:
    if source is None:
        return fixed
    token = source()
    if not isinstance(token, str):
        token = await token
    return token


def endpoint(url: str, path: str) -> str:
    """``url`` with ``path`` when it names no path of its own
    (``ws://host:7700`` -> ``ws://host:7700/v1/runtime``); ``http(s)`` becomes
    ``ws(s)``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    p = parts.path if parts.path not in ("", "/") else path
    return urlunsplit((scheme, parts.netloc, p, parts.query, parts.fragment))


def _without_query(url: str) -> str:
    # A ?token= must never reach an error message, which callers log.
    return url.split("?", 1)[0].split("#", 1)[0]


@dataclass(frozen=True)
class LinkOptions:
    connect_timeout: float = 10.0
    #: websockets keepalive: a ping every ``ping_interval`` seconds, and the
    #: socket is given up when its pong takes longer than ``ping_timeout``.
    #: This is what notices a stalled (black-holed) link, which sends no FIN.
    ping_interval: float | None = 10.0
    ping_timeout: float | None = 10.0
    max_size: int | None = 16 * 1024 * 1024


async def open_socket(url: str, token: str, options: LinkOptions) -> ClientConnection:
    """Opens ``url`` with ``token`` as a bearer token; :class:`ConnectError` if
    the gateway cannot be reached or refuses."""
    try:
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=options.connect_timeout,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            close_timeout=2,
            max_size=options.max_size,
            proxy=None,
            compression=None,
        )
    except InvalidStatus as e:
        status = e.response.status_code
        code: str | None = None
        details: dict[str, Any] | None = None
        retryable = status not in (400, 401, 403, 404)
        try:
            body = json.loads(e.response.body or b"")
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                g = error_from_body(err)
                code, details, retryable = g.code, g.details, g.retryable
        except ValueError:
            pass
        raise ConnectError(
            f"the gateway refused the connection to {_without_query(url)}: HTTP {status}",
            status=status,
            code=code,
            retryable=retryable,
            details=details,
        ) from None
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
        raise ConnectError(f"cannot connect to {_without_query(url)}: {e}") from None


def request_frame(rid: str, kind: str, payload: dict[str, Any]) -> str:
    return json.dumps({"id": rid, "type": kind, "payload": payload}, separators=(",", ":"))


@dataclass
class Reply:
    id: str
    payload: dict[str, Any]


@dataclass
class ErrorFrame:
    id: str | None
    error: GatewayError


@dataclass
class Push:
    type: str
    payload: dict[str, Any]


Incoming = Union[Reply, ErrorFrame, Push]


def sort(text: str | bytes) -> Incoming | None:
    """Sorts one message; ``None`` for anything that is not a frame of the
    protocol (ignored, as a client must ignore what it does not know)."""
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    if not isinstance(frame, dict):
        return None
    kind = frame.get("type")
    fid = frame.get("id")
    payload = frame.get("payload")
    if kind == "reply":
        if isinstance(fid, str) and isinstance(payload, dict):
            return Reply(fid, payload)
        return None
    if kind == "error":
        body = frame.get("error")
        if not isinstance(body, dict):
            return None
        return ErrorFrame(fid if isinstance(fid, str) else None, error_from_body(body))
    if isinstance(kind, str) and isinstance(payload, dict):
        return Push(kind, payload)
    return None


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential, capped, with full jitter (a uniform
    delay between zero and the bound), so that many clients that lost the
    same gateway do not all come back in one wave."""

    initial: float = 0.1
    max: float = 10.0

    def bound(self, attempt: int) -> float:
        return float(min(self.max, self.initial * (2 ** min(attempt, 30))))

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, self.bound(attempt))
