"""The StatusWatcher: notices each new row in a non-final job's status.csv.

It follows only the jobs it is told about (the non-final ones) and reads only the bytes
appended since last time, so its cost grows with the number of live jobs, never with the
prefix. Two ways of noticing a write, together:

* on Linux, inotify on each followed status.csv (``inotify_simple``): a local write is
  seen within milliseconds;
* a tick (``interval``, 50 ms by default) with one ``stat`` per job, which works on every
  filesystem, shared ones included, where the writer may be another host; it stretches
  when many jobs are live so that a tick costs at most a few percent of a core.

On a change it parses the new complete rows, derives the job's state from its whole
history and calls ``on_change(jobid, rows, new_rows)``; a job that reaches a final
state is dropped (``start`` re-adds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from psik_api_core import derive_state

from .jobdir import Row, parse_rows

_logger = logging.getLogger(__name__)

OnChange = Callable[[str, list[Row], list[Row]], Awaitable[None]]

#: Seconds of tick per followed job, so 1000 live jobs are looked at every 0.1 s.
_PER_JOB = 0.0001


@dataclass
class _Followed:
    path: Path
    offset: int = 0
    stamp: tuple[int, int] = (-1, -1)  # (mtime_ns, size) at the last read
    partial: bytes = b""
    rows: list[Row] = field(default_factory=list)


def _read_from(path: Path, offset: int) -> bytes:
    # A status.csv grows by ~50 bytes a row: reading it on the loop is cheaper than a thread hop.
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


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
    def __init__(self, on_change: OnChange, interval: float = 0.05, *, notify: bool = True) -> None:
        self._on_change = on_change
        self._interval = interval
        self._notify = notify
        self._jobs: dict[str, _Followed] = {}
        self._dirty: set[str] = set()
        self._notifier: _Notifier | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def notifications(self) -> bool:
        """True when file notifications are in use (besides the tick)."""
        return self._notifier is not None

    def follow(self, jobid: str, status_csv: Path) -> None:
        """Start following a job (again): its whole file is read at once."""
        self._jobs[jobid] = _Followed(path=status_csv)
        if self._notifier is not None:
            self._notifier.add(jobid, status_csv)
        self.poke(jobid)

    def forget(self, jobid: str) -> None:
        self._jobs.pop(jobid, None)
        self._dirty.discard(jobid)
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

    async def _check_some(self, jobids: Iterable[str]) -> None:
        for jobid in jobids:
            followed = self._jobs.get(jobid)
            if followed is None:
                continue
            try:
                await self._check(jobid, followed)
            except Exception:  # a bad job must not stop the watcher
                _logger.exception("watching job %s", jobid)

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - loop.time()))

    async def _check(self, jobid: str, f: _Followed) -> None:
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            self.forget(jobid)  # purged, or never was a job
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == f.stamp:
            return
        f.stamp = stamp
        chunk = _read_from(f.path, f.offset)
        f.offset += len(chunk)
        data = f.partial + chunk
        complete, _, f.partial = data.rpartition(b"\n")
        if not complete:
            return
        new = parse_rows(complete.decode("utf-8", errors="replace"), jobid)
        if not new:
            return
        f.rows.extend(new)
        state, _ = derive_state(f.rows)
        if state.is_final:
            self.forget(jobid)
        await self._on_change(jobid, list(f.rows), new)
