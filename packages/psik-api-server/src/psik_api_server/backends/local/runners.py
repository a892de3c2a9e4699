"""Job slots held until a local job's process has exited, not only until it says it ended.

A local job runs as the server's user and can append its own ``completed`` row to its
status.csv while it keeps running. Were its slot freed at that row, jobs that lie could
outrun ``max_running``. So when a local job is recorded final while psik's runner of
that run still runs, the index keeps its slot (``set_state(hold=True)``) and the
:class:`RunnerWatch` gives the slot back once the runner exits: at once through a
pidfd (Linux 5.3+), else by looking every :data:`POLL` seconds.

An honest job's runner exits a moment after writing its final row, so its slot passes on
within milliseconds. Known limit: a restart forgets the runners it held slots for
(start-up counts slots from the job states).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence

from psik_api_core import JobState, derive_state

from ...aio import in_thread
from ...jobs.directory import Row
from .liveness import process_running

_logger = logging.getLogger(__name__)

#: Seconds between looks at held runners where a pidfd cannot be had.
POLL = 0.5


def current_runner(history: Sequence[Row], jobndx: int | None = None) -> tuple[int, int, float] | None:
    """The current run's psik runner, ``(jobndx, pid, queued time)``, if it still runs
    (blocking: reads ``/proc``); None if it has exited or was never recorded. ``jobndx``:
    the current run, if the caller derived it already."""
    if jobndx is None:
        _, jobndx = derive_state(history)
    queued = [r for r in history if r.jobndx == jobndx and r.state is JobState.queued and r.info.isdigit()]
    if not queued:
        return None
    pid, since = int(queued[-1].info), queued[-1].time
    return (jobndx, pid, since) if process_running(pid, since) else None


def _running(runners: dict[str, tuple[int, float]]) -> set[str]:
    return {jobid for jobid, (pid, since) in runners.items() if process_running(pid, since)}


class RunnerWatch:
    """The runners of jobs recorded final that still hold their slot.

    ``release(jobid, jobndx)`` (blocking: the index's ``release_slot_after``) is called in
    a worker thread once the runner is gone; then ``freed()`` on the event loop (the slot
    filler). :meth:`hold` may be called from any thread once the hold is committed."""

    def __init__(self, release: Callable[[str, int], bool], freed: Callable[[], None]) -> None:
        self.release = release
        self.freed = freed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: dict[str, tuple[int, int, float, int | None]] = {}  # jobid: (jobndx, pid, since, pidfd)
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def running(history: Sequence[Row], jobndx: int | None = None) -> tuple[int, int, float] | None:
        """:func:`current_runner` (blocking)."""
        return current_runner(history, jobndx)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def held(self) -> set[str]:
        """The jobs whose slot waits for their runner."""
        return set(self._held)

    def hold(self, jobid: str, jobndx: int, pid: int, since: float) -> None:
        """Keep ``jobid``'s slot until its runner ``pid`` exits (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stops
            loop.call_soon_threadsafe(self._watch, jobid, jobndx, pid, since)

    def _watch(self, jobid: str, jobndx: int, pid: int, since: float) -> None:
        if jobid in self._held:
            return
        fd: int | None = None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone(jobid, jobndx)
            return
        except (AttributeError, OSError):  # no pidfd here: look now and then
            fd = None
        if fd is not None and not process_running(pid, since):  # exited, or the PID was reused
            os.close(fd)
            self._gone(jobid, jobndx)
            return
        self._held[jobid] = (jobndx, pid, since, fd)
        if fd is not None:
            assert self._loop is not None
            self._loop.add_reader(fd, self._exited, jobid)
        elif self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="slot runners")

    def _exited(self, jobid: str) -> None:
        jobndx = self._forget(jobid)
        if jobndx is not None:
            self._gone(jobid, jobndx)

    def _forget(self, jobid: str) -> int | None:
        entry = self._held.pop(jobid, None)
        if entry is None:
            return None
        jobndx, _, _, fd = entry
        if fd is not None:
            assert self._loop is not None
            self._loop.remove_reader(fd)
            os.close(fd)
        return jobndx

    def _gone(self, jobid: str, jobndx: int) -> None:
        task = asyncio.get_running_loop().create_task(self._release(jobid, jobndx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, jobid: str, jobndx: int) -> None:
        try:
            freed = await in_thread(self.release, jobid, jobndx)
        except Exception as e:  # a full disk: the next start-up recounts the slots
            _logger.warning("job %s: cannot give its job slot back: %s", jobid, e)
            return
        if freed:
            self.freed()

    async def _poll(self) -> None:
        while any(fd is None for *_, fd in self._held.values()):
            await asyncio.sleep(POLL)
            polled = {j: (p, s) for j, (_, p, s, fd) in self._held.items() if fd is None}
            alive = await in_thread(_running, polled)
            for jobid in set(polled) - alive:
                self._exited(jobid)

    async def aclose(self) -> None:
        for jobid in list(self._held):
            self._forget(jobid)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        self._loop = None
