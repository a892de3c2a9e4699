"""authz: local — what an ASGI server may put in ``scope["server"]`` and
``scope["client"]``, called as raw ASGI. A shape the checks did not expect (a port of
None, an empty or one-element address) is a clear refusal, never a 500; a request that
names a real socket, whatever host name it reports, gets every check (Host, uid)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from starlette.applications import Starlette

from psik_api_server.auth.peer import PeerLookup

pytestmark = pytest.mark.anyio


class Fixed(PeerLookup):
    """Names ``uid`` for every TCP caller, and counts the lookups."""

    def __init__(self, uid: int | None) -> None:
        super().__init__()
        self.uid, self.calls = uid, 0

    def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
        self.calls += 1
        return self.uid


async def call(app: Starlette, host: bytes = b"localhost", **addresses: Any) -> tuple[int, dict[str, Any]]:
    """GET /v1/jobs with ``server``/``client`` as given (a key left out is absent)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host)],
        **addresses,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    status = int(sent[0]["status"])
    if status != 200:
        assert dict(sent[0]["headers"])[b"content-type"] == b"application/problem+json", sent[0]
    return status, json.loads(body)


LOOPBACK_CLIENT = ("127.0.0.1", 40000)


@pytest.mark.parametrize(
    "addresses",
    [
        {"server": ("127.0.0.1", None), "client": LOOPBACK_CLIENT},  # a launcher without a port
        {"server": ("::1", None), "client": ("::1", 40000)},
        {"server": (), "client": LOOPBACK_CLIENT},
        {"server": ("127.0.0.1",), "client": LOOPBACK_CLIENT},
        {"server": ["127.0.0.1"], "client": LOOPBACK_CLIENT},
        {"server": ("127.0.0.1", "8000"), "client": LOOPBACK_CLIENT},
        {"server": ("127.0.0.1", 8000), "client": ()},
        {"server": ("127.0.0.1", 8000), "client": ("127.0.0.1",)},
        {"server": ("testserver", None), "client": ()},  # httpx's own shape, client emptied
        {"server": ("testserver", None), "client": ("127.0.0.1",)},
        {"server": (None, None), "client": LOOPBACK_CLIENT},
    ],
)
async def test_an_odd_address_is_a_refusal_not_a_500(app: Starlette, addresses: dict[str, Any]) -> None:
    # The real lookup, and one that would name the owner: no address to look up with,
    # so no uid can be believed either way.
    for lookup in (PeerLookup(), Fixed(os.geteuid())):
        app.state.context.peer_lookup = lookup
        status, body = await call(app, **addresses)
        assert status in (401, 403), body
        assert body["code"] in ("forbidden", "unauthorized") and "cannot tell" in body["detail"], body
    assert lookup.calls == 0


@pytest.mark.parametrize("server", [("localhost", 8000), ("testserver", 8000), ("api.example", 443)])
async def test_a_server_named_by_a_host_name_is_checked_as_a_real_socket(
    app: Starlette, server: tuple[str, int]
) -> None:
    # A launcher that reports the name it was told to bind, not the socket's address: a
    # socket all the same (it has a port). Neither the Host check nor the uid is skipped.
    app.state.context.peer_lookup = Fixed(os.geteuid() + 1)
    status, body = await call(app, host=b"evil.example", server=server, client=LOOPBACK_CLIENT)
    assert status == 403 and "Host 'evil.example'" in body["detail"], body
    status, body = await call(app, host=b"localhost", server=server, client=LOOPBACK_CLIENT)
    assert status in (401, 403), body
    assert "cannot tell" in body["detail"] or f"uid {os.geteuid() + 1}" in body["detail"], body


async def test_a_tcp_scope_by_ip_is_looked_up(app: Starlette) -> None:
    app.state.context.peer_lookup = lookup = Fixed(os.geteuid())
    status, _ = await call(app, server=("127.0.0.1", 8000), client=LOOPBACK_CLIENT)
    assert status == 200 and lookup.calls == 1
    app.state.context.peer_lookup = Fixed(os.geteuid() + 1)
    status, body = await call(app, server=("127.0.0.1", 8000), client=LOOPBACK_CLIENT)
    assert status == 403 and f"uid {os.geteuid() + 1}" in body["detail"], body


@pytest.mark.parametrize("addresses", [{}, {"server": None, "client": None}, {"server": None}])
async def test_a_scope_without_addresses_is_an_unhooked_unix_socket_and_refused(
    app: Starlette, addresses: dict[str, Any]
) -> None:
    # hypercorn's and uvicorn's UNIX sockets report server=None, client=None: with no
    # connection to ask the kernel about, that is a caller nobody can name.
    status, body = await call(app, **addresses)
    assert status == 403 and "cannot tell which user" in body["detail"], body


async def test_an_in_process_transport_still_works(app: Starlette) -> None:
    # httpx.ASGITransport: a made-up host name without a port: no socket at all.
    app.state.context.peer_lookup = lookup = Fixed(os.geteuid() + 1)
    status, _ = await call(app, host=b"testserver", server=("testserver", None), client=("127.0.0.1", 123))
    assert status == 200 and lookup.calls == 0
    status, body = await call(app, host=b"testserver", server=("testserver", None), client=("10.1.2.3", 1))
    assert status == 403 and "not local" in body["detail"], body
