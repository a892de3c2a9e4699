"""Real local jobs: isolation from the server process, surviving a restart, jobs made
by the psik CLI, and the index staying true to the job directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from psik_api_server.app import create_app
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


def _fd_targets(pid: int | str) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


async def _wait_final(http: httpx.AsyncClient, jobid: str, timeout: float = 30) -> dict[str, object]:
    with anyio.fail_after(timeout):
        while True:
            job: dict[str, object] = (await http.get(f"/v1/jobs/{jobid}")).json()
            if job["state"] in {"completed", "failed", "canceled"}:
                return job
            await anyio.sleep(0.02)


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_a_job_holds_none_of_the_servers_sockets_pipes_or_stdio(app: Starlette) -> None:
    # Something for a leaky job to inherit: a listening socket, like uvicorn's.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        script = 'for f in /proc/self/fd/* /proc/$PPID/fd/*; do readlink "$f"; done; echo "ppid=$PPID"'
        async with _client(app) as http:
            job = (await http.post("/v1/jobs", json={"script": script})).json()
            done = await _wait_final(http, job["jobid"])
        assert done["state"] == "completed", done
        launcher = app.state.context.service.backend._launcher._proc
        assert launcher is not None
        forbidden = {t for t in _fd_targets("self") if t.startswith(("socket:", "pipe:"))}
        forbidden |= {t for t in _fd_targets(launcher.pid) if t.startswith(("socket:", "pipe:"))}
        for fd in (0, 1, 2):  # the server's stdio
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target != "/dev/null":
                forbidden.add(target)
        assert f"socket:[{os.fstat(listener.fileno()).st_ino}]" in forbidden
        out = (app.state.context.settings.prefix / job["jobid"] / "log" / "stdout.1").read_text()
        seen = set(out.splitlines())
        assert any(line.startswith("ppid=") for line in seen)
        assert not (seen & forbidden), seen & forbidden
    finally:
        listener.close()


async def test_jobs_outlive_a_server_restart_and_nothing_is_lost(settings: Settings) -> None:
    first = create_app(settings)
    async with LifespanManager(first), _client(first) as http:
        running = (
            await http.post("/v1/jobs", json={"name": "survivor", "script": "sleep 1; echo done"})
        ).json()
        quick = (await http.post("/v1/jobs", json={"script": "true"})).json()
        await _wait_final(http, quick["jobid"])
    # The server (and its launcher) are gone; the job is not.
    second = create_app(settings)
    async with LifespanManager(second), _client(second) as http:
        listed = (await http.get("/v1/jobs")).json()["items"]
        assert {j["jobid"] for j in listed} == {running["jobid"], quick["jobid"]}
        done = await _wait_final(http, running["jobid"])
        assert done["state"] == "completed"
        out = settings.prefix / running["jobid"] / "log" / "stdout.1"
        assert out.read_text() == "done\n"
        state = (await http.get(f"/v1/jobs/{running['jobid']}/state")).json()
        assert state["state"] == "completed"  # the index caught up too


async def test_jobs_made_by_the_psik_cli_appear_and_removed_ones_go(
    settings: Settings, tmp_path: Path
) -> None:
    settings.prefix.mkdir(mode=0o700, parents=True)  # a prefix others can reach is refused
    cfg = tmp_path / "psik.json"
    cfg.write_text(json.dumps({"prefix": str(settings.prefix), "backends": {"default": {"type": "local"}}}))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"name": "from-cli", "script": "echo cli"}))
    psik_cli = shutil.which("psik", path=str(Path(sys.executable).parent)) or "psik"
    subprocess.run(
        [psik_cli, "run", str(spec), "--config", str(cfg)],
        check=True,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    (cli_jobid,) = os.listdir(settings.prefix)

    app = create_app(settings)
    async with LifespanManager(app), _client(app) as http:
        items = (await http.get("/v1/jobs?name=from-cli")).json()["items"]
        assert [(j["jobid"], j["owner"]) for j in items] == [(cli_jobid, "local:psik_api")]
        assert (await _wait_final(http, cli_jobid))["state"] == "completed"

    shutil.rmtree(settings.prefix / cli_jobid)  # `psik rm` behind the server's back
    again = create_app(settings)
    async with LifespanManager(again), _client(again) as http:
        assert (await http.get("/v1/jobs")).json()["items"] == []
        assert (await http.get(f"/v1/jobs/{cli_jobid}")).status_code == 404


async def test_index_states_are_brought_up_to_date_at_start(settings: Settings) -> None:
    app = create_app(settings)
    async with LifespanManager(app), _client(app) as http:
        job = (await http.post("/v1/jobs/new", json={"script": "true"})).json()
    # Something else (here: a row written by hand, as psik would) moves the job on.
    with open(settings.prefix / job["jobid"] / "status.csv", "a") as f:
        f.write(f"{float(job['jobid']) + 1},1,queued,123\n{float(job['jobid']) + 2},1,failed,9\n")
    again = create_app(settings)
    async with LifespanManager(again), _client(again) as http:  # the lifespan reconciles the index
        state = (await http.get(f"/v1/jobs/{job['jobid']}/state")).json()
        assert (state["state"], state["jobndx"]) == ("failed", 1)
        listed = (await http.get("/v1/jobs?state=failed")).json()["items"]
        assert [j["jobid"] for j in listed] == [job["jobid"]]
    await again.state.context.service.aclose()


async def test_many_concurrent_submits_all_end_completed(http: httpx.AsyncClient) -> None:
    """psik wrote queued rows after completed ones under concurrency; the index must
    still end every job completed, and each job ran exactly once."""
    async with anyio.create_task_group() as tg:
        ids: list[str] = []

        async def one(i: int) -> None:
            r = await http.post("/v1/jobs", json={"name": "burst", "script": f"echo {i}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["jobid"])

        for i in range(16):
            tg.start_soon(one, i)
    with anyio.fail_after(60):
        while True:
            page = (await http.get("/v1/jobs?name=burst&state=completed")).json()
            if len(page["items"]) == 16:
                break
            await anyio.sleep(0.05)
    for jobid in ids:
        job = (await http.get(f"/v1/jobs/{jobid}")).json()
        assert [t["state"] for t in job["history"]].count("active") == 1


async def test_a_dead_launcher_is_replaced(app: Starlette) -> None:
    import signal

    async with _client(app) as http:
        first = (await http.post("/v1/jobs", json={"script": "true"})).json()
        assert (await _wait_final(http, first["jobid"]))["state"] == "completed"
        launcher = app.state.context.service.backend._launcher._proc
        os.kill(launcher.pid, signal.SIGKILL)
        await launcher.wait()
        second = await http.post("/v1/jobs", json={"script": "true"})
        assert second.status_code == 201, second.text
        assert (await _wait_final(http, second.json()["jobid"]))["state"] == "completed"
        assert app.state.context.service.backend._launcher._proc.pid != launcher.pid


async def test_a_dead_callback_url_delays_neither_submit_nor_cancel(app: Starlette) -> None:
    """psik awaits callback POSTs inside submit() and cancel() (up to 5 minutes), and a
    failed one stopped cancel() before it signalled the job."""
    import socket

    from psik_api_server.backends.local.liveness import process_running

    blackhole = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    hook = f"http://127.0.0.1:{blackhole.getsockname()[1]}/hook"
    try:
        async with _client(app) as http:
            with anyio.fail_after(20):  # far below psik's 300 s callback timeout
                r = await http.post("/v1/jobs", json={"script": "sleep 60", "callback": hook})
                assert r.status_code == 201, r.text
                jobid = r.json()["jobid"]
                history = (await http.get(f"/v1/jobs/{jobid}")).json()["history"]
                pid = int(next(t["info"] for t in history if t["state"] == "queued"))
                canceled = (await http.delete(f"/v1/jobs/{jobid}")).json()
            assert canceled["state"] == "canceled"
            with anyio.fail_after(20):
                while process_running(pid, time.time()):  # the job really was signalled
                    await anyio.sleep(0.05)
    finally:
        blackhole.close()


#: Canceled, this job records a late `completed` for its run from inside its own process,
#: as psik does when the script ends just as the cancel arrives (the contract test
#: test_cancel_long_job_stays_canceled uses the same script).
LATE_COMPLETED = """\
trap 'echo "$(date +%s.%N),$jobndx,completed," >> "$base/status.csv"; exit 0' TERM
touch "$base/trap-set"
sleep 60 & wait
"""


async def test_a_late_row_after_cancel_changes_neither_the_index_nor_liveness(app: Starlette) -> None:
    from psik_api_server.backends.local.liveness import process_running

    service = app.state.context.service
    # The watcher's background task is stopped, so that its only look at the job is the
    # one below, made once the late row is written: the case where it does see the row.
    await service.watcher.stop()
    async with _client(app) as http:
        jobid = (await http.post("/v1/jobs", json={"script": LATE_COMPLETED})).json()["jobid"]
        base: Path = app.state.context.settings.prefix / jobid
        with anyio.fail_after(20):
            while not (base / "trap-set").exists():
                await anyio.sleep(0.02)
        canceled = (await http.delete(f"/v1/jobs/{jobid}")).json()
        assert canceled["state"] == "canceled"
        with anyio.fail_after(20):  # psik writes from the job's process: gone, the file is final
            while process_running(int(canceled["native_id"]), time.time()):
                await anyio.sleep(0.02)
        rows = [line.split(",")[1:3] for line in (base / "status.csv").read_text().splitlines()]
        assert rows[-2:] == [["0", "canceled"], ["1", "completed"]]
        assert len(service.watcher) == 1
        await service.watcher.check_all()  # everything the watcher will ever read of this job
        assert len(service.watcher) == 0  # final: no longer followed
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "canceled"
        assert await service.check_liveness() == []
        assert (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] == "canceled"
