"""Per-call options: every public method takes ``timeout=`` and ``extra_headers=``
(``wait``/``wait_all``: ``request_timeout=``, their ``timeout`` being the deadline), and
they reach every request the call sends."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, job_json, status_json, summary_json
from psik_api_client._base import DEFAULT_TIMEOUT

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


def server(request: httpx.Request) -> httpx.Response:
    """Answers every route the client has, every job being final."""
    path, method = request.url.path, request.method
    if path == "/healthz":
        return httpx.Response(200, json={"status": "ok"})
    if path == "/v1/backends":
        return httpx.Response(200, json=[{"name": "default", "type": "local"}])
    if path.startswith("/v1/backends/"):
        return httpx.Response(200, json={"name": "default", "type": "local"})
    if path == "/v1/jobs" and method == "GET":
        ids = request.url.params.get_list("id") or [JOBID]
        return httpx.Response(200, json={"items": [summary_json(i, "completed") for i in ids]})
    if method == "POST":
        return httpx.Response(201, json=job_json(JOBID))
    if method == "DELETE":
        if request.url.params.get("purge") == "true":
            return httpx.Response(204)
        return httpx.Response(200, json=job_json(JOBID, "canceled"))
    if path.endswith("/state"):
        return httpx.Response(200, json=status_json(JOBID, "completed"))
    return httpx.Response(200, json=job_json(JOBID, "completed"))


#: Every public method with arguments, and the name of its per-request timeout.
CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("submit", ({"script": "true"},), "timeout"),
    ("create", ({"script": "true"},), "timeout"),
    ("start", (JOBID,), "timeout"),
    ("get", (JOBID,), "timeout"),
    ("state", (JOBID,), "timeout"),
    ("list", (), "timeout"),
    ("list_page", (), "timeout"),
    ("cancel", (JOBID,), "timeout"),
    ("purge", (JOBID,), "timeout"),
    ("wait", (JOBID,), "request_timeout"),
    ("wait_all", ([JOBID],), "request_timeout"),
    ("backends", (), "timeout"),
    ("backend", ("default",), "timeout"),
    ("health", (), "timeout"),
]


async def call(api: Api, name: str, *args: Any, **kwargs: Any) -> Any:
    if name == "list":
        return await api.list(*args, **kwargs)
    return await getattr(api, name)(*args, **kwargs)


@pytest.mark.parametrize(("name", "args", "timeout_name"), CALLS, ids=[c[0] for c in CALLS])
async def test_every_method_sends_the_call_options_with_each_request(
    connect: Callable[..., Api], name: str, args: tuple[Any, ...], timeout_name: str
) -> None:
    api = connect(server, headers={"Authorization": "Bearer t0k"})
    options = {timeout_name: 2.5, "extra_headers": {"X-Trace": "abc", "authorization": "Bearer other"}}
    await call(api, name, *args, **options)
    assert api.requests
    for request in api.requests:
        assert request.extensions["timeout"] == httpx.Timeout(2.5).as_dict()
        assert request.headers["X-Trace"] == "abc"
        # The call's header replaces the client's, whatever the case: one value, not two.
        assert request.headers.get_list("Authorization") == ["Bearer other"]
        assert request.headers["User-Agent"].startswith("psik-api-client/")


@pytest.mark.parametrize(("name", "args", "timeout_name"), CALLS, ids=[c[0] for c in CALLS])
async def test_without_options_the_client_settings_apply(
    connect: Callable[..., Api], name: str, args: tuple[Any, ...], timeout_name: str
) -> None:
    api = connect(server, timeout=7.0)
    await call(api, name, *args)
    for request in api.requests:
        assert request.extensions["timeout"] == httpx.Timeout(7.0).as_dict()
        assert "X-Trace" not in request.headers


async def test_the_default_client_timeout(connect: Callable[..., Api]) -> None:
    api = connect(server)
    await api.health()
    assert api.requests[0].extensions["timeout"] == DEFAULT_TIMEOUT.as_dict()


async def test_timeout_none_means_no_timeout_and_a_timeout_object_is_kept(
    connect: Callable[..., Api],
) -> None:
    api = connect(server)
    await api.health(timeout=None)
    fine = httpx.Timeout(1.0, connect=0.25)
    await api.get(JOBID, timeout=fine)
    first, second = api.requests
    assert first.extensions["timeout"] == httpx.Timeout(None).as_dict()
    assert second.extensions["timeout"] == fine.as_dict()


async def test_wait_timeout_stays_the_deadline(connect: Callable[..., Api]) -> None:
    api = connect(server)
    await api.wait(JOBID, timeout=60, request_timeout=3)
    assert {r.extensions["timeout"]["read"] for r in api.requests} == {3}


@pytest.mark.parametrize("timeout", [0, -1, "5", float("nan"), float("inf"), True])
async def test_bad_timeouts_fail_before_sending(connect: Callable[..., Api], timeout: Any) -> None:
    api = connect(server)
    with pytest.raises(pac.InvalidRequestError, match="timeout"):
        await api.get(JOBID, timeout=timeout)
    assert api.requests == []


def test_not_given_is_falsy_and_says_what_it_is() -> None:
    assert not pac.NOT_GIVEN
    assert repr(pac.NOT_GIVEN) == "NOT_GIVEN"
    assert isinstance(pac.NOT_GIVEN, pac.NotGiven)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_a_call_timeout_bounds_a_real_request(silent_port: int) -> None:
    url = f"http://127.0.0.1:{silent_port}"
    # The client's own timeout is long: only the call's can end this quickly.
    with pac.Client(url, timeout=60, max_retries=0) as api, pytest.raises(pac.APITimeoutError):
        api.health(timeout=0.05)
    async with pac.AsyncClient(url, timeout=60, max_retries=0) as aapi:
        with pytest.raises(pac.APITimeoutError):
            await aapi.health(timeout=0.05)


async def test_client_headers_replace_the_defaults_whatever_their_case(connect: Callable[..., Api]) -> None:
    api = connect(server, headers={"accept": "application/problem+json"})
    await api.health()
    assert api.requests[0].headers.get_list("Accept") == ["application/problem+json"]
