"""HTTP hygiene: what every response carries, how downloads are served, which requests
are refused before any route reads them (a method a path does not have, a body framed two
ways, a websocket), on the in-process app and on a live uvicorn."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette

from support import LiveServer

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


def _nosniff(r: httpx.Response) -> None:
    assert r.headers.get_list("x-content-type-options") == ["nosniff"], (r.request.url, r.headers)


async def _job_with_file(http: httpx.AsyncClient, path: str, data: bytes) -> str:
    r = await http.post("/v1/jobs/new", json={"script": "true"})
    assert r.status_code == 201, r.text
    jobid: str = r.json()["jobid"]
    r = await http.put(f"/v1/jobs/{jobid}/files/{quote(path)}", content=data)
    assert r.status_code == 201, r.text
    return jobid


# ---- a method a path does not have is 405, whatever its body ----


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", "/v1/jobs", "GET, HEAD, POST"),
        ("PUT", "/v1/jobs", "GET, HEAD, POST"),
        ("PATCH", "/v1/jobs/1693992878.203", "DELETE, GET, HEAD"),
        ("POST", "/v1/backends", "GET, HEAD"),
        ("PUT", "/v1/jobs/1693992878.203/files", "GET, HEAD, POST"),  # an upload route's path
    ],
)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
async def test_a_method_the_path_lacks_is_405_before_the_body_is_judged(
    http: httpx.AsyncClient, method: str, path: str, allow: str, content_type: str
) -> None:
    r = await http.request(method, path, content=b"a=b", headers={"Content-Type": content_type})
    assert r.status_code == 405, r.text
    assert r.json()["code"] == "method_not_allowed" and r.headers["allow"] == allow


async def test_a_path_with_no_route_is_404_whatever_its_body(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/nope", content=b"a=b", headers={"Content-Type": "text/plain"})
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text


async def test_a_form_body_on_a_real_route_is_still_415(http: httpx.AsyncClient) -> None:
    for path in ("/v1/jobs", "/v1/jobs/1693992878.203/start"):
        r = await http.post(path, content=b"a=b", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text


# ---- X-Content-Type-Options: nosniff on every response ----


async def test_every_response_says_nosniff(app: Starlette, http: httpx.AsyncClient) -> None:
    jobid = await _job_with_file(http, "page.html", b"<script>alert(1)</script>")
    answers = [
        await http.get("/healthz"),
        await http.get("/openapi.json"),
        await http.get("/"),
        await http.get("/v1/jobs"),
        await http.get(f"/v1/jobs/{jobid}"),
        await http.get(f"/v1/jobs/{jobid}/files"),
        await http.get(f"/v1/jobs/{jobid}/files/page.html"),
        await http.head(f"/v1/jobs/{jobid}/files/page.html"),
        await http.get(f"/v1/jobs/{jobid}/files/page.html", headers={"Range": "bytes=0-3"}),
        await http.get(f"/v1/jobs/{jobid}/files/page.html", headers={"Range": "bytes=900-"}),  # 416
        await http.get("/v1/jobs/1693992878.203"),  # 404 from a route
        await http.get("/v1/nope"),  # 404 from the router
        await http.patch("/v1/jobs"),  # 405
        await http.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}),  # 415
        await http.get("/v1/jobs", headers={"Origin": "http://evil.example"}),  # 403 from the guard
        await http.get("/v1/jobs", headers=[("Origin", "http://a"), ("Origin", "http://b")]),  # 400
    ]
    assert [r.status_code for r in answers] == [
        200, 200, 200, 200, 200, 200, 200, 200, 206, 416, 404, 404, 405, 415, 403, 400,
    ]  # fmt: skip
    for r in answers:
        _nosniff(r)


async def test_a_500_says_nosniff_too(app: Starlette, http: httpx.AsyncClient) -> None:
    class Broken:  # a site policy with a bug
        def allows(self, *args: Any) -> bool:
            raise RuntimeError("boom")

    app.state.context.service.policy = Broken()
    r = await http.get("/v1/jobs/1693992878.203")
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    _nosniff(r)


# ---- downloads are attachments ----


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("page.html", "attachment; filename=\"page.html\"; filename*=UTF-8''page.html"),
        ("out/ré sumé.txt", "attachment; filename=\"r_ sum_.txt\"; filename*=UTF-8''r%C3%A9%20sum%C3%A9.txt"),
        ('a"b;c%.txt', "attachment; filename=\"a_b;c%.txt\"; filename*=UTF-8''a%22b%3Bc%25.txt"),
    ],
)
async def test_a_download_is_an_attachment_named_for_the_file(
    http: httpx.AsyncClient, name: str, expected: str
) -> None:
    jobid = await _job_with_file(http, name, b"<html>x</html>")
    for r in (
        await http.get(f"/v1/jobs/{jobid}/files/{quote(name)}"),
        await http.head(f"/v1/jobs/{jobid}/files/{quote(name)}"),
        await http.get(f"/v1/jobs/{jobid}/files/{quote(name)}", headers={"Range": "bytes=0-1"}),
    ):
        assert r.status_code in (200, 206), r.text
        assert r.headers["content-disposition"] == expected
        assert r.headers["content-type"] == "application/octet-stream"
        _nosniff(r)
    listing = await http.get(f"/v1/jobs/{jobid}/files")
    assert "content-disposition" not in listing.headers  # a listing is the API's JSON


# ---- a body framed two ways ----


async def test_content_length_with_transfer_encoding_is_400(http: httpx.AsyncClient) -> None:
    headers = {"Content-Length": "17", "Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    r = await http.post("/v1/jobs", content=b'{"script":"true"}', headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "bad_request" and "Transfer-Encoding" in body["detail"], body
    assert body["errors"][0]["loc"] == ["header", "Transfer-Encoding"], body
    _nosniff(r)
    assert (await http.get("/v1/jobs")).json()["items"] == []


def _raw(live: LiveServer, request: bytes) -> bytes:
    url = httpx.URL(live.url)
    assert url.port is not None
    with socket.create_connection((url.host, url.port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 200:
                break
    return b"".join(chunks)


def test_content_length_with_transfer_encoding_is_refused_live(live_app: LiveServer) -> None:
    body = b'{"script":"touch /tmp/psik-api-smuggled"}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    request = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked
    )
    answer = _raw(live_app, request)
    status = int(answer.split(b" ", 2)[1])
    assert status == 400, answer
    assert httpx.get(f"{live_app.url}/v1/jobs").json()["items"] == []


# ---- websockets: there are none ----


async def _websocket(app: Starlette, extensions: dict[str, Any]) -> list[dict[str, Any]]:
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/v1/events",
        "raw_path": b"/v1/events",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "server": ("testserver", None),
        "client": ("127.0.0.1", 123),
        "subprotocols": [],
        "extensions": extensions,
    }
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_websocket_gets_a_problem_where_the_server_can_send_one(app: Starlette) -> None:
    sent = await _websocket(app, {"websocket.http.response": {}})
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == PROBLEM.encode() and headers[b"x-content-type-options"] == b"nosniff"
    problem = json.loads(sent[1]["body"])
    assert sent[0]["status"] == problem["status"] == 404 and problem["code"] == "not_found", problem
    assert "websocket" in problem["detail"]


async def test_a_websocket_is_closed_where_the_server_cannot(app: Starlette) -> None:
    sent = await _websocket(app, {})
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "this API has no websocket routes"}]


def test_a_websocket_handshake_is_answered_with_a_problem_live(live_app: LiveServer) -> None:
    request = (
        b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = _raw(live_app, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"404", answer
    assert b"content-type: application/problem+json" in head.lower(), answer
    assert b"x-content-type-options: nosniff" in head.lower(), answer
    assert json.loads(body)["code"] == "not_found"
