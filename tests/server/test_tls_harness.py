"""The TLS harness itself: `certified serve` runs the app, a user's certificate gets in,
a connection without one does not."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from tls_support import Identities, tls_server


def test_certified_serve_answers_a_known_user_only(tls_identities: Identities, tmp_path: Path) -> None:
    with tls_server(tls_identities, tmp_path / "state", authz="local") as server:
        with server.client("alice") as alice:
            assert alice.get("/healthz").json() == {"status": "ok"}
        anonymous = ssl.create_default_context(cafile=str(tls_identities.server / "CA.crt"))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/healthz", verify=anonymous)
