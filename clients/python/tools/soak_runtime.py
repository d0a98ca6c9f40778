"""A soak runtime on the ``rungate`` package, for ``rungate-loadgen soak
--py-runtimes N``: one ``RuntimeClient`` holds one run and publishes
``--batch`` events at a time at ``--rate`` events per second, one publish
after another, each event's data ``{p, n, f: false, pad}``.

    python tools/soak_runtime.py --url ws://HOST:PORT --run RUN --p P \\
        [--rate 4] [--batch 1] [--pad-bytes 64] [--instance ID]   (token: env RUNGATE_TOKEN)

Stdout is the soak's record, one line each:

- ``ack FIRST LAST MICROS``: the gateway stored counters FIRST..=LAST
  (round trip in µs);
- ``error KIND``: a publish or attach failed (KIND: the error code);
- ``reattach``: the session ended (its lease ran out) and was attached afresh.

It survives cuts, stalls and gateway restarts by the client's own
reconnects and resends, never by retrying a publish itself. SIGTERM or stdin
closing stops it: the publish in flight gets up to 15 s to be answered, then
it exits 0. Owns pacing and reporting only; it must not judge what it
published (the soak's checker does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from typing import Any

from rungate import Backoff, ConnectError, Run, RungateError, RuntimeClient


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _kind(e: BaseException) -> str:
    if isinstance(e, RungateError) and e.code is not None:
        return e.code
    return (type(e).__name__ + ": " + str(e))[:40]


class _Runtime:
    def __init__(self, args: argparse.Namespace, token: str) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.client = RuntimeClient(
            args.url,
            token,
            runtime_instance_id=args.instance or f"soak-py-{args.run}",
            request_timeout=30.0,
            backoff=Backoff(0.1, 2.0),
        )

    async def sleep(self, seconds: float) -> None:
        """Waits ``seconds``, or less if the runtime is told to stop."""
        try:
            await asyncio.wait_for(self.stop.wait(), max(seconds, 0.0))
        except asyncio.TimeoutError:
            pass

    async def connected(self) -> bool:
        """The first socket, retried: a partition may refuse it."""
        while not self.stop.is_set():
            try:
                await self.client.connect()
                return True
            except ConnectError as e:
                _say(f"error connect: {_kind(e)}")
                await self.sleep(0.5)
        return False

    async def attached(self) -> Run | None:
        """The run's session, attached again until it works or the runtime stops."""
        while not self.stop.is_set():
            attach = asyncio.ensure_future(self.client.attach(self.args.run))
            stopped = asyncio.ensure_future(self.stop.wait())
            # A stop does not wait for an attach (up to request_timeout).
            await asyncio.wait({attach, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not attach.done():
                attach.cancel()
                return None
            try:
                return attach.result()
            except RungateError as e:
                _say(f"error attach: {_kind(e)}")
                await self.sleep(0.5)
        return None

    async def publish_loop(self) -> None:
        a = self.args
        pad = "x" * a.pad_bytes
        batch = max(1, a.batch)
        every = batch / max(a.rate, 0.001)
        run = await self.attached() if await self.connected() else None
        n = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while run is not None and not self.stop.is_set():
            next_at = max(next_at + every, loop.time())
            await self.sleep(next_at - loop.time())
            if self.stop.is_set():
                break
            first = n + 1
            events: list[dict[str, Any]] = [
                {"type": "soak", "data": {"p": a.p, "n": k, "f": False, "pad": pad}}
                for k in range(first, first + batch)
            ]
            n += batch
            t0 = time.monotonic()
            publish = asyncio.ensure_future(run.publish(events))
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({publish, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not publish.done():
                # A stop waits at most 15 s more for the publish in flight.
                await asyncio.wait({publish}, timeout=15.0)
                if not publish.done():
                    publish.cancel()
                    print("runtime: stopped with a publish unanswered", file=sys.stderr)
                    break
            error = publish.exception()
            if error is None:
                _say(f"ack {first} {n} {int((time.monotonic() - t0) * 1e6)}")
                continue
            _say(f"error publish: {_kind(error)}")
            if not run.active:
                # The session is over (its lease ran out in an outage): a new
                # session of the same run; the stream goes on.
                run = await self.attached()
                if run is not None:
                    _say("reattach")


def _watch_stdin(stop: asyncio.Event) -> None:
    """Sets ``stop`` when stdin closes (the soak went away). A daemon thread
    reads it: it may be a file or /dev/null, which the event loop cannot
    watch, and a daemon does not hold up the exit."""
    loop = asyncio.get_running_loop()

    def read() -> None:
        while os.read(sys.stdin.fileno(), 4096):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, name="stdin-watch", daemon=True).start()


async def _main(args: argparse.Namespace, token: str) -> int:
    rt = _Runtime(args, token)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, rt.stop.set)
    _watch_stdin(rt.stop)
    try:
        await rt.publish_loop()
    finally:
        try:
            await asyncio.wait_for(rt.client.close(), 5.0)
        except asyncio.TimeoutError:
            pass
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="a rungate soak runtime (see the module's doc)")
    p.add_argument("--url", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--p", type=int, required=True, help="the publisher number in every event")
    p.add_argument("--rate", type=float, default=4.0, help="events per second")
    p.add_argument("--batch", type=int, default=1, help="events per publish")
    p.add_argument("--pad-bytes", type=int, default=64)
    p.add_argument("--instance", default=None, help="runtime instance id")
    args = p.parse_args()
    token = os.environ.get("RUNGATE_TOKEN")
    if not token:
        print("RUNGATE_TOKEN is not set", file=sys.stderr)
        return 2
    return asyncio.run(_main(args, token))


if __name__ == "__main__":
    sys.exit(main())
