"""The runtime and viewer clients against a real gateway: publish and tail,
run state (KV, secrets, config, checkpoints), sub-runs, heartbeats, errors."""

from __future__ import annotations

import asyncio

import pytest

import rungate
from conftest import StartGateway
from harness import ALL_CAP_LIST, ALL_CAPS, Gateway, eventually, within


async def collect(stream: rungate.EventStream, n: int) -> list[rungate.EventItem]:
    out: list[rungate.EventItem] = []
    async for item in stream:
        assert isinstance(item, rungate.EventItem), item
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_publish_then_tail_from_zero_and_live(gateway: Gateway) -> None:
    rt_token = gateway.token("runtime", "pub-*", ALL_CAPS)
    v_token = gateway.token("viewer", "pub-*")
    async with rungate.RuntimeClient(gateway.url, rt_token) as rt:
        run = await rt.attach("pub-1", capabilities=ALL_CAP_LIST)
        assert run.session_id and run.heartbeat_interval_ms >= 1000
        await run.publish([{"type": "log", "data": {"n": 0}}, {"type": "log", "data": {"n": 1}}])
        await run.publish([{"type": "token", "data": "x", "timestamp": "2026-11-25T10:00:00Z"}])
        async with rungate.ViewerClient(gateway.url, v_token) as v:
            items = await within("replay", collect(v.events("pub-1", from_offset=0), 3))
            assert [i.offset for i in items] == [0, 1, 2]
            assert [i.event["type"] for i in items] == ["log", "log", "token"]
            assert items[0].event["data"] == {"n": 0}
            assert items[2].event.get("timestamp") == "2026-11-25T10:00:00Z"
            seqs = [i.event["seq"] for i in items]
            assert seqs == sorted(seqs) and len(set(seqs)) == 3, seqs

            # from_offset=1 starts there; None is live from the head.
            later = await within("from 1", collect(v.events("pub-1", from_offset=1), 2))
            assert [i.offset for i in later] == [1, 2]
            live = v.events("pub-1", from_offset=None)
            nxt = asyncio.ensure_future(live.__anext__())
            await asyncio.sleep(0.3)
            await run.publish([{"type": "after"}])
            got = await within("live event", nxt)
            assert isinstance(got, rungate.EventItem) and got.offset == 3 and got.event["type"] == "after"
            await live.aclose()

            runs = await v.runs()
            mine = [r for r in runs if r["runId"] == "pub-1"]
            assert len(mine) == 1 and mine[0]["state"] == "attached" and mine[0]["nextOffset"] == 4


async def test_run_state_kv_secrets_config_checkpoints(start_gateway: StartGateway) -> None:
    gw = await start_gateway(
        config='[[runs]]\npattern = "st-*"\n[runs.config]\nmodel = "small"\n[runs.secrets]\nAPI_KEY = "k1"\nOTHER = "k2"\n'
    )
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "st-*", ALL_CAPS)) as rt:
        run = await rt.attach("st-1", capabilities=ALL_CAP_LIST)
        await run.kv.set({"a": "1", "b": "2"})
        assert await run.kv.get(["a", "b", "missing"]) == {"a": "1", "b": "2"}
        assert await run.secrets() == {"API_KEY": "k1", "OTHER": "k2"}
        assert await run.secrets(["API_KEY"]) == {"API_KEY": "k1"}
        with pytest.raises(rungate.NotFoundError) as nf:
            await run.secrets(["NOPE"])
        assert nf.value.code == "NOT_FOUND"
        assert (await run.config())["model"] == "small"
        with pytest.raises(rungate.NotFoundError):
            await run.checkpoints.load()
        saved = await run.checkpoints.save({"step": 1, "deep": [1, None, "x"]})
        again = await run.checkpoints.save({"step": 2}, checkpoint_id="mine")
        assert again["checkpointId"] == "mine"
        assert (await run.checkpoints.load())["data"] == {"step": 2}
        first = await run.checkpoints.load(saved["checkpointId"])
        assert first["data"] == {"step": 1, "deep": [1, None, "x"]}


async def test_kv_delete_gives_bytes_back_and_the_quota_refuses_with_its_details(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway("--max-kv-bytes-per-tenant", "100")
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "quota-*", ALL_CAPS)) as rt:
        run = await rt.attach("quota-1", capabilities=ALL_CAP_LIST)
        # "a" + 59 and "b" + 29: 90 of the tenant's 100 bytes.
        await run.kv.set({"a": "x" * 59, "b": "y" * 29})
        with pytest.raises(rungate.QuotaExceededError) as refused:
            await run.kv.set({"c": "z" * 19})
        assert refused.value.code == "QUOTA_EXCEEDED" and refused.value.retryable is False
        assert refused.value.details == {"quota": "kvBytes", "used": 90, "requested": 20, "limit": 100}
        assert await run.kv.get(["c"]) == {}, "nothing of the refused write is stored"

        assert await run.kv.delete(["a", "missing", "a"]) == 1
        assert await run.kv.get(["a", "b"]) == {"b": "y" * 29}
        await run.kv.set({"c": "z" * 19})
        assert await run.kv.get(["b", "c"]) == {"b": "y" * 29, "c": "z" * 19}
        assert await run.kv.delete([]) == 0
        with pytest.raises(TypeError):
            await run.kv.delete("b")


async def test_errors_carry_the_protocol_code(gateway: Gateway) -> None:
    # A token without kv.read: asking for the capability at attach is refused.
    token = gateway.token("runtime", "err-*", "kv.write")
    async with rungate.RuntimeClient(gateway.url, token, runtime_instance_id="inst-a") as rt:
        with pytest.raises(rungate.ForbiddenError) as refused:
            await rt.attach("err-1", capabilities=["kv.read"])
        assert refused.value.code == "FORBIDDEN" and refused.value.retryable is False
        run = await rt.attach("err-1", capabilities=["kv.write"])
        # A capability not asked for at attach.
        with pytest.raises(rungate.GatewayError) as e:
            await run.kv.get(["a"])
        assert e.value.code == "FORBIDDEN"
        # Another runtime instance cannot take the run.
        async with rungate.RuntimeClient(gateway.url, token, runtime_instance_id="inst-b") as other:
            with pytest.raises(rungate.ConflictError) as c:
                await other.attach("err-1", capabilities=["kv.write"])
            assert c.value.code == "CONFLICT"
        # A token for other runs: refused before the upgrade.
    with pytest.raises(rungate.ConnectError) as ce:
        async with rungate.RuntimeClient(gateway.url, "not-a-token"):
            pass
    assert ce.value.status == 401 and ce.value.code == "UNAUTHENTICATED"
    with pytest.raises(rungate.ConnectError) as wrong_kind:
        async with rungate.ViewerClient(gateway.url, token):
            pass
    assert wrong_kind.value.status == 403
    async with rungate.ViewerClient(gateway.url, gateway.token("viewer", "other-*")) as v:
        with pytest.raises(rungate.GatewayError) as nope:
            async for _ in v.events("err-1"):
                pass
        assert nope.value.code == "FORBIDDEN"


async def test_heartbeats_keep_the_lease_beyond_its_ttl(start_gateway: StartGateway) -> None:
    gw = await start_gateway("--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "3000")
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "hb-*", ALL_CAPS)) as rt:
        run = await rt.attach("hb-1", capabilities=ALL_CAP_LIST)
        assert run.heartbeat_interval_ms == 1000
        events: list[rungate.ClientEvent] = []

        async def record() -> None:
            async for e in rt.events():
                events.append(e)

        recorder = asyncio.create_task(record())
        # Three lease lengths without any call of ours: only heartbeats.
        await asyncio.sleep(9)
        assert run.active, events
        await run.publish([{"type": "still-here"}])
        assert not [e for e in events if isinstance(e, rungate.SessionExpired)], events
        recorder.cancel()


async def test_a_lease_that_runs_out_is_a_typed_exception(start_gateway: StartGateway) -> None:
    gw = await start_gateway("--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "2000")
    # The client thinks the interval is far longer, so it never heartbeats
    # in time: the gateway expires the session and says so.
    async with rungate.RuntimeClient(gw.url, gw.token("runtime", "ex-*", ALL_CAPS)) as rt:
        run = await rt.attach("ex-1", capabilities=ALL_CAP_LIST)
        rt._heartbeat_s = 3600.0  # white-box: silence the heartbeats
        for task in asyncio.all_tasks():
            if task.get_name() == "rungate-heartbeats":
                task.cancel()
        await eventually("the session expires", lambda: not run.active, limit=30)
        assert isinstance(run.ended_error, rungate.SessionExpiredError)
        with pytest.raises(rungate.SessionExpiredError) as e:
            await run.publish([{"type": "late"}])
        assert e.value.code == "SESSION_EXPIRED"


async def test_sub_runs_attach_beside_the_main_run(gateway: Gateway) -> None:
    async with rungate.RuntimeClient(gateway.url, gateway.token("runtime", "sub-*", ALL_CAPS)) as rt:
        main = await rt.attach("sub-main", capabilities=ALL_CAP_LIST)
        child = await main.sub_run("sub-child")
        assert child.session_id != main.session_id
        await child.publish([{"type": "from-child"}])
        await child.kv.set({"k": "v"})
        assert await child.kv.get(["k"]) == {"k": "v"}
        assert [r.run_id for r in rt.runs] == ["sub-main", "sub-child"]
        # Attaching a held run again is the same handle.
        assert await rt.attach("sub-child") is child
