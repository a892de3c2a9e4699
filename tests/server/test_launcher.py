"""The launcher process: a job process psik forks never comes back into the launcher's
request loop, whatever psik's code does in it; its log is the owner's alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from psik_api_server.backends.local.launcher import LocalLauncher
from psik_api_server.backends.local.liveness import process_running

pytestmark = pytest.mark.anyio

#: The launcher, with psik's job body made to raise in the forked job process.
RAISING_PSIK = """\
import psik.job

async def execute(self, jobndx, **env):
    raise RuntimeError("boom in the job's process")

psik.job.Job.execute = execute

from psik_api_server.backends.local.launcher import main

main()
"""


async def _make_jobs(prefix: Path, count: int) -> list[str]:
    from psik import BackendConfig, Config, JobManager, JobSpec

    prefix.mkdir(mode=0o700)
    manager = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))
    return [str((await manager.create(JobSpec(script="echo hi"))).base) for _ in range(count)]


async def test_a_forked_job_process_that_raises_never_returns_into_the_launchers_loop(tmp_path: Path) -> None:
    first, second = await _make_jobs(tmp_path / "jobs", 2)
    log = tmp_path / "launcher.log"
    with open(log, "ab") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-c", RAISING_PSIK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert launcher.stdin is not None and launcher.stdout is not None
    try:

        def ask(rid: int, base: str) -> dict[str, object]:
            assert launcher.stdin is not None and launcher.stdout is not None
            launcher.stdin.write(json.dumps({"id": rid, "base": base}).encode() + b"\n")
            launcher.stdin.flush()
            reply: dict[str, object] = json.loads(launcher.stdout.readline())
            return reply

        one = await anyio.to_thread.run_sync(ask, 1, first)
        assert one["id"] == 1 and one["jobndx"] == 1, one
        two = await anyio.to_thread.run_sync(ask, 2, second)  # the launcher still serves
        assert two["id"] == 2 and two["jobndx"] == 1, two
        job_pids = [int(str(one["native_id"])), int(str(two["native_id"]))]
        with anyio.fail_after(20):  # the job processes end (they raised) ...
            while any(process_running(pid, time.time()) for pid in job_pids):
                await anyio.sleep(0.02)
        launcher.stdin.close()
        rest = await anyio.to_thread.run_sync(launcher.stdout.read)
        assert rest == b""  # ... and nobody but the launcher answered, once per request
        assert await anyio.to_thread.run_sync(launcher.wait, 20) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log.read_text()
    # Each job process said why it ended, and none of them unwound into the request loop.
    for base in (first, second):
        assert f"job {Path(base).name}" in text and "boom in the job's process" in text, text
    assert "in _serve" not in text and "in main" not in text and "Bad file descriptor" not in text, text


async def test_the_launcher_log_is_owner_only(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "launcher.log"
    log.parent.mkdir()
    log.write_text("from before\n")
    log.chmod(0o644)  # an older server's log, readable by all
    launcher = LocalLauncher(log)
    try:
        await launcher.start()
        assert log.stat().st_mode & 0o777 == 0o600
    finally:
        await launcher.aclose()
    fresh = LocalLauncher(tmp_path / "new" / "launcher.log")
    try:
        await fresh.start()
        assert (tmp_path / "new" / "launcher.log").stat().st_mode & 0o777 == 0o600
    finally:
        await fresh.aclose()
    assert os.stat(tmp_path / "new").st_mode & 0o077 == 0


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
async def test_a_launcher_log_planted_as_a_link_or_fifo_is_refused(tmp_path: Path, planted: str) -> None:
    """Neither written through (a link to a file of the attacker's choosing) nor waited on
    (a FIFO with no reader would hold the start for ever)."""
    target = tmp_path / "elsewhere"
    log = tmp_path / "launcher.log"
    if planted == "symlink":
        log.symlink_to(target)
    else:
        os.mkfifo(log)
    launcher = LocalLauncher(log)
    try:
        with anyio.fail_after(10), pytest.raises(OSError):
            await launcher.start()
    finally:
        await launcher.aclose()
    assert not target.exists()
