"""The StatusWatcher: notices each new row in a non-final job's status.csv.

It follows only the jobs it is told about (the non-final ones) and reads only the bytes
appended since last time, so its cost grows with the number of live jobs, never with the
prefix. Two ways of noticing a write, together:

* on Linux, inotify on each followed status.csv (``inotify_simple``): a local write is
  seen within milliseconds;
* a tick (``interval``, 50 ms by default) with one ``stat`` per job, which works on every
  filesystem, shared ones included, where the writer may be another host; it stretches
  when many jobs are live so that a tick costs at most a few percent of a core.

Each look (a tick, or a wake-up by inotify) is one hop to a worker thread that stats
every job in it and reads what was appended, so a slow filesystem (a ``stat`` on a
parallel filesystem can take seconds) stalls the watcher, never the event loop. The
new complete rows are parsed on the loop, each job's state is derived from its whole
history, and ``on_change`` gets every job that changed in that look as one list of
:class:`Change`; a job that reaches a final state is dropped (``follow`` re-adds it).

A status.csv the job replaced by something that is no regular file (a FIFO, which a
plain open would wait on for ever, a directory, a link) or grew past its bound is never
read: the job is dropped and given once to ``on_broken`` (the service fails it). Any
other error reading one job is logged once and that job is looked at again later; no
job's file holds up the others.

A change is read only once, so one ``on_change`` could not record (a full disk, a busy
index: :func:`~psik_api_server.jobs.diskfull.retryable_write_error`) is kept and given again, merged with
anything newer, at the next looks (backing off to a second) until it is recorded: the
index catches up by itself once space is back. The failure is logged once, not per look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from psik_api_core import JobState, derive_state

from ..aio import in_thread, wait_event
from .directory import MAX_STATUS, JobFileInvalid, Row, open_job_file, parse_rows
from .diskfull import is_disk_full, retryable_write_error

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """A followed job's status.csv grew: all its ``rows`` so far, of which ``new`` are new."""

    jobid: str
    rows: list[Row]
    new: list[Row]
    #: ``derive_state(rows)``, as the watcher found it (each derivation reads every row:
    #: a job that wrote 100,000 of them must not be derived once per reader of the change).
    found: tuple[JobState, int] | None = None

    def state(self) -> tuple[JobState, int]:
        return self.found if self.found is not None else derive_state(self.rows)


OnChange = Callable[[list[Change]], Awaitable[None]]
#: Told once about a followed job whose status.csv cannot be read as one (no longer
#: followed), with the rows read from it before.
OnBroken = Callable[[JobFileInvalid, list[Row]], Awaitable[None]]

#: Seconds of tick per followed job, so 1000 live jobs are looked at every 0.1 s.
_PER_JOB = 0.0001

#: Seconds a followed job's status.csv may be missing before the job is broken.
_MISSING_GRACE = 1.0

#: Longest wait between two tries at recording changes ``on_change`` failed to record.
_RETRY_MAX = 1.0


@dataclass
class _Followed:
    path: Path
    offset: int = 0
    stamp: tuple[int, int] = (-1, -1)  # (mtime_ns, size) at the last read
    partial: bytes = b""
    rows: list[Row] = field(default_factory=list)
    missing_since: float | None = None  # loop time status.csv was first seen missing


@dataclass(frozen=True)
class _Look:
    """What one look at a status.csv found (made in a worker thread)."""

    jobid: str
    followed: _Followed
    stamp: tuple[int, int] | None  # None: the file is gone
    chunk: bytes = b""
    broken: JobFileInvalid | None = None  # not a file to read (a FIFO, a directory...)
    error: OSError | None = None  # could not be read this time
    missing: bool = False  # gone from a directory that is still there


def _look(jobs: list[tuple[str, _Followed, Path, int, tuple[int, int]]]) -> list[_Look]:
    """Stat each status.csv and read what was appended since ``offset`` where it changed.
    Blocking, and never raises, nor waits on a job's file (see :func:`jobdir.open_job_file`):
    what cannot be read is said in the look."""
    found: list[_Look] = []
    for jobid, followed, path, offset, last in jobs:
        try:
            st = os.lstat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == last:
                continue
            with os.fdopen(open_job_file(path.parent, path.name, MAX_STATUS), "rb") as fh:
                fh.seek(offset)
                found.append(_Look(jobid, followed, stamp, fh.read(max(0, MAX_STATUS - offset))))
        except FileNotFoundError:
            if not path.parent.is_dir():  # purged
                found.append(_Look(jobid, followed, None))
            else:  # the job removed it (to put something else there?): looked at again
                found.append(_Look(jobid, followed, None, missing=True))
        except JobFileInvalid as e:
            found.append(_Look(jobid, followed, None, broken=e))
        except OSError as e:
            found.append(_Look(jobid, followed, None, error=e))
    return found


class _Notifier:
    """inotify (Linux) on each followed status.csv: a local write wakes the watcher at
    once rather than at its next tick. Writes inotify cannot see (another host on a
    shared filesystem) are still found by the tick."""

    def __init__(self, on_write: Callable[[str], None]) -> None:
        from inotify_simple import INotify, flags

        self._ino = INotify(nonblocking=True)
        self._mask = flags.MODIFY
        self._on_write = on_write
        self._jobs: dict[int, str] = {}  # watch descriptor -> jobid
        self._wds: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(cls, on_write: Callable[[str], None]) -> _Notifier | None:
        try:
            return cls(on_write)
        except (ImportError, OSError, AttributeError) as e:  # not Linux, or out of instances
            _logger.info("no file notifications (%s); status files are checked every tick", e)
            return None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._ino.fileno(), self._drain)

    def add(self, jobid: str, path: Path) -> None:
        self.remove(jobid)
        try:
            wd = self._ino.add_watch(str(path), self._mask)
        except OSError:  # gone already, or no watches left: the tick still sees it
            return
        self._jobs[wd] = jobid
        self._wds[jobid] = wd

    def remove(self, jobid: str) -> None:
        wd = self._wds.pop(jobid, None)
        if wd is not None:
            self._jobs.pop(wd, None)
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)

    def _drain(self) -> None:
        try:
            events = self._ino.read(timeout=0)
        except (BlockingIOError, OSError):
            return
        for event in events:
            jobid = self._jobs.get(event.wd)
            if jobid is not None:
                self._on_write(jobid)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._ino.fileno())
            self._loop = None
        self._ino.close()


class StatusWatcher:
    def __init__(
        self,
        on_change: OnChange,
        interval: float = 0.05,
        *,
        notify: bool = True,
        on_broken: OnBroken | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_broken = on_broken
        # Jobs whose status.csv could not be read, already logged (once per job).
        self._said: set[str] = set()
        self._interval = interval
        self._notify = notify
        self._jobs: dict[str, _Followed] = {}
        self._dirty: set[str] = set()
        self._notifier: _Notifier | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Changes on_change could not record yet, by job, and when to try again.
        self._unrecorded: dict[str, Change] = {}
        self._failures = 0
        self._retry_at = 0.0

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def notifications(self) -> bool:
        """True when file notifications are in use (besides the tick)."""
        return self._notifier is not None

    def follow(self, jobid: str, status_csv: Path) -> None:
        """Start following a job (again): its whole file is read at once."""
        self._jobs[jobid] = _Followed(path=status_csv)
        self._said.discard(jobid)
        if self._notifier is not None:
            self._notifier.add(jobid, status_csv)
        self.poke(jobid)

    def forget(self, jobid: str) -> None:
        self._jobs.pop(jobid, None)
        self._dirty.discard(jobid)
        self._said.discard(jobid)
        if self._notifier is not None:
            self._notifier.remove(jobid)

    def poke(self, jobid: str) -> None:
        """Look at ``jobid`` now rather than at the next tick."""
        self._dirty.add(jobid)
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        loop = asyncio.get_running_loop()
        if self._notify and self._notifier is None:
            self._notifier = _Notifier.create(self.poke)
            if self._notifier is not None:
                self._notifier.attach(loop)
                for jobid, followed in self._jobs.items():
                    self._notifier.add(jobid, followed.path)
        self._task = loop.create_task(self._run(), name="status-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None

    async def check_all(self) -> None:
        """One pass over every followed job."""
        await self._check_some(list(self._jobs))

    @property
    def unrecorded(self) -> int:
        """How many jobs have changes waiting to be recorded again."""
        return len(self._unrecorded)

    async def _check_some(self, jobids: Iterable[str]) -> None:
        wanted = [(j, f, f.path, f.offset, f.stamp) for j in jobids if (f := self._jobs.get(j)) is not None]
        changes: list[Change] = []
        broken: list[tuple[JobFileInvalid, list[Row]]] = []
        if wanted:
            for look in await in_thread(_look, wanted):
                if self._jobs.get(look.jobid) is not look.followed:
                    continue  # forgotten, or followed afresh, while we looked
                if look.broken is not None:
                    self.forget(look.jobid)  # nothing more can be read from it
                    broken.append((look.broken, look.followed.rows))
                    continue
                if look.missing:
                    e = self._missing(look)
                    if e is not None:
                        self.forget(look.jobid)
                        broken.append((e, look.followed.rows))
                    continue
                look.followed.missing_since = None
                if look.error is not None:  # left for the next look; said once
                    if look.jobid not in self._said:
                        self._said.add(look.jobid)
                        _logger.warning("watching job %s: %s", look.jobid, look.error)
                    continue
                try:
                    change = self._apply(look)
                except Exception:  # a bad job must not stop the watcher
                    _logger.exception("watching job %s", look.jobid)
                    continue
                if change is not None:
                    changes.append(change)
        for e, rows in broken:
            await self._tell_broken(e, rows)
        await self._record(changes)

    def _missing(self, look: _Look) -> JobFileInvalid | None:
        """A job whose status.csv is missing from its directory: only psik makes it, and
        never removes it, so it is the job's doing. Looked at again for a moment (it may
        be about to put something there), then :class:`JobFileInvalid`."""
        now = asyncio.get_running_loop().time()
        f = look.followed
        if f.missing_since is None:
            f.missing_since = now
        if now - f.missing_since < _MISSING_GRACE:
            return None
        return JobFileInvalid(f.path.parent, f.path.name, "is missing")

    async def _tell_broken(self, e: JobFileInvalid, rows: list[Row]) -> None:
        if self._on_broken is None:
            _logger.warning("no longer watching job %s: %s", e.jobid, e)
            return
        try:
            await self._on_broken(e, rows)
        except Exception:  # a bad job must not stop the watcher
            _logger.exception("job %s: %s", e.jobid, e)

    async def _record(self, changes: list[Change]) -> None:
        """Give ``changes``, and those not recorded before, to ``on_change``; keep them
        all for a later look if it fails in a way that may pass."""
        for c in changes:
            old = self._unrecorded.pop(c.jobid, None)
            if old is not None:  # rows: the newer has them all; new: both were unseen
                self._unrecorded[c.jobid] = Change(c.jobid, c.rows, [*old.new, *c.new], c.found)
            else:
                self._unrecorded[c.jobid] = c
        if not self._unrecorded:
            return
        loop = asyncio.get_running_loop()
        if not changes and loop.time() < self._retry_at:
            return
        batch = list(self._unrecorded.values())
        try:
            await self._on_change(batch)
        except Exception as e:
            if not retryable_write_error(e):
                _logger.exception("recording status changes of %d jobs", len(batch))
                self._unrecorded.clear()
                self._failures = 0
                return
            self._failures += 1
            self._retry_at = loop.time() + min(_RETRY_MAX, self._interval * 2**self._failures)
            if self._failures == 1 and not is_disk_full(e):  # on_change says a full disk itself
                _logger.warning(
                    "cannot record status changes of %d jobs yet (%s); trying again", len(batch), e
                )
            return
        for c in batch:
            if self._unrecorded.get(c.jobid) is c:
                del self._unrecorded[c.jobid]
        if self._failures:
            _logger.info(
                "recorded the status changes of %d jobs after %d failed tries", len(batch), self._failures
            )
            self._failures = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        while True:
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            if loop.time() >= next_tick:
                await self.check_all()
                next_tick = loop.time() + max(self._interval, len(self._jobs) * _PER_JOB)
            else:
                await self._check_some(dirty)
            if self._dirty:
                continue  # poked while checking
            await wait_event(self._wake, max(0.0, next_tick - loop.time()))

    def _apply(self, look: _Look) -> Change | None:
        """Take in what a look read; the change it makes, if any."""
        f = look.followed
        if look.stamp is None:
            self.forget(look.jobid)  # purged, or never was a job
            return None
        f.stamp = look.stamp
        f.offset += len(look.chunk)
        data = f.partial + look.chunk
        complete, _, f.partial = data.rpartition(b"\n")
        if not complete:
            return None
        new = parse_rows(complete.decode("utf-8", errors="replace"), look.jobid)
        if not new:
            return None
        f.rows.extend(new)
        found = derive_state(f.rows)
        if found[0].is_final:
            self.forget(look.jobid)
        return Change(look.jobid, list(f.rows), new, found)
