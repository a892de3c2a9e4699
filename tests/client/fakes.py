"""Fakes shared by the client tests: wire documents as the server sends them, a fake
clock, and one awaitable interface over ``Client`` and ``AsyncClient`` so each test body
runs on both. (A module, not conftest, so tests can import it: ``from client.fakes import ...``.)"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from psik_api_client import AsyncClient, Client

Handler = Callable[[httpx.Request], httpx.Response]

T0 = "2024-01-01T00:00:00Z"


def job_json(jobid: str = "1693992878.203", state: str = "queued", **extra: Any) -> dict[str, Any]:
    """A Job as the server sends it."""
    return {
        "jobid": jobid,
        "name": "hello",
        "backend": "default",
        "owner": "local:psik_api",
        "state": state,
        "jobndx": 1,
        "created": T0,
        "updated": T0,
        "spec": {"name": "hello", "script": "echo hello"},
        "history": [{"time": T0, "jobndx": 0, "state": "new", "info": ""}],
        **extra,
    }


def summary_json(
    jobid: str, state: str = "queued", name: str | None = "hello", **extra: Any
) -> dict[str, Any]:
    """A JobSummary as lists send it."""
    job = job_json(jobid, state, name=name, **extra)
    del job["spec"], job["history"]
    return job


def status_json(jobid: str = "1693992878.203", state: str = "queued") -> dict[str, Any]:
    """A JobStatus."""
    return {"jobid": jobid, "state": state, "jobndx": 1, "updated": T0}


def problem(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    """A problem+json error response."""
    body = {"type": "about:blank", "title": code, "status": status, "code": code, "detail": detail}
    return httpx.Response(
        status,
        json={**body, **extra},
        headers={"Content-Type": "application/problem+json", **(headers or {})},
    )


def no_events() -> httpx.Response:
    """What a server older than the event stream answers to ``GET /v1/events``: the
    client's waits then poll, as before it had a stream."""
    return problem(404, "not_found", "Not Found")


class FakeTime:
    """A clock that only moves when the client sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Api:
    """A Client or an AsyncClient behind one awaitable interface: every method is
    awaited, and ``list`` is collected into a Python list."""

    def __init__(self, client: Client | AsyncClient, requests: list[httpx.Request]) -> None:
        self.client = client
        self.requests = requests  # every request the transport saw, in order

    @property
    def is_async(self) -> bool:
        return isinstance(self.client, AsyncClient)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return await result if self.is_async else result

        return call

    async def list(self, **kwargs: Any) -> list[Any]:
        items = self.client.list(**kwargs)
        if isinstance(items, Iterator):
            return list(items)
        assert isinstance(items, AsyncIterator)
        return [item async for item in items]

    async def follow_log(self, *args: Any, **kwargs: Any) -> list[bytes]:
        chunks = self.client.follow_log(*args, **kwargs)
        if isinstance(chunks, Iterator):
            return list(chunks)
        assert isinstance(chunks, AsyncIterator)
        return [chunk async for chunk in chunks]

    def methods(self) -> builtins.list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    async def close(self) -> None:
        if isinstance(self.client, AsyncClient):
            await self.client.aclose()
        else:
            self.client.close()
