"""Start-up is the lifespan's: building the app does no I/O, the lifespan opens and
closes everything, and no request ever waits on a slow filesystem read of another job."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_server.app import create_app
from psik_api_server.jobs import directory as jobdir
from psik_api_server.jobs import watcher
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")  # type: ignore[arg-type]


def _children() -> set[int]:
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == me:
                found.add(int(entry))
    return found


async def test_building_the_app_touches_no_file_and_starts_no_process(settings: Settings) -> None:
    before = _children()
    app = create_app(settings)
    assert not settings.prefix.exists() and not settings.database_path.exists()
    assert _children() == before
    async with LifespanManager(app), _client(app) as http:
        assert settings.prefix.is_dir() and settings.database_path.is_file()
        assert (await http.get("/v1/jobs")).json()["items"] == []
        launcher = app.state.context.service.backend._launcher
        with anyio.fail_after(20):  # the default launcher starts with the app
            while not launcher.running:
                await anyio.sleep(0.01)
    assert not launcher.running  # and stops with it


async def test_a_lazy_launcher_is_not_spawned_by_an_app_that_runs_no_job(settings: Settings) -> None:
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app) as http:
        job = (await http.post("/v1/jobs/new", json={"script": "true"})).json()
        assert (await http.get(f"/v1/jobs/{job['jobid']}")).json()["state"] == "new"
        assert not app.state.context.service.backend._launcher.running
        started = (await http.post(f"/v1/jobs/{job['jobid']}/start")).json()
        assert started["state"] in {"queued", "active", "completed"}  # started on first use
        assert app.state.context.service.backend._launcher.running


async def test_a_request_without_the_lifespan_is_refused_not_half_served(settings: Settings) -> None:
    app = create_app(settings)
    async with _client(app) as http:
        r = await http.get("/v1/jobs")
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert not settings.prefix.exists()


async def test_a_slow_job_read_stalls_neither_health_nor_lists(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job's spec.json takes 2 s to read (a parallel filesystem on a bad day):
    other requests are answered meanwhile, while that read is still blocked."""
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app) as http:
        jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        entered, release = threading.Event(), threading.Event()
        timed_out: list[bool] = []
        real = jobdir.read_spec

        def slow_read_spec(base: Path) -> object:
            if base.name == jobid:
                entered.set()
                timed_out.append(not release.wait(2))
            return real(base)

        monkeypatch.setattr(jobdir, "read_spec", slow_read_spec)
        slow_done = anyio.Event()

        async def slow_get() -> None:
            assert (await http.get(f"/v1/jobs/{jobid}")).json()["jobid"] == jobid
            slow_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_get)
            assert await anyio.to_thread.run_sync(entered.wait, 5)
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert [j["jobid"] for j in (await http.get("/v1/jobs")).json()["items"]] == [jobid]
            assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "new"
            assert not slow_done.is_set()  # all answered while the slow read still blocks
            release.set()
        assert timed_out == [False]


async def test_a_slow_status_file_stalls_the_watcher_not_the_server(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app) as http:
        jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        entered, release, looked = threading.Event(), threading.Event(), threading.Event()
        real = watcher._look

        def slow_look(jobs: list[tuple[str, object, Path, int, tuple[int, int]]]) -> object:
            if any(j[0] == jobid for j in jobs):
                entered.set()
                release.wait(2)
                looked.set()
            return real(jobs)  # type: ignore[arg-type]

        monkeypatch.setattr(watcher, "_look", slow_look)
        service = app.state.context.service
        service.watcher.follow(jobid, service.backend.path(jobid) / "status.csv")
        try:
            assert await anyio.to_thread.run_sync(entered.wait, 5)
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get(f"/v1/jobs/{jobid}")).json()["state"] == "new"
            assert not looked.is_set()  # answered while the watcher's look still blocks
        finally:
            release.set()
