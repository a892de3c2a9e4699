"""authz: local, server run as root: a client end that is already closed is nobody's.

Another user sends a whole ``POST /v1/jobs`` with ``TCP_CORK`` and closes the socket at
once, while the server is too busy to read it. By the time the server asks the kernel
whose socket that was, the client's end is an orphan (no inode; after the delayed ACK a
FIN_WAIT2 mini-socket), which the kernel reports as uid 0: root's. A server run as root
must answer "cannot tell" (the local secret's 401) for such an end, never take it for
its owner, and looks the uid up when it accepts the connection, while the end is alive
(then the caller is named: 403). Root's own clients keep working meanwhile.

"Busy" is made exact: besides real load (root's own clients), the server's event loop is
held by a callback until the attacker's ends are in the state the attack needs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conftest import lazy_app
from local_users import Other, another_user, cannot
from psik_api_client import Client
from psik_api_server.auth.peer import PeerLookup
from psik_api_server.settings import Settings
from support import LiveServer, hold_loop

ATTEMPTS = 15

#: The attacker (stdlib only): connect ``n`` times; in ``late`` mode wait for a line on
#: stdin (the server has accepted them); send each request corked and close at once.
ATTACK = r"""
import json, socket, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    body = json.dumps({"name": f"orphan-{i}", "script": "id -u"}).encode()
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", port))
    socks.append((s, head + body))
print(" ".join(str(s.getsockname()[1]) for s, _ in socks), flush=True)
if mode == "late":
    sys.stdin.readline()
for s, request in socks:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    s.sendall(request)
    s.close()
"""


@pytest.fixture(scope="session")
def other_user() -> Iterator[Other]:
    yield from another_user()


class Recorder:
    """The app, recording the status answered to each client port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app  # peer.py finds the app's state through ``.app``
        self.status: dict[int, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status[int(scope["client"][1])] = int(message["status"])
            await send(message)

        await self.app(scope, receive, recording)


class Load:
    """Root's own clients, each request on a new connection, until stopped: the server
    is busy, and its owner must keep getting in over TCP all along."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.stop, self.answers, self.errors = url, threading.Event(), 0, []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not self.stop.is_set():
                try:
                    r = http.get(f"{self.url}/v1/jobs")
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                    continue
                if r.status_code == 200:
                    self.answers += 1
                else:
                    self.errors.append(f"{r.status_code} {r.text}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _states(ports: set[int]) -> dict[int, str]:
    """The /proc/net/tcp state of each client end whose local port is in ``ports``."""
    found: dict[int, str] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        if port in ports:
            found[port] = fields[3]
    return found


def _until(what: str, done: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("sock_diag", [True, False], ids=["sock_diag", "proc-tables"])
@pytest.mark.parametrize("mode", ["early", "late"])
def test_a_closed_client_end_is_not_root(
    other_user: Other, settings: Settings, sock_diag: bool, mode: str
) -> None:
    # early: the ends are orphans before the server accepts them; late: accepted while
    # alive, closed before their request is read (the uid must be the one at accept).
    if sys.platform != "linux":
        cannot("the orphaned client end is Linux's /proc and sock_diag behaviour")
    app = lazy_app(settings)
    recorder = Recorder(app)
    live = LiveServer(app)
    live.server.config.app = recorder
    with live, Load(live.url) as load:
        app.state.context.peer_lookup = PeerLookup(sock_diag=sock_diag)
        port = httpx.URL(live.url).port
        argv = [other_user.python, "-c", ATTACK, str(port), str(ATTEMPTS), mode]
        attacker = subprocess.Popen(
            argv,
            user=other_user.uid,
            group=other_user.gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            release = None
            if mode == "early":
                release = hold_loop(live)
            assert attacker.stdout is not None and attacker.stdin is not None
            ports = {int(p) for p in attacker.stdout.readline().split()}
            assert len(ports) == ATTEMPTS, "the attacker could not connect"
            if mode == "late":
                connections = live.server.server_state.connections
                # A connection is listed before uvicorn has set its client: skip those.
                _until(
                    "the server accepted them",
                    lambda: ports <= {c.client[1] for c in list(connections) if c.client is not None},
                )
                release = hold_loop(live)
                attacker.stdin.write("go\n")
                attacker.stdin.flush()
            assert attacker.wait(30) == 0
            # The delayed ACK turns each orphan into the FIN_WAIT2 mini-socket of uid 0.
            _until("the ends are FIN_WAIT2", lambda: "04" not in _states(ports).values(), 10)
        finally:
            if release is not None:
                release.set()
            if attacker.poll() is None:
                attacker.kill()
            attacker.wait()
        _until("every attack is answered", lambda: ports <= recorder.status.keys())
        answered = {p: recorder.status[p] for p in ports}
        want = 401 if mode == "early" else 403
        assert set(answered.values()) == {want}, answered
        assert app.state.context.service.store.count() == 0
        with Client(live.url) as api:  # root's own client, as ever
            assert api.create({"script": "true"}).state == "new"
    assert load.answers > 0 and not load.errors, load.errors
