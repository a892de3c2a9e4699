"""A client that half-closes after its request (``shutdown(SHUT_WR)``, as ``nc -N``
does) still gets its answer, and is still named in ``authz: local``.

Its end of the connection is then FIN_WAIT1, or FIN_WAIT2 once the server's kernel has
acknowledged the FIN, while the client's process still holds the socket (an inode): the
uid is its owner's, unlike an orphan's (no inode: ``test_peer_orphan``). And the server
must not take the EOF as the end of the connection before it has answered the request
it has read (asyncio closes the transport on EOF unless the protocol says otherwise);
afterwards it closes the connection, and a client that half-closes without a complete
request is closed at once, as before."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import lazy_app
from psik_api_server.auth.peer import PeerLookup
from psik_api_server.serving.limits import ConnectionLimits
from psik_api_server.serving.uvicorn_seam import ConnectionHooks
from psik_api_server.serving.uvicorn_seam import install as install_uvicorn_hook
from psik_api_server.settings import Settings
from support import LiveServer, client_tcp_state, hold_loop

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def _row(n: int, local: str, remote: str, state: str, uid: int, inode: int) -> str:
    return (
        f"   {n}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
    )


def test_a_half_closed_end_still_held_names_its_owner_in_the_tables(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    lo = "0100007F" if sys.byteorder == "little" else "7F000001"
    server = f"{lo}:1F40"
    rows = [
        ("04", 1234, 4321),  # FIN_WAIT1, half-closed (shutdown): the owner holds it
        ("05", 1234, 4322),  # FIN_WAIT2, half-closed and acknowledged: the same
        ("04", 1234, 0),  # FIN_WAIT1 orphan (closed): cannot tell
        ("05", 0, 0),  # FIN_WAIT2 mini-socket: cannot tell
        ("0B", 1234, 4323),  # CLOSING: not a half-close this names
        ("09", 1234, 4324),  # LAST_ACK: nor this
    ]
    (net / "tcp").write_text(
        TCP_HEADER
        + _row(0, server, "00000000:0000", "0A", 0, 1)
        + "".join(
            _row(n + 1, f"{lo}:{0xD431 + n:04X}", server, state, uid, inode)
            for n, (state, uid, inode) in enumerate(rows)
        )
    )
    (net / "tcp6").write_text(TCP_HEADER)
    lookup = PeerLookup(proc_root=tmp_path, sock_diag=False)
    found = [lookup.tcp_uid(("127.0.0.1", 0xD431 + n), ("127.0.0.1", 8000)) for n in range(len(rows))]
    assert found == [1234, 1234, None, None, None, None]


@pytest.mark.skipif(sys.platform != "linux", reason="TCP states are Linux's /proc and sock_diag")
def test_both_lookups_name_the_owner_of_a_half_closed_end() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        accepted, _ = server.accept()
        with accepted:
            client.sendall(b"POST /v1/jobs HTTP/1.1\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 10
            ends = (client.getsockname()[1], server.getsockname()[1])
            while client_tcp_state(*ends) != "05" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client_tcp_state(*ends) == "05"  # FIN_WAIT2, still held
            for lookup in (PeerLookup(), PeerLookup(sock_diag=False)):
                assert lookup.tcp_uid(accepted.getpeername(), accepted.getsockname()) == os.geteuid()


# ---- a real server ----

HOOKS = {
    "serve": lambda: ConnectionHooks(ConnectionLimits(max_connections=100, header_timeout=2.0)).protocol(),
    "no-limits": lambda: ConnectionHooks().protocol(),
    "patched": lambda: _patched_h11(),
}


def _patched_h11() -> type[asyncio.Protocol]:
    # The run-time patch, for launchers we do not control (``uvicorn main:app``).
    from uvicorn.protocols.http.h11_impl import H11Protocol

    install_uvicorn_hook()
    return H11Protocol


@pytest.fixture(params=sorted(HOOKS))
def live(request: pytest.FixtureRequest, settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(lazy_app(settings))
    server.server.config.http = HOOKS[request.param]()
    with server:
        yield server


def _request(port: int, name: str) -> bytes:
    body = json.dumps({"name": name, "script": "true"}).encode()
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _read_to_eof(sock: socket.socket, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _response(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = {k.lower(): v for k, v in headers.items()}.get("content-length")
    assert length is not None and len(body) == int(length), answer
    return status, json.loads(body)


def _until(what: str, done: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def test_a_half_closed_client_gets_its_answer(live: LiveServer) -> None:
    url = httpx.URL(live.url)
    assert url.port is not None
    for n in range(10):
        with socket.create_connection((url.host, url.port)) as raw:
            raw.sendall(_request(url.port, f"half-{n}"))
            raw.shutdown(socket.SHUT_WR)
            answer = _read_to_eof(raw)  # the server answers, then closes
        assert answer.startswith(b"HTTP/1.1 201 "), (n, answer[:300])
        status, job = _response(answer)
        assert status == 201 and job["name"] == f"half-{n}"
    with httpx.Client(base_url=live.url) as http:
        assert sorted(j["name"] for j in http.get("/v1/jobs").json()["items"]) == sorted(
            f"half-{n}" for n in range(10)
        )
    _until("no connection is left", lambda: not live.server.server_state.connections)


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n", b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"],
    ids=["nothing", "part-of-a-head", "part-of-a-body"],
)
def test_a_client_that_half_closes_without_a_whole_request_is_closed(live: LiveServer, sent: bytes) -> None:
    url = httpx.URL(live.url)
    assert url.port is not None
    with socket.create_connection((url.host, url.port)) as raw:
        raw.sendall(sent)
        raw.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        answer = _read_to_eof(raw, timeout=10)
        assert time.monotonic() - started < 5
    assert b" 201 " not in answer
    _until("no connection is left", lambda: not live.server.server_state.connections)
    with httpx.Client(base_url=live.url) as http:
        assert http.get("/v1/jobs").json()["items"] == []


def test_a_keep_alive_client_that_half_closes_after_its_answer_is_closed(live: LiveServer) -> None:
    url = httpx.URL(live.url)
    assert url.port is not None
    with socket.create_connection((url.host, url.port)) as raw:
        raw.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{url.port}\r\n\r\n".encode())
        raw.settimeout(10)
        first = raw.recv(65536)
        while b"\r\n\r\n" not in first:  # the head may come in pieces, and the body after it
            first += raw.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), first
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += raw.recv(65536)
        raw.shutdown(socket.SHUT_WR)
        assert _read_to_eof(raw, timeout=5) == b""  # closed at once, not at keep-alive's end
    _until("no connection is left", lambda: not live.server.server_state.connections)


@pytest.mark.skipif(sys.platform != "linux", reason="TCP states are Linux's /proc and sock_diag")
@pytest.mark.parametrize("sock_diag", [True, False], ids=["sock_diag", "proc-tables"])
def test_a_client_accepted_after_its_half_close_is_named(live: LiveServer, sock_diag: bool) -> None:
    # A busy server accepts the connection after the client's FIN: the end is FIN_WAIT2,
    # still held by its owner. Before, that was "cannot tell" (401, as the tester saw).
    live.server.config.app.state.context.peer_lookup = PeerLookup(sock_diag=sock_diag)
    url = httpx.URL(live.url)
    assert url.port is not None
    for n in range(3):
        release = hold_loop(live)
        try:
            raw = socket.create_connection((url.host, url.port))
            raw.sendall(_request(url.port, f"late-{n}"))
            raw.shutdown(socket.SHUT_WR)
            port = raw.getsockname()[1]
            _until("the client's end is FIN_WAIT2", lambda: client_tcp_state(port, url.port) == "05")  # noqa: B023
        finally:
            release.set()
        with raw:
            answer = _read_to_eof(raw)
        assert answer.startswith(b"HTTP/1.1 201 "), (n, answer[:400])
