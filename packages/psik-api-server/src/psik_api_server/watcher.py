"""The StatusWatcher: notices each new row in a non-final job's status.csv.

It follows only the jobs it is told about (the non-final ones), with one ``stat`` per
job per tick and reads only the bytes appended since last time, so its cost grows with
the number of live jobs, never with the prefix. An mtime/size check works on every
filesystem, shared ones included; the tick (``interval``, 50 ms by default) stretches
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
from collections.abc import Awaitable, Callable
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


class StatusWatcher:
    def __init__(self, on_change: OnChange, interval: float = 0.05) -> None:
        self._on_change = on_change
        self._interval = interval
        self._jobs: dict[str, _Followed] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def follow(self, jobid: str, status_csv: Path) -> None:
        """Start following a job (again): its whole file is read on the next tick."""
        self._jobs[jobid] = _Followed(path=status_csv)
        self._wake.set()

    def forget(self, jobid: str) -> None:
        self._jobs.pop(jobid, None)

    def poke(self) -> None:
        """Look now rather than at the next tick (e.g. right after a submit)."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_all(self) -> None:
        """One pass over every followed job."""
        for jobid in list(self._jobs):
            followed = self._jobs.get(jobid)
            if followed is None:
                continue
            try:
                await self._check(jobid, followed)
            except Exception:  # a bad job must not stop the watcher
                _logger.exception("watching job %s", jobid)

    async def _run(self) -> None:
        while True:
            await self.check_all()
            self._wake.clear()
            delay = max(self._interval, len(self._jobs) * _PER_JOB)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

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
