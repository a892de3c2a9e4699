"""``GET /v1/jobs?view=full``: a page of whole jobs (spec and history), so a client that
needs every job of a page as ``GET /v1/jobs/{id}`` has it makes one request, not one per
job (the client's ``wait_all``). The write-only callback fields stay write-only."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


async def test_a_full_page_has_each_job_as_get_has_it_and_no_callback_secrets(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        spec = {
            "script": "true",
            "callback": "http://127.0.0.1:9/hook",
            "cb_secret": "s3cret-never-shown",
            "cb_headers": {"Authorization": "Bearer hidden-token"},
        }
        ids = [(await c.post("/v1/jobs", json={**spec, "name": f"j{i}"})).json()["jobid"] for i in range(3)]
        deadline = time.monotonic() + 30
        while True:
            r = await c.get("/v1/jobs", params={"view": "full", "id": ids})
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            if all(j["state"] == "completed" for j in items) or time.monotonic() > deadline:
                break
        assert sorted(j["jobid"] for j in items) == sorted(ids)
        for item in items:
            single = (await c.get(f"/v1/jobs/{item['jobid']}")).json()
            assert item == single
            assert item["history"] and item["spec"]["script"] == "true"
        assert "s3cret" not in r.text and "hidden-token" not in r.text and "9/hook" not in r.text
        # The default stays the summary.
        plain = (await c.get("/v1/jobs", params={"id": ids})).json()["items"]
        assert all("spec" not in j and "history" not in j for j in plain)


async def test_a_job_whose_directory_is_gone_stays_a_summary(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        jobid = (await c.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        keep = (await c.post("/v1/jobs/new", json={"script": "true"})).json()["jobid"]
        base: Path = settings.prefix / jobid
        for f in base.rglob("*"):
            if f.is_file():
                f.unlink()
        r = await c.get("/v1/jobs", params={"view": "full"})
        items = {j["jobid"]: j for j in r.json()["items"]}
        assert "spec" not in items[jobid] and items[jobid]["state"] == "new"
        assert "spec" in items[keep]
