"""A job's callback carries nothing of the server account's: neither ``~/.netrc``'s
credentials (aiohttp's ``trust_env=True`` adds them as ``Authorization``, and a netrc
``default`` entry names every host) nor its proxy settings (a user-chosen URL reached
through the site's proxy). Also psik's own sender is not used: it trusts the
environment too, and with ``certified`` installed it presents the server's client
certificate. A real local job, a real receiver and a real "proxy" that records what
reaches it, on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import lazy_app
from psik_api_server.settings import Settings
from support import LiveServer

pytestmark = pytest.mark.anyio


class Recorder:
    """An HTTP server on loopback recording every request: (target, headers, body)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.got.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET = do_CONNECT = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def states(self) -> list[str]:
        return [json.loads(body).get("state", "") for _, _, body in self.got if body.startswith(b"{")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def recorders() -> Iterator[tuple[Recorder, Recorder]]:
    hook, proxy = Recorder(), Recorder()
    try:
        yield hook, proxy
    finally:
        hook.close()
        proxy.close()


@pytest.fixture(params=["netrc+proxies", "netrc"])
def ambient(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recorders: tuple[Recorder, Recorder],
) -> None:
    """The server account's environment: a ~/.netrc whose default entry fits every
    host, and proxies for every scheme, or no proxy (so that a request that reaches
    the receiver shows what netrc added); the launcher and its jobs inherit them."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    netrc = home / ".netrc"
    netrc.write_text("default login server-account password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        for variant in (name, name.lower()):
            if request.param == "netrc":
                monkeypatch.delenv(variant, raising=False)
            else:
                monkeypatch.setenv(variant, recorders[1].url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("route", ["psik", "relay"])
async def test_a_callback_carries_no_netrc_credentials_and_skips_the_proxy(
    settings: Settings, ambient: None, recorders: tuple[Recorder, Recorder], route: str
) -> None:
    """``psik``: no ``callback_url``, so the job's reports go straight to the user's URL
    (from the launcher and the job's own process). ``relay``: reports come to this
    server's ``/v1/callback`` and are relayed from there."""
    hook, proxy = recorders
    app = lazy_app(settings)
    with LiveServer(app) as live:
        if route == "relay":
            app.state.context.service.specs.callback_url = f"{live.url}/v1/callback"
        spec = {"script": "true", "callback": f"{hook.url}/hook", "cb_secret": "users-secret"}
        async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
            r = await http.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            jobid = r.json()["jobid"]
            with anyio.fail_after(30):
                # Before: every report went to the "proxy" (and the job's state stayed
                # unreported): wait for "completed" wherever it lands.
                while "completed" not in hook.states() + proxy.states():
                    await anyio.sleep(0.02)
                while (await http.get(f"/v1/jobs/{jobid}/state")).json()["state"] != "completed":
                    await anyio.sleep(0.02)
            await app.state.context.service.relay.wait()
    assert proxy.got == [], [(target, headers) for target, headers, _ in proxy.got]
    assert {"active", "completed"} <= set(hook.states())
    for target, headers, body in hook.got:
        assert target == "/hook"
        assert "authorization" not in headers and "proxy-authorization" not in headers, headers
        assert b"netrc-secret" not in body and json.loads(body)["jobid"] == jobid
