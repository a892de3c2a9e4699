"""Request ids: every answer carries ``X-Request-ID`` (the client's when it is sane, else a
new one, never an unsafe value echoed), every problem its ``request_id``, every log line
written for the request names it, and ``log_format: json`` adds one access line per
request naming the route template, never the raw path."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from conftest import lazy_app
from psik_api_server.serving.request_log import (
    ACCESS_LOGGER,
    JsonFormatter,
    RequestIdFilter,
    RequestLog,
    TextFormatter,
    sane_request_id,
)
from psik_api_server.settings import Settings

pytestmark = pytest.mark.anyio

NEW_ID = re.compile(r"[0-9a-f]{32}")
JOBID = "1693992878.203"


class Records(logging.Handler):
    """Every record its logger gets, after the request-id filter (as the server's handler)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


@pytest.fixture
async def json_http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = lazy_app(settings.model_copy(update={"log_format": "json"}))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client,
    ):
        yield client


async def test_every_answer_has_a_new_id(http: httpx.AsyncClient) -> None:
    ok = await http.get("/v1/jobs")
    missing = await http.get(f"/v1/jobs/{JOBID}")
    nowhere = await http.get("/no/such/route")
    ids = [r.headers["x-request-id"] for r in (ok, missing, nowhere)]
    assert all(NEW_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == 3


async def test_a_problem_names_its_request(http: httpx.AsyncClient) -> None:
    for r in (
        await http.get(f"/v1/jobs/{JOBID}"),  # the handler's ApiError
        await http.get("/no/such/route"),  # starlette's 404
        await http.patch("/v1/jobs"),  # 405
        await http.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}),
        await http.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}),  # the guard's
    ):
        assert r.headers["content-type"].startswith("application/problem+json"), r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]


async def test_a_sane_client_id_is_kept(http: httpx.AsyncClient) -> None:
    given = "req-42_A.b" + "x" * 54  # 64 characters
    r = await http.get(f"/v1/jobs/{JOBID}", headers={"X-Request-ID": given})
    assert r.headers["x-request-id"] == given
    assert r.json()["request_id"] == given
    assert r.headers.get_list("x-request-id") == [given]


@pytest.mark.parametrize(
    "given",
    ["", "x" * 65, "a b", "a/b", "<script>", "id\u00e9", "a;b=c", "%0d%0aSet-Cookie:x"],
)
async def test_an_unsafe_client_id_is_never_echoed(http: httpx.AsyncClient, given: str) -> None:
    r = await http.get(f"/v1/jobs/{JOBID}", headers=[(b"X-Request-ID", given.encode("utf-8"))])
    assert NEW_ID.fullmatch(r.headers["x-request-id"])
    assert given.encode() not in r.content or given == ""
    assert r.json()["request_id"] == r.headers["x-request-id"]


async def test_two_client_ids_make_a_new_one(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/jobs", headers=[(b"X-Request-ID", b"one"), (b"X-Request-ID", b"two")])
    assert NEW_ID.fullmatch(r.headers["x-request-id"])


def test_sane_request_id() -> None:
    assert sane_request_id("abc-DEF_0.9") == "abc-DEF_0.9"
    assert sane_request_id(b"abc") == "abc"
    for bad in ("abc\n", "", "x" * 65, b"\xff", None, "a\x00"):
        assert sane_request_id(bad) is None


async def test_log_lines_of_a_request_carry_its_id(records: Records) -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        logging.getLogger("psik_api_server.test").info("inside")
        return PlainTextResponse("ok")

    app = RequestLog(Starlette(routes=[Route("/x", endpoint)]))
    logging.getLogger("psik_api_server.test").info("outside")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.get("/x", headers={"X-Request-ID": "abc"})
    assert r.headers["x-request-id"] == "abc"
    ids = {rec.getMessage(): rec.request_id for rec in records.records if rec.name == "psik_api_server.test"}  # type: ignore[attr-defined]
    assert ids == {"inside": "abc", "outside": None}
    inside = next(rec for rec in records.records if rec.getMessage() == "inside")
    assert TextFormatter("%(levelname)s: %(name)s: %(message)s").format(inside) == (
        "INFO: psik_api_server.test: inside (request abc)"
    )
    line = json.loads(JsonFormatter().format(inside))
    assert line["request_id"] == "abc" and line["message"] == "inside" and line["level"] == "INFO"


async def test_a_streamed_answer_is_counted_and_tagged(records: Records) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 1000

    async def endpoint(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(chunks())

    app = RequestLog(
        Starlette(routes=[Route("/jobs/{jobid}/stream", endpoint, methods=["POST"])]),
        access_log=True,
        identity=lambda scope: "alice",
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.post("/jobs/123.4/stream?token=SECRET", content=b"y" * 10)
    assert r.content == b"x" * 3000 and NEW_ID.fullmatch(r.headers["x-request-id"])
    (access,) = [rec for rec in records.records if rec.name == ACCESS_LOGGER]
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["route"] == "/jobs/{jobid}/stream"
    assert (line["method"], line["status"], line["identity"]) == ("POST", 200, "alice")
    assert (line["bytes_in"], line["bytes_out"]) == (10, 3000)
    assert line["duration_ms"] >= 0
    assert "123.4" not in json.dumps(line) and "SECRET" not in json.dumps(line)


async def test_json_access_lines_name_the_route_template(
    json_http: httpx.AsyncClient, records: Records
) -> None:
    await json_http.get("/v1/jobs")
    await json_http.get(f"/v1/jobs/{JOBID}/files/a/b.txt")
    await json_http.get("/v1/jobs/not-a-job-id/state")
    await json_http.get("/nothing/here/1693992878.203")
    lines = [json.loads(JsonFormatter().format(r)) for r in records.records if r.name == ACCESS_LOGGER]
    assert [(x["route"], x["status"]) for x in lines] == [
        ("/v1/jobs", 200),
        ("/v1/jobs/{jobid}/files/{path}", 404),
        ("/v1/jobs/{jobid}/state", 422),
        ("unmatched", 404),
    ]
    assert {x["identity"] for x in lines[:3]} == {"local:psik_api"}
    assert all(JOBID not in json.dumps(x) for x in lines)


async def test_text_mode_writes_no_access_line(http: httpx.AsyncClient, records: Records) -> None:
    await http.get("/v1/jobs")
    assert not [r for r in records.records if r.name == ACCESS_LOGGER]


def test_log_format_from_the_config(tmp_path: Path) -> None:
    from psik_api_server.settings import ConfigError, load_settings

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"log_format": "json"}))
    assert load_settings(path).log_format == "json"
    assert Settings().log_format == "text"
    path.write_text(json.dumps({"log_format": "xml"}))
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(path)
