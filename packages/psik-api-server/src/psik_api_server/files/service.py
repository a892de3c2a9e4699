"""FileService: what the job-file routes do, independent of HTTP.

Every operation checks the job's owner as the other job routes do
(``JobService._owned``: another's job is 404), finds the job's file root, and does its
filesystem work through :mod:`psik_api_server.files` in worker threads, one hop per step, never on
the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from psik_api_core import LIMITS, Action, FileListing, Principal, ProblemCode

from ..aio import in_thread
from ..errors import ApiError
from ..jobs import directory as jobdir
from ..jobs.service import JobService
from . import checksums, paths, preconditions, writes


@dataclass
class OpenFile:
    """A regular file of a job, open for reading, with what was true when it was opened."""

    fd: int
    st: os.stat_result
    etag: str
    last_modified: str
    #: None when the checksum is not known yet (see :data:`HASH_AT_ONCE_MAX`).
    sha256: str | None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: The largest file hashed while its download waits (a few ms); a larger one is sent at
#: once, without its checksum until a background thread has hashed it.
HASH_AT_ONCE_MAX = 1 << 20


def _full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


class PathLocks:
    """One lock per file being put in place (by its directory's inode and its name):
    a write's If-Match is checked and its rename done with no other write between.
    Entries go when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[int, int, str], tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, upload: writes.Upload) -> Iterator[None]:
        st = os.fstat(upload.parent)
        key = (st.st_dev, st.st_ino, upload.name)
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class FileService:
    def __init__(self, service: JobService, *, max_upload_bytes: int) -> None:
        self.service = service
        self.max_upload_bytes = max_upload_bytes
        self.checksums = checksums.ChecksumCache()
        self.locks = PathLocks()

    # ---- the root ----

    def open_root(self, who: Principal, jobid: str, action: Action, *, create: bool) -> paths.Root:
        """The job's file root, open (blocking). 404 for a job that is not the caller's."""
        self.service.access.owned(who, jobid, action)
        base = self.service.backend.path(jobid)
        try:
            spec = jobdir.read_spec(base)
        except (OSError, ValueError):
            raise ApiError(
                ProblemCode.not_found, f"job {jobid} has no readable directory", jobid=jobid
            ) from None
        roots = self.service.specs.directory_roots
        return paths.open_root(self.service.backend.prefix, jobid, spec.directory, roots, create=create)

    # ---- reading ----

    async def get(
        self, who: Principal, jobid: str, parts: tuple[str, ...], *, recursive: bool, whole: bool = True
    ) -> FileListing | OpenFile:
        """A directory's listing, or a regular file open for reading, with its SHA-256
        if it is known or cheap: hashed now up to :data:`HASH_AT_ONCE_MAX` bytes, else
        in the background (a download never waits for a large file's hash). ``whole``
        is False for a ``Range``: its file is not hashed for it."""
        return await in_thread(self._get_sync, who, jobid, parts, recursive, whole)

    def _get_sync(
        self, who: Principal, jobid: str, parts: tuple[str, ...], recursive: bool, whole: bool
    ) -> FileListing | OpenFile:
        shown = paths.joined(parts)
        try:
            root = self.open_root(who, jobid, Action.read, create=False)
        except FileNotFoundError:
            if parts:
                raise paths.not_found(shown, jobid) from None
            return FileListing(path="", entries=[])  # no work directory yet: nothing in it
        with root:
            try:
                fd, st = paths.open_entry(root, paths.resolve(root, parts), shown)
            except FileNotFoundError:
                raise paths.not_found(shown, jobid) from None
        try:
            if stat.S_ISDIR(st.st_mode):
                entries, truncated, unlisted = paths.list_dir(
                    fd, shown, recursive=recursive, limit=LIMITS.max_list_entries
                )
                return FileListing(path=shown, entries=entries, truncated=truncated, unlisted=unlisted)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(
                    ProblemCode.not_found,
                    f"job {jobid}'s {shown[:200]!r} is not a regular file or a directory; not read",
                    jobid=jobid,
                )
            digest = self.checksums.get(st)
            if digest is None and whole:
                if st.st_size <= HASH_AT_ONCE_MAX:
                    digest = self.checksums.checksum(fd, st)
                else:
                    self.checksums.hash_later(fd, st)
            opened = OpenFile(fd, st, preconditions.etag(st), preconditions.last_modified(st), digest)
            fd = -1
            return opened
        finally:
            if fd >= 0:
                os.close(fd)

    # ---- writing ----

    async def begin_upload(
        self, who: Principal, jobid: str, parts: tuple[str, ...], *, conditions: preconditions.Preconditions
    ) -> writes.Upload:
        """A temp file beside where ``parts`` goes; 412 at once (before anything is
        made or read) if the file there now does not meet ``conditions``."""
        return await in_thread(self._begin_upload_sync, who, jobid, parts, conditions)

    def _begin_upload_sync(
        self, who: Principal, jobid: str, parts: tuple[str, ...], conditions: preconditions.Preconditions
    ) -> writes.Upload:
        shown = paths.joined(parts)
        if not parts:
            raise paths.invalid("", "a file upload needs a file path after /files/")
        try:
            with self.open_root(who, jobid, Action.write, create=True) as root:
                if conditions != preconditions.Preconditions():
                    conditions.check(writes.current_stat(root, parts), shown)
                return writes.begin_upload(root, parts, shown)
        except OSError as e:
            raise self.os_error(e, f"write {shown[:200]!r}") from None

    def os_error(self, e: OSError, doing: str) -> ApiError | OSError:
        """What to answer for an OSError while writing: 507 for a full disk, 409 for a
        directory that went away under the write (the job is changing its files)."""
        if _full(e):
            return self.service.disk.error(e, doing)
        if isinstance(e, FileNotFoundError):
            return ApiError(
                ProblemCode.conflict,
                f"cannot {doing}: a directory on its way was removed or replaced meanwhile; try again",
            )
        return e

    def commit_sync(
        self,
        upload: writes.Upload,
        *,
        conditions: preconditions.Preconditions | None = None,
        keep_backup: bool = False,
    ) -> None:
        """Put ``upload`` in place (blocking) under its target's lock: ``conditions``
        are checked again against the file there, with no other write in between."""
        with self.locks.hold(upload):
            upload.commit(conditions=conditions, keep_backup=keep_backup)

    def finish_upload_sync(self, upload: writes.Upload, *, conditions: preconditions.Preconditions) -> None:
        """Commit ``upload`` (blocking) and prime the checksum cache with its hash."""
        try:
            self.commit_sync(upload, conditions=conditions)
        except OSError as e:
            raise self.os_error(e, f"write {upload.shown[:200]!r}") from None
        self.checksums.put(os.fstat(upload.fd), upload.sha256.hexdigest())

    # ---- deleting ----

    async def delete(
        self, who: Principal, jobid: str, parts: tuple[str, ...], *, recursive: bool, directory: bool = False
    ) -> None:
        """Remove a file, or a directory (``recursive``); ``directory``: the path ended
        with ``/``, and 400 if what it names is not a directory."""
        await in_thread(self._delete_sync, who, jobid, parts, recursive, directory)

    def _delete_sync(
        self, who: Principal, jobid: str, parts: tuple[str, ...], recursive: bool, directory: bool
    ) -> None:
        shown = paths.joined(parts)
        try:
            root = self.open_root(who, jobid, Action.write, create=False)
        except FileNotFoundError:
            raise paths.not_found(shown, jobid) from None
        with root:
            try:
                deleted = writes.delete(root, parts, shown, recursive=recursive, directory=directory)
            except FileNotFoundError:  # a directory on the way went meanwhile
                deleted = False
            if not deleted:
                raise paths.not_found(shown, jobid)
