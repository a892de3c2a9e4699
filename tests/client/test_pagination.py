"""Lists follow ``next_cursor`` lazily, honour ``limit``, and send filters as documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, summary_json
from psik_api_core import LIMITS

pytestmark = pytest.mark.anyio

Pages = dict[str | None, tuple[list[str], str | None]]


def paged_server(pages: Pages) -> Callable[[httpx.Request], httpx.Response]:
    """``pages[cursor] = (jobids, next_cursor)``; the page size is whatever the client asks."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs"
        ids, next_cursor = pages[request.url.params.get("cursor")]
        limit = int(request.url.params.get("limit", "100"))
        items = [summary_json(i) for i in ids[:limit]]
        return httpx.Response(200, json={"items": items, "next_cursor": next_cursor})

    return handler


PAGES: Pages = {
    None: (["9.0", "8.0"], "c1"),
    "c1": (["7.0", "6.0"], "c2"),
    "c2": (["5.0"], None),
}


async def test_list_follows_cursors_until_there_is_none(connect: Callable[..., Api]) -> None:
    api = connect(paged_server(PAGES))
    jobs = await api.list(page_size=2)
    assert [j.jobid for j in jobs] == ["9.0", "8.0", "7.0", "6.0", "5.0"]
    assert all(isinstance(j, pac.JobSummary) for j in jobs)
    assert [r.url.params.get("cursor") for r in api.requests] == [None, "c1", "c2"]
    assert [r.url.params["limit"] for r in api.requests] == ["2", "2", "2"]


async def test_list_stops_at_limit_without_fetching_more(connect: Callable[..., Api]) -> None:
    api = connect(paged_server(PAGES))
    jobs = await api.list(limit=3, page_size=2)
    assert [j.jobid for j in jobs] == ["9.0", "8.0", "7.0"]
    # The second request asks only for what is still needed, and there is no third.
    assert [r.url.params["limit"] for r in api.requests] == ["2", "1"]


async def test_list_limit_zero_sends_nothing(connect: Callable[..., Api]) -> None:
    api = connect(paged_server(PAGES))
    assert await api.list(limit=0) == []
    assert api.requests == []


async def test_list_stops_if_the_cursor_does_not_move(connect: Callable[..., Api]) -> None:
    api = connect(paged_server({None: (["2.0"], "same"), "same": ([], "same")}))
    assert [j.jobid for j in await api.list()] == ["2.0"]
    assert len(api.requests) == 2


async def test_filters_are_sent_as_query_parameters(connect: Callable[..., Api]) -> None:
    api = connect(paged_server({None: ([], None)}))
    await api.list(state=[pac.JobState.failed, "canceled"], backend="slurm", name="sim", ids=["1.0", "2.0"])
    params = api.requests[0].url.params
    assert params.get_list("state") == ["failed", "canceled"]
    assert params["backend"] == "slurm"
    assert params["name"] == "sim"
    assert params.get_list("id") == ["1.0", "2.0"]


async def test_a_single_state_is_sent_once(connect: Callable[..., Api]) -> None:
    api = connect(paged_server({None: ([], None)}))
    await api.list(state=pac.JobState.active)
    assert api.requests[0].url.params.get_list("state") == ["active"]


async def test_list_page_returns_one_page_with_its_cursor(connect: Callable[..., Api]) -> None:
    api = connect(paged_server(PAGES))
    page = await api.list_page(limit=2, cursor="c1")
    assert isinstance(page, pac.Page)
    assert [j.jobid for j in page.items] == ["7.0", "6.0"]
    assert page.next_cursor == "c2"
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 0},
        {"page_size": LIMITS.max_page_size + 1},
        {"limit": -1},
        {"ids": [f"{n}.0" for n in range(LIMITS.max_ids + 1)]},
        {"ids": "1.0"},  # a string is not a list of ids
    ],
)
async def test_bad_paging_arguments_fail_before_any_request(
    connect: Callable[..., Api], kwargs: dict[str, Any]
) -> None:
    api = connect(paged_server(PAGES))
    with pytest.raises(pac.InvalidRequestError):
        api.client.list(**kwargs)
    assert api.requests == []


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": LIMITS.max_page_size + 1}, {"ids": ["1.0"] * (LIMITS.max_ids + 1)}],
)
async def test_bad_page_arguments_fail_before_any_request(
    connect: Callable[..., Api], kwargs: dict[str, Any]
) -> None:
    api = connect(paged_server(PAGES))
    with pytest.raises(pac.InvalidRequestError) as info:
        await api.list_page(**kwargs)
    assert isinstance(info.value, ValueError)
    assert api.requests == []


async def test_the_largest_page_is_the_server_limit(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: httpx.Response(200, json={"items": [], "next_cursor": None}))
    await api.list_page(limit=LIMITS.max_page_size)
    await api.list(page_size=LIMITS.max_page_size, limit=1)
    await api.list()
    limits = [r.url.params["limit"] for r in api.requests]
    assert limits == [str(LIMITS.max_page_size), "1", str(LIMITS.default_page_size)]


def test_sync_list_is_lazy() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return paged_server(PAGES)(request)

    with pac.Client(transport=httpx.MockTransport(handler)) as api:
        jobs = api.list(page_size=2)
        assert seen == []
        assert next(jobs).jobid == "9.0"
        assert next(jobs).jobid == "8.0"
        assert len(seen) == 1
        assert next(jobs).jobid == "7.0"
        assert len(seen) == 2


async def test_async_list_is_lazy() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return paged_server(PAGES)(request)

    async with pac.AsyncClient(transport=httpx.MockTransport(handler)) as api:
        jobs = api.list(page_size=2)
        assert seen == []
        assert (await anext(jobs)).jobid == "9.0"
        assert (await anext(jobs)).jobid == "8.0"
        assert len(seen) == 1
        assert (await anext(jobs)).jobid == "7.0"
        assert len(seen) == 2


async def test_limit_holds_even_if_the_server_sends_more(connect: Callable[..., Api]) -> None:
    items = [summary_json(f"{n}.0") for n in range(5, 0, -1)]
    api = connect(lambda req: httpx.Response(200, json={"items": items, "next_cursor": "more"}))
    jobs = await api.list(limit=3)
    assert [j.jobid for j in jobs] == ["5.0", "4.0", "3.0"]
    assert len(api.requests) == 1
