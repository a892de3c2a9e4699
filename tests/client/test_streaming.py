"""Flows can stream: a response's body arrives chunk by chunk, in both clients, and
the driver closes the response however the flow ends.

The flows here use a test route: the server has no streamed route yet. They are built
as later routes (log follow, downloads) will be: ``_send_flow(..., stream=True)``,
``_read_chunk_flow`` and ``Emit``, iterated by ``_iter_flow``/``_aiter_flow``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

import psik_api_client as pac
from client.fakes import Api, FakeTime, problem
from psik_api_client._base import BaseClient, Close, Emit, EmitFlow, Flow, Read

pytestmark = pytest.mark.anyio


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent one chunk at a time, logging each as it goes out, then
    failing with ``error`` if one is given. Records whether it was closed."""

    def __init__(self, chunks: list[bytes], log: list[str], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.log = log
        self.error = error
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.log.append(f"sent {chunk.decode()}")
            yield chunk
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def stream_flow(api: BaseClient, path: str = "/stream", *, refuse: bytes | None = None) -> EmitFlow[bytes]:
    """Emit the body of ``GET path`` chunk by chunk; give up on a chunk equal to ``refuse``."""
    response = yield from api._send_flow(api._build_request("GET", path), stream=True)
    while (chunk := (yield from api._read_chunk_flow(response))) is not None:
        if chunk == refuse:
            raise ValueError(f"{chunk!r} is not welcome")
        yield Emit(chunk)


def first_chunk_flow(api: BaseClient) -> Flow[bytes | None]:
    """Open a stream, read one chunk and return it, leaving the response to the driver."""
    response = yield from api._send_flow(api._build_request("GET", "/stream"), stream=True)
    return (yield from api._read_chunk_flow(response))


async def consume(api: Api, flow: EmitFlow[bytes], log: list[str], *, stop_after: int = 0) -> list[bytes]:
    """Iterate ``flow`` with the client's own iterator, logging each chunk as it
    arrives; after ``stop_after`` chunks (if given) stop and close the iterator."""
    got: list[bytes] = []
    if isinstance(api.client, pac.AsyncClient):
        async with contextlib.aclosing(api.client._aiter_flow(flow)) as achunks:
            async for chunk in achunks:
                log.append(f"got {chunk.decode()}")
                got.append(chunk)
                if len(got) == stop_after:
                    break
    else:
        with contextlib.closing(api.client._iter_flow(flow)) as chunks:
            for chunk in chunks:
                log.append(f"got {chunk.decode()}")
                got.append(chunk)
                if len(got) == stop_after:
                    break
    return got


@pytest.fixture
def log() -> list[str]:
    return []


async def test_chunks_arrive_as_they_are_sent(connect: Callable[..., Api], log: list[str]) -> None:
    body = Chunks([b"a", b"b", b"c"], log)
    api = connect(lambda req: httpx.Response(200, stream=body))
    assert await consume(api, stream_flow(api.client), log) == [b"a", b"b", b"c"]
    # Each chunk reached the caller before the next one left the server.
    assert log == ["sent a", "got a", "sent b", "got b", "sent c", "got c"]
    assert body.closed


async def test_the_response_is_closed_when_the_caller_stops_early(
    connect: Callable[..., Api], log: list[str]
) -> None:
    body = Chunks([b"a", b"b", b"c"], log)
    api = connect(lambda req: httpx.Response(200, stream=body))
    assert await consume(api, stream_flow(api.client), log, stop_after=1) == [b"a"]
    assert log == ["sent a", "got a"]  # nothing more was read
    assert body.closed


async def test_the_response_is_closed_when_the_flow_fails(
    connect: Callable[..., Api], log: list[str]
) -> None:
    body = Chunks([b"a", b"b", b"c"], log)
    api = connect(lambda req: httpx.Response(200, stream=body))
    with pytest.raises(ValueError, match="is not welcome"):
        await consume(api, stream_flow(api.client, refuse=b"b"), log)
    assert log == ["sent a", "got a", "sent b"]
    assert body.closed


async def test_a_connection_lost_mid_body_is_a_connection_error_and_closes(
    connect: Callable[..., Api], log: list[str]
) -> None:
    body = Chunks([b"a"], log, error=httpx.ReadError("connection reset by peer"))
    api = connect(lambda req: httpx.Response(200, stream=body), base_url="http://hpc.example:8123")
    with pytest.raises(pac.APIConnectionError, match="connection reset by peer") as info:
        await consume(api, stream_flow(api.client), log)
    assert isinstance(info.value.__cause__, httpx.ReadError)
    assert log == ["sent a", "got a"]
    # httpx leaves a response whose stream failed open: the driver closes it.
    assert body.closed


async def test_a_flow_run_for_its_result_has_its_streams_closed(
    connect: Callable[..., Api], log: list[str]
) -> None:
    body = Chunks([b"a", b"b"], log)
    api = connect(lambda req: httpx.Response(200, stream=body))
    assert await api._drive(first_chunk_flow(api.client)) == b"a"
    assert log == ["sent a"]
    assert body.closed


async def test_an_error_answer_to_a_stream_is_read_and_mapped(connect: Callable[..., Api]) -> None:
    api = connect(lambda req: problem(404, "not_found", "no such log"))
    with pytest.raises(pac.NotFoundError, match="no such log"):
        await consume(api, stream_flow(api.client), [])


async def test_a_stream_request_is_retried_like_any_other(
    connect: Callable[..., Api], fake_time: FakeTime, log: list[str]
) -> None:
    answers = iter(
        [problem(503, "backend_unavailable", "busy", headers={"Retry-After": "2"}), Chunks([b"a"], log)]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, stream=answer)

    api = connect(handler)
    assert await consume(api, stream_flow(api.client), log) == [b"a"]
    assert len(api.requests) == 2
    assert fake_time.sleeps == [2.0]


async def test_driving_a_flow_that_emits_for_its_result_is_a_bug(connect: Callable[..., Api]) -> None:
    body = Chunks([b"a"], [])
    api = connect(lambda req: httpx.Response(200, stream=body))
    with pytest.raises(RuntimeError, match="emitted b'a'"):
        await api._drive(stream_flow(api.client))
    assert body.closed


def reconnect_flow(api: BaseClient) -> EmitFlow[bytes]:
    """Read one chunk of a stream, close it, then read all of a second one: as a log
    follow that reconnects will."""
    first = yield from api._send_flow(api._build_request("GET", "/stream"), stream=True)
    chunk = yield from api._read_chunk_flow(first)
    assert chunk is not None
    yield Emit(chunk)
    yield Close(first)
    second = yield from api._send_flow(api._build_request("GET", "/stream"), stream=True)
    rest = yield Read(second)
    assert isinstance(rest, bytes)
    yield Emit(rest)


async def test_a_flow_closes_one_stream_before_opening_the_next(
    connect: Callable[..., Api], log: list[str]
) -> None:
    bodies = [Chunks([b"a", b"b"], log), Chunks([b"c", b"d"], log)]
    closed_when_asked: list[bool] = []

    def handler(request: httpx.Request) -> httpx.Response:
        closed_when_asked.append(bodies[0].closed)
        return httpx.Response(200, stream=bodies[len(closed_when_asked) - 1])

    api = connect(handler)
    assert await consume(api, reconnect_flow(api.client), log) == [b"a", b"cd"]
    assert closed_when_asked == [False, True]
    assert log == ["sent a", "got a", "sent c", "sent d", "got cd"]
