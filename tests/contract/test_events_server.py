"""The event stream's contract, server side (issue 17), against the real app running real
jobs on the local backend: in-process (httpx.ASGITransport) and over a live socket
(uvicorn in a thread). Plain httpx reads the streams (the client's watch() is tested
with the client): what is asserted is the wire.

- 100 concurrent jobs: each job's new, queued, active, completed in that order, ids
  strictly increasing across the stream, no id twice, the final state and exit code right;
- reconnect with ``Last-Event-ID`` or ``?after=``: nothing lost, nothing repeated;
- the long poll (``Accept: application/json``);
- token mode: bob sees none of alice's events, a narrowed token only its job's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from psik_api_core import Event
from psik_api_server.settings import Settings
from support import LiveServer
from tls_support import Identities, TlsServer, tls_server

pytestmark = pytest.mark.anyio

JSON = {"Accept": "application/json"}
#: The rows a `script: true` job gets, in order.
LIFE = ["new", "queued", "active", "completed"]


class SSE:
    """What a text/event-stream response said, as it comes: its events (the ``data:``
    JSON as core's Event, each checked against its ``id:`` line), comments, ``retry:``."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.retry: list[str] = []
        self.ended = False
        self._changed = anyio.Event()

    def feed(self, lines: list[str]) -> None:
        fields: dict[str, str] = {}
        for line in lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            elif "data" in fields:
                assert fields.get("event") == "status", fields
                event = Event.model_validate_json(fields["data"])
                assert fields.get("id") == str(event.id), fields
                self.events.append(event)
            elif "retry" in fields:
                self.retry.append(fields["retry"])
            fields = {}
        self._changed.set()
        self._changed = anyio.Event()

    async def read(self, response: httpx.Response) -> None:
        lines: list[str] = []
        async for line in response.aiter_lines():
            lines.append(line)
            if line == "":  # a frame is complete
                self.feed(lines)
                lines = []
        self.ended = True
        self.feed(lines)

    async def until(self, done: Callable[[SSE], bool], timeout: float = 15) -> None:
        with anyio.fail_after(timeout):
            while not done(self):
                if self.ended:
                    raise AssertionError(f"the stream ended first: {self.comments}")
                await self._changed.wait()


@contextlib.asynccontextmanager
async def stream(http: httpx.AsyncClient, path: str, **kwargs: Any) -> AsyncIterator[SSE]:
    """An event stream read in the background; entered once its headers arrived (the
    server has subscribed by then)."""
    sse = SSE()
    with anyio.fail_after(10):
        cm = http.stream("GET", path, **kwargs)
        response = await cm.__aenter__()
    try:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        async with anyio.create_task_group() as tg:
            tg.start_soon(sse.read, response)
            yield sse
            tg.cancel_scope.cancel()
    finally:
        await cm.__aexit__(None, None, None)


async def submit(http: httpx.AsyncClient, n: int, script: str = "true") -> list[str]:
    ids: list[str] = []

    async def one() -> None:
        r = await http.post("/v1/jobs", json={"script": script})
        assert r.status_code == 201, r.text
        ids.append(r.json()["jobid"])

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return ids


def final(jobids: list[str]) -> Callable[[SSE], bool]:
    """Every one of ``jobids`` has had its final event."""

    def done(sse: SSE) -> bool:
        ended = {e.jobid for e in sse.events if e.job_state.is_final}
        return set(jobids) <= ended

    return done


async def long_poll(http: httpx.AsyncClient, path: str = "/v1/events", **params: Any) -> list[Event]:
    r = await http.get(path, params=params, headers=JSON)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return [Event.model_validate(e) for e in r.json()]


async def everything(http: httpx.AsyncClient, path: str = "/v1/events") -> list[Event]:
    """Every event kept (a long poll from 0, page by page)."""
    out: list[Event] = []
    while page := await long_poll(http, path, after=out[-1].id if out else 0, timeout=0):
        out.extend(page)
    return out


def life(events: list[Event]) -> list[str]:
    """The job's state after each of its events (``job_state``), a repeat counted once:
    a job waiting for a job slot has a ``queued`` row saying so before psik's own, and
    psik's ``queued`` row can come after the job's ``active`` one (the row's own state is
    the file's, in the file's order; the job's is what GET /v1/jobs/{id} says)."""
    states = [e.job_state.value for e in events]
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def assert_lives(events: list[Event], jobids: list[str], prefix: Path | None = None) -> None:
    """The stream's promises for ``script: true`` jobs (see the module doc); with the
    jobs' ``prefix``, that every row of each status.csv is its event, in file order."""
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), "ids not strictly increasing, or one twice"
    for jobid in jobids:
        mine = [e for e in events if e.jobid == jobid]
        assert life(mine) == LIFE, (jobid, [(e.id, e.state) for e in mine])
        assert [e.jobndx for e in mine] == [0] + [1] * (len(mine) - 1)
        if prefix is not None:
            rows = [r.split(",", 3) for r in (prefix / jobid / "status.csv").read_text().splitlines()]
            assert [(e.jobndx, e.state.value, e.info) for e in mine] == [
                (int(n), s, i) for _, n, s, i in rows
            ]
        last = mine[-1]
        assert last.job_state == "completed" and last.exit_code == 0, last
        # The run's native id is its queued row's (psik's rows can come in another order
        # than their times, psik-3.md: the last event need not be the completed row).
        launched = [e.info for e in mine if e.state == "queued" and e.info.isdigit()]
        assert last.native_id is not None and launched == [last.native_id]
        # Once the job is final it stays final, to its last event.
        finals = [i for i, e in enumerate(mine) if e.job_state.is_final]
        assert finals == list(range(finals[0], len(mine))), [(e.state, e.job_state) for e in mine]
    assert {e.jobid for e in events} == set(jobids)


# ---- 1. order, 100 concurrent jobs ----


async def test_a_hundred_concurrent_jobs_in_order_over_a_live_socket(
    live_app: LiveServer, settings: Settings
) -> None:
    async with httpx.AsyncClient(base_url=live_app.url, timeout=10) as http:
        async with stream(http, "/v1/events") as sse:
            assert sse.retry == [] or sse.retry == ["1000"]
            jobids = await submit(http, 100)
            await sse.until(final(jobids), timeout=60)
        assert sse.retry[0] == "1000"
        assert_lives(sse.events, jobids, settings.prefix)
        # The index kept exactly what was streamed.
        assert await everything(http) == sse.events


async def test_a_hundred_concurrent_jobs_in_order_in_process(
    app: Starlette, http: httpx.AsyncClient, settings: Settings
) -> None:
    hub = app.state.context.service.events
    body: list[str] = []

    async def listen() -> None:
        # In process, httpx hands the body over once the stream ended: the shutdown
        # below ends it, with its comment.
        r = await http.get("/v1/events")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body.append(r.text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen)
        with anyio.fail_after(5):
            while hub.streams < 1:
                await anyio.sleep(0.01)
        jobids = await submit(http, 100)
        with anyio.fail_after(60):
            while len([e for e in await everything(http) if e.job_state.is_final]) < 100:
                await anyio.sleep(0.05)
        hub.close()
    sse = SSE()
    sse.feed(body[0].split("\n"))
    assert sse.retry == ["1000"]
    assert sse.comments[-1].startswith("server shutting down")
    assert_lives(sse.events, jobids, settings.prefix)
    assert await everything(http) == sse.events


# ---- 2. reconnect: Last-Event-ID, after ----


async def test_reconnect_with_last_event_id_loses_and_repeats_nothing(live_app: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_app.url, timeout=10) as http:
        seen: list[Event] = []
        jobids: list[str] = []
        # Three connections, each cut after a few events while jobs run; each resumes.
        async with stream(http, "/v1/events") as sse:
            jobids += await submit(http, 10, "sleep 0.3")
            await sse.until(lambda s: len(s.events) >= 5)
        seen += sse.events
        for way in ("header", "query", "header"):
            kwargs: dict[str, Any] = (
                {"headers": {"Last-Event-ID": str(seen[-1].id)}}
                if way == "header"
                else {"params": {"after": seen[-1].id}}
            )
            async with stream(http, "/v1/events", **kwargs) as sse:
                jobids += await submit(http, 3, "sleep 0.2")
                await sse.until(lambda s: len(s.events) >= 6)
            assert sse.events and sse.events[0].id > seen[-1].id
            seen += sse.events
        async with stream(http, "/v1/events", headers={"Last-Event-ID": str(seen[-1].id)}) as sse:
            await sse.until(lambda s: final(jobids)(_with(seen, s)), timeout=30)
        seen += sse.events
        assert_lives(seen, jobids)
        # after=0 replays everything kept: the same events.
        async with stream(http, "/v1/events", params={"after": 0}) as sse:
            await sse.until(lambda s: len(s.events) >= len(seen))
        assert sse.events == seen
        # Last-Event-ID wins over after.
        async with stream(
            http, "/v1/events", params={"after": 0}, headers={"Last-Event-ID": str(seen[-2].id)}
        ) as sse:
            await sse.until(lambda s: len(s.events) >= 1)
            with anyio.move_on_after(0.3):
                await sse.until(lambda s: len(s.events) > 1)
        assert sse.events == seen[-1:]


def _with(seen: list[Event], sse: SSE) -> SSE:
    both = SSE()
    both.events = [*seen, *sse.events]
    return both


@pytest.mark.parametrize(
    "value", ["x", "-1", "1.5", "", " 1", "١٢".encode(), "99999999999999999999", "9223372036854775808", "1e3"]
)
async def test_a_bad_last_event_id_is_422_naming_the_header(
    http: httpx.AsyncClient, value: str | bytes
) -> None:
    for path in ("/v1/events", "/v1/events?after=0"):
        for accept in ("text/event-stream", "application/json"):
            r = await http.get(path, headers={"Last-Event-ID": value, "Accept": accept})
            assert r.status_code == 422, (value, r.text)
            problem = r.json()
            assert problem["code"] == "validation_error"
            assert problem["errors"][0]["loc"] == ["header", "Last-Event-ID"], problem


@pytest.mark.parametrize(
    "query", ["after=-1", "after=x", "after=1.5", "timeout=-1", "timeout=301", "limit=0", "limit=10001"]
)
async def test_bad_query_values_are_422_naming_them(http: httpx.AsyncClient, query: str) -> None:
    r = await http.get(f"/v1/events?{query}", headers=JSON)
    assert r.status_code == 422, (query, r.text)
    assert r.json()["errors"][0]["loc"] == ["query", query.split("=")[0]], r.text


# ---- 4. the long poll ----


async def test_the_long_poll_answers_as_soon_as_an_event_comes(live_app: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_app.url, timeout=20) as http:
        assert await long_poll(http, timeout=0) == []
        # Nothing: [] once the timeout passed, not before.
        with anyio.fail_after(5):
            t0 = anyio.current_time()
            assert await long_poll(http, timeout=1) == []
            assert anyio.current_time() - t0 >= 0.9
        # An event: answered with it long before the timeout.
        got: list[list[Event]] = []

        async def poll() -> None:
            got.append(await long_poll(http, timeout=30))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                await anyio.sleep(0.3)  # the poll is waiting (it has no after: from now on)
                (jobid,) = await submit(http, 1)
        assert got[0] and got[0][0].jobid == jobid and got[0][0].state == "new"
        # From an id on, limit at a time, nothing lost or repeated.
        with anyio.fail_after(15):
            while not (evs := await long_poll(http, after=0, timeout=0)) or not evs[-1].job_state.is_final:
                await anyio.sleep(0.05)
        paged: list[Event] = []
        while page := await long_poll(http, after=paged[-1].id if paged else 0, limit=1, timeout=0):
            assert len(page) == 1
            paged.extend(page)
        assert paged == evs and life(evs) == LIFE
        assert await long_poll(http, after=evs[1].id, limit=2) == evs[2:4]
        # The per-job route says the same.
        assert await long_poll(http, f"/v1/jobs/{jobid}/events", after=0) == evs


async def test_the_per_job_routes_are_404_for_no_such_job(http: httpx.AsyncClient) -> None:
    for accept in ("application/json", "text/event-stream"):
        r = await http.get("/v1/jobs/1796681537.369/events", headers={"Accept": accept})
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "not_found"


# ---- 5. token mode: isolation ----


biscuit = pytest.importorskip("biscuit_auth")


@pytest.fixture(scope="module")
def shared(tls_identities: Identities, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with tls_server(
        tls_identities, tmp_path_factory.mktemp("events") / "state", authz="token", event_heartbeat=0.5
    ) as server:
        yield server


def _narrowed(server: TlsServer, jobid: str) -> str:
    with server.client("alice") as c:
        token = c.get("/v1/token").json()["token"]
        key = biscuit.PublicKey(c.get("/v1/token/key").json()["public_key"])
    parsed = biscuit.Biscuit.from_base64(token, key)
    block = biscuit.BlockBuilder(f'check if job($j), ["{jobid}"].contains($j);')
    return str(parsed.append(block).to_base64())


def _wait_final(c: httpx.Client, jobid: str) -> None:
    deadline = time.monotonic() + 15
    while c.get(f"/v1/jobs/{jobid}/state").json()["state"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"{jobid} did not end"
        time.sleep(0.05)


def _lines(
    r: httpx.Response, until: Callable[[list[Event]], bool], *, heartbeat: bool = False
) -> tuple[list[Event], list[str]]:
    """Read a live stream (sync, TLS) until ``until`` holds for its events (and then, if
    ``heartbeat``, until the next heartbeat)."""
    events: list[Event] = []
    comments: list[str] = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            events.append(Event.model_validate_json(line[6:]))
            if until(events) and not heartbeat:
                break
        elif line.startswith(":"):
            comments.append(line)
            if heartbeat and until(events):
                break
    return events, comments


def test_bob_sees_none_of_alices_events(shared: TlsServer) -> None:
    with shared.client("alice") as alice, shared.client("bob") as bob:
        with bob.stream("GET", "/v1/events", params={"after": 0}) as r:
            assert r.status_code == 200
            a = alice.post("/v1/jobs", json={"script": "true"}).json()["jobid"]
            _wait_final(alice, a)
            b = bob.post("/v1/jobs", json={"script": "true"}).json()["jobid"]
            seen, _ = _lines(r, lambda evs: any(e.jobid == b and e.job_state.is_final for e in evs))
        assert {e.jobid for e in seen} == {b}, [(e.jobid, e.state) for e in seen]
        # Neither replay nor the long poll nor a filter on alice's id shows hers.
        for params in ({"after": 0}, {"after": 0, "jobs": a}):
            evs = bob.get("/v1/events", params={**params, "timeout": 0}, headers=JSON).json()
            assert a not in {e["jobid"] for e in evs}
        assert alice.get(f"/v1/jobs/{a}/events", params={"after": 0, "timeout": 0}, headers=JSON).json()
        for accept in ("application/json", "text/event-stream"):
            r2 = bob.get(f"/v1/jobs/{a}/events", params={"after": 0}, headers={"Accept": accept})
            assert r2.status_code == 404, r2.text
            assert r2.json()["code"] == "not_found"
            assert r2.json()["detail"] == bob.get(f"/v1/jobs/{a}").json()["detail"]


def _two_jobs(server: TlsServer) -> tuple[str, str]:
    with server.client("alice") as alice:
        mine = alice.post("/v1/jobs", json={"script": "true"}).json()["jobid"]
        other = alice.post("/v1/jobs", json={"script": "true"}).json()["jobid"]
        _wait_final(alice, mine)
        _wait_final(alice, other)
    return mine, other


def test_a_token_narrowed_to_one_job_reads_that_jobs_events_only(shared: TlsServer) -> None:
    mine, other = _two_jobs(shared)
    with shared.client("bob", token=_narrowed(shared, mine)) as agent:
        evs = agent.get(f"/v1/jobs/{mine}/events", params={"after": 0, "timeout": 0}, headers=JSON).json()
        assert {e["jobid"] for e in evs} == {mine}
        assert life([Event.model_validate(e) for e in evs]) == LIFE
        # Another job's: as GET /v1/jobs/{other} says, for both forms.
        assert agent.get(f"/v1/jobs/{other}").status_code == 403
        for accept in ("application/json", "text/event-stream"):
            r = agent.get(f"/v1/jobs/{other}/events", params={"after": 0}, headers={"Accept": accept})
            assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text


def test_a_token_narrowed_to_one_job_sees_only_its_events_on_the_whole_stream(shared: TlsServer) -> None:
    mine, _ = _two_jobs(shared)
    with shared.client("bob", token=_narrowed(shared, mine)) as agent:
        evs = agent.get("/v1/events", params={"after": 0, "timeout": 0}, headers=JSON).json()
        assert isinstance(evs, list) and {e["jobid"] for e in evs} == {mine}, evs
        # Live: alice's next job's events never reach the narrowed stream.
        with agent.stream("GET", "/v1/events", params={"after": 0}) as s:
            assert s.status_code == 200
            with shared.client("alice") as alice:
                third = alice.post("/v1/jobs", json={"script": "true"}).json()["jobid"]
                _wait_final(alice, third)
            # Until a heartbeat (every 0.5 s here) after the replay: any live event of
            # ``third`` would have come before it.
            seen, _ = _lines(s, lambda evs: any(e.job_state.is_final for e in evs), heartbeat=True)
        assert {e.jobid for e in seen} == {mine}, [(e.jobid, e.state) for e in seen]
