"""Labels (issue 18): a JobSpec's ``labels`` are kept beside psik's spec.json, indexed,
and ``GET /v1/jobs?label=key=value`` (repeatable: AND) finds the jobs in one request, a
page at a time off an index, whatever the number of jobs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from conftest import lazy_app
from psik_api_server.jobs.store import JobStore, page_query
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio


async def _new(c: httpx.AsyncClient, **spec: object) -> dict[str, object]:
    r = await c.post("/v1/jobs/new", json={"script": "true", **spec})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_labels_are_kept_shown_and_found(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        a = await _new(c, labels={"run": "r1", "step": "fit"})
        b = await _new(c, labels={"run": "r1", "step": "plot"})
        other = await _new(c, labels={"run": "r2", "step": "fit"})
        plain = await _new(c)
        assert a["labels"] == {"run": "r1", "step": "fit"}
        got = (await c.get(f"/v1/jobs/{a['jobid']}")).json()
        assert got["labels"] == {"run": "r1", "step": "fit"} == got["spec"]["labels"]
        assert (await c.get(f"/v1/jobs/{plain['jobid']}")).json()["labels"] == {}

        async def ids(*labels: str, **params: object) -> list[object]:
            r = await c.get("/v1/jobs", params={"label": list(labels), **params})
            assert r.status_code == 200, r.text
            return [j["jobid"] for j in r.json()["items"]]

        assert await ids("run=r1") == [b["jobid"], a["jobid"]]  # newest first
        assert await ids("run=r1", "step=fit") == [a["jobid"]]
        assert await ids("step=fit") == [other["jobid"], a["jobid"]]
        assert await ids("run=r3") == []
        assert await ids("run=r1", state="new", name="nope") == []
        # Pages: a cursor goes on where the last page stopped.
        r = await c.get("/v1/jobs", params={"label": "run=r1", "limit": 1})
        first = r.json()
        r = await c.get("/v1/jobs", params={"label": "run=r1", "limit": 1, "cursor": first["next_cursor"]})
        assert [j["jobid"] for j in first["items"] + r.json()["items"]] == [b["jobid"], a["jobid"]]
        assert r.json()["next_cursor"] is None
        # psik's spec.json (which refuses fields it does not know) has none of them.
        spec = json.loads((settings.prefix / str(a["jobid"]) / "spec.json").read_text())
        assert "labels" not in spec


async def test_bad_labels_are_refused_naming_the_field(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for labels, loc in [
            ({"=x": "1"}, ["body", "labels", "=x", "[key]"]),
            ({"x": "a\nb"}, ["body", "labels", "x"]),
            ({"x": "v" * 300}, ["body", "labels", "x"]),
            ({str(i): "v" for i in range(33)}, ["body", "labels"]),
            ({"x": 1}, ["body", "labels", "x"]),
        ]:
            r = await c.post("/v1/jobs/new", json={"script": "true", "labels": labels})
            assert r.status_code == 422, (labels, r.text)
            assert r.json()["errors"][0]["loc"] == loc, r.text
        for bad in ["run", "=r1", "run\n=x", "k=" + "v" * 300]:
            r = await c.get("/v1/jobs", params={"label": bad})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["errors"][0]["loc"] == ["query", "label"]
        assert (await c.get("/v1/jobs")).json()["items"] == []  # nothing was made


async def test_labels_come_back_from_the_job_directories_with_a_new_index(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        a = await _new(c, labels={"run": "r1"})
    assert isinstance(settings.database, Path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{settings.database}{suffix}").unlink(missing_ok=True)
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.get("/v1/jobs", params={"label": "run=r1"})
        assert [j["jobid"] for j in r.json()["items"]] == [a["jobid"]]


async def test_a_job_that_rewrites_its_labels_file_breaks_nothing(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        a = await _new(c, labels={"run": "r1"})
        path = settings.prefix / str(a["jobid"]) / ".psik-api-labels"
        for junk in [b"not json", b'{"=bad": "x"}', b"[1,2]", b"x" * (1 << 20)]:
            path.write_bytes(junk)
            r = await c.get(f"/v1/jobs/{a['jobid']}")
            assert r.status_code == 200 and r.json()["spec"]["labels"] == {}, r.text
        path.unlink()
        path.mkdir()
        assert (await c.get(f"/v1/jobs/{a['jobid']}")).status_code == 200
        # The index keeps what the job was made with.
        r = await c.get("/v1/jobs", params={"label": "run=r1"})
        assert [j["jobid"] for j in r.json()["items"]] == [a["jobid"]]


def test_a_label_filter_reads_a_page_off_the_label_key(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "index.sqlite").open()
    try:
        conn = sqlite3.connect(tmp_path / "index.sqlite")
        for labels in ([("run", "r1")], [("run", "r1"), ("step", "fit")]):
            for after in (None, (5.0, "5.0")):
                sql, args = page_query("alice", [], None, None, [], after, 10, labels)
                plan = " | ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
                assert plan.startswith("SEARCH l USING PRIMARY KEY (owner=? AND key=? AND value="), plan
                assert "TEMP B-TREE" not in plan, plan  # read in page order, not sorted
    finally:
        store.close()


async def test_the_event_stream_filters_by_label(settings: Settings) -> None:
    app = lazy_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        a = await _new(c, labels={"run": "r1"})
        b = await _new(c, labels={"run": "r2"})
        json_ = {"Accept": "application/json"}
        r = await c.get("/v1/events", params={"after": 0, "timeout": 0, "label": "run=r1"}, headers=json_)
        assert r.status_code == 200, r.text
        assert {e["jobid"] for e in r.json()} == {a["jobid"]}
        r = await c.get("/v1/events", params={"after": 0, "timeout": 0}, headers=json_)
        assert {e["jobid"] for e in r.json()} == {a["jobid"], b["jobid"]}
        r = await c.get("/v1/events", params={"after": 0, "timeout": 0, "label": "run"}, headers=json_)
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "label"]
