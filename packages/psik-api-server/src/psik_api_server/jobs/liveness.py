"""The liveness loop: :class:`LivenessLoop` records ``failed`` for every non-final job
its backend's driver finds ended without a final row (a local job whose process is
gone, see :mod:`..backends.local.liveness`; a Slurm job Slurm has ended or forgotten,
see :mod:`..backends.slurm.liveness`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..aio import in_thread
from ..backends.psik_backend import PsikBackend
from .directory import JobFileInvalid
from .diskfull import DiskFull
from .locks import JobLocks
from .records import JobRecords
from .store import JobStore
from .submitter import Submitter

_logger = logging.getLogger(__name__)


class LivenessLoop:
    """Asks the backends, every ``interval`` seconds, which live jobs have vanished."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        records: JobRecords,
        submitter: Submitter,
        locks: JobLocks,
        disk: DiskFull,
        interval: float = 2.0,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.submitter = submitter
        self.locks = locks
        self.disk = disk
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        #: Rounds done and the jobs they recorded ``failed``, so far (the metrics read them).
        self.rounds = 0
        self.failed = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="liveness")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                _logger.exception("liveness check")
            await asyncio.sleep(self.interval)

    async def check(self) -> list[str]:
        """One round: record ``failed`` for every vanished job; returns their ids."""
        gone: list[str] = []
        # A job waiting for a job slot has nothing running to lose: not asked about (a
        # group of thousands waits so; reading each of them every round would cost a
        # share of the server that grows with them).
        waiting = self.submitter.slots.waiting()
        rows = [r for r in await in_thread(self.store.submitted) if r.jobid not in waiting]
        found = await self.backend.vanished(rows)
        for job in found:
            # Each job on its own: one whose status.csv cannot be written (the job made it
            # so) must not stop the others being decided in this round.
            async with self.locks(job.jobid):
                files = await in_thread(self.records.refresh, job.jobid)  # it may have just ended properly
                if files is None or (files.state[0].is_final and not job.overrules_end(files)):
                    continue
                try:
                    await self.backend.record_failure(job.jobid, files.state[1], job.reason)
                except JobFileInvalid as e:
                    await self.submitter.fail_invalid(e, files.history)
                    continue
                except OSError as e:  # a full disk: said once, tried again next round
                    self.disk.write_failed(e, f"recording that job {job.jobid} failed")
                    continue
                await in_thread(self.records.refresh, job.jobid)
                gone.append(job.jobid)
        self.rounds += 1
        self.failed += len(gone)
        return gone
