"""A job's own files are untrusted input (issue 14): a job runs as the server's user and
may turn its bookkeeping files (status.csv, spec.json, .psik-api-owner,
.psik-api-callback) into FIFOs, directories or unwritable files. Every answer stays
prompt, the job's trouble is its own (a clear problem naming the file), the other jobs
go on, and neither start-up nor shutdown waits for a job's files.

Each job here breaks its own files from inside its script, as an attacker's job would.
The server's readers of a FIFO would block for ever: each test bounds every request
with :data:`PROMPT`, and its teardown opens the FIFOs for writing (which ends such a
read) so that even a failing run ends, and kills what the jobs left running."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import lazy_app
from psik_api_server.backends.local.proctree import ProcessTable
from psik_api_server.settings import BackendSettings, Settings
from support import LiveServer

pytestmark = pytest.mark.anyio

#: Seconds within which every answer must come (a hang is what is tested for).
PROMPT = 10.0


class FifoRelease:
    """Once started, keeps opening the FIFOs under ``root`` read-write and closing them:
    a reader blocked opening one gets in and reads EOF. Started only in a test's
    teardown, so a server that blocks on a FIFO still fails the test, but the test
    process is not left hanging with it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for dirpath, _, names in os.walk(self.root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if stat.S_ISFIFO(os.lstat(path).st_mode):
                            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
            self._stop.wait(0.05)

    def __enter__(self) -> FifoRelease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _kill_jobs(prefix: Path) -> None:
    """SIGKILL every process of a job under ``prefix`` still running (a failing run)."""
    for pid, (base, _) in ProcessTable.read().tagged().items():
        if base.startswith(str(prefix) + os.sep):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def serving(settings: Settings, *, callbacks: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (lifespan, watcher, liveness, launcher) under uvicorn in a thread,
    with raw httpx on it: a request the server never answers times out in the client.
    A start-up or shutdown that waits on a job's files fails the test. ``callbacks``:
    jobs report to this server."""
    app = lazy_app(settings)
    live = LiveServer(app)
    live.thread.start()
    try:
        with anyio.fail_after(PROMPT):
            while not live.server.started:
                assert live.thread.is_alive(), "the server did not start"
                await anyio.sleep(0.02)
        if callbacks:  # known once the port is
            app.state.context.service.specs.callback_url = f"{live.url}/v1/callback"
        async with httpx.AsyncClient(base_url=live.url, timeout=PROMPT) as http:
            yield http
    finally:
        live.server.should_exit = True
        await anyio.to_thread.run_sync(live.thread.join, PROMPT)
        if live.thread.is_alive():
            with FifoRelease(settings.prefix):
                await anyio.to_thread.run_sync(live.thread.join, 20)
            raise AssertionError("the server's shutdown was held (by a job's files)")


@pytest.fixture
def hostile(settings: Settings) -> Iterator[Settings]:
    """``settings``, and a teardown that frees whatever a FIFO holds and ends every job."""
    settings.liveness_interval = 0.1
    settings.backends = {"default": BackendSettings(type="local", max_running=8)}
    try:
        yield settings
    finally:
        with FifoRelease(settings.prefix):
            _kill_jobs(settings.prefix)
            # The server may still be stopping in a worker thread blocked on a FIFO.
            threading.Event().wait(0.5)
        _kill_jobs(settings.prefix)


async def _call(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return await http.request(method, url, **kwargs)
    except httpx.TimeoutException:
        raise AssertionError(f"{method} {url}: no answer within {PROMPT} s") from None


async def _wait_for(path: Path) -> None:
    with anyio.fail_after(30):
        while not path.exists():
            await anyio.sleep(0.02)


async def _wait_state(http: httpx.AsyncClient, jobid: str, wanted: set[str], timeout: float = 30) -> str:
    with anyio.fail_after(timeout):
        while (state := (await _call(http, "GET", f"/v1/jobs/{jobid}/state")).json()["state"]) not in wanted:
            await anyio.sleep(0.05)
    return str(state)


def _breaks(name: str, how: str = "fifo") -> str:
    """A job script that replaces its own ``../name`` (a FIFO, or a directory), says so
    in ``broken``, and goes on running."""
    make = f"mkfifo ../{name}" if how == "fifo" else f"mkdir ../{name}"
    wait = "while [ ! -e go ]; do sleep 0.02; done"  # until the server has answered the submit
    return f"{wait}; rm -f ../{name} && {make} && touch broken && exec sleep 60"


async def _submit_breaking(http: httpx.AsyncClient, prefix: Path, name: str, how: str = "fifo") -> str:
    r = await _call(http, "POST", "/v1/jobs", json={"script": _breaks(name, how)})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    (prefix / jobid / "work" / "go").touch()
    await _wait_for(prefix / jobid / "work" / "broken")
    return jobid


async def _others_work(http: httpx.AsyncClient) -> None:
    """Another job is submitted, runs and is seen to complete; the list answers."""
    r = await _call(http, "POST", "/v1/jobs", json={"script": "true"})
    assert r.status_code == 201, r.text
    assert await _wait_state(http, r.json()["jobid"], {"completed", "failed"}) == "completed"
    r = await _call(http, "GET", "/v1/jobs")
    assert r.status_code == 200, r.text


def _is_job_files_invalid(r: httpx.Response, jobid: str, name: str) -> None:
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["code"] == "job_files_invalid", problem
    assert problem["jobid"] == jobid and problem["file"] == name, problem
    assert name in problem["detail"], problem


# ---- status.csv ----


@pytest.mark.parametrize("how", ["fifo", "directory"])
async def test_a_job_whose_status_file_is_not_a_file_is_failed_and_holds_up_nobody(
    hostile: Settings, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # One job slot: the other jobs below run only once the broken job's slot is free.
    hostile.backends = {"default": BackendSettings(type="local", max_running=1)}
    async with serving(hostile) as http:
        jobid = await _submit_breaking(http, hostile.prefix, "status.csv", how)
        # The job's own requests answer at once, with its own problem.
        _is_job_files_invalid(await _call(http, "GET", f"/v1/jobs/{jobid}"), jobid, "status.csv")
        # The watcher fails it (its state cannot be read any more), frees its slot and
        # ends its processes.
        assert await _wait_state(http, jobid, {"failed"}) == "failed"
        await _others_work(http)
        assert (await _call(http, "GET", "/v1/jobs")).status_code == 200
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}")
        _is_job_files_invalid(r, jobid, "status.csv")
        await anyio.sleep(0.5)  # a few ticks of the watcher, a few rounds of liveness
        said = [r.getMessage() for r in caplog.records if jobid in r.getMessage()]
        assert len([m for m in said if "status.csv" in m]) == 1, said  # once, not per look
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # A restart with the job's directory as it is starts promptly; purge removes it.
    async with serving(hostile) as http:
        await _others_work(http)
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}", params={"purge": "true"})
        assert r.status_code == 204, r.text
        assert not (hostile.prefix / jobid).exists()


async def test_a_restart_is_not_held_by_a_live_jobs_fifo(hostile: Settings) -> None:
    """The FIFO is made while no server runs: start-up reads the live job's files."""
    async with serving(hostile) as http:
        r = await _call(http, "POST", "/v1/jobs", json={"script": "touch started; exec sleep 60"})
        jobid = r.json()["jobid"]
        await _wait_for(hostile.prefix / jobid / "work" / "started")
    status = hostile.prefix / jobid / "status.csv"
    status.unlink()
    os.mkfifo(status)
    async with serving(hostile) as http:
        _is_job_files_invalid(await _call(http, "GET", f"/v1/jobs/{jobid}"), jobid, "status.csv")
        await _others_work(http)
        assert await _wait_state(http, jobid, {"failed"}) == "failed"


# ---- spec.json ----


async def test_a_job_whose_spec_is_a_fifo_answers_its_own_problem(hostile: Settings) -> None:
    async with serving(hostile) as http:
        jobid = await _submit_breaking(http, hostile.prefix, "spec.json")
        _is_job_files_invalid(await _call(http, "GET", f"/v1/jobs/{jobid}"), jobid, "spec.json")
        r = await _call(http, "POST", f"/v1/jobs/{jobid}/start")
        assert r.status_code == 409, r.text
        r = await _call(http, "GET", f"/v1/jobs/{jobid}/files")
        assert r.status_code < 500, r.text
        await _others_work(http)
        # Cancel ends it (psik would read spec.json to cancel: it is not asked).
        _is_job_files_invalid(await _call(http, "DELETE", f"/v1/jobs/{jobid}"), jobid, "spec.json")
        assert await _wait_state(http, jobid, {"failed", "canceled"}) in {"failed", "canceled"}
    # The job is not final in its status.csv: start-up reads it (and its spec) again.
    async with serving(hostile) as http:
        await _others_work(http)
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}", params={"purge": "true"})
        assert r.status_code == 204, r.text


# ---- .psik-api-owner: read when the index is rebuilt ----


async def test_a_rebuilt_index_is_not_held_by_an_owner_fifo(hostile: Settings) -> None:
    async with serving(hostile) as http:
        jobid = await _submit_breaking(http, hostile.prefix, ".psik-api-owner")
        await _others_work(http)
    hostile.database.unlink()  # deleted: rebuilt from the job directories
    async with serving(hostile) as http:
        r = await _call(http, "GET", f"/v1/jobs/{jobid}")
        assert r.status_code == 200, r.text  # owned by the import owner: the server's user
        await _others_work(http)
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}")
        assert r.status_code == 200, r.text


# ---- .psik-api-callback: read by POST /v1/callback, before any signature ----


async def test_a_callback_for_a_job_whose_record_is_a_fifo_is_refused_at_once(hostile: Settings) -> None:
    async with serving(hostile, callbacks=True) as http:
        jobid = await _submit_breaking(http, hostile.prefix, ".psik-api-callback")
        body = f'{{"jobid": "{jobid}", "jobndx": 1, "state": "failed", "info": "x"}}'
        for _ in range(3):  # each would hold a worker thread for ever
            r = await _call(
                http,
                "POST",
                "/v1/callback",
                content=body,
                headers={"content-type": "application/json", "x-hub-signature-256": "sha256=" + "0" * 64},
            )
            assert r.status_code == 401, r.text
        assert await _wait_state(http, jobid, {"active"}) == "active"  # nothing recorded
        await _others_work(http)
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}")
        assert r.status_code == 200, r.text


# ---- an unwritable status.csv (chattr +i: root writes through chmod) ----


def _immutable(path: Path, on: bool) -> bool:
    """``chattr +i``/``-i`` on ``path``; False if it cannot be done here."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    done = subprocess.run([chattr, "+i" if on else "-i", str(path)], capture_output=True, check=False)
    return done.returncode == 0


async def test_one_unwritable_status_file_does_not_stop_failure_detection(
    hostile: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose status.csv cannot be written dies: it is logged once and skipped, every
    other dead job is failed in the same round, and its cancel is a clear problem."""
    caplog.set_level(logging.WARNING)
    hostile.liveness_interval = 0.2
    async with serving(hostile) as http:
        jobids = []
        for _ in range(3):  # the first is the one that cannot be written
            r = await _call(http, "POST", "/v1/jobs", json={"script": "echo $PPID > runner; exec sleep 60"})
            jobids.append(r.json()["jobid"])
        for jobid in jobids:
            await _wait_for(hostile.prefix / jobid / "work" / "runner")
            assert await _wait_state(http, jobid, {"active"}) == "active"
        blocked = hostile.prefix / jobids[0] / "status.csv"
        if os.geteuid() == 0:
            if not _immutable(blocked, True):
                if os.environ.get("CI") == "true":
                    pytest.fail("chattr +i is not supported on the test filesystem")
                pytest.skip("chattr +i is not supported here (root writes through chmod a-w)")
        else:
            blocked.chmod(0o400)
        try:
            for jobid in jobids:  # psik's runner first: it would record the end otherwise
                with contextlib.suppress(OSError):
                    os.kill(int((hostile.prefix / jobid / "work" / "runner").read_text()), signal.SIGKILL)
            _kill_jobs(hostile.prefix)
            for jobid in jobids[1:]:
                assert await _wait_state(http, jobid, {"failed"}, PROMPT) == "failed"
            await anyio.sleep(1.0)  # a few more rounds
            said = [r for r in caplog.records if jobids[0] in r.getMessage()]
            assert len(said) == 1, [r.getMessage() for r in said]
            r = await _call(http, "DELETE", f"/v1/jobs/{jobids[0]}")
            _is_job_files_invalid(r, jobids[0], "status.csv")
            assert "written" in r.json()["detail"]
        finally:
            if os.geteuid() == 0:
                _immutable(blocked, False)


# ---- rows of status.csv that lie ----

#: Rows well formed enough to split, with a time or run number nothing can hold: a
#: datetime out of range, NaN, a run number past SQLite's INTEGER.
LYING_ROWS = [
    "1e400,1,completed,",
    "nan,1,completed,",
    "-1e300,1,completed,",
    "99999999999999,1,completed,",
    "1796664976.1,99999999999999999999999,completed,",
]


@pytest.mark.parametrize("row", LYING_ROWS)
async def test_a_status_row_out_of_range_is_malformed_not_a_500(hostile: Settings, row: str) -> None:
    async with serving(hostile) as http:
        script = f"while [ ! -e go ]; do sleep 0.02; done; echo '{row}' >> ../status.csv; touch broken"
        r = await _call(http, "POST", "/v1/jobs", json={"script": script})
        assert r.status_code == 201, r.text
        jobid = r.json()["jobid"]
        (hostile.prefix / jobid / "work" / "go").touch()
        await _wait_for(hostile.prefix / jobid / "work" / "broken")
        assert await _wait_state(http, jobid, {"completed", "failed"}) == "completed"  # its real end
        for url in (f"/v1/jobs/{jobid}", "/v1/jobs", f"/v1/jobs?id={jobid}"):
            r = await _call(http, "GET", url)
            assert r.status_code == 200, r.text
        await _others_work(http)
    # A restart reads the row again (start-up import and refresh): it starts.
    async with serving(hostile) as http:
        assert (await _call(http, "GET", f"/v1/jobs/{jobid}")).status_code == 200
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}", params={"purge": "true"})
        assert r.status_code == 204, r.text


async def test_rows_that_lie_written_while_no_server_ran_do_not_stop_start_up(hostile: Settings) -> None:
    async with serving(hostile) as http:
        r = await _call(http, "POST", "/v1/jobs", json={"script": "true"})
        jobid = r.json()["jobid"]
        assert await _wait_state(http, jobid, {"completed", "failed"}) == "completed"
    with (hostile.prefix / jobid / "status.csv").open("a") as f:
        f.write("".join(row + "\n" for row in LYING_ROWS))
    hostile.database.unlink()  # and the index is rebuilt from the directories
    async with serving(hostile) as http:
        r = await _call(http, "GET", f"/v1/jobs/{jobid}")
        assert r.status_code == 200 and r.json()["state"] == "completed", r.text
        await _others_work(http)


# ---- spec.json that is no spec ----


@pytest.mark.parametrize("junk", ["garbage", "{}", "null", "[" * 200_000])
async def test_a_job_whose_spec_is_junk_answers_its_own_problem_and_can_be_purged(
    hostile: Settings, junk: str
) -> None:
    async with serving(hostile) as http:
        r = await _call(http, "POST", "/v1/jobs", json={"script": "while [ ! -e go ]; do sleep 0.02; done"})
        jobid = r.json()["jobid"]
        assert await _wait_state(http, jobid, {"active"}) == "active"
        (hostile.prefix / jobid / "work" / "go").touch()
        assert await _wait_state(http, jobid, {"completed", "failed"}) == "completed"
        (hostile.prefix / jobid / "spec.json").write_text(junk)
        _is_job_files_invalid(await _call(http, "GET", f"/v1/jobs/{jobid}"), jobid, "spec.json")
        await _others_work(http)
        r = await _call(http, "DELETE", f"/v1/jobs/{jobid}", params={"purge": "true"})
        assert r.status_code == 204, r.text
        assert not (hostile.prefix / jobid).exists()
