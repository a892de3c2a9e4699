"""Disk full: telling it apart, saying it once, answering 507, leaving nothing half-made.

A full filesystem (``ENOSPC``, ``EDQUOT``; SQLite's ``SQLITE_FULL``) under the job prefix
or the index is an operator's problem, not a bug: a request that needed to write is
answered 507 ``insufficient_storage`` naming what is full, reads go on working, and the
condition is logged once when it starts and once when it clears (:class:`DiskFull`),
never once per request.

psik's create is not atomic and raises without saying which directory it had begun;
:class:`Creates` finds such a directory (by its stamp, within the time the create ran)
and removes it, so a refused submit leaves no job directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from psik_api_core import ProblemCode

from ..aio import in_thread
from ..errors import ApiError
from . import directory as jobdir

_logger = logging.getLogger(__name__)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # the primary result code; extended codes keep it in the low byte
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

INDEX = "index"
PREFIX = "prefix"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts (a cleanup's error may hide the first one)."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(seen) < 10 and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return seen


def _full_one(e: BaseException) -> str | None:
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        if (isinstance(code, int) and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(e):
            return INDEX
    elif isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return PREFIX
    return None


def full_place(exc: BaseException) -> str | None:
    """:data:`INDEX` or :data:`PREFIX` if ``exc`` (or what it was raised from) says a
    filesystem is full, else None. An OSError is the prefix's: the index fails with
    sqlite3 errors, and every file the server writes besides is in the prefix."""
    for e in _chain(exc):
        place = _full_one(e)
        if place is not None:
            return place
    return None


def is_disk_full(exc: BaseException) -> bool:
    return full_place(exc) is not None


def retryable_write_error(exc: BaseException) -> bool:
    """A write that may work later unchanged: a full disk, a busy or locked index."""
    if is_disk_full(exc):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    busy = isinstance(code, int) and code & 0xFF in {_SQLITE_BUSY, _SQLITE_LOCKED}
    return isinstance(exc, sqlite3.OperationalError) and busy


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


class DiskFull:
    """Which of the prefix and the index is full now. Logs a full one once (a warning)
    when it is first seen, and once when a write to it has worked again; the two are
    one episode when they share a filesystem. Safe from any thread; building one does
    no I/O."""

    def __init__(self, prefix: Path, index: Path | str) -> None:
        self.prefix = Path(prefix)
        self.index = Path(index)
        self._full: set[str] = set()
        self._failed: set[str] = set()  # other failed writes said already (see write_failed)
        self._shared: bool | None = None  # prefix and index on one filesystem (once known)
        self._lock = threading.Lock()

    def _episode(self, place: str) -> str:
        if self._shared is None:
            self._shared = _same_filesystem(self.prefix, self.index.parent)
        return "filesystem" if self._shared else place

    def _where(self, place: str) -> str:
        if place == INDEX:
            where = f"the job index {self.index}"
            if _same_filesystem(self.index.parent, self.prefix):
                where += f" (and the job prefix {self.prefix}, on the same filesystem)"
        else:
            where = f"the job prefix {self.prefix}"
            if _same_filesystem(self.prefix, self.index.parent):
                where += f" (and the job index {self.index}, on the same filesystem)"
        return where

    def note(self, exc: BaseException) -> str | None:
        """Record a disk-full ``exc`` (logged if it starts an episode); its place, or
        None if ``exc`` is not about a full disk."""
        place = full_place(exc)
        if place is None:
            return None
        episode = self._episode(place)
        with self._lock:
            new = episode not in self._full
            self._full.add(episode)
        if new:
            _logger.warning(
                "no space left on the filesystem of %s (%s): requests that must write (submit, "
                "start, cancel) are refused with 507 and job states are recorded once space is "
                "back; reads still work",
                self._where(place),
                " ".join(str(exc).split())[:200],
            )
        return place

    def is_full(self, place: str) -> bool:
        """Whether ``place`` (:data:`INDEX` or :data:`PREFIX`) is full now, as last seen."""
        episode = self._episode(place)
        with self._lock:
            return episode in self._full

    def cleared(self, place: str) -> None:
        """A write to ``place`` worked: ends its episode (logged once)."""
        episode = self._episode(place)
        with self._lock:
            was = episode in self._full
            self._full.discard(episode)
            if place == INDEX:
                self._failed.clear()
        if was:
            _logger.warning("%s can be written again: space was freed, writes work again", self._where(place))

    def write_failed(self, exc: BaseException, doing: str) -> None:
        """A write a read does on the side failed (ignored): said once per kind."""
        if self.note(exc) is not None:
            return
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        with self._lock:
            new = what not in self._failed
            self._failed.add(what)
        if new:
            _logger.warning(
                "%s failed (%s); the answer is still given, the index catches up later", doing, what
            )

    def error(
        self, exc: BaseException, doing: str = "complete the request", *, made: bool = False
    ) -> ApiError:
        """The 507 answer to a request that could not write because of ``exc`` (noted);
        ``made``: it was to make a job, and nothing of it is left."""
        place = self.note(exc) or PREFIX
        left = " Nothing was made (an Idempotency-Key is free again)." if made else ""
        return ApiError(
            ProblemCode.insufficient_storage,
            f"cannot {doing}: the filesystem of {self._where(place)} is full.{left} Free some space "
            "there and retry; reads still work.",
        )


class Creates:
    """psik's creates under way, so that one a full disk stopped leaves no directory.

    psik names a job directory by the time of its ``mkdir`` (``%.3f``), then fills it;
    when it fails part-way it raises without the name. The directories named within
    the time a failed create ran that are :func:`jobdir.half_created` and not in the
    index are removed, once no other create is under way (one of those could be one
    being filled now; the prefix lock keeps other servers out)."""

    def __init__(self) -> None:
        self._busy = 0
        self._windows: list[tuple[float, float]] = []

    @contextlib.asynccontextmanager
    async def creating(self, prefix: Path, indexed: Callable[[str], bool]) -> AsyncIterator[None]:
        start = time.time()
        self._busy += 1
        try:
            yield
        except BaseException as e:
            if is_disk_full(e):
                self._windows.append((start, time.time()))
            raise
        finally:
            self._busy -= 1
            if self._busy == 0 and self._windows:
                windows, self._windows = self._windows, []
                with anyio.CancelScope(shield=True):
                    await in_thread(_remove_half_made, prefix, windows, indexed)


def _remove_half_made(
    prefix: Path, windows: list[tuple[float, float]], indexed: Callable[[str], bool]
) -> None:
    names: set[str] = set()
    for start, end in windows:
        first, last = math.floor(start * 1000) - 1, math.ceil(end * 1000) + 1
        if last - first > 20_000:  # a create that hung for long: read the names instead
            names |= {n for n in jobdir.list_jobids(prefix) if start - 0.002 <= float(n) <= end + 0.002}
        else:
            names |= {f"{ms / 1000:.3f}" for ms in range(first, last + 1)}
    for name in sorted(names):
        base = prefix / name
        try:
            if not base.is_dir() or not jobdir.half_created(base) or indexed(name):
                continue
            shutil.rmtree(base)
        except FileNotFoundError:
            continue
        except Exception as e:  # best effort: start-up removes it too
            _logger.warning("cannot remove the half-made job directory %s: %s", base, e)
            continue
        _logger.info("removed job directory %s: psik could not finish creating it (disk full)", name)
