"""A job's files: upload, download, list and delete, written once as flows (see ``_base``).

Local files are touched only through the ``OpenFile`` and ``Disk`` steps (the blocking
helpers below), so the async client does that work in worker threads. Neither
direction holds a whole file in memory: an upload's body is a :class:`FileBody`,
read a block at a time as httpx sends it (in a worker thread in the async client),
and a download is written to ``<local>.part`` as it arrives, a block at a time by a
:class:`BlockWriter` while the next block is received.

A download resumes: the ``.part`` and the ``ETag`` it was read under (saved beside it,
in ``<local>.part.etag``) let the next request ask only for the rest (``Range``, with
``If-Range`` so that a file changed meanwhile is sent whole again). A connection lost
mid-body is resumed the same way at once, as often as the retry policy allows; after
that the ``.part`` stays for the next call. The whole file's SHA-256 is checked
against the server's ``X-Checksum-Sha256`` before the ``.part`` takes the final name;
the server sends none for a large file it has not hashed yet (it never holds a download
back to hash one), and then the ``.part``'s size is checked against the file's size
the answer gave (``Content-Length``, or the total of a 206's ``Content-Range``).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import anyio.to_thread
import httpx
import pydantic

from psik_api_core import FileInfo, FileListing

from ._base import Close, Disk, Flow, OpenFile, ReadChunk, Sleep, parse
from ._exceptions import (
    APIResponseValidationError,
    ChecksumMismatchError,
    InvalidRequestError,
    RangeNotSatisfiableError,
    error_from_transport,
)
from ._inputs import file_path, path_jobid
from ._types import DEFAULT_OPTIONS, RequestOptions

if TYPE_CHECKING:
    from ._base import BaseClient

#: What ``upload`` sends: a local file's path, the bytes themselves, or a binary file
#: object (read from where it stands).
Source = str | os.PathLike[str] | bytes | BinaryIO

#: How much of a file is read, or written, at a time.
BLOCK = 1 << 20

_FILE_INFO = pydantic.TypeAdapter(FileInfo)
_FILE_INFOS = pydantic.TypeAdapter(list[FileInfo])
_LISTING = pydantic.TypeAdapter(FileListing)


def files_path(jobid: str, path: str = "", *, directory: bool = False) -> str:
    """The API path of a job file (``/v1/jobs/{id}/files[/{path}]``), checked."""
    quoted = file_path(path, directory=directory)
    base = f"/v1/jobs/{path_jobid(jobid)}/files"
    return f"{base}/{quoted}" if quoted else base


# ---- the flows ----


def upload_flow(
    client: BaseClient,
    jobid: str,
    source: Source,
    remote_path: str,
    *,
    overwrite: bool = True,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[FileInfo]:
    """PUT ``source`` to the job file ``remote_path``; ``overwrite=False`` sends
    ``If-None-Match: *`` (the server then refuses to replace a file: 412)."""
    path = files_path(jobid, remote_path)
    headers = {"Content-Type": "application/octet-stream"}
    if not overwrite:
        headers["If-None-Match"] = "*"
    replayable = True
    if isinstance(source, bytes | bytearray | memoryview):
        request = client._build_request("PUT", path, content=bytes(source), headers=headers, options=options)
    else:
        if isinstance(source, str | os.PathLike):
            body = yield Disk(FileBody.of_path, (os.fspath(source),))
        elif callable(getattr(source, "read", None)):
            body = yield Disk(FileBody.of_file, (source,))
        else:
            raise InvalidRequestError(
                f"upload() sends a file path, bytes or a binary file object, not {type(source).__name__}"
            )
        assert isinstance(body, FileBody)
        if body.size is None:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(body.size)
        replayable = body.replayable
        request = client._build_request("PUT", path, stream=body, headers=headers, options=options)
    response = yield from client._send_flow(request, retry=replayable)
    return parse(response, _FILE_INFO)


def upload_dir_flow(
    client: BaseClient,
    jobid: str,
    local_dir: str | os.PathLike[str],
    remote_dir: str = "",
    *,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[list[FileInfo]]:
    """Upload every regular file under ``local_dir`` to ``remote_dir`` (relative paths
    kept), one PUT per file, in path order."""
    files_path(jobid, remote_dir, directory=True)  # a bad directory fails before any upload
    base = remote_dir.rstrip("/")
    names = yield Disk(walk_files, (os.fspath(local_dir),))
    assert isinstance(names, list)
    remotes = [f"{base}/{name}" if base else name for name in names]
    for remote in remotes:  # a bad name fails before any file is sent
        files_path(jobid, remote)
    uploaded: list[FileInfo] = []
    for name, remote in zip(names, remotes, strict=True):
        local = os.path.join(os.fspath(local_dir), *name.split("/"))
        uploaded.append((yield from upload_flow(client, jobid, local, remote, options=options)))
    return uploaded


def download_flow(
    client: BaseClient,
    jobid: str,
    remote_path: str,
    local_path: str | os.PathLike[str],
    *,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[Path]:
    """Stream the job file ``remote_path`` to ``local_path`` (see the module docstring);
    return the path written."""
    path = files_path(jobid, remote_path)
    target = yield Disk(download_target, (os.fspath(local_path), posixpath.basename(remote_path)))
    assert isinstance(target, str)
    part, etag_path = target + ".part", target + ".part.etag"
    state = yield Disk(part_state, (part, etag_path))
    assert isinstance(state, tuple)
    size, etag, hasher = state
    attempt = 0
    while True:
        # The bytes as stored: a compressed answer would not match the Range or checksum.
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if size:
            headers |= {"Range": f"bytes={size}-", "If-Range": etag}
        request = client._build_request("GET", path, headers=headers, options=options)
        try:
            response = yield from client._send_flow(request, stream=True)
        except RangeNotSatisfiableError:
            if not size:
                raise
            # The .part is as long as the file, or longer: start afresh.
            yield Disk(discard, (part, etag_path))
            size, etag, hasher = 0, None, hashlib.sha256()
            continue
        if response.status_code == 206:
            if not size or content_range_start(response) != size:
                raise APIResponseValidationError(
                    f"GET {request.url.path} answered a range that was not asked for "
                    f"({response.headers.get('Content-Range')!r})",
                    response=response,
                )
            mode = "ab"
        elif is_listing(response):
            yield Close(response)
            raise InvalidRequestError(
                f"job {jobid}'s {remote_path!r} is a directory, not a file: download() saves one"
                " file (list_files() lists a directory); nothing was written"
            )
        else:  # the whole file: anew, or again because it changed since the .part began
            size, hasher, mode = 0, hashlib.sha256(), "wb"
        etag = strong_etag(response)
        total = whole_size(response)
        file = cast("BinaryIO", (yield OpenFile(part, mode)))
        yield Disk(save_etag, (etag_path, etag))
        expected = response.headers.get("X-Checksum-Sha256")
        received, dropped = yield from _receive(response, file, hasher)
        size += received
        yield Disk(file.close)
        yield Close(response)
        if dropped is None:
            break
        if received:
            attempt = 0  # it was moving: the retries are for a link that stays down
        delay = client._retry.delay(request, dropped, attempt)
        if delay is None:  # the .part stays: downloading again resumes it
            raise error_from_transport(dropped, request, client._where()) from dropped
        attempt += 1
        yield Sleep(delay)
        if etag is None:  # the rest cannot be asked for safely
            size, hasher = 0, hashlib.sha256()
    actual = hasher.hexdigest()
    if expected is None and total is not None and size != total:
        yield Disk(discard, (part, etag_path))
        raise ChecksumMismatchError(
            f"job {jobid}'s file {remote_path} arrived incomplete or changed while it was read: "
            f"{size} bytes arrived, the server's answer said {total} (it sent no checksum); "
            f"nothing was written to {target} (download it again)",
            path=remote_path,
            expected=f"{total} bytes",
            actual=f"{size} bytes",
        )
    if expected is not None and actual != expected.strip().lower():
        yield Disk(discard, (part, etag_path))
        raise ChecksumMismatchError(
            f"job {jobid}'s file {remote_path} arrived damaged or changed while it was read: "
            f"its SHA-256 is {actual}, the server's is {expected}; nothing was written to "
            f"{target} (download it again)",
            path=remote_path,
            expected=expected,
            actual=actual,
        )
    yield Disk(finish, (part, etag_path, target))
    return Path(target)


def _receive(response: httpx.Response, file: BinaryIO, hasher: Any) -> Flow[tuple[int, Any]]:
    """Write the body of ``response`` to ``file`` (and into ``hasher``) in blocks of
    :data:`BLOCK` bytes, each written by a :class:`BlockWriter` while the next one
    arrives; return the count written and the transport error that cut the body short,
    if one did."""
    written, chunks, pending, dropped = 0, list[bytes](), 0, None
    writer = BlockWriter(file, hasher)
    try:
        while True:
            chunk = yield ReadChunk(response)
            if isinstance(chunk, httpx.TransportError):
                dropped = chunk
                break
            if chunk is None:
                break
            assert isinstance(chunk, bytes)
            chunks.append(chunk)
            pending += len(chunk)
            if pending >= BLOCK:
                yield Disk(writer.put, (chunks,))
                written += pending
                chunks, pending = [], 0
        if chunks:  # what arrived before a drop is kept, to be resumed after
            yield Disk(writer.put_last, (chunks,))
            written += pending
        yield Disk(writer.close)
    finally:
        # A flow cut short (closed, or an error raised) still waits for the block being
        # written before its file is closed; a no-op when it ended normally.
        writer.close(quiet=True)
    return written, dropped


def list_files_flow(
    client: BaseClient,
    jobid: str,
    path: str = "",
    *,
    recursive: bool = False,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[FileListing]:
    """GET ``/v1/jobs/{id}/files[/{path}]``: a directory's listing. A path that names a
    file is answered with the file itself: it is not read, and the listing holds that
    one file (as ``ls FILE`` does)."""
    params = [("recursive", "true")] if recursive else []
    request = client._build_request(
        "GET", files_path(jobid, path, directory=True), params=params, options=options
    )
    response = yield from client._send_flow(request, stream=True)
    media = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media == "application/json":
        yield from client._read_flow(response)
        return parse(response, _LISTING)
    yield Close(response)
    return FileListing(path=path, entries=[file_info_of(path, response)])


def delete_file_flow(
    client: BaseClient,
    jobid: str,
    path: str,
    *,
    recursive: bool = False,
    options: RequestOptions = DEFAULT_OPTIONS,
) -> Flow[None]:
    """DELETE ``/v1/jobs/{id}/files/{path}`` (a directory only with ``recursive``)."""
    params = [("recursive", "true")] if recursive else []
    request = client._build_request(
        "DELETE", files_path(jobid, path, directory=True), params=params, options=options
    )
    yield from client._send_flow(request)


# ---- reading a response's headers ----


def content_range_start(response: httpx.Response) -> int | None:
    """The first byte of a 206's ``Content-Range: bytes a-b/size``, None if unreadable."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isascii() and first.isdigit() else None


def whole_size(response: httpx.Response) -> int | None:
    """The size of the whole file an answer carries (part of): a 206's ``Content-Range``
    total, a 200's ``Content-Length``; None if it does not say."""
    if response.status_code == 206:
        value = response.headers.get("Content-Range", "").rpartition("/")[2]
    else:
        value = response.headers.get("Content-Length", "")
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def is_listing(response: httpx.Response) -> bool:
    """Whether a GET of a job file answered a directory's listing: the server marks it
    (``X-File-Type: dir``), and a file is never sent as JSON (an older server's)."""
    if response.headers.get("X-File-Type", "").strip().lower() == "dir":
        return True
    media: str = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return media == "application/json"


def strong_etag(response: httpx.Response) -> str | None:
    """The response's ``ETag`` if it is a strong one (``If-Range`` takes no weak ETag)."""
    etag = response.headers.get("ETag")
    return etag if etag and etag.startswith('"') and "\n" not in etag else None


def file_info_of(path: str, response: httpx.Response) -> FileInfo:
    """A :class:`FileInfo` from the headers of a file's download."""
    try:
        size = int(response.headers["Content-Length"])
        mtime = email.utils.parsedate_to_datetime(response.headers["Last-Modified"])
    except (KeyError, ValueError, TypeError) as exc:
        raise APIResponseValidationError(
            f"GET {response.request.url.path} answered a file without a valid "
            f"Content-Length and Last-Modified ({exc})",
            response=response,
        ) from None
    return FileInfo(
        name=posixpath.basename(path),
        path=path,
        type="file",
        size=size,
        mtime=mtime if mtime.tzinfo else mtime.replace(tzinfo=UTC),
    )


# ---- the blocking side: run through Disk/OpenFile steps, never by a flow itself ----


def open_binary(path: str, mode: str) -> BinaryIO:
    """``open(path, mode)`` in binary mode."""
    if "b" not in mode:
        raise ValueError(f"files are opened in binary mode, not {mode!r}")
    return cast("BinaryIO", open(path, mode))  # the driver closes it


def close_files(files: list[BinaryIO]) -> None:
    """Close every file (closing one twice is harmless)."""
    for file in files:
        file.close()


def walk_files(local_dir: str) -> list[str]:
    """The regular files under ``local_dir``, as sorted ``/``-separated relative paths
    (symlinked directories are not entered; FIFOs, sockets and devices are skipped)."""
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", local_dir)
    found = []
    for top, dirs, names in os.walk(local_dir, onerror=_raise):
        dirs.sort()
        rel = os.path.relpath(top, local_dir)
        for name in names:
            if os.path.isfile(os.path.join(top, name)):
                found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(found)


def _raise(error: OSError) -> None:
    raise error


def download_target(local_path: str, remote_name: str) -> str:
    """Where a download goes: ``local_path``, or the remote file's name inside it if it
    is a directory."""
    if os.path.isdir(local_path):
        return os.path.join(local_path, remote_name)
    return local_path


def part_state(part: str, etag_path: str) -> tuple[int, str | None, Any]:
    """How much of a download is already in ``part``, under which ETag, and the hash of
    those bytes; nothing (0) unless both the part and its ETag are there."""
    try:
        with open(etag_path, encoding="ascii") as f:
            etag = f.read().strip()
        with open(part, "rb") as file:
            hasher = hashlib.file_digest(file, "sha256")
            size = file.tell()
    except (FileNotFoundError, UnicodeDecodeError):
        return 0, None, hashlib.sha256()
    if not etag.startswith('"') or not size:
        return 0, None, hashlib.sha256()
    return size, etag, hasher


def save_etag(etag_path: str, etag: str | None) -> None:
    """Keep the ETag a ``.part`` is being written under (or forget an old one)."""
    if etag is None:
        _unlink(etag_path)
        return
    with open(etag_path, "w", encoding="ascii") as f:
        f.write(etag + "\n")


def write_block(file: BinaryIO, hasher: Any, chunks: list[bytes]) -> None:
    """Write ``chunks`` (a block as it arrived, in pieces) and add them to the running
    hash (hashlib lets go of the GIL): ``writev``, no copy into one buffer."""
    file.flush()  # nothing is buffered (only this writes), but the order must hold
    fd = file.fileno()
    for chunk in chunks:
        hasher.update(chunk)
    views = [memoryview(c) for c in chunks]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


#: The most pieces one ``writev`` takes (POSIX's IOV_MAX is at least 16; Linux's is 1024).
_IOV_MAX = 512


class BlockWriter:
    """Writes (and hashes) a download's blocks in a thread of its own, so that the next
    block is received meanwhile: :meth:`put` waits for the block before (at most one is
    being written: two blocks in memory) and raises its error, if it had one."""

    def __init__(self, file: BinaryIO, hasher: Any) -> None:
        self.file, self.hasher = file, hasher
        self._pool: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None

    def put(self, block: list[bytes]) -> None:
        """Have ``block`` (its pieces) written once the one before it is (blocking until
        then)."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="psik-api-download")
        self._writing = self._pool.submit(write_block, self.file, self.hasher, block)

    def put_last(self, block: list[bytes]) -> None:
        """Write the last ``block`` here, once the one before it is written: nothing
        arrives meanwhile (and a small file needs no thread at all)."""
        self._wait()
        write_block(self.file, self.hasher, block)

    def _wait(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self, *, quiet: bool = False) -> None:
        """Wait for the last block (raising its error unless ``quiet``) and end the thread."""
        try:
            self._wait()
        except Exception:
            if not quiet:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def discard(part: str, etag_path: str) -> None:
    """Remove a download's ``.part`` and its ETag."""
    _unlink(part)
    _unlink(etag_path)


def finish(part: str, etag_path: str, target: str) -> None:
    """Give the checked ``.part`` its final name."""
    os.replace(part, target)
    _unlink(etag_path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class FileBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An upload's body, read from a local file a block at a time as it is sent: in
    the calling thread by ``Client``, in worker threads by ``AsyncClient``. A path is
    opened anew for each attempt, a seekable file object is sent from where it stood
    each time, so a retried upload sends the same bytes; an unseekable one can be sent
    once (``replayable`` is False)."""

    def __init__(self, *, path: str | None, file: BinaryIO | None, start: int, size: int | None) -> None:
        self.path, self.file, self.start, self.size = path, file, start, size

    @classmethod
    def of_path(cls, path: str) -> FileBody:
        """The body of the regular file at ``path`` (its size now: a file that grows
        meanwhile is sent as it was)."""
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a directory (upload_dir sends one)", path)
        if not stat.S_ISREG(mode):  # a FIFO would block the upload until a writer came
            raise OSError(errno.EINVAL, "not a regular file", path)
        with open(path, "rb") as f:  # an unreadable file fails here, before any request
            size = os.fstat(f.fileno()).st_size
        return cls(path=path, file=None, start=0, size=size)

    @classmethod
    def of_file(cls, file: BinaryIO) -> FileBody:
        """The body of an open binary file, from where it stands to its end."""
        try:
            start = file.tell()
            end = file.seek(0, os.SEEK_END)
            file.seek(start)
        except (OSError, ValueError, AttributeError):  # a pipe, a socket, a wrapper...
            return cls(path=None, file=file, start=-1, size=None)
        return cls(path=None, file=file, start=start, size=max(0, end - start))

    @property
    def replayable(self) -> bool:
        """Whether the body can be sent again (a retry)."""
        return self.start >= 0

    def _open(self) -> BinaryIO:
        if self.path is not None:
            return open(self.path, "rb")  # closed by the caller
        assert self.file is not None
        if self.start >= 0:
            self.file.seek(self.start)
        return self.file

    def _read(self, file: BinaryIO, left: int | None) -> bytes:
        data = file.read(BLOCK if left is None else min(BLOCK, left))
        if isinstance(data, str):
            raise TypeError("upload() reads bytes: open the file in binary mode ('rb')")
        return data

    def __iter__(self) -> Iterator[bytes]:
        file = self._open()
        try:
            left = self.size
            while left is None or left > 0:
                block = self._read(file, left)
                if not block:
                    break
                if left is not None:
                    left -= len(block)
                yield block
        finally:
            if self.path is not None:
                file.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        file = await anyio.to_thread.run_sync(self._open)
        try:
            left = self.size
            while left is None or left > 0:
                block = await anyio.to_thread.run_sync(self._read, file, left)
                if not block:
                    break
                if left is not None:
                    left -= len(block)
                yield block
        finally:
            if self.path is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(file.close)
