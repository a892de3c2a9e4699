"""Rate limits (issue 20): per identity, past the limit 429 ``rate_limited`` with
``Retry-After``, nothing done; submits counted apart (a group as its jobs); health and
the document free; the buckets bounded in memory. The real app in local mode (one
identity, ``local:psik_api``) with real local jobs; the limiter itself with a fake
clock. alice against bob over TLS: bench/bench_fairness.py (a benchmark, not a timed test)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import LIMITS, Principal
from psik_api_server.auth.authenticator import PRINCIPAL_KEY
from psik_api_server.http.openapi import RATE_LIMIT_EXEMPT
from psik_api_server.serving.rate_limit import EXEMPT_PATHS, REFUSAL_HOLD, RateLimit, RateLimiter, Turns
from psik_api_server.settings import RateLimits, Settings, parse_config
from support import LiveServer

pytestmark = pytest.mark.anyio

#: A rate so slow that no token comes back while a test runs (one per 100 s).
CRAWL = 0.01
#: The Retry-After of an empty bucket at CRAWL: 100 s less the time since it was full
#: (seconds, on a loaded machine: the first local submit starts the launcher).
HUNDRED_S = range(90, 101)
FINAL = {"completed", "failed", "canceled"}


@asynccontextmanager
async def serving(settings: Settings, **limits: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with ``rate_limits`` set to ``limits``, and raw httpx on it."""
    app = lazy_app(settings.model_copy(update={"rate_limits": RateLimits(**limits)}))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def refused(r: httpx.Response, limit: str) -> int:
    """Check ``r`` is the 429 of ``limit`` (``requests`` or ``jobs submitted``); its Retry-After."""
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "rate_limited"
    assert problem["title"] == "Too many requests"
    assert problem["request_id"] == r.headers["x-request-id"]
    assert problem["detail"].startswith(f"local:psik_api is over its limit of {CRAWL:g} {limit} per second")
    retry_after = r.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert f"send it again in {retry_after} s" in problem["detail"]
    return int(retry_after)


async def final(c: httpx.AsyncClient, jobids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for jobid in jobids:
        while (await c.get(f"/v1/jobs/{jobid}")).json()["state"] not in FINAL:
            assert time.monotonic() < deadline, jobid
            await anyio.sleep(0.05)


# ---- requests ----


async def test_past_the_burst_a_request_is_429_with_retry_after(settings: Settings) -> None:
    async with serving(settings, requests_per_second=CRAWL, burst=3, submits_per_second=0) as c:
        for _ in range(3):
            assert (await c.get("/v1/backends")).status_code == 200
        r = await c.get("/v1/jobs")
        # One token per 100 s: the next is ~100 s away, rounded up to whole seconds.
        assert refused(r, "requests") in HUNDRED_S
        assert "(burst 3)" in r.json()["detail"]
        # Refusals take nothing: the wait does not grow with them.
        assert refused(await c.get("/v1/backends"), "requests") in HUNDRED_S


async def test_a_refused_submit_makes_nothing(settings: Settings) -> None:
    async with serving(settings, requests_per_second=CRAWL, burst=2, submits_per_second=0) as c:
        assert (await c.get("/v1/jobs")).json()["items"] == []
        assert (await c.get("/v1/jobs")).status_code == 200
        refused(await c.post("/v1/jobs", json={"script": "true"}), "requests")
    async with serving(settings, requests_per_second=0, submits_per_second=0.5) as c:
        assert (await c.get("/v1/jobs")).json()["items"] == []


async def test_health_and_the_document_are_free(settings: Settings) -> None:
    assert {"/healthz", "/openapi.json", "/", "/v1/callback"} == EXEMPT_PATHS
    async with serving(settings, requests_per_second=CRAWL, burst=1, submits_per_second=0) as c:
        assert (await c.get("/v1/backends")).status_code == 200
        refused(await c.get("/v1/backends"), "requests")
        for path in ("/healthz", "/openapi.json", "/"):
            for _ in range(3):
                assert (await c.get(path)).status_code == 200, path
        # A path the router takes as the health check, spelled otherwise, is counted.
        refused(await c.get("/healthz%0A"), "requests")


async def test_an_event_stream_counts_one_request_at_its_opening(settings: Settings) -> None:
    limited = settings.model_copy(
        update={"rate_limits": RateLimits(requests_per_second=CRAWL, burst=2, submits_per_second=0)}
    )
    with LiveServer(lazy_app(limited)) as live:
        async with (
            httpx.AsyncClient(base_url=live.url, timeout=10) as c,
            c.stream("GET", "/v1/events") as stream,
        ):
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            # The open stream took one; one is left, then none.
            assert (await c.get("/v1/backends")).status_code == 200
            refused(await c.get("/v1/backends"), "requests")


# ---- submits ----


async def test_submits_have_their_own_limit(settings: Settings) -> None:
    limits = {"requests_per_second": 1000, "burst": 1000, "submits_per_second": CRAWL, "submit_burst": 1}
    async with serving(settings, **limits) as c:
        first = await c.post("/v1/jobs", json={"script": "true"})
        assert first.status_code == 201, first.text
        # A submit bucket of one: empty now.
        assert refused(await c.post("/v1/jobs", json={"script": "true"}), "jobs submitted") in HUNDRED_S
        # The router takes /v1/jobs%0A as POST /v1/jobs: it is a submit too.
        refused(await c.post("/v1/jobs%0A", json={"script": "true"}), "jobs submitted")
        # Making a job is not submitting it; starting it is.
        new = await c.post("/v1/jobs/new", json={"script": "true"})
        assert new.status_code == 201, new.text
        jobid = new.json()["jobid"]
        refused(await c.post(f"/v1/jobs/{jobid}/start"), "jobs submitted")
        assert (await c.get(f"/v1/jobs/{jobid}")).json()["state"] == "new"
        page = (await c.get("/v1/jobs")).json()["items"]
        assert sorted(j["jobid"] for j in page) == sorted([first.json()["jobid"], jobid])
        await final(c, [first.json()["jobid"]])


async def test_a_group_counts_as_its_jobs(settings: Settings) -> None:
    """A group is let in for one submit, then charged for its other jobs: the next
    submit waits for all of them. Were a group one submit, it would be a way around."""
    limits = {"requests_per_second": 1000, "burst": 1000, "submits_per_second": 1, "submit_burst": 1}
    async with serving(settings, **limits) as c:
        body = {"jobs": [{"script": "true"} for _ in range(6)]}
        made = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "g1"})
        assert made.status_code == 201, made.text
        jobids = [j["jobid"] for j in made.json()["jobs"]]
        assert len(jobids) == 6
        r = await c.post("/v1/jobs", json={"script": "true"})
        assert r.status_code == 429, r.text
        # Six taken from a bucket of one at 1/s: five owed, the next one 6 s away.
        assert int(r.headers["retry-after"]) >= 5
        refused_group = await c.post("/v1/groups", json=body, headers={"Idempotency-Key": "g2"})
        assert refused_group.status_code == 429
        await final(c, jobids)


async def test_a_group_refused_by_the_route_is_charged_one(settings: Settings) -> None:
    limits = {"requests_per_second": 1000, "burst": 1000, "submits_per_second": CRAWL, "submit_burst": 1}
    async with serving(settings, **limits) as c:
        bad = await c.post("/v1/groups", json={"jobs": [{"script": "true", "nope": 1}] * 5})
        assert bad.status_code == 422, bad.text
        # It took the one submit it was let in for, not five: the next is ~100 s away.
        assert refused(await c.post("/v1/jobs", json={"script": "true"}), "jobs submitted") in HUNDRED_S


async def test_a_group_as_large_as_the_submit_burst_goes_through_whole(settings: Settings) -> None:
    """A bucket of ``submit_burst`` lets a group of that many in at once, leaving no debt
    (by default the largest group: a Snakemake run's group is not refused for a minute)."""
    limits = {"requests_per_second": 1000, "burst": 1000, "submits_per_second": CRAWL, "submit_burst": 4}
    async with serving(settings, **limits) as c:
        made = await c.post("/v1/groups", json={"jobs": [{"script": "true"}] * 4})
        assert made.status_code == 201, made.text
        jobids = [j["jobid"] for j in made.json()["jobs"]]
        # Four taken from a bucket of four: empty, not in debt (one token, ~100 s away).
        assert refused(await c.post("/v1/jobs", json={"script": "true"}), "jobs submitted") in HUNDRED_S
        await final(c, jobids)


def test_the_default_submit_burst_is_the_largest_group() -> None:
    clock = Clock()
    limits = RateLimits()
    assert limits.submit_burst == LIMITS.max_group_jobs
    limiter = RateLimiter(limits, clock=clock)
    assert limiter.admit("uid:alice", submit=True) is None
    limiter.charge_submits("uid:alice", LIMITS.max_group_jobs - 1)  # the largest group
    refusal = limiter.admit("uid:alice", submit=True)
    # The next job a tenth of a second later, not 99 s (past the client's patience).
    assert refusal is not None and refusal.submits and refusal.wait == pytest.approx(0.1)
    clock.now = 0.1
    assert limiter.admit("uid:alice", submit=True) is None
    # A full bucket lets as many single submits through at once (were the requests not
    # limited), then the rate applies.
    limiter = RateLimiter(limits.model_copy(update={"requests_per_second": 0}), clock=clock)
    bob = [limiter.admit("uid:bob", submit=True) for _ in range(LIMITS.max_group_jobs + 1)]
    assert bob[:-1] == [None] * LIMITS.max_group_jobs and bob[-1] is not None


# ---- requests in progress at once ----


class Gates:
    """An app whose every request waits at its gate (by path) once inside: it is then
    in progress for as long as a test wants."""

    def __init__(self) -> None:
        self.inside: list[str] = []
        self.entered: dict[str, anyio.Event] = {}
        self.gates: dict[str, anyio.Event] = {}

    def gate(self, path: str) -> anyio.Event:
        return self.gates.setdefault(path, anyio.Event())

    def entry(self, path: str) -> anyio.Event:
        return self.entered.setdefault(path, anyio.Event())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.inside.append(path)
        self.entry(path).set()
        await self.gate(path).wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, user: str, path: str) -> list[dict[str, Any]]:
    """One request of ``user`` through ``app``; the messages it sent."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [],
        "state": {PRINCIPAL_KEY: Principal(user)},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_flood_waits_behind_itself_while_others_go_straight_in() -> None:
    gates = Gates()
    limits = RateLimits(requests_per_second=0, submits_per_second=0, concurrent=4, queued=1)
    turns = Turns(limits.concurrent, limits.queued)
    app = RateLimit(gates, RateLimiter(limits), turns)
    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(call, app, "uid:bob", f"/bob/{i}")
            await gates.entry(f"/bob/{i}").wait()
        fifth: list[list[dict[str, Any]]] = []
        tg.start_soon(lambda: _into(fifth, call(app, "uid:bob", "/bob/4")))
        while turns.waiting("uid:bob") == 0:
            await anyio.sleep(0)
        # bob's fifth waits its turn, past his four in progress; alice's goes straight in.
        gates.gate("/alice").set()
        assert (await call(app, "uid:alice", "/alice"))[-1]["body"] == b"ok"
        assert "/bob/4" not in gates.inside
        # The queue of one is full: bob's sixth is refused at once, and waits for nothing.
        sixth = await call(app, "uid:bob", "/bob/5")
        assert sixth[0]["status"] == 429
        headers = dict(sixth[0]["headers"])
        assert headers[b"retry-after"] == b"1"
        assert headers[b"content-type"] == b"application/problem+json"
        assert json.loads(sixth[1]["body"]) == {
            "type": "about:blank",
            "title": "Too many requests",
            "status": 429,
            "detail": "uid:bob is over its limit of 4 requests in progress at once, with 1 more"
            " waiting their turn; nothing was done: send it again in 1 s",
            "instance": "/bob/5",
            "code": "rate_limited",
        }
        assert "/bob/5" not in gates.inside
        # One of bob's ends: his fifth takes its turn.
        gates.gate("/bob/0").set()
        await gates.entry("/bob/4").wait()
        assert turns.waiting("uid:bob") == 0
        for i in range(1, 5):
            gates.gate(f"/bob/{i}").set()
    assert fifth[0][-1]["body"] == b"ok"
    assert len(turns) == 0  # nothing kept for identities with nothing in progress


async def _into(out: list[Any], awaitable: Any) -> None:
    out.append(await awaitable)


async def test_a_request_cancelled_while_waiting_gives_up_its_place() -> None:
    gates = Gates()
    turns = Turns(1, 10)
    app = RateLimit(gates, RateLimiter(RateLimits(requests_per_second=0, submits_per_second=0)), turns)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, app, "uid:bob", "/held")
        await gates.entry("/held").wait()
        waiting = anyio.CancelScope()
        tg.start_soon(_cancelled, waiting, app, "/gone")
        while turns.waiting("uid:bob") == 0:
            await anyio.sleep(0)
        waiting.cancel()
        while turns.waiting("uid:bob") != 0:
            await anyio.sleep(0)
        gates.gate("/next").set()
        tg.start_soon(call, app, "uid:bob", "/next")
        gates.gate("/held").set()
        await gates.entry("/next").wait()
    assert "/gone" not in gates.inside and len(turns) == 0


async def _cancelled(scope: anyio.CancelScope, app: Any, path: str) -> None:
    with scope:
        await call(app, "uid:bob", path)


async def test_requests_past_the_cap_wait_in_the_real_app(settings: Settings) -> None:
    """Two uploads held in progress (their bodies not yet whole): the third request waits,
    the fourth finds no room to wait (429, nothing done), the third goes in when one ends."""
    async with serving(settings, requests_per_second=0, submits_per_second=0, concurrent=2, queued=1) as c:
        jobid = (await c.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        gates = [anyio.Event(), anyio.Event()]
        reading = [anyio.Event(), anyio.Event()]
        answers: dict[str, httpx.Response] = {}

        async def upload(i: int) -> None:
            async def body() -> AsyncIterator[bytes]:
                yield b"x"
                reading[i].set()  # the route asked for more: in progress
                await gates[i].wait()
                yield b"y"

            answers[f"up{i}"] = await c.put(f"/v1/jobs/{jobid}/files/f{i}", content=body())

        answered = anyio.Event()

        async def backends(name: str) -> None:
            answers[name] = await c.get("/v1/backends")
            answered.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(upload, i)
                    await reading[i].wait()
                # Two more: the first in takes the room to wait, the other finds none.
                tg.start_soon(backends, "a")
                tg.start_soon(backends, "b")
                await answered.wait()
                (first,) = answers.values()
                assert first.status_code == 429, first.text
                assert "requests in progress at once, with 1 more waiting" in first.json()["detail"]
                assert first.headers["retry-after"] == "1"
                gates[0].set()  # one upload ends: the one waiting goes in
                while len(answers) < 3:
                    await anyio.sleep(0.01)
                gates[1].set()
        assert sorted(r.status_code for r in answers.values()) == [200, 201, 201, 429], answers
        files = (await c.get(f"/v1/jobs/{jobid}/files")).json()
        assert {e["path"] for e in files["entries"]} >= {"f0", "f1"}


async def test_event_routes_and_streamed_answers_hold_no_turn(settings: Settings) -> None:
    """With one turn and no room to wait, an open event stream, a long poll waiting and
    a log followed leave the turn free: a request in between is answered."""
    limited = settings.model_copy(
        update={
            "rate_limits": RateLimits(requests_per_second=0, submits_per_second=0, concurrent=1, queued=0)
        }
    )
    with LiveServer(lazy_app(limited)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as c:
            job = (await c.post("/v1/jobs", json={"script": "sleep 30"})).json()["jobid"]
            async with c.stream("GET", "/v1/events") as stream, anyio.create_task_group() as tg:
                assert stream.status_code == 200
                assert (await anext(stream.aiter_lines())).startswith("retry:")
                assert (await c.get("/v1/backends")).status_code == 200

                async def long_poll() -> None:
                    r = await c.get(
                        "/v1/events", headers={"Accept": "application/json"}, params={"timeout": 5}
                    )
                    assert r.status_code == 200

                tg.start_soon(long_poll)
                await anyio.sleep(0.2)  # (not needed to pass: the poll takes no turn either way)
                assert (await c.get("/v1/backends")).status_code == 200
                async with c.stream("GET", f"/v1/jobs/{job}/logs/stdout", params={"follow": "true"}) as log:
                    assert log.status_code == 200
                    assert (await c.get("/v1/backends")).status_code == 200
                assert (await c.delete(f"/v1/jobs/{job}")).status_code in (200, 202)
                tg.cancel_scope.cancel()


async def test_a_refusal_soon_after_another_is_held_and_unchanged() -> None:
    """A client that does not wait as told has its next refusals held (REFUSAL_HOLD, an
    await), at most ``queued`` at once; a client that waited is answered at once. The
    answer is the same either way."""
    clock = Clock()
    limits = RateLimits(requests_per_second=CRAWL, burst=1, submits_per_second=0, concurrent=0, queued=2)
    holds: list[float] = []
    release = anyio.Event()

    async def sleep(seconds: float) -> None:
        holds.append(seconds)
        await release.wait()

    app = RateLimit(Gates(), RateLimiter(limits, clock=clock), sleep=sleep)
    app.app.gate("/ok").set()  # type: ignore[attr-defined]
    assert (await call(app, "uid:bob", "/ok"))[0]["status"] == 200
    first = await call(app, "uid:bob", "/a")  # refused, the first: at once
    assert first[0]["status"] == 429 and holds == []
    clock.now = 0.5
    answers: list[list[dict[str, Any]]] = []
    with anyio.fail_after(10):  # not held: the loop below would wait for ever
        async with anyio.create_task_group() as tg:
            for path in ("/b", "/c"):
                tg.start_soon(lambda p=path: _into(answers, call(app, "uid:bob", p)))
            while len(holds) < 2:
                await anyio.sleep(0)
            assert holds == [REFUSAL_HOLD, REFUSAL_HOLD] and answers == []
            # Two held (queued): the next is answered at once; alice is not held for bob.
            assert (await call(app, "uid:bob", "/d"))[0]["status"] == 429
            assert (await call(app, "uid:alice", "/ok"))[0]["status"] == 200
            assert (await call(app, "uid:alice", "/e"))[0]["status"] == 429
            assert len(holds) == 2 and answers == []
            release.set()
    assert [a[0]["status"] for a in answers] == [429, 429]
    held = json.loads(answers[0][1]["body"])
    assert held["detail"] == json.loads(first[1]["body"])["detail"]  # same limit, same wait
    # A client that waited as long as it was told is answered at once again.
    clock.now = 100.0
    assert (await call(app, "uid:bob", "/ok"))[0]["status"] == 200
    clock.now = 100.1
    assert (await call(app, "uid:bob", "/f"))[0]["status"] == 429
    assert len(holds) == 2


# ---- settings and the document ----


def test_off_in_local_mode_on_in_token_mode_unless_null_or_zero() -> None:
    assert parse_config({}).rate_limits is None
    token = parse_config({"authz": "token"}).rate_limits
    assert token == RateLimits(requests_per_second=50, burst=100, submits_per_second=10)
    assert parse_config({"authz": "mod:Policy"}).rate_limits == token  # seed-style token mode
    assert parse_config({"authz": "token", "rate_limits": None}).rate_limits is None
    zeros = {"requests_per_second": 0, "burst": 0, "submits_per_second": 0, "concurrent": 0}
    limits = parse_config({"authz": "token", "rate_limits": zeros}).rate_limits
    assert limits is not None and not limits.enabled
    local = parse_config({"rate_limits": {"requests_per_second": 5, "burst": 10}}).rate_limits
    assert local == RateLimits(requests_per_second=5, burst=10, submits_per_second=10)
    with pytest.raises(ValueError, match="burst must be at least 1"):
        parse_config({"rate_limits": {"requests_per_second": 5, "burst": 0}})
    with pytest.raises(ValueError, match=r"rate_limits\.rps"):
        parse_config({"rate_limits": {"rps": 5}})


async def test_zero_limits_are_no_limits(settings: Settings) -> None:
    async with serving(settings, requests_per_second=0, burst=0, submits_per_second=0, concurrent=0) as c:
        for _ in range(5):
            assert (await c.get("/v1/backends")).status_code == 200
        assert "429" not in (await c.get("/openapi.json")).json()["paths"]["/v1/jobs"]["post"]["responses"]


async def test_the_document_declares_429_where_it_can_be_answered(settings: Settings) -> None:
    async with serving(settings) as c:
        doc = (await c.get("/openapi.json")).json()
    seen = set()
    for item in doc["paths"].values():
        for op in item.values():
            seen.add(op["operationId"])
            declared = op["responses"].get("429")
            if op["operationId"] in RATE_LIMIT_EXEMPT:
                assert declared is None, op["operationId"]
                continue
            assert declared is not None, op["operationId"]
            assert set(declared["content"]) == {"application/problem+json"}
            assert declared["headers"]["Retry-After"]["required"] is True
            assert "rate_limited" in declared["content"]["application/problem+json"]["examples"]
    assert seen > RATE_LIMIT_EXEMPT


# ---- the limiter alone (a fake clock) ----


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_identity_empty_is_no_one_elses_concern() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(requests_per_second=1, burst=2, submits_per_second=0), clock=clock)
    assert limiter.admit("uid:bob") is None and limiter.admit("uid:bob") is None
    refusal = limiter.admit("uid:bob")
    assert refusal is not None and not refusal.submits and refusal.retry_after == 1
    assert limiter.admit("uid:alice") is None and limiter.admit("uid:alice") is None
    clock.now = 0.5
    assert limiter.admit("uid:bob") is not None  # half a token
    clock.now = 1.0
    assert limiter.admit("uid:bob") is None


def test_retry_after_is_the_wait_rounded_up() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(requests_per_second=0.3, burst=1, submits_per_second=0), clock=clock)
    assert limiter.admit("a") is None
    refusal = limiter.admit("a")
    assert refusal is not None
    assert refusal.wait == pytest.approx(1 / 0.3)
    assert refusal.retry_after == math.ceil(1 / 0.3) == 4
    clock.now = refusal.retry_after  # waiting as told is enough
    assert limiter.admit("a") is None


def test_a_submit_takes_from_both_buckets_or_neither() -> None:
    clock = Clock()
    limiter = RateLimiter(
        RateLimits(requests_per_second=1, burst=3, submits_per_second=1, submit_burst=1), clock=clock
    )
    assert limiter.admit("a", submit=True) is None
    refusal = limiter.admit("a", submit=True)
    assert refusal is not None and refusal.submits
    # The refused submit took no request: two are left.
    assert limiter.admit("a") is None and limiter.admit("a") is None
    assert limiter.admit("a") is not None


def test_debt_is_paid_before_the_next_submit() -> None:
    clock = Clock()
    limiter = RateLimiter(
        RateLimits(requests_per_second=0, burst=0, submits_per_second=10, submit_burst=10), clock=clock
    )
    assert limiter.admit("a", submit=True) is None
    limiter.charge_submits("a", 299)  # a group of 300
    refusal = limiter.admit("a", submit=True)
    assert refusal is not None and refusal.wait == pytest.approx((1 - (10 - 300)) / 10)
    clock.now = 29.0
    assert limiter.admit("a", submit=True) is not None
    clock.now = 29.1
    assert limiter.admit("a", submit=True) is None


def test_many_identities_cannot_grow_memory_without_bound() -> None:
    clock = Clock()
    limits = RateLimits(requests_per_second=10, burst=20, submits_per_second=1)
    limiter = RateLimiter(limits, clock=clock, max_identities=1000)
    # One request each, 100 new identities a second: a bucket is full again 0.1 s after
    # its request, so only those of the last moment are kept.
    for i in range(100_000):
        clock.now = i / 100
        assert limiter.admit(f"addr:10.0.{i // 256}.{i % 256}") is None
        assert len(limiter) <= 12
    # All at once (none full again yet): the cap holds, the oldest go first.
    for i in range(5000):
        assert limiter.admit(f"uid:{i}") is None
    assert len(limiter) == 1000
    # One dropped comes back with a full bucket, as a new one would.
    for _ in range(20):
        assert limiter.admit("uid:0") is None
    assert limiter.admit("uid:0") is not None


def test_an_identity_in_debt_is_kept() -> None:
    clock = Clock()
    limiter = RateLimiter(
        RateLimits(requests_per_second=10, burst=10, submits_per_second=1, submit_burst=1), clock=clock
    )
    assert limiter.admit("uid:bob", submit=True) is None
    limiter.charge_submits("uid:bob", 99)
    for i in range(50):
        clock.now = i * 1.0
        assert limiter.admit(f"uid:{i}") is None
    refusal = limiter.admit("uid:bob", submit=True)
    assert refusal is not None and refusal.submits and refusal.retry_after == 51
