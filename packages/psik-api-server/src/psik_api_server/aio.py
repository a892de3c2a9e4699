"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio.to_thread

P = ParamSpec("P")
R = TypeVar("R")


async def in_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking ``fn`` in a worker thread (anyio's pool, bounded)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


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
