"""Attacks on the job-file routes, sent as raw HTTP (the bytes of the request line as
written here, through a live uvicorn; no client library to tidy a path first). Each one
must be refused AND leave everything outside the job's working directory as it was:
the job's own directory (spec.json, status.csv, log/) and a sentinel directory beside
the prefix are snapshotted before and compared after.

The original psik_api let an upload named ``../scripts/run`` overwrite the job's run
script, ``files/..`` list the job's directory, and followed symlinks anywhere
(``shared/reference/original.md``)."""

from __future__ import annotations

import dataclasses
import http.client
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from support import LiveServer

pytestmark = pytest.mark.anyio

SECRET = b"SECRET: outside the job\n"

Snapshot = dict[str, tuple[int, int, bytes]]


def snapshot(*dirs: Path, skip: Path | None = None) -> Snapshot:
    """Every file, directory and symlink under ``dirs`` (minus ``skip``): mode, mtime, content."""
    out: Snapshot = {}
    for top in dirs:
        for path in [top, *top.rglob("*")]:
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = path.lstat()
            if path.is_symlink():
                data = os.readlink(path).encode()
            elif path.is_file():
                data = path.read_bytes()
            else:
                data = b""
            out[str(path)] = (st.st_mode, st.st_mtime_ns if not path.is_dir() else 0, data)
    return out


class Raw:
    """One HTTP/1.1 request at a time to a live server, with the target sent verbatim."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def request(
        self, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()


@pytest.fixture
def live(live_app: LiveServer) -> Raw:
    return Raw(live_app.url)


@pytest.fixture
def job(live: Raw, live_app: LiveServer, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A new job (never run), its work directory, and a sentinel directory outside it."""
    status, body, _ = live.request(
        "POST", "/v1/jobs/new", b'{"script": "cat data.txt"}', {"Content-Type": "application/json"}
    )
    assert status == 201, body
    jobid = httpx.Response(200, content=body).json()["jobid"]
    app: Starlette = live_app.server.config.app
    base = app.state.context.settings.prefix.resolve() / jobid
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (outside / "sub").mkdir()
    (outside / "sub" / "f").write_bytes(SECRET)
    yield jobid, base / "work", outside


def _unchanged(base: Path, outside: Path) -> Snapshot:
    return snapshot(base, outside, skip=base / "work")


# ---- the path in the URL ----

TRAVERSALS = [
    # (method, path after /files/, refused with)
    ("GET", "..", 400),
    ("GET", "../spec.json", 400),
    ("GET", ".", 400),
    ("GET", "./spec.json", 400),
    ("GET", "a/../../spec.json", 400),
    ("GET", "%2e%2e/spec.json", 400),
    ("GET", "%2E%2e/spec.json", 400),
    ("GET", "%2E%2e%2fspec.json", 400),
    ("GET", "..%2Fspec.json", 400),
    ("GET", "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", 400),
    ("GET", "/etc/passwd", 400),
    ("GET", "%2Fetc%2Fpasswd", 400),
    ("GET", "spec.json%00", 400),
    ("GET", "%00", 400),
    ("GET", "..%5Cspec.json", 400),
    ("GET", "..\\spec.json", 400),
    ("GET", "a//b", 400),
    ("PUT", "../scripts/run", 400),
    ("PUT", "../spec.json", 400),
    ("PUT", "%2e%2e/spec.json", 400),
    ("PUT", "%2e%2e%2fspec.json", 400),
    ("PUT", "../../../outside/secret", 400),
    ("POST", "../status.csv", 400),
    ("PUT", "..%5Cspec.json", 400),
    ("PUT", "x%00y", 400),
    ("DELETE", "../spec.json", 400),
    ("DELETE", "%2e%2e", 400),
    ("DELETE", "..%2flog", 400),
]


@pytest.mark.parametrize(("method", "path", "status"), TRAVERSALS)
def test_traversal_in_the_url_is_refused(
    live: Raw, job: tuple[str, Path, Path], method: str, path: str, status: int
) -> None:
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    body = b"#!/bin/sh\necho pwned\n" if method in ("PUT", "POST") else None
    got, text, _ = live.request(method, f"/v1/jobs/{jobid}/files/{path}", body)
    assert got == status, text
    assert b'"code": "invalid_path"' in text or b'"code":"invalid_path"' in text, text
    assert b"SECRET" not in text and b"root:" not in text
    assert _unchanged(work.parent, outside) == before


def test_the_listing_of_files_dotdot_is_refused(live: Raw, job: tuple[str, Path, Path]) -> None:
    """The original answered ``files/..`` with the job's own directory."""
    jobid, _work, _outside = job
    for target in ("files/..", "files/../", "files/%2e%2e", "files/%2e%2e/", "files/./.."):
        status, text, _ = live.request("GET", f"/v1/jobs/{jobid}/{target}")
        assert status == 400, (target, text)
        assert b"spec.json" not in text and b"status.csv" not in text


def test_an_absolute_path_to_outside_is_refused(live: Raw, job: tuple[str, Path, Path]) -> None:
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    for method in ("GET", "PUT", "DELETE"):
        body = b"x" if method == "PUT" else None
        target = f"/v1/jobs/{jobid}/files/{outside}/secret"  # .../files//tmp/...: absolute
        status, text, _ = live.request(method, target, body)
        assert status == 400, (method, text)
    assert _unchanged(work.parent, outside) == before


def test_double_encoding_is_decoded_once(live: Raw, job: tuple[str, Path, Path]) -> None:
    """``%252e%252e`` is the name ``%2e%2e``, a file inside the job: never ``..``."""
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    status, text, _ = live.request("GET", f"/v1/jobs/{jobid}/files/%252e%252e/spec.json")
    assert status == 404, text
    status, text, _ = live.request("PUT", f"/v1/jobs/{jobid}/files/%252e%252e%252fspec.json", b"inside")
    assert status == 201, text
    assert (work / "%2e%2e%2fspec.json").read_bytes() == b"inside"
    assert _unchanged(work.parent, outside) == before


# ---- multipart filenames ----


def _form(filename: str, data: bytes = b"#!/bin/sh\necho pwned\n") -> tuple[bytes, str]:
    boundary = "psikapiattackboundary"
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "filename",
    ["../scripts/run", "../spec.json", "/etc/passwd", "a/../../spec.json", "..", ".", "..\\spec.json",
     "a//b", "x\x00y"],
)  # fmt: skip
def test_multipart_filenames_that_lead_out_are_refused(
    live: Raw, job: tuple[str, Path, Path], filename: str
) -> None:
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    work_before = snapshot(work)
    # A good file first: all or nothing, so it must not be kept either.
    good, _ = _form("good.txt", b"fine")
    bad, ctype = _form(filename)
    body = good.rsplit(b"--psikapiattackboundary--", 1)[0] + bad
    status, text, _ = live.request("POST", f"/v1/jobs/{jobid}/files", body, {"Content-Type": ctype})
    assert status == 400, text
    assert b"invalid_path" in text
    assert _unchanged(work.parent, outside) == before
    assert snapshot(work) == work_before


def test_percent_escapes_in_a_multipart_filename_are_not_decoded(
    live: Raw, job: tuple[str, Path, Path]
) -> None:
    """A form's filename is not a URL: ``%2e%2e`` in it is a directory literally named
    so, inside the job's directory (what the docs say), never ``..``."""
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    for filename in ("%2e%2e/spec.json", "%2E%2e%2fspec.json", "..%2fx"):
        body, ctype = _form(filename, b"literal")
        status, text, _ = live.request("POST", f"/v1/jobs/{jobid}/files", body, {"Content-Type": ctype})
        assert status == 201, (filename, text)
        assert httpx.Response(201, content=text).json()[0]["path"] == filename
        assert (work / filename).read_bytes() == b"literal"
    assert _unchanged(work.parent, outside) == before


def test_multipart_dir_parameter_cannot_lead_out(live: Raw, job: tuple[str, Path, Path]) -> None:
    jobid, work, outside = job
    before = _unchanged(work.parent, outside)
    body, ctype = _form("run")
    for into in ("..", "../scripts", "%2e%2e", "/tmp", "a/../.."):
        status, text, _ = live.request(
            "POST", f"/v1/jobs/{jobid}/files?dir={into}", body, {"Content-Type": ctype}
        )
        assert status == 400, (into, text)
    assert _unchanged(work.parent, outside) == before


# ---- symlinks ----


def test_a_symlink_leading_outside_is_not_followed(live: Raw, job: tuple[str, Path, Path]) -> None:
    """A job can make symlinks in its own directory; the server never follows one out:
    reading, writing, listing or deleting through it is refused."""
    jobid, work, outside = job
    (work / "out").symlink_to(outside)
    (work / "passwd").symlink_to(outside / "secret")
    (work / "rel").symlink_to("../../../outside")
    before = _unchanged(work.parent, outside)
    attempts = [
        ("GET", "out/secret", None),
        ("GET", "passwd", None),
        ("GET", "rel/secret", None),
        ("GET", "out", None),
        ("GET", "out/sub", None),
        ("PUT", "out/new", b"pwned"),
        ("PUT", "out/secret", b"pwned"),
        ("PUT", "passwd", b"pwned"),
        ("PUT", "rel/sub/f", b"pwned"),
        ("POST", "out/sub/new/deep", b"pwned"),
        ("DELETE", "out/secret", None),
        ("DELETE", "out/sub", None),
    ]
    for method, path, body in attempts:
        status, text, _ = live.request(method, f"/v1/jobs/{jobid}/files/{path}", body)
        assert status == 403, (method, path, text)
        assert b"SECRET" not in text
    # Through a listing: the links are shown as links, never walked into.
    status, text, _ = live.request("GET", f"/v1/jobs/{jobid}/files?recursive=true")
    assert status == 200, text
    listing = httpx.Response(200, content=text).json()
    assert {e["path"]: e["type"] for e in listing["entries"]} == {
        "out": "symlink", "passwd": "symlink", "rel": "symlink",
    }  # fmt: skip
    # A multipart part through the link.
    body, ctype = _form("out/new")
    status, text, _ = live.request("POST", f"/v1/jobs/{jobid}/files", body, {"Content-Type": ctype})
    assert status == 403, text
    assert _unchanged(work.parent, outside) == before
    # Deleting the link itself is fine: it is the job's, and the target stays.
    status, text, _ = live.request("DELETE", f"/v1/jobs/{jobid}/files/passwd")
    assert status == 204, text
    assert (outside / "secret").read_bytes() == SECRET


def test_a_symlinked_work_directory_is_not_followed(live: Raw, job: tuple[str, Path, Path]) -> None:
    """A job that swaps its whole ``work`` for a symlink to / gets no file served."""
    jobid, work, outside = job
    work.rmdir()
    work.symlink_to(outside)
    before = _unchanged(work.parent, outside)
    for method, path, body in [("GET", "secret", None), ("PUT", "new", b"x"), ("GET", "", None)]:
        status, text, _ = live.request(method, f"/v1/jobs/{jobid}/files/{path}", body)
        assert status == 403, (method, path, text)
        assert b"SECRET" not in text
    assert _unchanged(work.parent, outside) == before


def test_a_rewritten_spec_directory_is_not_served(live: Raw, job: tuple[str, Path, Path]) -> None:
    """The job can rewrite its spec.json; a directory outside the server's roots is refused."""
    jobid, work, outside = job
    spec = work.parent / "spec.json"
    spec.write_text(spec.read_text().replace(str(work), str(outside)))
    before = _unchanged(work.parent, outside)
    for method, path, body in [("GET", "secret", None), ("PUT", "new", b"x"), ("GET", "", None)]:
        status, text, _ = live.request(method, f"/v1/jobs/{jobid}/files/{path}", body)
        assert status == 403, (method, path, text)
        assert b"SECRET" not in text
    assert _unchanged(work.parent, outside) == before


def test_jobspec_directory_outside_the_roots_is_refused(live: Raw, job: tuple[str, Path, Path]) -> None:
    _, _work, outside = job
    body = (f'{{"script": "true", "directory": "{outside}"}}').encode()
    status, text, _ = live.request("POST", "/v1/jobs/new", body, {"Content-Type": "application/json"})
    assert status == 422, text
    assert b"directory" in text


def test_a_symlink_swapped_in_during_requests_never_leads_out(live: Raw, job: tuple[str, Path, Path]) -> None:
    """A thread flips ``work/d`` between a real directory and a symlink to the sentinel
    directory as fast as it can, while requests read ``d/f`` and write ``d/new``: the
    check (realpath) may see the directory and the open the symlink, and the O_NOFOLLOW
    walk of the resolved path must then fail. Nothing outside is ever read or written."""
    jobid, work, outside = job
    (work / "d").mkdir()
    (work / "d" / "f").write_bytes(b"inside\n")
    (outside / "f").write_bytes(SECRET)
    before = _unchanged(work.parent, outside)
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        junk = 0
        d = work / "d"
        while not stop.is_set():
            os.rename(d, work / "d.real")
            try:
                os.symlink(outside, d)
                os.unlink(d)
            except FileExistsError:  # a PUT made its own "d" in the gap: it is set aside below
                pass
            while True:
                try:
                    os.rename(work / "d.real", d)
                    break
                except OSError:
                    junk += 1
                    os.rename(d, work / f"junk.{junk}")
            flips += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 8
        n = 0
        while time.monotonic() < deadline and n < 600:
            n += 1
            status, text, _ = live.request("GET", f"/v1/jobs/{jobid}/files/d/f")
            assert b"SECRET" not in text, "read outside the job through a swapped symlink"
            assert status in (200, 403, 404), text
            seen[status] = seen.get(status, 0) + 1
            status, text, _ = live.request("PUT", f"/v1/jobs/{jobid}/files/d/new", b"pwned")
            assert status in (200, 201, 403, 404, 409), text
            assert not (outside / "new").exists(), "wrote outside the job through a swapped symlink"
    finally:
        stop.set()
        flipper.join()
    assert flips > 100 and seen.get(200, 0) > 0, (flips, seen)
    assert _unchanged(work.parent, outside) == before


# ---- what a web page could send ----


def test_a_text_plain_upload_is_415(live: Raw, job: tuple[str, Path, Path]) -> None:
    jobid, work, _outside = job
    before = snapshot(work)
    for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x"):  # fmt: skip
        for method in ("PUT", "POST"):
            status, text, _ = live.request(
                method, f"/v1/jobs/{jobid}/files/run.sh", b"echo pwned", {"Content-Type": ctype}
            )
            assert status == 415, (ctype, method, text)
    assert snapshot(work) == before


def test_a_multipart_upload_from_a_foreign_origin_is_403(live: Raw, job: tuple[str, Path, Path]) -> None:
    jobid, work, _outside = job
    before = snapshot(work)
    body, ctype = _form("run.sh")
    for origin in ("http://evil.example", "null", "http://localhost:1"):
        status, text, _ = live.request(
            "POST", f"/v1/jobs/{jobid}/files", body, {"Content-Type": ctype, "Origin": origin}
        )
        assert status == 403, (origin, text)
    for method in ("PUT", "POST"):
        status, text, _ = live.request(
            method, f"/v1/jobs/{jobid}/files/run.sh", b"x", {"Origin": "http://evil.example"}
        )
        assert status == 403, text
    assert snapshot(work) == before


def test_the_multipart_route_takes_only_multipart(live: Raw, job: tuple[str, Path, Path]) -> None:
    jobid, work, _ = job
    for ctype in ("application/octet-stream", "text/plain", "application/json"):
        status, text, _ = live.request(
            "POST", f"/v1/jobs/{jobid}/files", b'{"a": 1}', {"Content-Type": ctype}
        )
        assert status == 415, (ctype, text)
    assert list(work.iterdir()) == []


def test_another_users_job_is_not_found(live_app: LiveServer, live: Raw, job: tuple[str, Path, Path]) -> None:
    """A job owned by someone else (in the index) is 404 on every file route."""
    jobid, work, _outside = job
    app: Starlette = live_app.server.config.app
    store = app.state.context.service.store
    row = store.get(jobid)
    store.put(dataclasses.replace(row, owner="mallory"))
    (work / "mine").write_bytes(b"x")
    before = snapshot(work)
    for method, path, body in [("GET", "", None), ("GET", "mine", None), ("PUT", "mine", b"y"),
                               ("DELETE", "mine", None)]:  # fmt: skip
        status, text, _ = live.request(method, f"/v1/jobs/{jobid}/files/{path}", body)
        assert status == 404, (method, text)
    assert snapshot(work) == before


def test_a_symlink_swapped_for_a_directory_mid_resolve_is_a_changed_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """realpath lstat()s a segment, then readlink()s it; a symlink swapped for a
    directory in between made readlink fail with EINVAL, and the upload a 500 (seen once
    in the swap race above). It is the path changing while it was read: like a symlink
    that went, FileNotFoundError (404 for a read, 409 for a write)."""
    import errno

    from psik_api_server.files.paths import Root, resolve

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "d").symlink_to(tmp_path / "elsewhere")

    def swapped(path: object, *args: object, **kwargs: object) -> str:
        raise OSError(errno.EINVAL, "Invalid argument", path)

    monkeypatch.setattr(os, "readlink", swapped)
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):
            resolve(Root(str(tmp_path / "root"), fd), ("d", "new"))
    finally:
        os.close(fd)
