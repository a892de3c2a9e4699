"""Start-up and shut-down of :class:`~psik_api_server.jobs.service.JobService`, and what they recover.

At start-up the index is opened (rebuilt from the job directories if it is corrupt) and
reconciled with them (:mod:`psik_api_server.jobs.reconcile`), and what a dead server left is finished: a
keyed create-and-submit whose job is still ``new`` is submitted, claims are released,
and jobs waiting for a slot wait again. Jobs that made their own status.csv invalid
are failed. In the background, the temporary files of uploads a killed server left
(``.psik-upload-*``) are removed. While the server runs, the liveness loop records
``failed`` for jobs whose process (or Slurm job) is gone without a final row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from psik_api_core import JobState, slot_wait

from ..aio import in_thread
from ..errors import StartupError
from ..files.paths import TEMP_PREFIX
from . import directory as jobdir
from .base import JobServiceBase
from .directory import JobFileInvalid
from .reconcile import Reconciled, reconcile
from .store import CorruptIndex, OpenKey

_logger = logging.getLogger(__name__)


def remove_stale_uploads(root: str, before: float, stop: threading.Event) -> int:
    """Remove the upload temporary files (``.psik-upload-*``, regular files last changed
    before ``before``) under the directory ``root``; how many. Never follows a link, nor
    leaves ``root`` (``os.fwalk`` holds each directory open). Stops early once ``stop``
    is set. The directories an upload made are left: nothing tells them from the job's."""
    removed = 0
    try:
        # A walk given up early closes its descriptors as the generator is dropped.
        for _, _, names, dirfd in os.fwalk(root, follow_symlinks=False):
            if stop.is_set():
                break
            for name in names:
                if not name.startswith(TEMP_PREFIX):
                    continue
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < before:
                        os.unlink(name, dir_fd=dirfd)
                        removed += 1
                except OSError:
                    continue
    except OSError:  # the root went, or cannot be read
        pass
    return removed


class Recovery(JobServiceBase):
    """The app's lifespan: :meth:`open` and :meth:`aclose` (see the module)."""

    async def open(self) -> None:
        """Open the index and psik, reconcile, finish what a dead server left, and start
        following jobs."""
        done, corrupt = await in_thread(self._open_sync)
        _logger.info(
            "index: %d jobs (%d imported from %s, %d removed, %d refreshed)",
            await in_thread(self.store.count),
            done.imported,
            self.backend.prefix,
            done.removed,
            done.refreshed,
        )
        if corrupt is not None:
            why, aside = corrupt
            _logger.warning(
                "the job index was corrupt (%s): moved it to %s and rebuilt it from the %d job "
                "directories; owners come from each job's own record (a job without one now "
                "belongs to %s); lost: Idempotency-Keys (a retried request with an old key makes "
                "a new job)",
                why,
                aside,
                done.imported,
                self.import_owner,
            )
        for jobid, status_csv in done.live:
            self.watcher.follow(jobid, status_csv)
        self.watcher.start()
        for invalid in done.invalid:
            async with self._lock(invalid.jobid):
                await self._fail_invalid(invalid)
        self.backend.warm_up()
        for backend, jobid, since in await in_thread(self._waiting_sync):
            self.slots.wait(backend, jobid, since)
        await self._resume(done.pending)
        self._fill_slots()
        loop = asyncio.get_running_loop()
        self._liveness = loop.create_task(self._liveness_loop(), name="liveness")
        self._uploads_stop.clear()
        self._uploads = loop.create_task(self._clear_uploads(time.time()), name="stale uploads")

    def _open_sync(self) -> tuple[Reconciled, tuple[str, Path] | None]:
        """Open psik and the index and reconcile; also what a corrupt index was and
        where it went, if it had to be rebuilt."""
        try:
            self.backend.open()
        except OSError as e:
            raise StartupError(f"cannot use the job prefix {self.backend.prefix}: {e}") from e
        corrupt: tuple[str, Path] | None = None
        try:
            try:
                self.store.open()
            except CorruptIndex as e:
                # The job directories are the truth: rebuild from them rather than refuse
                # to start (what only the index knew is said in the warning).
                corrupt = (str(e), self.store.move_aside(self.clock()))
                self.store.open()
        except (OSError, sqlite3.Error) as e:
            raise StartupError(f"cannot open the job index {self.store.path}: {e}") from e
        self.directory_roots = [Path(p).expanduser().resolve() for p in self._roots]
        return reconcile(self.store, self.backend.prefix, self.import_owner), corrupt

    async def _resume(self, pending: list[OpenKey]) -> None:
        """Finish the keyed requests a dead server left unanswered: submit the job of a
        create-and-submit that is still ``new``, then settle the key.

        Such a job never ran: psik writes its ``queued`` row under a flock on status.csv
        as it submits, and the job is read under that flock (``read_job_settled``), so a
        submit the dead server's launcher was still making is seen, not repeated. Its
        client gets this job on retry, and it runs once even if the client never retries.
        A job of a request *without* a key is left as it is (``new``): its client has no
        way to tell it from the one its retry makes, so running it could run the work twice."""
        submitted: list[str] = []
        for k in pending:
            assert k.jobid is not None
            try:
                if k.submit and await self._submit_if_new(k.jobid):
                    submitted.append(k.jobid)
            except Exception as e:  # one job must not keep the others (or the server) down
                _logger.warning("job %s: not submitted at start-up: %s", k.jobid, e)
            await in_thread(self.store.settle_key, k.owner, k.key, k.jobid)
        if submitted:
            _logger.info(
                "submitted %d job(s) a stopped server had created but not yet submitted: %s",
                len(submitted),
                ", ".join(submitted),
            )

    def _waiting_sync(self) -> list[tuple[str, str, float]]:
        """``(backend, jobid, since)`` of every job the job directories say is waiting
        for a slot (at start-up: the waiting list survives a restart)."""
        found: list[tuple[str, str, float]] = []
        for row in self.store.live():
            if row.state is not JobState.queued or self.slots.limit(row.backend) is None:
                continue
            try:
                files = jobdir.read_job(self.backend.path(row.jobid))
            except (OSError, ValueError):
                continue
            wait = slot_wait(files.history)
            if wait is not None:
                found.append((row.backend, row.jobid, wait[1]))
        return found

    async def _clear_uploads(self, before: float) -> None:
        """Remove what uploads cut short by a killed server left (see
        :func:`remove_stale_uploads`) in every job's files, in a worker thread."""
        try:
            removed = await in_thread(self._clear_uploads_sync, before)
        except Exception:  # housekeeping: never a reason to stop
            _logger.exception("removing the temporary files of interrupted uploads")
            return
        if removed:
            _logger.info("removed %d temporary file(s) of uploads a stopped server left", removed)

    def _clear_uploads_sync(self, before: float) -> int:
        removed = 0
        for jobid in sorted(jobdir.list_jobids(self.backend.prefix)):
            if self._uploads_stop.is_set():
                break
            base = self.backend.path(jobid)
            try:
                directory = jobdir.read_spec(base).directory
            except (OSError, ValueError):
                continue
            work = str(base / "work")
            if directory is not None and os.path.normpath(directory) != work:
                # Only where the file routes would write: inside the allowed roots.
                real = Path(os.path.realpath(directory))
                if not any(real == r or real.is_relative_to(r) for r in self.directory_roots):
                    continue
                work = str(real)
            removed += remove_stale_uploads(work, before, self._uploads_stop)
        return removed

    async def aclose(self) -> None:
        """Stop the liveness loop, the watcher and the launcher; close the index."""
        self._uploads_stop.set()
        if self._uploads is not None:
            with contextlib.suppress(Exception):
                await self._uploads
            self._uploads = None
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
            self._filling = None
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
            self._liveness = None
        await self.watcher.stop()
        await self.relay.aclose()
        await self.backend.aclose()
        await in_thread(self.store.close)

    async def _liveness_loop(self) -> None:
        while True:
            try:
                await self.check_liveness()
            except Exception:
                _logger.exception("liveness check")
            await asyncio.sleep(self.liveness_interval)

    async def check_liveness(self) -> list[str]:
        """Record ``failed`` for every non-final job its backend's driver finds ended
        without a final row (a local job whose process is gone, see ``liveness``; a Slurm
        job Slurm has ended or forgotten, see ``backends/slurm/liveness.py``); returns their ids."""
        gone: list[str] = []
        found = await self.backend.vanished(await in_thread(self.store.live))
        for job in found:
            # Each job on its own: one whose status.csv cannot be written (the job made it
            # so) must not stop the others being decided in this round.
            async with self._lock(job.jobid):
                files = await in_thread(self._refresh, job.jobid)  # it may have just ended properly
                if files is None or (files.state[0].is_final and not job.overrules_end(files)):
                    continue
                try:
                    await self.backend.record_failure(job.jobid, files.state[1], job.reason)
                except JobFileInvalid as e:
                    await self._fail_invalid(e, files.history)
                    continue
                except OSError as e:  # a full disk: said once, tried again next round
                    self.disk.write_failed(e, f"recording that job {job.jobid} failed")
                    continue
                await in_thread(self._refresh, job.jobid)
                gone.append(job.jobid)
        return gone
