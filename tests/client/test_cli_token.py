"""``psik-api token`` and the global ``--token``/``--cert-dir`` options, against a
mocked server (respx) whose tokens are made with a biscuit key pair of the test."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import respx

from psik_api_client import cli

biscuit = pytest.importorskip("biscuit_auth")

URL = "http://127.0.0.1:8000"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    for name in ("PSIK_API_URL", "PSIK_API_UDS", "PSIK_API_TOKEN", "PSIK_API_CERTIFIED"):
        monkeypatch.delenv(name, raising=False)
    with respx.mock(base_url=URL, assert_all_called=False) as router:
        yield router


@pytest.fixture
def keypair() -> Any:
    return biscuit.KeyPair()


@pytest.fixture
def minted(server: respx.MockRouter, keypair: Any) -> respx.Route:
    """The server's token routes: GET /v1/token mints for alice, /v1/token/key."""
    exp = NOW + dt.timedelta(hours=24)
    token = biscuit.BiscuitBuilder(
        "user({u}); check if time($t), $t < {exp};", {"u": "uid:alice", "exp": exp}
    ).build(keypair.private_key)
    server.get("/v1/token/key").respond(200, json={"public_key": str(keypair.public_key)})
    body = {"token": token.to_base64(), "user": "uid:alice", "expires": exp.isoformat()}
    return server.get("/v1/token").respond(200, json=body)


def blocks(printed: str, keypair: Any) -> list[str]:
    token = biscuit.Biscuit.from_base64(printed.strip(), keypair.public_key)
    return [token.block_source(i) for i in range(token.block_count())]


def test_token_prints_a_minted_token(
    minted: respx.Route, keypair: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert len(blocks(out, keypair)) == 1  # not attenuated: the server's token as it is
    assert "expires" not in str(minted.calls.last.request.url)


def test_token_read_only_for_some_jobs(
    minted: respx.Route, keypair: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--read-only", "--job", "1.1", "--job", "2.2", "--expires", "1h"]) == 0
    source = blocks(capsys.readouterr().out, keypair)[1]
    assert 'check if operation("GET")' in source
    assert '"1.1"' in source and '"2.2"' in source
    assert "check if time($t)" in source
    # the server is asked for a short token too
    assert minted.calls.last.request.url.params["expires"] == "3600"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", "90"), ("90s", "90"), ("30m", "1800"), ("2d", "172800")]
)
def test_token_expires_units(
    minted: respx.Route, text: str, seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--expires", text]) == 0
    assert minted.calls.last.request.url.params["expires"] == seconds


@pytest.mark.parametrize("text", ["0", "-1h", "soon", "1y", "nan"])
def test_token_refuses_a_bad_expiry(
    minted: respx.Route, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--expires", text]) == 2
    assert "--expires" in capsys.readouterr().err
    assert not minted.called


def test_token_refused_by_the_server_exits_5(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    detail = "tokens are minted only for a client certificate: run the server under certified serve"
    server.get("/v1/token").respond(
        401,
        json={"type": "about:blank", "title": "x", "status": 401, "code": "unauthorized", "detail": detail},
        headers={"Content-Type": "application/problem+json"},
    )
    assert cli.main(["token"]) == 5
    assert "certified serve" in capsys.readouterr().err


def test_token_without_biscuit_python_exits_2(
    minted: respx.Route, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "biscuit_auth", None)
    assert cli.main(["token", "--read-only"]) == 2
    assert "psik-api-client[tokens]" in capsys.readouterr().err


def test_global_token_option_is_sent(server: respx.MockRouter) -> None:
    route = server.get("/v1/backends").respond(200, json=[])
    assert cli.main(["--token", "abc", "backends"]) == 0
    assert route.calls.last.request.headers["Authorization"] == "Bearer abc"


def test_token_from_the_environment(server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSIK_API_TOKEN", "abc")
    route = server.get("/v1/backends").respond(200, json=[])
    assert cli.main(["backends"]) == 0
    assert route.calls.last.request.headers["Authorization"] == "Bearer abc"


def test_token_over_plain_http_to_a_remote_host_is_a_usage_error(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--url", "http://hpc.example:8000", "--token", "abc", "backends"]) == 2
    assert "https://" in capsys.readouterr().err


def test_a_missing_cert_dir_is_a_usage_error(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--url", "https://hpc.example", "--cert-dir", str(tmp_path / "none"), "backends"])
    assert code == 2
    assert "none" in capsys.readouterr().err
