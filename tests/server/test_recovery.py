"""Nothing lost, nothing run twice: what a server killed mid-request leaves behind is
finished at the next start, and an Idempotency-Key always leads back to its one job.

A kill is reproduced in-process: a request is held at a chosen point (right after psik
made the directory, or just before the submit), the index is copied as it is at that
moment (what `kill -9` would leave on disk), the first app is stopped, the copy is put
back, and a second app starts on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from conftest import lazy_app
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio

OWNER = "local:psik_api"


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def _wait_final(http: httpx.AsyncClient, jobid: str, timeout: float = 30) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            job: dict[str, Any] = (await http.get(f"/v1/jobs/{jobid}")).json()
            if job["state"] in {"completed", "failed", "canceled"}:
                return job
            await anyio.sleep(0.02)


class Hold:
    """Wraps an async method so that calls stop at its door until released."""

    def __init__(self, fn: Callable[..., Awaitable[Any]], *, after: bool = False) -> None:
        self.fn = fn
        self.after = after  # stop after the real call rather than before it
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.fn(*args, **kwargs) if self.after else None
        self.entered.set()
        await self.release.wait()
        return result if self.after else await self.fn(*args, **kwargs)


def _copy_index(path: Path, dest: Path) -> None:
    """The index as a reader sees it now (committed rows, the WAL included)."""
    src, dst = sqlite3.connect(path), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _put_back(copy: Path, path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    shutil.copyfile(copy, path)
    path.chmod(0o600)  # as the server keeps it (a shared index is refused at start)


@contextlib.asynccontextmanager
async def killed_while(
    settings: Settings, tmp_path: Path, method: str, body: dict[str, Any], key: str, *, after: bool = False
) -> AsyncIterator[Starlette]:
    """Run a server until a keyed request stops at ``backend.<method>``, and leave the
    index as it was then; yields the app (stopped) for inspection."""
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app) as http:
        backend = app.state.context.service.backend
        hold = Hold(getattr(backend, method), after=after)
        setattr(backend, method, hold)
        request = asyncio.ensure_future(http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))
        with anyio.fail_after(20):
            await hold.entered.wait()
        _copy_index(settings.database_path, tmp_path / "at-kill.sqlite")
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await request
    _put_back(tmp_path / "at-kill.sqlite", settings.database_path)
    yield app


def _dirs(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.prefix.iterdir() if p.is_dir())  # not its lock


async def test_a_replay_while_the_first_request_runs_is_told_to_retry(app: Starlette) -> None:
    """Settled only once the whole request has finished: while the submit is still under
    way, a replay is not answered with the half-done job."""
    backend = app.state.context.service.backend
    hold = Hold(backend.submit)
    backend.submit = hold
    body = {"name": "busy", "script": "true"}
    async with _client(app) as http:
        first = asyncio.ensure_future(http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "b1"}))
        with anyio.fail_after(20):
            await hold.entered.wait()
        again = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "b1"})
        assert again.status_code == 409 and again.json()["code"] == "idempotency_in_flight", again.text
        hold.release.set()
        done = await first
        assert done.status_code == 201 and done.json()["state"] != "new"
        replay = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "b1"})
        assert replay.status_code == 201 and replay.json()["jobid"] == done.json()["jobid"]


async def test_a_replay_of_an_abandoned_submit_runs_the_job_once(app: Starlette) -> None:
    """The first request stopped (cancelled) between creating the job and submitting it:
    the client's retry gets that same job, and it runs, once."""
    backend = app.state.context.service.backend
    real = backend.submit
    hold = Hold(real)
    backend.submit = hold
    body = {"name": "abandoned", "script": "echo ran"}
    async with _client(app) as http:
        first = asyncio.ensure_future(http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "a1"}))
        with anyio.fail_after(20):
            await hold.entered.wait()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        backend.submit = real
        replay = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "a1"})
        assert replay.status_code == 201, replay.text
        done = await _wait_final(http, replay.json()["jobid"])
        assert done["state"] == "completed"
        assert [t["state"] for t in done["history"]].count("queued") == 1
        assert len((await http.get("/v1/jobs?name=abandoned")).json()["items"]) == 1


async def test_killed_before_the_submit_the_job_is_submitted_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    body = {"name": "intended", "script": "echo ran"}
    async with killed_while(settings, tmp_path, "submit", body, "k-submit"):
        pass
    (jobid,) = _dirs(settings)
    again = lazy_app(settings)
    async with LifespanManager(again), _client(again) as http:
        # No request needed: the submit the first server promised happens at start-up.
        done = await _wait_final(http, jobid)
        assert done["state"] == "completed" and done["owner"] == OWNER
        replay = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-submit"})
        assert replay.status_code == 201 and replay.json()["jobid"] == jobid
        history = (await http.get(f"/v1/jobs/{jobid}")).json()["history"]
        assert [t["state"] for t in history].count("queued") == 1
    assert _dirs(settings) == [jobid]


async def test_killed_right_after_psik_made_the_directory_the_key_is_free_and_nothing_is_left(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """psik made the directory, the index does not know it yet: no answer was given for
    it, so it goes, and the retry (at once, not minutes later) makes the one job."""
    body = {"name": "orphan", "script": "true", "attributes": {"x": "1"}}
    async with killed_while(settings, tmp_path, "create", body, "k-create", after=True):
        pass
    (orphan,) = _dirs(settings)
    again = lazy_app(settings)
    with caplog.at_level(logging.INFO, logger="psik_api_server"):
        async with LifespanManager(again), _client(again) as http:
            r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-create"})
            assert r.status_code == 201, r.text
            jobid = r.json()["jobid"]
            assert (await _wait_final(http, jobid))["state"] == "completed"
            assert [j["jobid"] for j in (await http.get("/v1/jobs")).json()["items"]] == [jobid]
    assert _dirs(settings) == [jobid] and jobid != orphan
    said = [r.getMessage() for r in caplog.records if orphan in r.getMessage()]
    assert len(said) == 1, said


async def test_a_crash_after_the_submit_leaves_one_job_and_a_settled_key(
    settings: Settings, tmp_path: Path
) -> None:
    body = {"name": "late", "script": "true"}
    async with killed_while(settings, tmp_path, "submit", body, "k-late", after=True):
        pass
    (jobid,) = _dirs(settings)
    again = lazy_app(settings)
    async with LifespanManager(again), _client(again) as http:
        replay = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-late"})
        assert replay.status_code == 201 and replay.json()["jobid"] == jobid
        done = await _wait_final(http, jobid)
        assert [t["state"] for t in done["history"]].count("queued") == 1


async def test_claims_of_a_dead_server_are_released_at_start(settings: Settings) -> None:
    from psik_api_core import JobSpec
    from psik_api_server.jobs.idempotency import body_hash

    body = {"script": "true"}
    first = lazy_app(settings)
    async with LifespanManager(first):
        # A request the first server was handling when it died: claimed, nothing made.
        first.state.context.service.store.claim_key(
            OWNER, "dead", body_hash(JobSpec.model_validate(body), True), time.time()
        )
    again = lazy_app(settings)
    async with LifespanManager(again), _client(again) as http:
        r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "dead"})
        assert r.status_code == 201, r.text


def _half_created(prefix: Path, stamp: str, *, spec: bool) -> Path:
    """What psik's create leaves when it is stopped before writing status.csv."""
    base = prefix / stamp
    (base / "work").mkdir(parents=True)
    (base / "log").mkdir()
    if spec:
        (base / "spec.json").write_text('{"script": "true", "directory": "%s"}' % (base / "work"))
    old = time.time() - 600
    for p in (base / "work", base / "log", base / "spec.json", base):
        if p.exists():
            os.utime(p, (old, old))
    return base


async def test_half_created_directories_are_removed_at_start_with_one_line(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    first = lazy_app(settings)
    async with LifespanManager(first):
        pass
    a = _half_created(settings.prefix, "1700000000.001", spec=True)
    b = _half_created(settings.prefix, "1700000000.002", spec=False)
    with caplog.at_level(logging.INFO, logger="psik_api_server"):
        again = lazy_app(settings)
        async with LifespanManager(again), _client(again) as http:
            assert (await http.get("/v1/jobs")).json()["items"] == []
    assert not a.exists() and not b.exists()
    said = [r for r in caplog.records if a.name in r.getMessage() or b.name in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0].getMessage(), [r.getMessage() for r in said]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="psik_api_server"):
        third = lazy_app(settings)
        async with LifespanManager(third):
            pass
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_directory_with_a_jobs_own_files_is_never_removed(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Only psik's empty skeleton counts as half-created: a directory holding output is
    kept (and said to be unreadable), whatever is missing from it."""
    first = lazy_app(settings)
    async with LifespanManager(first):
        pass
    base = _half_created(settings.prefix, "1700000000.003", spec=True)
    (base / "log" / "stdout.1").write_text("precious\n")
    with caplog.at_level(logging.INFO, logger="psik_api_server"):
        again = lazy_app(settings)
        async with LifespanManager(again):
            pass
    assert (base / "log" / "stdout.1").read_text() == "precious\n"
    said = [r.getMessage() for r in caplog.records if base.name in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said


async def test_purge_of_a_job_whose_state_cannot_be_read_is_refused(app: Starlette) -> None:
    async with _client(app) as http:
        jobid = (await http.post("/v1/jobs", json={"script": "true"})).json()["jobid"]
        await _wait_final(http, jobid)
        base: Path = app.state.context.service.backend.path(jobid)
        (base / "status.csv").unlink()
        r = await http.delete(f"/v1/jobs/{jobid}?purge=true")
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        assert base.is_dir() and (base / "spec.json").is_file()


def _corrupt_pages(path: Path) -> None:
    """Overwrite everything after the header page: SQLite calls the file malformed."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))


@pytest.mark.parametrize("damage", ["not-sqlite", "malformed"])
async def test_a_corrupt_index_is_moved_aside_and_rebuilt_from_the_job_directories(
    settings: Settings, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = lazy_app(settings)
    async with LifespanManager(first), _client(first) as http:
        ids = [
            (await http.post("/v1/jobs/new", json={"name": f"j{i}", "script": "true"})).json()["jobid"]
            for i in range(40)
        ]
    index = settings.database_path
    if damage == "not-sqlite":
        index.write_bytes(b"this is not an index\n" * 100)
    else:
        _corrupt_pages(index)
    with caplog.at_level(logging.INFO, logger="psik_api_server"):
        again = lazy_app(settings)
        async with LifespanManager(again), _client(again) as http:
            listed = [j["jobid"] for j in (await http.get("/v1/jobs?limit=100")).json()["items"]]
            assert sorted(listed) == sorted(ids)
    aside = [p.name for p in index.parent.iterdir() if p.name.startswith("index.sqlite.corrupt-")]
    assert len(aside) == 1, aside
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert aside[0] in warned[0] and "owner" in warned[0] and "Idempotency-Key" in warned[0]
    assert OWNER in warned[0] and "\n" not in warned[0]


async def test_an_index_path_that_cannot_be_made_still_stops_start_up(
    settings: Settings, tmp_path: Path
) -> None:
    from psik_api_server.errors import StartupError

    (tmp_path / "file").write_text("")
    settings.database = tmp_path / "file" / "index.sqlite"
    app = lazy_app(settings)
    with pytest.raises(StartupError, match="cannot open the job index"):
        async with LifespanManager(app):
            pass
    assert not list(tmp_path.glob("**/*.corrupt-*"))


async def test_upload_leftovers_of_a_killed_server_are_removed_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    """kill -9 during an upload leaves its `.psik-upload-*` temporary file, which no route
    can name: the next start removes those (regular files, from before it started), and
    nothing else: not a link of that name, not through a link, not a directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".psik-upload-0123").write_text("not the job's")
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app) as http:
        jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    work = settings.prefix / jobid / "work"
    (work / "sub").mkdir()
    left = [work / ".psik-upload-aa", work / "sub" / ".psik-upload-bb"]
    for path in left:
        path.write_text("half an upload")
    (work / ".psik-upload-dir").mkdir()
    (work / "out").symlink_to(outside)
    (work / ".psik-upload-cc").symlink_to(outside / ".psik-upload-0123")
    (work / "data.txt").write_text("kept")
    later = work / ".psik-upload-dd"  # an upload under way (a later mtime): not stale
    later.write_text("in progress")
    os.utime(later, (time.time() + 3600, time.time() + 3600))
    app = lazy_app(settings)
    async with LifespanManager(app), _client(app):
        with anyio.fail_after(10):
            while any(path.exists() for path in left):
                await anyio.sleep(0.02)
    assert (outside / ".psik-upload-0123").read_text() == "not the job's"
    assert (work / ".psik-upload-cc").is_symlink() and (work / ".psik-upload-dir").is_dir()
    assert (work / "data.txt").read_text() == "kept" and later.is_file()
