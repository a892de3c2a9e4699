"""Start-up: what a dead server left, recovered (:class:`StartupRecovery`), and its
cut-short uploads removed in the background (:class:`UploadSweeper`).

At start-up the index is opened (rebuilt from the job directories if it is corrupt) and
reconciled with them (:mod:`.reconcile`), and what a dead server left is finished: a
keyed create-and-submit whose job is still ``new`` is submitted, claims are released,
who holds a job slot is recounted from the states, and jobs waiting for a slot wait
again; jobs waiting for their dependencies (:mod:`.deps`) are found again in the job
directories and reconsidered (their parents may have ended meanwhile). Jobs that made
their own status.csv invalid are failed. In the background, the temporary files of
uploads a killed server left (``.psik-upload-*``) are removed.
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
from collections.abc import Callable
from pathlib import Path

from psik_api_core import JobState, slot_wait

from ..aio import in_thread
from ..backends.psik_backend import PsikBackend
from ..errors import StartupError
from ..files.paths import TEMP_PREFIX
from . import directory as jobdir
from .locks import JobLocks
from .reconcile import Reconciled, reconcile
from .specs import SpecCheck
from .store import CorruptIndex, JobStore, OpenKey
from .submitter import Submitter
from .watcher import StatusWatcher

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


class StartupRecovery:
    """Opens the index and psik, reconciles them, and finishes what a dead server left
    (see the module): the first step of the job service's lifespan."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        submitter: Submitter,
        watcher: StatusWatcher,
        specs: SpecCheck,
        locks: JobLocks,
        clock: Callable[[], float],
        import_owner: str,
    ) -> None:
        self.store = store
        self.backend = backend
        self.submitter = submitter
        self.watcher = watcher
        self.specs = specs
        self.locks = locks
        self.clock = clock
        self.import_owner = import_owner

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
            async with self.locks(invalid.jobid):
                await self.submitter.fail_invalid(invalid)
        self.backend.warm_up()
        slots = self.submitter.slots
        waiting, held = await in_thread(self._waiting_sync)
        # Who holds a slot, from the states: a claim a dead server made is not lost.
        await in_thread(self.store.recount_slots, slots.limits, [jobid for _, jobid, _ in waiting] + held)
        for backend, jobid, since in waiting:
            slots.wait(backend, jobid, since)
        await self._resume(done.pending)
        self.submitter.fill_slots()
        # Parents that ended while the server was down release or cancel their jobs now.
        ended = await self.submitter.reconsider(held)
        if ended:
            self.submitter.parents_ended(ended)

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
        self.specs.resolve_roots()
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
                if k.submit and await self.submitter.submit_if_new(k.jobid):
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

    def _waiting_sync(self) -> tuple[list[tuple[str, str, float]], list[str]]:
        """``(backend, jobid, since)`` of every job the job directories say is waiting
        for a slot, and the jobs waiting for their dependencies (at start-up: neither
        list is lost with a restart)."""
        found: list[tuple[str, str, float]] = []
        held: list[str] = []
        for row in self.store.live():
            if row.state is not JobState.queued:
                continue
            try:
                files = jobdir.read_job(self.backend.path(row.jobid))
            except (OSError, ValueError):
                continue
            if self.submitter.deps.found_waiting(row.jobid, files):
                held.append(row.jobid)
                continue
            wait = slot_wait(files.history)
            if wait is not None and self.submitter.slots.limit(row.backend) is not None:
                found.append((row.backend, row.jobid, wait[1]))
        return found, held


class UploadSweeper:
    """Removes, in the background from start-up on, the temporary files of uploads a
    killed server cut short (see :func:`remove_stale_uploads`), in every job's files."""

    def __init__(self, backend: PsikBackend, specs: SpecCheck) -> None:
        self.backend = backend
        self.specs = specs
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(time.time()), name="stale uploads")

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    async def _run(self, before: float) -> None:
        try:
            removed = await in_thread(self._sweep_sync, before)
        except Exception:  # housekeeping: never a reason to stop
            _logger.exception("removing the temporary files of interrupted uploads")
            return
        if removed:
            _logger.info("removed %d temporary file(s) of uploads a stopped server left", removed)

    def _sweep_sync(self, before: float) -> int:
        removed = 0
        for jobid in sorted(jobdir.list_jobids(self.backend.prefix)):
            if self._stop.is_set():
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
                if not any(real == r or real.is_relative_to(r) for r in self.specs.directory_roots):
                    continue
                work = str(real)
            removed += remove_stale_uploads(work, before, self._stop)
        return removed
