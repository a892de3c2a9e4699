"""The job-file routes under ``/v1/jobs/{jobid}/files``: list, download (streamed,
``Range``, ETag, SHA-256), upload a raw body or a multipart form (streamed to a temp
file beside the target, renamed when complete), delete.

The file path is taken from the URL *as sent* (``scope["raw_path"]``) and decoded once
(:func:`.paths.split_raw_path`: ``%2F`` is a separator, as generated clients send one,
and every check applies after decoding); everything the filesystem sees passes
:mod:`psik_api_server.files`. Bodies are never held whole:
a download reads :data:`.paths.CHUNK` bytes at a time in a worker thread, an upload
writes each received chunk through one, and both stop at the size limit. Which body
types reach these routes is :class:`psik_api_server.auth.local.LocalOnly`'s to say (no browser form).
"""

from __future__ import annotations

import contextlib
import email.message
import os
from collections.abc import AsyncGenerator
from urllib.parse import unquote_to_bytes

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from psik_api_core import LIMITS, Action, FileListing, Principal, ProblemCode, field_error
from psik_api_core.limits import byte_size

from ..aio import pread_chunks
from ..auth.local import principal
from ..context import context
from ..errors import ApiError
from ..files import paths, preconditions, ranges, writes
from ..files.service import FileService, OpenFile
from ..jobs.service import in_thread
from .headers import attachment
from .params import bad_query, path_jobid, single_params

OCTET_STREAM = "application/octet-stream"


# ---- request parsing ----


def _files(request: Request) -> FileService:
    files = context(request.app).files
    return files


def _flag(query: dict[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value not in {"true", "false", "1", "0"}:
        raise bad_query(name, "must be true or false")
    return value in {"true", "1"}


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
    pending = bytearray()
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        pending += chunk
        if len(pending) >= paths.CHUNK:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


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


async def list_job_files(request: Request) -> Response:
    query = single_params(request, {"recursive"})
    jobid, recursive = path_jobid(request), _flag(query, "recursive")
    got = await _files(request).get(principal(request), jobid, (), recursive=recursive)
    assert isinstance(got, FileListing)
    return _listing(got)


async def get_job_file(request: Request) -> Response:
    query = single_params(request, {"recursive"})
    jobid, recursive = path_jobid(request), _flag(query, "recursive")
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


async def put_job_file(request: Request) -> Response:
    single_params(request, set())
    jobid, parts = path_jobid(request), _file_path(request)
    if not parts:
        raise paths.invalid("", "an upload needs a file path after /files/ (or POST a form to /files)")
    if _names_dir(request):
        raise _not_a_directory(parts, "an upload names a file")
    conditions = preconditions.Preconditions(
        request.headers.get("if-match"), request.headers.get("if-none-match")
    )
    files = _files(request)
    upload = await files.begin_upload(principal(request), jobid, parts, conditions=conditions)
    try:
        async for chunk in _body_chunks(request, files.max_upload_bytes):
            await in_thread(_write, files, upload, chunk)
        await in_thread(files.finish_upload_sync, upload, conditions=conditions)
        info = await in_thread(upload.info)
    finally:
        with anyio.CancelScope(shield=True):
            await in_thread(upload.close)
    return JSONResponse(info.model_dump(mode="json"), status_code=201 if upload.created else 200)


def _write(files: FileService, upload: writes.Upload, data: bytes) -> None:
    try:
        upload.write(data)
    except OSError as e:
        raise files.os_error(e, f"write {upload.shown[:200]!r}") from None


# ---- POST multipart ----


class FormUpload:
    """A multipart body's ``files`` parts, each streamed to its own temp file as it
    arrives (python-multipart calls these from the worker thread that feeds it), then
    committed together, or none of them."""

    def __init__(self, files: FileService, root: paths.Root, into: tuple[str, ...]) -> None:
        self.files = files
        self.root = root
        self.into = into
        self.uploads: list[writes.Upload] = []
        self.current: writes.Upload | None = None
        self.parts = 0
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self._headers.clear()
        self.current = None

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self.parts += 1
        if self.parts > LIMITS.max_upload_files:
            raise ApiError(
                ProblemCode.too_large,
                f"more than {LIMITS.max_upload_files} parts in one upload; nothing was kept",
            )
        disposition = email.message.Message()
        disposition["content-disposition"] = self._headers.get("content-disposition", "")
        if disposition.get_param("name", header="content-disposition") != "files":
            return  # not a file of ours: its bytes are skipped
        filename = disposition.get_filename()
        if not filename:
            raise ApiError(
                ProblemCode.bad_request,
                "a part named 'files' has no filename; nothing was kept",
                errors=[field_error(["body", "files"], "no filename")],
            )
        if filename.endswith("/"):
            raise paths.invalid(filename, "ends with '/', which names a directory, not a file", "filename")
        parts = self.into + paths.split_path(filename, where="filename")
        shown = paths.joined(parts)
        if any(u.shown == shown for u in self.uploads):
            raise ApiError(
                ProblemCode.bad_request,
                f"{shown[:200]!r} is given twice in one upload; nothing was kept",
                errors=[field_error(["body", "files"], "a file name given twice")],
            )
        try:
            self.current = writes.begin_upload(self.root, parts, shown)
        except OSError as e:
            raise self.files.os_error(e, f"write {shown[:200]!r}") from None
        self.uploads.append(self.current)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.current is not None:
            _write(self.files, self.current, data[start:end])

    def _part_end(self) -> None:
        self.current = None

    def _end(self) -> None:
        self.ended = True

    def commit(self) -> None:
        """Put every file in place, or (if one cannot be) none: those already renamed
        are taken back, replaced ones restored (blocking)."""
        try:
            for upload in self.uploads:
                try:
                    self.files.commit_sync(upload, keep_backup=True)
                except OSError as e:
                    raise self.files.os_error(e, f"write {upload.shown[:200]!r}") from None
        except BaseException:
            for upload in reversed(self.uploads):
                with contextlib.suppress(OSError):
                    upload.rollback()
            raise
        for upload in self.uploads:
            upload.forget_backup()
            self.files.checksums.put(os.fstat(upload.fd), upload.sha256.hexdigest())

    def close(self) -> None:
        # The last first: a directory an earlier part made may hold a later one's file.
        for upload in reversed(self.uploads):
            with contextlib.suppress(OSError):
                upload.forget_backup()
                upload.close()
        self.root.close()


def _boundary(request: Request) -> bytes:
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ApiError(
            ProblemCode.bad_request,
            "a multipart/form-data body needs a boundary (of at most 200 characters)",
            errors=[field_error(["header", "Content-Type"], "no boundary")],
        )
    return boundary


async def upload_job_files(request: Request) -> Response:
    query = single_params(request, {"dir"})
    jobid = path_jobid(request)
    into = paths.split_path(query.get("dir", ""), where="dir")
    boundary = _boundary(request)
    files = _files(request)
    who: Principal = principal(request)
    root = await in_thread(files.open_root, who, jobid, Action.write, create=True)
    form = FormUpload(files, root, into)
    try:
        parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
        async for chunk in _body_chunks(request, files.max_upload_bytes):
            await in_thread(_feed, parser, chunk)
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
            await in_thread(form.close)
    return JSONResponse([i.model_dump(mode="json") for i in infos], status_code=201)


def _feed(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except MultipartParseError as e:
        raise ApiError(ProblemCode.bad_request, f"the multipart body is malformed: {e}") from None


# ---- DELETE ----


async def delete_job_file(request: Request) -> Response:
    query = single_params(request, {"recursive"})
    jobid, recursive = path_jobid(request), _flag(query, "recursive")
    parts = _file_path(request)
    directory = _names_dir(request)
    await _files(request).delete(principal(request), jobid, parts, recursive=recursive, directory=directory)
    return Response(status_code=204)
