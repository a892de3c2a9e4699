"""The client against rate limits (issue 20): it waits as ``Retry-After`` says (at most
a minute) and sends again, any request the server refused as ``rate_limited`` (nothing
was done), and raises :class:`RateLimitError` carrying the problem once its tries are
spent. Against the real server with limits on (a live socket, sync and async clients),
and, for what only the client decides, against fakes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, FakeTime, job_json, problem
from conftest import lazy_app
from psik_api_server.settings import RateLimits, Settings
from support import AsyncApi, LiveServer, SyncApi

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


# ---- the real server ----


class Served:
    """A live server with ``rate_limits``, and clients of either kind on it whose sleeps
    are recorded (and really slept: the server's clock is the real one)."""

    def __init__(self, url: str, kind: str) -> None:
        self.url = url
        self.kind = kind
        self.sleeps: list[float] = []
        #: Run during each sleep, after it: what another client would do meanwhile.
        self.meanwhile: Callable[[], None] | None = None
        self._clients: list[pac.Client | pac.AsyncClient] = []

    def api(self, **kwargs: Any) -> Any:
        if self.kind == "sync":

            def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)
                time.sleep(seconds)
                if self.meanwhile is not None:
                    self.meanwhile()

            client = pac.Client(self.url, sleep=sleep, **kwargs)
            self._clients.append(client)
            return SyncApi(client)

        async def asleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            await anyio.sleep(seconds)
            if self.meanwhile is not None:
                await anyio.to_thread.run_sync(self.meanwhile)

        aclient = pac.AsyncClient(self.url, sleep=asleep, **kwargs)
        self._clients.append(aclient)
        return AsyncApi(aclient)

    async def aclose(self) -> None:
        for client in self._clients:
            if isinstance(client, pac.AsyncClient):
                await client.aclose()
            else:
                client.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(settings: Settings, kind: str) -> Iterator[Callable[..., Any]]:
    """``async with serve(**limits) as served``: a live server with those rate limits."""

    @contextlib.asynccontextmanager
    async def run(**limits: Any) -> AsyncIterator[Served]:
        limited = settings.model_copy(update={"rate_limits": RateLimits(**limits)})
        with LiveServer(lazy_app(limited)) as live:
            served = Served(live.url, kind)
            try:
                yield served
            finally:
                await served.aclose()

    yield run


async def test_a_client_over_the_limit_gets_through_after_waiting(serve: Callable[..., Any]) -> None:
    async with serve(requests_per_second=1, burst=2, submits_per_second=0) as served:
        api = served.api()
        for _ in range(4):
            assert [b.name for b in await api.backends()] == ["default"]
        # Two from the burst, then each waited for as Retry-After said (1 s, rounded up).
        assert served.sleeps == [1.0, 1.0]


async def test_a_refused_start_is_sent_again(serve: Callable[..., Any]) -> None:
    """POST .../start carries no Idempotency-Key, and is not sent twice after other
    failures; a rate_limited refusal did nothing, so it is."""
    async with serve(requests_per_second=0, submits_per_second=0.25, submit_burst=1) as served:
        api = served.api()
        first, second = await api.create({"script": "true"}), await api.create({"script": "true"})
        await api.start(first.jobid)
        started = await api.start(second.jobid)  # the bucket of one is empty: a wait
        assert started.state is not pac.JobState.new
        # 4 s less the first start's own time (the launcher starts with it), rounded up.
        assert len(served.sleeps) == 1 and 1.0 <= served.sleeps[0] <= 4.0
        done = await api.wait_all([first.jobid, second.jobid], timeout=60)
        assert {j.state for j in done} == {pac.JobState.completed}


async def test_the_error_once_the_tries_are_spent(serve: Callable[..., Any]) -> None:
    async with serve(requests_per_second=0.5, burst=1, submits_per_second=0) as served:
        api = served.api(max_retries=1)
        await api.backends()

        def another_client() -> None:  # takes the token the wait was for
            assert httpx.get(f"{served.url}/v1/backends").status_code == 200

        served.meanwhile = another_client
        with pytest.raises(pac.RateLimitError) as info:
            await api.backends()
        assert served.sleeps == [2.0]
        error = info.value
        assert error.status_code == 429
        assert error.code == "rate_limited"
        assert error.problem is not None and error.problem.status == 429
        assert error.retry_after == 2.0
        assert error.request_id is not None
        assert "is over its limit of 0.5 requests per second (burst 1)" in str(error)
        assert str(error).endswith(f"(request id {error.request_id})")


async def test_a_wait_past_a_minute_is_not_waited_for(serve: Callable[..., Any]) -> None:
    async with serve(requests_per_second=0.01, burst=1, submits_per_second=0) as served:
        api = served.api()
        await api.backends()
        began = time.monotonic()
        with pytest.raises(pac.RateLimitError) as info:
            await api.backends()
        assert time.monotonic() - began < 10
        assert served.sleeps == []
        assert info.value.retry_after is not None and 90 <= info.value.retry_after <= 100


# ---- the client alone ----


def answers(*responses: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    queue = iter(responses)
    return lambda request: next(queue)


def limited(seconds: str = "3") -> httpx.Response:
    return problem(429, "rate_limited", "uid:bob is over its limit", headers={"Retry-After": seconds})


async def test_a_post_without_a_key_is_sent_again_after_rate_limited(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(answers(limited(), httpx.Response(200, json=job_json(JOBID))))
    assert (await api.start(JOBID)).jobid == JOBID
    assert api.methods() == [f"POST /v1/jobs/{JOBID}/start"] * 2
    assert fake_time.sleeps == [3.0]


async def test_a_429_that_does_not_say_rate_limited_is_no_reason_to_post_twice(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    """A proxy's 429 says nothing of what was done: a POST without a key is not resent."""
    proxy = httpx.Response(429, text="slow down", headers={"Retry-After": "1"})
    api = connect(answers(proxy, httpx.Response(200, json=job_json(JOBID))))
    with pytest.raises(pac.RateLimitError) as info:
        await api.start(JOBID)
    assert info.value.problem is None and info.value.retry_after == 1.0
    assert len(api.requests) == 1
    assert fake_time.sleeps == []


async def test_rate_limited_is_retried_max_retries_times_then_raised(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(lambda request: limited("2"), max_retries=3)
    with pytest.raises(pac.RateLimitError) as info:
        await api.get(JOBID)
    assert len(api.requests) == 4
    assert fake_time.sleeps == [2.0, 2.0, 2.0]
    assert info.value.code == "rate_limited" and info.value.retry_after == 2.0
