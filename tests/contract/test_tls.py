"""The real client against the real server run as a site runs it, under
``certified serve`` (tests/tls_support.py): mTLS from a certified identity directory,
and a token minted by the server, narrowed offline, sent as a bearer."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

import psik_api_client as pac
from psik_api_client import JobSpec
from tls_support import Identities, TlsServer
from tls_support import tls_server as run_tls_server

#: The server's token routes (issue 8) are being built alongside this client.
needs_tokens = pytest.mark.skipif(
    importlib.util.find_spec("psik_api_server.tokens") is None, reason="the server mints no tokens yet"
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
