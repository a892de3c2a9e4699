"""The async client: drives the shared flows (see ``_base``) with ``httpx.AsyncClient``.

It mirrors ``_client.Client`` line for line; only the awaits differ.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx

from psik_api_core import LIMITS, BackendInfo, Job, JobSpec, JobStatus, JobSummary, Page

from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient, Flow, Sleep
from ._pagination import Pager, StateFilter, job_query, page_params
from ._wait import Progress, job_ids, wait_all_flow, wait_flow

T = TypeVar("T")


class AsyncClient(BaseClient):
    """An async client of the psik-api server (asyncio or trio; fine in a notebook).

    Same arguments as :class:`Client`, except that ``transport`` is an
    ``httpx.AsyncBaseTransport`` (e.g. ``httpx.ASGITransport(app)`` to test in-process)
    and ``sleep`` is awaited (default ``anyio.sleep``).

    Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        uds: str | os.PathLike[str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: Callable[[], float] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            uds=uds,
            has_transport=transport is not None,
            headers=headers,
            max_retries=max_retries,
            rng=rng,
            clock=clock,
        )
        if transport is None and self.uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=self.uds)
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout)
        self._sleep = sleep or anyio.sleep

    async def _drive(self, flow: Flow[T]) -> T:
        """Run ``flow``: send what it asks to send, sleep when it asks to sleep."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await self._sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    outcome: httpx.Response | httpx.TransportError = await self._http.send(step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = flow.send(outcome)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            flow.close()

    async def submit(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job from ``spec`` and submit it to its backend (``POST /v1/jobs``).

        ``spec`` may be a dict; it is validated here first, so a bad field raises
        :class:`InvalidRequestError` (naming the field) before anything is sent. The
        request always carries an ``Idempotency-Key`` (a random one unless given), so it
        is retried safely: a retry returns the job the first attempt created. Raises
        :class:`SubmitFailedError` if the backend refused the job (it then exists, in
        state ``failed``: see ``.jobid``).
        """
        return await self._drive(self._submit_flow(spec, idempotency_key, start=True))

    async def create(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job without submitting it (``POST /v1/jobs/new``): it stays ``new``
        until :meth:`start`. Validation and idempotency as in :meth:`submit`."""
        return await self._drive(self._submit_flow(spec, idempotency_key, start=False))

    async def start(self, jobid: str) -> Job:
        """Submit a ``new`` job, or run a final one again with the next ``jobndx``.
        Raises :class:`ConflictError` while the job is queued or active."""
        return await self._drive(self._start_flow(jobid))

    async def get(self, jobid: str) -> Job:
        """The job with its spec (without `cb_secret`, which is write-only) and full history."""
        return await self._drive(self._get_flow(jobid))

    async def state(self, jobid: str) -> JobStatus:
        """The job's current state alone (cheaper than :meth:`get`)."""
        return await self._drive(self._state_flow(jobid))

    def list(
        self,
        *,
        state: StateFilter = None,
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        page_size: int = LIMITS.default_page_size,
    ) -> AsyncIterator[JobSummary]:
        """Every job matching the filters, newest first, fetching pages lazily
        (``async for job in api.list(...)``).

        ``state`` is one state or several; ``ids`` restricts to those job ids.
        ``limit`` caps the number of jobs yielded in total; ``page_size`` (1 to
        ``LIMITS.max_page_size``)
        is how many are fetched per request.
        """
        pager = Pager(
            job_query(state=state, backend=backend, name=name, ids=ids),
            limit=limit,
            page_size=page_size,
        )
        return self._walk(pager)

    async def _walk(self, pager: Pager) -> AsyncIterator[JobSummary]:
        while (params := pager.next_params()) is not None:
            for item in pager.take(await self._drive(self._page_flow(params))):
                yield item

    async def list_page(
        self,
        *,
        state: StateFilter = None,
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[JobSummary]:
        """One page of :meth:`list`: at most ``limit`` jobs (server default
        ``LIMITS.default_page_size``) after
        ``cursor`` (a previous page's ``next_cursor``)."""
        params = job_query(state=state, backend=backend, name=name, ids=ids)
        return await self._drive(self._page_flow(page_params(params, limit=limit, cursor=cursor)))

    async def cancel(self, jobid: str) -> Job:
        """Cancel the job (idempotent: a final job is returned as it was)."""
        return await self._drive(self._cancel_flow(jobid))

    async def purge(self, jobid: str) -> None:
        """Remove a final job and its directory. Raises :class:`ConflictError` if the
        job is not final (cancel it first)."""
        await self._drive(self._purge_flow(jobid))

    # ASYNC109: a deadline is part of what waiting means here, and it must match Client.
    async def wait(
        self,
        jobid: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        poll_interval: float = 1.0,
    ) -> Job:
        """Wait until the job is final and return it.

        Polls its state every 0.02 s at first, backing off to ``poll_interval``
        seconds. After ``timeout`` seconds raises :class:`WaitTimeout` (with the last
        status seen); the job is never cancelled.
        """
        flow = wait_flow(self, jobid, timeout=timeout, poll_interval=poll_interval)
        return await self._drive(flow)

    async def wait_all(
        self,
        jobs: Iterable[str | JobSummary],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        progress: Progress = False,
        poll_interval: float = 1.0,
    ) -> builtins.list[Job]:
        """Wait until every job (ids, or Job/JobSummary objects) is final; return the
        final jobs in the order given.

        All pending jobs are polled with one request per round. ``progress=True``
        prints ``"12/100 final"`` to stderr as the count changes; a callable is
        called as ``progress(done, total)`` instead. Raises :class:`WaitTimeout` (with
        ``.pending``) after ``timeout`` seconds, cancelling nothing.
        """
        flow = wait_all_flow(
            self, job_ids(jobs), timeout=timeout, poll_interval=poll_interval, progress=progress
        )
        return await self._drive(flow)

    async def backends(self) -> builtins.list[BackendInfo]:
        """The configured backends and their health."""
        return await self._drive(self._backends_flow())

    async def backend(self, name: str) -> BackendInfo:
        """One backend by name (:class:`NotFoundError` if there is none)."""
        return await self._drive(self._backend_flow(name))

    async def health(self) -> dict[str, Any]:
        """The server's health document, ``{"status": "ok"}`` when all is well."""
        return await self._drive(self._health_flow())

    async def aclose(self) -> None:
        """Close the connections (and the transport)."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
