"""A job's files (its working directory): which paths a request may name, and how they
are reached. Blocking: callers run these in worker threads.

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

Everything that touches a job's files goes through here: reads (:func:`open_entry`,
:func:`list_dir`) and writes (:mod:`psik_api_server.files.writes`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

from psik_api_core import FileInfo, ProblemCode, field_error, is_jobid, utc

from ..errors import ApiError

#: Longest path a route takes, and longest segment (the usual PATH_MAX and NAME_MAX).
MAX_PATH = 4096
MAX_SEGMENT = 255
#: How much one read of a download or a checksum, or one write of an upload, takes:
#: large enough that the trips to a worker thread cost little next to the copying.
CHUNK = 1 << 20
#: Deepest a recursive listing goes (each level holds a descriptor open).
MAX_DEPTH = 64
#: What a temp file of an upload is called, beside its target until it is renamed.
TEMP_PREFIX = ".psik-upload-"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Refused in a path: a name with one cannot be sent in a URL as the router reads it (a
#: trailing newline matched the route with an empty path), nor listed on one line.
_CONTROL = re.compile("[\x00-\x1f\x7f]")


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
    if _CONTROL.search(text):
        raise invalid(text, "contains a control character (a newline, a tab...)", where)
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
    """:func:`split_path` of a URL path still percent-encoded, decoded once as the
    OpenAPI schema promises (a generated client sends ``inputs/a.csv`` as
    ``inputs%2Fa.csv``): an encoded ``/`` is a separator, and every check applies to the
    decoded path (``..%2F`` is a ``..`` segment, ``%00`` a NUL, ``%5C`` a backslash).
    Decoded once only: ``%252F`` is the three characters ``%2F`` of a name. The decoded
    text must be UTF-8."""
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(raw.decode("latin-1"), "is not UTF-8 once percent-decoded") from None
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
    ``FileNotFoundError`` if a symlink on the way went (or was swapped for something
    else) while it was read."""
    if not parts:
        return ()
    try:
        real = os.path.realpath(os.path.join(root.path, *parts))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # realpath lstat()s a segment, then readlink()s it: a symlink swapped for a
        # directory or file in between is EINVAL. The path changed while it was read.
        raise FileNotFoundError(errno.ENOENT, "a segment changed while it was resolved", e.filename) from None
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
            if e.errno != errno.ENXIO:
                raise
            # A UNIX socket cannot be opened for reading: an O_PATH descriptor still
            # gives its stat, so the caller sees it is no regular file (as a FIFO).
            fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
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


def nameable(name: str) -> bool:
    """Whether a path of the API can name this entry: UTF-8 (a name of other bytes has
    surrogates here, which JSON cannot carry) and free of control characters, which
    :func:`split_path` refuses. A job's program may make any name; one that no path
    can name is left out of listings (and counted) rather than listed unreachable."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\\" not in name and not _CONTROL.search(name)


def list_dir(fd: int, path: str, *, recursive: bool, limit: int) -> tuple[list[FileInfo], bool, int]:
    """The entries of the directory ``fd`` (named under ``path``), sorted by path, at
    most ``limit`` of them (and whether some were left out), and how many entries no
    path can name were left out (:func:`nameable`: not walked into either). Recursive
    listings walk subdirectories by descriptor and never follow a symlink."""
    found: list[FileInfo] = []
    truncated = False
    unlisted = 0

    def visit(dfd: int, rel: str, depth: int) -> None:
        nonlocal truncated, unlisted
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue  # an upload in progress (or left by a server killed during one)
            if not nameable(entry.name):
                unlisted += 1
                continue
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
    return found, truncated, unlisted
