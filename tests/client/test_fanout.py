"""Many calls at once on one AsyncClient: at most ``limits.max_connections`` requests are
in flight, the rest wait in the client; a cancelled call gives its place back, and open
streams take none, so that holding more of them than the bound blocks nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked

from psik_api_client import AsyncClient, Client
from psik_api_client._base import DEFAULT_LIMITS
from psik_api_server.settings import BackendSettings, Settings
from support import LiveServer

pytestmark = pytest.mark.anyio

STATUS = {"jobid": "1.000", "state": "new", "jobndx": 0, "updated": "2026-01-01T00:00:00Z"}


class Flight:
    """A handler that counts the requests in its hands, and holds each one until
    ``release`` is set."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.release = anyio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await self.release.wait()
        finally:
            self.now -= 1
        return httpx.Response(200, json=STATUS)


def client(handler: Callable[[httpx.Request], Awaitable[httpx.Response]], bound: int | None) -> AsyncClient:
    return AsyncClient(
        "http://testserver",
        transport=httpx.MockTransport(handler),
        limits=httpx.Limits(max_connections=bound),
        max_retries=0,
    )


async def test_at_most_max_connections_requests_are_in_flight() -> None:
    flight = Flight()
    async with client(flight, 4) as api, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(api.state, "1.000")
        await wait_all_tasks_blocked()
        assert flight.now == 4  # the other 16 wait in the client, not in the transport
        flight.release.set()
    assert flight.peak == 4


async def test_no_bound_without_max_connections() -> None:
    flight = Flight()
    async with client(flight, None) as api, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(api.state, "1.000")
        await wait_all_tasks_blocked()
        assert flight.now == 20
        flight.release.set()


def test_the_default_bound_is_httpx_pool() -> None:
    assert httpx.Limits(max_connections=100, max_keepalive_connections=20) == DEFAULT_LIMITS
    with pytest.raises(TypeError, match=r"httpx\.Limits"):
        Client("http://testserver", limits=100)  # type: ignore[arg-type]


async def test_a_cancelled_call_gives_its_place_back() -> None:
    flight = Flight()
    holding, waiting = anyio.CancelScope(), anyio.CancelScope()

    async def call(scope: anyio.CancelScope) -> None:
        with scope:
            await api.state("1.000")

    async with client(flight, 1) as api:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, holding)
            await wait_all_tasks_blocked()
            tg.start_soon(call, waiting)  # waits for the one place
            await wait_all_tasks_blocked()
            assert flight.now == 1
            waiting.cancel()  # cancelled while waiting for a place
            holding.cancel()  # cancelled in flight
        assert flight.now == 0
        flight.release.set()
        with anyio.fail_after(5):
            assert (await api.state("1.000")).state == "new"


async def test_a_call_cancelled_by_its_timeout_gives_its_place_back() -> None:
    flight = Flight()
    async with client(flight, 1) as api:
        with anyio.move_on_after(0.05):
            await api.state("1.000")
        flight.release.set()
        with anyio.fail_after(5):
            assert (await api.state("1.000")).state == "new"


class Logs:
    """Log follows that send one chunk and then stay open until ``end`` is set; any
    other request is a job's state."""

    def __init__(self) -> None:
        self.end = anyio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/logs/stdout"):
            return httpx.Response(200, json=STATUS)

        async def body() -> AsyncIterator[bytes]:
            yield b"hello\n"
            await self.end.wait()

        return httpx.Response(200, content=body(), headers={"Content-Type": "application/octet-stream"})


async def test_open_streams_past_the_bound_block_no_other_call() -> None:
    logs = Logs()
    async with client(logs, 2) as api:
        follows = [api.follow_log("1.000", "stdout") for _ in range(5)]
        try:
            with anyio.fail_after(5):
                for follow in follows:  # five streams open at once, past the bound of 2
                    assert await anext(follow) == b"hello\n"
                assert [s.state for s in [await api.state("1.000") for _ in range(3)]] == ["new"] * 3
        finally:
            for follow in follows:
                await follow.aclose()  # type: ignore[attr-defined]


async def test_retries_wait_outside_the_bound() -> None:
    """A request sleeping before its retry holds no place: the others go past it."""
    calls: list[str] = []
    slept = anyio.Event()
    go_on = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/2.000/state") and len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"})
        return httpx.Response(200, json=STATUS)

    async def sleep(seconds: float) -> None:
        slept.set()
        await go_on.wait()

    api = AsyncClient(
        "http://testserver",
        transport=httpx.MockTransport(handler),
        limits=httpx.Limits(max_connections=1),
        sleep=sleep,
    )
    async with api, anyio.create_task_group() as tg:
        tg.start_soon(api.state, "2.000")
        await slept.wait()
        with anyio.fail_after(5):
            assert (await api.state("1.000")).state == "new"
        go_on.set()
    assert calls == ["/v1/jobs/2.000/state", "/v1/jobs/1.000/state", "/v1/jobs/2.000/state"]


# ---- the real client on the real server ----


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The shared settings, with job slots enough for every job of the fan-out."""
    return Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={"default": BackendSettings(type="local", max_running=1000)},
        watch_interval=0.02,
    )


async def test_hundreds_of_jobs_submitted_at_once_and_awaited(live_app: LiveServer) -> None:
    n = 300
    async with AsyncClient(live_app.url, limits=httpx.Limits(max_connections=16)) as api:
        with anyio.fail_after(240):
            jobs = await asyncio.gather(
                *(api.submit({"name": f"fan{i}", "script": "true"}) for i in range(n))
            )
            done = await api.wait_all(jobs, timeout=200)
    assert len({job.jobid for job in jobs}) == n
    assert [job.jobid for job in done] == [job.jobid for job in jobs]
    assert {job.state for job in done} == {"completed"}
    assert sorted(job.spec.name or "" for job in done) == sorted(f"fan{i}" for i in range(n))
