"""The log routes: ``GET /v1/jobs/{jobid}/logs`` (``{name: text}``, bounded per file) and
``GET /v1/jobs/{jobid}/logs/{name}`` (raw bytes; ``offset``, ``tail``, ``follow``).

The owner check is the other job routes' (``service.access.owned``: another's job is 404);
the files are read by :mod:`psik_api_server.jobs.logs`, in worker threads. A follow holds two descriptors
and one chunk at a time (constant memory), polls the file every :data:`POLL` seconds,
and ends once the job is final (the index row, which the watcher keeps current, says so)
or was never started (``new``), and the file is read to its end, or as soon as the
client leaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from psik_api_core import LIMITS, Action, JobState, Principal, ProblemCode, field_error

from ..aio import in_thread, pread_chunks
from ..auth.authenticator import principal
from ..context import context
from ..errors import ApiError
from ..jobs import logs as joblogs
from ..jobs.service import JobService
from .params import Params

_logger = logging.getLogger(__name__)

#: No charset: a log is the bytes the job wrote, whatever their encoding (starlette
#: would add ``charset=utf-8`` to a ``media_type``).
TEXT = "text/plain"
#: How often a follow looks for new output (and, at the end of the file, for the job's end).
POLL = 0.1

_MARKER = (
    "[psik-api: {left_out} bytes before this were left out; GET /v1/jobs/{jobid}/logs/{name} has them all]\n"
)


# ---- what the routes do (a principal, not a request: tests call these directly) ----


async def job_logs(service: JobService, who: Principal, jobid: str) -> dict[str, str]:
    """``{name: text}`` of every log of the job (empty if it has no log directory)."""
    return await in_thread(_job_logs_sync, service, who, jobid)


def _job_logs_sync(service: JobService, who: Principal, jobid: str) -> dict[str, str]:
    service.access.owned(who, jobid, Action.read)
    try:
        dirfd = joblogs.open_log_dir(service.backend.prefix, jobid)
    except (FileNotFoundError, joblogs.NotALog):
        return {}
    marker = _MARKER.replace("{jobid}", jobid)  # the rest is formatted per file
    try:
        return joblogs.read_logs(dirfd, LIMITS.max_log_bytes_in_logs, marker)
    finally:
        os.close(dirfd)


@dataclass
class OpenLog:
    """One log of one job, open: the log directory's descriptor, and the file's once it
    exists (a follow may start before the job wrote it)."""

    jobid: str
    name: str  # resolved: ``stdout.2``, never ``stdout``
    dirfd: int
    fd: int | None

    def reopen(self) -> bool:
        """Look for the file again (blocking); True once it is open. A name that became
        a symlink or a FIFO meanwhile stays unopened, for good."""
        if self.fd is None:
            try:
                self.fd = joblogs.open_log(self.dirfd, self.name)
            except (joblogs.NotALog, OSError) as e:
                _logger.warning("job %s: log %s: %s; not read", self.jobid, self.name, e)
        return self.fd is not None

    def close(self) -> None:
        for fd in (self.fd, self.dirfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self.dirfd = None, -1


async def open_job_log(
    service: JobService, who: Principal, jobid: str, name: str, *, follow: bool
) -> OpenLog:
    """Open log ``name`` of the job; 404 if the name is no log's, the job not the
    caller's, or (unless ``follow``) the log not there or not a regular file."""
    if not joblogs.is_log_name(name):  # before any path is made of it
        raise ApiError(
            ProblemCode.not_found,
            f"no log {name[:64]!r}; logs are named {joblogs.VALID_NAMES}",
            errors=[field_error(["path", "name"], "not a log name")],
        )
    return await in_thread(_open_job_log_sync, service, who, jobid, name, follow)


def _open_job_log_sync(service: JobService, who: Principal, jobid: str, name: str, follow: bool) -> OpenLog:
    row = service.access.owned(who, jobid, Action.read)
    resolved = joblogs.resolve_name(name, row.jobndx)
    missing = ApiError(ProblemCode.not_found, f"job {jobid} has no log {resolved}", jobid=jobid)
    try:
        dirfd = joblogs.open_log_dir(service.backend.prefix, jobid)
    except (FileNotFoundError, joblogs.NotALog):
        raise missing from None
    try:
        fd = joblogs.open_log(dirfd, resolved)
    except joblogs.NotALog as e:
        os.close(dirfd)
        _logger.warning("job %s: %s; refused", jobid, e)
        raise ApiError(
            ProblemCode.not_found,
            f"job {jobid}'s log {resolved} is not a regular file; not read",
            jobid=jobid,
        ) from None
    except BaseException:
        os.close(dirfd)
        raise
    if fd is None and not follow:
        os.close(dirfd)
        raise missing
    return OpenLog(jobid, resolved, dirfd, fd)


def _log_is_complete(service: JobService, log: OpenLog) -> bool:
    """Whether nothing more will be written to the log: the job is final (or gone), or
    ``new`` (never started: no process writes, and it may never start), or the log is
    of an earlier run than the job's current one."""
    row = service.store.get(log.jobid)
    if row is None or row.state.is_final or row.state is JobState.new:
        return True
    run = joblogs.run_of(log.name)
    return run is not None and row.jobndx > run


async def _follow(service: JobService, log: OpenLog, start: int) -> AsyncGenerator[bytes, None]:
    """The bytes from ``start`` on, then new ones as they are written, until the log is
    complete and read to its end."""
    pos = start
    while True:
        # Asked before reading: what was written before the job ended is read below.
        complete = await in_thread(_log_is_complete, service, log)
        if log.fd is not None or await in_thread(log.reopen):
            assert log.fd is not None
            while chunk := await in_thread(os.pread, log.fd, joblogs.BLOCK, pos):
                pos += len(chunk)
                yield chunk
        if complete:
            return
        await anyio.sleep(POLL)


class LogResponse(StreamingResponse):
    """A streamed log that closes its files however the response ends, and stops as
    soon as the client leaves: a follow may write nothing for minutes, and would only
    notice a closed connection at its next write (an ASGI 2.4 server's ``send`` raises
    then, and starlette listens for the disconnect only below 2.4)."""

    def __init__(self, content: AsyncGenerator[bytes, None], log: OpenLog, headers: dict[str, str]) -> None:
        super().__init__(content, headers={**headers, "Content-Type": TEXT})
        self.content = content
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left while we wrote
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.content.aclose()  # a stream cut short ends here, not in the GC
            self.log.close()


# ---- the handlers ----


async def get_job_logs(request: Request, params: Params) -> Response:
    jobid = params.path("jobid")
    return JSONResponse(await job_logs(context(request.app).service, principal(request), jobid))


async def get_job_log(request: Request, params: Params) -> Response:
    jobid = params.path("jobid")
    offset, tail = params.integer("offset"), params.integer("tail")
    # offset=0 is its documented default, which generated clients send along with tail.
    if offset and tail is not None:
        raise ApiError(
            ProblemCode.validation_error,
            "query parameters 'offset' and 'tail' cannot be given together",
            errors=[
                field_error(["query", n], "not with " + o)
                for n, o in (("offset", "tail"), ("tail", "offset"))
            ],
        )
    follow = params.flag("follow")
    service = context(request.app).service
    name = params.path("name")
    log = await open_job_log(service, principal(request), jobid, name, follow=follow)
    try:
        size = 0 if log.fd is None else await in_thread(joblogs.size_of, log.fd)
        if tail is not None and log.fd is not None:
            start = await in_thread(joblogs.tail_start, log.fd, size, tail)
        else:
            start = offset or 0
        headers = {"X-Log-Size": str(size)}
        if follow and request.method != "HEAD":
            # From `offset` on even if the job has not written that far yet: a client
            # resuming a follow never gets bytes it had.
            return LogResponse(_follow(service, log, start), log, headers)
        start = min(start, size)
        headers["Content-Length"] = str(size - start)
        if request.method == "HEAD":
            log.close()
            return Response(headers={**headers, "Content-Type": TEXT})
        assert log.fd is not None  # only a follow opens a log not there yet
        return LogResponse(pread_chunks(log.fd, start, size, joblogs.BLOCK), log, headers)
    except BaseException:
        log.close()
        raise
