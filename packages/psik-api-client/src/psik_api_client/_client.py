"""The blocking client: drives the shared flows (see ``_base``) with ``httpx.Client``."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from psik_api_core import LIMITS, BackendInfo, Job, JobSpec, JobStatus, JobSummary, Page

from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient, Flow, Sleep
from ._pagination import Pager, StateFilter, job_query, page_params
from ._wait import Progress, job_ids, wait_all_flow, wait_flow

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client of the psik-api server.

    ``Client()`` talks to ``$PSIK_API_UDS`` (a UNIX socket), else ``$PSIK_API_URL``,
    else ``http://127.0.0.1:8000``; ``Client(url)`` or ``Client(uds="~/psik_api.sock")``
    say where explicitly. ``transport`` replaces the network (``httpx.MockTransport``,
    or any ``httpx.BaseTransport``). ``max_retries`` bounds the retries of idempotent
    requests. ``sleep``, ``rng`` and ``clock`` replace ``time.sleep``,
    ``random.random`` and ``time.monotonic`` (for tests). Bad arguments raise
    :class:`InvalidRequestError` before anything is sent.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        uds: str | os.PathLike[str] | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sleep: Callable[[float], None] | None = None,
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
            transport = httpx.HTTPTransport(uds=self.uds)
        self._http = httpx.Client(transport=transport, timeout=timeout)
        self._sleep = sleep or time.sleep

    def _drive(self, flow: Flow[T]) -> T:
        """Run ``flow``: send what it asks to send, sleep when it asks to sleep."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    self._sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    outcome: httpx.Response | httpx.TransportError = self._http.send(step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = flow.send(outcome)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            flow.close()

    def submit(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job from ``spec`` and submit it to its backend (``POST /v1/jobs``).

        ``spec`` may be a dict; it is validated here first, so a bad field raises
        :class:`InvalidRequestError` (naming the field) before anything is sent. The
        request always carries an ``Idempotency-Key`` (a random one unless given), so it
        is retried safely: a retry returns the job the first attempt created. Raises
        :class:`SubmitFailedError` if the backend refused the job (it then exists, in
        state ``failed``: see ``.jobid``).
        """
        return self._drive(self._submit_flow(spec, idempotency_key, start=True))

    def create(self, spec: JobSpec | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job without submitting it (``POST /v1/jobs/new``): it stays ``new``
        until :meth:`start`. Validation and idempotency as in :meth:`submit`."""
        return self._drive(self._submit_flow(spec, idempotency_key, start=False))

    def start(self, jobid: str) -> Job:
        """Submit a ``new`` job, or run a final one again with the next ``jobndx``.
        Raises :class:`ConflictError` while the job is queued or active."""
        return self._drive(self._start_flow(jobid))

    def get(self, jobid: str) -> Job:
        """The job with its spec (without `cb_secret`, which is write-only) and full history."""
        return self._drive(self._get_flow(jobid))

    def state(self, jobid: str) -> JobStatus:
        """The job's current state alone (cheaper than :meth:`get`)."""
        return self._drive(self._state_flow(jobid))

    def list(
        self,
        *,
        state: StateFilter = None,
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        page_size: int = LIMITS.default_page_size,
    ) -> Iterator[JobSummary]:
        """Every job matching the filters, newest first, fetching pages lazily.

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

    def _walk(self, pager: Pager) -> Iterator[JobSummary]:
        while (params := pager.next_params()) is not None:
            yield from pager.take(self._drive(self._page_flow(params)))

    def list_page(
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
        return self._drive(self._page_flow(page_params(params, limit=limit, cursor=cursor)))

    def cancel(self, jobid: str) -> Job:
        """Cancel the job (idempotent: a final job is returned as it was)."""
        return self._drive(self._cancel_flow(jobid))

    def purge(self, jobid: str) -> None:
        """Remove a final job and its directory. Raises :class:`ConflictError` if the
        job is not final (cancel it first)."""
        self._drive(self._purge_flow(jobid))

    def wait(self, jobid: str, *, timeout: float | None = None, poll_interval: float = 1.0) -> Job:
        """Block until the job is final and return it.

        Polls its state every 0.02 s at first, backing off to ``poll_interval``
        seconds. After ``timeout`` seconds raises :class:`WaitTimeout` (with the last
        status seen); the job is never cancelled.
        """
        return self._drive(wait_flow(self, jobid, timeout=timeout, poll_interval=poll_interval))

    def wait_all(
        self,
        jobs: Iterable[str | JobSummary],
        *,
        timeout: float | None = None,
        progress: Progress = False,
        poll_interval: float = 1.0,
    ) -> builtins.list[Job]:
        """Block until every job (ids, or Job/JobSummary objects) is final; return the
        final jobs in the order given.

        All pending jobs are polled with one request per round. ``progress=True``
        prints ``"12/100 final"`` to stderr as the count changes; a callable is
        called as ``progress(done, total)`` instead. Raises :class:`WaitTimeout` (with
        ``.pending``) after ``timeout`` seconds, cancelling nothing.
        """
        flow = wait_all_flow(
            self, job_ids(jobs), timeout=timeout, poll_interval=poll_interval, progress=progress
        )
        return self._drive(flow)

    def backends(self) -> builtins.list[BackendInfo]:
        """The configured backends and their health."""
        return self._drive(self._backends_flow())

    def backend(self, name: str) -> BackendInfo:
        """One backend by name (:class:`NotFoundError` if there is none)."""
        return self._drive(self._backend_flow(name))

    def health(self) -> dict[str, Any]:
        """The server's health document, ``{"status": "ok"}`` when all is well."""
        return self._drive(self._health_flow())

    def close(self) -> None:
        """Close the connections (and the transport)."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
