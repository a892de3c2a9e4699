"""Edges of the file routes that generated clients and jobs reach (issue 14): a path sent
percent-encoded (how an OpenAPI-generated client sends ``inputs/a.csv``) is the path the
schema promises, every check applied after decoding; a UNIX socket in a job's directory
is not a file to read (404, as a FIFO), never a 500."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from conftest import lazy_app
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["inprocess", "live"])
async def wire(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Raw httpx on the app, in-process and through a live uvicorn (which passes the
    path as sent in ``raw_path``; httpx sends a ``%2F`` as written)."""
    app = lazy_app(settings)
    if request.param == "inprocess":
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client
    else:
        with LiveServer(app) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                client.app = app  # type: ignore[attr-defined]
                yield client


async def _new_job(http: httpx.AsyncClient) -> tuple[str, Path]:
    r = await http.post("/v1/jobs/new", json={"script": "true"})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    app: Starlette = http.app  # type: ignore[attr-defined]
    return jobid, app.state.context.settings.prefix.resolve() / jobid / "work"


# ---- percent-encoded paths ----


async def test_an_encoded_slash_is_a_separator_as_the_schema_says(wire: httpx.AsyncClient) -> None:
    jobid, work = await _new_job(wire)
    r = await wire.put(f"/v1/jobs/{jobid}/files/inputs%2Fa.csv", content=b"1,2\n")
    assert r.status_code == 201, r.text
    assert r.json()["path"] == "inputs/a.csv"
    assert (work / "inputs" / "a.csv").read_bytes() == b"1,2\n"
    for path in ("inputs%2Fa.csv", "inputs/a.csv", "inputs%2fa.csv", "%69nputs%2Fa.csv"):
        r = await wire.get(f"/v1/jobs/{jobid}/files/{path}")
        assert r.status_code == 200 and r.content == b"1,2\n", (path, r.text)
    r = await wire.get(f"/v1/jobs/{jobid}/files/inputs%2F")
    assert r.status_code == 200 and [e["path"] for e in r.json()["entries"]] == ["inputs/a.csv"]
    r = await wire.delete(f"/v1/jobs/{jobid}/files/inputs%2Fa.csv")
    assert r.status_code == 204, r.text
    assert not (work / "inputs" / "a.csv").exists()


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("..%2F..%2Fetc%2Fpasswd", "'..' segment"),
        ("inputs%2F..%2F..%2Fspec.json", "'..' segment"),
        ("%2e%2e%2Fspec.json", "'..' segment"),
        ("%2Fetc%2Fpasswd", "absolute"),
        ("a%2F%2Fb", "empty segment"),
        ("a%2F.%2Fb", "'.' segment"),
        ("a%00b", "NUL"),
        ("a%5Cb", "backslash"),
        ("..%5Cspec.json", "backslash"),
    ],
)
async def test_every_check_applies_after_decoding(wire: httpx.AsyncClient, path: str, why: str) -> None:
    jobid, work = await _new_job(wire)
    for method in ("GET", "PUT", "DELETE"):
        r = await wire.request(
            method, f"/v1/jobs/{jobid}/files/{path}", content=b"x" if method == "PUT" else None
        )
        assert r.status_code == 400, (method, path, r.text)
        problem = r.json()
        assert problem["code"] == "invalid_path" and why in problem["detail"], problem
        assert problem["errors"][0]["loc"] == ["path", "path"]
    assert not work.exists() or list(work.iterdir()) == []


async def test_a_double_encoded_slash_is_decoded_once_into_a_name(wire: httpx.AsyncClient) -> None:
    """``%252F`` is ``%2F`` once decoded: three characters of one name, not a separator."""
    jobid, work = await _new_job(wire)
    r = await wire.put(f"/v1/jobs/{jobid}/files/a%252Fb", content=b"x")
    assert r.status_code == 201, r.text
    assert r.json()["path"] == "a%2Fb"
    assert [p.name for p in work.iterdir()] == ["a%2Fb"]
    assert (await wire.get(f"/v1/jobs/{jobid}/files/a%252Fb")).content == b"x"
    assert (await wire.get(f"/v1/jobs/{jobid}/files/a%2Fb")).status_code == 404


async def test_an_encoded_slash_in_the_job_id_is_no_route_to_a_file(wire: httpx.AsyncClient) -> None:
    """The route is matched on the decoded path: ``{jobid}%2Ffiles%2Fx`` must not reach
    another job's files by a split of the path the client did not send."""
    jobid, _ = await _new_job(wire)
    r = await wire.get(f"/v1/jobs/{jobid}%2Ffiles%2Fx")
    assert r.status_code in {400, 404}, r.text
    assert r.headers["content-type"] == "application/problem+json"


# ---- a UNIX socket in the job's directory ----


async def test_a_unix_socket_file_is_not_found_as_a_fifo_is(wire: httpx.AsyncClient) -> None:
    jobid, work = await _new_job(wire)
    assert (await wire.put(f"/v1/jobs/{jobid}/files/keep.txt", content=b"k")).status_code == 201
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(work / "sock"))  # as a job's own server would
        s.listen(1)
        for method in ("GET", "HEAD"):
            r = await wire.request(method, f"/v1/jobs/{jobid}/files/sock")
            assert r.status_code == 404, (method, r.status_code, r.text)
            if method == "GET":
                assert r.json()["code"] == "not_found" and "not a regular file" in r.json()["detail"]
        listing = (await wire.get(f"/v1/jobs/{jobid}/files/")).json()["entries"]
        assert {e["name"]: e["type"] for e in listing} == {"keep.txt": "file", "sock": "other"}


@pytest.mark.parametrize("path", ["%0A", "a%0A", "a%0D", "a%09b", "a%7F", "a%1B%2Fb"])
async def test_a_control_character_in_a_path_is_refused_saying_so(wire: httpx.AsyncClient, path: str) -> None:
    """The schema says so; before, a trailing newline (``%0A``) made the route match an
    empty path and the answer blamed an encoded separator. (A newline inside the path,
    ``a%0Ab``, matches no route at all: 404 from the router, before any file route.)"""
    jobid, work = await _new_job(wire)
    for method in ("GET", "PUT", "DELETE"):
        body = b"x" if method == "PUT" else None
        r = await wire.request(method, f"/v1/jobs/{jobid}/files/{path}", content=body)
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        assert r.json()["code"] == "invalid_path" and "control character" in r.json()["detail"], r.text
    assert not work.exists() or list(work.iterdir()) == []


# ---- names a job's program made that no path can carry ----


async def test_names_no_path_can_carry_are_left_out_of_listings_and_counted(wire: httpx.AsyncClient) -> None:
    """A job's program may make any name: bytes that are not UTF-8 (JSON cannot carry
    them: a 500 before) and control characters (listed, yet every path naming them is
    refused). Listings leave them out and say how many."""
    jobid, work = await _new_job(wire)
    work.mkdir(parents=True, exist_ok=True)
    (work / "good.txt").write_bytes(b"ok")
    for raw in (b"bad\xff.txt", b"new\nline", b"tab\tbed", b"back\\slash"):
        (work / os.fsdecode(raw)).write_bytes(b"x")
    sub = work / os.fsdecode(b"dir\xfe")
    sub.mkdir()
    (sub / "inner.txt").write_bytes(b"y")
    r = await wire.get(f"/v1/jobs/{jobid}/files")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert [e["path"] for e in listing["entries"]] == ["good.txt"]
    assert listing["unlisted"] == 5
    r = await wire.get(f"/v1/jobs/{jobid}/files", params={"recursive": "true"})
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()["entries"]] == ["good.txt"] and r.json()["unlisted"] == 5
