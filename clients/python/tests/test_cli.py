"""``python -m rungate tail``: events as JSON lines on stdout."""

from __future__ import annotations

import asyncio
import json
import sys

import rungate
from harness import ALL_CAP_LIST, ALL_CAPS, Gateway, within


async def tail(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rungate",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_tail_prints_events_as_json_lines(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "cli-*", ALL_CAPS)) as rt:
        run = await rt.attach("cli-1", capabilities=ALL_CAP_LIST)
        await run.publish([{"type": "n", "data": {"n": n, "text": "ünï\ncode"}} for n in range(10)])
        proc = await tail("cli-1", "--from", "3", "--url", gateway.url, "--token", gateway.token("viewer", "cli-*"), "--count", "12")
        # Live events arrive in the same output after the replay.
        await asyncio.sleep(0.2)
        await run.publish([{"type": "n", "data": {"n": n, "text": "x"}} for n in range(10, 15)])
        out, err = await within("tail exits after --count", proc.communicate())
        assert proc.returncode == 0, err.decode()
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [line["offset"] for line in lines] == list(range(3, 15))
        assert [line["event"]["data"]["n"] for line in lines] == list(range(3, 15))
        assert lines[0]["event"]["data"]["text"] == "ünï\ncode"
        assert lines[0]["event"]["type"] == "n" and isinstance(lines[0]["event"]["seq"], int)


async def test_tail_refused_token_exits_1(gateway: Gateway) -> None:
    proc = await tail("cli-1", "--url", gateway.url, "--token", "bogus")
    _, err = await within("tail exits", proc.communicate())
    assert proc.returncode == 1
    assert b"401" in err


async def test_tail_stops_at_the_end_of_the_run(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "cle-*", ALL_CAPS)) as rt:
        run = await rt.attach("cle-1", capabilities=ALL_CAP_LIST)
        proc = await tail("cle-1", "--url", gateway.url, "--token", gateway.token("viewer", "cle-*"))
        await run.publish([{"type": "n", "data": {"n": n}} for n in range(3)])
        await run.finish("completed", message="bye")
        out, err = await within("tail exits at the end", proc.communicate())
        assert proc.returncode == 0, err.decode()
        assert [json.loads(x)["offset"] for x in out.decode().splitlines()] == [0, 1, 2]
        notices = [json.loads(x) for x in err.decode().splitlines()]
        assert notices[-1]["kind"] == "ended" and notices[-1]["outcome"] == "completed"
        assert notices[-1]["message"] == "bye"
