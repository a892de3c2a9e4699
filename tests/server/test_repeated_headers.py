"""A header that says one thing twice: which one counts?

Two ``Host`` headers (``localhost``, then ``evil.com``) were served 200: the check read
one, a proxy or the framework may read the other. Two ``Content-Type`` headers
(``text/plain``, then ``application/json``) created a job (201): a browser form can send
the first, and the JSON check read the second. A request with a ``Host``,
``Content-Type`` or ``Origin`` header more than once is refused, 400 problem+json naming
the header, and nothing is done.

uvicorn's h11 protocol (the one used without httptools) already answers two ``Host``
headers with its own plain-text 400 before the app sees them; httptools and zttp pass
them on. The in-process tests put the repeated headers in front of the app whatever the
protocol does.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from starlette.applications import Starlette

from support import LiveServer


def _raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is (``Connection: close``) on a new connection; the answer's
    status, headers (lower-case names) and body."""
    parsed = httpx.URL(url)
    with socket.create_connection((parsed.host, parsed.port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _request(method: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} /v1/jobs HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


JOB = json.dumps({"name": "twice", "script": "true"}).encode()


def _jobs(live_app: LiveServer) -> int:
    return int(live_app.server.config.app.state.context.service.store.count())


@pytest.mark.parametrize(
    ("method", "headers", "named"),
    [
        ("GET", [("Host", "localhost"), ("Host", "evil.com")], "Host"),
        ("GET", [("Host", "evil.com"), ("Host", "localhost")], "Host"),
        ("GET", [("Host", "localhost"), ("Host", "localhost")], "Host"),  # the same twice: still two
        ("GET", [("host", "127.0.0.1"), ("HOST", "evil.com")], "Host"),  # names are case-blind
        (
            "POST",
            [("Host", "localhost"), ("Content-Type", "text/plain"), ("Content-Type", "application/json")],
            "Content-Type",
        ),
        (
            "POST",
            [
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Content-Type", "application/json"),
            ],
            "Content-Type",
        ),
        (
            "GET",
            [("Host", "localhost"), ("Origin", "http://localhost"), ("Origin", "http://evil.com")],
            "Origin",
        ),
        (
            "POST",
            [
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Origin", "null"),
                ("Origin", "null"),
            ],
            "Origin",
        ),
        (
            "POST",
            [
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "rep1"),
                ("Idempotency-Key", "rep2"),
            ],
            "Idempotency-Key",
        ),
    ],
)
def test_a_header_given_twice_is_refused(
    live_app: LiveServer, method: str, headers: list[tuple[str, str]], named: str
) -> None:
    status, answer_headers, body = _raw(
        live_app.url, _request(method, headers, JOB if method == "POST" else b"")
    )
    assert status == 400, (status, body[:500])
    if named == "Host" and answer_headers["content-type"].startswith("text/plain"):
        assert _jobs(live_app) == 0  # h11 refused it before the app (see the module doc)
        return
    assert answer_headers["content-type"].startswith("application/problem+json"), answer_headers
    problem = json.loads(body)
    assert problem["code"] == "bad_request" and problem["status"] == 400
    assert named in problem["detail"], problem
    assert _jobs(live_app) == 0, "a refused request created a job"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ([("Host", "localhost"), ("Host", "evil.com")], "Host"),
        (
            [("Host", "localhost"), ("Content-Type", "text/plain"), ("Content-Type", "application/json")],
            "Content-Type",
        ),
        (
            [
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Origin", "null"),
                ("Origin", "null"),
            ],
            "Origin",
        ),
    ],
)
async def test_the_app_refuses_a_header_given_twice_whatever_the_protocol_does(
    app: Starlette, headers: list[tuple[str, str]], named: str
) -> None:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        request = http.build_request("POST", "/v1/jobs", content=JOB)
        request.headers = httpx.Headers([*headers, ("Content-Length", str(len(JOB)))])
        r = await http.send(request)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "bad_request" and named in r.json()["detail"], r.json()
    assert app.state.context.service.store.count() == 0


def test_each_header_once_is_served(live_app: LiveServer) -> None:
    # The same request with one of each: served as before (and other headers may repeat).
    headers = [
        ("Host", "localhost"),
        ("Content-Type", "application/json"),
        ("Origin", "http://localhost"),
        ("Accept", "application/json"),
        ("Accept", "*/*"),
    ]
    status, _, body = _raw(live_app.url, _request("POST", headers, JOB))
    assert status == 201, body[:500]
    status, _, body = _raw(live_app.url, _request("GET", headers[:1]))
    assert status == 200, body[:500]
