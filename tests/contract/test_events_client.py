"""The client's event stream against the real server (live uvicorn: an in-process
ASGITransport holds a response until it ends, so it cannot carry a stream): events in
order, wait/wait_all by the stream (the default over the network) in a few requests,
polling when no stream can be opened, and a watch that outlives a server restart with
every event exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from conftest import lazy_app
from psik_api_client import AsyncClient, Client, Event, JobState
from psik_api_server.context import context
from psik_api_server.settings import Settings
from support import LiveServer

JOBS = 20


class Counting(httpx.HTTPTransport):
    """A real transport that counts the requests it sends, by method and path."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sent: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent[f"{request.method} {request.url.path}"] += 1
        return super().handle_request(request)


def watch_until_final(api: Client, jobids: set[str] | int, *, after: int = 0) -> list[Event]:
    """Every event from ``after`` on, until each of ``jobids`` (or that many jobs) is final."""
    got: list[Event] = []
    final: set[str] = set()
    events = api.watch(after=after)
    for event in events:
        got.append(event)
        if event.job_state.is_final:
            final.add(event.jobid)
        if (final >= jobids) if isinstance(jobids, set) else len(final) >= jobids:
            break
    events.close()  # type: ignore[attr-defined]
    return got


def test_events_of_concurrent_jobs_arrive_in_order_once_each(live_app: LiveServer) -> None:
    with Client(live_app.url) as api:
        ids = {api.submit({"name": f"j{n}", "script": f"exit {n % 3}"}).jobid for n in range(JOBS)}
        events = watch_until_final(api, ids)
    got = [e.id for e in events]
    assert got == sorted(set(got))  # in id order, none twice
    mine = [e for e in events if e.jobid in ids]
    for jobid in ids:
        rows = [e for e in mine if e.jobid == jobid]
        assert rows[0].state is JobState.new
        assert rows[-1].job_state in (JobState.completed, JobState.failed)
        assert {JobState.queued, JobState.active} <= {e.state for e in rows}
    assert sum(e.job_state is JobState.failed for e in mine if e.job_state.is_final) == JOBS - JOBS // 3 - 1


def test_wait_and_wait_all_listen_in_a_few_requests(live_app: LiveServer) -> None:
    transport = Counting()  # an httpx.HTTPTransport: events are on by default
    with Client(live_app.url, transport=transport) as api:
        one = api.submit({"script": "sleep 0.2"})
        assert api.wait(one.jobid, timeout=30).state is JobState.completed
        assert transport.sent["GET /v1/events"] == 1
        assert transport.sent[f"GET /v1/jobs/{one.jobid}/state"] == 1  # looked once, then listened
        many = [api.submit({"script": "sleep 0.3"}).jobid for _ in range(JOBS)]
        transport.sent.clear()
        done = api.wait_all(many, timeout=60)
    assert [j.jobid for j in done] == many
    assert all(j.state is JobState.completed for j in done)
    # One stream, one list; then the final jobs whole, together. No polling rounds,
    # no request per job.
    assert transport.sent["GET /v1/events"] == 1
    # The list; the jobs final by then, whole; once all ended, the rest whole (view=full).
    assert transport.sent["GET /v1/jobs"] in (2, 3)
    assert sum(transport.sent.values()) == 1 + transport.sent["GET /v1/jobs"]


def test_wait_polls_when_no_stream_can_be_opened(settings: Settings) -> None:
    # One stream at most, held by someone else: the wait's own is refused (503).
    settings = settings.model_copy(update={"max_event_streams": 1})
    transport = Counting()
    with (
        LiveServer(lazy_app(settings)) as live,
        Client(live.url, transport=transport) as api,
        httpx.Client(base_url=live.url) as other,
        other.stream("GET", "/v1/events", headers={"Accept": "text/event-stream"}) as held,
    ):
        assert held.status_code == 200
        job = api.submit({"script": "sleep 0.2"})
        assert api.wait(job.jobid, timeout=30).state is JobState.completed
    assert transport.sent["GET /v1/events"] == 1
    assert transport.sent[f"GET /v1/jobs/{job.jobid}/state"] >= 2  # polled


def test_a_watch_resumes_across_a_server_restart(settings: Settings, tmp_path: Path) -> None:
    sock = str(tmp_path / "api.sock")
    seen: list[Event] = []
    failed: list[BaseException] = []
    subscribed = threading.Event()
    transport = Counting(uds=sock)

    def watcher() -> None:
        try:
            with Client("http://localhost", transport=transport) as api:
                events = api.watch(after=0)
                final: set[str] = set()
                subscribed.set()
                for event in events:
                    seen.append(event)
                    if event.job_state.is_final:
                        final.add(event.jobid)
                    if len(final) == 6:
                        break
                events.close()  # type: ignore[attr-defined]
        except BaseException as exc:  # reported by the test's thread
            failed.append(exc)

    thread = threading.Thread(target=watcher, daemon=True)
    first = lazy_app(settings)
    with LiveServer(first, uds=sock) as live:
        with Client(uds=sock) as api:
            before = [api.submit({"script": "true"}).jobid for _ in range(3)]
            thread.start()
            assert subscribed.wait(10)
            api.wait_all(before, timeout=30)
        # What `psik-api-server serve` does as shutdown begins (LiveServer is plain
        # uvicorn, which would wait for the open stream for good).
        loop = live.server.servers[0].get_loop()
        loop.call_soon_threadsafe(context(first).service.events.close)
    # Down for a moment; the watcher is reconnecting meanwhile.
    with LiveServer(lazy_app(settings), uds=sock), Client(uds=sock) as api:
        after = [api.submit({"script": "true"}).jobid for _ in range(3)]
        api.wait_all(after, timeout=30)
        thread.join(30)
        assert not thread.is_alive() and not failed, failed
        replay = watch_until_final(api, set(before + after))
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids))  # in order, none twice
    assert ids == [e.id for e in replay][: len(ids)]  # none lost
    assert {e.jobid for e in seen if e.job_state.is_final} == set(before + after)
    assert transport.sent["GET /v1/events"] >= 2  # it did reconnect


@pytest.mark.anyio
async def test_the_async_client_listens_too(live_app: LiveServer) -> None:
    async with AsyncClient(live_app.url) as api:
        ids = [(await api.submit({"script": f"exit {n % 2}"})).jobid for n in range(JOBS)]
        done = await api.wait_all(ids, timeout=60)
        assert [j.state for j in done] == [JobState.completed, JobState.failed] * (JOBS // 2)
        final: set[str] = set()
        seen: list[int] = []
        async with aclosing(api.watch(ids, after=0)) as events:  # type: ignore[type-var]
            async for event in events:
                seen.append(event.id)
                if event.job_state.is_final:
                    final.add(event.jobid)
                if final == set(ids):
                    break
    assert seen == sorted(set(seen))
