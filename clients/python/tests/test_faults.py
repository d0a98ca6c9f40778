"""Faults between the clients and a real gateway: cuts and stalls through a
TCP proxy, kill -9 and restart mid-publishing, an epoch takeover, token
expiry with a token source. The invariant throughout: every acknowledged
event reaches a viewer exactly once, in order."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

import rungate
from conftest import StartGateway, StartProxy
from harness import ALL_CAP_LIST, ALL_CAPS, FAST, Gateway, eventually, mint, within



async def read_values(stream: rungate.EventStream, total: int) -> list[int]:
    """The ``data.n`` of every event the stream hands over, until ``total``."""
    values: list[int] = []
    async for item in stream:
        assert isinstance(item, rungate.EventItem), f"unexpected {item}"
        assert item.offset == len(values), (item.offset, len(values))
        values.append(item.event["data"]["n"])
        if len(values) == total:
            break
    return values


class Recorder:
    def __init__(self, rt: rungate.RuntimeClient) -> None:
        self.events: list[rungate.ClientEvent] = []
        self._task = asyncio.create_task(self._run(rt))

    async def _run(self, rt: rungate.RuntimeClient) -> None:
        async for e in rt.events():
            self.events.append(e)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def stop(self) -> None:
        self._task.cancel()


async def publish_numbered(run: rungate.Run, start: int, stop: int, batch: int, acked: list[int]) -> None:
    for lo in range(start, stop, batch):
        ns = list(range(lo, min(stop, lo + batch)))
        await run.publish([{"type": "n", "data": {"n": n}} for n in ns])
        acked.extend(ns)


async def test_cuts_lose_nothing_and_duplicate_nothing(gateway: Gateway, start_proxy: StartProxy) -> None:
    total = 400
    rt_proxy = await start_proxy(gateway)
    v_proxy = await start_proxy(gateway)
    rt_token = gateway.token("runtime", "cut-*", ALL_CAPS)
    async with rungate.RuntimeClient(rt_proxy.url, rt_token, **FAST) as rt, rungate.ViewerClient(
        v_proxy.url, gateway.token("viewer", "cut-*"), **FAST
    ) as v:
        rec = Recorder(rt)
        main = await rt.attach("cut-1", capabilities=ALL_CAP_LIST)
        sub = await main.sub_run("cut-sub")
        stream = v.events("cut-1", from_offset=0)
        reader = asyncio.create_task(read_values(stream, total))
        acked: list[int] = []
        rng = random.Random(17)
        cuts = 0
        for lo in range(0, total, 4):
            ns = list(range(lo, lo + 4))
            publish = asyncio.create_task(main.publish([{"type": "n", "data": {"n": n}} for n in ns]))
            if lo % 40 == 20:
                # Cut while the batch is in flight: sent, not yet answered
                # (or not yet sent): either way it must be stored once.
                await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
                cuts += rt_proxy.cut() > 0
                if rng.random() < 0.5:
                    v_proxy.cut()
            await within("the publish is acknowledged", publish)
            acked.extend(ns)
        values = await within("the viewer read everything", reader)
        assert values == list(range(total))
        assert acked == list(range(total))
        assert cuts >= 3, "the proxy cut the runtime's socket several times"
        assert rec.of(rungate.Reconnected), rec.events
        epochs = [e.epoch for e in rec.of(rungate.Reconnected)]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs), epochs
        assert stream.connections >= 2 or v_proxy.connections >= 2
        # The sub-run moved with the main run every time.
        assert sub.active
        await sub.publish([{"type": "sub-still-works"}])
        assert await sub.kv.get(["x"]) == {}
        rec.stop()


async def test_a_stalled_socket_is_given_up_and_replaced(gateway: Gateway, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(gateway)
    async with rungate.RuntimeClient(proxy.url, gateway.token("runtime", "stall-*", ALL_CAPS), **FAST) as rt:
        rec = Recorder(rt)
        run = await rt.attach("stall-1", capabilities=ALL_CAP_LIST)
        async with rungate.ViewerClient(proxy.url, gateway.token("viewer", "stall-*"), **FAST) as v:
            stream = v.events("stall-1", from_offset=0)
            first = asyncio.create_task(read_values(stream, 5))
            await run.publish([{"type": "n", "data": {"n": n}} for n in range(2)])
            await eventually("the viewer connected", lambda: stream.connections == 1)
            proxy.stall()
            pending = asyncio.create_task(run.publish([{"type": "n", "data": {"n": n}} for n in range(2, 5)]))
            # No FIN comes through a black hole: only the pings notice.
            await eventually("the runtime gave the socket up", lambda: bool(rec.of(rungate.Disconnected)))
            await eventually("the viewer gave its socket up", lambda: stream.losses >= 1)
            proxy.unstall()
            await within("the stalled publish went through", pending)
            assert await within("the viewer got everything once", first) == list(range(5))
            assert stream.connections >= 2, "the viewer's stalled socket was replaced"
        rec.stop()


async def test_kill_9_and_restart_mid_publishing(gateway: Gateway, start_proxy: StartProxy) -> None:
    total = 300
    proxy = await start_proxy(gateway)
    rt_token = gateway.token("runtime", "crash-*", ALL_CAPS)
    v_token = gateway.token("viewer", "crash-*")
    async with rungate.RuntimeClient(proxy.url, rt_token, **FAST) as rt:
        run = await rt.attach("crash-1", capabilities=ALL_CAP_LIST)
        acked: list[int] = []
        publisher = asyncio.create_task(publish_numbered(run, 0, total, 3, acked))
        await eventually("some events acknowledged", lambda: len(acked) >= 60)
        await gateway.kill()
        killed_at = len(acked)
        await gateway.start()  # same data dir, a new port
        proxy.upstream = gateway.addr
        await within("every publish acknowledged after the restart", publisher)
        assert killed_at < total, "the kill came mid-publishing"
        assert acked == list(range(total))
        session = run.session_id
        assert run.active
    async with rungate.ViewerClient(gateway.url, v_token) as v:
        values = await within("the viewer reads the run", read_values(v.events("crash-1"), total))
    assert values == list(range(total)), "every acknowledged event once, in order"
    assert session


async def test_a_viewer_resumes_across_a_gateway_restart(gateway: Gateway, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(gateway)
    rt_token = gateway.token("runtime", "vr-*", ALL_CAPS)
    async with rungate.ViewerClient(proxy.url, gateway.token("viewer", "vr-*"), **FAST) as v:
        async with rungate.RuntimeClient(proxy.url, rt_token, **FAST) as rt:
            run = await rt.attach("vr-1", capabilities=ALL_CAP_LIST)
            stream = v.events("vr-1", from_offset=0)
            reader = asyncio.create_task(read_values(stream, 100))
            await publish_numbered(run, 0, 50, 5, [])
            await eventually("the viewer read 50", lambda: stream.next_offset == 50)
            await gateway.kill()
            await gateway.start()
            proxy.upstream = gateway.addr
            await publish_numbered(run, 50, 100, 5, [])
            assert await within("the viewer read on", reader) == list(range(100))
            assert stream.connections >= 2


async def test_an_epoch_takeover_supersedes_the_old_client(gateway: Gateway) -> None:
    token = gateway.token("runtime", "take-*", ALL_CAPS)
    async with rungate.RuntimeClient(gateway.url, token, runtime_instance_id="worker-1") as old:
        rec = Recorder(old)
        run = await old.attach("take-1", capabilities=ALL_CAP_LIST)
        await run.publish([{"type": "n", "data": {"n": 0}}])
        await asyncio.sleep(0.01)  # the new process's epoch (wall clock ms) is higher
        # A restarted process of the same runtime instance takes the run over.
        async with rungate.RuntimeClient(gateway.url, token, runtime_instance_id="worker-1") as new:
            assert new.epoch > old.epoch
            taken = await new.attach("take-1", capabilities=ALL_CAP_LIST)
            assert taken.session_id == run.session_id
            await eventually("the old client is told", lambda: not run.active)
            assert isinstance(run.ended_error, rungate.StaleEpochError)
            await eventually("the event is recorded", lambda: bool(rec.of(rungate.SessionSuperseded)))
            sup = rec.of(rungate.SessionSuperseded)
            assert sup and sup[0].run_id == "take-1" and sup[0].connection_epoch == new.epoch
            with pytest.raises(rungate.StaleEpochError) as e:
                await run.publish([{"type": "from-the-old-one"}])
            assert e.value.code == "STALE_EPOCH"
            await taken.publish([{"type": "n", "data": {"n": 1}}])
            # Lower epoch: refused, fenced off.
            async with rungate.RuntimeClient(gateway.url, token, runtime_instance_id="worker-1") as stale:
                stale._epoch = 1
                with pytest.raises(rungate.StaleEpochError):
                    await stale.attach("take-1", capabilities=ALL_CAP_LIST)
        rec.stop()
    async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "take-*")) as v:
        assert await within("read", read_values(v.events("take-1"), 2)) == [0, 1]


async def test_expiring_tokens_are_replaced_by_the_token_source(gateway: Gateway) -> None:
    minted: list[str] = []

    async def runtime_token() -> str:
        # An async source; each token lives 2 s, so the gateway closes the
        # socket (1008 token expired) several times during the test.
        minted.append(mint(gateway.key_file, "runtime", "tok-*", ALL_CAPS, ttl="2s"))
        return minted[-1]

    def viewer_token() -> str:
        return mint(gateway.key_file, "viewer", "tok-*", ttl="2s")

    async with rungate.RuntimeClient(gateway.url, "unused", token_source=runtime_token, **FAST) as rt:
        rec = Recorder(rt)
        run = await rt.attach("tok-1", capabilities=ALL_CAP_LIST)
        async with rungate.ViewerClient(gateway.url, "unused", token_source=viewer_token, **FAST) as v:
            stream = v.events("tok-1")
            values: list[int] = []

            async def read() -> None:
                async for item in stream:
                    assert isinstance(item, rungate.EventItem), item
                    assert item.offset == len(values)
                    values.append(item.event["data"]["n"])

            reader = asyncio.create_task(read())

            def closes() -> list[rungate.Disconnected]:
                return [e for e in rec.of(rungate.Disconnected) if e.code == 1008]

            # Publish until the runtime's token expired at least twice (and
            # the viewer's with it): however slow the machine, never fewer.
            n = 0

            async def publish_through_expiries() -> None:
                nonlocal n
                while len(closes()) < 2 or stream.losses < 2:
                    await run.publish([{"type": "n", "data": {"n": m}} for m in (n, n + 1)])
                    n += 2
                    await asyncio.sleep(0.05)

            await within("two token expiries", publish_through_expiries())
            await eventually("the viewer read everything", lambda: len(values) == n)
            assert values == list(range(n))
            reader.cancel()
            assert "token" in closes()[0].reason
            # Two expiries, three connections: the third token is asked for
            # as the client reconnects (it may be backing off right now).
            await eventually("a third token", lambda: len(minted) >= 3)
            assert len(set(minted)) == len(minted)
            assert stream.losses >= 2 and stream.connections >= 2
            assert run.active
        rec.stop()


async def test_a_refused_token_at_reconnect_fails_the_client(gateway: Gateway) -> None:
    # A fixed token that expires: the reconnect is refused (401), and the
    # client gives up with a typed error instead of retrying for ever.
    token = gateway.token("runtime", "fix-*", ALL_CAPS, ttl="2s")
    async with rungate.RuntimeClient(gateway.url, token, **FAST) as rt:
        rec = Recorder(rt)
        run = await rt.attach("fix-1", capabilities=ALL_CAP_LIST)
        # Well under the 30 s request timeout: a socket closed while the
        # client restores its sessions on it is noticed at once, not when an
        # answer that cannot come times out.
        await eventually("the client gives up", lambda: bool(rec.of(rungate.ClientFailed)), limit=20)
        failed = rec.of(rungate.ClientFailed)[0]
        assert isinstance(failed.error, rungate.ConnectError) and failed.error.status == 401
        with pytest.raises(rungate.ConnectError):
            await run.publish([{"type": "x"}])


async def test_a_drain_is_announced_and_the_sessions_move_on(
    start_gateway: StartGateway, start_proxy: StartProxy
) -> None:
    gw = await start_gateway("--reconnect-after-ms", "300")
    proxy = await start_proxy(gw)
    async with rungate.RuntimeClient(proxy.url, gw.token("runtime", "dr-*", ALL_CAPS), **FAST) as rt:
        rec = Recorder(rt)
        run = await rt.attach("dr-1", capabilities=ALL_CAP_LIST)
        await run.publish([{"type": "n", "data": {"n": 0}}])

        async def publish_on_drain() -> None:
            # Sent while the gateway drains: refused with DRAINING or not
            # sent before the socket closes; either way stored once, later.
            async for e in rt.events():
                if isinstance(e, rungate.Draining):
                    await run.publish([{"type": "n", "data": {"n": 1}}])
                    return

        during = asyncio.create_task(publish_on_drain())
        await asyncio.sleep(0.05)
        assert await gw.terminate() == 0
        drains = rec.of(rungate.Draining)
        assert drains and drains[0].reconnect_after_ms == 300, rec.events
        await gw.start()  # the same data: a rolling restart
        proxy.upstream = gw.addr
        await within("the publish made during the drain", during)
        await within("publish after the drain", run.publish([{"type": "n", "data": {"n": 2}}]))
        assert run.active and rec.of(rungate.Reconnected)
        rec.stop()
    async with rungate.ViewerClient(gw.url, gw.token("viewer", "dr-*")) as v:
        assert await within("read", read_values(v.events("dr-1"), 3)) == [0, 1, 2]


async def test_an_outage_longer_than_the_lease_renews_the_session(
    start_gateway: StartGateway, start_proxy: StartProxy
) -> None:
    gw = await start_gateway("--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "2000")
    proxy = await start_proxy(gw)
    async with rungate.RuntimeClient(proxy.url, gw.token("runtime", "ren-*", ALL_CAPS), **FAST) as rt:
        rec = Recorder(rt)
        run = await rt.attach("ren-1", capabilities=ALL_CAP_LIST)
        old_session = run.session_id
        await run.publish([{"type": "n", "data": {"n": 0}}])
        proxy.refuse = True
        proxy.cut()
        async with rungate.ViewerClient(gw.url, gw.token("viewer", "ren-*")) as v:
            for _ in range(400):
                state = {r["runId"]: r["state"] for r in await v.runs()}.get("ren-1")
                if state == "expired":
                    break
                await asyncio.sleep(0.05)
            assert state == "expired"
            # Published while the socket is down: waits in the outbox.
            pending = asyncio.create_task(run.publish([{"type": "n", "data": {"n": 1}}]))
            proxy.refuse = False
            await within("the queued publish is stored", pending)
            renewed = rec.of(rungate.SessionRenewed)
            assert renewed and renewed[0].run_id == "ren-1", rec.events
            assert run.session_id == renewed[0].session_id != old_session
            await run.publish([{"type": "n", "data": {"n": 2}}])
            assert await within("read", read_values(v.events("ren-1"), 3)) == [0, 1, 2]
        rec.stop()
