"""The index keeps each job's exit code, so lists carry it; an index made before it did
(no ``exit_code`` column) is upgraded in place at start and keeps working: a completed
job's code is 0 at once, a failed job's is read once from its history."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import JobState
from psik_api_server.jobs.store import JobRow, JobStore
from psik_api_server.settings import Settings

#: The index as the release before exit codes made it (``PRAGMA user_version`` 0).
BEFORE_EXIT_CODES = """
CREATE TABLE jobs (
    jobid   TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    owner   TEXT NOT NULL,
    name    TEXT,
    state   TEXT NOT NULL,
    jobndx  INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    claim   TEXT
);
CREATE INDEX jobs_by_owner ON jobs (owner, created DESC, jobid DESC);
CREATE INDEX jobs_by_state ON jobs (owner, state, created DESC, jobid DESC);
CREATE INDEX jobs_by_backend ON jobs (owner, backend, created DESC, jobid DESC);
CREATE INDEX jobs_by_name ON jobs (owner, name, created DESC, jobid DESC);
CREATE INDEX jobs_live ON jobs (state) WHERE state IN ('new', 'queued', 'active');
CREATE TABLE idempotency (
    owner       TEXT NOT NULL,
    key         TEXT NOT NULL,
    body_hash   TEXT NOT NULL,
    jobid       TEXT,
    created     REAL NOT NULL,
    settled     INTEGER NOT NULL DEFAULT 1,
    submit      INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT,
    PRIMARY KEY (owner, key)
);
"""


def _old_index(path: Path, states: dict[str, str]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(BEFORE_EXIT_CODES)
        for n, (jobid, state) in enumerate(states.items()):
            db.execute(
                "INSERT INTO jobs VALUES (?, 'default', 'u', NULL, ?, ?, ?, ?, NULL)",
                (jobid, state, 0 if state == "new" else 1, 1.0 + n, 2.0 + n),
            )
        db.commit()


def test_an_index_before_exit_codes_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    states = {"1.1": "completed", "1.2": "failed", "1.3": "canceled", "1.4": "new", "1.5": "active"}
    _old_index(path, states)
    store = JobStore(path).open()
    rows, _ = store.list("u")
    assert {r.jobid: (r.state.value, r.exit_code) for r in rows} == {
        "1.1": ("completed", 0),  # known without reading the job
        "1.2": ("failed", None),  # in its history: read once by reconcile
        "1.3": ("canceled", None),
        "1.4": ("new", None),
        "1.5": ("active", None),
    }
    assert [r.jobid for r in store.missing_exit_codes()] == ["1.2"]
    assert store.set_state("1.2", JobState.failed, 1, 3.0, exit_code=3)
    store.exit_codes_filled()
    assert store.missing_exit_codes() == []
    store.close()
    store = JobStore(path).open()  # the next start reads nothing again
    assert store.missing_exit_codes() == []
    assert store.get("1.2") == JobRow("1.2", "default", "u", None, JobState.failed, 1, 2.0, 3.0, 3)
    assert store.lookup("1.1")[1].exit_code == 0
    assert store.claim_start("1.2", 1)  # the rest works as before


def test_a_new_index_has_no_exit_code_to_fill(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "new.sqlite").open()
    store.put(JobRow("1.1", "default", "u", None, JobState.failed, 1, 1.0, 2.0))  # refused: no code
    assert store.missing_exit_codes() == []


def test_a_state_and_its_exit_code_change_together(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "i.sqlite").open()
    store.put(JobRow("1.1", "default", "u", None, JobState.queued, 1, 1.0, 1.0))
    assert store.set_state("1.1", JobState.failed, 1, 2.0, exit_code=3)
    assert not store.set_state("1.1", JobState.failed, 1, 2.0, exit_code=3)
    assert store.set_state("1.1", JobState.queued, 2, 3.0, exit_code=None)  # a re-run clears it
    assert store.get("1.1") == JobRow("1.1", "default", "u", None, JobState.queued, 2, 1.0, 3.0, None)
    assert not store.set_state("1.1", JobState.failed, 1, 2.5, exit_code=3)  # an older read
    assert store.set_states([("1.1", JobState.completed, 2, 4.0, 0, None)]) == 1
    (row,), _ = store.list("u")
    assert (row.state, row.jobndx, row.exit_code) == (JobState.completed, 2, 0)
    assert row.summary().exit_code == 0


def _as_before_exit_codes(path: Path) -> None:
    """Rewrite the (closed) index at ``path`` as the release before exit codes had it:
    the same rows, no ``exit_code`` column, ``user_version`` 0."""
    old = path.with_name("before.sqlite")
    old.touch(mode=0o600)  # as the server keeps it
    with contextlib.closing(sqlite3.connect(old)) as db:
        db.executescript(BEFORE_EXIT_CODES)
        db.execute("ATTACH ? AS now", (str(path),))
        db.execute(
            "INSERT INTO jobs SELECT jobid, backend, owner, name, state, jobndx, created, updated, claim "
            "FROM now.jobs"
        )
        db.execute("INSERT INTO idempotency SELECT * FROM now.idempotency")
        db.commit()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(old, path)


async def _final(http: httpx.AsyncClient, jobid: str) -> None:
    with anyio.fail_after(60):
        while not JobState((await http.get(f"/v1/jobs/{jobid}/state")).json()["state"]).is_final:
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_a_server_on_an_index_before_exit_codes_lists_them(settings: Settings) -> None:
    async def jobs(app: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            if not made:
                for script in ("exit 3", "true", "sleep 60"):
                    made.append((await http.post("/v1/jobs", json={"script": script})).json()["jobid"])
                made.append((await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"])
                await _final(http, made[0])
                await _final(http, made[1])
                assert (await http.delete(f"/v1/jobs/{made[2]}")).json()["state"] == "canceled"
            page = (await http.get("/v1/jobs")).json()
            got = {j: (await http.get(f"/v1/jobs/{j}")).json()["exit_code"] for j in made}
        listed = {i["jobid"]: i["exit_code"] for i in page["items"]}
        assert listed == got
        return listed

    made: list[str] = []
    first = lazy_app(settings)
    async with LifespanManager(first):
        before = await jobs(first)
    assert before == {made[0]: 3, made[1]: 0, made[2]: None, made[3]: None}
    _as_before_exit_codes(settings.database)
    second = lazy_app(settings)
    async with LifespanManager(second):
        with contextlib.closing(sqlite3.connect(settings.database)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # filled: not read again
        assert await jobs(second) == before
