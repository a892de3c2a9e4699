"""One asyncio lock per job: a start, cancel, purge or failure of one job at a time."""

from __future__ import annotations

import asyncio
import weakref


class JobLocks:
    """The lock of each job being started, cancelled, purged or failed. Weak: the locks
    of jobs nobody is touching do not pile up in a long-running server."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, jobid: str) -> asyncio.Lock:
        lock = self._locks.get(jobid)
        if lock is None:
            lock = self._locks[jobid] = asyncio.Lock()
        return lock
