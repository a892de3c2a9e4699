"""A job's files (its working directory), blocking: callers run these in worker threads.

The root is the job's ``spec.directory`` (which the server only accepts inside its
configured roots) or ``<prefix>/<jobid>/work``. A job runs as the server's user and can
rewrite anything in there, including swapping a directory for a symlink while a request
is under way, so nothing here trusts a path string once it has been checked:

1. :func:`split_path` refuses ``.``/``..`` segments, absolute paths, NUL, backslashes and
   empty segments (400 ``invalid_path``) before anything touches the filesystem;
2. :func:`resolve` follows symlinks with ``realpath`` and refuses a result outside the
   root (403 ``forbidden``): a symlink that stays inside is followed;
3. the *resolved* relative path is then walked from the root's descriptor one component
   at a time with ``O_NOFOLLOW`` (:func:`walk`), so a symlink swapped in after step 2
   makes the walk fail (403) instead of leading out.

Writes are atomic: a 0600 temp file beside the target (made through the directory's
descriptor), renamed into place; ``If-None-Match: *`` links instead of renaming, so a
file that appeared meanwhile is never overwritten; ``If-Match`` and ``If-None-Match``
with ETags are checked again just before the rename. Missing parents are made 0700,
and taken back when the upload fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote_to_bytes

from psik_api_core import FileInfo, ProblemCode, field_error, is_jobid, utc

from .errors import ApiError

_logger = logging.getLogger(__name__)

#: Longest path a route takes, and longest segment (the usual PATH_MAX and NAME_MAX).
MAX_PATH = 4096
MAX_SEGMENT = 255
#: How much one read of a download or a checksum takes.
CHUNK = 256 << 10
#: Deepest a recursive listing goes (each level holds a descriptor open).
MAX_DEPTH = 64
#: What a temp file of an upload is called, beside its target until it is renamed.
TEMP_PREFIX = ".psik-upload-"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ENCODED_REFUSED = re.compile(rb"%(2f|5c|00)", re.IGNORECASE)


# ---- refusals ----

#: Where a refused path came from, for the problem's ``errors[].loc``.
_LOC: dict[str, list[str | int]] = {"path": ["path", "path"], "filename": ["body", "files"]}


def invalid(text: str, why: str, where: str = "path") -> ApiError:
    return ApiError(
        ProblemCode.invalid_path,
        f"{where} {text[:200]!r} is refused: {why}",
        errors=[field_error(_LOC.get(where, ["query", where]), why)],
    )


def leaves_root(text: str) -> ApiError:
    return ApiError(
        ProblemCode.forbidden,
        f"path {text[:200]!r} leaves the job's directory (through a symlink, or one swapped in"
        " while the request ran); it is not followed",
    )


def exists_already(text: str) -> ApiError:
    return ApiError(
        ProblemCode.precondition_failed,
        f"{text[:200]!r} exists and If-None-Match: * forbids overwriting it; nothing changed",
    )


def precondition_failed(text: str, why: str) -> ApiError:
    return ApiError(ProblemCode.precondition_failed, f"{text[:200]!r}: {why}; nothing changed")


def not_found(text: str, jobid: str) -> ApiError:
    return ApiError(ProblemCode.not_found, f"job {jobid} has no file {text[:200]!r}", jobid=jobid)


# ---- 1. the path as given ----


def split_path(text: str, where: str = "path") -> tuple[str, ...]:
    """The segments of a relative path (one trailing ``/`` allowed; ``""`` is the
    root); 400 ``invalid_path`` naming why for anything that could lead elsewhere."""
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise invalid(text, f"longer than {MAX_PATH} bytes", where)
    if "\x00" in text:
        raise invalid(text, "contains a NUL byte", where)
    if "\\" in text:
        raise invalid(text, "contains a backslash", where)
    if text.startswith("/"):
        raise invalid(text, "is absolute; paths are relative to the job's directory", where)
    if text.endswith("/"):
        text = text[:-1]
    if not text:
        return ()
    parts = tuple(text.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            why = "has an empty segment" if not part else f"has a {part!r} segment"
            raise invalid(text, why, where)
        if len(part.encode("utf-8", "surrogateescape")) > MAX_SEGMENT:
            raise invalid(text, f"has a segment longer than {MAX_SEGMENT} bytes", where)
        if part.startswith(TEMP_PREFIX):
            raise invalid(
                text, f"has a name the server keeps for uploads in progress ({TEMP_PREFIX}*)", where
            )
    return parts


def split_raw_path(raw: bytes) -> tuple[str, ...]:
    """:func:`split_path` of a URL path still percent-encoded: an encoded ``/``, ``\\``
    or NUL is refused before decoding (a separator must be a real one), and the
    decoded text must be UTF-8."""
    text = raw.decode("latin-1")
    if _ENCODED_REFUSED.search(raw):
        raise invalid(text, "has an encoded '/', '\\' or NUL")
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(text, "is not UTF-8 once percent-decoded") from None
    return split_path(decoded)


def joined(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


# ---- 2. the root, and where a path resolves to ----


@dataclass
class Root:
    """A job's file root, open: ``path`` is its real path, ``fd`` a descriptor of it."""

    path: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _openat_dir(fd: int, name: str) -> int:
    return os.open(name, _DIR, dir_fd=fd)


def _open_absolute(real: str) -> int:
    """A descriptor of the already resolved absolute directory ``real``, walked from
    ``/`` without following a symlink (one swapped in since it was resolved fails)."""
    fd = os.open("/", _DIR)
    try:
        for part in real.split("/"):
            if part:
                inner = _openat_dir(fd, part)
                os.close(fd)
                fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root(prefix: Path, jobid: str, directory: str | None, roots: list[Path], *, create: bool) -> Root:
    """The root of the job's files. ``FileNotFoundError`` if it does not exist (with
    ``create``, a missing ``work`` is made 0700); 403 if it is a symlink, or the job's
    directory (which the job could have rewritten in its spec.json) is outside the
    allowed ``roots``."""
    if not is_jobid(jobid):
        raise ValueError(f"not a job id: {jobid!r}")
    base = os.path.join(str(prefix), jobid)
    work = os.path.join(base, "work")
    if directory is None or os.path.normpath(directory) == work:
        fd = os.open(str(prefix), _DIR & ~os.O_NOFOLLOW)  # the server's own, resolved at start
        try:
            try:
                jfd = _openat_dir(fd, jobid)
            finally:
                os.close(fd)
            try:
                try:
                    return Root(work, _openat_dir(jfd, "work"))
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir("work", 0o700, dir_fd=jfd)
                    return Root(work, _openat_dir(jfd, "work"))
            finally:
                os.close(jfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ApiError(
                    ProblemCode.forbidden,
                    f"job {jobid}'s working directory is a symlink or not a directory; not followed",
                ) from None
            raise
    real = os.path.realpath(directory)
    if not any(real == str(r) or real.startswith(str(r).rstrip("/") + "/") for r in roots):
        raise ApiError(
            ProblemCode.forbidden,
            f"job {jobid}'s directory {directory[:200]!r} is outside the directories this server"
            " allows; its files are not served",
        )
    try:
        return Root(real, _open_absolute(real))
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ApiError(
                ProblemCode.forbidden, f"job {jobid}'s directory changed while it was opened"
            ) from None
        raise


def resolve(root: Root, parts: tuple[str, ...]) -> tuple[str, ...]:
    """The segments of where ``parts`` leads inside the root once symlinks are
    followed (as far as the path exists); 403 if that is outside.
    ``FileNotFoundError`` if a symlink on the way went while it was read."""
    if not parts:
        return ()
    real = os.path.realpath(os.path.join(root.path, *parts))
    if real == root.path:
        return ()
    if not real.startswith(root.path.rstrip("/") + "/"):
        raise leaves_root(joined(parts))
    return tuple(real[len(root.path.rstrip("/")) + 1 :].split("/"))


# ---- 3. walking the resolved path ----


class NotADirectory(Exception):
    """A segment that must be a directory is something else (a file)."""


@dataclass
class Made:
    """The directories a write made on its way: ``names``, one inside the other, the
    first in the directory ``base`` (a descriptor; -1 when none was made)."""

    base: int = -1
    names: list[str] = field(default_factory=list)

    def undo(self) -> None:
        """Remove them, innermost first, while they are empty (one another write put
        something in stays, and so do those around it); then :meth:`forget`."""
        try:
            for depth in range(len(self.names) - 1, -1, -1):
                fd = os.dup(self.base)
                try:
                    for name in self.names[:depth]:  # by descriptors, never following a symlink
                        inner = _openat_dir(fd, name)
                        os.close(fd)
                        fd = inner
                    os.rmdir(self.names[depth], dir_fd=fd)
                finally:
                    os.close(fd)
        except OSError:
            pass  # not empty, or already gone
        finally:
            self.forget()

    def forget(self) -> None:
        if self.base >= 0:
            os.close(self.base)
        self.base, self.names = -1, []


def walk(
    root: Root, parts: tuple[str, ...], *, create: bool = False, shown: str = "", made: Made | None = None
) -> int:
    """A new descriptor of the directory ``parts`` (resolved segments) under the root,
    each segment opened with ``O_NOFOLLOW``: a symlink met here is one swapped in after
    :func:`resolve`, and is refused (403). ``create`` makes missing ones (0700), and
    notes them in ``made``. ``FileNotFoundError`` if one is missing,
    :class:`NotADirectory` if one is a file."""
    fd = os.dup(root.fd)
    try:
        for part in parts:
            try:
                inner = _openat_dir(fd, part)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    if made is not None and made.base < 0:
                        made.base = os.dup(fd)
                except FileExistsError:
                    pass
                inner = _step_error_or_open(fd, part, shown)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                inner = _step_error_or_open(fd, part, shown)
            if made is not None and made.base >= 0:
                made.names.append(part)  # inside one made: made too, or as good as
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _step_error_or_open(fd: int, part: str, shown: str) -> int:
    try:
        return _openat_dir(fd, part)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise leaves_root(shown)
    raise NotADirectory(part)


def open_entry(root: Root, parts: tuple[str, ...], shown: str) -> tuple[int, os.stat_result]:
    """A descriptor of what the resolved ``parts`` name (a file or a directory) and
    its stat; ``FileNotFoundError`` if there is nothing (or a file on the way)."""
    if not parts:
        return os.dup(root.fd), os.fstat(root.fd)
    try:
        parent = walk(root, parts[:-1], shown=shown)
    except NotADirectory:
        raise FileNotFoundError(shown) from None
    try:
        try:
            # O_NONBLOCK: a FIFO there must not hang the thread until someone writes.
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise leaves_root(shown) from None
            raise
    finally:
        os.close(parent)
    return fd, os.fstat(fd)


# ---- listings ----


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def file_info(path: str, st: os.stat_result) -> FileInfo:
    kind = _kind(st.st_mode)
    return FileInfo(
        name=path.rsplit("/", 1)[-1],
        path=path,
        type=kind,
        size=0 if kind == "dir" else st.st_size,
        mtime=utc(st.st_mtime),
    )


def list_dir(fd: int, path: str, *, recursive: bool, limit: int) -> tuple[list[FileInfo], bool]:
    """The entries of the directory ``fd`` (named under ``path``), sorted by path, at
    most ``limit`` of them (and whether some were left out). Recursive listings walk
    subdirectories by descriptor and never follow a symlink."""
    found: list[FileInfo] = []
    truncated = False

    def visit(dfd: int, rel: str, depth: int) -> None:
        nonlocal truncated
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue  # an upload in progress (or left by a server killed during one)
            if len(found) >= limit:
                truncated = True
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            sub = f"{rel}/{entry.name}" if rel else entry.name
            found.append(file_info(sub, st))
            if recursive and stat.S_ISDIR(st.st_mode):
                if depth >= MAX_DEPTH:
                    truncated = True
                    continue
                try:
                    inner = _openat_dir(dfd, entry.name)
                except OSError:
                    continue  # swapped for a symlink, or gone: not followed
                try:
                    visit(inner, sub, depth + 1)
                finally:
                    os.close(inner)
                if truncated:
                    return

    visit(fd, path, 0)
    found.sort(key=lambda f: f.path)
    return found, truncated


# ---- downloads ----


def etag(st: os.stat_result) -> str:
    """A strong validator: changes whenever the file is replaced or written."""
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return '"' + hashlib.sha256(key).hexdigest()[:32] + '"'


def last_modified(st: os.stat_result) -> str:
    return formatdate(st.st_mtime, usegmt=True)


class Unsatisfiable(Exception):
    """A ``Range`` no byte of the file is in."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``(first, last)`` (inclusive) a ``Range`` header asks for;
    None to answer the whole file (no header, a malformed one, or several ranges);
    :class:`Unsatisfiable` if it asks for none of the file's bytes."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not all(s.isascii() and (s.isdigit() or not s) for s in (first, last)):
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)


class ChecksumCache:
    """SHA-256 of whole files, by (device, inode, size, mtime, ctime): a file that did
    not change is hashed once. Bounded (least recently used goes); thread-safe.

    A file too large to hash while its download waits is hashed by :meth:`hash_later`,
    in at most ``workers`` background threads with at most ``backlog`` files waiting:
    however many downloads ask, a version of a file is hashed once, and a file that
    keeps changing costs no more than those threads."""

    def __init__(self, size: int = 256, *, workers: int = 2, backlog: int = 8) -> None:
        self.size = size
        self.workers = workers
        self.backlog = backlog
        self._items: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, os.stat_result]] = deque()
        self._pending: set[tuple[int, ...]] = set()  # queued or being hashed
        self._running = 0

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, st: os.stat_result) -> str | None:
        with self._lock:
            key = self.key(st)
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, st: os.stat_result, digest: str) -> None:
        with self._lock:
            self._items[self.key(st)] = digest
            self._items.move_to_end(self.key(st))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def checksum(self, fd: int, st: os.stat_result) -> str:
        """The SHA-256 (hex) of the first ``st.st_size`` bytes of ``fd``."""
        cached = self.get(st)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        pos = 0
        while pos < st.st_size:
            chunk = os.pread(fd, min(CHUNK * 4, st.st_size - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
        digest = h.hexdigest()
        if os.fstat(fd).st_mtime_ns == st.st_mtime_ns:  # not written while we read
            self.put(st, digest)
        return digest

    def hash_later(self, fd: int, st: os.stat_result) -> None:
        """Have the file ``fd`` (as ``st`` saw it) hashed in the background, for the
        downloads after this one; nothing if it is hashed, queued already, or the
        backlog is full (a later download asks again)."""
        key = self.key(st)
        with self._lock:
            if key in self._items or key in self._pending or len(self._pending) >= self.backlog:
                return
            self._pending.add(key)
            self._queue.append((os.dup(fd), st))  # the download closes its own
            if self._running >= self.workers:
                return
            self._running += 1
        # Daemon threads that end when the queue is empty: nothing to stop, nothing idle.
        threading.Thread(target=self._work, name="psik-api-sha256", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running -= 1
                    return
                fd, st = self._queue.popleft()
            try:
                self.checksum(fd, st)
            except Exception:  # the worker must go on (and be counted) whatever happened
                _logger.exception("cannot hash a job's file in the background")
            finally:
                os.close(fd)
                with self._lock:
                    self._pending.discard(self.key(st))


# ---- uploads ----


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


@dataclass(frozen=True)
class Preconditions:
    """A write's ``If-Match`` and ``If-None-Match`` headers (RFC 9110 13.1.1, 13.1.2),
    checked against the file as it is (its :func:`etag`) before the body is read and
    again just before the rename."""

    if_match: str | None = None
    if_none_match: str | None = None

    @property
    def exclusive(self) -> bool:
        """``If-None-Match: *``: the file must not exist, whatever appears meanwhile."""
        return self.if_none_match is not None and self.if_none_match.strip() == "*"

    def check(self, current: os.stat_result | None, shown: str) -> None:
        """412 unless the file now at the target (None: nothing there) meets them."""
        tag = etag(current) if current is not None and not stat.S_ISDIR(current.st_mode) else None
        if self.if_match is not None:
            wanted = _tags(self.if_match)
            if tag is None:
                raise precondition_failed(shown, "does not exist, and If-Match asks for a version of it")
            if wanted != ["*"] and tag not in wanted:  # strong comparison: a W/ tag never matches
                raise precondition_failed(
                    shown, f"is at ETag {tag}, not one If-Match names (changed since it was read)"
                )
        if self.if_none_match is not None and current is not None:
            if self.exclusive:
                raise exists_already(shown)
            if tag is not None and tag in {t.removeprefix("W/") for t in _tags(self.if_none_match)}:
                raise precondition_failed(shown, f"is at ETag {tag}, which If-None-Match excludes")


def current_stat(root: Root, parts: tuple[str, ...]) -> os.stat_result | None:
    """What is at ``parts`` now (a symlink's own stat), None if nothing is."""
    resolved = resolve(root, parts)
    if not resolved:
        return os.fstat(root.fd)
    try:
        parent = walk(root, resolved[:-1], shown=joined(parts))
    except (FileNotFoundError, NotADirectory):
        return None
    try:
        return os.stat(resolved[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)


@dataclass
class Upload:
    """One file being written: a temp file in its target's directory until
    :meth:`commit` renames it into place (or :meth:`abort` removes it)."""

    shown: str  # the path as the caller gave it (relative to the root)
    parent: int  # descriptor of the target's directory
    name: str  # the target's name in it
    temp: str
    fd: int
    size: int = 0
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    created: bool = True
    #: After commit: the replaced file's hard link, kept until :meth:`forget_backup`.
    backup: str | None = None
    committed: bool = False
    #: The parents this upload made: taken back if it is not committed.
    made: Made = field(default_factory=Made)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.sha256.update(data)
        self.size += len(data)

    def commit(self, *, conditions: Preconditions | None = None, keep_backup: bool = False) -> None:
        """Put the file in place, if the file there now meets ``conditions`` (412
        otherwise). ``If-None-Match: *``: 412 if something is there already (it is never
        overwritten, whatever appeared meanwhile). ``keep_backup``: keep the replaced
        file under a temp name so :meth:`rollback` can restore it. Callers hold the
        target's lock (``FileService``), so no other commit comes between the check
        and the rename."""
        os.fsync(self.fd)
        conditions = conditions or Preconditions()
        try:
            now = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        conditions.check(now, self.shown)
        if conditions.exclusive:
            try:
                here = {"src_dir_fd": self.parent, "dst_dir_fd": self.parent}
                os.link(self.temp, self.name, **here, follow_symlinks=False)
            except FileExistsError:
                raise exists_already(self.shown) from None
            os.unlink(self.temp, dir_fd=self.parent)
            self.created, self.committed = True, True
            return
        old = now
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise ApiError(
                ProblemCode.conflict, f"{self.shown[:200]!r} is a directory; a file cannot replace it"
            )
        self.created = old is None
        if old is not None and keep_backup:
            backup = TEMP_PREFIX + secrets.token_hex(8)
            os.link(self.name, backup, src_dir_fd=self.parent, dst_dir_fd=self.parent, follow_symlinks=False)
            self.backup = backup
        try:
            os.replace(self.temp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
        except IsADirectoryError:  # made a directory since the check above
            raise ApiError(
                ProblemCode.conflict, f"{self.shown[:200]!r} is a directory; a file cannot replace it"
            ) from None
        self.committed = True

    def rollback(self) -> None:
        """Undo a commit: the replaced file comes back, a created one goes."""
        if not self.committed:
            return
        if self.backup is not None:
            os.replace(self.backup, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
            self.backup = None
        else:
            try:
                st = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == _inode(os.fstat(self.fd)):  # still ours
                    os.unlink(self.name, dir_fd=self.parent)
            except FileNotFoundError:
                pass
        self.committed = False

    def forget_backup(self) -> None:
        if self.backup is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.backup, dir_fd=self.parent)
            self.backup = None

    def info(self) -> FileInfo:
        return file_info(self.shown, os.fstat(self.fd))

    def close(self) -> None:
        """Remove the temp file and the directories made for it unless committed;
        close the descriptors."""
        if not self.committed and self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.parent)
            self.made.undo()
        self.made.forget()
        for fd in (self.fd, self.parent):
            if fd >= 0:
                os.close(fd)
        self.fd = self.parent = -1


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def begin_upload(root: Root, parts: tuple[str, ...], shown: str) -> Upload:
    """A temp file (0600) beside where ``parts`` (as given) resolves; its parents are
    made (0700). 409 if a parent is a file or the target a directory."""
    resolved = resolve(root, parts)
    if not resolved:
        raise ApiError(
            ProblemCode.conflict, f"{shown[:200]!r} is the job's directory; a file cannot replace it"
        )
    made = Made()
    try:
        parent = walk(root, resolved[:-1], create=True, shown=shown, made=made)
    except NotADirectory as e:
        made.undo()
        raise ApiError(
            ProblemCode.conflict, f"cannot write {shown[:200]!r}: {str(e)[:100]!r} on its way is a file"
        ) from None
    except BaseException:
        made.undo()
        raise
    try:
        name = resolved[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise ApiError(
                    ProblemCode.conflict, f"{shown[:200]!r} is a directory; a file cannot replace it"
                )
        except FileNotFoundError:
            pass
        temp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
    except BaseException:
        os.close(parent)
        made.undo()
        raise
    return Upload(shown=shown, parent=parent, name=name, temp=temp, fd=fd, made=made)


# ---- deleting ----


def delete(
    root: Root, parts: tuple[str, ...], shown: str, *, recursive: bool, directory: bool = False
) -> bool:
    """Remove what ``parts`` names (a symlink itself, never its target); a directory
    only if ``recursive`` (409 otherwise), and only a directory if ``directory`` (the
    path ended with ``/``; 400 otherwise). False if there was nothing."""
    if not parts:
        raise ApiError(ProblemCode.conflict, "the job's directory itself cannot be deleted")
    parents = resolve(root, parts[:-1])
    try:
        parent = walk(root, parents, shown=shown)
    except (FileNotFoundError, NotADirectory):
        return False
    try:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if directory and not stat.S_ISDIR(st.st_mode):
            raise invalid(shown + "/", "ends with '/', which names a directory; this is not one")
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise ApiError(
                    ProblemCode.conflict,
                    f"{shown[:200]!r} is a directory; delete it with recursive=true",
                )
            # rmtree by descriptors: it never follows a symlink out of the tree.
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return True
    finally:
        os.close(parent)
