"""A JobSpec's ``directory`` can never be the server's own: not the prefix (every job's
directory), nothing inside it (another job's files) or above it, and not the index's
directory or one above it (the files routes would serve the SQLite file and its
journal) — even when ``directory_roots`` is wide enough to allow it. The paths are
compared resolved, so a symlink to the prefix is refused too."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from psik_api_server.app import create_app
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def wide(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A server whose directory roots hold its own prefix and index: ``/``, say.

    The index lives in ``state/``, the prefix in ``state/jobs``; ``elsewhere/run`` is
    an ordinary directory inside the roots."""
    (tmp_path / "state").mkdir()
    settings.prefix = tmp_path / "state" / "jobs"
    settings.database = tmp_path / "state" / "index.sqlite"
    settings.directory_roots = [tmp_path]
    (tmp_path / "elsewhere" / "run").mkdir(parents=True)
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        yield http


def _refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 422, (what, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "validation_error"
    assert problem["errors"][0]["loc"] == ["body", "directory"], problem


async def test_the_prefix_the_index_and_what_holds_them_are_refused(
    wide: httpx.AsyncClient, tmp_path: Path
) -> None:
    r = await wide.post("/v1/jobs/new", json={"script": "true"})
    assert r.status_code == 201, r.text
    other = r.json()["jobid"]
    other_work = tmp_path / "state" / "jobs" / other / "work"
    other_work.mkdir(exist_ok=True)
    os.symlink(tmp_path / "state" / "jobs", tmp_path / "elsewhere" / "to-prefix")
    refused = {
        "the prefix": tmp_path / "state" / "jobs",
        "another job's directory": tmp_path / "state" / "jobs" / other,
        "another job's work": other_work,
        "the index's directory": tmp_path / "state",
        "above the prefix and the index": tmp_path,
        "a symlink to the prefix": tmp_path / "elsewhere" / "to-prefix",
        "the prefix, not normalised": tmp_path / "elsewhere" / ".." / "state" / "jobs",
    }
    for route in ("/v1/jobs/new", "/v1/jobs"):
        for what, directory in refused.items():
            _refused(await wide.post(route, json={"script": "true", "directory": str(directory)}), what)
    listed = (await wide.get("/v1/jobs")).json()["items"]
    assert [j["jobid"] for j in listed] == [other]


async def test_the_detail_says_why(wide: httpx.AsyncClient, tmp_path: Path) -> None:
    r = await wide.post(
        "/v1/jobs/new", json={"script": "true", "directory": str(tmp_path / "state" / "jobs")}
    )
    _refused(r, "the prefix")
    assert "job directories" in r.json()["detail"]
    r = await wide.post("/v1/jobs/new", json={"script": "true", "directory": str(tmp_path / "state")})
    _refused(r, "the index's directory")
    assert "index" in r.json()["detail"]


async def test_an_ordinary_directory_in_the_roots_is_still_taken(
    wide: httpx.AsyncClient, tmp_path: Path
) -> None:
    r = await wide.post(
        "/v1/jobs/new", json={"script": "true", "directory": str(tmp_path / "elsewhere" / "run")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["directory"] == str((tmp_path / "elsewhere" / "run").resolve())
