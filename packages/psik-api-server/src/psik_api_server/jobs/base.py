"""The part of :class:`~psik_api_server.jobs.service.JobService` every other part builds on.

Its collaborators, and the steps on one job that the operations, idempotent creation
and start-up recovery all take: the job's lock, the ownership check, re-reading its
directory into the index, and submitting it (under its start claim, through the job
slots of a backend with a slot limit, see :mod:`psik_api_server.jobs.slots`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import anyio.to_thread

from psik_api_core import (
    Action,
    Job,
    JobState,
    Policy,
    Principal,
    ProblemCode,
    derive_state,
    run_outcome,
    slot_wait,
    utc,
)

from ..aio import in_thread
from ..backends.local.liveness import runner_pid
from ..backends.psik_backend import PsikBackend, SubmitError
from ..errors import ApiError
from . import directory as jobdir
from .callbacks import CallbackRelay
from .directory import JobFileInvalid
from .diskfull import INDEX, Creates, DiskFull
from .slots import JobSlots
from .speclimits import SpecLimits
from .store import JobRow, JobStore
from .watcher import Change, StatusWatcher

_logger = logging.getLogger(__name__)


def not_submitted(jobid: str, reason: str, unavailable: bool) -> ApiError:
    """The answer to a refused submit: 503 if the backend could not be reached (start the
    job again later), else 502; the job exists, failed, with ``reason`` in its history."""
    if unavailable:
        return ApiError(
            ProblemCode.backend_unavailable,
            f"job {jobid} was not submitted: {reason}; it is kept (failed): start it again once the "
            "backend is back",
            jobid=jobid,
        )
    return ApiError(ProblemCode.submit_failed, f"job {jobid} was not submitted: {reason}", jobid=jobid)


class JobFilesInvalid(ApiError):
    """The answer about a job that made one of its own bookkeeping files unreadable or
    unwritable (:class:`~psik_api_server.jobs.directory.JobFileInvalid`): 409 ``job_files_invalid`` naming the
    file. Its own problem: no other job is concerned."""

    def __init__(self, invalid: JobFileInvalid, done: str = "") -> None:
        super().__init__(
            ProblemCode.job_files_invalid,
            f"job {invalid.jobid}'s {invalid.name} {invalid.why}: the job changed its own bookkeeping, "
            f"so its state cannot be read or recorded{done}; purge it (DELETE with purge=true) to remove it",
            jobid=invalid.jobid,
            file=invalid.name,
        )
        self.invalid = invalid


#: How many jobs with invalid files are remembered as already logged.
_MAX_SAID = 10_000


class JobServiceBase:
    """The collaborators and the steps on one job every part of JobService takes (see
    the module)."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        policy: Policy,
        *,
        directory_roots: Iterable[Path] = (),
        watch_interval: float = 0.05,
        liveness_interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        import_owner: str,
        callback_url: str | None = None,
        spec_limits: SpecLimits | None = None,
    ) -> None:
        """Only remembers its collaborators: :meth:`start` does the work.
        ``callback_url``: every job reports to it (see :mod:`psik_api_server.jobs.callbacks`);
        ``spec_limits``: what a spec may ask for (token mode, :mod:`psik_api_server.jobs.speclimits`)."""
        self.store = store
        self.callback_url = callback_url
        self.spec_limits = spec_limits or SpecLimits()
        self.relay = CallbackRelay()
        self.backend = backend
        self.policy = policy
        self.clock = clock
        self.import_owner = import_owner
        self._roots = list(directory_roots)
        self.directory_roots: list[Path] = []
        self.watcher = StatusWatcher(self._on_changes, interval=watch_interval, on_broken=self._on_broken)
        # Jobs whose invalid files were logged already: once per job, not per look.
        self._said_invalid: set[str] = set()
        self.liveness_interval = liveness_interval
        self._liveness: asyncio.Task[None] | None = None
        # Removing the temporary files of cut-short uploads, at start-up (see .recovery).
        self._uploads: asyncio.Task[None] | None = None
        self._uploads_stop = threading.Event()
        # One lock per job being started/cancelled/purged; weak, so that locks of jobs
        # nobody is touching do not pile up in a long-running server.
        self._job_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # (owner, key) of the keyed requests this process is handling now: a replay of
        # one of them is told to retry; any other unanswered key was abandoned.
        self._inflight: set[tuple[str, str]] = set()
        # A full disk: said once, answered 507, nothing half-made left (see .diskfull).
        self.disk = DiskFull(backend.prefix, store.path)
        self._creates = Creates()
        self.slots = JobSlots({name: cfg.slot_limit() for name, cfg in backend.settings.items()})
        self._filling: asyncio.Task[None] | None = None
        self._fill_again = False

    async def _on_changes(self, changes: list[Change]) -> None:
        def states() -> Iterable[tuple[str, JobState, int, float, int | None]]:
            for c in changes:
                state, jobndx = derive_state(c.rows)
                yield c.jobid, state, jobndx, max(r.time for r in c.rows), run_outcome(c.rows)[1]

        try:
            changed = await in_thread(self.store.set_states, list(states()))
        except Exception as e:
            self.disk.note(e)  # a full disk is said once; the watcher keeps the changes, retries
            raise
        if changed:
            self.disk.cleared(INDEX)
        self._fill_slots()  # a job that ended frees its slot

    async def _on_broken(self, invalid: JobFileInvalid, rows: Sequence[jobdir.Row]) -> None:
        async with self._lock(invalid.jobid):
            await self._fail_invalid(invalid, rows)

    async def _fail_invalid(self, invalid: JobFileInvalid, rows: Sequence[jobdir.Row] = ()) -> str:
        """The job made its own status.csv or spec.json unreadable or unwritable (see
        :class:`JobFilesInvalid`): its state can no longer be read nor recorded there, so
        the index records it failed (its job slot is free) and a local job's processes
        are ended (``rows``: what was read of its status.csv before, naming psik's
        runner). Logged once per job. Called holding the job's lock. Returns what was done,
        for an answer."""
        jobid = invalid.jobid
        self.watcher.forget(jobid)
        row = await in_thread(self.store.get, jobid)
        if row is None:
            return ""
        local = self.backend.is_local(row.backend)
        if jobid not in self._said_invalid:
            if len(self._said_invalid) < _MAX_SAID:
                self._said_invalid.add(jobid)
            _logger.warning(
                "%s; the job changed it itself: failed in the index%s",
                invalid,
                ", its processes are ended" if local else "",
            )
        if not row.state.is_final:
            await in_thread(
                self.store.set_state, jobid, JobState.failed, row.jobndx, self.clock(), exit_code=None
            )
        if local:
            await self.backend.end_processes(jobid, row.jobndx, runner_pid(list(rows)))
        self._fill_slots()
        return "; it is recorded failed" + (" and its processes are ended" if local else "")

    def _lock(self, jobid: str) -> asyncio.Lock:
        lock = self._job_locks.get(jobid)
        if lock is None:
            lock = self._job_locks[jobid] = asyncio.Lock()
        return lock

    def _owned(self, principal: Principal, jobid: str, action: Action) -> JobRow:
        """The job's index row if ``principal`` may do ``action`` to it; 404 otherwise (a
        job that is not yours is indistinguishable from one that does not exist)."""
        # The same work whether the job is another's or does not exist (one query that
        # yields a row either way, the policy always asked): no timing tells them apart.
        found, row = self.store.lookup(jobid)
        readable = self.policy.allows(principal, Action.read, row.owner, jobid)
        if not (found and readable):
            raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
        if not self.policy.allows(principal, action, row.owner, jobid):
            raise ApiError(ProblemCode.forbidden, f"not allowed to {action.value} job {jobid}")
        return row

    def _refresh(
        self,
        jobid: str,
        read: Callable[[Path], jobdir.JobFiles] = jobdir.read_job,
        *,
        strict: bool = False,
        invalid: bool = False,
    ) -> jobdir.JobFiles | None:
        """Re-read a job's directory and update its index row; None if it cannot be read
        (with ``invalid``, files the job made invalid raise :class:`~.directory.JobFileInvalid`).
        A failed update (a full disk) is said once and ignored, unless ``strict`` (a
        request that changes the job: it must not act on a stale row)."""
        try:
            files = read(self.backend.path(jobid))
        except JobFileInvalid:
            if invalid:
                raise
            return None
        except (OSError, ValueError):
            return None
        state, jobndx = files.state
        try:
            if self.store.set_state(jobid, state, jobndx, files.updated, exit_code=files.exit_code):
                self.disk.cleared(INDEX)
        except (sqlite3.Error, OSError) as e:
            if strict:
                raise
            # A read must not need a write (the disk may be full): the answer comes from
            # the directory, and the watcher records the state once it can.
            self.disk.write_failed(e, f"recording job {jobid}'s state in the index")
        return files

    def _release_start_sync(self, jobid: str) -> None:
        """Give back a start claim, with the state the start left."""
        try:
            files = jobdir.read_job(self.backend.path(jobid))
        except (OSError, ValueError):
            self.store.release_start(jobid)
            return
        state, jobndx = files.state
        self.store.release_start(jobid, state, jobndx, files.updated, files.exit_code)

    def _owned_files(self, principal: Principal, jobid: str, action: Action) -> tuple[str, jobdir.JobFiles]:
        """``_owned`` and ``_refresh`` in one go; 404 if the directory is unreadable,
        :class:`JobFilesInvalid` if the job made its files invalid."""
        owner = self._owned(principal, jobid, action).owner
        try:
            files = self._refresh(jobid, strict=action is not Action.read, invalid=True)
        except JobFileInvalid as e:
            raise JobFilesInvalid(e) from None
        if files is None:
            raise ApiError(ProblemCode.not_found, f"job {jobid} has no readable directory", jobid=jobid)
        return owner, files

    def _get_sync(self, principal: Principal, jobid: str) -> Job:
        owner, files = self._owned_files(principal, jobid, Action.read)
        state, jobndx = files.state
        native_id, exit_code = run_outcome(files.history)
        return Job(
            jobid=jobid,
            name=files.spec.name,
            backend=files.spec.backend,
            owner=owner,
            state=state,
            jobndx=jobndx,
            native_id=native_id,
            exit_code=exit_code,
            created=utc(files.created),
            updated=utc(files.updated),
            spec=files.spec,
            history=[r.transition() for r in sorted(files.history, key=lambda r: r.time)],
        )

    async def _submit_if_new(self, jobid: str) -> bool:
        """Submit ``jobid`` if it is still ``new`` and nobody else is starting it; True
        if this call submitted it."""
        async with self._lock(jobid):
            files = await in_thread(self._refresh, jobid, jobdir.read_job_settled)
            if files is None or files.state != (JobState.new, 0):
                return False
            if not await in_thread(self.store.claim_start, jobid, 0):
                return False
            try:
                await self._submit(jobid)
            finally:
                with anyio.CancelScope(shield=True):
                    await in_thread(self._release_start_sync, jobid)
            return True

    async def _submit(self, jobid: str) -> None:
        """Submit and follow the job (called holding its lock and start claim). On a
        backend with a slot limit and no free slot (or others already waiting), the job
        is recorded ``queued``, waiting for a slot, instead (see :mod:`psik_api_server.jobs.slots`)."""
        row = await in_thread(self.store.get, jobid)
        backend = row.backend if row is not None else None
        if backend is None or self.slots.limit(backend) is None:
            await self._launch(jobid)
            return
        async with self.slots.lock(backend):
            free = await in_thread(self._free_slots_sync, backend)
            if free > 0 and not self.slots.queue(backend):
                await self._launch(jobid)
                return
            try:
                _, since = await self.backend.wait_for_slot(jobid, self.slots.why(backend))
            except JobFileInvalid as e:  # swapped since it was read: not queued
                raise JobFilesInvalid(e, await self._fail_invalid(e)) from None
            self.slots.wait(backend, jobid, since)
            self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
        self._fill_slots()  # a slot may have freed while this one was being recorded

    async def _launch(self, jobid: str, waited: int | None = None) -> None:
        """Submit (``waited``: start that run, which waited for a slot) and follow the
        job, and record its new state in the index (a slot decision counts it next)."""
        try:
            await self.backend.submit(jobid, waited=waited)
        except SubmitError as e:
            await in_thread(self._refresh, jobid)
            raise not_submitted(jobid, e.reason, e.unavailable) from e
        except JobFileInvalid as e:  # swapped since it was read: not submitted
            raise JobFilesInvalid(e, await self._fail_invalid(e)) from None
        self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
        await in_thread(self._refresh, jobid)

    def _free_slots_sync(self, backend: str) -> int:
        return self.slots.free(backend, self.store.live())

    def _fill_slots(self) -> None:
        """Start waiting jobs while slots are free, in the background (one filler at a
        time; a call while it runs makes it look again when done)."""
        if not self.slots.backends_waiting():
            return
        if self._filling is not None and not self._filling.done():
            self._fill_again = True
            return
        self._filling = asyncio.get_running_loop().create_task(self._fill(), name="job slots")

    async def _fill(self) -> None:
        while True:
            self._fill_again = False
            for backend in self.slots.backends_waiting():
                for jobid in self.slots.queue(backend):
                    try:
                        if not await self._start_waiting(backend, jobid):
                            break  # no free slot: the next job that ends calls again
                    except Exception as e:  # one job must not keep the others waiting
                        _logger.warning("job %s: not started from the slot queue: %s", jobid, e)
                        self.slots.done(backend, jobid)
            if not self._fill_again:
                return

    async def _start_waiting(self, backend: str, jobid: str) -> bool:
        """Start ``jobid`` if a slot is free and it still waits; False if no slot is free."""
        async with self._lock(jobid), self.slots.lock(backend):
            if await in_thread(self._free_slots_sync, backend) <= 0:
                return False
            files = await in_thread(self._refresh, jobid, jobdir.read_job_settled)
            wait = None if files is None else slot_wait(files.history)
            self.slots.done(backend, jobid)
            if wait is not None:  # else cancelled (or purged) while it waited
                try:
                    await self._launch(jobid, waited=wait[0])
                except ApiError as e:  # refused: the job is failed, its history says why
                    _logger.warning("job %s: %s", jobid, e)
            return True
