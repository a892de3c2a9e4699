"""Reading a job's logs (``<prefix>/<jobid>/log/``: psik's ``console``, ``stdout.N``,
``stderr.N``), blocking: callers run these in worker threads.

A job runs as the server's user and can rewrite its own directory, so nothing here trusts
it: a name must match :data:`LOG_NAME` before it reaches the filesystem, and every step
from the prefix down (the job's directory, ``log/``, the file) is opened relative to the
previous one's descriptor with ``O_NOFOLLOW``. A log a job replaced with a symlink (to
another user's file, or the server's own secrets) is refused, not followed; so is one
that is not a regular file (a FIFO would block the reader). Everything opens through
:func:`openat`, the module's one door to the filesystem.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

from psik_api_core import is_jobid

_logger = logging.getLogger(__name__)

#: The names psik gives a job's logs; matched whole (``fullmatch``), ASCII digits only.
LOG_NAME = re.compile(r"console|(?:stdout|stderr)\.[0-9]{1,9}")
#: Also accepted by the routes: the current run's ``stdout.<jobndx>`` / ``stderr.<jobndx>``.
CURRENT_RUN = frozenset({"stdout", "stderr"})
#: ``LOG_NAME`` and the current-run names, anchored for JSON Schema (ECMA-262).
LOG_NAME_REGEX = r"^(console|(stdout|stderr)(\.[0-9]{1,9})?)$"
VALID_NAMES = (
    "console, stdout.N or stderr.N (N: the run, 1 to 9 digits), stdout or stderr (the current run's)"
)

#: How much one read takes (the stream's chunk, the backwards scan's block).
BLOCK = 1 << 16

# A symlink (O_NOFOLLOW), or a path component that is not a directory.
_REFUSED = {errno.ELOOP, errno.ENOTDIR, errno.EMLINK}


class NotALog(Exception):
    """The name exists but is not a regular file (a symlink, a FIFO, a directory)."""


def is_log_name(name: str) -> bool:
    """Whether a route may look for a log called ``name`` at all."""
    return name in CURRENT_RUN or LOG_NAME.fullmatch(name) is not None


def resolve_name(name: str, jobndx: int) -> str:
    """The file name of log ``name`` (checked by :func:`is_log_name`) for a job now at
    run ``jobndx``: ``stdout`` is ``stdout.<jobndx>`` (a job never run: its first run's)."""
    if name in CURRENT_RUN:
        return f"{name}.{max(jobndx, 1)}"
    if LOG_NAME.fullmatch(name) is None:
        raise ValueError(f"not a log name: {name[:64]!r}")
    return name


def run_of(name: str) -> int | None:
    """The run a resolved log belongs to (``stdout.3``: 3); None for ``console``."""
    _, dot, run = name.partition(".")
    return int(run) if dot else None


def openat(dirfd: int, name: str, flags: int) -> int:
    """Open ``name`` in the directory ``dirfd``, never following a symlink."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def open_log_dir(prefix: Path, jobid: str) -> int:
    """A descriptor of ``<prefix>/<jobid>/log``; :class:`NotALog` if the job directory or
    ``log`` is a symlink or no directory, ``FileNotFoundError`` if missing."""
    if not is_jobid(jobid):
        raise ValueError(f"not a job id: {jobid!r}")
    flags = os.O_RDONLY | os.O_DIRECTORY
    fd = os.open(prefix, flags | os.O_CLOEXEC)  # the server's own prefix, resolved at start
    try:
        for step in (jobid, "log"):
            try:
                inner = openat(fd, step, flags)
            except OSError as e:
                if e.errno in _REFUSED:
                    raise NotALog(f"{step} is not a directory") from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(dirfd: int, name: str) -> int | None:
    """A descriptor of the regular file ``name`` (a :data:`LOG_NAME`) in the log
    directory; None if there is none; :class:`NotALog` if it is not a regular file."""
    if LOG_NAME.fullmatch(name) is None:
        raise ValueError(f"not a log name: {name[:64]!r}")
    try:
        # O_NONBLOCK: a FIFO put there must not hang the thread until someone writes.
        fd = openat(dirfd, name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in _REFUSED or e.errno == errno.ENXIO:
            raise NotALog(f"{name} is a symlink or a special file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotALog(f"{name} is not a regular file")
    return fd


def size_of(fd: int) -> int:
    return os.fstat(fd).st_size


def read_at(fd: int, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``offset`` (fewer only at the end of the file)."""
    parts: list[bytes] = []
    while size > 0:
        part = os.pread(fd, min(size, BLOCK), offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
        size -= len(part)
    return b"".join(parts)


def tail_start(fd: int, size: int, lines: int, *, block: int = BLOCK) -> int:
    """Where the last ``lines`` lines of the file's first ``size`` bytes begin, found by
    reading backwards ``block`` bytes at a time (a huge log is not read whole). A final
    newline ends the last line; a last line without one still counts."""
    if size <= 0 or lines <= 0:
        return size if lines <= 0 else 0
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    seen = 0
    pos = end
    while pos > 0:
        low = max(0, pos - block)
        data = os.pread(fd, pos - low, low)
        i = len(data)
        while (i := data.rfind(b"\n", 0, i)) >= 0:
            seen += 1
            if seen == lines:
                return low + i + 1
        pos = low
    return 0


def read_logs(dirfd: int, limit: int, marker: str) -> dict[str, str]:
    """``{name: text}`` of every log in the directory, sorted by name, decoded as UTF-8
    with replacement. A log over ``limit`` bytes keeps its last ones (from a character
    boundary), after ``marker.format(left_out=N, name=name)``. Names that are not logs,
    and logs that are not regular files, are left out."""
    out: dict[str, str] = {}
    for name in sorted(os.listdir(dirfd)):
        if LOG_NAME.fullmatch(name) is None:
            continue
        try:
            fd = open_log(dirfd, name)
        except NotALog as e:
            _logger.warning("log directory: %s; not read", e)
            continue
        if fd is None:
            continue
        try:
            size = size_of(fd)
            start = max(0, size - limit)
            data = read_at(fd, start, size - start)
        finally:
            os.close(fd)
        if start:
            # Cut in the middle of a character: start at the next one, not with a U+FFFD.
            skip = 0
            while skip < 3 and skip < len(data) and data[skip] & 0xC0 == 0x80:
                skip += 1
            data = data[skip:]
            out[name] = marker.format(left_out=start + skip, name=name) + data.decode("utf-8", "replace")
        else:
            out[name] = data.decode("utf-8", "replace")
    return out
