"""A client that goes away before its request body is complete is not a server error:
no traceback, no ERROR line (a hostile tester grew the log by 4.4 MB in 5 s with 2000 of
them), and nothing half-made — no job, no job directory, no upload temp file."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from psik_api_server.settings import Settings
from support import LiveServer

#: How many clients at once, in how many waves, per route.
AT_ONCE = 50
WAVES = 3


def _cut_off(url: str, method: str, path: str, head: str = "Content-Type: application/json\r\n") -> None:
    """``AT_ONCE`` clients each send a head that promises 10 bytes and one byte of body,
    wait until the server is reading the body, and close."""
    host, port = url.removeprefix("http://").split(":")
    request = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}Content-Length: 10\r\n\r\n{{"
    for _ in range(WAVES):
        socks = [socket.create_connection((host, int(port))) for _ in range(AT_ONCE)]
        try:
            for s in socks:
                s.sendall(request.encode())
            time.sleep(0.3)  # each request is now waiting for the other 9 bytes
        finally:
            for s in socks:
                s.close()
    time.sleep(0.5)  # the server sees the disconnects


def _job_dirs(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.prefix.iterdir() if p.is_dir()) if settings.prefix.exists() else []


def test_clients_gone_mid_body_log_no_error_and_leave_nothing(
    live_app: LiveServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = httpx.post(f"{live_app.url}/v1/jobs/new", json={"script": "true"})
    assert r.status_code == 201, r.text
    jobid = r.json()["jobid"]
    before = _job_dirs(settings)
    assert before == [jobid]
    caplog.clear()

    _cut_off(live_app.url, "POST", "/v1/jobs")
    _cut_off(live_app.url, "POST", "/v1/jobs/new")
    _cut_off(live_app.url, "PUT", f"/v1/jobs/{jobid}/files/half.bin", head="")
    _cut_off(
        live_app.url,
        "POST",
        f"/v1/jobs/{jobid}/files",
        head="Content-Type: multipart/form-data; boundary=xyz\r\n",
    )

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud[:5])
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text
    # Nothing half-made: no new job, no file, no upload temp file.
    assert _job_dirs(settings) == before
    work: Path = settings.prefix / jobid / "work"
    assert [p.name for p in work.iterdir()] == []
    assert httpx.get(f"{live_app.url}/v1/jobs").json()["items"][0]["jobid"] == jobid
    assert len(httpx.get(f"{live_app.url}/v1/jobs").json()["items"]) == 1
    # And the server still answers.
    assert httpx.get(f"{live_app.url}/healthz").status_code == 200
