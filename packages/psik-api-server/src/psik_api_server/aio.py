"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from typing import ParamSpec, TypeVar

import anyio.to_thread

P = ParamSpec("P")
R = TypeVar("R")


async def in_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking ``fn`` in a worker thread (anyio's pool, bounded)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def pread_chunks(fd: int, start: int, end: int, size: int) -> AsyncGenerator[bytes, None]:
    """The bytes of ``fd`` from ``start`` to ``end``, at most ``size`` at a time, each
    read in a worker thread (a streamed response's body); fewer if the file is cut
    shorter meanwhile."""
    pos = start
    while pos < end:
        chunk = await in_thread(os.pread, fd, min(size, end - pos), pos)
        if not chunk:
            return  # cut shorter meanwhile: the client sees a short body
        pos += len(chunk)
        yield chunk


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; True if it was set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that runs the wait as
    a task of its own and, when a cancel arrives just as that task finishes, returns
    normally and drops the cancel. A background loop waiting that way (the watcher's,
    the containment sweep's) then never stops, and shutdown hangs; it did, about one
    time in ten, in the test suite. ``asyncio.timeout`` waits in the caller's own task,
    where a cancel is never lost."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
