"""authz: local — who is calling. Another user of the machine gets 403, over loopback TCP
(the uid owning the client's end, from /proc/net/tcp and tcp6) and over a UNIX socket
(SO_PEERCRED). The attacks run a real process as another uid: as root the test creates
the user; elsewhere it skips with a message, except under CI=true, where it fails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from conftest import lazy_app
from local_users import Other, another_user, run_as
from psik_api_client import Client, PermissionDeniedError
from psik_api_server.auth.peer import PeerLookup
from psik_api_server.serving.uvicorn_seam import install as install_uvicorn_hook
from psik_api_server.settings import Settings
from support import LiveServer, client_tcp_state, free_port

pytestmark = pytest.mark.anyio

#: What the other user runs: stdlib only (it cannot read our venv), one HTTP request.
ATTACK = r"""
import http.client, json, socket, sys
kind, target, method, path = sys.argv[1:5]
if kind == "tcp":
    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=20)
else:
    class Unix(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(target)
    conn = Unix("localhost", timeout=20)
body = json.dumps({"script": "touch /tmp/psik-api-pwned"}) if method == "POST" else None
conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
r = conn.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


@pytest.fixture(scope="session")
def other_user() -> Iterator[Other]:
    yield from another_user()


def _attack(other: Other, kind: str, target: str, method: str, path: str) -> tuple[int, dict[str, object]]:
    out = run_as(other.uid, other.gid, [other.python, "-c", ATTACK, kind, target, method, path])
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    body = json.loads(answer["body"]) if answer["body"].startswith("{") else {}
    return int(answer["status"]), body


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the other user can reach (tmp_path is owner-only)."""
    path = Path(tempfile.mkdtemp(prefix="psik-api-peer-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("method,path", [("GET", "/v1/jobs"), ("POST", "/v1/jobs")])
def test_another_uid_over_loopback_tcp_is_refused(
    other_user: Other, settings: Settings, method: str, path: str
) -> None:
    app = lazy_app(settings)
    with LiveServer(app) as live:
        target = live.url.removeprefix("http://")
        status, body = _attack(other_user, "tcp", target, method, path)
        assert status == 403, body
        assert body["code"] == "forbidden" and str(other_user.uid) in str(body["detail"])
        assert app.state.context.service.store.count() == 0
        # The owner still gets in, on the same server.
        assert httpx.get(f"{live.url}/v1/jobs").status_code == 200


def test_another_uid_over_ipv6_loopback_is_refused(other_user: Other, settings: Settings) -> None:
    app = lazy_app(settings)
    live = LiveServer(app)
    live.server = uvicorn.Server(
        uvicorn.Config(app, host="::1", port=0, proxy_headers=False, log_level="warning", lifespan="on")
    )
    live.thread = threading.Thread(target=live.server.run, daemon=True)
    try:
        live.__enter__()
    except RuntimeError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        port = live.server.servers[0].sockets[0].getsockname()[1]
        status, body = _attack(other_user, "tcp", f"[::1]:{port}", "POST", "/v1/jobs")
        assert status == 403, body
        assert app.state.context.service.store.count() == 0
        assert httpx.get(f"http://[::1]:{port}/v1/jobs").status_code == 200
    finally:
        live.__exit__(None, None, None)


@pytest.mark.parametrize("method,path", [("GET", "/v1/jobs"), ("POST", "/v1/jobs")])
def test_another_uid_over_a_world_connectable_unix_socket_is_refused(
    other_user: Other, settings: Settings, shared_dir: Path, method: str, path: str
) -> None:
    # `uvicorn psik_api_server.main:app --uds PATH` creates the socket mode 0666: the
    # file permissions do not keep anyone out, the peer's uid (SO_PEERCRED) must.
    sock = shared_dir / "api.sock"
    app = lazy_app(settings)
    with LiveServer(app, uds=str(sock)):
        sock.chmod(0o666)
        status, body = _attack(other_user, "unix", str(sock), method, path)
        assert status == 403, body
        assert body["code"] == "forbidden" and str(other_user.uid) in str(body["detail"])
        assert app.state.context.service.store.count() == 0
        with Client(uds=str(sock)) as api:
            assert list(api.list()) == []


@pytest.mark.parametrize("sock_diag", [True, False], ids=["sock_diag", "proc-tables"])
def test_both_lookups_name_another_uid(other_user: Other, settings: Settings, sock_diag: bool) -> None:
    app = lazy_app(settings)
    with LiveServer(app) as live:
        app.state.context.peer_lookup = PeerLookup(sock_diag=sock_diag)
        status, body = _attack(other_user, "tcp", live.url.removeprefix("http://"), "GET", "/v1/jobs")
        assert status == 403 and f"uid {other_user.uid}" in str(body["detail"]), body
        assert httpx.get(f"{live.url}/v1/jobs").status_code == 200


# ---- one lookup per connection ----


class CountingLookup(PeerLookup):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tcp = self.unix = 0

    def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
        self.tcp += 1
        return super().tcp_uid(client, server)

    def unix_uid(self, sock: Any) -> int | None:
        self.unix += 1
        return super().unix_uid(sock)


def test_the_uid_is_looked_up_once_per_connection(live_app: LiveServer) -> None:
    state = live_app.server.config.app.state.context
    state.peer_lookup = lookup = CountingLookup()
    with httpx.Client(base_url=live_app.url) as http:
        for _ in range(5):
            assert http.get("/v1/jobs").status_code == 200
    assert lookup.tcp == 1
    with httpx.Client(base_url=live_app.url) as http:  # a new connection, a new lookup
        assert http.get("/v1/jobs").status_code == 200
        assert http.post("/v1/jobs/new", json={"script": "true"}).status_code == 201
    assert lookup.tcp == 2


def test_hypercorn_looks_the_uid_up_at_accept(settings: Settings) -> None:
    # hypercorn's connections carry their socket too (hypercorn_hook): the uid is taken
    # when the connection is accepted, before any request, as under uvicorn.
    serving = pytest.importorskip("hypercorn.asyncio")
    from hypercorn.config import Config

    app = lazy_app(settings)
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serving.serve(app, config, shutdown_trigger=stop.wait),)
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and thread.is_alive(), "hypercorn did not start"
            time.sleep(0.05)
        app.state.context.peer_lookup = lookup = CountingLookup()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            deadline = time.monotonic() + 10
            while lookup.tcp == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert lookup.tcp == 1
            raw.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert lookup.tcp == 1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


def test_the_uid_is_looked_up_once_per_unix_connection(settings: Settings, tmp_path: Path) -> None:
    app = lazy_app(settings)
    path = str(tmp_path / "s.sock")
    with LiveServer(app, uds=path):
        app.state.context.peer_lookup = lookup = CountingLookup()
        with Client(uds=path) as api:
            for _ in range(3):
                list(api.list())
        assert lookup.unix == 1 and lookup.tcp == 0


def test_uvicorn_connections_carry_their_socket(live_app: LiveServer) -> None:
    seen: list[object] = []
    app = live_app.server.config.app

    class Spy(PeerLookup):
        def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
            seen.append((client, server))
            return super().tcp_uid(client, server)

    app.state.context.peer_lookup = Spy()
    with httpx.Client(base_url=live_app.url) as http:
        assert http.get("/v1/jobs", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
        local = http.get("/healthz")  # same connection: the lookup is not repeated
        assert local.status_code == 200
    assert len(seen) == 1
    client, server = seen[0]  # type: ignore[misc]
    assert client[0] == "127.0.0.1" and server == ("127.0.0.1", httpx.URL(live_app.url).port)
    assert "uvicorn.protocols.http.h11_impl.H11Protocol" in install_uvicorn_hook()


def test_every_installed_uvicorn_protocol_is_hooked() -> None:
    hooked = install_uvicorn_hook()
    assert "uvicorn.protocols.http.h11_impl.H11Protocol" in hooked
    for module, cls in [("httptools", "HttpToolsProtocol"), ("zttp", "ZttpProtocol")]:
        try:
            __import__(module)
        except ImportError:
            continue
        assert any(name.endswith(cls) for name in hooked), hooked
    assert install_uvicorn_hook() == hooked  # idempotent: no second wrapper


# ---- where the uid cannot be told: the local secret ----


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    return path / "psik_api"


@pytest.fixture
def blind_server(settings: Settings, runtime: Path) -> Iterator[LiveServer]:
    """A server that can tell no uid over TCP, as on macOS: no sock_diag, no tables."""
    app = lazy_app(settings)
    app.state.context.peer_lookup = PeerLookup(proc_root=runtime.parent / "no-proc", sock_diag=False)
    with LiveServer(app) as live:
        yield live


def test_without_a_uid_tcp_needs_the_local_secret(blind_server: LiveServer, runtime: Path) -> None:
    url = blind_server.url
    port = httpx.URL(url).port
    r = httpx.post(f"{url}/v1/jobs", json={"script": "true"})
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"].startswith(
        "Psik-Local-Secret"
    )
    secret_file = runtime / f"local-{port}.json"
    assert str(secret_file) in r.json()["detail"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    secret = json.loads(secret_file.read_text())["secret"]
    assert len(secret) >= 40
    for wrong in ["", "x", secret[:-1], secret + "x", secret.upper()]:
        r = httpx.get(f"{url}/v1/jobs", headers={"Psik-Local-Secret": wrong})
        assert r.status_code == 401, wrong
    assert httpx.get(f"{url}/v1/jobs", headers={"Psik-Local-Secret": secret}).status_code == 200
    assert blind_server.server.config.app.state.context.service.store.count() == 0


def test_without_a_uid_the_client_finds_the_secret_by_itself(blind_server: LiveServer, runtime: Path) -> None:
    with Client(blind_server.url) as api:  # no secret exists yet: the first 401 makes it
        job = api.submit({"script": "echo blind"})
        assert api.wait(job.jobid, timeout=30).state == "completed"
    with Client(blind_server.url) as api:  # a new client reads it before asking
        assert [j.jobid for j in api.list()] == [job.jobid]


def test_without_a_uid_the_cli_finds_the_secret_by_itself(blind_server: LiveServer, runtime: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime.parent), "PSIK_API_URL": blind_server.url}
    env.pop("PSIK_API_UDS", None)
    psik_api = Path(sys.executable).parent / "psik-api"
    out = subprocess.run([str(psik_api), "ls"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_secret_file_goes_with_the_server(settings: Settings, runtime: Path) -> None:
    app = lazy_app(settings)
    app.state.context.peer_lookup = PeerLookup(proc_root=runtime.parent / "no-proc", sock_diag=False)
    with LiveServer(app) as live:
        with Client(live.url) as api:
            list(api.list())
        assert list(runtime.glob("local-*.json"))
    assert not list(runtime.glob("local-*.json"))


def test_a_stale_secret_file_is_replaced(blind_server: LiveServer, runtime: Path) -> None:
    # A server killed with -9 leaves its file; the next run on that port makes a new
    # secret, and a client holding the old one reads the new one after one 401.
    port = httpx.URL(blind_server.url).port
    runtime.mkdir(mode=0o700, exist_ok=True)
    (runtime / f"local-{port}.json").write_text(json.dumps({"port": port, "secret": "stale"}))
    with Client(blind_server.url) as api:
        assert list(api.list()) == []
    assert json.loads((runtime / f"local-{port}.json").read_text())["secret"] != "stale"


def test_a_known_other_uid_is_refused_even_with_the_secret(settings: Settings, runtime: Path) -> None:
    class Stranger(PeerLookup):
        def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
            return os.geteuid() + 4242

    app = lazy_app(settings)
    with LiveServer(app) as live:
        app.state.context.local_secrets.secret(httpx.URL(live.url).port)
        app.state.context.peer_lookup = Stranger()
        with (
            Client(live.url) as api,
            pytest.raises(PermissionDeniedError, match=f"uid {os.geteuid() + 4242}"),
        ):
            list(api.list())


def test_a_unix_socket_whose_peer_cannot_be_told_is_refused(settings: Settings, tmp_path: Path) -> None:
    class Blind(PeerLookup):
        def unix_uid(self, sock: Any) -> int | None:
            return None

    app = lazy_app(settings)
    path = str(tmp_path / "s.sock")
    with LiveServer(app, uds=path):
        app.state.context.peer_lookup = Blind()
        with Client(uds=path) as api, pytest.raises(PermissionDeniedError, match="cannot tell"):
            list(api.list())


# ---- the lookups themselves, on tables written by hand ----

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def _row(n: int, local: str, remote: str, state: str, uid: int, inode: int | None = None) -> str:
    inode = 1000 + n if inode is None else inode
    rest = f"00000000:00000000 00:00000000 00000000  {uid:>5}        0 {inode} 1"
    return f"   {n}: {local} {remote} {state} {rest}\n"


def test_proc_tables_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    lo = "0100007F" if sys.byteorder == "little" else "7F000001"
    (net / "tcp").write_text(
        TCP_HEADER
        + _row(0, f"{lo}:1F40", "00000000:0000", "0A", 1000)  # the server's listener
        + _row(1, f"{lo}:1F40", f"{lo}:D431", "01", 1000)  # the server's end
        + _row(2, f"{lo}:D431", f"{lo}:1F40", "06", 0)  # an old TIME_WAIT row: uid 0
        + _row(3, f"{lo}:D431", f"{lo}:1F40", "01", 1234)  # the client's end
    )
    mapped = "0000000000000000FFFF0000" + lo
    (net / "tcp6").write_text(TCP_HEADER + _row(0, f"{mapped}:D432", f"{mapped}:1F40", "01", 777))
    lookup = PeerLookup(proc_root=tmp_path, sock_diag=False)
    assert lookup.tcp_uid(("127.0.0.1", 0xD431), ("127.0.0.1", 8000)) == 1234
    assert lookup.tcp_uid(("127.0.0.1", 0xD432), ("127.0.0.1", 8000)) == 777  # AF_INET6 client
    assert lookup.tcp_uid(("127.0.0.1", 0xD433), ("127.0.0.1", 8000)) is None
    assert lookup.tcp_uid(("not an ip", 1), ("127.0.0.1", 8000)) is None
    nothing = PeerLookup(proc_root=tmp_path / "none", sock_diag=False)
    assert nothing.tcp_uid(("127.0.0.1", 0xD431), ("127.0.0.1", 8000)) is None


def test_both_lookups_find_this_processes_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            for lookup in (PeerLookup(), PeerLookup(sock_diag=False)):
                assert lookup.tcp_uid(accepted.getpeername(), accepted.getsockname()) == os.geteuid()
                # No connection from that port: nobody (not the server's own end).
                assert lookup.tcp_uid(("127.0.0.1", 1), accepted.getsockname()) is None


def test_a_closed_client_end_names_nobody_in_the_tables(tmp_path: Path) -> None:
    # Once the client closed its socket its end is an orphan: no inode, and a uid column
    # that says root (or, on newer kernels, the creator) without proof. Cannot tell.
    net = tmp_path / "net"
    net.mkdir()
    lo = "0100007F" if sys.byteorder == "little" else "7F000001"
    server = f"{lo}:1F40"
    rows = [
        ("05", 0, 0),  # FIN_WAIT2 mini-socket after the delayed ACK: the attack's uid 0
        ("04", 1234, 0),  # FIN_WAIT1, orphaned: the creator's uid, but no inode
        ("0B", 0, 0),  # CLOSING
        ("09", 0, 0),  # LAST_ACK
        ("07", 0, 0),  # CLOSE
        ("01", 0, 0),  # open, yet no inode: nothing proves the uid
        ("08", 1234, 5555),  # CLOSE_WAIT: the server closed its half; the client holds its end
        ("04", 1234, 4321),  # FIN_WAIT1 with an inode: half-closed (shutdown), still held
    ]
    (net / "tcp").write_text(
        TCP_HEADER
        + _row(0, server, "00000000:0000", "0A", 0)
        + "".join(
            _row(n + 1, f"{lo}:{0xD431 + n:04X}", server, state, uid, inode)
            for n, (state, uid, inode) in enumerate(rows)
        )
    )
    mapped = "0000000000000000FFFF0000" + lo
    (net / "tcp6").write_text(TCP_HEADER + _row(0, f"{mapped}:D451", f"{mapped}:1F40", "05", 0, 0))
    lookup = PeerLookup(proc_root=tmp_path, sock_diag=False)
    found = [lookup.tcp_uid(("127.0.0.1", 0xD431 + n), ("127.0.0.1", 8000)) for n in range(len(rows))]
    assert found == [None] * (len(rows) - 2) + [1234, 1234]
    assert lookup.tcp_uid(("127.0.0.1", 0xD451), ("127.0.0.1", 8000)) is None


@pytest.mark.skipif(sys.platform != "linux", reason="orphaned ends are Linux's /proc and sock_diag")
def test_both_lookups_name_nobody_for_a_closed_end() -> None:
    # A client that sends corked and closes at once: its end is an orphan in FIN_WAIT1,
    # then (after the server's delayed ACK) a FIN_WAIT2 mini-socket of uid 0.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with accepted:
            port = client.getsockname()[1]
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            client.sendall(b"POST /v1/jobs HTTP/1.1\r\n\r\n")
            client.close()
            seen = set()
            deadline = time.monotonic() + 10
            while True:
                state = client_tcp_state(port, server.getsockname()[1])
                seen.add(state)
                for lookup in (PeerLookup(), PeerLookup(sock_diag=False)):
                    assert lookup.tcp_uid(accepted.getpeername(), accepted.getsockname()) is None, state
                if state != "04" or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert "05" in seen, f"the end never became a FIN_WAIT2 mini-socket: {seen}"


def test_the_uid_is_looked_up_at_accept(live_app: LiveServer) -> None:
    # Before any request: the later the lookup, the likelier the client's end is gone.
    live_app.server.config.app.state.context.peer_lookup = lookup = CountingLookup()
    url = httpx.URL(live_app.url)
    with socket.create_connection((url.host, url.port)) as raw:
        deadline = time.monotonic() + 10
        while lookup.tcp == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lookup.tcp == 1
        raw.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert lookup.tcp == 1


# ---- requests with no connection behind them ----


class Fixed(PeerLookup):
    """Names ``uid`` for every TCP caller, and counts the lookups."""

    def __init__(self, uid: int | None) -> None:
        super().__init__()
        self.uid, self.calls = uid, 0

    def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
        self.calls += 1
        return self.uid


async def test_an_in_process_transport_is_the_owners_own_process(app: Starlette) -> None:
    # httpx.ASGITransport: no socket, a made-up server name. Code that can call the app
    # in-process already runs as the server's owner: no uid to look up, no Host check.
    app.state.context.peer_lookup = lookup = Fixed(os.geteuid() + 1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/v1/jobs")).status_code == 200
    assert lookup.calls == 0


@pytest.mark.parametrize("uid_offset,status", [(0, 200), (1, 403)])
async def test_a_tcp_request_without_its_connection_is_looked_up_each_time(
    app: Starlette, uid_offset: int, status: int
) -> None:
    # Another ASGI server reports the socket's addresses but not the connection: the
    # scope's server is an IP address, so the request is checked as a real one.
    app.state.context.peer_lookup = lookup = Fixed(os.geteuid() + uid_offset)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        for _ in range(2):
            assert (await http.get("/v1/jobs")).status_code == status
        assert (await http.get("/v1/jobs", headers={"Host": "evil.example"})).status_code == 403
    assert lookup.calls == 2


@pytest.mark.parametrize("server", [("/run/psik.sock", None), None])
async def test_a_unix_request_without_its_connection_is_refused(app: Starlette, server: object) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "server": server,
        "client": None,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 403
    assert b"cannot tell which user" in sent[1]["body"]


@pytest.mark.parametrize("runtime_dir", ["/run/user/1234", None])
def test_client_and_server_agree_on_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, runtime_dir: str | None
) -> None:
    from psik_api_client import _local_secret as client_side
    from psik_api_server.auth import local_secret as security

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    if runtime_dir:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert security.LocalSecrets().path(8000) == client_side.secret_files(8000)[0]
    assert security.SECRET_HEADER == client_side.HEADER


# ---- one seam: serve's protocol class, the patch only for other launchers ----


def test_the_protocol_class_subclasses_uvicorns_and_patches_nothing() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from psik_api_server.serving.uvicorn_seam import ConnectionHooks, ServedProtocol

    before = dict(vars(H11Protocol))
    hooks = ConnectionHooks()
    served = hooks.protocol(H11Protocol)
    assert issubclass(served, H11Protocol) and issubclass(served, ServedProtocol)
    assert served.hooks is hooks  # type: ignore[attr-defined]
    assert dict(vars(H11Protocol)) == before


def test_a_connection_of_the_protocol_class_is_followed_once_where_uvicorn_is_patched_too(
    settings: Settings,
) -> None:
    # The patch path stands aside for a connection of our own class: one tag, one lookup.
    install_uvicorn_hook()
    app = lazy_app(settings)
    with LiveServer(app) as live:
        app.state.context.peer_lookup = lookup = CountingLookup()
        with httpx.Client(base_url=live.url) as http:
            for _ in range(3):
                assert http.get("/v1/jobs").status_code == 200
        assert lookup.tcp == 1
