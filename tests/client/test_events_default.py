"""Whether wait/wait_all listen to the event stream by default (``events=None``): yes
through httpx's own network transports (its default one, an ``HTTPTransport`` given,
a UNIX socket), no through any other transport unless ``events=True``. The network is
respx's: it answers below httpx's transports, so they are the real ones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

import psik_api_client as pac
from client.fakes import Api, FakeTime, no_events
from client.test_events import JOBID, EventServer, answer, event, frame, stream

pytestmark = pytest.mark.anyio

OTHER = "1693992878.204"
URL = "http://127.0.0.1:8000"


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture(params=["sync", "async"])
async def over_network(
    request: pytest.FixtureRequest, network: respx.MockRouter, fake_time: FakeTime
) -> AsyncIterator[Callable[..., Api]]:
    """``over_network(handler, via, **client_kwargs)``: an :class:`Api` on httpx's own
    transport (``via``: "default", "transport" (one given) or "uds"), whose requests
    ``handler`` answers."""
    opened: list[Api] = []
    is_async = request.param == "async"

    def connect(
        handler: Callable[[httpx.Request], httpx.Response], via: str = "default", **kwargs: Any
    ) -> Api:
        seen: list[httpx.Request] = []

        def recording(req: httpx.Request) -> httpx.Response:
            seen.append(req)
            return handler(req)

        network.route().mock(side_effect=recording)
        kwargs = {"rng": lambda: 0.0, "clock": fake_time.clock, **kwargs}
        if via == "uds":
            kwargs["uds"] = str(Path("/nonexistent") / "psik_api.sock")
        else:
            kwargs["base_url"] = URL
        if via == "transport":
            kwargs["transport"] = httpx.AsyncHTTPTransport() if is_async else httpx.HTTPTransport()
        client: pac.Client | pac.AsyncClient
        if is_async:
            client = pac.AsyncClient(sleep=fake_time.asleep, **kwargs)
        else:
            client = pac.Client(sleep=fake_time.sleep, **kwargs)
        api = Api(client, seen)
        opened.append(api)
        return api

    yield connect
    for api in opened:
        await api.close()


def finishing(server: EventServer) -> Callable[[httpx.Request], httpx.Response]:
    """``server``'s answers, with each job final once fetched whole (its event came)."""

    def handler(request: httpx.Request) -> httpx.Response:
        jobid = request.url.path.removeprefix("/v1/jobs/")
        if jobid in server.states:
            server.states[jobid] = "completed"
        if request.url.params.get("view") == "full":
            server.states.update(dict.fromkeys(request.url.params.get_list("id"), "completed"))
        return server.handler(request)

    return handler


@pytest.mark.parametrize("via", ["default", "transport", "uds"])
async def test_wait_listens_by_default_over_the_network(over_network: Callable[..., Api], via: str) -> None:
    server = EventServer([answer(stream(frame(event(9, state="completed"))))], {JOBID: "active"})
    api = over_network(finishing(server), via)
    job = await api.wait(JOBID)
    assert job.state is pac.JobState.completed
    assert api.methods() == ["GET /v1/events", f"GET /v1/jobs/{JOBID}/state", f"GET /v1/jobs/{JOBID}"]
    assert server.subscriptions[0].headers["Accept"] == "text/event-stream"


async def test_wait_all_listens_by_default_over_the_network(over_network: Callable[..., Api]) -> None:
    frames = [frame(event(4, OTHER, state="completed")), frame(event(5, state="completed"))]
    server = EventServer([answer(stream(*frames))], {JOBID: "active", OTHER: "queued"})
    api = over_network(finishing(server))
    jobs = await api.wait_all([JOBID, OTHER])
    assert [(j.jobid, j.state) for j in jobs] == [
        (JOBID, pac.JobState.completed),
        (OTHER, pac.JobState.completed),
    ]
    # One stream and one list for both jobs, then both final jobs at once: no polling.
    assert api.methods() == ["GET /v1/events", "GET /v1/jobs", "GET /v1/jobs"]
    assert api.requests[2].url.params.get_list("id") == [JOBID, OTHER]
    assert api.requests[2].url.params["view"] == "full"
    assert server.subscriptions[0].url.params.get_list("jobs") == [JOBID, OTHER]


async def test_a_server_without_events_is_polled_by_default(
    over_network: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer([lambda request: no_events()], {JOBID: "completed", OTHER: "failed"})
    api = over_network(server.handler)
    assert (await api.wait(JOBID)).state is pac.JobState.completed
    assert api.methods() == ["GET /v1/events", f"GET /v1/jobs/{JOBID}/state", f"GET /v1/jobs/{JOBID}"]
    assert fake_time.sleeps == []


async def test_events_false_polls_over_the_network(over_network: Callable[..., Api]) -> None:
    server = EventServer([], {JOBID: "completed", OTHER: "failed"})
    api = over_network(server.handler, events=False)
    assert (await api.wait(JOBID)).state is pac.JobState.completed
    await api.wait_all([JOBID, OTHER])
    assert "GET /v1/events" not in api.methods()


async def test_another_transport_polls_by_default(connect: Callable[..., Api]) -> None:
    # connect's transport is an httpx.MockTransport: as with an in-process one, a
    # stream through it might never arrive, so the client polls unless told otherwise.
    server = EventServer([answer(stream(frame(event(9, state="completed"))))], {JOBID: "completed"})
    api = connect(server.handler)
    assert (await api.wait(JOBID)).state is pac.JobState.completed
    await api.wait_all([JOBID])
    assert api.methods() == [
        f"GET /v1/jobs/{JOBID}/state",
        f"GET /v1/jobs/{JOBID}",
        "GET /v1/jobs",
        "GET /v1/jobs",  # view=full: the final job, whole
    ]


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_events_is_true_false_or_none(value: Any) -> None:
    with pytest.raises(TypeError, match="events="):
        pac.Client(URL, events=value)
