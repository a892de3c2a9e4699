"""psik's ``Job`` with the callbacks the server sends: the seam psik offers is its
``send_callback`` method, overridden here (psik 3.1's ``reached``, ``submit`` and
``cancel`` all send through it), rather than patched onto each job object."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from psik.job import Job
from psik.models import JobState

#: ``send(job, jobndx, state, info)``: posts the job's callback; True if delivered.
Sender = Callable[[Any, int, JobState, str], Awaitable[bool]]


class CallbackJob(Job):
    """A psik job whose callbacks go through ``send``."""

    def __init__(self, base: str | Path, send: Sender) -> None:
        super().__init__(base)
        self._send = send

    async def send_callback(self, jobndx: int, state: JobState, info: str) -> bool:
        return await self._send(self, jobndx, state, info)


async def open_job(base: str | Path, send: Sender) -> CallbackJob:
    """The psik job at ``base``, read."""
    job = CallbackJob(base, send)
    await job.read_info()
    return job
