"""The real client against the real server run as a site runs it, under
``certified serve`` (tests/tls_support.py): mTLS from a certified identity directory,
and a token minted by the server, narrowed offline, sent as a bearer."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import psik_api_client as pac
from psik_api_client import JobSpec
from psik_api_client.cli import main as cli_main
from tls_support import Identities, TlsServer
from tls_support import tls_server as run_tls_server

#: The server's token routes (issue 8) are being built alongside this client.
needs_tokens = pytest.mark.skipif(
    importlib.util.find_spec("psik_api_server.auth.tokens") is None, reason="the server mints no tokens yet"
)


def test_the_client_reaches_certified_serve_with_its_identity(
    tls_identities: Identities, tmp_path: Path
) -> None:
    # mTLS alone (the server's default authz): certified serve lets in only a client
    # that presents a certificate it knows.
    with (
        run_tls_server(tls_identities, tmp_path / "state") as server,
        pac.Client(server.url, cert_dir=tls_identities.users["alice"], max_retries=0) as api,
    ):
        assert api.health()["status"] == "ok"
        assert [b.name for b in api.backends()] == ["default"]


@pytest.fixture
def alice(tls_server: TlsServer) -> Iterator[pac.Client]:
    with pac.Client(tls_server.url, cert_dir=tls_server.identities.users["alice"], max_retries=0) as api:
        yield api


@needs_tokens
def test_a_read_only_token_can_read_but_not_write(alice: pac.Client, tls_server: TlsServer) -> None:
    job = alice.create(JobSpec(name="mine", script="true"))
    token = pac.attenuate(alice.token(), public_key=alice.token_key(), read_only=True)
    # The agent holds only the narrowed token (and a certificate of its own: bob's).
    bob_dir = tls_server.identities.users["bob"]
    with pac.Client(tls_server.url, cert_dir=bob_dir, token=token, max_retries=0) as agent:
        assert agent.get(job.jobid).jobid == job.jobid
        with pytest.raises(pac.PermissionDeniedError):
            agent.start(job.jobid)
        with pytest.raises(pac.PermissionDeniedError):
            agent.submit(JobSpec(name="not allowed", script="true"))


def _introduced_only(identities: Identities, root: Path, user: str) -> Path:
    """A user the server knows only by its introduction: ``certified introduce`` signed
    their certificate with the server's CA (``add-intro`` keeps it as ``id/<signer>.crt``
    and names the signer in the server's entry); no ``add-client`` on the server."""
    from tls_support import _certified

    cfg = root / user
    _certified(
        "init", f"{user.title()} Tester", "--uid", user, "--email", f"{user}@localhost",
        "--config", str(cfg), cwd=root,
    )  # fmt: skip
    _certified("add-service", "127.0.0.1", str(identities.server / "CA.crt"), "--config", str(cfg), cwd=root)
    ident = root / f"{user}.b64"
    ident.write_text(_certified("get-ident", "--config", str(cfg), cwd=root))
    intro = root / f"{user}-intro.json"
    intro.write_text(_certified("introduce", str(ident), "--config", str(identities.server), cwd=root))
    _certified("add-intro", str(intro), "--config", str(cfg), cwd=root)
    return cfg


def test_an_introduced_user_presents_the_certificate_the_server_signed(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    """As certified's own client: for a server with its own known_servers entry, the
    certificate that server signed is presented, and only its certificate trusted.
    Before, id.crt (signed by the user's own CA) was presented and the handshake failed
    ("Server disconnected without sending a response")."""
    carol = _introduced_only(tls_server.identities, tmp_path, "carol")
    assert list((carol / "id").glob("*.crt")), "add-intro kept no signed certificate"
    with pac.Client(tls_server.url, cert_dir=carol, max_retries=0) as api:
        job = api.create(JobSpec(name="carols", script="true"))
        assert job.owner == "uid:carol"
        assert [j.jobid for j in api.list()] == [job.jobid]


def _unknown_to_the_server(identities: Identities, root: Path, user: str) -> Path:
    """A user who trusts the server but whom the server does not know: their CA was
    never added (no ``add-client``) and the server signed nothing for them."""
    from tls_support import _certified

    cfg = root / user
    _certified(
        "init", f"{user.title()} Tester", "--uid", user, "--email", f"{user}@localhost",
        "--config", str(cfg), cwd=root,
    )  # fmt: skip
    _certified("add-service", "127.0.0.1", str(identities.server / "CA.crt"), "--config", str(cfg), cwd=root)
    return cfg


def test_a_refused_certificate_is_said_by_the_client_and_logged_once_by_the_server(
    tls_server: TlsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "cannot reach ...: Server disconnected without sending a response" (exit
    4), and nothing in the server's log."""
    mallory = _unknown_to_the_server(tls_server.identities, tmp_path, "mallory")
    with pac.Client(tls_server.url, cert_dir=mallory, max_retries=0) as api:
        for _ in range(3):
            with pytest.raises(pac.CertificateRefusedError) as refused:
                api.backends()
    message = str(refused.value)
    assert f"{tls_server.url} refused the client certificate" in message
    assert "UID=mallory" in message and str(mallory / "id.crt") in message
    assert refused.value.certificate == mallory / "id.crt"
    assert isinstance(refused.value, pac.APIConnectionError)  # no answer came
    # The command line: the server refused (5), not "could not be reached" (4).
    assert cli_main(["--url", tls_server.url, "--cert-dir", str(mallory), "backends"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("psik-api: error: ") and "refused the client certificate" in err
    # The server said so, once for the four refusals from one address.
    deadline = time.monotonic() + 10
    wanted = "TLS handshake with 127.0.0.1 refused: the client certificate is not trusted"
    while wanted not in tls_server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tls_server.log.read_text().count(wanted) == 1, tls_server.log.read_text()[-2000:]
    # A known user is still let in.
    with pac.Client(tls_server.url, cert_dir=tls_server.identities.users["alice"], max_retries=0) as api:
        assert api.health()["status"] == "ok"
