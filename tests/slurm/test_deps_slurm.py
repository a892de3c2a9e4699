"""Dependencies (``JobSpec.after``) on a real Slurm cluster: the server holds a waiting
job itself (no ``sbatch --dependency``: nothing is in Slurm's queue until its parents
ended as it says), so a diamond runs in order, and a failed parent cancels its
dependants with the reason, never leaving them pending in Slurm."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from psik_api_core import JobState, Transition
from psik_api_core.states import DEPENDENCY_WAIT_INFO
from psik_api_server.app import create_app
from psik_api_server.settings import BackendSettings, Settings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("slurm_cluster")]

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        prefix=tmp_path / "jobs",
        database=tmp_path / "index.sqlite",
        backends={
            "slurm": BackendSettings(
                type="slurm", queue_name="debug", attributes={"psik_python": sys.executable}
            )
        },
        watch_interval=0.05,
        liveness_interval=0.5,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c,
    ):
        yield c


async def _submit(c: httpx.AsyncClient, script: str, name: str, after: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    body = {
        "backend": "slurm",
        "name": name,
        "script": f"#!/bin/bash\n{script}",
        "after": [{"jobid": a} for a in after],
    }
    r = await c.post("/v1/jobs", json=body, headers=JSON)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _until_final(c: httpx.AsyncClient, jobids: list[str], timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [(await c.get(f"/v1/jobs/{j}")).json() for j in jobids]
        if all(JobState(j["state"]).is_final for j in jobs):
            return jobs
        assert time.monotonic() < deadline, [(j["jobid"], j["state"]) for j in jobs]
        await anyio.sleep(0.2)


def _t(row: dict[str, Any]) -> float:
    return Transition.model_validate(row).time.timestamp()


def _launched_at(job: dict[str, Any]) -> float:
    rows = [h for h in job["history"] if h["state"] == "queued" and h["info"].isdigit()]
    assert len(rows) == 1, job["history"]
    return _t(rows[0])


def _ended_at(job: dict[str, Any]) -> float:
    return min(_t(h) for h in job["history"] if JobState(h["state"]).is_final)


def _in_slurm(name: str) -> bool:
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30
    ).stdout
    return bool(out.strip())


async def test_a_diamond_runs_in_order_on_slurm(client: httpx.AsyncClient, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    tag = f"deps{time.time_ns()}"
    a = await _submit(client, f"while [ ! -e {gate} ]; do sleep 0.1; done", f"{tag}-A")
    b = await _submit(client, "sleep 1", f"{tag}-B", [a["jobid"]])
    c = await _submit(client, "sleep 2", f"{tag}-C", [a["jobid"]])
    d = await _submit(client, "true", f"{tag}-D", [b["jobid"], c["jobid"]])
    assert _in_slurm(a["name"])  # the parent is Slurm's (so the check below can see a job)
    for j in (b, c, d):
        assert j["state"] == "queued" and j["native_id"] is None, j
        assert j["history"][-1]["info"].startswith(DEPENDENCY_WAIT_INFO)
        assert not _in_slurm(j["name"])  # held by the server, not by Slurm
    gate.touch()
    ja, jb, jc, jd = await _until_final(client, [j["jobid"] for j in (a, b, c, d)])
    assert [j["state"] for j in (ja, jb, jc, jd)] == ["completed"] * 4
    assert _launched_at(jb) > _ended_at(ja) and _launched_at(jc) > _ended_at(ja)
    assert _launched_at(jd) > max(_ended_at(jb), _ended_at(jc))


async def test_a_failed_parent_cancels_its_dependants_on_slurm(client: httpx.AsyncClient) -> None:
    tag = f"depsfail{time.time_ns()}"
    a = await _submit(client, "sleep 1; exit 2", f"{tag}-A")
    b = await _submit(client, "true", f"{tag}-B", [a["jobid"]])
    c = await _submit(client, "true", f"{tag}-C", [b["jobid"]])
    ja, jb, jc = await _until_final(client, [a["jobid"], b["jobid"], c["jobid"]])
    assert ja["state"] == "failed" and ja["exit_code"] == 2
    assert jb["state"] == "canceled" and jb["native_id"] is None
    assert jb["history"][-1]["info"] == f"job {a['jobid']} failed; this job needed it to complete"
    assert jc["state"] == "canceled"
    assert jc["history"][-1]["info"] == f"job {b['jobid']} was canceled; this job needed it to complete"
    assert not _in_slurm(jb["name"]) and not _in_slurm(jc["name"])  # never pending in Slurm
