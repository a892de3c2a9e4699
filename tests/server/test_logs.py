"""Job logs over HTTP: ``GET /v1/jobs/{id}/logs`` ({name: text}, bounded, never a 500 on
binary output) and ``GET /v1/jobs/{id}/logs/{name}`` (raw bytes, ``offset``, ``tail``,
``follow=true`` streaming until the job is final), with real local jobs.

A log name never reaches a path unless it is one psik writes, and a log a job replaced
with a symlink (to some other file the server's user can read) is never followed."""

from __future__ import annotations

import gc
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from starlette.applications import Starlette

from conftest import lazy_app
from psik_api_core import LIMITS, LOCAL_USER, Principal, ProblemCode
from psik_api_server.errors import ApiError
from psik_api_server.http import logs as routes_logs
from psik_api_server.jobs import logs as joblogs
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio

FINAL = {"completed", "failed", "canceled"}


async def _submit(http: httpx.AsyncClient, script: str) -> str:
    r = await http.post("/v1/jobs", json={"script": script})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    return jobid


async def _wait_final(http: httpx.AsyncClient, jobid: str, timeout: float = 30) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            job: dict[str, Any] = (await http.get(f"/v1/jobs/{jobid}")).json()
            if job["state"] in FINAL:
                return job
            await anyio.sleep(0.02)


async def _run(http: httpx.AsyncClient, script: str) -> str:
    jobid = await _submit(http, script)
    job = await _wait_final(http, jobid)
    assert job["state"] == "completed", job
    return jobid


def _log_dir(app: Starlette, jobid: str) -> Path:
    settings: Settings = app.state.context.settings
    return settings.prefix.expanduser().resolve() / jobid / "log"


# ---- GET /logs ----


async def test_logs_show_what_the_job_printed(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "echo hello; hostname; echo oops >&2")
    r = await http.get(f"/v1/jobs/{jobid}/logs")
    assert r.status_code == 200, r.text
    logs = r.json()
    assert list(logs) == sorted(logs)
    assert logs["stdout.1"] == f"hello\n{socket.gethostname()}\n"
    assert logs["stderr.1"] == "oops\n"
    assert "console" in logs


async def test_binary_output_is_200_with_replacement_characters(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, r"printf 'a\xff\xfeb\n'")
    r = await http.get(f"/v1/jobs/{jobid}/logs")
    assert r.status_code == 200, r.text
    assert r.json()["stdout.1"] == "a\ufffd\ufffdb\n"
    # The one log: the bytes as written.
    raw = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1")
    assert raw.status_code == 200 and raw.content == b"a\xff\xfeb\n"


async def test_a_big_log_keeps_its_end_and_says_what_was_left_out(http: httpx.AsyncClient) -> None:
    # 3 MiB of numbered 16-byte lines: "0000000000000\n"-style, easy to check.
    script = "seq -f '%015g' 0 196607"  # 196608 lines x 16 bytes = 3 MiB
    jobid = await _run(http, script)
    size = 196608 * 16
    limit = LIMITS.max_log_bytes_in_logs
    r = await http.get(f"/v1/jobs/{jobid}/logs")
    assert r.status_code == 200
    text: str = r.json()["stdout.1"]
    marker = (
        f"[psik-api: {size - limit} bytes before this were left out;"
        f" GET /v1/jobs/{jobid}/logs/stdout.1 has them all]\n"
    )
    assert text.startswith(marker), text[:200]
    assert text[len(marker) :].endswith("000000000196607\n")
    assert len(text) - len(marker) == limit
    # The one log has every byte.
    full = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1")
    assert full.status_code == 200
    assert len(full.content) == size and full.headers["x-log-size"] == str(size)
    assert full.content.startswith(b"000000000000000\n000000000000001\n")
    assert full.headers["content-type"] == "text/plain"


# ---- GET /logs/{name}: offset, tail ----


async def test_tail_gives_the_last_lines(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "for i in $(seq 1 10); do echo line$i; done")
    r = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1", params={"tail": 3})
    assert r.status_code == 200 and r.content == b"line8\nline9\nline10\n"
    r = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1", params={"tail": 1000})
    assert r.content.count(b"\n") == 10
    # `stdout` is the current run's.
    r = await http.get(f"/v1/jobs/{jobid}/logs/stdout", params={"tail": 1})
    assert r.status_code == 200 and r.content == b"line10\n"


def test_tail_reads_backwards_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "stdout.1"
    lines = [f"{i:07d}".encode() * (i % 5 + 1) for i in range(20000)]
    path.write_bytes(b"\n".join(lines))  # no final newline: the last line is still one
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for n in (1, 2, 3, 4999, 20000, 20001):
            start = joblogs.tail_start(fd, size, n, block=4096)
            want = b"\n".join(lines[-n:])
            assert os.pread(fd, size - start, start) == want, n
    finally:
        os.close(fd)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert joblogs.tail_start(fd, 0, 3) == 0
    finally:
        os.close(fd)


async def test_offset_skips_bytes_and_tail_with_offset_is_refused(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "echo 0123456789")
    url = f"/v1/jobs/{jobid}/logs/stdout.1"
    r = await http.get(url, params={"offset": 4})
    assert r.status_code == 200 and r.content == b"456789\n"
    assert r.headers["x-log-size"] == "11"
    r = await http.get(url, params={"offset": 100})
    assert r.status_code == 200 and r.content == b""
    for bad in ({"offset": -1}, {"offset": "x"}, {"tail": 0}, {"tail": "many"}, {"follow": "maybe"}):
        r = await http.get(url, params=bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["code"] == "validation_error"
    r = await http.get(url, params={"offset": 1, "tail": 1})
    assert r.status_code == 422
    assert "offset" in r.json()["detail"] and "tail" in r.json()["detail"]
    # offset's documented default, 0, given with tail: what a generated client sends.
    r = await http.get(url, params={"offset": 0, "tail": 1})
    assert r.status_code == 200 and r.content == b"0123456789\n", r.text
    r = await http.get(url, params={"offset": "00", "tail": 1})
    assert r.status_code == 200 and r.content == b"0123456789\n", r.text


async def test_a_log_not_written_is_404_without_follow(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "true")
    r = await http.get(f"/v1/jobs/{jobid}/logs/stdout.7")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


# ---- names that are not logs, links that lead out ----


class _Opens:
    """Records every name the log reader opens (its one door to the filesystem)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = joblogs.openat

        def spy(dirfd: int, name: str, flags: int) -> int:
            self.names.append(name)
            return real(dirfd, name, flags)

        monkeypatch.setattr(joblogs, "openat", spy)


def _raw_get(live: LiveServer, target: str) -> tuple[int, bytes]:
    """GET exactly ``target`` (httpx would normalise ``..`` away), as a client could send it."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while part := sock.recv(65536):
            reply += part
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_bad_names_are_refused_before_anything_is_read(
    live_app: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobid = _live_submit(live_app, "echo secret-ish")
    _live_wait(live_app, jobid)
    opens = _Opens(monkeypatch)
    for raw in (
        "../spec.json",
        "../status.csv",
        "stdout.1/../x",
        "stdout.1/../../spec.json",
        "%2e%2e",
        "%2e%2e/spec.json",
        "..%2fspec.json",
        "%2E%2E%2Fspec.json",
        "spec.json",
        "status.csv",
        "stdout.1%00",
        "stdout.-1",
        "stdout.1234567890",
        "STDOUT.1",
        "console.1",
        "stdout.1.bak",
        "stdout.1%0a",
        "stdout.%D9%A1",  # an Arabic-Indic digit one: not [0-9]
        ".",
        "%2e",
    ):
        status, body = _raw_get(live_app, f"/v1/jobs/{jobid}/logs/{raw}")
        assert status in {400, 404}, (raw, status, body)
        assert b"secret-ish" not in body and b'"script"' not in body, raw
    assert opens.names == []
    # A refused name says which names are valid.
    r = httpx.get(f"{live_app.url}/v1/jobs/{jobid}/logs/spec.json")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found" and "stdout.N" in r.json()["detail"]
    # ... and a good one goes through the same door.
    assert httpx.get(f"{live_app.url}/v1/jobs/{jobid}/logs/stdout.1").content == b"secret-ish\n"
    assert "stdout.1" in opens.names


async def test_a_log_replaced_by_a_symlink_is_not_followed(app: Starlette, tmp_path: Path) -> None:
    elsewhere = tmp_path / "someone-elses-file"
    elsewhere.write_text("NOT YOURS\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        jobid = await _run(http, f"rm -f ../log/stdout.1; ln -s {elsewhere} ../log/stdout.1")
        logs = _log_dir(app, jobid)
        assert (logs / "stdout.1").is_symlink()
        for params in ({}, {"tail": 1}, {"offset": 0}, {"follow": "true"}):
            r = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1", params=params)
            assert r.status_code == 404, (params, r.text)
            assert b"NOT YOURS" not in r.content
        r = await http.get(f"/v1/jobs/{jobid}/logs")
        assert r.status_code == 200 and "NOT YOURS" not in r.text
        assert "stdout.1" not in r.json()


async def test_a_log_directory_replaced_by_a_symlink_is_not_followed(app: Starlette, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "stdout.1").write_text("NOT YOURS\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        jobid = await _run(http, "true")
        logs = _log_dir(app, jobid)
        for f in logs.iterdir():
            f.unlink()
        logs.rmdir()
        logs.symlink_to(other)
        r = await http.get(f"/v1/jobs/{jobid}/logs/stdout.1")
        assert r.status_code == 404 and b"NOT YOURS" not in r.content
        r = await http.get(f"/v1/jobs/{jobid}/logs")
        assert r.status_code in {200, 404} and "NOT YOURS" not in r.text


async def test_another_owners_job_is_404(app: Starlette) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        jobid = await _run(http, "echo mine")
    service = app.state.context.service
    mallory = Principal(user="mallory")
    for call in (
        lambda: routes_logs.job_logs(service, mallory, jobid),
        lambda: routes_logs.open_job_log(service, mallory, jobid, "stdout.1", follow=False),
        lambda: routes_logs.open_job_log(service, mallory, jobid, "stdout", follow=True),
    ):
        with pytest.raises(ApiError) as e:
            await call()
        assert e.value.code is ProblemCode.not_found
    # The owner gets them through the same door.
    me = Principal(user=LOCAL_USER)
    assert (await routes_logs.job_logs(service, me, jobid))["stdout.1"] == "mine\n"


async def test_an_unknown_job_is_404(http: httpx.AsyncClient) -> None:
    for url in ("/v1/jobs/1.2/logs", "/v1/jobs/1.2/logs/stdout.1"):
        r = await http.get(url)
        assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_log_answers_are_the_documents(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/openapi.json")).json()
    jobid = await _run(http, "echo hi")
    listing = doc["paths"]["/v1/jobs/{jobid}/logs"]["get"]["responses"]
    schema = listing["200"]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator(schema).validate((await http.get(f"/v1/jobs/{jobid}/logs")).json())
    one = doc["paths"]["/v1/jobs/{jobid}/logs/{name}"]["get"]
    for name, params, status in (
        ("stdout.1", {}, 200),
        ("stdout", {"tail": 1}, 200),
        ("stdout.1", {"tail": 0}, 422),
        ("stdout.9", {}, 404),
        ("spec.json", {}, 404),
    ):
        r = await http.get(f"/v1/jobs/{jobid}/logs/{name}", params=params)
        assert r.status_code == status, (name, params, r.text)
        media = r.headers["content-type"].split(";")[0]
        assert media in one["responses"][str(status)]["content"], (status, media)
    assert "X-Log-Size" in one["responses"]["200"]["headers"]
    # The documented name pattern is the server's.
    pattern = next(p for p in one["parameters"] if p["name"] == "name")["schema"]["pattern"]
    for name in (
        "console",
        "stdout",
        "stderr",
        "stdout.1",
        "stderr.123456789",
        "x",
        "stdout.",
        "stdout.1 ",
        "..",
        "stdout.1234567890",
        "console.1",
        "stdout.1/x",
        "stdout.\u0661",
    ):
        assert (re.fullmatch(pattern.strip("^$"), name) is not None) == joblogs.is_log_name(name), name


async def test_head_says_the_size_without_the_bytes(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "echo 12345")
    r = await http.head(f"/v1/jobs/{jobid}/logs/stdout.1")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["x-log-size"] == "6" and r.headers["content-length"] == "6"


async def test_stdout_is_the_current_runs(http: httpx.AsyncClient) -> None:
    jobid = await _run(http, "echo x >> runs; echo run $(wc -l < runs)")
    assert (await http.post(f"/v1/jobs/{jobid}/start")).status_code == 200
    await _wait_final(http, jobid)
    logs = (await http.get(f"/v1/jobs/{jobid}/logs")).json()
    assert (logs["stdout.1"], logs["stdout.2"]) == ("run 1\n", "run 2\n")
    r = await http.get(f"/v1/jobs/{jobid}/logs/stdout")
    assert r.status_code == 200 and r.content == b"run 2\n"


# ---- follow (a live server: in-process httpx buffers whole responses) ----


def _live_submit(live: LiveServer, script: str) -> str:
    r = httpx.post(f"{live.url}/v1/jobs", json={"script": script})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    return jobid


def _live_wait(live: LiveServer, jobid: str) -> None:
    deadline = time.monotonic() + 30
    while _live_state(live, jobid) not in FINAL:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _live_state(live: LiveServer, jobid: str) -> str:
    state: str = httpx.get(f"{live.url}/v1/jobs/{jobid}/state").json()["state"]
    return state


def test_follow_streams_output_as_it_is_written_and_ends_when_the_job_is(live_app: LiveServer) -> None:
    jobid = _live_submit(live_app, "for i in 1 2 3 4 5; do echo tick$i; sleep 0.25; done")
    chunks: list[tuple[float, bytes, str]] = []
    url = f"{live_app.url}/v1/jobs/{jobid}/logs/stdout"
    with httpx.stream("GET", url, params={"follow": "true"}, timeout=30) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            chunks.append((time.monotonic(), chunk, ""))
            if len(chunks) == 1:
                first_state = _live_state(live_app, jobid)
    ended = time.monotonic()
    assert b"".join(c for _, c, _ in chunks) == b"".join(b"tick%d\n" % i for i in range(1, 6))
    # The first output came while the job still ran, and the stream ended with it.
    assert first_state not in FINAL, first_state
    assert len(chunks) >= 3, chunks
    assert _live_state(live_app, jobid) in FINAL
    assert ended - chunks[0][0] > 0.5


def test_follow_of_a_log_not_yet_written_waits_for_it(live_app: LiveServer) -> None:
    # Nothing on stderr for a while, then a line: the stream waits for it.
    jobid = _live_submit(live_app, "sleep 0.6; echo late >&2")
    with httpx.stream(
        "GET", f"{live_app.url}/v1/jobs/{jobid}/logs/stderr.1", params={"follow": "true"}, timeout=30
    ) as r:
        assert r.status_code == 200
        body = r.read()
    assert body == b"late\n"
    assert _live_state(live_app, jobid) in FINAL


def test_follow_from_an_offset_and_a_tail(live_app: LiveServer) -> None:
    # Asked for before the job wrote that far (or at all): the offset still counts.
    jobid = _live_submit(live_app, "sleep 0.3; echo abcdef; sleep 0.3; echo ghi")
    url = f"{live_app.url}/v1/jobs/{jobid}/logs/stdout.1"
    with httpx.stream("GET", url, params={"follow": "true", "offset": 3}, timeout=30) as r:
        assert r.read() == b"def\nghi\n"
    with httpx.stream("GET", url, params={"follow": "true", "tail": 1}, timeout=30) as r:
        assert r.read() == b"ghi\n"


def test_follow_on_a_final_job_ends_at_once(live_app: LiveServer) -> None:
    jobid = _live_submit(live_app, "echo done")
    _live_wait(live_app, jobid)
    url = f"{live_app.url}/v1/jobs/{jobid}/logs/stdout.1"
    started = time.monotonic()
    r = httpx.get(url, params={"follow": "true"}, timeout=30)
    assert r.content == b"done\n"
    # A log that never came of a final job: an empty stream, not a wait.
    r = httpx.get(f"{live_app.url}/v1/jobs/{jobid}/logs/stderr.9", params={"follow": "true"}, timeout=30)
    assert r.status_code == 200 and r.content == b""
    assert time.monotonic() - started < 5


def test_follow_on_a_job_never_started_ends_at_once(live_app: LiveServer) -> None:
    """A ``new`` job has no process to write anything: a follow answers what there is
    (psik's console, say) and ends, rather than wait for a start that may never come."""
    r = httpx.post(f"{live_app.url}/v1/jobs/new", json={"script": "echo never"})
    assert r.status_code == 201, r.text
    jobid = r.json()["jobid"]
    log_dir = live_app.server.config.app.state.context.settings.prefix / jobid / "log"
    log_dir.mkdir(exist_ok=True)
    (log_dir / "console").write_bytes(b"created\n")
    started = time.monotonic()
    for name, expected in (("stdout", b""), ("stderr.1", b""), ("console", b"created\n")):
        r = httpx.get(f"{live_app.url}/v1/jobs/{jobid}/logs/{name}", params={"follow": "true"}, timeout=10)
        assert r.status_code == 200 and r.content == expected, (name, r.content)
    assert time.monotonic() - started < 5
    assert _live_state(live_app, jobid) == "new"


def _open_fds_to(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            pass
    return found


def test_a_client_that_leaves_ends_the_follow(settings: Settings, recwarn: pytest.WarningsRecorder) -> None:
    app = lazy_app(settings)
    with LiveServer(app) as live:
        jobid = _live_submit(live, "echo start; sleep 30")
        stdout = settings.prefix.expanduser().resolve() / jobid / "log" / "stdout.1"
        url = f"{live.url}/v1/jobs/{jobid}/logs/stdout.1"
        with httpx.stream("GET", url, params={"follow": "true"}, timeout=30) as r:
            chunks = r.iter_raw()
            assert next(chunks) == b"start\n"
            assert _open_fds_to(stdout), "the follow holds the log open"
        # The follow notices the client is gone, stops polling and closes the log,
        # while the job still runs.
        deadline = time.monotonic() + 5
        while _open_fds_to(stdout) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_fds_to(stdout) == []
        assert _live_state(live, jobid) == "active"
        assert httpx.delete(f"{live.url}/v1/jobs/{jobid}").status_code == 200
        stopping = time.monotonic()
    assert not live.thread.is_alive()
    assert time.monotonic() - stopping < 10  # no follow kept the server from stopping
    gc.collect()
    leaks = [
        str(w.message) for w in recwarn if "never awaited" in str(w.message) or "destroyed" in str(w.message)
    ]
    assert leaks == []
