"""Where the client connects (arguments, environment, UNIX socket), what it sends,
and what it refuses to send."""

from __future__ import annotations

import json
import re
import socketserver
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import h11._headers as h11_headers
import httpx
import pydantic
import pytest

import psik_api_client as pac
from client.fakes import Api, job_json
from psik_api_client._base import DEFAULT_URL, Target, resolve_target
from psik_api_client._inputs import checked_headers
from psik_api_core import LIMITS

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


# ---- where ----


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ({}, {}, Target(DEFAULT_URL)),
        ({}, {"PSIK_API_URL": "http://hpc:9000"}, Target("http://hpc:9000")),
        ({"base_url": "http://arg:1"}, {"PSIK_API_URL": "http://hpc:9000"}, Target("http://arg:1")),
        ({}, {"PSIK_API_UDS": "/run/api.sock"}, Target("http://localhost", "/run/api.sock")),
        # An explicit URL means the socket in the environment is not meant.
        ({"base_url": "http://arg:1"}, {"PSIK_API_UDS": "/run/api.sock"}, Target("http://arg:1")),
        ({"uds": "/a.sock"}, {"PSIK_API_URL": "http://hpc:9000"}, Target("http://localhost", "/a.sock")),
        ({"uds": "/a.sock", "base_url": "http://x/p"}, {}, Target("http://x/p", "/a.sock")),
        ({"has_transport": True}, {"PSIK_API_UDS": "/run/api.sock"}, Target(DEFAULT_URL)),
    ],
)
def test_resolve_target(args: dict[str, Any], env: dict[str, str], expected: Target) -> None:
    assert resolve_target(environ=env, **args) == expected


def test_uds_expands_the_home_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_target(uds="~/api.sock", environ={}).uds == str(tmp_path / "api.sock")
    assert resolve_target(environ={"PSIK_API_UDS": "~/e.sock"}).uds == str(tmp_path / "e.sock")


def test_uds_and_transport_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        pac.Client(uds="/a.sock", transport=httpx.MockTransport(lambda r: httpx.Response(200)))


def test_client_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    monkeypatch.setenv("PSIK_API_URL", "http://from-env:8123")
    with pac.Client() as api:
        assert api.base_url == "http://from-env:8123"
        assert api.uds is None


class _UnixHTTPServer(socketserver.UnixStreamServer):
    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("uds", 0)  # http.server logs client_address[0]


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "path": self.path, "host": self.headers["Host"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def uds_server(tmp_path: Path) -> Iterator[Path]:
    """A real HTTP server on a UNIX socket in tmp_path; yields the socket's path."""
    path = tmp_path / "api.sock"
    server = _UnixHTTPServer(str(path), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()
    thread.join()


def test_sync_client_talks_over_a_unix_socket(
    uds_server: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pac.Client(uds="~/api.sock") as api:
        assert api.health() == {"status": "ok", "path": "/healthz", "host": "localhost"}


async def test_async_client_talks_over_a_unix_socket(
    uds_server: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSIK_API_UDS", str(uds_server))
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    async with pac.AsyncClient() as api:
        assert api.uds == str(uds_server)
        assert (await api.health())["path"] == "/healthz"


async def test_base_url_path_prefix_is_kept(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(200, json=job_json()), base_url="http://gw.example/psik/")
    await api.get(JOBID)
    assert str(api.requests[0].url) == f"http://gw.example/psik/v1/jobs/{JOBID}"


async def test_headers_are_sent_with_every_request(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(200, json=[]), headers={"Authorization": "Bearer t0k"})
    await api.backends()
    headers = api.requests[0].headers
    assert headers["Authorization"] == "Bearer t0k"
    assert headers["User-Agent"] == f"psik-api-client/{pac.__version__}"
    assert headers["Accept"] == "application/json"


SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("headers", "fault"),
    [
        ({"X-A": "a\nb"}, "X-A's value holds a line break"),
        ({"Authorization": f"Bearer {SECRET}\r\n"}, "Authorization's value holds a line break"),
        ({"X-A": "a\x00b"}, "X-A's value holds a control character"),
        ({"X-A": "a\x7fb"}, "X-A's value holds a control character"),
        ({"X-A": "clé"}, "X-A's value holds a non-ASCII character"),
        ({"X-A": " a"}, "X-A's value begins or ends with whitespace"),
        ({"X-A": "a\t"}, "X-A's value begins or ends with whitespace"),
        ({"X A": "a"}, "not an HTTP header name: 'X A'"),
        ({"X-A:": "a"}, "not an HTTP header name: 'X-A:'"),
        ({"X\nA": "a"}, "not an HTTP header name"),
        ({"": "a"}, "not an HTTP header name: ''"),
        ({"Ä": "a"}, "not an HTTP header name"),
    ],
)
async def test_unsendable_headers_fail_before_sending(
    connect: Callable[..., Api], headers: dict[str, str], fault: str
) -> None:
    # httpx would refuse them only as the request goes out, as a "connection" error.
    api = connect(lambda req: httpx.Response(200, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match=f"^extra_headers=: .*{fault}") as info:
        await api.get(JOBID, extra_headers=headers)
    assert isinstance(info.value, ValueError)
    assert SECRET not in str(info.value)  # a value may be a credential: never shown
    with pytest.raises(pac.InvalidRequestError, match=f"^headers=: .*{fault}"):
        connect(lambda req: httpx.Response(200, json=job_json()), headers=headers)
    assert api.requests == []


async def test_headers_h11_accepts_are_sent(connect: Callable[..., Api]) -> None:
    headers = {"X-Odd_Name!#$%&'*+.^`|~": "a  b\tc", "X-Empty": "", "X-Json": '{"a": [1, 2]}'}
    api = connect(lambda req: httpx.Response(200, json=job_json()), headers={"X-Empty": ""})
    await api.get(JOBID, extra_headers=headers)
    sent = api.requests[0].headers
    assert [sent[name] for name in headers] == list(headers.values())


def test_every_header_value_the_client_lets_through_h11_sends() -> None:
    for code in range(0x80):
        for value in (f"a{chr(code)}b", f"{chr(code)}b", f"a{chr(code)}"):
            try:
                checked_headers({"X-A": value}, argument="extra_headers=")
            except pac.InvalidRequestError:
                continue
            h11_headers.normalize_and_validate([("X-A", value)])  # raises if h11 refuses


def test_clients_close_on_exit() -> None:
    with pac.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as api:
        pass
    assert api._http.is_closed


async def test_async_clients_close_on_exit() -> None:
    async with pac.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as api:
        pass
    assert api._http.is_closed


# ---- what is sent ----


@pytest.mark.parametrize("jobid", ["../x", "1.2\n", "", "1.2/state", "1.2?purge=true", "１.２", "abc"])
@pytest.mark.parametrize("method", ["get", "state", "start", "cancel", "purge", "wait"])
async def test_malformed_job_ids_never_reach_a_url(
    connect: Callable[..., Api], method: str, jobid: str
) -> None:
    api = connect(lambda req: httpx.Response(200, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match="not a job id") as info:
        await getattr(api, method)(jobid)
    assert isinstance(info.value, ValueError)
    assert api.requests == []


async def test_wait_all_checks_every_id_first(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(200, json={"items": []}))
    with pytest.raises(pac.InvalidRequestError, match="not a job id"):
        await api.wait_all(["1.0", "../etc"])
    assert api.requests == []


async def test_backend_names_are_quoted(connect: Callable[..., Api]) -> None:
    info = {"name": "a b?#%", "type": "slurm"}
    api = connect(lambda req: httpx.Response(200, json=info))
    assert (await api.backend("a b?#%")).type == "slurm"
    assert api.requests[0].url.raw_path == b"/v1/backends/a%20b%3F%23%25"
    # The server decodes %2F before routing: a name with "/" would be "no such route".
    for bad in ("..", ".", "", "a/b", "../x", "/"):
        with pytest.raises(pac.InvalidRequestError, match="not a backend name"):
            await api.backend(bad)
    assert len(api.requests) == 1


@pytest.mark.parametrize("method", ["list", "list_page"])
async def test_a_list_checks_every_id_first(connect: Callable[..., Api], method: str) -> None:
    api = connect(lambda req: httpx.Response(200, json={"items": [], "next_cursor": None}))
    for bad in ["..", "1.2/state", "", "abc"]:
        with pytest.raises(pac.InvalidRequestError, match=re.escape(f"not a job id: {bad!r}")) as info:
            await getattr(api, method)(ids=["1.0", bad])
        assert isinstance(info.value, ValueError)
    assert api.requests == []


async def test_submit_sends_the_spec_with_an_idempotency_key(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    spec = pac.JobSpec(name="hello", script="echo hi", resources=pac.ResourceSpec(node_count=2))
    await api.submit(spec)
    await api.submit(spec)
    first, second = api.requests
    assert first.method == "POST" and first.url.path == "/v1/jobs"
    # Only what was set travels: the server fills in its own defaults.
    assert json.loads(first.content) == {"name": "hello", "script": "echo hi", "resources": {"node_count": 2}}
    keys = [first.headers["Idempotency-Key"], second.headers["Idempotency-Key"]]
    assert len(set(keys)) == 2 and all(len(k) == 36 for k in keys)


async def test_create_posts_to_new_with_the_given_key(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json(state="new")))
    job = await api.create({"script": "true"}, idempotency_key="my-key")
    assert job.state is pac.JobState.new
    assert api.requests[0].url.path == "/v1/jobs/new"
    assert api.requests[0].headers["Idempotency-Key"] == "my-key"


async def test_the_callback_secret_is_sent_unmasked(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    await api.submit({"script": "true", "callback": "https://hook", "cb_secret": "s3cr3t"})
    assert json.loads(api.requests[0].content)["cb_secret"] == "s3cr3t"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "no script"}, "invalid job spec: script: Field required"),
        ({"script": "true", "resources": {"duration": "ten"}}, "invalid job spec: resources.duration: "),
        # Unknown fields fail here, as on the server.
        ({"script": "true", "nmae": "typo"}, "invalid job spec: spec: unknown field(s) nmae"),
    ],
)
@pytest.mark.parametrize("method", ["submit", "create"])
async def test_bad_specs_fail_before_sending(
    connect: Callable[..., Api], spec: dict[str, Any], message: str, method: str
) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    with pytest.raises(pac.InvalidRequestError) as info:
        await getattr(api, method)(spec)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert str(exc).startswith(message)
    # pydantic's details stay at hand.
    assert isinstance(exc.__cause__, pydantic.ValidationError)
    assert exc.errors == exc.__cause__.errors()
    assert api.requests == []


@pytest.mark.parametrize("spec", [None, "echo hi", ["script"]])
async def test_a_spec_that_is_not_a_mapping_is_refused(connect: Callable[..., Api], spec: Any) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match="a job spec is a JobSpec or a mapping"):
        await api.submit(spec)
    assert api.requests == []


@pytest.mark.parametrize(
    "key", ["", "k" * (LIMITS.max_idempotency_key + 1), "a\nb", "clé", "a\tb", "a\x7f", " ", " key", "key "]
)
async def test_bad_idempotency_keys_fail_before_sending(connect: Callable[..., Api], key: str) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match="Idempotency-Key") as info:
        await api.submit({"script": "true"}, idempotency_key=key)
    assert isinstance(info.value, ValueError)
    assert api.requests == []


async def test_every_printable_ascii_character_can_be_in_an_idempotency_key(
    connect: Callable[..., Api],
) -> None:
    key = "<" + "".join(chr(code) for code in range(0x20, 0x7F)) + ">"  # " " to "~", inside
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    await api.submit({"script": "true"}, idempotency_key=key)
    assert api.requests[0].headers["Idempotency-Key"] == key


async def test_the_longest_idempotency_key_is_the_server_limit(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    key = "k" * LIMITS.max_idempotency_key
    await api.submit({"script": "true"}, idempotency_key=key)
    assert api.requests[0].headers["Idempotency-Key"] == key


async def test_a_spec_over_the_body_limit_fails_before_sending(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(201, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match=f"at most {LIMITS.max_body_bytes}"):
        await api.submit({"script": "x" * LIMITS.max_body_bytes})
    assert api.requests == []
    await api.submit({"script": "x" * (LIMITS.max_body_bytes - 100)})
    assert len(api.requests) == 1


@pytest.mark.parametrize("poll_interval", [0, -1.0])
async def test_bad_poll_intervals_fail_before_sending(
    connect: Callable[..., Api], poll_interval: float
) -> None:
    api = connect(lambda req: httpx.Response(200, json=job_json()))
    with pytest.raises(pac.InvalidRequestError, match="poll_interval"):
        await api.wait(JOBID, poll_interval=poll_interval)
    with pytest.raises(pac.InvalidRequestError, match="poll_interval"):
        await api.wait_all([JOBID], poll_interval=poll_interval)
    assert api.requests == []


async def test_purge_and_cancel_use_delete(connect: Callable[..., Api]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("purge") == "true":
            return httpx.Response(204)
        return httpx.Response(200, json=job_json(state="canceled"))

    api = connect(handler)
    assert (await api.cancel(JOBID)).state is pac.JobState.canceled
    assert await api.purge(JOBID) is None
    assert [str(r.url) for r in api.requests] == [
        f"http://127.0.0.1:8000/v1/jobs/{JOBID}",
        f"http://127.0.0.1:8000/v1/jobs/{JOBID}?purge=true",
    ]
    assert {r.method for r in api.requests} == {"DELETE"}


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://files.example/", "http://", "http://[::1"])
def test_a_base_url_that_is_not_http_fails_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        pac.Client(url)
