"""psik forks every local job from the launcher process: a fork taken while another
thread of the launcher holds a lock (the import lock while it loads aiohttp or
certified for a callback, any of aiohttp's) gives a job process that waits on that lock
for ever, never running its script (issue 14: the process left by the callback tests).
The launcher keeps one thread; a job's callbacks are posted from a process of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import anyio
import pytest

from psik_api_server.backends.local.launcher import LocalLauncher

pytestmark = pytest.mark.anyio


async def _jobs_with_callback(prefix: Path, count: int, url: str) -> list[Path]:
    from psik import BackendConfig, Config, JobManager, JobSpec

    prefix.mkdir(mode=0o700)
    manager = JobManager(Config(prefix=prefix, backends={"default": BackendConfig(type="local")}))
    spec = JobSpec(script="true", callback=url, cb_secret="s")
    return [Path((await manager.create(spec)).base) for _ in range(count)]


def _final(base: Path) -> bool:
    rows = (base / "status.csv").read_text().splitlines()
    return any(row.split(",")[2] in {"completed", "failed", "canceled"} for row in rows[1:])


async def test_jobs_submitted_while_a_callback_is_being_posted_all_run(tmp_path: Path) -> None:
    # A callback URL that refuses connections (bound, not listening: nobody else can take
    # it), as the callback tests' port 9: each post is short, but it loads aiohttp.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sink.getsockname()[1]}/hook"
        bases = await _jobs_with_callback(tmp_path / "jobs", 6, url)
        launcher = LocalLauncher(tmp_path / "launcher.log")
        pids: list[int] = []
        try:
            for base in bases:
                pids.append(int((await launcher.submit(base))[1]))
            with anyio.move_on_after(30):
                while not all(_final(b) for b in bases):
                    await anyio.sleep(0.05)
            hung = [b.name for b in bases if not _final(b)]
            assert not hung, f"job processes that never ran their script: {hung}"
        finally:
            await launcher.aclose()
            for pid in pids:  # a hung job process is this test's to end
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
