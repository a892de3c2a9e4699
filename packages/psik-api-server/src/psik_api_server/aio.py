"""Small asyncio helpers."""

from __future__ import annotations

import asyncio


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
