"""What a backend, a shell or the server itself cannot use is refused up front, naming
what is wrong: job specs that would "fail" without running, bodies nested past the
parser, repeated parameters, non-ASCII keys, nonsense settings and unusable prefixes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
from asgi_lifespan import LifespanManager

from psik_api_core import STRICT_INPUT, JobSpec
from psik_api_server.app import create_app
from psik_api_server.errors import ApiError
from psik_api_server.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.anyio

BAD_SPECS = [
    ({"environment": {"A=B": "x"}}, ["body", "environment"], "not a shell name"),
    ({"environment": {"": "x"}}, ["body", "environment"], "not a shell name"),
    ({"environment": {"1X": "x"}}, ["body", "environment"], "not a shell name"),
    ({"environment": {"PÄTH": "x"}}, ["body", "environment"], "not a shell name"),
    ({"environment": {"A": "x\x00y"}}, ["body", "environment"], "NUL"),
    ({"resources": {"duration": -5}}, ["body", "resources", "duration"], "from 1 to"),
    ({"resources": {"duration": 0}}, ["body", "resources", "duration"], "from 1 to"),
    ({"resources": {"process_count": 0}}, ["body", "resources", "process_count"], "from 1 to"),
    (
        {"resources": {"gpu_cores_per_process": -1}},
        ["body", "resources", "gpu_cores_per_process"],
        "from 0 to",
    ),
    ({"name": "two\nlines"}, ["body", "name"], "control"),
    ({"name": "x" * 257}, ["body", "name"], "longer than 256"),
    ({"script": "echo \x00"}, ["body", "script"], "NUL"),
    ({"attributes": {"--comment": "a\nb"}}, ["body", "attributes"], "control"),
    ({"cb_headers": {"X-A": "a\r\nInjected: 1"}}, ["body", "cb_headers"], "control"),
    # A path with NUL reaches no file (Path.resolve raised: a 500), a URL with a line
    # break would split the callback's request line.
    ({"directory": "/tmp/a\x00b"}, ["body", "directory"], "NUL"),
    ({"directory": "\x00"}, ["body", "directory"], "NUL"),
    ({"callback": "http://127.0.0.1:9/a\r\nX-Injected: 1"}, ["body", "callback"], "control"),
    # urlsplit raises on these (a 500 before): brackets that hold no IP address, an
    # unclosed or stray bracket, a netloc NFKC turns into another URL ("℀" is "a/c").
    ({"callback": "http://[cb.example.org]/"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "http://[::1"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "http://]/"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "http://\u2100.com/"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "http://a:99999/"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "http://a..b/"}, ["body", "callback"], "not a valid URL"),
    ({"callback": "ftp://cb.example.org/"}, ["body", "callback"], "absolute http(s) URL"),
    ({"callback": "/v1/relative"}, ["body", "callback"], "absolute http(s) URL"),
]


@pytest.mark.parametrize(("extra", "loc", "why"), BAD_SPECS)
async def test_a_spec_a_backend_cannot_run_is_422_naming_the_field(
    http: httpx.AsyncClient, extra: dict[str, Any], loc: list[str], why: str
) -> None:
    for route in ("/v1/jobs/new", "/v1/jobs"):
        r = await http.post(route, json={"script": "true", **extra})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "validation_error"
        assert [e["loc"] for e in problem["errors"]] == [loc]
        assert why in problem["errors"][0]["msg"]
    assert (await http.get("/v1/jobs")).json()["items"] == []  # nothing was made


async def test_no_callback_string_is_a_500(http: httpx.AsyncClient) -> None:
    """A few hundred random strings, made of what trips URL parsers (brackets, colons,
    ports, characters NFKC or IDNA change), as callbacks: each is a 201 or a 422 naming
    the field, never a 500 (seeded: a failure can be replayed)."""
    rng = random.Random(14)
    pieces = ["http://", "https://", "[", "]", "::1", ":", "@", "%", "/", "?", "#", ".", "..",
              "a", "xn--", "\u2100", "\ufe6b", "\uff0f", "\u00df", "\u0663", "99999", "80", "-",
              "\u200d", "\u3002", "\U0001f600", " ", "\\", "v1.x", "127.0.0.1", "%2F"]  # fmt: skip
    seen: dict[int, int] = {}
    for _ in range(300):
        url = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        r = await http.post("/v1/jobs/new", json={"script": "true", "callback": url})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (201, 422), (url, r.text)
        if r.status_code == 422:
            assert [e["loc"] for e in r.json()["errors"]] == [["body", "callback"]], (url, r.text)
    assert seen.get(422) and seen.get(201), seen  # the strings reached both answers


def test_stored_specs_are_read_as_psik_wrote_them() -> None:
    # The checks are for input: a job a psik command line made with duration 0 still reads.
    spec = JobSpec.model_validate({"script": "t", "resources": {"duration": 0}, "environment": {"A=B": "1"}})
    assert spec.resources.duration == 0
    with pytest.raises(pydantic.ValidationError):
        JobSpec.model_validate(spec.model_dump(), context=STRICT_INPUT)


async def test_a_body_nested_past_the_parser_is_400_not_500(http: httpx.AsyncClient) -> None:
    deep = '{"script": "t", "attributes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = await http.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert r.json()["errors"][0]["loc"] == ["body"]


@pytest.mark.parametrize("query", ["limit=5&limit=6", "backend=a&backend=b", "cursor=x&cursor=y"])
async def test_a_parameter_given_twice_is_422_naming_it(http: httpx.AsyncClient, query: str) -> None:
    r = await http.get(f"/v1/jobs?{query}")
    name = query.split("=")[0]
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", name]
    assert "more than once" in r.json()["detail"]


async def test_repeatable_filters_still_repeat(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/jobs?state=new&state=failed&id=1.1&id=1.2")
    assert r.status_code == 200 and r.json()["items"] == []


async def test_an_idempotency_key_is_printable_ascii(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/jobs/new", json={"script": "true"}, headers={"Idempotency-Key": "café".encode()})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    r = await http.post("/v1/jobs/new", json={"script": "true"}, headers={"Idempotency-Key": "cafe-1"})
    assert r.status_code == 201


@pytest.mark.parametrize("key", ["watch_interval", "liveness_interval"])
@pytest.mark.parametrize("value", [0, -1])
def test_intervals_must_be_positive(tmp_path: Path, key: str, value: float) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(**{key: value})
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=key):
        load_settings(cfg)


@pytest.mark.parametrize("what", ["prefix is a file", "database is not sqlite"])
def test_an_unusable_prefix_or_index_stops_start_up_in_one_line(tmp_path: Path, what: str) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"\x8a not a database, not a directory " * 10)
    doc = (
        {"prefix": str(afile)}
        if what == "prefix is a file"
        else {"prefix": str(tmp_path / "jobs"), "database": str(afile)}
    )
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "psik_api_server", "serve", "--config", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("psik-api-server: cannot start: ") and str(afile) in last, proc.stderr
    assert "Traceback" not in proc.stderr


RAW_BODIES = [
    ('{"script": "t", "resources": {"duration": "3"}}', ["body", "resources", "duration"]),
    ('{"script": "t", "resources": {"duration": 3.0}}', ["body", "resources", "duration"]),
    ('{"script": "t", "resources": {"exclusive_node_use": 0}}', ["body", "resources", "exclusive_node_use"]),
    ('{"script": "t", "inherit_environment": "false"}', ["body", "inherit_environment"]),
    ('{"script": 7}', ["body", "script"]),
    ('{"script": "t", "environment": {"A": 1}}', ["body", "environment", "A"]),
    ('{"script": "t", "resources": {"duration": ' + "9" * 40 + "}}", ["body", "resources", "duration"]),
    ('{"script": "t", "resources": {"node_count": 2147483648}}', ["body", "resources", "node_count"]),
    # Over Python's 4300-digit limit for int(): json.loads raised ValueError, a 500.
    ('{"script": "t", "resources": {"duration": ' + "9" * 4301 + "}}", ["body", "resources", "duration"]),
    ('{"script": "t", "resources": {"duration": -' + "9" * 5000 + "}}", ["body", "resources", "duration"]),
    ('{"script": "t", "environment": {"A": ' + "1" * 4301 + "}}", ["body", "environment", "A"]),
    # Valid JSON syntax, but a lone surrogate is no character: no file can hold it.
    ('{"script": "t", "name": "\\ud800"}', ["body", "name"]),
    ('{"script": "t\\udc00"}', ["body", "script"]),
    ('{"script": "t", "environment": {"A": "x\\ud800y"}}', ["body", "environment"]),
    ('{"script": "t", "environment": {"\\ud800": "x"}}', ["body", "environment"]),
    ('{"script": "t", "cb_secret": "\\udfff"}', ["body", "cb_secret"]),
    # A key given twice: which one counts is up to the parser; refused, naming it.
    ('{"script": "x", "script": "y"}', ["body", "script"]),
    ('{"script": "t", "resources": {"duration": 1, "duration": 2}}', ["body", "resources", "duration"]),
    ('{"script": "t", "environment": {"A": "1", "A": "2"}}', ["body", "environment", "A"]),
]


@pytest.mark.parametrize(("body", "loc"), RAW_BODIES)
async def test_values_are_not_coerced_and_out_of_range_ones_are_422(
    http: httpx.AsyncClient, body: str, loc: list[str]
) -> None:
    """The body is checked as strictly as the published schema says."""
    r = await http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == loc
    assert (await http.get("/v1/jobs")).json()["items"] == []


NOT_JSON = [
    (b"", "empty"),
    (b"\xef\xbb\xbf" + b'{"script": "t"}', "BOM"),
    (b'{"script": "\xff"}', "UTF-8"),
    (b'{"script": "caf\xe9"}', "UTF-8"),  # Latin-1
    ('{"script": "t"}'.encode("utf-16"), "UTF-8"),
    ('{"script": "t"}'.encode("utf-16-le"), "line 1"),
    (b'{"script": "t", "resources": {"duration": NaN}}', "NaN"),
    (b'{"script": "t", "resources": {"duration": Infinity}}', "Infinity"),
    (b'{"script": "t", "resources": {"duration": -Infinity}}', "-Infinity"),
    (b'{"script": "t",}', "line 1"),
    (b"{'script': 't'}", "line 1"),
    (b'{"script": "t"} x', "line 1"),
    (b'{"script": "a\nb"}', "line 1"),  # a raw control character in a string
    (b'{"script": "\\ud800', "line 1"),  # cut off in an escape
]


@pytest.mark.parametrize(("body", "why"), NOT_JSON)
async def test_a_body_that_is_not_json_is_400_saying_why(
    http: httpx.AsyncClient, body: bytes, why: str
) -> None:
    """JSON as RFC 8259 has it: UTF-8, no BOM, no NaN or Infinity."""
    for route in ("/v1/jobs/new", "/v1/jobs"):
        r = await http.post(route, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        problem = r.json()
        assert problem["code"] == "bad_request" and problem["errors"][0]["loc"] == ["body"]
        assert problem["detail"].startswith("the body is not valid JSON"), problem
        assert why in problem["detail"], problem
        assert "hex escape" not in problem["detail"]
    assert (await http.get("/v1/jobs")).json()["items"] == []


@pytest.mark.parametrize(
    ("body", "loc", "why"),
    [
        (
            '{"script": "t", "resources": {"duration": ' + "9" * 4301 + "}}",
            ["body", "resources", "duration"],
            "too large",
        ),
        ('{"script": "t", "name": "\\ud800"}', ["body", "name"], "surrogate"),
        ('{"script": "x", "script": "y"}', ["body", "script"], "more than once"),
    ],
)
async def test_what_json_allows_but_a_job_cannot_take_says_what(
    http: httpx.AsyncClient, body: str, loc: list[str], why: str
) -> None:
    r = await http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert r.json()["errors"] == [{"loc": loc, "msg": r.json()["errors"][0]["msg"], "type": "value_error"}]
    assert why in r.json()["errors"][0]["msg"] and why in r.json()["detail"]


async def test_what_json_allows_still_goes(http: httpx.AsyncClient) -> None:
    """A surrogate pair is one character; 4300 digits are a number (out of range here)."""
    body = '{"script": "echo \\ud83d\\ude00 \\u00e9", "name": "caf\u00e9"}'.encode()
    r = await http.post("/v1/jobs/new", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["script"] == "echo \U0001f600 \u00e9" and r.json()["spec"]["name"] == "caf\u00e9"
    body = ('{"script": "t", "resources": {"duration": ' + "9" * 4300 + "}}").encode()
    r = await http.post("/v1/jobs/new", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "from 1 to" in r.json()["errors"][0]["msg"]


async def test_the_seed_readme_bodies_still_validate(http: httpx.AsyncClient) -> None:
    body = {
        "name": "show system info",
        "script": "cat /proc/cpuinfo; hostname",
        "resources": {"process_count": 8, "cpu_cores_per_process": 7, "duration": 2},
    }
    r = await http.post("/v1/jobs/new", json=body)
    assert r.status_code == 201 and r.json()["spec"]["resources"]["process_count"] == 8


@pytest.mark.parametrize("path", ["/v1/jobs/1.2%00", "/v1/jobs/%00", "/v1/jobs/1.2%00/state"])
async def test_nul_in_a_path_is_refused(http: httpx.AsyncClient, path: str) -> None:
    r = await http.get(path)
    assert r.status_code in {404, 422} and r.headers["content-type"] == "application/problem+json"


async def test_a_directory_that_cannot_be_resolved_is_422_not_500(settings: Settings, tmp_path: Path) -> None:
    """Path.resolve raises on a symlink loop (RuntimeError) and on NUL (ValueError): the
    server names the field either way, even for a spec that skipped the input check."""
    root = tmp_path / "allowed"
    root.mkdir()
    os.symlink(root / "loop", root / "loop")
    settings.directory_roots = [root]
    app = create_app(settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        for route in ("/v1/jobs/new", "/v1/jobs"):
            for directory in (root / "loop", root / "loop" / "x"):
                r = await http.post(route, json={"script": "t", "directory": str(directory)})
                assert r.status_code == 422, r.text
                assert r.json()["errors"][0]["loc"] == ["body", "directory"]
        assert (await http.get("/v1/jobs")).json()["items"] == []
    service = app.state.context.service
    with pytest.raises(ApiError) as caught:
        service.specs.check_directory(str(root / "a\x00b"))
    assert caught.value.code.status == 422
