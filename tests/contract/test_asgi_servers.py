"""``psik_api_server.main:app`` under the ASGI servers a site may run it with: uvicorn and
hypercorn, each on loopback TCP and on a UNIX socket (the in-process and live-uvicorn
app is tests/conftest.py's ``api``). The real client submits a job and waits for it; in
``authz: local`` another user of the machine is refused under each of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from local_users import Other, another_user, run_as
from psik_api_client import Client, JobState
from support import free_port

BIN = Path(sys.executable).parent
SERVERS = ["uvicorn-tcp", "uvicorn-uds", "hypercorn-tcp", "hypercorn-uds"]


class Running(NamedTuple):
    proc: subprocess.Popen[bytes]
    url: str | None  # TCP
    uds: str | None  # UNIX socket

    def client(self) -> Client:
        return Client(self.url) if self.url else Client(uds=self.uds)


def _argv(server: str, port: int, uds: Path) -> list[str]:
    name, kind = server.split("-")
    program = shutil.which(name, path=str(BIN))
    if program is None:
        pytest.fail(f"{name} is not installed in {BIN}: it is in the test dependency group")
    if name == "uvicorn":
        where = ["--uds", str(uds)] if kind == "uds" else ["--host", "127.0.0.1", "--port", str(port)]
        return [program, "psik_api_server.main:app", *where, "--log-level", "warning"]
    bind = f"unix:{uds}" if kind == "uds" else f"127.0.0.1:{port}"
    return [program, "psik_api_server.main:app", "--bind", bind]


def _healthy(run: Running) -> bool:
    transport = httpx.HTTPTransport(uds=run.uds) if run.uds else None
    try:
        with httpx.Client(transport=transport, timeout=1) as http:
            return http.get(f"{run.url or 'http://localhost'}/healthz").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def running(server: str, state: Path, socket_dir: Path) -> Iterator[Running]:
    """``server`` (e.g. ``hypercorn-uds``) serving ``main:app`` on a config of its own
    (prefix and data under ``state``), until it answers /healthz; ended afterwards."""
    state.mkdir(mode=0o700, exist_ok=True)
    config = state / "psik_api.json"
    config.write_text(json.dumps({"prefix": str(state / "jobs"), "backends": {"default": {"type": "local"}}}))
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV", "PSIK_CONFIG"}}
    env.update(PSIK_API_CONFIG=str(config), XDG_DATA_HOME=str(state / "data"))
    port, uds = free_port(), socket_dir / f"{server}.sock"
    log = state / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_argv(server, port, uds), env=env, stdout=out, stderr=subprocess.STDOUT)
    run = (
        Running(proc, None, str(uds))
        if server.endswith("uds")
        else Running(proc, f"http://127.0.0.1:{port}", None)
    )
    try:
        deadline = time.monotonic() + 30
        while not _healthy(run):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{server} did not start: {log.read_text()}")
            time.sleep(0.05)
        yield run
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (tmp_path can pass the 108-byte limit), which
    the other user may enter: the socket's own mode decides who connects."""
    path = Path(tempfile.mkdtemp(prefix="psik-api-asgi-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("server", SERVERS)
def test_main_app_runs_a_job(server: str, tmp_path: Path, socket_dir: Path) -> None:
    with running(server, tmp_path / "state", socket_dir) as run, run.client() as api:
        job = api.submit({"name": "hello", "script": "echo hello from $0"})
        done = api.wait(job.jobid, timeout=60)
        assert done.state is JobState.completed, done.history
        assert api.read_log(job.jobid, "stdout").startswith(b"hello from")


@pytest.fixture(scope="module")
def other_user() -> Iterator[Other]:
    yield from another_user()


#: What the other user runs: stdlib only, one job submitted over TCP or a UNIX socket.
ATTACK = r"""
import http.client, json, socket, sys
kind, target = sys.argv[1:3]
if kind == "tcp":
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=20)
else:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(target)
body = json.dumps({"script": "true"}).encode()
head = f"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
# One write: a server that refuses on the head may close before reading a second one.
sock.sendall(head.encode() + body)
r = http.client.HTTPResponse(sock)
r.begin()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


@pytest.mark.parametrize("server", SERVERS)
def test_another_user_is_refused_under_each_server(
    server: str, other_user: Other, tmp_path: Path, socket_dir: Path
) -> None:
    with running(server, tmp_path / "state", socket_dir) as run:
        if run.uds:
            os.chmod(run.uds, 0o777)  # anyone may connect: the uid check alone must refuse
            kind, target = "unix", run.uds
        else:
            kind, target = "tcp", str(run.url).removeprefix("http://")
        out = run_as(other_user.uid, other_user.gid, [other_user.python, "-c", ATTACK, kind, target])
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["status"] == 403, answer
        assert f"uid {other_user.uid}" in json.loads(answer["body"])["detail"], answer
        with run.client() as api:
            assert list(api.list()) == []


def test_the_hypercorn_hook_wraps_its_connections_once() -> None:
    from hypercorn.asyncio.tcp_server import TCPServer

    from psik_api_server.serving.hypercorn_seam import install_hypercorn_hook, is_wrapped

    assert install_hypercorn_hook() and install_hypercorn_hook()
    hooked = TCPServer.__init__
    assert is_wrapped(hooked, "_psik_api_hook")
    assert not is_wrapped(hooked.__wrapped__, "_psik_api_hook")  # type: ignore[attr-defined]
