"""Disk full (ENOSPC, SQLITE_FULL), on a real small tmpfs holding the prefix and the index.

While it is full: a submit is 507 ``insufficient_storage`` (and the client raises
``InsufficientStorageError``), nothing half-made is left (no job directory without its
index row, the Idempotency-Key free again), every GET still answers 200, and the
condition is logged once, not per request. Once space is back, the state of a job that
ended meanwhile catches up by itself (the watcher retries what it could not store), and
a retried submit works, with no duplicate.

Mounting needs root: the test is skipped otherwise, but never under ``CI=true``.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

import psik_api_client as pac
from conftest import lazy_app
from psik_api_client import AsyncClient
from psik_api_server.settings import BackendSettings, Settings

pytestmark = pytest.mark.anyio

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        why = "mounting a small tmpfs to fill up needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true: this test must run there")
        pytest.skip(why)
    mnt = tmp_path / "small"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a job still holds it


@pytest.fixture
def settings(small_fs: Path) -> Settings:
    return Settings(
        prefix=small_fs / "jobs",
        database=small_fs / "index.sqlite",
        backends={"default": BackendSettings(type="local")},
        watch_interval=0.02,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    application = lazy_app(settings)
    async with LifespanManager(application):
        yield application


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last page with one file; returns it."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"x" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


def job_dirs(settings: Settings) -> set[str]:
    return {p.name for p in settings.prefix.iterdir() if p.is_dir()}


async def poll(what: str, check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert callable(check)
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


async def test_disk_full_submit_is_507_reads_work_and_state_catches_up(
    app: Starlette,
    http: httpx.AsyncClient,
    settings: Settings,
    small_fs: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    go = tmp_path / "go"  # outside the tmpfs: the job ends when it appears
    script = f"#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 0.02; done\n"
    client = AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app), max_retries=0)

    try:
        await _scenario(app, http, client, settings, small_fs, go, script, caplog)
    finally:
        go.touch()  # the job must not outlive the test (it holds the tmpfs)
        await client.aclose()


async def _scenario(
    app: Starlette,
    http: httpx.AsyncClient,
    client: AsyncClient,
    settings: Settings,
    small_fs: Path,
    go: Path,
    script: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = app.state.context.service
    r = await http.post("/v1/jobs", json={"name": "before", "script": script})
    assert r.status_code == 201, r.text
    first = r.json()["jobid"]

    async def first_active() -> bool:
        return (await http.get(f"/v1/jobs/{first}/state")).json()["state"] == "active"

    await poll("the first job to run", first_active)

    filler = fill(small_fs)
    caplog.clear()
    caplog.set_level(logging.INFO)
    try:
        # ---- submits are 507, leaving nothing behind ----
        body = {"name": "during", "script": "#!/bin/sh\ntrue\n"}
        for _ in range(3):
            r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-during"})
            assert r.status_code == 507, r.text
            assert r.headers["content-type"] == PROBLEM_JSON
            problem = r.json()
            assert problem["code"] == "insufficient_storage"
            assert problem["status"] == 507
            assert "full" in problem["detail"]
            assert str(settings.prefix) in problem["detail"] or str(settings.database) in problem["detail"]
        r = await http.post("/v1/jobs/new", json=body)
        assert r.status_code == 507, r.text
        assert r.json()["code"] == "insufficient_storage"
        with pytest.raises(pac.InsufficientStorageError) as info:
            await client.submit(body)
        assert info.value.status_code == 507
        assert info.value.code == "insufficient_storage"
        assert job_dirs(settings) == {first}, "a job directory was left without its index row"
        assert service.store.jobids() == {first}

        # ---- reads keep working ----
        for path in ("/healthz", "/v1/jobs", f"/v1/jobs/{first}", f"/v1/jobs/{first}/state"):
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text)

        # ---- a job that ends while the disk is full ----
        go.touch()

        async def first_ended_on_disk() -> bool:
            r = await http.get(f"/v1/jobs/{first}")  # reads the job directory
            assert r.status_code == 200, r.text
            return bool(r.json()["state"] == "completed")

        await poll("the first job to end", first_ended_on_disk)
        for path in ("/v1/jobs", f"/v1/jobs/{first}", f"/v1/jobs/{first}/state", "/healthz"):
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text)
        await anyio.sleep(0.3)  # several watcher looks, while the index cannot take the change
        # The index could not take it (the disk is really full for SQLite's WAL too): the
        # watcher holds the change for later.
        assert (await http.get(f"/v1/jobs/{first}/state")).json()["state"] == "active"
        assert service.watcher.unrecorded == 1

        # ---- starting it again is 507 too, and changes nothing ----
        r = await http.post(f"/v1/jobs/{first}/start", json={})
        assert r.status_code == 507, r.text
        assert r.json()["code"] == "insufficient_storage"
        r = await http.get(f"/v1/jobs/{first}")
        assert (r.json()["state"], r.json()["jobndx"]) == ("completed", 1)

        # ---- no traceback spam: one line for the episode (prefix and index share the fs) ----
        assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
        said = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len([m for m in said if "no space left" in m]) == 1, said
    finally:
        filler.unlink()

    # ---- space is back: the state catches up by itself ----
    done = await client.wait(first, timeout=15)
    assert done.state == "completed"
    r = await http.get(f"/v1/jobs/{first}/state")
    assert r.json()["state"] == "completed"
    listed = (await http.get("/v1/jobs", params={"id": first})).json()["items"]
    assert [j["state"] for j in listed] == ["completed"]

    # ---- a retried submit works, once ----
    r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-during"})
    assert r.status_code == 201, r.text
    second = r.json()["jobid"]
    again = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-during"})
    assert again.status_code == 201, again.text
    assert again.json()["jobid"] == second
    assert (await client.wait(second, timeout=15)).state == "completed"
    assert job_dirs(settings) == {first, second}
    assert service.store.jobids() == {first, second}

    # wait() may have its answer from the job directory (a GET re-reads it) while the
    # watcher's own write of that change is still in flight: give it that moment.
    async def all_recorded() -> bool:
        return service.watcher.unrecorded == 0

    await poll("the watcher to record every change", all_recorded, timeout=5)
    said = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len([m for m in said if "no space left" in m]) == 1, said  # the same one: not said again
    assert len([m for m in said if "can be written again" in m]) == 1, said
