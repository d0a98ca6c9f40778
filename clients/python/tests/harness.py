"""Test helpers: a real ``rungate`` gateway process, tokens minted by its
CLI, and a TCP proxy that can cut, stall and refuse connections.

Nothing here imitates the gateway: every test talks to the binary named by
``RUNGATE_BIN`` (default ``<repo>/target/debug/rungate``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable, TypedDict, TypeVar

from rungate import Backoff

REPO = Path(__file__).resolve().parents[3]
BIN = os.environ.get("RUNGATE_BIN") or str(REPO / "target" / "debug" / "rungate")
SPEC = REPO / "spec"

#: Generous: the machine may be slow and shared.
WAIT = 60.0

T = TypeVar("T")


async def within(what: str, aw: Awaitable[T], limit: float = WAIT) -> T:
    try:
        return await asyncio.wait_for(aw, limit)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: not within {limit} s") from None


async def eventually(what: str, cond: Callable[[], bool], limit: float = WAIT) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.05)

    await within(what, poll(), limit)


class Gateway:
    """``rungate serve`` on 127.0.0.1:0 with a fresh data dir; the address
    comes from its first stdout line (``listening on ADDR``)."""

    def __init__(self, data_dir: Path, extra: list[str]) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: asyncio.subprocess.Process | None = None
        self.addr = ""

    @property
    def key_file(self) -> Path:
        return self.data_dir / "auth.key"

    @property
    def url(self) -> str:
        return f"ws://{self.addr}"

    async def start(self, listen: str = "127.0.0.1:0") -> Gateway:
        self.proc = await asyncio.create_subprocess_exec(
            BIN,
            "serve",
            "--listen",
            listen,
            "--data-dir",
            str(self.data_dir),
            *self.extra,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "RUNGATE_LOG": os.environ.get("RUNGATE_LOG", "warn")},
        )
        assert self.proc.stdout is not None
        line = (await within("the gateway prints its address", self.proc.stdout.readline())).decode()
        assert line.startswith("listening on "), line
        self.addr = line.removeprefix("listening on ").strip()
        return self

    async def kill(self) -> None:
        """``kill -9``: no drain, no flush."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def terminate(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await within("the gateway exits", self.proc.wait())

    async def restart(self) -> None:
        """Kill -9, then start again on a new port with the same data."""
        await self.kill()
        await self.start()

    def token(self, kind: str, runs: str, caps: str = "", ttl: str = "1h") -> str:
        return mint(self.key_file, kind, runs, caps, ttl)


def mint(key_file: Path, kind: str, runs: str, caps: str = "", ttl: str = "1h") -> str:
    out = subprocess.run(
        [BIN, "token", "--auth-key-file", str(key_file), "--kind", kind, "--runs", runs, "--caps", caps, "--ttl", ttl],
        check=True,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return out.stdout.strip()


ALL_CAPS = "secrets.read,kv.read,kv.write,checkpoint.save,checkpoint.load,subtasks.run,stream.resume"
ALL_CAP_LIST = ALL_CAPS.split(",")


class Proxy:
    """A TCP proxy in front of the gateway. ``cut()`` closes every
    connection (RST-like); ``stall()`` keeps them open and forwards nothing
    (a black hole); ``refuse`` makes new connections close at once.
    ``upstream`` can be changed (a gateway restarted on another port)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse = False
        self.connections = 0
        self._stalled = asyncio.Event()
        self._stalled.set()  # set = flowing
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.base_events.Server | None = None
        self.addr = ""

    @property
    def url(self) -> str:
        return f"ws://{self.addr}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.addr = f"{host}:{port}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        host, port = self.upstream.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._stalled.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> int:
        """Aborts every open connection; how many there were."""
        pairs = list(self._pairs)
        for a, b in pairs:
            a.transport.abort()
            b.transport.abort()
        return len(pairs)

    def stall(self) -> None:
        self._stalled.clear()

    def unstall(self) -> None:
        self._stalled.set()

    async def close(self) -> None:
        self.unstall()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def caps_list(caps: str) -> list[str]:
    return [c for c in caps.split(",") if c]


def dump(x: Any) -> str:
    return repr(x)[:2000]


class Fast(TypedDict, total=False):
    ping_interval: float | None
    ping_timeout: float | None
    connect_timeout: float
    backoff: Backoff


#: Client settings for fault tests: quick pings notice a stall within
#: seconds, short backoff keeps the tests brisk. Correctness never depends
#: on them (a ping that times out on a slow machine costs a reconnect).
FAST: Fast = {"ping_interval": 0.5, "ping_timeout": 2.0, "connect_timeout": 3.0, "backoff": Backoff(0.05, 0.5)}
#: The same without pings (a reader that must fall behind, not reconnect).
NO_PINGS: Fast = {"ping_interval": None, "ping_timeout": None, "connect_timeout": 3.0, "backoff": Backoff(0.05, 0.5)}
