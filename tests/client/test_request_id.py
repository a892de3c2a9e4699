"""The client's errors name the request the server logged them under: ``request_id`` (the
problem's, else the ``X-Request-ID`` header), and the message ends with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, problem

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


async def test_the_problem_s_id(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: problem(404, "not_found", f"no job {JOBID}", request_id="abc-1"), max_retries=0)
    with pytest.raises(pac.NotFoundError) as info:
        await api.get(JOBID)
    assert info.value.request_id == "abc-1"
    assert str(info.value) == f"no job {JOBID} (request id abc-1)"
    assert info.value.problem is not None and info.value.problem.request_id == "abc-1"


async def test_the_header_s_id_without_a_problem(connect: Callable[..., Api]) -> None:
    api = connect(
        lambda req: httpx.Response(502, text="Bad Gateway", headers={"X-Request-ID": "p.9"}), max_retries=0
    )
    with pytest.raises(pac.InternalServerError) as info:
        await api.get(JOBID)
    assert info.value.request_id == "p.9"
    assert str(info.value).endswith("(request id p.9)")


@pytest.mark.parametrize("given", ["a b", "x" * 65, "<b>", ""])
async def test_an_unsafe_id_is_not_repeated(connect: Callable[..., Api], given: str) -> None:
    api = connect(
        lambda req: problem(409, "conflict", "busy", headers={"X-Request-ID": given}, request_id=given),
        max_retries=0,
    )
    with pytest.raises(pac.ConflictError) as info:
        await api.get(JOBID)
    assert info.value.request_id is None
    assert str(info.value) == "busy"


async def test_no_id_no_suffix(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: problem(404, "not_found", "gone"), max_retries=0)
    with pytest.raises(pac.NotFoundError) as info:
        await api.get(JOBID)
    assert info.value.request_id is None
    assert str(info.value) == "gone"


async def test_the_real_server_s_id(api: Any) -> None:
    """Against the real app (each of the four ways): the id is the one it sent back."""
    with pytest.raises(pac.NotFoundError) as info:
        await api.get(JOBID)
    exc = info.value
    assert exc.request_id is not None
    assert exc.request_id == exc.response.headers["x-request-id"]
    assert str(exc).endswith(f"(request id {exc.request_id})")
