"""The blocking client: drives the shared flows (see ``_base``) with ``httpx.Client``."""

from __future__ import annotations

import builtins
import datetime as dt
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar, cast

import httpx

from psik_api_core import (
    LIMITS,
    BackendInfo,
    Event,
    FileInfo,
    FileListing,
    Group,
    Job,
    JobSpec,
    JobStatus,
    JobSummary,
    Page,
)

from ._base import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    BaseClient,
    Disk,
    Emit,
    EmitFlow,
    Flow,
    OpenFile,
    Outcome,
    Read,
    ReadChunk,
    Sleep,
    Step,
    Stream,
)
from ._events import STREAM_READ_TIMEOUT, JobsArg, watch_flow
from ._files import (
    close_files,
    delete_file_flow,
    download_flow,
    list_files_flow,
    open_binary,
    upload_dir_flow,
    upload_flow,
)
from ._groups import (
    ParamsArg,
    cancel_group_flow,
    group_body,
    group_flow,
    make_group_flow,
    sweep_body,
    sweep_request,
)
from ._inputs import AfterArg
from ._logs import follow_log_flow, logs_flow, read_log_flow
from ._pagination import LabelFilter, Pager, StateFilter, job_query, page_params
from ._progress import Progress
from ._types import NOT_GIVEN, NotGiven, RequestOptions, TimeoutArg
from ._wait import wait_all_flow, wait_flow

T = TypeVar("T")
E = TypeVar("E")


class Client(BaseClient):
    """A blocking client of the psik-api server.

    ``Client()`` talks to ``$PSIK_API_UDS`` (a UNIX socket), else ``$PSIK_API_URL``,
    else ``http://127.0.0.1:8000``; ``Client(url)`` or ``Client(uds="~/psik_api.sock")``
    say where explicitly. ``transport`` replaces the network (``httpx.MockTransport``,
    or any ``httpx.BaseTransport``). ``max_retries`` bounds the retries of idempotent
    requests. ``sleep``, ``rng`` and ``clock`` replace ``time.sleep``,
    ``random.random`` and ``time.monotonic`` (for tests).

    ``token`` (else ``$PSIK_API_TOKEN``) is sent as ``Authorization: Bearer``, only over
    https, a UNIX socket or to this machine: a plain http URL to another host with a
    token is refused here (``ValueError``). ``cert_dir`` (else ``$PSIK_API_CERTIFIED``,
    for an https URL) is a certified identity directory (``id.crt``, ``id.key``,
    ``known_servers/``): the client presents that certificate (mTLS) and trusts only
    the servers the directory knows.

    ``limits`` (an ``httpx.Limits``) sizes the connection pool, as in httpx; the
    :class:`AsyncClient` also keeps at most ``max_connections`` requests in flight.

    ``events`` says whether :meth:`wait` and :meth:`wait_all` listen to the server's
    event stream (``GET /v1/events``) rather than poll; either way they poll a server
    without it (404/405) or when the stream cannot be opened. ``None`` (the default)
    listens when the client talks through httpx's own network transport (its default
    one, a UNIX socket, or an ``httpx.HTTPTransport`` given as ``transport``), and
    polls through any other ``transport``: an in-process one (``httpx.ASGITransport``)
    holds a whole response before handing it over, so a stream would never arrive.
    ``events=True`` listens through any transport, ``events=False`` always polls.
    :meth:`watch` always uses the stream.

    Every method also takes keyword-only per-call options: ``timeout=`` (seconds, an
    ``httpx.Timeout``, or None for none) replaces the client's ``timeout`` for that
    call's requests, and ``extra_headers=`` are sent over the client's ``headers``.
    Bad arguments raise :class:`InvalidRequestError` before anything is sent.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        uds: str | os.PathLike[str] | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: TimeoutArg = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sleep: Callable[[float], None] | None = None,
        rng: Callable[[], float] | None = None,
        clock: Callable[[], float] | None = None,
        token: str | None = None,
        cert_dir: str | os.PathLike[str] | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
        events: bool | None = None,
    ) -> None:
        super().__init__(
            base_url,
            uds=uds,
            has_transport=transport is not None,
            headers=headers,
            timeout=timeout,
            max_retries=max_retries,
            rng=rng,
            clock=clock,
            token=token,
            cert_dir=cert_dir,
            limits=limits,
            events=events,
            # httpx's own network transport (UNIX socket included) hands a stream over
            # as it comes; an in-process or custom one may hold it until it ends.
            network_transport=transport is None or isinstance(transport, httpx.HTTPTransport),
        )
        if transport is None and self.uds is not None:
            transport = httpx.HTTPTransport(uds=self.uds, verify=self._verify, limits=limits)
        # No bound on requests in flight here: a blocking client has one per thread.
        self._http = httpx.Client(
            transport=transport, timeout=timeout, auth=self._auth, verify=self._verify, limits=limits
        )
        self._sleep = sleep or time.sleep

    def _run(self, flow: Generator[Step | Emit[E], Outcome, T], result: list[T]) -> Generator[E, None, None]:
        """The one loop: do each step ``flow`` asks for, yield what it emits, and put
        its result in ``result``. Closes every response it streamed and every file it
        opened, however it ends."""
        streams: dict[httpx.Response, Generator[bytes, None, None]] = {}
        files: builtins.list[BinaryIO] = []
        try:
            step = next(flow)
            while True:
                if isinstance(step, Emit):
                    yield step.value
                    step = flow.send(None)
                else:
                    step = flow.send(self._perform(step, streams, files))
        except StopIteration as stop:
            result.append(stop.value)
        finally:
            try:
                flow.close()
            finally:
                try:
                    self._close_streams(streams)
                finally:
                    close_files(files)

    def _perform(
        self,
        step: Step,
        streams: dict[httpx.Response, Generator[bytes, None, None]],
        files: builtins.list[BinaryIO],
    ) -> Outcome:
        """Do the I/O of one step; a transport error is its answer, not raised."""
        if isinstance(step, Sleep):
            self._sleep(step.seconds)
            return None
        if isinstance(step, Disk):
            return step.fn(*step.args)
        if isinstance(step, OpenFile):
            file = open_binary(step.path, step.mode)
            files.append(file)
            return file
        try:
            if isinstance(step, httpx.Request):
                return self._http.send(step)
            if isinstance(step, Stream):
                response = self._http.send(step.request, stream=True)
                # iter_bytes is a generator function: the cast lets us close it.
                streams[response] = cast("Generator[bytes, None, None]", response.iter_bytes())
                return response
            if isinstance(step, ReadChunk):
                return next(streams[step.response], None)
            if isinstance(step, Read):
                return step.response.read()
            step.response.close()
            return None
        except httpx.TransportError as exc:
            return exc

    def _close_streams(self, streams: dict[httpx.Response, Generator[bytes, None, None]]) -> None:
        for response, chunks in streams.items():
            chunks.close()
            response.close()

    def _drive(self, flow: Flow[T]) -> T:
        """Run ``flow`` to its result."""
        result: list[T] = []
        run: Generator[object, None, None] = self._run(flow, result)
        with closing(run):
            for value in run:
                raise RuntimeError(f"a flow run for its result emitted {value!r}")
        return result[0]

    def _iter_flow(self, flow: EmitFlow[E]) -> Generator[E, None, None]:
        """What ``flow`` emits, as it emits it: the body of every method that returns an
        iterator. Its responses are closed when it ends, or when the iterator is closed
        (or collected) before that."""
        return self._run(flow, [])

    def submit(
        self,
        spec: JobSpec | Mapping[str, Any],
        *,
        after: AfterArg = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Create a job from ``spec`` and submit it to its backend (``POST /v1/jobs``).

        ``spec`` may be a dict; it is validated here first, so a bad field raises
        :class:`InvalidRequestError` (naming the field) before anything is sent. The
        request always carries an ``Idempotency-Key`` (a random one unless given), so it
        is retried safely: a retry returns the job the first attempt created. Raises
        :class:`SubmitFailedError` if the backend refused the job (it then exists, in
        state ``failed``: see ``.jobid``).

        ``after`` makes the job wait (``queued``) until other jobs end: each an id or a
        Job, meaning it must complete, or ``(job, condition)`` with ``"ok"``,
        ``"failed"`` or ``"any"`` (any final state); when a condition can no longer be
        met the job ends ``canceled``, saying why. ``labels`` (``{"key": "value"}``) tag
        the job, to find it by (``list(label=...)``). Both are added to the spec's own.
        """
        options = RequestOptions(timeout, extra_headers)
        return self._drive(
            self._submit_flow(spec, idempotency_key, start=True, after=after, labels=labels, options=options)
        )

    def create(
        self,
        spec: JobSpec | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Create a job without submitting it (``POST /v1/jobs/new``): it stays ``new``
        until :meth:`start`. Validation and idempotency as in :meth:`submit`."""
        options = RequestOptions(timeout, extra_headers)
        return self._drive(self._submit_flow(spec, idempotency_key, start=False, options=options))

    def submit_many(
        self,
        specs: Iterable[JobSpec | Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Group:
        """Create and submit many jobs with one request (``POST /v1/groups``), all or
        none; return the :class:`Group` (``.group``, its id; ``.jobs``, in the order
        given).

        Each spec is validated here first (an error names its index, ``jobs[3]: ...``)
        and, inside one, an ``after`` entry ``{"index": i}`` names the ``i``-th job of
        the same call, so a whole graph of jobs is one request. Idempotent as
        :meth:`submit`: a retry returns the group the first attempt made.
        """
        options = RequestOptions(timeout, extra_headers)
        return self._drive(make_group_flow(self, group_body(specs), idempotency_key, options))

    def sweep(
        self,
        spec: JobSpec | Mapping[str, Any],
        params: ParamsArg,
        *,
        idempotency_key: str | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Group:
        """Submit one job per combination of ``params`` (``{"X": ["1", "2"], "Y": ["a",
        "b"]}``: four jobs, the last name varying fastest), each with its values in its
        environment under their names, with one request; return the :class:`Group`.
        Numbers are sent as their text. All or none, idempotent as :meth:`submit_many`.
        """
        options = RequestOptions(timeout, extra_headers)
        body = sweep_body(sweep_request(spec, params))
        return self._drive(make_group_flow(self, body, idempotency_key, options))

    def group(
        self,
        group: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Group:
        """The group ``group`` (an id): its members as summaries, in order, and
        ``.states``, how many are in each state."""
        return self._drive(group_flow(self, group, RequestOptions(timeout, extra_headers)))

    def cancel_group(
        self,
        group: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Group:
        """Cancel every member of the group that has not ended; return the group."""
        return self._drive(cancel_group_flow(self, group, RequestOptions(timeout, extra_headers)))

    def start(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a ``new`` job, or run a final one again with the next ``jobndx``.
        Raises :class:`ConflictError` while the job is queued or active."""
        return self._drive(self._start_flow(jobid, RequestOptions(timeout, extra_headers)))

    def get(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """The job with its spec (without `cb_secret`, which is write-only) and full history."""
        return self._drive(self._get_flow(jobid, RequestOptions(timeout, extra_headers)))

    def state(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> JobStatus:
        """The job's current state alone (cheaper than :meth:`get`)."""
        return self._drive(self._state_flow(jobid, RequestOptions(timeout, extra_headers)))

    def list(
        self,
        *,
        state: StateFilter = None,
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] | None = None,
        label: LabelFilter = None,
        group: str | None = None,
        limit: int | None = None,
        page_size: int = LIMITS.default_page_size,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Iterator[JobSummary]:
        """Every job matching the filters, newest first, fetching pages lazily.

        ``state`` is one state or several; ``ids`` restricts to those job ids;
        ``label`` to the jobs with every label given (``{"run": "r1"}``, or ``"run=r1"``
        texts); ``group`` to the members of that group.
        ``limit`` caps the number of jobs yielded in total; ``page_size`` (1 to
        ``LIMITS.max_page_size``) is how many are fetched per request. The options
        apply to every page's request.
        """
        pager = Pager(
            job_query(state=state, backend=backend, name=name, ids=ids, label=label, group=group),
            limit=limit,
            page_size=page_size,
        )
        return self._iter_flow(self._list_flow(pager, RequestOptions(timeout, extra_headers)))

    def list_page(
        self,
        *,
        state: StateFilter = None,
        backend: str | None = None,
        name: str | None = None,
        ids: Iterable[str] | None = None,
        label: LabelFilter = None,
        group: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Page[JobSummary]:
        """One page of :meth:`list`: at most ``limit`` jobs (server default
        ``LIMITS.default_page_size``) after ``cursor`` (a previous page's ``next_cursor``)."""
        params = page_params(
            job_query(state=state, backend=backend, name=name, ids=ids, label=label, group=group),
            limit=limit,
            cursor=cursor,
        )
        return self._drive(self._page_flow(params, RequestOptions(timeout, extra_headers)))

    def cancel(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Cancel the job (idempotent: a final job is returned as it was)."""
        return self._drive(self._cancel_flow(jobid, RequestOptions(timeout, extra_headers)))

    def purge(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Remove a final job and its directory. Raises :class:`ConflictError` if the
        job is not final (cancel it first)."""
        self._drive(self._purge_flow(jobid, RequestOptions(timeout, extra_headers)))

    def wait(
        self,
        jobid: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        request_timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Block until the job is final and return it.

        With events on (see the client's ``events``), listens to the server's event
        stream (and learns of the end within milliseconds); else, or with a server
        without it, polls the job's state every 0.02 s at first, backing off to
        ``poll_interval`` seconds. After ``timeout`` seconds raises :class:`WaitTimeout` (with the last
        status seen); the job is never cancelled. Here ``timeout`` bounds the whole
        wait, so the per-request timeout of the other methods is ``request_timeout``.
        """
        options = RequestOptions(request_timeout, extra_headers)
        return self._drive(
            wait_flow(
                self,
                jobid,
                timeout=timeout,
                poll_interval=poll_interval,
                options=options,
                events=self._events,
            )
        )

    def wait_all(
        self,
        jobs: Iterable[str | JobSummary] | Group | None = None,
        *,
        group: str | None = None,
        timeout: float | None = None,
        progress: Progress = False,
        poll_interval: float = 1.0,
        request_timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> builtins.list[Job]:
        """Block until every job (ids, or Job/JobSummary objects; or a :class:`Group`,
        or ``group=`` a group's id: all its members) is final; return the final jobs in
        the order given.

        With events on (see the client's ``events``), listens to the server's event
        stream (one stream, and one list request per 1,000 jobs); else, or with a server
        without it, all pending jobs are polled with one request per round. The final
        jobs are fetched whole together (``view=full``): a constant number of requests
        for any number of jobs.
        ``progress=True`` shows a ``tqdm.auto`` bar where tqdm is installed (the
        ``psik-api-client[progress]`` extra: a widget in Jupyter, a bar in a terminal),
        else prints ``"12/100 final"`` to stderr as the count changes; a callable is
        called as ``progress(done, total)`` instead. Raises :class:`WaitTimeout` (with
        ``.pending``) after ``timeout`` seconds, cancelling nothing. As in :meth:`wait`,
        ``request_timeout`` is the timeout of each request.
        """
        flow = wait_all_flow(
            self,
            jobs,
            group=group,
            timeout=timeout,
            poll_interval=poll_interval,
            progress=progress,
            options=RequestOptions(request_timeout, extra_headers),
            events=self._events,
        )
        return self._drive(flow)

    def watch(
        self,
        jobs: JobsArg = None,
        *,
        after: int | None = None,
        state: StateFilter = None,
        read_timeout: float = STREAM_READ_TIMEOUT,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Iterator[Event]:
        """The events of the caller's jobs (``GET /v1/events``) as they happen, one
        per history row, in id order, for as long as the caller iterates.

        ``jobs`` (an id, a job, or several) keeps those jobs' events only; ``state``
        (one state or several) only events whose job is then in one of them. ``after``
        (an event's ``id``; 0 for all) replays the events after it first; without it
        the events start now. A dropped connection, a server that ends the stream or
        restarts is picked up again with ``Last-Event-ID``: no event is lost or handed
        out twice. Reconnects back off, and give up after a minute without an answer
        (:class:`APIConnectionError`). ``read_timeout`` is the longest silence
        trusted (the server sends a heartbeat every 15 s by default); ``timeout=``
        gives the other phases. A server without events raises its
        :class:`NotFoundError` (or :class:`MethodNotAllowedError`).
        Stop by closing the iterator (or leaving a ``with closing(...)``).
        """
        flow = watch_flow(
            self,
            jobs=jobs,
            state=state,
            after=after,
            read_timeout=read_timeout,
            options=RequestOptions(timeout, extra_headers),
        )
        return self._iter_flow(flow)

    def backends(
        self,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> builtins.list[BackendInfo]:
        """The configured backends and their health."""
        return self._drive(self._backends_flow(RequestOptions(timeout, extra_headers)))

    def backend(
        self,
        name: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> BackendInfo:
        """One backend by name (:class:`NotFoundError` if there is none)."""
        return self._drive(self._backend_flow(name, RequestOptions(timeout, extra_headers)))

    def health(
        self,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The server's health document, ``{"status": "ok"}`` when all is well."""
        return self._drive(self._health_flow(RequestOptions(timeout, extra_headers)))

    def token(
        self,
        expires: float | dt.timedelta | None = None,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """A new token for the caller (``GET /v1/token``), to send as ``token=`` or
        ``$PSIK_API_TOKEN``, or to narrow with :func:`psik_api_client.attenuate`.
        ``expires`` (seconds or a ``timedelta``) asks for a shorter life than the
        server's default. The server mints only for a client certificate
        (``cert_dir=``): a request that is itself made with a token is refused
        (:class:`PermissionDeniedError`), and a server not run under ``certified serve``
        refuses with :class:`AuthenticationError`."""
        return self._drive(self._token_flow(expires, RequestOptions(timeout, extra_headers)))

    def token_key(
        self,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """The server's public key for tokens (``GET /v1/token/key``):
        ``"ed25519/<hex>"``, the ``public_key`` that :func:`psik_api_client.attenuate`
        verifies a token with."""
        return self._drive(self._token_key_flow(RequestOptions(timeout, extra_headers)))

    def upload(
        self,
        jobid: str,
        source: str | os.PathLike[str] | bytes | BinaryIO,
        remote_path: str,
        *,
        overwrite: bool = True,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> FileInfo:
        """Write ``source`` to the job's file ``remote_path`` (relative to the job's
        directory; parent directories are made) and return what the server stored.

        ``source`` is a local file's path, the bytes themselves, or a binary file
        object (sent from where it stands); a file is streamed from disk, never held in
        memory. The server writes it atomically, so a broken upload leaves no half
        file. With ``overwrite=False`` an existing file is left alone and
        :class:`PreconditionFailedError` raised. A local file that cannot be read
        raises its ``OSError``; a path with ``..``, ``.`` or empty segments, or an
        absolute one, raises :class:`InvalidRequestError`.
        """
        options = RequestOptions(timeout, extra_headers)
        return self._drive(
            upload_flow(self, jobid, source, remote_path, overwrite=overwrite, options=options)
        )

    def upload_dir(
        self,
        jobid: str,
        local_dir: str | os.PathLike[str],
        remote_dir: str = "",
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> builtins.list[FileInfo]:
        """Upload every regular file under ``local_dir`` into the job's ``remote_dir``
        (default: the job's directory itself), keeping their relative paths; one
        :meth:`upload` per file, in path order. Returns what was stored."""
        options = RequestOptions(timeout, extra_headers)
        return self._drive(upload_dir_flow(self, jobid, local_dir, remote_dir, options=options))

    def download(
        self,
        jobid: str,
        remote_path: str,
        local_path: str | os.PathLike[str],
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Path:
        """Save the job's file ``remote_path`` as ``local_path`` (or inside it, under
        the file's name, if it is a directory); return the path written.

        The bytes are streamed to ``<local_path>.part``, which resumes where it stopped
        (``Range``) after a dropped connection, now or in a later call, unless the file
        changed meanwhile. Once whole, its SHA-256 is checked against the server's and
        the ``.part`` renamed: ``local_path`` never holds a partial or damaged file. A
        mismatch removes the ``.part`` and raises :class:`ChecksumMismatchError`; a
        local write that fails raises its ``OSError``.
        """
        options = RequestOptions(timeout, extra_headers)
        return self._drive(download_flow(self, jobid, remote_path, local_path, options=options))

    def list_files(
        self,
        jobid: str,
        path: str = "",
        *,
        recursive: bool = False,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> FileListing:
        """The entries of the job's directory ``path`` (default: the job's directory),
        sorted by path; ``recursive`` walks its subdirectories (never following
        symlinks). A ``path`` naming a file gives a listing of that one file, as
        ``ls FILE`` does. ``truncated`` says the server left entries out."""
        options = RequestOptions(timeout, extra_headers)
        return self._drive(list_files_flow(self, jobid, path, recursive=recursive, options=options))

    def delete_file(
        self,
        jobid: str,
        path: str,
        *,
        recursive: bool = False,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Remove the job's file ``path``; a directory only with ``recursive=True``
        (else :class:`ConflictError`)."""
        options = RequestOptions(timeout, extra_headers)
        self._drive(delete_file_flow(self, jobid, path, recursive=recursive, options=options))

    def logs(
        self,
        jobid: str,
        *,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Every log of the job as ``{name: text}`` (``console``, ``stdout.N``,
        ``stderr.N`` for run N), decoded as UTF-8 with replacement. A long log keeps
        only its end, after a line saying how much was left out: :meth:`read_log`
        has it all."""
        return self._drive(logs_flow(self, jobid, RequestOptions(timeout, extra_headers)))

    def read_log(
        self,
        jobid: str,
        name: str,
        *,
        tail: int | None = None,
        offset: int | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """One log's bytes, as the job wrote them: all of it, from byte ``offset``, or
        its last ``tail`` lines (not both). ``name`` is ``console``, ``stdout.N`` or
        ``stderr.N``; ``stdout`` and ``stderr`` are the current run's. A log not
        written (yet) raises :class:`NotFoundError`."""
        options = RequestOptions(timeout, extra_headers)
        return self._drive(read_log_flow(self, jobid, name, tail=tail, offset=offset, options=options))

    def follow_log(
        self,
        jobid: str,
        name: str,
        *,
        offset: int = 0,
        tail: int | None = None,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Iterator[bytes]:
        """The log's bytes from ``offset`` (or from its last ``tail`` lines) on, chunk
        by chunk as the job writes them, ending once the job is final and the log read
        to its end. A log not written yet is waited for.

        A dropped connection is picked up again from the byte after the last chunk
        handed out (bounded retries, as for any request). Unless ``timeout=`` is
        given, the wait for the next chunk has no time limit: a job may be quiet for
        long. Stop early by closing the iterator (or leaving a ``with closing(...)``).
        """
        options = RequestOptions(timeout, extra_headers)
        return self._iter_flow(follow_log_flow(self, jobid, name, offset=offset, tail=tail, options=options))

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
