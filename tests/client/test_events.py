"""watch, and wait/wait_all on the event stream: reconnects resume with Last-Event-ID
and never repeat an event; a server without the stream is polled (fake transport)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, FakeTime, job_json, problem, status_json, summary_json
from psik_api_client._events import MAX_NAMED_JOBS, RECONNECT_FOR, STREAM_READ_TIMEOUT

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"
SSE = {"Content-Type": "text/event-stream"}


def event(id: int, jobid: str = JOBID, state: str = "active", job_state: str | None = None) -> dict[str, Any]:
    """An Event as the server sends it."""
    return {
        "id": id,
        "jobid": jobid,
        "jobndx": 1,
        "state": state,
        "info": "",
        "time": "2024-01-01T00:00:00Z",
        "job_state": job_state or state,
        "native_id": "42",
        "exit_code": 0 if state == "completed" else None,
    }


def frame(ev: dict[str, Any]) -> bytes:
    return f"id: {ev['id']}\nevent: status\ndata: {json.dumps(ev)}\n\n".encode()


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body given chunk by chunk, for both clients; an exception in the
    list is raised when reached (a connection that breaks)."""

    def __init__(self, chunks: list[bytes | Exception]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


def stream(*chunks: bytes | Exception) -> httpx.Response:
    return httpx.Response(200, headers=SSE, stream=Chunks([b"retry: 1000\n\n", *chunks]))


class EventServer:
    """GET /v1/events answered by the next of ``answers`` (a response, or an exception
    raised as the transport's); jobs' states for the rest of the API."""

    def __init__(
        self, answers: list[Callable[[httpx.Request], httpx.Response]], states: dict[str, str]
    ) -> None:
        self.answers = iter(answers)
        self.states = states
        self.subscriptions: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/events":
            self.subscriptions.append(request)
            return next(self.answers)(request)
        if path == "/v1/jobs":
            ids = request.url.params.get_list("id")
            item = job_json if request.url.params.get("view") == "full" else summary_json
            items = [item(i, self.states[i]) for i in ids if i in self.states]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        jobid = path.split("/")[3]
        if path.endswith("/state"):
            return httpx.Response(200, json=status_json(jobid, self.states[jobid]))
        return httpx.Response(200, json=job_json(jobid, self.states[jobid]))


def answer(response: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: response


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def then(change: Callable[[], None], response: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    """Answer ``response`` after ``change`` (a job moving on while we subscribe)."""

    def respond(request: httpx.Request) -> httpx.Response:
        change()
        return response

    return respond


async def watch(api: Api, count: int, **kwargs: Any) -> list[pac.Event]:
    """The first ``count`` events of ``watch``; the iterator is closed after."""
    got: list[pac.Event] = []
    events = api.client.watch(**kwargs)
    if isinstance(events, Iterator):
        for ev in events:
            got.append(ev)
            if len(got) == count:
                break
        events.close()  # type: ignore[attr-defined]
    else:
        assert isinstance(events, AsyncIterator)
        async for ev in events:
            got.append(ev)
            if len(got) == count:
                break
        await events.aclose()  # type: ignore[attr-defined]
    return got


# ---- watch ----


async def test_watch_yields_events_in_order(connect: Callable[..., Api]) -> None:
    first, second = event(1, state="queued"), event(2, state="completed")
    server = EventServer([answer(stream(b": hi\n\n", frame(first), frame(second)))], {})
    api = connect(server.handler)
    got = await watch(api, 2, jobs=[JOBID, "2.0"], state=["queued", "completed"])
    assert [(e.id, e.state, e.job_state) for e in got] == [
        (1, pac.JobState.queued, pac.JobState.queued),
        (2, pac.JobState.completed, pac.JobState.completed),
    ]
    request = server.subscriptions[0]
    assert request.headers["Accept"] == "text/event-stream"
    assert "Last-Event-ID" not in request.headers
    assert request.url.params.get_list("jobs") == [JOBID, "2.0"]
    assert request.url.params.get_list("state") == ["queued", "completed"]
    # A stream's read timeout is a few heartbeats, not the client's 30 s.
    assert request.extensions["timeout"]["read"] == STREAM_READ_TIMEOUT


async def test_watch_resumes_with_last_event_id_and_skips_repeats(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer(
        [
            # Ended by the server (a slow reader dropped), then broken mid-frame.
            answer(stream(frame(event(1)), frame(event(2)), b": dropped: subscriber too slow\n")),
            answer(stream(frame(event(2)), frame(event(3))[:10], httpx.ReadError("reset"))),
            # A replay that repeats what was seen: skipped.
            answer(stream(frame(event(2)), frame(event(3)), frame(event(4)))),
        ],
        {},
    )
    api = connect(server.handler)
    got = await watch(api, 3, after=0)
    assert [e.id for e in got] == [1, 2, 3]
    assert [r.headers.get("Last-Event-ID") for r in server.subscriptions] == ["0", "2", "2"]
    # A stream that gave a new event is resumed at once; one that gave none (only a
    # repeat) after a short pause, in case it does so again.
    assert fake_time.sleeps == pytest.approx([0.1])


async def test_watch_waits_out_a_server_restart_backing_off(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer(
        [
            answer(stream(frame(event(5)))),
            *[refused] * 5,
            answer(problem(503, "service_unavailable", "starting")),
            answer(stream(frame(event(5)), frame(event(6)))),
        ],
        {},
    )
    api = connect(server.handler)
    got = await watch(api, 2)
    assert [e.id for e in got] == [5, 6]
    assert server.subscriptions[-1].headers["Last-Event-ID"] == "5"
    # The first reconnect at once, then quick, doubling, bounded.
    assert fake_time.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])


async def test_watch_gives_up_after_a_minute_without_a_server(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer([answer(stream(frame(event(1)))), *[refused] * 100], {})
    api = connect(server.handler)
    with pytest.raises(pac.APIConnectionError):
        await watch(api, 2)
    assert RECONNECT_FOR < sum(fake_time.sleeps) < RECONNECT_FOR + 10
    assert max(fake_time.sleeps) <= 5


async def test_watch_on_a_server_without_events_raises_its_404(connect: Callable[..., Api]) -> None:
    server = EventServer([answer(problem(404, "not_found", "no route /v1/events"))], {})
    api = connect(server.handler)
    with pytest.raises(pac.NotFoundError, match="no route"):
        await watch(api, 1)


async def test_watch_refused_for_good_is_not_retried(connect: Callable[..., Api]) -> None:
    server = EventServer([answer(problem(401, "unauthorized", "who are you"))], {})
    api = connect(server.handler)
    with pytest.raises(pac.AuthenticationError):
        await watch(api, 1)
    assert len(server.subscriptions) == 1


async def test_watch_checks_its_arguments(connect: Callable[..., Api]) -> None:
    api = connect(EventServer([], {}).handler)
    for bad in ({"after": -1}, {"after": "3"}, {"read_timeout": 0}, {"jobs": ["../x"]}):
        with pytest.raises(pac.InvalidRequestError):
            await watch(api, 1, **bad)
    assert api.requests == []


# ---- wait / wait_all on the stream ----


async def test_wait_subscribes_then_reads_the_state_then_listens(connect: Callable[..., Api]) -> None:
    # Another job's event, then ours (still active), then ours final.
    frames = [frame(event(7, "2.0")), frame(event(8)), frame(event(9, state="completed"))]
    server = EventServer([answer(stream(*frames))], {JOBID: "active"})

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/v1/jobs/{JOBID}":  # fetched whole once final
            server.states[JOBID] = "completed"
        return server.handler(request)

    api = connect(handler, events=True)
    job = await api.wait(JOBID)
    assert job.state is pac.JobState.completed
    assert api.methods() == ["GET /v1/events", f"GET /v1/jobs/{JOBID}/state", f"GET /v1/jobs/{JOBID}"]
    assert server.subscriptions[0].url.params.get_list("jobs") == [JOBID]


async def test_wait_on_a_server_without_events_polls(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer([answer(httpx.Response(405))], {JOBID: "completed"})
    api = connect(server.handler, events=True)
    job = await api.wait(JOBID)
    assert job.state is pac.JobState.completed
    assert api.methods() == ["GET /v1/events", f"GET /v1/jobs/{JOBID}/state", f"GET /v1/jobs/{JOBID}"]


async def test_wait_polls_when_the_stream_cannot_be_opened(connect: Callable[..., Api]) -> None:
    server = EventServer([refused], {JOBID: "failed"})
    api = connect(server.handler, events=True)
    assert (await api.wait(JOBID)).state is pac.JobState.failed


async def test_wait_polls_once_the_stream_is_lost_for_good(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    states = {JOBID: "active"}
    server = EventServer(
        [answer(stream(frame(event(1)))), answer(problem(404, "not_found", "gone")), refused], states
    )
    api = connect(server.handler, events=True)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/state") and len(server.subscriptions) == 2:
            states[JOBID] = "completed"  # by the time the poll comes
        return server.handler(request)

    api = connect(handler, events=True)
    assert (await api.wait(JOBID)).state is pac.JobState.completed
    assert api.methods()[-2:] == [f"GET /v1/jobs/{JOBID}/state", f"GET /v1/jobs/{JOBID}"]


def quiet(fake_time: FakeTime) -> Callable[[httpx.Request], httpx.Response]:
    """A stream on which nothing comes: its read times out once its read timeout passed."""

    def respond(request: httpx.Request) -> httpx.Response:
        def timed_out() -> Exception:
            fake_time.now += request.extensions["timeout"]["read"]
            return httpx.ReadTimeout("timed out", request=request)

        class Late(Chunks):
            def __iter__(self) -> Iterator[bytes]:
                yield b"retry: 1000\n\n"
                raise timed_out()

        return httpx.Response(200, headers=SSE, stream=Late([]))

    return respond


async def test_wait_timeout_on_the_stream_raises_and_never_cancels(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer([quiet(fake_time)] * 3, {JOBID: "new"})
    api = connect(server.handler, events=True)
    start = fake_time.now
    with pytest.raises(pac.WaitTimeout) as info:
        await api.wait(JOBID, timeout=5)
    assert str(info.value) == f"job {JOBID} is not final after 5 s (last state: new); it was never started"
    assert info.value.pending == [JOBID]
    assert fake_time.now - start == pytest.approx(5)
    assert server.subscriptions[0].extensions["timeout"]["read"] == 5  # the deadline, not 60 s
    assert {r.method for r in api.requests} == {"GET"}


async def test_wait_all_costs_one_stream_and_one_list(connect: Callable[..., Api]) -> None:
    ids = [f"{n}.0" for n in range(1, 301)]
    listed = dict.fromkeys(ids, "queued")
    listed["1.0"] = "completed"  # final before we listen
    frames = [frame(event(n, jobid, "completed")) for n, jobid in enumerate(ids[1:], start=10)]
    # Someone else's job, and a repeat, come too.
    frames[5:5] = [frame(event(12, "999.1", "completed")), frame(event(11, ids[1], "completed"))]
    server = EventServer([answer(stream(*frames))], listed)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("view") == "full":  # fetched whole once final
            server.states.update(dict.fromkeys(request.url.params.get_list("id"), "completed"))
        return server.handler(request)

    api = connect(handler, events=True)
    progress: list[tuple[int, int]] = []
    done = await api.wait_all(ids, progress=lambda d, t: progress.append((d, t)))
    assert [j.jobid for j in done] == ids
    assert api.methods() == ["GET /v1/events"] + ["GET /v1/jobs"] * 3
    # The one final before we listened, whole; then, once all ended, the rest at once.
    fetched = [r.url.params for r in api.requests if r.url.params.get("view") == "full"]
    assert [p.get_list("id") for p in fetched] == [["1.0"], ids[1:]]
    # More jobs than a URL should name: all of the caller's events, filtered here.
    assert len(ids) > MAX_NAMED_JOBS
    assert api.requests[0].url.params.get_list("jobs") == []
    assert progress == [(n, 300) for n in range(301)]


async def test_wait_all_looks_again_after_a_stream_lost_before_any_event(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    # Nothing to resume from: subscribe anew, then read the states anew.
    server = EventServer(
        [answer(stream(b": keep-alive\n\n")), answer(stream(frame(event(4, "2.0", "completed"))))],
        {"1.0": "active", "2.0": "active"},
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs" and len(server.subscriptions) == 2:
            server.states["1.0"] = "completed"  # ended while no stream was open
        if request.url.params.get_list("id") == ["2.0"] and request.url.params.get("view") == "full":
            server.states["2.0"] = "completed"
        return server.handler(request)

    api = connect(handler, events=True)
    done = await api.wait_all(["1.0", "2.0"])
    assert [j.state.value for j in done] == ["completed", "completed"]
    assert api.methods() == ["GET /v1/events", "GET /v1/jobs", "GET /v1/events"] + ["GET /v1/jobs"] * 3
    fetched = [r.url.params.get_list("id") for r in api.requests if r.url.params.get("view") == "full"]
    assert fetched == [["1.0"], ["2.0"]]
    assert fake_time.sleeps == [0.02]


async def test_an_id_the_server_sends_before_any_event_is_resumed_from(connect: Callable[..., Api]) -> None:
    server = EventServer(
        [answer(stream(b"id: 41\n\n")), answer(stream(frame(event(41)), frame(event(42))))], {}
    )
    api = connect(server.handler)
    got = await watch(api, 1)
    assert [e.id for e in got] == [42]
    assert server.subscriptions[1].headers["Last-Event-ID"] == "41"


async def test_wait_all_on_the_stream_times_out_naming_the_pending(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    server = EventServer(
        [answer(stream(frame(event(3, "1.0", "completed")))), quiet(fake_time), quiet(fake_time)],
        {"1.0": "active", "2.0": "active"},
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/1.0":
            server.states["1.0"] = "completed"
        return server.handler(request)

    api = connect(handler, events=True)
    with pytest.raises(pac.WaitTimeout) as info:
        await api.wait_all(["1.0", "2.0"], timeout=3)
    assert info.value.pending == ["2.0"]
    assert server.subscriptions[0].url.params.get_list("jobs") == ["1.0", "2.0"]
    assert {r.method for r in api.requests} == {"GET"}
