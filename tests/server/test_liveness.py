"""A local job whose process vanishes (SIGKILL, reboot) ends `failed`, with the reason,
instead of staying `active` forever; a live one is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from psik_api_server.app import create_app
from psik_api_server.backends.local.liveness import has_proc, process_running, vanished_jobs
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


def test_process_running() -> None:
    assert process_running(os.getpid(), time.time())
    # This process started long before "since": a PID reused by someone else.
    assert not process_running(os.getpid(), time.time() - 10_000 - time.monotonic())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while not Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
        time.sleep(0.01)  # exited, not reaped: a zombie is not running
    assert not process_running(child.pid, time.time())
    child.wait()
    assert not process_running(child.pid, time.time())
    assert not process_running(0, time.time())


def test_without_proc_a_live_pid_is_never_called_dead(tmp_path: Path) -> None:
    """macOS and the BSDs have no /proc: kill(pid, 0) is all there is to ask."""
    assert has_proc() and not has_proc(tmp_path)
    assert process_running(os.getpid(), time.time(), proc=tmp_path)
    # A PID reuse cannot be told there: a live process gets the benefit of the doubt.
    assert process_running(os.getpid(), time.time() - 10_000 - time.monotonic(), proc=tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the PID names no process now
    assert not process_running(child.pid, time.time(), proc=tmp_path)


async def test_a_killed_local_job_ends_failed_with_the_reason(settings: Settings, tmp_path: Path) -> None:
    settings.liveness_interval = 0.05
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        job = (await http.post("/v1/jobs", json={"script": "echo $$ > script.pid; exec sleep 60"})).json()
        jobid = job["jobid"]
        workdir = settings.prefix / jobid / "work"
        with anyio.fail_after(20):
            while not (workdir / "script.pid").is_file() or not (workdir / "script.pid").read_text().strip():
                await anyio.sleep(0.02)
        history = (await http.get(f"/v1/jobs/{jobid}")).json()["history"]
        pid = int(next(t["info"] for t in history if t["state"] == "queued"))
        assert await app.state.context.service.check_liveness() == []  # alive: untouched
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "active"
        # Without /proc (macOS), only kill(pid, 0) is asked: the live job is still alive.
        service = app.state.context.service
        no_proc = tmp_path / "no-proc"
        no_proc.mkdir()
        assert vanished_jobs(service.store.live(), service.backend.prefix, proc=no_proc) == []
        os.kill(pid, signal.SIGKILL)  # psik's job process dies without writing a row
        os.kill(int((workdir / "script.pid").read_text()), signal.SIGKILL)
        with anyio.fail_after(20):
            while (state := (await http.get(f"/v1/jobs/{jobid}/state")).json())["state"] != "failed":
                await anyio.sleep(0.05)
        assert state["jobndx"] == 1
        last = (await http.get(f"/v1/jobs/{jobid}")).json()["history"][-1]
        assert last["state"] == "failed" and f"process {pid} ended" in last["info"]


async def test_an_end_the_index_missed_is_recorded_by_the_liveness_loop(settings: Settings) -> None:
    """A job that ended while the index still shows it running (a lost watcher change,
    or a stale write): the liveness loop's next round re-reads it and records the end,
    not a failure; before, the job stayed 'active' in the index for good, since the
    loop asked only about jobs whose directory said they still ran."""
    settings.liveness_interval = 3600  # its rounds are the test's own (check_liveness)
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        jobid = (await http.post("/v1/jobs", json={"script": "true"})).json()["jobid"]
        with anyio.fail_after(20):
            while (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] != "completed":
                await anyio.sleep(0.02)
        # The loop's own first round (run at start-up, whatever the interval) must be
        # over: one that read the job while it ran would record its end again, after
        # the write below (seen in CI, under load).
        with anyio.fail_after(20):
            while app.state.context.service.liveness.rounds < 1:
                await anyio.sleep(0.02)
        store = app.state.context.service.store
        with store.transaction():  # the index falls behind, as the lost write left it
            store._db.execute("UPDATE jobs SET state = 'active' WHERE jobid = ?", (jobid,))
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "active"
        assert await app.state.context.service.check_liveness() == []  # no failure recorded
        state = (await http.get(f"/v1/jobs/{jobid}/state")).json()
        assert (state["state"], state["jobndx"]) == ("completed", 1)
        assert (await http.get(f"/v1/jobs/{jobid}")).json()["history"][-1]["state"] == "completed"
