"""Jobs are contained, as Slurm does: cancel ends the job's whole process tree (TERM, a
grace period, KILL), processes a finished job left behind are ended, and a runner psik
left hanging is ended too. Every process a test starts is gone when it ends."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from psik_api_server.backends.local.containment import GRACE, SWEEP_INTERVAL

pytestmark = pytest.mark.anyio

#: Time allowed on top of the grace period (a loaded test machine).
MARGIN = 5.0


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of ``pid``, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _running(pid: int, start: int) -> bool:
    """True while the process ``pid`` started at ``start`` runs (a zombie does not)."""
    seen = _stat(pid)
    return seen is not None and seen[1] == start and seen[0] not in {"Z", "X"}


@contextlib.contextmanager
def _no_strays() -> Iterator[dict[int, int]]:
    """Collects ``{pid: start}`` of the processes a test starts; KILLs any still running at
    the end, so a failing test leaves nothing behind."""
    seen: dict[int, int] = {}
    try:
        yield seen
    finally:
        for pid, start in seen.items():
            if _running(pid, start):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


async def _pids(path: Path, count: int, into: dict[int, int]) -> list[int]:
    """Wait until ``path`` names ``count`` processes (one PID a line); remember them."""
    with anyio.fail_after(20):
        while True:
            lines = path.read_text().split() if path.exists() else []
            if len(lines) >= count:
                break
            await anyio.sleep(0.02)
    pids = [int(p) for p in lines]
    for pid in pids:
        if (seen := _stat(pid)) is not None:
            into[pid] = seen[1]
    return pids


async def _gone_within(seconds: float, procs: dict[int, int]) -> float:
    """Wait until none of ``procs`` runs; returns how long that took (fails after ``seconds``)."""
    t0 = time.monotonic()
    with anyio.fail_after(seconds):
        while alive := [pid for pid, start in procs.items() if _running(pid, start)]:
            del alive
            await anyio.sleep(0.05)
    return time.monotonic() - t0


async def _state(http: httpx.AsyncClient, jobid: str) -> str:
    state: str = (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"]
    return state


async def _wait_state(http: httpx.AsyncClient, jobid: str, wanted: set[str], timeout: float = 30) -> str:
    with anyio.fail_after(timeout):
        while (state := await _state(http, jobid)) not in wanted:
            await anyio.sleep(0.02)
    return state


#: A job that spreads out: a background child that ignores TERM (and its own child, which
#: inherits that), a child that setsid()s away, one that setsid()s and ignores TERM, and
#: one that double-forks away before the cancel (its parent is gone: only the job's
#: environment says whose it is). Each writes its PID to `pids` (in the job's work/).
SPREADING = """\
echo $$ >> pids
sh -c 'trap "" TERM; echo $$ >> pids; sleep 300 & echo $! >> pids; wait' &
setsid sh -c 'echo $$ >> pids; exec sleep 300' &
setsid sh -c 'trap "" TERM; echo $$ >> pids; exec sleep 300' &
( setsid sh -c 'echo $$ >> pids; exec sleep 300' & )
wait
"""
SPREADING_COUNT = 6


async def test_cancel_ends_the_whole_process_tree_term_then_kill(
    app: Starlette, http: httpx.AsyncClient
) -> None:
    with _no_strays() as procs:
        job = (await http.post("/v1/jobs", json={"script": SPREADING})).json()
        jobid = job["jobid"]
        workdir: Path = app.state.context.settings.prefix / jobid / "work"
        await _pids(workdir / "pids", SPREADING_COUNT, procs)
        runner = int((await http.get(f"/v1/jobs/{jobid}")).json()["native_id"])
        if (seen := _stat(runner)) is not None:
            procs[runner] = seen[1]
        assert len(procs) == SPREADING_COUNT + 1, procs
        assert await _state(http, jobid) == "active"

        canceled = await http.delete(f"/v1/jobs/{jobid}")
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["state"] == "canceled"
        # The TERM-ignoring processes get the grace period (TERM first, not KILL) ...
        stubborn = [pid for pid in procs if _running(pid, procs[pid])]
        assert stubborn, "nothing left right after TERM: was it KILLed at once?"
        # ... and then everything is gone: setsid()ed, TERM-ignoring and double-forked.
        await _gone_within(GRACE + MARGIN, procs)
        assert await _wait_state(http, jobid, {"canceled", "completed", "failed"}) == "canceled"


async def test_a_finished_jobs_leftovers_are_ended(app: Starlette, http: httpx.AsyncClient) -> None:
    script = """\
sh -c 'echo $$ >> pids; exec sleep 300' &
setsid sh -c 'trap "" TERM; echo $$ >> pids; exec sleep 300' &
while [ "$(wc -l < pids 2>/dev/null || echo 0)" -lt 2 ]; do sleep 0.01; done
echo bye
"""
    with _no_strays() as procs:
        jobid = (await http.post("/v1/jobs", json={"script": script})).json()["jobid"]
        workdir: Path = app.state.context.settings.prefix / jobid / "work"
        await _pids(workdir / "pids", 2, procs)
        assert await _wait_state(http, jobid, {"completed", "failed", "canceled"}) == "completed"
        # The script ended; what it left running is TERMed, then KILLed after the grace.
        await _gone_within(SWEEP_INTERVAL + GRACE + MARGIN, procs)
        assert await _state(http, jobid) == "completed"  # ending leftovers changes no state


def _append_rows(base: Path, *rows: tuple[int, str, str]) -> None:
    with open(base / "status.csv", "a") as f:
        for jobndx, state, info in rows:
            f.write(f"{time.time()},{jobndx},{state},{info}\n")


async def test_a_runner_that_hangs_on_term_is_killed_after_the_grace(
    app: Starlette, http: httpx.AsyncClient
) -> None:
    """psik 3.1.1's runner can hang in its own SIGTERM handler when a cancel races the
    job's start: here a stand-in runner that ignores TERM is what psik recorded."""
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print(1, flush=True); time.sleep(300)"
    )
    hung = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert hung.stdout is not None and hung.stdout.readline()  # TERM is ignored from here
        jobid = (await http.post("/v1/jobs/new", json={"script": "sleep 300"})).json()["jobid"]
        prefix = app.state.context.settings.prefix
        _append_rows(prefix / jobid, (1, "queued", str(hung.pid)), (1, "active", ""))
        t0 = time.monotonic()
        canceled = (await http.delete(f"/v1/jobs/{jobid}")).json()
        assert canceled["state"] == "canceled"
        assert hung.poll() is None  # TERM first: it has its grace period
        status = await anyio.to_thread.run_sync(lambda: hung.wait(GRACE + MARGIN))
        assert status == -signal.SIGKILL
        assert time.monotonic() - t0 >= GRACE - 0.5
    finally:
        if hung.poll() is None:
            hung.kill()
        hung.wait()


async def test_cancelling_a_job_whose_process_is_already_gone_logs_no_error(
    app: Starlette, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its PID names no process
    jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    _append_rows(app.state.context.settings.prefix / jobid, (1, "queued", str(gone.pid)), (1, "active", ""))
    with caplog.at_level(logging.DEBUG):
        canceled = (await http.delete(f"/v1/jobs/{jobid}")).json()
        assert canceled["state"] == "canceled"
        await anyio.sleep(SWEEP_INTERVAL + 0.5)  # a sweep or two see the job too
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_second_run_is_not_ended_for_the_first_runs_leftovers(
    app: Starlette, http: httpx.AsyncClient
) -> None:
    """Leftovers are per run: re-running a finished job does not get the new run killed."""
    with _no_strays() as procs:
        script = "echo $$ >> pids; if [ $jobndx = 2 ]; then exec sleep 300; fi"
        jobid = (await http.post("/v1/jobs", json={"script": script})).json()["jobid"]
        assert await _wait_state(http, jobid, {"completed", "failed", "canceled"}) == "completed"
        assert (await http.post(f"/v1/jobs/{jobid}/start")).status_code == 200
        workdir: Path = app.state.context.settings.prefix / jobid / "work"
        pids = await _pids(workdir / "pids", 2, procs)
        await anyio.sleep(2 * SWEEP_INTERVAL + 0.5)
        assert _running(pids[1], procs[pids[1]])
        assert await _state(http, jobid) == "active"
        await http.delete(f"/v1/jobs/{jobid}")
        await _gone_within(GRACE + MARGIN, {pids[1]: procs[pids[1]]})


async def test_job_directories_are_owner_only(app: Starlette, http: httpx.AsyncClient) -> None:
    jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
    base = app.state.context.settings.prefix / jobid
    old = os.umask(0o022)  # as most users have it: psik's files would be 0644 and 0755
    try:
        jobid = (await http.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        base = app.state.context.settings.prefix / jobid
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [base, *base.iterdir()]}
    expected = {jobid: 0o700, "spec.json": 0o600, "status.csv": 0o600, "log": 0o700, "work": 0o700}
    expected[".psik-api-owner"] = 0o600  # the owner, for an index rebuilt from the directories
    assert modes == expected, {k: oct(v) for k, v in modes.items()}


def test_a_reused_pid_is_never_signalled() -> None:
    from psik_api_server.backends.local.proctree import read_proc, send

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        me = read_proc(child.pid)
        assert me is not None
        assert not send(child.pid, me.start + 1, signal.SIGKILL)  # another process's start time
        assert child.poll() is None
        assert send(child.pid, me.start, signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert not send(child.pid, me.start, signal.SIGKILL)  # gone: no error, nothing sent
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_the_server_and_its_ancestors_are_never_signalled(tmp_path: Path) -> None:
    """A job directory that names the server's own PID as its runner (a PID reused by
    the server after a reboot, say) gets nothing signalled."""
    from psik_api_server.backends.local.containment import Containment

    containment = Containment(tmp_path, {"default"})
    assert containment.end_job("1693992878.203", 1, (os.getpid(), time.time())) == 0
    assert containment.pending == 0


def test_a_tag_is_read_from_the_environment_a_process_started_with(tmp_path: Path) -> None:
    from psik_api_server.backends.local.proctree import read_tag

    env = {"PATH": os.environ.get("PATH", ""), "base": str(tmp_path / "1693992878.203"), "jobndx": "3"}
    code = "import time; print(flush=True); time.sleep(300)"
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline()  # running, exec() long done
        assert read_tag(child.pid) == (str(tmp_path / "1693992878.203"), 3)
    finally:
        child.kill()
        child.wait()
