"""A submit a full disk stops after the job was made (psik could not record its launch):
507, and the job is gone again (directory, index row, key), so a retry makes it once.
No root needed: the backend's submit is made to fail as psik fails on a full disk
(``test_disk_full`` fills a real filesystem)."""

from __future__ import annotations

import errno
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


def job_dirs(settings: Settings) -> set[str]:
    return {p.name for p in settings.prefix.iterdir() if p.is_dir()} if settings.prefix.exists() else set()


async def no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_submit_stopped_by_a_full_disk_leaves_nothing_and_a_retry_works(
    app: Starlette, http: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = app.state.context.service
    body = {"name": "full", "script": "#!/bin/sh\ntrue\n"}
    with monkeypatch.context() as m:
        m.setattr(service.backend, "submit", no_space)
        for _ in range(2):
            r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
            assert r.status_code == 507, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "insufficient_storage"
            assert str(settings.prefix) in r.json()["detail"]
            assert job_dirs(settings) == set()
            assert service.store.count() == 0
        # Starting a job that exists: 507, and the job stays as it was, startable.
        made = await http.post("/v1/jobs/new", json=body)
        assert made.status_code == 201, made.text
        jobid = made.json()["jobid"]
        r = await http.post(f"/v1/jobs/{jobid}/start", json={})
        assert r.status_code == 507, r.text
        assert r.json()["code"] == "insufficient_storage"
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "new"
        assert not service.store.claimed(jobid)

    r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 201, r.text
    again = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.json()["jobid"] == r.json()["jobid"]
    started = await http.post(f"/v1/jobs/{jobid}/start", json={})
    assert started.status_code == 200, started.text
    assert job_dirs(settings) == {jobid, r.json()["jobid"]}
    assert service.store.count() == 2


def test_what_counts_as_a_full_disk_and_where() -> None:
    from psik_api_server.jobs.diskfull import INDEX, PREFIX, full_place

    assert full_place(OSError(errno.ENOSPC, "x")) == PREFIX
    assert full_place(OSError(errno.EDQUOT, "x")) == PREFIX
    import sqlite3

    assert full_place(sqlite3.OperationalError("database or disk is full")) == INDEX
    assert full_place(sqlite3.OperationalError("database is locked")) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError:
            raise RuntimeError("cleanup failed") from None
    except RuntimeError as e:
        assert full_place(e) is None  # `from None`: the cause is hidden on purpose
