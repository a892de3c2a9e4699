"""Fixtures of the client tests (helpers live in ``client.fakes``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from client.fakes import Api, FakeTime, Handler
from psik_api_client import AsyncClient, Client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest, fake_time: FakeTime) -> AsyncIterator[Callable[..., Api]]:
    """``connect(handler, **client_kwargs)``: an :class:`Api` whose requests are
    answered by ``handler`` (which may raise an httpx transport error)."""
    opened: list[Api] = []

    def connect(handler: Handler, **kwargs: Any) -> Api:
        seen: list[httpx.Request] = []

        def recording(req: httpx.Request) -> httpx.Response:
            seen.append(req)
            return handler(req)

        transport = httpx.MockTransport(recording)
        kwargs = {"rng": lambda: 0.0, "clock": fake_time.clock, **kwargs}
        client: Client | AsyncClient
        if request.param == "sync":
            client = Client(transport=transport, sleep=fake_time.sleep, **kwargs)
        else:
            client = AsyncClient(transport=transport, sleep=fake_time.asleep, **kwargs)
        api = Api(client, seen)
        opened.append(api)
        return api

    yield connect
    for api in opened:
        await api.close()
