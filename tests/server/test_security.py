"""authz: local — the attacks, written as tests. Only this host is served; no forwarded
header changes who the caller is; the UNIX socket is the owner's alone."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from local_users import Other, another_user
from psik_api_server.auth.loopback import is_loopback_authority, is_loopback_host
from psik_api_server.auth.private_dir import check_private_dir
from psik_api_server.cli import _unix_socket, main
from psik_api_server.errors import StartupError
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
    assert app.state.context.service.store.count() == 0


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
    assert app.state.context.service.store.count() == 0


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


# ---- a web page in the owner's browser: DNS rebinding, cross-site forms, CORS ----


def _raw(url: str, request: bytes) -> bytes:
    """Send ``request`` as is on a new connection to ``url``'s host and port."""
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "host",
    ["evil.example", "rebind.evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "0.0.0.0"],
)
def test_a_foreign_host_header_is_refused(live_app: LiveServer, host: str) -> None:
    # DNS rebinding: evil.example first resolves to the attacker, then to 127.0.0.1;
    # the browser then reads our answers as evil.example's. The Host header says so.
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs")]:
        r = httpx.request(method, f"{live_app.url}{path}", json={"script": "true"}, headers={"Host": host})
        assert r.status_code == 403, (method, r.text)
        assert r.json()["code"] == "forbidden" and "Host" in r.json()["detail"]
    assert live_app.server.config.app.state.context.service.store.count() == 0


def test_a_missing_host_header_is_refused(live_app: LiveServer) -> None:
    answer = _raw(live_app.url, b"GET /v1/jobs HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]


def test_loopback_host_names_are_served(live_app: LiveServer) -> None:
    port = httpx.URL(live_app.url).port
    for host in [
        "127.0.0.1",
        f"127.0.0.1:{port}",
        "localhost",
        f"localhost:{port}",
        f"[::1]:{port}",
        "[::1]",
    ]:
        r = httpx.get(f"{live_app.url}/v1/jobs", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


def test_a_foreign_host_header_is_refused_over_a_unix_socket(settings: object, tmp_path: Path) -> None:
    # The README's ssh tunnel (-L 8000:SOCKET) puts the socket on the laptop's
    # localhost, where any page the browser opens can rebind a name to it.
    from psik_api_server.app import create_app

    path = str(tmp_path / "s.sock")
    with LiveServer(create_app(settings), uds=path):  # type: ignore[arg-type]
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, base_url="http://localhost") as http:
            assert http.get("/v1/jobs").status_code == 200
            r = http.post("/v1/jobs", json={"script": "true"}, headers={"Host": "evil.example:8000"})
            assert r.status_code == 403 and r.json()["code"] == "forbidden"


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1"])
async def test_a_foreign_origin_is_refused(app: Starlette, origin: str) -> None:
    async with _from(app, "127.0.0.1") as http:
        for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("DELETE", "/v1/jobs/1.2")]:
            r = await http.request(method, path, json={"script": "true"}, headers={"Origin": origin})
            assert r.status_code == 403, (method, path, r.text)
            assert "Origin" in r.json()["detail"]
    assert app.state.context.service.store.count() == 0


def test_the_servers_own_origin_is_served(live_app: LiveServer) -> None:
    port = httpx.URL(live_app.url).port
    r = httpx.get(f"{live_app.url}/v1/jobs", headers={"Origin": live_app.url})
    assert r.status_code == 200
    r = httpx.get(
        f"{live_app.url}/v1/jobs", headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    )
    assert r.status_code == 200
    # The same page under another name is another origin.
    r = httpx.get(f"{live_app.url}/v1/jobs", headers={"Origin": f"http://localhost:{port}"})
    assert r.status_code == 403


FORM_BODY = b'{"script": "touch /tmp/psik-api-pwned"}'


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # <form enctype="text/plain">: JSON-looking, and no preflight
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,  # a body with no Content-Type at all
        "text/json",
        "application/jsonx",
        "application/json-patch",
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/new"])
async def test_a_body_that_is_not_json_gets_415(
    http: httpx.AsyncClient, app: Starlette, path: str, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await http.post(path, content=FORM_BODY, headers=headers)
    assert r.status_code == 415, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "unsupported_media_type"
    assert app.state.context.service.store.count() == 0


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/x+json"],
)
async def test_json_bodies_are_taken(http: httpx.AsyncClient, content_type: str) -> None:
    r = await http.post("/v1/jobs/new", content=b'{"script": "true"}', headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_form_bodies_are_refused_on_every_route(http: httpx.AsyncClient, content_type: str) -> None:
    # A cross-site form can POST to /start or /cancel without a preflight too.
    job = (await http.post("/v1/jobs/new", json={"script": "true"})).json()
    r = await http.post(
        f"/v1/jobs/{job['jobid']}/start", content=b"x=1", headers={"Content-Type": content_type}
    )
    assert r.status_code == 415, r.text
    assert (await http.get(f"/v1/jobs/{job['jobid']}")).json()["state"] == "new"


async def test_no_cors_headers_are_ever_sent(app: Starlette) -> None:
    async with _from(app, "127.0.0.1") as http:
        preflight = {
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        answers = [
            await http.options("/v1/jobs", headers=preflight),
            await http.options("/v1/jobs", headers={**preflight, "Origin": "http://testserver"}),
            await http.get("/v1/jobs", headers={"Origin": "http://testserver"}),
            await http.get("/v1/jobs"),
        ]
    for r in answers:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers


@pytest.mark.parametrize("server", ["192.0.2.2", "10.0.0.1", "[2001:db8::1]"])
async def test_a_request_on_a_non_loopback_socket_is_refused(app: Starlette, server: str) -> None:
    # As `uvicorn psik_api_server.main:app --host 0.0.0.0 --forwarded-allow-ips '*'`
    # serves it: the peer claims to be 127.0.0.1, the socket it came in on is public.
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{server}:8000") as http:
        r = await http.post("/v1/jobs", json={"script": "true"}, headers={"Host": "127.0.0.1:8000"})
        assert r.status_code == 403, r.text
        assert "listens on" in r.json()["detail"]
    assert app.state.context.service.store.count() == 0


# ---- the prefix is the owner's alone (ssh StrictModes-style) ----


def test_a_private_prefix_passes(tmp_path: Path) -> None:
    check_private_dir(tmp_path / "not-yet" / "jobs")  # made here, 0700, then checked
    made = (tmp_path / "not-yet" / "jobs").stat()
    assert made.st_uid == os.geteuid() and stat.S_IMODE(made.st_mode) == 0o700
    (tmp_path / "jobs").mkdir(mode=0o700)
    check_private_dir(tmp_path / "jobs")
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may write, not replace what is ours
    (sticky / "jobs").mkdir(mode=0o700)
    check_private_dir(sticky / "jobs")


@pytest.mark.parametrize(
    "mode,who", [(0o755, "your group and other users"), (0o750, "your group"), (0o701, "other users")]
)
def test_a_prefix_others_can_reach_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    prefix = tmp_path / "jobs"
    prefix.mkdir()
    prefix.chmod(mode)
    with pytest.raises(StartupError) as e:
        check_private_dir(prefix)
    assert str(e.value) == (
        f"prefix {prefix} is mode {mode:04o}: {who} can reach your jobs' scripts and secrets; "
        f"chmod 700 {prefix}"
    )


def test_a_prefix_in_a_directory_anyone_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could move our prefix away and put theirs in its place
    (shared / "jobs").mkdir(mode=0o700)
    with pytest.raises(StartupError, match=f"inside {shared}, which is mode 0777: any user could replace"):
        check_private_dir(shared / "jobs")


def test_a_prefix_in_a_group_directory_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    project = tmp_path / "project"
    project.mkdir()
    project.chmod(0o2770)  # an HPC project directory: the group's members could do it
    (project / "me" / "jobs").mkdir(parents=True, mode=0o700)
    with caplog.at_level("WARNING", logger="psik_api_server.auth.private_dir"):
        check_private_dir(project / "me" / "jobs")
    [record] = caplog.records
    assert (
        f"inside {project} (mode 2770" in record.getMessage()
        and "its group could replace" in record.getMessage()
    )


def test_a_prefix_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    prefix = tmp_path / "jobs"
    prefix.mkdir(mode=0o700)
    os.chown(prefix, 65534, 65534)
    with pytest.raises(StartupError, match="belongs to uid 65534"):
        check_private_dir(prefix)


async def test_the_lifespan_refuses_a_shared_prefix(settings: Any) -> None:
    from asgi_lifespan import LifespanManager

    from psik_api_server.app import create_app

    settings.prefix.mkdir(mode=0o755)
    settings.prefix.chmod(0o755)
    app = create_app(settings)
    with pytest.raises(StartupError, match="mode 0755"):
        async with LifespanManager(app):
            pass
    assert isinstance(app.state.context.startup_error, StartupError)
    assert not settings.database_path.exists()


async def test_the_lifespan_refuses_an_index_others_can_read(settings: Any) -> None:
    from asgi_lifespan import LifespanManager

    from psik_api_server.app import create_app

    settings.database_path.write_bytes(b"")
    settings.database_path.chmod(0o644)
    with pytest.raises(StartupError, match=f"chmod 600 {settings.database_path}"):
        async with LifespanManager(create_app(settings)):
            pass


@pytest.mark.parametrize(
    "host,ok",
    [
        ("localhost", True),
        ("LOCALHOST:8000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:65535", True),
        ("[::1]", True),
        ("[::1]:8000", True),
        ("localhost.", False),
        ("localhost:", False),
        ("localhost:80:80", False),
        ("localhost:http", False),
        ("evil.localhost", False),
        ("127.0.0.1.evil.example", False),
        ("::1", False),
        ("[::1", False),
        ("[::1]x", False),
        ("[::ffff:127.0.0.1]", False),
        ("[fe80::1]", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("", False),
        ("localhost@evil.example", False),
    ],
)
def test_loopback_authority(host: str, ok: bool) -> None:
    assert is_loopback_authority(host) is ok


@pytest.fixture(scope="module")
def other() -> Iterator[Other]:
    yield from another_user()


def test_a_prefix_another_user_makes_while_start_up_runs_is_never_used(other: Other) -> None:
    """The race a hostile tester won 25 of 25 times: the prefix does not exist when it is
    checked, another user makes it (in a sticky directory anyone may write, like /tmp)
    before the server does, and the server used it. Now whichever of the two makes it,
    what start-up goes on with is this user's, 0700, or start-up stops."""
    sticky = Path(tempfile.mkdtemp(prefix="psik-api-race-"))  # reachable by the other user
    try:
        sticky.chmod(0o1777)
        prefix = sticky / "jobs"
        racer = subprocess.Popen(
            [other.python, "-c", _MKDIR_RMDIR_LOOP, str(prefix)],
            user=other.uid,
            group=other.gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        outcomes: set[str] = set()
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and len(outcomes) < 2:
                try:
                    check_private_dir(prefix)
                except StartupError as e:
                    assert "belongs to" in str(e) or "mode" in str(e), e
                    outcomes.add("refused")
                    continue
                st = prefix.stat()
                assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
                outcomes.add("ours")
                os.rmdir(prefix)  # and the race goes on
        finally:
            racer.kill()
            racer.wait()
        assert outcomes, "no attempt ran"
    finally:
        shutil.rmtree(sticky, ignore_errors=True)


#: The attacker's loop: make the prefix open to all for a moment, remove it, again.
_MKDIR_RMDIR_LOOP = """
import os, sys, time
p = sys.argv[1]
while True:
    try:
        os.mkdir(p, 0o777); os.chmod(p, 0o777); time.sleep(0.002); os.rmdir(p)
    except OSError:
        pass
    time.sleep(0.002)
"""


def test_a_prefix_through_another_users_symlink_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a link to another user")
    (tmp_path / "mine").mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine")
    os.lchown(link, 65534, 65534)
    with pytest.raises(StartupError, match=r"a symbolic link of uid 65534\b"):
        check_private_dir(link / "jobs")
    assert not (tmp_path / "mine" / "jobs").exists()


def test_the_backend_never_uses_a_prefix_another_user_made(settings: Any) -> None:
    """In every mode (token mode has no lifespan check of the prefix's mode): a prefix
    that another user made, first or while start-up ran, is refused when psik is opened."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    from psik_api_server.backends.local.launcher import LocalLauncher
    from psik_api_server.backends.psik_backend import PsikBackend

    settings.prefix.mkdir(mode=0o700)
    os.chown(settings.prefix, 65534, 65534)
    backend = PsikBackend(settings.prefix, settings.backends, LocalLauncher(None, eager=False))
    with pytest.raises(StartupError, match="belongs to uid 65534"):
        backend.open()
