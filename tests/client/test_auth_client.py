"""The client's side of authentication (issue 8): a bearer token (``token=`` /
``PSIK_API_TOKEN``), a certified identity for mTLS (``cert_dir=`` /
``PSIK_API_CERTIFIED``), minting (``token()``, ``token_key()``) and narrowing a token
offline (``attenuate``)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import psik_api_client as pac
from client.fakes import Api, problem
from psik_api_client._tls import ssl_context

biscuit = pytest.importorskip("biscuit_auth")

pytestmark = pytest.mark.anyio

TOKEN = "En0KEwoEdXNlcg"  # what the client sends is opaque to it
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PSIK_API_URL", "PSIK_API_UDS", "PSIK_API_TOKEN", "PSIK_API_CERTIFIED"):
        monkeypatch.delenv(name, raising=False)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=[])


# ---- the bearer token ----


async def test_the_token_is_sent_as_a_bearer(connect: Callable[..., Api]) -> None:
    api = connect(ok, base_url="https://hpc.example", token=TOKEN)
    await api.backends()
    await api.backends(extra_headers={"X-Trace": "1"})
    assert [r.headers["Authorization"] for r in api.requests] == [f"Bearer {TOKEN}"] * 2


async def test_the_token_comes_from_the_environment(
    connect: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    # as `export PSIK_API_TOKEN="$(cat file) "` may leave it
    monkeypatch.setenv("PSIK_API_TOKEN", f"  {TOKEN}\n")
    api = connect(ok, base_url="https://hpc.example")
    await api.backends()
    assert api.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_an_explicit_token_beats_the_environment(
    connect: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSIK_API_TOKEN", "from-env")
    api = connect(ok, base_url="https://hpc.example", token=TOKEN)
    await api.backends()
    assert api.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_without_a_token_no_authorization_is_sent(connect: Callable[..., Api]) -> None:
    api = connect(ok, base_url="https://hpc.example")
    await api.backends()
    assert "Authorization" not in api.requests[0].headers


@pytest.mark.parametrize("cls", [pac.Client, pac.AsyncClient])
@pytest.mark.parametrize("url", ["http://hpc.example:8000", "http://10.0.0.7", "http://[2001:db8::1]/api"])
def test_a_token_is_never_sent_over_plain_http_to_another_host(cls: type[Any], url: str) -> None:
    with pytest.raises(ValueError, match=r"https://") as info:
        cls(url, token=TOKEN)
    assert TOKEN not in str(info.value)  # the secret itself is not repeated in logs


@pytest.mark.parametrize("cls", [pac.Client, pac.AsyncClient])
def test_a_token_from_the_environment_is_refused_for_plain_http_too(
    cls: type[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSIK_API_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="PSIK_API_TOKEN"):
        cls("http://hpc.example:8000")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.1.2.3"]
)
async def test_a_token_may_go_over_plain_http_to_this_machine(connect: Callable[..., Api], url: str) -> None:
    # e.g. an ssh tunnel to the server's port: the link is ssh's.
    api = connect(ok, base_url=url, token=TOKEN)
    await api.backends()
    assert api.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_a_token_may_go_over_a_unix_socket(tmp_path: Path) -> None:
    with pac.Client(uds=tmp_path / "api.sock", token=TOKEN) as api:
        assert api.uds == str(tmp_path / "api.sock")


@pytest.mark.parametrize("bad", ["two words", "line\nbreak", "", "   "])
def test_a_token_that_is_not_one_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="token"):
        pac.Client("https://hpc.example", token=bad)


# ---- minting ----


async def test_token_mints_one_for_the_caller(connect: Callable[..., Api]) -> None:
    body = {"token": TOKEN, "user": "uid:alice", "expires": "2030-01-01T00:00:00Z"}
    api = connect(lambda r: httpx.Response(200, json=body), base_url="https://hpc.example")
    assert await api.token() == TOKEN
    assert await api.token(expires=3600) == TOKEN
    assert await api.token(expires=dt.timedelta(minutes=5)) == TOKEN
    assert [str(r.url) for r in api.requests] == [
        "https://hpc.example/v1/token",
        "https://hpc.example/v1/token?expires=3600",
        "https://hpc.example/v1/token?expires=300",
    ]
    assert {r.method for r in api.requests} == {"GET"}


@pytest.mark.parametrize("bad", [0, -5, float("nan"), dt.timedelta(0), "1h"])
async def test_token_refuses_a_lifetime_that_is_not_one(connect: Callable[..., Api], bad: Any) -> None:
    api = connect(ok, base_url="https://hpc.example")
    with pytest.raises(pac.InvalidRequestError, match="expires"):
        await api.token(expires=bad)
    assert api.requests == []


async def test_token_key_is_the_servers_public_key(connect: Callable[..., Api]) -> None:
    key = "ed25519/" + "ab" * 32
    api = connect(lambda r: httpx.Response(200, json={"public_key": key}), base_url="https://hpc.example")
    assert await api.token_key() == key
    assert api.methods() == ["GET /v1/token/key"]


async def test_an_answer_without_a_token_is_a_validation_error(connect: Callable[..., Api]) -> None:
    api = connect(lambda r: httpx.Response(200, json={"user": "x"}), base_url="https://hpc.example")
    with pytest.raises(pac.APIResponseValidationError):
        await api.token()


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(401, "unauthorized", pac.AuthenticationError), (403, "forbidden", pac.PermissionDeniedError)],
)
async def test_refusals_are_auth_errors(
    connect: Callable[..., Api], status: int, code: str, cls: type[Exception]
) -> None:
    detail = "this server mints tokens only for a client certificate"
    api = connect(lambda r: problem(status, code, detail), base_url="https://hpc.example")
    with pytest.raises(cls, match="client certificate"):
        await api.token()


# ---- attenuate ----


@pytest.fixture
def keypair() -> Any:
    return biscuit.KeyPair()


def mint(keypair: Any, user: str = "uid:alice", lifetime: dt.timedelta = dt.timedelta(hours=1)) -> str:
    """A token as the server mints it (the contract's authority block)."""
    builder = biscuit.BiscuitBuilder(
        "user({u}); check if time($t), $t < {exp};", {"u": user, "exp": NOW + lifetime}
    )
    return str(builder.build(keypair.private_key).to_base64())


def authorize(
    token: str, keypair: Any, op: str, job: str | None = None, at: dt.datetime | None = None
) -> bool:
    """Whether the server's authorizer (the contract's facts) lets ``token`` do ``op``."""
    parsed = biscuit.Biscuit.from_base64(token, keypair.public_key)
    facts = "time({now}); operation({op}); " + ("job({job}); " if job else "") + "allow if user($u);"
    params: dict[str, Any] = {"now": at or dt.datetime.now(dt.UTC), "op": op}
    if job:
        params["job"] = job
    try:
        biscuit.AuthorizerBuilder(facts, params).build(parsed).authorize()
    except biscuit.AuthorizationError:
        return False
    return True


def test_a_read_only_token_can_get_but_not_post(keypair: Any) -> None:
    token = mint(keypair)
    narrowed = pac.attenuate(token, public_key=str(keypair.public_key), read_only=True)
    assert narrowed != token
    assert authorize(narrowed, keypair, "GET") and authorize(token, keypair, "POST")
    for op in ("POST", "DELETE", "PUT"):
        assert not authorize(narrowed, keypair, op)


def test_a_job_limited_token_works_on_those_jobs_only(keypair: Any) -> None:
    narrowed = pac.attenuate(mint(keypair), public_key=str(keypair.public_key), jobs=["1.1", "2.2"])
    assert authorize(narrowed, keypair, "POST", "1.1")
    assert authorize(narrowed, keypair, "GET", "2.2")
    assert not authorize(narrowed, keypair, "GET", "3.3")
    assert not authorize(narrowed, keypair, "GET")  # a list: no job fact


def test_a_job_limited_token_can_be_a_single_job_string(keypair: Any) -> None:
    narrowed = pac.attenuate(mint(keypair), public_key=str(keypair.public_key), jobs="1.1")
    assert authorize(narrowed, keypair, "GET", "1.1") and not authorize(narrowed, keypair, "GET", "11")


@pytest.mark.parametrize(
    "expires", [dt.timedelta(minutes=10), 600, NOW + dt.timedelta(minutes=10)], ids=["delta", "s", "time"]
)
def test_an_earlier_expiry(keypair: Any, expires: Any) -> None:
    narrowed = pac.attenuate(mint(keypair), public_key=str(keypair.public_key), expires=expires)
    assert authorize(narrowed, keypair, "GET")
    assert not authorize(narrowed, keypair, "GET", at=NOW + dt.timedelta(minutes=30))
    assert authorize(mint(keypair), keypair, "GET", at=NOW + dt.timedelta(minutes=30))


def test_narrowings_combine_and_stack(keypair: Any) -> None:
    key = str(keypair.public_key)
    once = pac.attenuate(mint(keypair), public_key=key, jobs=["1.1"])
    twice = pac.attenuate(once, public_key=key, read_only=True, expires=60)
    assert authorize(twice, keypair, "GET", "1.1")
    assert not authorize(twice, keypair, "POST", "1.1")
    assert not authorize(twice, keypair, "GET", "2.2")
    assert not authorize(twice, keypair, "GET", "1.1", at=NOW + dt.timedelta(minutes=5))


def test_the_wrong_key_is_an_error(keypair: Any) -> None:
    other = biscuit.KeyPair()
    with pytest.raises(pac.InvalidRequestError, match="public key"):
        pac.attenuate(mint(keypair), public_key=str(other.public_key), read_only=True)


@pytest.mark.parametrize("key", ["ed25519/zz", "nonsense", ""])
def test_a_key_that_is_not_one_is_an_error(keypair: Any, key: str) -> None:
    with pytest.raises(pac.InvalidRequestError, match="public key"):
        pac.attenuate(mint(keypair), public_key=key, read_only=True)


def test_a_token_that_is_not_one_is_an_error(keypair: Any) -> None:
    with pytest.raises(pac.InvalidRequestError, match="token"):
        pac.attenuate("not a token", public_key=str(keypair.public_key), read_only=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # nothing narrowed: surely a mistake
        {"jobs": []},
        {"jobs": ["../x"]},
        {"expires": 0},
        {"expires": dt.datetime(2030, 1, 1)},  # naive: which time zone?
        {"expires": 10**12},  # past the year 9999 (was an OverflowError)
        {"expires": "1h"},
    ],
)
def test_bad_narrowings_are_refused(keypair: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(pac.InvalidRequestError):
        pac.attenuate(mint(keypair), public_key=str(keypair.public_key), **kwargs)


def test_without_biscuit_python_the_error_says_what_to_install(
    keypair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = mint(keypair)
    monkeypatch.setitem(sys.modules, "biscuit_auth", None)
    with pytest.raises(ImportError, match=r"psik-api-client\[tokens\]"):
        pac.attenuate(token, public_key=str(keypair.public_key), read_only=True)


def test_attenuate_does_not_import_biscuit_with_the_client() -> None:
    code = "import sys, psik_api_client; assert 'biscuit_auth' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- cert_dir: mTLS ----

CERTIFIED = shutil.which("certified") or str(Path(sys.executable).parent / "certified")


def certified(*args: str | Path) -> None:
    subprocess.run([CERTIFIED, *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """certified identities: a server (SRV) that knows alice's CA, and alice (CLI)
    who knows the server's; mallory (EVE) is known to nobody."""
    if not Path(CERTIFIED).exists():
        pytest.skip("the certified command is not installed")
    base = tmp_path_factory.mktemp("certified")
    srv, cli, eve = base / "SRV", base / "CLI", base / "EVE"
    certified("init", "--org", "Test Lab", "--unit", "Job API", "--host", "127.0.0.1", "--config", srv)
    certified("init", "Alice Tester", "--uid", "alice", "--email", "alice@localhost", "--config", cli)
    certified("init", "Mallory Evil", "--uid", "mallory", "--email", "m@localhost", "--config", eve)
    certified("add-client", "alice", cli / "CA.crt", "--config", srv)
    certified("add-service", "127.0.0.1", srv / "CA.crt", "--config", cli)
    certified("add-service", "127.0.0.1", srv / "CA.crt", "--config", eve)
    return base


def test_the_context_trusts_the_known_servers(identities: Path) -> None:
    ctx = ssl_context(identities / "CLI")
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    subjects = {str(c["subject"]) for c in ctx.get_ca_certs()}
    # add-service's known_servers/127.0.0.1.yaml, and known_servers/self.crt
    assert any("Test Lab" in s for s in subjects)
    assert len(ctx.get_ca_certs()) == 2


@pytest.mark.parametrize(
    ("remove", "message"),
    [(None, "no such directory"), ("id.key", "id.key"), ("id.crt", "id.crt"), ("known_servers", "known")],
)
def test_an_incomplete_identity_is_a_clear_error(
    identities: Path, tmp_path: Path, remove: str | None, message: str
) -> None:
    copy = tmp_path / "cfg"
    if remove is not None:
        shutil.copytree(identities / "CLI", copy)
        target = copy / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError, match=message):
        ssl_context(copy)


@pytest.mark.parametrize("cls", [pac.Client, pac.AsyncClient])
def test_cert_dir_is_for_an_https_server(identities: Path, cls: type[Any]) -> None:
    with pytest.raises(ValueError, match="https://"):
        cls("http://127.0.0.1:8000", cert_dir=identities / "CLI")


@pytest.mark.parametrize("cls", [pac.Client, pac.AsyncClient])
def test_the_environments_cert_dir_is_left_alone_for_a_plain_server(
    identities: Path, cls: type[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One environment for a local server and a remote one: no error for the local one.
    monkeypatch.setenv("PSIK_API_CERTIFIED", str(identities / "CLI"))
    cls("http://127.0.0.1:8000")


async def _peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering every request with the subject of the client's certificate
    (certified's uvicorn patch puts the transport in the scope)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    cert = scope["transport"].get_extra_info("peercert") if "transport" in scope else None
    subject = {k: v for rdn in (cert or {}).get("subject", ()) for k, v in rdn}
    body = json.dumps({"status": "ok", "peer": subject}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def tls_server(identities: Path) -> Iterator[str]:
    """uvicorn with TLS that requires a client certificate signed by a CA it knows."""
    import certified  # noqa: F401  (patches uvicorn's h11 cycle: scope["transport"])

    srv = identities / "SRV"
    config = uvicorn.Config(
        _peer,
        host="127.0.0.1",
        port=0,
        http="h11",
        log_level="critical",
        ssl_certfile=str(srv / "id.crt"),
        ssl_keyfile=str(srv / "id.key"),
        ssl_ca_certs=str(srv / "known_clients" / "alice.crt"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=20)


def test_the_client_presents_its_certificate(identities: Path, tls_server: str) -> None:
    with pac.Client(tls_server, cert_dir=identities / "CLI", max_retries=0) as api:
        assert api.health()["peer"]["userId"] == "alice"


async def test_the_async_client_presents_its_certificate(
    identities: Path, tls_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSIK_API_CERTIFIED", str(identities / "CLI"))
    async with pac.AsyncClient(tls_server, max_retries=0) as api:
        assert (await api.health())["peer"]["userId"] == "alice"


def test_a_certificate_the_server_does_not_know_is_refused(identities: Path, tls_server: str) -> None:
    with (
        pac.Client(tls_server, cert_dir=identities / "EVE", max_retries=0) as api,
        pytest.raises(pac.APIConnectionError),
    ):
        api.backends()


def test_a_server_the_identity_does_not_know_is_refused(
    identities: Path, tls_server: str, tmp_path: Path
) -> None:
    # alice, before `certified add-service`: her own CA is all she trusts.
    shutil.copytree(identities / "CLI", tmp_path / "cfg")
    (tmp_path / "cfg" / "known_servers" / "127.0.0.1.yaml").unlink()
    with (
        pac.Client(tls_server, cert_dir=tmp_path / "cfg", max_retries=0) as api,
        pytest.raises(pac.APIConnectionError),
    ):
        api.backends()


@pytest.mark.parametrize(
    ("text", "auths"),
    [
        (
            "auths:\n- P=Signing Certificate,OU=Job API,O=Test Lab\ncert: AAAA\nurl: https://h\n",
            ["P=Signing Certificate,OU=Job API,O=Test Lab"],
        ),
        ("auths: []\ncert: AAAA\n", []),
        (
            "cert: AAAA\nauths:\n- a\n- 'it''s: quoted'\n- \"dq \\\"x\\\"\"\nurl: u\n",
            ["a", "it's: quoted", 'dq "x"'],
        ),
        # yaml.dump folds a long plain scalar onto indented lines
        (
            "auths:\n- CN=a very long name,OU=that yaml.dump folds at eighty columns,O=Some\n"
            "  Organisation\n",
            ["CN=a very long name,OU=that yaml.dump folds at eighty columns,O=Some Organisation"],
        ),
    ],
)
def test_service_entries_are_read_as_yaml_dump_writes_them(text: str, auths: list[str]) -> None:
    from psik_api_client._tls import _yaml_list

    assert _yaml_list(text, "auths") == auths
    yaml = pytest.importorskip("yaml")
    assert (yaml.safe_load(text).get("auths") or []) == auths  # the same reading as a YAML parser's
