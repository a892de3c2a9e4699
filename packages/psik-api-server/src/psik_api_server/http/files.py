"""The job-file routes under ``/v1/jobs/{jobid}/files``: list, download (streamed,
``Range``, ETag, SHA-256), upload a raw body or a multipart form (streamed to a temp
file beside the target, renamed when complete), delete.

The file path is taken from the URL *as sent* (``scope["raw_path"]``) and decoded once
(:func:`.paths.split_raw_path`: ``%2F`` is a separator, as generated clients send one,
and every check applies after decoding); everything the filesystem sees passes
:mod:`psik_api_server.files`. Bodies are never held whole:
a download reads :data:`.paths.CHUNK` bytes at a time in a worker thread, an upload
writes (and hashes) each :data:`.paths.CHUNK` in one while the next is received
(:class:`WriteBehind`), and both stop at the size limit. Which body
types reach these routes (no browser form) is the request-shape guard's to say
(:mod:`psik_api_server.auth.guard`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Callable
from urllib.parse import unquote_to_bytes

import anyio
from python_multipart.multipart import MultipartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from psik_api_core import Action, FileListing, ProblemCode, field_error
from psik_api_core.limits import byte_size

from ..aio import in_thread, pread_chunks
from ..auth.authenticator import principal
from ..context import context
from ..errors import ApiError
from ..files import paths, preconditions, ranges
from ..files.service import FileService, OpenFile
from .headers import attachment
from .multipart import FormUpload, boundary, feed, write_chunk
from .params import Params

OCTET_STREAM = "application/octet-stream"


# ---- request parsing ----


def _files(request: Request) -> FileService:
    files = context(request.app).files
    return files


def _file_path(request: Request) -> tuple[str, ...]:
    """The segments of ``{path}``, from the URL as the client sent it."""
    decoded = str(request.path_params.get("path", ""))
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return paths.split_path(decoded)
    raw = raw.split(b"?", 1)[0]  # httpx's ASGI transport passes the query along
    segments = raw.split(b"/", 5)  # "", v1, jobs, {jobid}, files, {path}
    rest = segments[5] if len(segments) == 6 else b""
    parts = paths.split_raw_path(rest)
    if unquote_to_bytes(rest).decode("utf-8", "replace") != decoded:
        # The route matched another split of the decoded path than the raw one has:
        # an encoded separator before {path}.
        raise paths.invalid(decoded, "has an encoded separator")
    return parts


def _names_dir(request: Request) -> bool:
    """Whether ``{path}`` ends with ``/``: it then names a directory (a file there is
    400, as POSIX's ENOTDIR), never a file to write."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.split(b"?", 1)[0].endswith(b"/")
    return str(request.path_params.get("path", "")).endswith("/")


def _not_a_directory(parts: tuple[str, ...], why: str) -> ApiError:
    return paths.invalid(paths.joined(parts) + "/", f"ends with '/', which names a directory; {why}")


def _too_large(limit: int) -> ApiError:
    return ApiError(ProblemCode.too_large, f"the upload is over the server's limit of {byte_size(limit)}")


async def _body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body in pieces of about :data:`.paths.CHUNK` bytes; 413 as soon
    as it is over ``limit`` (declared or received)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(limit)
    total = 0
    pending: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        pending.append(chunk)
        size += len(chunk)
        if size >= paths.CHUNK:
            yield b"".join(pending)  # one copy, not one per received piece
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


class WriteBehind:
    """Hands each piece of a body to ``write`` in a worker thread and returns at once,
    so that the next piece is received while this one is written (and hashed): the
    loop is never idle waiting for the disk. At most one piece is being written, so
    an upload holds at most two in memory.

    ``write`` is called for one piece at a time, in order. :meth:`drain` waits for the
    last one (and raises its error); :meth:`aclose`, in a ``finally``, waits for it
    whatever happened, so that nothing still writes when the upload's file closes."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._writing: asyncio.Task[None] | None = None

    async def put(self, piece: bytes) -> None:
        await self.drain()
        self._writing = asyncio.ensure_future(in_thread(self._write, piece))

    async def drain(self) -> None:
        if self._writing is not None:
            try:
                # Shielded: a cancelled request leaves the write to finish for aclose.
                await asyncio.shield(self._writing)
            finally:
                if self._writing.done():
                    self._writing = None

    async def aclose(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([writing])
            if not writing.cancelled():
                writing.exception()  # retrieved: the error that ended the upload is raised instead


# ---- GET / HEAD ----


class FileStream(StreamingResponse):
    """A streamed file that closes its descriptor however the response ends."""

    def __init__(self, opened: OpenFile, start: int, end: int, status: int, headers: dict[str, str]) -> None:
        super().__init__(
            pread_chunks(opened.fd, start, end, paths.CHUNK), status_code=status, headers=headers
        )
        self.opened = opened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await in_thread(self.opened.close)


#: Says what a GET answered: ``dir`` (a listing, JSON) or ``file`` (its bytes), so that
#: a client asked to save a file never saves a listing instead.
FILE_TYPE = "X-File-Type"


def _listing(listing: FileListing) -> Response:
    return JSONResponse(listing.model_dump(mode="json"), headers={FILE_TYPE: "dir"})


def _matches(header: str, etag: str) -> bool:
    return header.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in header.split(",")]


async def _serve(request: Request, opened: OpenFile) -> Response:
    size = opened.st.st_size
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": opened.etag,
        "Last-Modified": opened.last_modified,
        "Content-Type": OCTET_STREAM,
        FILE_TYPE: "file",
    }
    if opened.sha256 is not None:
        headers["X-Checksum-Sha256"] = opened.sha256
    try:
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, opened.etag):
            await in_thread(opened.close)
            return Response(status_code=304, headers={k: headers[k] for k in ("ETag", "Last-Modified")})
        wanted = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() not in (opened.etag, opened.last_modified):
            wanted = None  # the file changed since the client's first part: send it whole
        try:
            span = ranges.parse_range(wanted, size)
        except ranges.Unsatisfiable:
            await in_thread(opened.close)
            raise ApiError(
                ProblemCode.range_not_satisfiable,
                f"Range {wanted!r} asks for no byte of a file of {size} bytes",
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        status, start, end = 200, 0, size
        if span is not None:
            status, start, end = 206, span[0], span[1] + 1
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            await in_thread(opened.close)
            return Response(status_code=status, headers=headers)
        return FileStream(opened, start, end, status, headers)
    except BaseException:
        opened.close()
        raise


async def list_job_files(request: Request, params: Params) -> Response:
    jobid, recursive = params.path("jobid"), params.flag("recursive")
    got = await _files(request).get(principal(request), jobid, (), recursive=recursive)
    assert isinstance(got, FileListing)
    return _listing(got)


async def get_job_file(request: Request, params: Params) -> Response:
    jobid, recursive = params.path("jobid"), params.flag("recursive")
    parts = _file_path(request)
    whole = "range" not in request.headers
    got = await _files(request).get(principal(request), jobid, parts, recursive=recursive, whole=whole)
    if isinstance(got, FileListing):
        return _listing(got)
    if _names_dir(request):
        await in_thread(got.close)
        raise _not_a_directory(parts, "this is a file")
    response = await _serve(request, got)
    response.headers["Content-Disposition"] = attachment(parts[-1])  # never shown as a page
    return response


# ---- PUT / POST a raw body ----


async def put_job_file(request: Request, params: Params) -> Response:
    jobid, parts = params.path("jobid"), _file_path(request)
    if not parts:
        raise paths.invalid("", "an upload needs a file path after /files/ (or POST a form to /files)")
    if _names_dir(request):
        raise _not_a_directory(parts, "an upload names a file")
    conditions = preconditions.Preconditions(
        request.headers.get("if-match"), request.headers.get("if-none-match")
    )
    files = _files(request)
    upload = await files.begin_upload(principal(request), jobid, parts, conditions=conditions)
    writer = WriteBehind(functools.partial(write_chunk, files, upload))
    try:
        async for chunk in _body_chunks(request, files.max_upload_bytes):
            await writer.put(chunk)
        await writer.drain()
        await in_thread(files.finish_upload_sync, upload, conditions=conditions)
        info = await in_thread(upload.info)
    finally:
        with anyio.CancelScope(shield=True):
            await writer.aclose()
            await in_thread(upload.close)
    return JSONResponse(info.model_dump(mode="json"), status_code=201 if upload.created else 200)


# ---- POST multipart ----


async def upload_job_files(request: Request, params: Params) -> Response:
    jobid = params.path("jobid")
    into = paths.split_path(params.text("dir") or "", where="dir")
    separator = boundary(request)
    files = _files(request)
    root = await in_thread(files.open_root, principal(request), jobid, Action.write, create=True)
    form = FormUpload(files, root, into)
    writer: WriteBehind | None = None
    try:
        parser = MultipartParser(separator, form.callbacks())  # type: ignore[arg-type]
        writer = WriteBehind(functools.partial(feed, parser))  # parsed (and written) behind
        async for chunk in _body_chunks(request, files.max_upload_bytes):
            await writer.put(chunk)
        await writer.drain()
        if not form.ended:
            raise ApiError(ProblemCode.bad_request, "the multipart body ended before its closing boundary")
        if not form.uploads:
            raise ApiError(
                ProblemCode.bad_request,
                "the multipart body has no part named 'files' with a filename",
                errors=[field_error(["body", "files"], "missing")],
            )
        await in_thread(form.commit)
        infos = [await in_thread(u.info) for u in form.uploads]
    finally:
        with anyio.CancelScope(shield=True):
            if writer is not None:
                await writer.aclose()
            await in_thread(form.close)
    return JSONResponse([i.model_dump(mode="json") for i in infos], status_code=201)


# ---- DELETE ----


async def delete_job_file(request: Request, params: Params) -> Response:
    jobid, recursive = params.path("jobid"), params.flag("recursive")
    parts = _file_path(request)
    directory = _names_dir(request)
    await _files(request).delete(principal(request), jobid, parts, recursive=recursive, directory=directory)
    return Response(status_code=204)
