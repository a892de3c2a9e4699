"""The local secret, client side: found by itself, sent only to this machine's loopback,
read again once when the server says it changed; both clients alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from client.fakes import Api, job_json, problem
from psik_api_client import AuthenticationError, Client
from psik_api_client._local_secret import HEADER, LocalSecretAuth, loopback_port, secret_files

pytestmark = pytest.mark.anyio

ASK = {"WWW-Authenticate": f'{HEADER} realm="psik-api"'}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = tmp_path / "run" / "psik_api"
    path.mkdir(parents=True, mode=0o700)
    return path


def _write(directory: Path, port: int, secret: str, host: str = "127.0.0.1") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"port": port, "host": host, "secret": secret}
    (directory / f"local-{port}.json").write_text(json.dumps(doc))


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=job_json())


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8123", "http://localhost:8123", "http://[::1]:8123", "http://127.9.9.9:8123"]
)
async def test_the_secret_goes_to_a_loopback_server(
    connect: Callable[..., Api], runtime: Path, url: str
) -> None:
    _write(runtime, 8123, "s3cret", host=httpx.URL(url).host)  # the server listens there
    api = connect(_ok, base_url=url)
    await api.get("1.2")
    assert api.requests[0].headers[HEADER] == "s3cret"


@pytest.mark.parametrize("url", ["http://[::1]:8123", "http://127.0.0.2:8123"])
async def test_the_secret_goes_only_to_the_address_the_server_listens_on(
    connect: Callable[..., Api], runtime: Path, url: str
) -> None:
    """Another user may listen on the same port of another loopback address."""
    _write(runtime, 8123, "s3cret", host="127.0.0.1")
    api = connect(_ok, base_url=url)
    await api.get("1.2")
    assert HEADER not in api.requests[0].headers


@pytest.mark.parametrize("served", ["127.0.0.1", "::1"])
async def test_a_localhost_url_reaches_the_address_the_server_wrote(
    connect: Callable[..., Api], runtime: Path, served: str
) -> None:
    """``Client("http://localhost:PORT")`` for a server on 127.0.0.1 (or [::1]): the
    secret is sent, over a connection to that very address (localhost may resolve to
    the other one first, where another user could listen), with Host still localhost."""
    _write(runtime, 8123, "s3cret", host=served)
    api = connect(_ok, base_url="http://localhost:8123")
    await api.get("1.2")
    sent = api.requests[0]
    assert sent.headers[HEADER] == "s3cret"
    assert sent.url.host == served and sent.url.port == 8123
    assert sent.headers["Host"] == "localhost:8123"


async def test_a_localhost_url_without_a_secret_is_left_alone(
    connect: Callable[..., Api], runtime: Path
) -> None:
    api = connect(_ok, base_url="http://localhost:8123")
    await api.get("1.2")
    assert api.requests[0].url.host == "localhost" and HEADER not in api.requests[0].headers


@pytest.mark.parametrize(
    "url",
    ["http://example.org:8123", "https://127.0.0.1:8123", "http://10.0.0.1:8123", "http://127.0.0.1:8124"],
)
async def test_the_secret_goes_nowhere_else(connect: Callable[..., Api], runtime: Path, url: str) -> None:
    _write(runtime, 8123, "s3cret")
    api = connect(_ok, base_url=url)
    await api.get("1.2")
    assert HEADER not in api.requests[0].headers


async def test_a_new_secret_is_read_once_when_the_server_asks(
    connect: Callable[..., Api], runtime: Path
) -> None:
    _write(runtime, 8123, "old")
    sent: list[tuple[str | None, bytes]] = []  # as each request left (httpx reuses the object)

    def server(request: httpx.Request) -> httpx.Response:
        sent.append((request.headers.get(HEADER), request.content))
        if request.headers.get(HEADER) != "new":
            _write(runtime, 8123, "new")  # the server made a new secret at its start
            return problem(401, "unauthorized", "send the secret", headers=ASK)
        return _ok(request)

    api = connect(server, base_url="http://127.0.0.1:8123")
    await api.submit({"script": "true"}, idempotency_key="k")
    assert [secret for secret, _ in sent] == ["old", "new"]
    assert sent[0][1] == sent[1][1]  # the same body, sent again
    await api.get("1.2")  # and the new one is kept
    assert sent[-1][0] == "new" and len(sent) == 3


async def test_an_unchanged_secret_is_not_sent_again(connect: Callable[..., Api], runtime: Path) -> None:
    _write(runtime, 8123, "same")
    api = connect(lambda r: problem(401, "unauthorized", "no", headers=ASK), base_url="http://127.0.0.1:8123")
    with pytest.raises(AuthenticationError):
        await api.get("1.2")
    assert len(api.requests) == 1


async def test_a_401_that_does_not_ask_for_it_is_not_retried(
    connect: Callable[..., Api], runtime: Path
) -> None:
    api = connect(lambda r: problem(401, "unauthorized", "no"), base_url="http://127.0.0.1:8123")
    _write(runtime, 8123, "s")
    with pytest.raises(AuthenticationError):
        await api.get("1.2")
    assert len(api.requests) == 1


async def test_a_header_set_by_the_caller_is_kept(connect: Callable[..., Api], runtime: Path) -> None:
    _write(runtime, 8123, "from-file")
    api = connect(_ok, base_url="http://127.0.0.1:8123", headers={HEADER: "mine"})
    await api.get("1.2")
    assert api.requests[0].headers[HEADER] == "mine"


async def test_no_file_no_header(connect: Callable[..., Api], runtime: Path) -> None:
    api = connect(_ok, base_url="http://127.0.0.1:8123")
    await api.get("1.2")
    assert HEADER not in api.requests[0].headers


def test_the_data_directory_is_the_fallback(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert secret_files(8000, env) == [tmp_path / ".local/share/psik_api/runtime/local-8000.json"]
    env = {"XDG_RUNTIME_DIR": "/run/user/7", "XDG_DATA_HOME": "/d"}
    assert secret_files(8000, env) == [
        Path("/run/user/7/psik_api/local-8000.json"),
        Path("/d/psik_api/runtime/local-8000.json"),
    ]
    _write(tmp_path / "d" / "psik_api" / "runtime", 9, "fallback")
    auth = LocalSecretAuth({"XDG_RUNTIME_DIR": str(tmp_path / "r"), "XDG_DATA_HOME": str(tmp_path / "d")})
    request = httpx.Request("GET", "http://127.0.0.1:9/v1/jobs")
    assert next(auth.auth_flow(request)).headers[HEADER] == "fallback"


def test_loopback_port() -> None:
    assert loopback_port(httpx.URL("http://localhost/x")) == 80
    assert loopback_port(httpx.URL("http://127.0.0.1:8000")) == 8000
    assert loopback_port(httpx.URL("http://evil.example:8000")) is None


def test_no_secret_over_a_unix_socket(tmp_path: Path) -> None:
    with Client(uds=tmp_path / "s.sock") as api:
        assert api._http.auth is None or not isinstance(api._http.auth, LocalSecretAuth)
