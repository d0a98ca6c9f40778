"""What a viewer cannot be spared arrives as typed items: a gap when it
fell behind the ring, truncation when history it asked for is gone or the
stream's history was replaced."""

from __future__ import annotations

import asyncio

import rungate
from conftest import StartGateway, StartProxy
from harness import ALL_CAP_LIST, ALL_CAPS, NO_PINGS, eventually, within



async def test_history_older_than_the_ring_is_a_truncated_item(start_gateway: StartGateway) -> None:
    gw = await start_gateway("--stream-max-events", "10")
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "tr-*", ALL_CAPS)) as rt:
        run = await rt.attach("tr-1", capabilities=ALL_CAP_LIST)
        for lo in range(0, 30, 5):
            await run.publish([{"type": "n", "data": {"n": n}} for n in range(lo, lo + 5)])
        async with rungate.ViewerClient(gw.url, gw.token("viewer", "tr-*")) as v:
            stream = v.events("tr-1", from_offset=0)
            first = await within("first item", stream.__anext__())
            assert isinstance(first, rungate.TruncatedItem), first
            assert (first.requested_offset, first.start_offset, first.first_offset, first.next_offset) == (0, 20, 20, 30)
            assert not first.epoch_changed
            rest = [await within("event", stream.__anext__()) for _ in range(10)]
            assert [(i.offset, i.event["data"]["n"]) for i in rest if isinstance(i, rungate.EventItem)] == [
                (n, n) for n in range(20, 30)
            ]
            await stream.aclose()
            # In range: no truncation.
            s2 = v.events("tr-1", from_offset=25)
            item = await within("from 25", s2.__anext__())
            assert isinstance(item, rungate.EventItem) and item.offset == 25
            await s2.aclose()


async def test_a_viewer_that_falls_behind_gets_a_gap_item(start_gateway: StartGateway, start_proxy: StartProxy) -> None:
    total = 1500
    gw = await start_gateway("--stream-max-events", "100", "--outbound-queue", "1")
    proxy = await start_proxy(gw)
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "gap-*", ALL_CAPS)) as rt:
        run = await rt.attach("gap-1", capabilities=ALL_CAP_LIST)
        async with rungate.ViewerClient(proxy.url, gw.token("viewer", "gap-*"), **NO_PINGS) as v:
            stream = v.events("gap-1", from_offset=0)
            got: list[int] = []
            gaps: list[rungate.GapItem] = []
            truncations: list[rungate.TruncatedItem] = []

            async def read() -> None:
                async for item in stream:
                    if isinstance(item, rungate.EventItem):
                        assert item.event["data"]["n"] == item.offset
                        assert not got or item.offset > got[-1]
                        got.append(item.offset)
                    elif isinstance(item, rungate.GapItem):
                        gaps.append(item)
                    elif isinstance(item, rungate.TruncatedItem):
                        truncations.append(item)
                    if stream.next_offset == total:
                        return

            reader = asyncio.create_task(read())
            await eventually("subscribed", lambda: stream.connections == 1 and stream.stream_epoch is not None)
            # Padding outgrows the socket buffers, so the gateway's cursor for
            # this reader stays behind while the ring moves on.
            proxy.stall()
            pad = "x" * 8000
            for lo in range(0, total, 10):
                await run.publish([{"type": "n", "data": {"n": n, "pad": pad}} for n in range(lo, lo + 10)])
            proxy.unstall()
            await within("the viewer catches up", reader)
            assert gaps, "the reader fell behind and was told"
            missed = sum(g.missed for g in gaps) + sum(
                t.start_offset - (t.requested_offset or 0) for t in truncations
            )
            holes = sorted(set(range(total)) - set(got))
            assert len(got) + missed == total, (len(got), gaps, truncations, [h for h in holes if h > gaps[-1].to_offset] if gaps else holes[:20])
            for g in gaps:
                assert g.to_offset >= g.from_offset
                # Delivery went on at to_offset + 1 (both bounds inclusive).
                after = [o for o in got if o > g.to_offset]
                assert not after or after[0] == g.to_offset + 1
            assert got[-1] == total - 1


async def test_a_restart_that_loses_history_is_a_new_epoch(start_gateway: StartGateway, start_proxy: StartProxy) -> None:
    gw = await start_gateway("--store", "memory")
    proxy = await start_proxy(gw)
    rt_token = gw.token("runtime", "ep-*", ALL_CAPS)
    async with rungate.ViewerClient(proxy.url, gw.token("viewer", "ep-*"), **NO_PINGS) as v:
        async with rungate.RuntimeClient(gw.url, rt_token) as rt:
            run = await rt.attach("ep-1", capabilities=ALL_CAP_LIST)
            await run.publish([{"type": "n", "data": {"n": n}} for n in range(5)])
        stream = v.events("ep-1", from_offset=0)
        first = [await within("event", stream.__anext__()) for _ in range(5)]
        assert all(isinstance(i, rungate.EventItem) for i in first)
        old_epoch = stream.stream_epoch
        await gw.kill()
        await gw.start()
        proxy.upstream = gw.addr
        proxy.cut()
        async with rungate.RuntimeClient(gw.url, rt_token) as rt:
            run = await rt.attach("ep-1", capabilities=ALL_CAP_LIST)
            await run.publish([{"type": "n", "data": {"n": 100}}])
            item = await within("the resume after the restart", stream.__anext__())
            assert isinstance(item, rungate.TruncatedItem), item
            assert item.epoch_changed and item.previous_epoch == old_epoch
            assert item.start_offset == item.first_offset
            ev = await within("the new stream's event", stream.__anext__())
            assert isinstance(ev, rungate.EventItem) and ev.event["data"]["n"] == 100
            await stream.aclose()


async def test_a_dropped_stream_is_a_closed_item_and_the_next_stream_follows(start_gateway: StartGateway) -> None:
    gw = await start_gateway(
        "--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "2000", "--stream-retention-secs", "1"
    )
    rt_token = gw.token("runtime", "cl-*", ALL_CAPS)
    async with rungate.ViewerClient(gw.url, gw.token("viewer", "cl-*"), **NO_PINGS) as v:
        async with rungate.RuntimeClient(gw.url, rt_token) as rt:
            run = await rt.attach("cl-1", capabilities=ALL_CAP_LIST)
            await run.publish([{"type": "n", "data": {"n": n}} for n in range(3)])
        # The runtime is gone: its lease runs out, then the retention, and
        # the gateway drops the stream.
        stream = v.events("cl-1", from_offset=0)
        items = [await within("item", stream.__anext__()) for _ in range(3)]
        assert [i.offset for i in items if isinstance(i, rungate.EventItem)] == [0, 1, 2]
        old_epoch = stream.stream_epoch
        closed = await within("the stream is dropped", stream.__anext__())
        assert isinstance(closed, rungate.ClosedItem) and closed.stream_epoch == old_epoch
        resumed = await within("the next stream", stream.__anext__())
        assert isinstance(resumed, rungate.TruncatedItem) and resumed.epoch_changed, resumed
        async with rungate.RuntimeClient(gw.url, rt_token) as rt:
            run = await rt.attach("cl-1", capabilities=ALL_CAP_LIST)
            await run.publish([{"type": "n", "data": {"n": 10}}])
            ev = await within("an event of the next stream", stream.__anext__())
            assert isinstance(ev, rungate.EventItem) and ev.event["data"]["n"] == 10
            assert ev.stream_epoch != old_epoch
        await stream.aclose()
