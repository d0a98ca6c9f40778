from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from harness import BIN, Gateway, Proxy

StartGateway = Callable[..., Awaitable[Gateway]]
StartProxy = Callable[[Gateway], Awaitable[Proxy]]


def pytest_configure(config: pytest.Config) -> None:
    if not os.access(BIN, os.X_OK):
        raise pytest.UsageError(f"no gateway binary at {BIN}: build it or set RUNGATE_BIN")


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []
    n = 0

    async def start(*extra: str, config: str | None = None) -> Gateway:
        nonlocal n
        n += 1
        data = tmp_path / f"gw{n}"
        data.mkdir()
        args = list(extra)
        if config is not None:
            cfg = tmp_path / f"gw{n}.toml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        gw = Gateway(data, args)
        started.append(gw)
        return await gw.start()

    yield start
    for gw in started:
        await gw.kill()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    proxies: list[Proxy] = []

    async def start(gw: Gateway) -> Proxy:
        p = await Proxy(gw.addr).start()
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        await p.close()
