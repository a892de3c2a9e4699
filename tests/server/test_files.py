"""Job files over HTTP, on the wire (raw httpx, in-process and through a live uvicorn):
the staging flow of the seed README (create, upload, start, read), listings, downloads
with Range/ETag/checksum, atomic uploads (raw and multipart) and their limits, deletes.
The attacks are in test_files_attacks.py."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from conftest import lazy_app
from psik_api_core import Limits
from psik_api_server.files import checksums
from psik_api_server.files import service as files_service
from psik_api_server.http import multipart
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio

FINAL = {"completed", "failed", "canceled"}


@pytest.fixture(params=["inprocess", "live"])
async def wire(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Raw httpx on the app, in-process and through a live uvicorn."""
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


async def _new_job(http: httpx.AsyncClient, script: str = "cat data.txt") -> str:
    r = await http.post("/v1/jobs/new", json={"script": script})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    return jobid


def _work(http: httpx.AsyncClient, jobid: str) -> Path:
    app: Starlette = http.app  # type: ignore[attr-defined]
    prefix: Path = app.state.context.settings.prefix
    return prefix.resolve() / jobid / "work"


async def _wait_final(http: httpx.AsyncClient, jobid: str) -> dict[str, Any]:
    with anyio.fail_after(30):
        while True:
            job: dict[str, Any] = (await http.get(f"/v1/jobs/{jobid}")).json()
            if job["state"] in FINAL:
                return job
            await anyio.sleep(0.02)


def _temps(work: Path) -> list[Path]:
    return [p for p in work.rglob(".psik-upload-*")]


# ---- the staging flow ----


async def test_stage_a_file_then_run_the_job_that_reads_it(wire: httpx.AsyncClient) -> None:
    """The seed README's flow: /jobs/new, upload data.txt, /start, read the output."""
    jobid = await _new_job(wire)
    r = await wire.put(f"/v1/jobs/{jobid}/files/data.txt", content=b"hello from a file\n")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == info["path"] == "data.txt" and info["type"] == "file" and info["size"] == 18
    assert (await wire.post(f"/v1/jobs/{jobid}/start")).status_code == 200
    job = await _wait_final(wire, jobid)
    assert job["state"] == "completed", job
    assert (await wire.get(f"/v1/jobs/{jobid}/logs")).json()["stdout.1"] == "hello from a file\n"


async def test_curl_upload_file_is_a_post_to_the_file_path(wire: httpx.AsyncClient) -> None:
    """``curl -X POST --upload-file data.txt .../files/`` sends the raw body, no type."""
    jobid = await _new_job(wire)
    r = await wire.post(f"/v1/jobs/{jobid}/files/data.txt", content=b"one")
    assert r.status_code == 201, r.text
    r = await wire.post(
        f"/v1/jobs/{jobid}/files/data.txt",
        content=b"two",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text  # replaced
    assert (_work(wire, jobid) / "data.txt").read_bytes() == b"two"
    r = await wire.put(f"/v1/jobs/{jobid}/files/", content=b"x")
    assert r.status_code == 400 and r.json()["code"] == "invalid_path"


async def test_uploads_make_parents_and_are_the_owners_alone(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    r = await wire.put(f"/v1/jobs/{jobid}/files/in/puts/a.csv", content=b"1,2\n")
    assert r.status_code == 201, r.text
    assert r.json()["path"] == "in/puts/a.csv"
    work = _work(wire, jobid)
    assert stat.S_IMODE((work / "in/puts/a.csv").stat().st_mode) == 0o600
    assert stat.S_IMODE((work / "in").stat().st_mode) == 0o700
    assert stat.S_IMODE((work / "in/puts").stat().st_mode) == 0o700
    assert _temps(work) == []


# ---- listing ----


async def test_listing(wire: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    jobid = await _new_job(wire)
    for path in ("b.txt", "a/x.txt", "a/y/z.txt", "a.txt"):
        assert (await wire.put(f"/v1/jobs/{jobid}/files/{path}", content=path.encode())).status_code == 201
    (_work(wire, jobid) / "link").symlink_to("a")

    r = await wire.get(f"/v1/jobs/{jobid}/files")
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["path"] == "" and listing["truncated"] is False
    assert [(e["path"], e["type"]) for e in listing["entries"]] == [
        ("a", "dir"), ("a.txt", "file"), ("b.txt", "file"), ("link", "symlink"),
    ]  # fmt: skip
    assert listing["entries"][1]["size"] == 5 and listing["entries"][0]["size"] == 0

    assert r.headers["x-file-type"] == "dir"  # a listing says so: a client never saves one as a file
    r = await wire.get(f"/v1/jobs/{jobid}/files/a/", params={"recursive": "true"})
    assert [e["path"] for e in r.json()["entries"]] == ["a/x.txt", "a/y", "a/y/z.txt"]
    assert r.headers["x-file-type"] == "dir"
    r = await wire.get(f"/v1/jobs/{jobid}/files/a/x.txt")
    assert r.content == b"a/x.txt" and r.headers["x-file-type"] == "file"
    # A symlink inside the job leading inside it is followed when asked for by name.
    r = await wire.get(f"/v1/jobs/{jobid}/files/link")
    assert [e["path"] for e in r.json()["entries"]] == ["link/x.txt", "link/y"]
    r = await wire.get(f"/v1/jobs/{jobid}/files/link/y/z.txt")
    assert r.content == b"a/y/z.txt"

    r = await wire.get(f"/v1/jobs/{jobid}/files", params={"recursive": "true"})
    assert [e["path"] for e in r.json()["entries"]] == [
        "a", "a.txt", "a/x.txt", "a/y", "a/y/z.txt", "b.txt", "link",
    ]  # fmt: skip

    monkeypatch.setattr(files_service, "LIMITS", Limits(max_list_entries=3))
    r = await wire.get(f"/v1/jobs/{jobid}/files", params={"recursive": "true"})
    assert r.json()["truncated"] is True and len(r.json()["entries"]) == 3

    assert (await wire.get(f"/v1/jobs/{jobid}/files/nope")).status_code == 404
    assert (await wire.get(f"/v1/jobs/{jobid}/files", params={"recursive": "maybe"})).status_code == 422
    assert (await wire.get(f"/v1/jobs/{jobid}/files", params={"x": "1"})).status_code == 422
    assert (await wire.get("/v1/jobs/1.1/files")).status_code == 404


async def test_an_upload_left_by_a_killed_server_is_neither_listed_nor_reachable(
    wire: httpx.AsyncClient,
) -> None:
    """A server killed mid-upload leaves its temp file; it showed in listings (hostile
    test of issue 8, F7) and could be read or written by name."""
    jobid = await _new_job(wire)
    work = _work(wire, jobid)
    (work / ".psik-upload-0123456789abcdef").write_bytes(b"half an upload")
    (work / "kept.txt").write_bytes(b"a file")
    names = [f["path"] for f in (await wire.get(f"/v1/jobs/{jobid}/files")).json()["entries"]]
    assert names == ["kept.txt"]
    for method in ("GET", "PUT", "DELETE"):
        body = (
            {"content": b"x", "headers": {"Content-Type": "application/octet-stream"}}
            if method == "PUT"
            else {}
        )
        r = await wire.request(method, f"/v1/jobs/{jobid}/files/.psik-upload-0123456789abcdef", **body)  # type: ignore[arg-type]
        assert r.status_code == 400 and r.json()["code"] == "invalid_path", (method, r.text)
    assert (work / ".psik-upload-0123456789abcdef").read_bytes() == b"half an upload"


async def test_a_trailing_slash_names_a_directory(wire: httpx.AsyncClient) -> None:
    """``a.txt/`` is no file's path (as in POSIX: ENOTDIR): 400 ``invalid_path`` for
    every method, and nothing is written or removed; a directory takes one."""
    jobid = await _new_job(wire)
    work = _work(wire, jobid)
    await wire.put(f"/v1/jobs/{jobid}/files/d/a.txt", content=b"a")
    base = f"/v1/jobs/{jobid}/files"

    def refused(r: httpx.Response) -> None:
        assert r.status_code == 400, r.text
        problem = r.json()
        assert problem["code"] == "invalid_path" and "'/'" in problem["detail"], problem

    refused(await wire.get(f"{base}/d/a.txt/"))
    assert (await wire.head(f"{base}/d/a.txt/")).status_code == 400
    refused(await wire.put(f"{base}/d/a.txt/", content=b"x"))
    refused(await wire.put(f"{base}/d/new/", content=b"x"))
    refused(
        await wire.post(f"{base}/d/new/", content=b"x", headers={"Content-Type": "application/octet-stream"})
    )
    refused(await wire.delete(f"{base}/d/a.txt/"))
    r = await wire.post(base, files=[("files", ("good.txt", b"g")), ("files", ("sub/", b"x"))])
    refused(r)
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == ["d", "d/a.txt"]
    assert (work / "d" / "a.txt").read_bytes() == b"a"
    r = await wire.get(f"{base}/d/")
    assert r.status_code == 200 and [e["path"] for e in r.json()["entries"]] == ["d/a.txt"]
    assert (await wire.get(f"{base}/d/a.txt")).content == b"a"
    assert (await wire.delete(f"{base}/d/", params={"recursive": "true"})).status_code == 204
    assert list(work.iterdir()) == []


# ---- downloads ----


async def test_download_headers_ranges_and_validators(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    data = bytes(range(256)) * 40  # 10240 bytes
    await wire.put(f"/v1/jobs/{jobid}/files/out.bin", content=data)
    url = f"/v1/jobs/{jobid}/files/out.bin"

    r = await wire.get(url)
    assert r.status_code == 200 and r.content == data
    h = r.headers
    assert h["content-type"] == "application/octet-stream"
    assert h["content-length"] == str(len(data)) and h["accept-ranges"] == "bytes"
    assert h["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
    etag = h["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert h["last-modified"].endswith("GMT")

    for spec, first, last in (("bytes=10-19", 10, 19), ("bytes=10240-", None, None),
                              ("bytes=10000-", 10000, 10239), ("bytes=-100", 10140, 10239),
                              ("bytes=0-999999", 0, 10239), ("bytes=-999999", 0, 10239)):  # fmt: skip
        r = await wire.get(url, headers={"Range": spec})
        if first is None:
            assert r.status_code == 416, spec
            assert r.headers["content-range"] == f"bytes */{len(data)}"
            assert r.json()["code"] == "range_not_satisfiable"
            continue
        assert r.status_code == 206, (spec, r.text)
        assert last is not None
        assert r.content == data[first : last + 1], spec
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
        assert r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
    # Several ranges, or a malformed one: the whole file.
    for spec in ("bytes=0-1,5-6", "lines=1-2", "bytes=x-y", "bytes=5-2"):
        r = await wire.get(url, headers={"Range": spec})
        assert r.status_code == 200 and r.content == data, spec

    r = await wire.get(url, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[5:10]
    r = await wire.get(url, headers={"Range": "bytes=5-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = await wire.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag

    r = await wire.head(url)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(data)) and r.headers["etag"] == etag
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()

    # A new version: a new ETag and checksum.
    await wire.put(url, content=b"v2")
    r = await wire.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.content == b"v2" and r.headers["etag"] != etag
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(b"v2").hexdigest()


async def test_a_file_the_job_wrote_has_its_checksum(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire, "head -c 300000 /dev/urandom > out.bin")
    assert (await wire.post(f"/v1/jobs/{jobid}/start")).status_code == 200
    assert (await _wait_final(wire, jobid))["state"] == "completed"
    data = (_work(wire, jobid) / "out.bin").read_bytes()
    r = await wire.get(f"/v1/jobs/{jobid}/files/out.bin")
    assert r.content == data and r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()


# ---- uploads: atomic, bounded ----


async def test_if_none_match_star_never_overwrites(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    url = f"/v1/jobs/{jobid}/files/keep.txt"
    r = await wire.put(url, content=b"first", headers={"If-None-Match": "*"})
    assert r.status_code == 201, r.text
    r = await wire.put(url, content=b"second", headers={"If-None-Match": "*"})
    assert r.status_code == 412 and r.json()["code"] == "precondition_failed"
    assert (_work(wire, jobid) / "keep.txt").read_bytes() == b"first"
    assert _temps(_work(wire, jobid)) == []


async def test_if_match_and_if_none_match_with_etags(wire: httpx.AsyncClient) -> None:
    """RFC 9110 13.1.1/13.1.2 on PUT: If-Match (strong) must match the current file's
    ETag, and a missing file matches none (nor ``*``); If-None-Match must not."""
    jobid = await _new_job(wire)
    url = f"/v1/jobs/{jobid}/files/f.txt"
    work = _work(wire, jobid)
    await wire.put(url, content=b"v1")
    etag = (await wire.head(url)).headers["etag"]

    def refused(r: httpx.Response) -> None:
        assert r.status_code == 412 and r.json()["code"] == "precondition_failed", r.text
        assert r.headers["content-type"] == "application/problem+json"

    refused(await wire.put(url, content=b"x", headers={"If-Match": '"stale"'}))
    refused(await wire.put(url, content=b"x", headers={"If-Match": "W/" + etag}))  # weak never matches
    refused(await wire.put(url, content=b"x", headers={"If-None-Match": etag}))
    refused(await wire.put(url, content=b"x", headers={"If-None-Match": f'"other", W/{etag}'}))
    refused(await wire.post(url, content=b"x", headers={"If-Match": '"stale"'}))
    assert (work / "f.txt").read_bytes() == b"v1"
    r = await wire.put(url, content=b"v2", headers={"If-Match": f'"other", {etag}'})
    assert r.status_code == 200, r.text
    assert (work / "f.txt").read_bytes() == b"v2"
    refused(await wire.put(url, content=b"v3", headers={"If-Match": etag}))  # that was v1's
    r = await wire.put(url, content=b"v3", headers={"If-Match": "*", "If-None-Match": '"other"'})
    assert r.status_code == 200, r.text
    # A missing file: If-Match (even *) fails, and nothing is made on the way.
    for value in ('"any"', "*"):
        refused(
            await wire.put(f"/v1/jobs/{jobid}/files/new/dir/g", content=b"x", headers={"If-Match": value})
        )
    assert not (work / "new").exists()
    r = await wire.put(f"/v1/jobs/{jobid}/files/g", content=b"g", headers={"If-None-Match": etag})
    assert r.status_code == 201, r.text
    assert _temps(work) == []


async def test_if_match_is_checked_again_when_the_upload_is_complete(wire: httpx.AsyncClient) -> None:
    """A PUT with If-Match whose file is replaced while its body is under way fails
    (412) rather than overwrite what the other request wrote."""
    jobid = await _new_job(wire)
    url = f"/v1/jobs/{jobid}/files/f.txt"
    await wire.put(url, content=b"v1")
    etag = (await wire.head(url)).headers["etag"]
    sent_half, go_on = anyio.Event(), anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"mine " * 1000
        sent_half.set()
        await go_on.wait()
        yield b"end"

    async def guarded() -> httpx.Response:
        return await wire.put(url, content=slow(), headers={"If-Match": etag})

    results: list[httpx.Response] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _append(results, guarded()))
            await sent_half.wait()
            await anyio.sleep(0.2)  # the first bytes are written to its temp file
            assert (await wire.put(url, content=b"theirs")).status_code == 200
            go_on.set()
    assert results[0].status_code == 412, results[0].text
    assert (_work(wire, jobid) / "f.txt").read_bytes() == b"theirs"
    assert _temps(_work(wire, jobid)) == []


async def _append(results: list[httpx.Response], request: Any) -> None:
    results.append(await request)


async def test_writing_onto_a_directory_or_through_a_file_is_409(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    await wire.put(f"/v1/jobs/{jobid}/files/d/f", content=b"x")
    r = await wire.put(f"/v1/jobs/{jobid}/files/d", content=b"x")
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    r = await wire.put(f"/v1/jobs/{jobid}/files/d/f/g", content=b"x")
    assert r.status_code == 409, r.text
    assert _temps(_work(wire, jobid)) == []


@pytest.fixture
async def small(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The in-process app with a 1000-byte upload limit."""
    app = lazy_app(settings.model_copy(update={"max_upload_bytes": 1000}))
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


async def test_an_upload_over_the_limit_is_413_and_leaves_nothing(small: httpx.AsyncClient) -> None:
    jobid = await _new_job(small)
    url = f"/v1/jobs/{jobid}/files/big"
    r = await small.put(url, content=b"x" * 1001)  # declared too large
    assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]

    async def undeclared() -> AsyncIterator[bytes]:  # chunked: found while streaming
        for _ in range(10):
            yield b"y" * 300

    r = await small.put(url, content=undeclared())
    assert r.status_code == 413, r.text
    work = _work(small, jobid)
    assert not (work / "big").exists() and _temps(work) == []
    assert (await small.put(url, content=b"z" * 1000)).status_code == 201


async def test_a_cut_off_upload_leaves_nothing(live_app: LiveServer) -> None:
    """The client dies half-way: no file, no temp file."""
    async with httpx.AsyncClient(base_url=live_app.url) as http:
        http.app = live_app.server.config.app  # type: ignore[attr-defined]
        jobid = await _new_job(http)
        work = _work(http, jobid)
        host, port = live_app.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                f"PUT /v1/jobs/{jobid}/files/half.bin HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Length: 1000000\r\n\r\n".encode()
                + b"h" * 300_000
            )
            with anyio.fail_after(10):
                while not _temps(work):  # the upload is under way
                    await anyio.sleep(0.01)
        with anyio.fail_after(10):
            while _temps(work):
                await anyio.sleep(0.02)
        assert not (work / "half.bin").exists()
        assert (await http.get(f"/v1/jobs/{jobid}/files/half.bin")).status_code == 404


# ---- multipart ----


async def test_multipart_writes_each_part_named_files(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    files = [("files", ("a.txt", b"A")), ("files", ("sub/b.txt", b"B")), ("other", ("c.txt", b"C"))]
    r = await wire.post(f"/v1/jobs/{jobid}/files", files=files, data={"note": "ignored"})
    assert r.status_code == 201, r.text
    assert [i["path"] for i in r.json()] == ["a.txt", "sub/b.txt"]
    work = _work(wire, jobid)
    assert (work / "a.txt").read_bytes() == b"A" and (work / "sub/b.txt").read_bytes() == b"B"
    assert not (work / "c.txt").exists()
    assert stat.S_IMODE((work / "a.txt").stat().st_mode) == 0o600
    r = await wire.post(f"/v1/jobs/{jobid}/files", params={"dir": "in"}, files=[("files", ("x", b"X"))])
    assert r.status_code == 201 and r.json()[0]["path"] == "in/x"
    assert (work / "in/x").read_bytes() == b"X"
    r = await wire.get(f"/v1/jobs/{jobid}/files/in/x")
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(b"X").hexdigest()


async def test_multipart_is_all_or_nothing(wire: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    jobid = await _new_job(wire)
    work = _work(wire, jobid)
    await wire.put(f"/v1/jobs/{jobid}/files/old.txt", content=b"original")
    await wire.put(f"/v1/jobs/{jobid}/files/dir/f", content=b"f")
    before = sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in work.rglob("*"))
    # The last part cannot be written (a directory is there): the others are taken back,
    # the file one of them replaced is restored.
    files = [("files", ("old.txt", b"replaced")), ("files", ("new.txt", b"new")), ("files", ("dir", b"x"))]
    r = await wire.post(f"/v1/jobs/{jobid}/files", files=files)
    assert r.status_code == 409, r.text
    # Too many parts.
    monkeypatch.setattr(multipart, "LIMITS", Limits(max_upload_files=2))
    files = [("files", (f"n{i}", b"n")) for i in range(3)]
    r = await wire.post(f"/v1/jobs/{jobid}/files", files=files)
    assert r.status_code == 413 and "2 parts" in r.json()["detail"], r.text
    # The same name twice; no filename; no files part at all; a cut body.
    files = [("files", ("twice", b"1")), ("files", ("twice", b"2"))]
    assert (await wire.post(f"/v1/jobs/{jobid}/files", files=files)).status_code == 400
    r = await wire.post(
        f"/v1/jobs/{jobid}/files",
        content=b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nx\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400, r.text
    r = await wire.post(f"/v1/jobs/{jobid}/files", data={"a": "b"}, files=[("x", ("y", b"z"))])
    assert r.status_code == 400, r.text
    r = await wire.post(
        f"/v1/jobs/{jobid}/files",
        content=b'--b\r\nContent-Disposition: form-data; name="files"; filename="cut"\r\n\r\nxx',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400, r.text
    r = await wire.post(
        f"/v1/jobs/{jobid}/files", content=b"x", headers={"Content-Type": "multipart/form-data"}
    )
    assert r.status_code == 400, r.text  # no boundary
    after = sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in work.rglob("*"))
    assert after == before


async def test_multipart_over_the_size_limit(small: httpx.AsyncClient) -> None:
    jobid = await _new_job(small)
    files = [("files", ("a", b"a" * 600)), ("files", ("b", b"b" * 600))]
    r = await small.post(f"/v1/jobs/{jobid}/files", files=files)
    assert r.status_code == 413, r.text
    assert list(_work(small, jobid).iterdir()) == []


async def test_a_refused_upload_takes_back_the_directories_it_made(small: httpx.AsyncClient) -> None:
    """413, 409 and 400 after the upload made missing parents: the ones it made go,
    those that were there (and one another upload put a file in) stay."""
    jobid = await _new_job(small)
    work = _work(small, jobid)
    await small.put(f"/v1/jobs/{jobid}/files/kept/there.txt", content=b"x")
    await small.put(f"/v1/jobs/{jobid}/files/adir/f", content=b"x")
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))

    r = await small.put(f"/v1/jobs/{jobid}/files/new/deeper/big", content=b"x" * 1001)
    assert r.status_code == 413, r.text

    async def undeclared() -> AsyncIterator[bytes]:  # found too large while streaming
        for _ in range(10):
            yield b"y" * 300

    r = await small.put(f"/v1/jobs/{jobid}/files/kept/new/deeper/big", content=undeclared())
    assert r.status_code == 413, r.text
    # multipart: a later part is refused after an earlier one made its parents
    for refused, status in (("adir", 409), ("../out", 400), ("kept/there.txt/x", 409)):
        files = [
            ("files", ("m1/m2/a.txt", b"A")),
            ("files", ("kept/n/b.txt", b"B")),
            ("files", (refused, b"C")),
        ]
        r = await small.post(f"/v1/jobs/{jobid}/files", files=files)
        assert r.status_code == status, (refused, r.text)
    r = await small.post(
        f"/v1/jobs/{jobid}/files", files=[("files", ("m1/a", b"a" * 600)), ("files", ("b", b"b" * 600))]
    )
    assert r.status_code == 413, r.text
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before


# ---- delete ----


async def test_delete(wire: httpx.AsyncClient) -> None:
    jobid = await _new_job(wire)
    await wire.put(f"/v1/jobs/{jobid}/files/d/e/f", content=b"x")
    await wire.put(f"/v1/jobs/{jobid}/files/g", content=b"x")
    assert (await wire.delete(f"/v1/jobs/{jobid}/files/g")).status_code == 204
    assert (await wire.delete(f"/v1/jobs/{jobid}/files/g")).status_code == 404
    r = await wire.delete(f"/v1/jobs/{jobid}/files/d")
    assert r.status_code == 409 and "recursive" in r.json()["detail"]
    assert (await wire.delete(f"/v1/jobs/{jobid}/files/d", params={"recursive": "true"})).status_code == 204
    assert list(_work(wire, jobid).iterdir()) == []
    assert (await wire.delete(f"/v1/jobs/{jobid}/files/")).status_code == 409


# ---- a 50 MB file through a server process: bounded memory ----


def _rss_kib(pid: int, what: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{what}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {what}")


def _reset_peak(pid: int) -> int:
    """Start a new peak-RSS measurement (Linux: ``5 > clear_refs``); the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _rss_kib(pid, "VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_50mb_upload_and_download_stream_in_bounded_memory(tmp_path: Path) -> None:
    """Through a `psik-api-server serve` process: its peak RSS grows by a few MiB, not by
    the file's 50 MB, while a 50 MB file is uploaded and while it is downloaded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV"}}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    server = Path(sys.executable).parent / "psik-api-server"
    proc = subprocess.Popen([str(server), "serve", "--port", str(port)], env=env)
    size = 50 * 1000 * 1000
    block = os.urandom(1 << 20)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            jobid = http.post("/v1/jobs/new", json={"script": "true"}).json()["jobid"]
            http.put(f"/v1/jobs/{jobid}/files/warm", content=b"w" * 3_000_000)
            http.get(f"/v1/jobs/{jobid}/files/warm").read()
            base = _reset_peak(proc.pid)

            digest = hashlib.sha256()

            def body() -> Any:
                sent = 0
                while sent < size:
                    part = block[: min(len(block), size - sent)]
                    digest.update(part)
                    sent += len(part)
                    yield part

            r = http.put(f"/v1/jobs/{jobid}/files/big.bin", content=body())
            assert r.status_code == 201, r.text
            up = _rss_kib(proc.pid) - base
            base_down = _reset_peak(proc.pid)

            got = hashlib.sha256()
            n = 0
            with http.stream("GET", f"/v1/jobs/{jobid}/files/big.bin") as r:
                assert r.status_code == 200
                assert r.headers["x-checksum-sha256"] == digest.hexdigest()
                for chunk in r.iter_raw():
                    got.update(chunk)
                    n += len(chunk)
            down = _rss_kib(proc.pid) - base_down
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert n == size and got.hexdigest() == digest.hexdigest()
    print(f"\npeak RSS {base} KiB before; +{up} KiB during a 50 MB upload, +{down} KiB during its download")
    assert up < 16 * 1024 and down < 16 * 1024, (base, up, down)


# ---- the checksum never holds a download back ----


def _slow_checksums(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[int]]:
    """Make hashing wait for an event (as a huge file, or a starved disk, would): the
    release, and the sizes of the files hashed."""
    release = threading.Event()
    hashed: list[int] = []
    original = checksums.ChecksumCache.checksum

    def slow(self: checksums.ChecksumCache, fd: int, st: os.stat_result) -> str:
        hashed.append(st.st_size)
        release.wait(30)
        return original(self, fd, st)

    monkeypatch.setattr(checksums.ChecksumCache, "checksum", slow)
    return release, hashed


async def test_the_first_byte_of_a_large_file_never_waits_for_its_checksum(
    live_app: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file not hashed yet (the job wrote it) is sent at once, without
    X-Checksum-Sha256, by 20 downloads at the same time; it is hashed once, in the
    background, and the downloads after that carry the checksum."""
    release, hashed = _slow_checksums(monkeypatch)
    async with httpx.AsyncClient(base_url=live_app.url, timeout=30) as http:
        http.app = live_app.server.config.app  # type: ignore[attr-defined]
        jobid = await _new_job(http)
        work = _work(http, jobid)
        work.mkdir(exist_ok=True)
        data = os.urandom(4 << 20)
        (work / "big.bin").write_bytes(data)
        url = f"/v1/jobs/{jobid}/files/big.bin"

        async def first_bytes() -> None:
            async with http.stream("GET", url) as r:
                assert r.status_code == 200
                assert "x-checksum-sha256" not in r.headers
                async for chunk in r.aiter_raw():
                    assert chunk == data[: len(chunk)]
                    break

        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as group:
                    for _ in range(20):
                        group.start_soon(first_bytes)
            r = await http.get(url, headers={"Range": "bytes=0-9"})  # never hashed for a range
            assert r.status_code == 206 and "x-checksum-sha256" not in r.headers
        finally:
            release.set()
        with anyio.fail_after(10):
            while "x-checksum-sha256" not in (r := await http.get(url)).headers:
                await anyio.sleep(0.02)
        assert r.content == data and r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
        assert hashed == [len(data)]  # once, for 20 downloads


async def test_a_small_file_is_hashed_at_once(live_app: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_app.url, timeout=30) as http:
        http.app = live_app.server.config.app  # type: ignore[attr-defined]
        jobid = await _new_job(http)
        work = _work(http, jobid)
        work.mkdir(exist_ok=True)
        data = os.urandom(files_service.HASH_AT_ONCE_MAX)
        (work / "small.bin").write_bytes(data)
        r = await http.get(f"/v1/jobs/{jobid}/files/small.bin")
        assert r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
