"""One server per prefix, and one start per run: a second server on a prefix stops at
start-up naming the first one's pid, and two starts of one job (even from two processes
sharing the index) never both submit it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_core import LOCAL_USER, OwnerPolicy, Principal
from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.backends.psik_backend import PsikBackend
from psik_api_server.errors import ApiError, StartupError
from psik_api_server.jobs.build import build_job_service
from psik_api_server.jobs.service import JobService
from psik_api_server.jobs.store import JobStore
from psik_api_server.settings import Settings
from support import free_port

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent


async def test_a_second_server_on_the_prefix_stops_naming_the_first(settings: Settings) -> None:
    first = lazy_app(settings)
    async with LifespanManager(first):
        second = lazy_app(settings)
        with pytest.raises(StartupError, match=rf"\bpid {os.getpid()}\b") as e:
            async with LifespanManager(second):
                pass
        assert str(settings.prefix) in str(e.value)
        assert second.state.context.startup_error is e.value
    # The lock goes with the server: the next one starts.
    third = lazy_app(settings)
    async with LifespanManager(third):
        pass


async def test_a_second_server_on_another_prefix_but_the_same_index_stops(settings: Settings) -> None:
    """Reconciling one index with two prefixes would drop each server's jobs from it."""
    first = lazy_app(settings)
    async with LifespanManager(first):
        other = settings.model_copy(update={"prefix": settings.prefix.parent / "other-jobs"})
        second = lazy_app(other)
        with pytest.raises(StartupError, match=rf"\bpid {os.getpid()}\b") as e:
            async with LifespanManager(second):
                pass
        assert "job index" in str(e.value) and str(settings.database_path) in str(e.value)
        # The refused server let go of the prefix lock it had taken: its prefix is free.
        third = lazy_app(
            other.model_copy(update={"database": settings.database_path.parent / "other.sqlite"})
        )
        async with LifespanManager(third):
            pass


def test_a_second_serve_exits_3_with_one_line_naming_the_first(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV", "PSIK_CONFIG"}}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    port = free_port()
    serve = [str(BIN / "psik-api-server"), "serve", "--log-level", "warning"]
    first = subprocess.Popen([*serve, "--port", str(port)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            assert first.poll() is None and time.monotonic() < deadline, "first server did not start"
            time.sleep(0.05)
        second = subprocess.run(
            [*serve, "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 3, second.stderr
        lines = [line for line in second.stderr.splitlines() if "cannot start" in line]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200  # untouched
    finally:
        first.terminate()
        first.wait(timeout=20)


def _service(settings: Settings) -> JobService:
    """A service of its own (its own index connection, psik and launcher), as a second
    process sharing the prefix and the index would have."""
    backend = PsikBackend(
        settings.prefix, settings.backends, LocalLauncher(settings.prefix.parent / "l.log", eager=False)
    )
    return build_job_service(
        JobStore(settings.database_path), backend, OwnerPolicy(), import_owner=LOCAL_USER, watch_interval=0.02
    )


@contextlib.asynccontextmanager
async def _opened(service: JobService) -> Any:
    await service.open()
    try:
        yield service
    finally:
        await service.aclose()


async def test_two_starts_from_two_processes_never_both_submit(settings: Settings) -> None:
    me = Principal(user=LOCAL_USER)
    async with _opened(_service(settings)) as one, _opened(_service(settings)) as two:
        from psik_api_core import JobSpec

        job, _ = await one.create(me, JobSpec(script="sleep 30"), submit=False, idempotency_key=None)
        # Each side's submit waits a moment for the other, so that without an atomic
        # claim both would get this far.
        arrived = {"n": 0}
        both = asyncio.Event()
        for side in (one, two):
            real = side.backend.submit

            async def submit(jobid: str, *, waited: int | None = None, real: Any = real) -> Any:
                arrived["n"] += 1
                if arrived["n"] == 2:
                    both.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(both.wait(), 1.0)
                return await real(jobid, waited=waited)

            side.backend.submit = submit  # type: ignore[method-assign]
        results = await asyncio.gather(
            one.start(me, job.jobid), two.start(me, job.jobid), return_exceptions=True
        )
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ApiError)]
        assert len(started) == 1 and len(refused) == 1, results
        assert refused[0].code.value == "conflict"
        got = await one.cancel(me, job.jobid)
        assert [t.state.value for t in got.history].count("queued") == 1


async def test_concurrent_starts_of_one_job_run_it_once(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        # Long enough that no start comes after the run ended (that would be a re-run).
        jobid = (await http.post("/v1/jobs/new", json={"script": "sleep 30"})).json()["jobid"]
        codes = await asyncio.gather(*(http.post(f"/v1/jobs/{jobid}/start") for _ in range(8)))
        assert sorted(r.status_code for r in codes) == [200] + [409] * 7, [r.text for r in codes]
        job = (await http.delete(f"/v1/jobs/{jobid}")).json()
        assert job["state"] == "canceled"
        assert [t["state"] for t in job["history"]].count("queued") == 1


def test_the_start_claim_is_taken_once_per_run(tmp_path: Path) -> None:
    from psik_api_core import JobState
    from psik_api_server.jobs.store import JobRow

    store = JobStore(tmp_path / "i.sqlite").open()
    other = JobStore(tmp_path / "i.sqlite").open()  # another process on the same index
    store.put(JobRow("1.1", "default", "u", None, JobState.new, 0, 1.0, 1.0))
    assert store.claim_start("1.1", 0)
    assert not other.claim_start("1.1", 0)  # held
    store.release_start("1.1", JobState.queued, 1, 2.0)
    assert not other.claim_start("1.1", 0)  # that run was started already
    assert not other.claim_start("1.1", 1)  # and is not final
    store.set_state("1.1", JobState.completed, 1, 3.0, exit_code=0)
    assert other.claim_start("1.1", 1)  # a re-run of the final job
