"""JobSpec.directory may only point into the configured roots; `..` and symlinks that
lead outside are refused, and the job runs in the resolved directory."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from psik_api_server.app import create_app
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


async def test_directories_outside_the_roots_are_refused_and_jobs_run_in_the_resolved_one(
    settings: Settings, tmp_path: Path
) -> None:
    root = tmp_path / "allowed"
    (root / "run").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink(root / "run", root / "inside-link")
    settings.directory_roots = [root]
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        for bad in [root / "escape", root / ".." / "outside", tmp_path / "outside", root / "missing", "run"]:
            r = await http.post("/v1/jobs", json={"script": "pwd", "directory": str(bad)})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["errors"][0]["loc"] == ["body", "directory"]
        r = await http.post(
            "/v1/jobs", json={"script": "pwd > where.txt", "directory": str(root / "inside-link")}
        )
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["spec"]["directory"] == str((root / "run").resolve())
        with anyio.fail_after(30):
            while (await http.get(f"/v1/jobs/{job['jobid']}/state")).json()["state"] != "completed":
                await anyio.sleep(0.02)
        assert (root / "run" / "where.txt").read_text().strip() == str((root / "run").resolve())
    assert not list((tmp_path / "outside").iterdir())
