"""Retries: only idempotent requests, only transient failures, with backoff and Retry-After."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, FakeTime, job_json, problem, status_json
from psik_api_client._retry import RetryPolicy, parse_retry_after

pytestmark = pytest.mark.anyio

JOBID = "1693992878.203"


def answers(*responses: httpx.Response | httpx.TransportError) -> Callable[[httpx.Request], httpx.Response]:
    """A handler giving ``responses`` in turn (raising the transport errors)."""
    queue: Iterator[httpx.Response | httpx.TransportError] = iter(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(queue)
        if isinstance(answer, httpx.TransportError):
            raise answer
        return answer

    return handler


async def test_get_is_retried_after_a_connection_error(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(
        answers(httpx.ConnectError("refused"), httpx.Response(200, json=status_json(JOBID, "active")))
    )
    status = await api.state(JOBID)
    assert status.state is pac.JobState.active
    assert len(api.requests) == 2
    assert fake_time.sleeps == [0.5]


async def test_post_without_idempotency_key_is_not_retried(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(answers(httpx.ConnectError("refused"), httpx.Response(200, json=job_json(JOBID))))
    with pytest.raises(pac.APIConnectionError):
        await api.start(JOBID)
    assert api.methods() == [f"POST /v1/jobs/{JOBID}/start"]
    assert fake_time.sleeps == []


async def test_post_without_key_is_not_retried_on_503_either(connect: Callable[..., Api]) -> None:
    api = connect(answers(problem(503, "backend_unavailable", "slurm is down"), httpx.Response(200)))
    with pytest.raises(pac.ServiceUnavailableError, match="slurm is down"):
        await api.start(JOBID)
    assert len(api.requests) == 1


async def test_submit_is_retried_with_the_same_idempotency_key(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(answers(httpx.ReadTimeout("slow"), httpx.Response(201, json=job_json(JOBID))))
    job = await api.submit({"script": "true"})
    assert job.jobid == JOBID
    keys = [r.headers["Idempotency-Key"] for r in api.requests]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert api.requests[0].content == api.requests[1].content
    assert fake_time.sleeps == [0.5]


async def test_retry_after_is_honoured(connect: Callable[..., Api], fake_time: FakeTime) -> None:
    api = connect(
        answers(
            problem(429, "rate_limited", "slow down", headers={"Retry-After": "7"}),
            httpx.Response(200, json=[]),
        )
    )
    assert await api.backends() == []
    assert fake_time.sleeps == [7.0]


async def test_a_very_long_retry_after_is_not_waited_for(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(
        answers(problem(429, "rate_limited", "come back in an hour", headers={"Retry-After": "3600"}))
    )
    with pytest.raises(pac.RateLimitError, match="come back in an hour"):
        await api.backends()
    assert fake_time.sleeps == []


async def test_max_retries_is_respected_with_exponential_backoff(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(lambda req: problem(503, "backend_unavailable", "busy"), max_retries=3)
    with pytest.raises(pac.ServiceUnavailableError):
        await api.get(JOBID)
    assert len(api.requests) == 4
    assert fake_time.sleeps == [0.5, 1.0, 2.0]


async def test_max_retries_zero_sends_once(connect: Callable[..., Api], fake_time: FakeTime) -> None:
    api = connect(lambda req: problem(504, "gateway_timeout", "upstream slow"), max_retries=0)
    with pytest.raises(pac.InternalServerError):
        await api.get(JOBID)
    assert len(api.requests) == 1
    assert fake_time.sleeps == []


async def test_submit_failed_is_not_retried(connect: Callable[..., Api], fake_time: FakeTime) -> None:
    api = connect(lambda req: problem(502, "submit_failed", "sbatch refused", jobid=JOBID))
    with pytest.raises(pac.SubmitFailedError):
        await api.submit({"script": "true"})
    assert len(api.requests) == 1
    assert fake_time.sleeps == []


async def test_a_proxy_502_is_retried(connect: Callable[..., Api]) -> None:
    api = connect(
        answers(httpx.Response(502, text="<html>Bad Gateway</html>"), httpx.Response(200, json=job_json()))
    )
    assert (await api.get(JOBID)).jobid == JOBID
    assert len(api.requests) == 2


async def test_idempotency_in_flight_is_retried_after_retry_after(
    connect: Callable[..., Api], fake_time: FakeTime
) -> None:
    api = connect(
        answers(
            problem(409, "idempotency_in_flight", "in progress", headers={"Retry-After": "1"}),
            httpx.Response(201, json=job_json(JOBID)),
        )
    )
    assert (await api.submit({"script": "true"}, idempotency_key="k1")).jobid == JOBID
    assert [r.headers["Idempotency-Key"] for r in api.requests] == ["k1", "k1"]
    assert fake_time.sleeps == [1.0]


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "not_found"), (409, "conflict"), (422, "validation_error"), (500, "internal_error")],
)
async def test_permanent_errors_are_not_retried(connect: Callable[..., Api], status: int, code: str) -> None:
    api = connect(lambda req: problem(status, code, "no"))
    with pytest.raises(pac.APIStatusError):
        await api.cancel(JOBID)
    assert len(api.requests) == 1


async def test_delete_is_retried(connect: Callable[..., Api]) -> None:
    api = connect(answers(httpx.RemoteProtocolError("reset"), httpx.Response(204)))
    assert await api.purge(JOBID) is None
    assert api.methods() == [f"DELETE /v1/jobs/{JOBID}"] * 2


def test_backoff_jitter_shortens_by_at_most_a_quarter() -> None:
    assert RetryPolicy(rng=lambda: 0.0).backoff(0) == 0.5
    assert RetryPolicy(rng=lambda: 0.999).backoff(0) == pytest.approx(0.5 * (1 - 0.25 * 0.999))
    assert RetryPolicy(rng=lambda: 0.0).backoff(10) == 8.0  # capped


def test_parse_retry_after() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp) == pytest.approx(30.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None
