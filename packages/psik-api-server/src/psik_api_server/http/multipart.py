"""A ``multipart/form-data`` upload (``POST /v1/jobs/{jobid}/files``), parsed as it
arrives: python-multipart's push parser is fed each received chunk in a worker thread,
and each ``files`` part streams to its own temp file beside its target; the parts are
put in place together once the body is complete, or none of them.
"""

from __future__ import annotations

import contextlib
import email.message
import os

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from psik_api_core import LIMITS, ProblemCode, field_error

from ..errors import ApiError
from ..files import paths, writes
from ..files.service import FileService


def write_chunk(files: FileService, upload: writes.Upload, data: bytes) -> None:
    """Write ``data`` to ``upload`` (blocking); an OSError becomes the files API's problem."""
    try:
        upload.write(data)
    except OSError as e:
        raise files.os_error(e, f"write {upload.shown[:200]!r}") from None


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
            write_chunk(self.files, self.current, data[start:end])

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


def boundary(request: Request) -> bytes:
    """The boundary of a ``multipart/form-data`` body; 400 if it has none (or a long one)."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ApiError(
            ProblemCode.bad_request,
            "a multipart/form-data body needs a boundary (of at most 200 characters)",
            errors=[field_error(["header", "Content-Type"], "no boundary")],
        )
    return boundary


def feed(parser: MultipartParser, chunk: bytes) -> None:
    """Parse the next ``chunk`` of the body (blocking: the parts' files are written); 400
    if the body is malformed."""
    try:
        parser.write(chunk)
    except MultipartParseError as e:
        raise ApiError(ProblemCode.bad_request, f"the multipart body is malformed: {e}") from None
