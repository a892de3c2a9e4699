"""authz: local — the attacks, written as tests. Only this host is served; no forwarded
header changes who the caller is; the UNIX socket is the owner's alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from psik_api_server.cli import _unix_socket, main
from psik_api_server.security import is_loopback_host
from support import LiveServer

pytestmark = pytest.mark.anyio


def _from(app: Starlette, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(host, 40000)), base_url="http://testserver"
    )


@pytest.mark.parametrize(
    "host", ["10.9.8.7", "192.168.1.2", "::ffff:10.0.0.1", "2001:db8::1", "evil.example"]
)
async def test_remote_callers_are_refused_everywhere(app: Starlette, host: str) -> None:
    # Everywhere: every operation the server documents, and a path it does not have.
    async with _from(app, "127.0.0.1") as local:
        paths = (await local.get("/openapi.json")).json()["paths"]
    operations = [
        (method.upper(), path.replace("{jobid}", "1.2").replace("{name}", "default"))
        for path, item in paths.items()
        for method in item
    ]
    assert ("DELETE", "/v1/jobs/1.2") in operations and ("POST", "/v1/jobs/1.2/start") in operations
    async with _from(app, host) as http:
        for method, path in [*operations, ("GET", "/v1/nope")]:
            r = await http.request(method, path, json={"script": "touch /tmp/pwned"})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["code"] == "forbidden"
    assert app.state.service.store.count() == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "127.0.0.1"},
        {"Forwarded": "for=127.0.0.1"},
        {"X-Real-IP": "127.0.0.1"},
        {"X-Forwarded-For": "::1", "X-Forwarded-Host": "localhost"},
    ],
)
async def test_forwarded_headers_do_not_make_a_remote_caller_local(
    app: Starlette, headers: dict[str, str]
) -> None:
    async with _from(app, "10.9.8.7") as http:
        r = await http.post("/v1/jobs", json={"script": "true"}, headers=headers)
        assert r.status_code == 403
    assert app.state.service.store.count() == 0


async def test_forwarded_headers_do_not_lock_out_a_local_caller(app: Starlette) -> None:
    async with _from(app, "127.0.0.1") as http:
        r = await http.get("/v1/jobs", headers={"X-Forwarded-For": "10.9.8.7"})
        assert r.status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_loopback_callers_are_served(app: Starlette, host: str) -> None:
    async with _from(app, host) as http:
        assert (await http.get("/v1/jobs")).status_code == 200


def test_loopback_detection() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("127.0.0.1.evil.example")


def test_live_server_ignores_x_forwarded_for(live_app: LiveServer) -> None:
    # Over a real socket the peer is 127.0.0.1; a header claiming otherwise changes nothing
    # (and uvicorn runs with proxy_headers=False, as `psik-api-server serve` does).
    r = httpx.get(f"{live_app.url}/v1/jobs", headers={"X-Forwarded-For": "10.9.8.7"})
    assert r.status_code == 200


def test_serve_refuses_a_non_loopback_address_in_local_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_unix_socket_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    sock = _unix_socket(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, oct(mode)
    finally:
        sock.close()
    # A stale socket is replaced; a regular file at the path is not.
    _unix_socket(path).close()
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(SystemExit):
        _unix_socket(regular)
    assert regular.read_text() == "keep me"


def test_sync_client_over_a_unix_socket(settings: object, tmp_path: Path) -> None:
    from psik_api_client import Client
    from psik_api_server.app import create_app

    path = str(tmp_path / "s.sock")
    with LiveServer(create_app(settings), uds=path), Client(uds=path) as api:  # type: ignore[arg-type]
        job = api.submit({"script": "echo over-uds"})
        assert api.wait(job.jobid, timeout=30).state == "completed"
    assert not os.path.exists(path) or stat.S_ISSOCK(os.stat(path).st_mode)
