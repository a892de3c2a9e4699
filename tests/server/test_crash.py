"""kill -9 under load: 8 clients submit with fixed Idempotency-Keys (retrying through
connection errors) while the server is killed with SIGKILL and restarted, 3 times. Then
every key is replayed, and the client results, the job directories and the index must
agree: every acknowledged job final, one job per key, nothing left new or queued.

The server is a real ``python -m psik_api_server serve`` process on its embedded default
(a temporary XDG_DATA_HOME), so a kill stops it wherever it was: inside psik's create,
between the index and a submit, with an answer half-sent."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from psik_api_client import AsyncClient
from psik_api_client._exceptions import (
    APIConnectionError,
    IdempotencyInFlightError,
    InternalServerError,
    ServiceUnavailableError,
)
from psik_api_core import is_slot_wait
from psik_api_server.jobs import directory as jobdir
from psik_api_server.settings import default_state_dir
from support import ServerProcess

pytestmark = pytest.mark.anyio

WORKERS = 8
ROUNDS = 3
#: Acknowledged submits between two kills: enough that every kill lands mid-burst.
PER_ROUND = 16
#: Kinds of failure a client sees while the server is dead or coming back: retried.
TRANSIENT = (APIConnectionError, IdempotencyInFlightError, InternalServerError, ServiceUnavailableError)


def _spec(key: str) -> dict[str, Any]:
    return {"name": key, "script": "true"}


async def _submit(api: AsyncClient, key: str, deadline: float) -> str:
    """Submit until the server acknowledges; the jobid it gives."""
    while True:
        try:
            job = await api.submit(_spec(key), idempotency_key=key)
            return job.jobid
        except TRANSIENT:
            assert time.monotonic() < deadline, f"{key} never acknowledged"
            await asyncio.sleep(0.05)


async def test_kill_9_under_idempotent_submitters_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path,
) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    prefix = tmp_path / "data" / "psik_api" / "jobs"
    index = default_state_dir(prefix) / "index.sqlite"
    acked: dict[str, str] = {}
    stop = asyncio.Event()
    deadline = time.monotonic() + 60

    async def submitter(w: int) -> None:
        async with AsyncClient(server.url, max_retries=0, timeout=10) as api:
            for n in range(10_000):
                if stop.is_set():
                    return
                key = f"w{w}-{n}"
                acked[key] = await _submit(api, key, deadline)

    async def acks_reach(n: int) -> None:
        while len(acked) < n:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    started = time.monotonic()
    await server.start()
    try:
        workers = [asyncio.ensure_future(submitter(w)) for w in range(WORKERS)]
        for r in range(ROUNDS):
            await acks_reach((r + 1) * PER_ROUND)
            server.kill9()  # mid-burst: every submitter has a request in flight
            await server.start()
        await acks_reach((ROUNDS + 1) * PER_ROUND)
        stop.set()
        await asyncio.gather(*workers)

        # Every key replayed: the same job, not a new one.
        async with AsyncClient(server.url, max_retries=0, timeout=10) as api:
            for key, jobid in sorted(acked.items()):
                assert await _submit(api, key, deadline) == jobid, key
            # Every acknowledged job ends, with nobody asking anything more of it.
            while True:
                jobs = {j.jobid: j for j in await _all(api)}
                if all(j.state.is_final for j in jobs.values()):
                    break
                assert time.monotonic() < deadline, [j for j in jobs.values() if not j.state.is_final]
                await asyncio.sleep(0.1)
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    on_disk = {p.name: jobdir.read_job(p) for p in prefix.iterdir() if p.is_dir()}
    names = collections.Counter(f.spec.name for f in on_disk.values())
    duplicates = {k: n for k, n in names.items() if n > 1}
    stuck = sorted(j for j, f in on_disk.items() if not f.state[0].is_final)
    unacknowledged = sorted(j for j, f in on_disk.items() if f.spec.name not in acked)
    runs = collections.Counter(
        # A run is a `queued` row of the backend's; a job slot's wait row runs nothing.
        sum(1 for r in f.history if r.state.value == "queued" and not is_slot_wait(r.info))
        for f in on_disk.values()
    )
    db = sqlite3.connect(index)
    try:
        indexed = dict(db.execute("SELECT jobid, state FROM jobs").fetchall())
        keys = {k: (j, s) for k, j, s in db.execute("SELECT key, jobid, settled FROM idempotency")}
    finally:
        db.close()
    # What the restarts found to finish (each says it in one line).
    said = server.log.read_text(errors="replace").splitlines()
    recovered = {
        what: sum(int(line.split(what)[1].split()[0]) for line in said if what in line)
        for what in ("removed ", "submitted ")
    }
    print(
        f"\ncrash test: {ROUNDS} kills, {server.starts} starts, {len(acked)} acknowledged jobs, "
        f"{len(on_disk)} jobs on disk, {len(duplicates)} duplicates, {len(stuck)} stuck, "
        f"{len(unacknowledged)} unacknowledged directories, runs per job {dict(runs)}, "
        f"{len(indexed)} indexed; at restart: {recovered['removed ']} directories of unanswered "
        f"requests removed, {recovered['submitted ']} jobs submitted; {elapsed:.1f} s"
    )
    assert duplicates == {} and stuck == [] and unacknowledged == []
    assert set(on_disk) == set(acked.values())  # each key's one job, and nothing else
    assert runs == {1: len(on_disk)}  # each ran exactly once
    assert all(f.state[0].value == "completed" for f in on_disk.values())
    assert indexed == {j: "completed" for j in on_disk}
    assert keys == {k: (j, 1) for k, j in acked.items()}  # one job per key, every key settled


async def _all(api: AsyncClient) -> list[Any]:
    return [j async for j in api.list()]
