"""JobService: what the job routes do, independent of HTTP, composed of collaborators.

It enforces what psik does not: legal transitions (no double start, a final job stays
final), ownership, and idempotent creation. Never lose a job, never run one twice:

* a job is submitted only under a start claim taken in the index by one conditional
  UPDATE (``JobStore.claim_start``), so two starts never both run, even from two
  processes; a create-and-submit's job is born claimed (:mod:`.submitter`);
* an Idempotency-Key is claimed first, linked to its job in the same transaction as the
  job's index row (before any submit), and settled only once the answer is ready
  (:mod:`.idempotency`, :mod:`.creates`);
* at start-up what a dead server left is finished (:mod:`.recovery`).

The collaborators (built by :func:`.build.build_job_service`, which ``create_app`` calls with
what it was given): :class:`~.access.JobAccess` (who may do what), :class:`~.records.JobRecords`
(directory reads recorded in the index), :class:`~.specs.SpecCheck`, :class:`~.creates.JobCreator`
with :class:`~.idempotency.IdempotencyKeys`, :class:`~.submitter.Submitter` (claims, job
slots, launch, the slot filler), :class:`~.recovery.StartupRecovery`,
:class:`~.liveness.LivenessLoop`, :class:`~.recovery.UploadSweeper`, and the
:class:`~.watcher.StatusWatcher`. :meth:`JobService.open` starts them in order and
:meth:`JobService.aclose` stops them in reverse (one ``AsyncExitStack``).

Nothing here blocks the event loop: the index, the job directories and ``/proc`` are
read in worker threads (:func:`..aio.in_thread`), one trip per step; a request reads
its job's directory once, and once more at its end if it changed the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Sequence

from psik_api_core import (
    Action,
    BackendInfo,
    Job,
    JobSpec,
    JobState,
    JobStatus,
    JobSummary,
    Page,
    Policy,
    Principal,
    ProblemCode,
    can_cancel,
    can_start,
    field_error,
    is_slot_wait,
    utc,
)

from ..aio import in_thread
from ..backends import CancelUnavailable
from ..backends.psik_backend import PsikBackend, one_line
from ..errors import ApiError
from . import directory as jobdir
from .access import JobAccess
from .callbacks import CallbackRelay
from .creates import JobCreator
from .directory import JobFileInvalid
from .diskfull import DiskFull
from .events import EventHub
from .liveness import LivenessLoop
from .locks import JobLocks
from .records import JobFilesInvalid, JobRecords, job_view
from .recovery import StartupRecovery, UploadSweeper
from .specs import SpecCheck
from .store import BadCursor, JobRow, JobStore
from .submitter import Submitter
from .watcher import StatusWatcher


class JobService:
    """What the job routes do (see the module). Its collaborators are public: the files
    API and the log routes ask :attr:`access` and :attr:`records` too."""

    def __init__(
        self,
        *,
        store: JobStore,
        backend: PsikBackend,
        access: JobAccess,
        records: JobRecords,
        specs: SpecCheck,
        creator: JobCreator,
        submitter: Submitter,
        watcher: StatusWatcher,
        relay: CallbackRelay,
        recovery: StartupRecovery,
        liveness: LivenessLoop,
        uploads: UploadSweeper,
        locks: JobLocks,
        disk: DiskFull,
        clock: Callable[[], float],
        events: EventHub | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.access = access
        self.records = records
        self.specs = specs
        self.creator = creator
        self.submitter = submitter
        self.watcher = watcher
        self.relay = relay
        self.recovery = recovery
        self.liveness = liveness
        self.uploads = uploads
        self.locks = locks
        #: A full disk: said once, answered 507 (see :mod:`.diskfull`).
        self.disk = disk
        self.clock = clock
        #: The live event streams' subscriptions (:mod:`.events`), fed by the index's event log.
        self.events = events if events is not None else EventHub()
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def policy(self) -> Policy:
        """The authorization policy (:attr:`access`'s; a site or a test may swap it)."""
        return self.access.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.access.policy = policy

    # ---- lifespan ----

    async def open(self) -> None:
        """Start everything in order (see :class:`~.recovery.StartupRecovery`); what
        started is stopped again if a later step fails."""
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(in_thread, self.store.close)
            # Before recovery: rows written while the server was down become events there.
            self.events.bind(asyncio.get_running_loop())
            self.store.events.on_commit = self.events.publish
            stack.callback(self.events.close)
            if self.records.runners is not None:
                self.records.runners.start()
                stack.push_async_callback(self.records.runners.aclose)
            stack.push_async_callback(self.backend.aclose)
            stack.push_async_callback(self.relay.aclose)
            stack.push_async_callback(self.watcher.stop)
            stack.push_async_callback(self.submitter.aclose)
            await self.recovery.open()
            self.liveness.start()
            stack.push_async_callback(self.liveness.aclose)
            self.uploads.start()
            stack.push_async_callback(self.uploads.aclose)
            self._stack = stack.pop_all()

    async def aclose(self) -> None:
        """Stop what :meth:`open` started, in reverse; idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def check_liveness(self) -> list[str]:
        """One round of the liveness loop (see :class:`~.liveness.LivenessLoop`)."""
        return await self.liveness.check()

    # ---- backends ----

    async def backends(self) -> list[BackendInfo]:
        """Every configured backend, with its live health."""
        return list(await asyncio.gather(*(self.backend.live_info(n) for n in self.backend.settings)))

    async def backend_info(self, name: str) -> BackendInfo:
        """One configured backend; 404 naming the configured ones otherwise."""
        if name not in self.backend.settings:
            raise ApiError(
                ProblemCode.not_found,
                f"no backend {name!r}; configured: {', '.join(sorted(self.backend.settings))}",
            )
        return await self.backend.live_info(name)

    # ---- jobs ----

    async def create(
        self, principal: Principal, spec: JobSpec, *, submit: bool, idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Create (and submit) a job; see :meth:`~.creates.JobCreator.create`."""
        return await self.creator.create(principal, spec, submit=submit, idempotency_key=idempotency_key)

    async def start(self, principal: Principal, jobid: str) -> Job:
        async with self.locks(jobid):
            owner, files = await in_thread(self._claim_start_sync, principal, jobid)
            after = await self.submitter.run_claimed(jobid, files.spec.backend, after=bool(files.spec.after))
        return job_view(jobid, owner, after or files)

    def _claim_start_sync(self, principal: Principal, jobid: str) -> tuple[str, jobdir.JobFiles]:
        """The job read once, and its start claimed; 409 if it cannot start now."""
        owner, files = self.records.owned_files(principal, jobid, Action.write)
        state, jobndx = files.state
        if not can_start(state):
            raise ApiError(
                ProblemCode.conflict,
                f"job {jobid} is {state.value}; cancel it or wait for it to end before starting it again",
                jobid=jobid,
                state=state.value,
            )
        if not self.store.claim_start(jobid, jobndx):
            raise ApiError(
                ProblemCode.conflict,
                f"job {jobid} is being started by another request",
                jobid=jobid,
                state=state.value,
            )
        return owner, files

    async def get(self, principal: Principal, jobid: str) -> Job:
        return await in_thread(self._get_sync, principal, jobid)

    async def get_many(self, principal: Principal, jobids: Sequence[str]) -> list[Job]:
        """:meth:`get` of each job, in one worker-thread trip."""
        return await in_thread(lambda: [self._get_sync(principal, j) for j in jobids])

    def _get_sync(self, principal: Principal, jobid: str) -> Job:
        owner, files = self.records.owned_files(principal, jobid, Action.read)
        return job_view(jobid, owner, files)

    async def status(self, principal: Principal, jobid: str) -> JobStatus:
        return await in_thread(self._status_sync, principal, jobid)

    def _status_sync(self, principal: Principal, jobid: str) -> JobStatus:
        row = self.access.owned(principal, jobid, Action.read)
        return JobStatus(jobid=jobid, state=row.state, jobndx=row.jobndx, updated=utc(row.updated))

    async def list(
        self,
        principal: Principal,
        *,
        states: list[JobState],
        backend: str | None,
        name: str | None,
        ids: list[str],
        limit: int,
        cursor: str | None,
        full: bool = False,
        labels: Sequence[tuple[str, str]] = (),
        group: str | None = None,
    ) -> Page[JobSummary] | Page[Job | JobSummary]:
        """One page of the caller's jobs (see :meth:`.store.JobStore.list`); ``full``:
        each as ``GET /v1/jobs/{id}`` has it (spec and history: its directory read, in
        the same worker-thread trip for the whole page), or as the summary where the
        directory cannot be read."""
        if principal.jobs is not None:
            ids = [i for i in ids if i in principal.jobs] if ids else sorted(principal.jobs)
            if not ids:
                return Page[JobSummary](items=[], next_cursor=None)
        try:
            rows, next_cursor = await in_thread(
                self.store.list,
                principal.user,
                states=states,
                backend=backend,
                name=name,
                ids=ids,
                limit=limit,
                cursor=cursor,
                labels=labels,
                group=group,
            )
        except BadCursor as e:
            raise ApiError(
                ProblemCode.validation_error,
                f"query parameter 'cursor': {e}",
                errors=[field_error(["query", "cursor"], str(e))],
            ) from None
        if full:
            items = await in_thread(self._full_views, rows)
            return Page[Job | JobSummary](items=items, next_cursor=next_cursor)
        return Page[JobSummary](items=[r.summary() for r in rows], next_cursor=next_cursor)

    def _full_views(self, rows: Sequence[JobRow]) -> Sequence[Job | JobSummary]:
        def view(row: JobRow) -> Job | JobSummary:
            files = self.records.refresh(row.jobid)
            return row.summary() if files is None else job_view(row.jobid, row.owner, files)

        return [view(row) for row in rows]

    async def cancel(self, principal: Principal, jobid: str) -> Job:
        """Cancel a job that is not final; a final job stays as it was (idempotent)."""
        async with self.locks(jobid):
            try:
                owner, files = await in_thread(self.records.owned_files, principal, jobid, Action.write)
            except JobFilesInvalid as e:  # what cancel can do without its files: end it
                raise JobFilesInvalid(e.invalid, await self.submitter.fail_invalid(e.invalid)) from None
            # A Slurm job's own end row does not stop a cancel while Slurm still runs it.
            if can_cancel(files.state[0]) or await self.backend.still_scheduled(files):
                try:
                    await self.backend.cancel(jobid)
                except JobFileInvalid as e:  # made unwritable, or swapped since the read
                    raise JobFilesInvalid(e, await self.submitter.fail_invalid(e, files.history)) from None
                except CancelUnavailable as e:
                    raise ApiError(
                        ProblemCode.backend_unavailable,
                        f"job {jobid} was not canceled (its backend cannot be reached: {e.reason}); "
                        "it may still run: cancel it again once the backend is back",
                        jobid=jobid,
                    ) from e
                after = await in_thread(self.records.refresh, jobid)
                files = after or files
                self.watcher.poke(jobid)
                if files.state[0].is_final:  # the jobs waiting for it: at once, not at the watcher's look
                    self.submitter.parents_ended([jobid])
        return job_view(jobid, owner, files)

    async def record_report(self, jobid: str, jobndx: int, state: JobState, info: str) -> bool:
        """Record a state a job's (signed, checked) callback reports: appended to its
        status.csv unless that run already has it (psik wrote it: a local job), as psik
        records a remote backend's reports; then the index, and the watcher is woken.
        False if it is stale or foreign: a state of a run never submitted, or one that
        has already ended otherwise or been followed by another (a state never goes
        back), or of a job purged meanwhile."""
        try:
            recorded = await in_thread(self._record_report_sync, jobid, jobndx, state, info)
        except FileNotFoundError:
            return False  # purged between the signature check and now
        except JobFileInvalid:
            return False  # the job broke its status.csv: nothing can be recorded there
        if recorded:
            self.watcher.poke(jobid)
        return recorded

    def _record_report_sync(self, jobid: str, jobndx: int, state: JobState, info: str) -> bool:
        base = self.backend.path(jobid)
        # Never a plain open: a FIFO there (the job's doing) would hold it for ever.
        fd = jobdir.open_job_file(base, "status.csv", jobdir.MAX_STATUS, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # psik's WriteLock: its own appends wait
            history = jobdir.read_history(base)
            submitted = [r for r in history if r.jobndx == jobndx and r.state is JobState.queued]
            if (jobndx == 0 and state is not JobState.canceled) or (
                jobndx > 0 and not any(not is_slot_wait(r.info) for r in submitted)
            ):
                # A run never submitted (or still waiting for a job slot): psik writes a
                # run's `queued` row before its first report can arrive (under this same
                # lock), so this is no report of psik's. Run 0 is only ever canceled.
                return False
            if any(
                r.jobndx > jobndx or (r.jobndx == jobndx and r.state.is_final and r.state is not state)
                for r in history
            ):
                return False
            if not any(r.jobndx == jobndx and r.state is state for r in history):
                f.write(f"{self.clock()},{jobndx},{state.value},{one_line(info)}\n")
        self.records.refresh(jobid)
        return True

    async def purge(self, principal: Principal, jobid: str) -> None:
        """Remove a final job and its directory (a job whose directory is already gone:
        its index row)."""
        async with self.locks(jobid):
            try:
                has_directory = await in_thread(self._purgeable_sync, principal, jobid)
            except JobFilesInvalid as e:  # failed (and ended) as it is: nothing more to lose
                await self.submitter.fail_invalid(e.invalid)
                has_directory = True
            self.watcher.forget(jobid)
            self.submitter.slots.forget(jobid)  # it waited for a slot: no longer
            if has_directory:
                await self.backend.remove(jobid)
            await in_thread(self.store.delete, jobid)

    def _purgeable_sync(self, principal: Principal, jobid: str) -> bool:
        """Whether a purge has a directory to remove (False: only the index row is
        left); a 409 unless the job is final and nobody is starting it."""
        row = self.access.owned(principal, jobid, Action.write)
        if not os.path.lexists(self.backend.path(jobid)):
            return False
        try:
            files = self.records.refresh(jobid, invalid=True)
        except JobFileInvalid as e:
            raise JobFilesInvalid(e) from None
        if files is None:
            # Unreadable is not final: the job may still run, and purging would lose it.
            raise ApiError(
                ProblemCode.conflict,
                f"job {jobid}'s state cannot be read from its directory; not purging it",
                jobid=jobid,
                state=row.state.value,
            )
        state = files.state[0]
        if not state.is_final:
            raise ApiError(
                ProblemCode.conflict,
                f"job {jobid} is {state.value}; cancel it before purging it",
                jobid=jobid,
                state=state.value,
            )
        if self.store.claimed(jobid):
            raise ApiError(
                ProblemCode.conflict, f"job {jobid} is being started", jobid=jobid, state=state.value
            )
        return True
