"""Run lifecycle (issue #15 decisions): runtime.finish ends a run and its
viewers' iterators with the outcome; run.cancel reaches the runtime, also
one that was detached when it was asked. Needs a gateway with the lifecycle
commands (runtime.finish, run.cancel, stream.ended)."""

from __future__ import annotations

import asyncio

import pytest

import rungate
from conftest import StartProxy
from harness import ALL_CAP_LIST, ALL_CAPS, FAST, Gateway, eventually, within


async def read_to_end(stream: rungate.EventStream) -> list[rungate.StreamItem]:
    return [item async for item in stream]


async def test_finish_ends_every_viewer_with_the_outcome(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "fin-*", ALL_CAPS)) as rt:
        run = await rt.attach("fin-1", capabilities=ALL_CAP_LIST)
        async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "fin-*")) as v:
            live = v.events("fin-1", from_offset=0)
            reader = asyncio.create_task(read_to_end(live))
            await run.publish([{"type": "n", "data": {"n": n}} for n in range(5)])
            reply = await run.finish("completed", message="all done")
            assert reply == {"accepted": True, "nextOffset": 5}
            items = await within("the live viewer ends by itself", reader)
            assert [i.offset for i in items if isinstance(i, rungate.EventItem)] == list(range(5))
            end = items[-1]
            assert isinstance(end, rungate.EndedItem), items
            assert (end.outcome, end.message, end.next_offset) == ("completed", "all done", 5)
            assert live.outcome == "completed"

            # A viewer that comes later replays, then ends at once.
            late = v.events("fin-1", from_offset=0)
            again = await within("a late viewer ends too", read_to_end(late))
            assert [i.offset for i in again if isinstance(i, rungate.EventItem)] == list(range(5))
            assert late.outcome == "completed"

            summary = [r for r in await v.runs() if r["runId"] == "fin-1"]
            assert summary[0]["state"] == "ended" and summary[0].get("outcome") == "completed"

        # After the end: typed errors, idempotent repeats.
        assert not run.active
        with pytest.raises(rungate.RunEndedError) as e:
            await run.publish([{"type": "late"}])
        assert e.value.code == "RUN_ENDED"
        assert await run.finish("completed") == reply
        with pytest.raises(rungate.ConflictError):
            await run.finish("failed")
        with pytest.raises(rungate.RunEndedError):
            await rt.attach("fin-1", capabilities=ALL_CAP_LIST)


async def test_finish_waits_for_publishes_in_flight_across_a_cut(gateway: Gateway, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(gateway)
    async with rungate.RuntimeClient(proxy.url, gateway.token("runtime", "fc-*", ALL_CAPS), **FAST) as rt:
        run = await rt.attach("fc-1", capabilities=ALL_CAP_LIST)
        publishes = [
            asyncio.create_task(run.publish([{"type": "n", "data": {"n": n}} for n in range(lo, lo + 10)]))
            for lo in range(0, 50, 10)
        ]
        await asyncio.sleep(0)
        proxy.cut()
        reply = await within("finish", run.finish("failed", message="boom"))
        for p in publishes:
            assert p.done() and p.exception() is None
        assert reply["nextOffset"] == 50
    async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "fc-*")) as v:
        stream = v.events("fc-1")
        items = await within("read", read_to_end(stream))
        assert [i.event["data"]["n"] for i in items if isinstance(i, rungate.EventItem)] == list(range(50))
        assert stream.ended is not None and stream.ended.message == "boom" and stream.outcome == "failed"


async def test_finishing_the_main_run_ends_its_sub_runs(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "fm-*", ALL_CAPS)) as rt:
        main = await rt.attach("fm-main", capabilities=ALL_CAP_LIST)
        sub = await main.sub_run("fm-sub")
        await sub.publish([{"type": "sub"}])
        await main.finish("completed")
        assert not sub.active
        with pytest.raises(rungate.RunEndedError):
            await sub.publish([{"type": "late"}])
    async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "fm-*")) as v:
        stream = v.events("fm-sub")
        await within("the sub-run's stream ends", read_to_end(stream))
        assert stream.outcome == "cancelled"


async def test_cancel_reaches_the_runtime_which_finishes(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "cx-*", ALL_CAPS)) as rt:
        run = await rt.attach("cx-1", capabilities=ALL_CAP_LIST)
        async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "cx-*", "run.cancel")) as v:
            stream = v.events("cx-1")
            reader = asyncio.create_task(read_to_end(stream))
            cancels = run.cancel_requests()
            got = asyncio.ensure_future(cancels.__anext__())
            assert await v.cancel("cx-1", "user pressed stop") == {"delivered": True, "ended": False}
            req = await within("the runtime hears of it", got)
            assert (req.run_id, req.reason) == ("cx-1", "user pressed stop") and req.requested_at
            await run.finish("cancelled", message=req.reason)
            await within("the viewer ends", reader)
            assert stream.outcome == "cancelled"
            # The iterator of cancels ends with the run.
            with pytest.raises(StopAsyncIteration):
                await within("cancels end", cancels.__anext__())
            assert await v.cancel("cx-1") == {"delivered": False, "ended": True}
            with pytest.raises(rungate.NotFoundError) as nf:
                await v.cancel("cx-unknown")
            assert nf.value.code == "NOT_FOUND"
        async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "cx-*")) as no_cap:
            with pytest.raises(rungate.ForbiddenError) as f:
                await no_cap.cancel("cx-1")
            assert f.value.code == "FORBIDDEN"


async def test_a_cancel_asked_while_detached_arrives_at_the_reconnect_once(
    gateway: Gateway, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(gateway)
    async with rungate.RuntimeClient(proxy.url, gateway.token("runtime", "cd-*", ALL_CAPS), **FAST) as rt:
        reconnects: list[rungate.Reconnected] = []

        async def record() -> None:
            async for e in rt.events():
                if isinstance(e, rungate.Reconnected):
                    reconnects.append(e)

        recorder = asyncio.create_task(record())
        run = await rt.attach("cd-1", capabilities=ALL_CAP_LIST)
        seen: list[rungate.CancelRequest] = []

        async def listen() -> None:
            async for req in run.cancel_requests():
                seen.append(req)

        listener = asyncio.create_task(listen())
        proxy.refuse = True
        proxy.cut()
        async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "cd-*", "run.cancel")) as v:
            for _ in range(600):  # up to 30 s
                runs = {r["runId"]: r for r in await v.runs()}
                if runs["cd-1"]["state"] == "detached":
                    break
                await asyncio.sleep(0.05)
            assert runs["cd-1"]["state"] == "detached", runs
            assert await v.cancel("cd-1", "stop") == {"delivered": False, "ended": False}
            proxy.refuse = False
            await eventually("the cancel arrives after the reconnect", lambda: len(seen) == 1)
            assert seen[0].reason == "stop"
            # Pushed again at every reattach until the run ends: still once here.
            proxy.cut()
            await eventually("reconnected twice", lambda: len(reconnects) >= 2)
            await run.publish([{"type": "sync"}])  # the reattach's pushes came before this reply
            assert len(seen) == 1, seen
            await run.finish("cancelled")
            await within("the cancels iterator ends", listener)
        recorder.cancel()
