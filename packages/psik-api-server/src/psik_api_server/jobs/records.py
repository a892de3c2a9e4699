"""The index kept up to date from the job directories, and a job's API view of them.

A request reads a job's directory once (a :class:`~.directory.JobFiles` snapshot),
records the state it found in the index (:meth:`JobRecords.record`) and answers from
that same snapshot (:func:`job_view`); a request that changed the job reads it once
more at its end.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from psik_api_core import Action, Job, JobState, Principal, ProblemCode, derive_state, run_outcome, utc

from ..aio import in_thread
from ..backends.psik_backend import PsikBackend
from ..errors import ApiError
from . import directory as jobdir
from .access import JobAccess
from .directory import JobFileInvalid, Row
from .diskfull import INDEX, DiskFull
from .store import JobStore
from .watcher import Change

if TYPE_CHECKING:
    from ..backends.local.runners import RunnerWatch


class JobFilesInvalid(ApiError):
    """The answer about a job that made one of its own bookkeeping files unreadable or
    unwritable (:class:`~.directory.JobFileInvalid`): 409 ``job_files_invalid`` naming
    the file. Its own problem: no other job is concerned."""

    def __init__(self, invalid: JobFileInvalid, done: str = "") -> None:
        super().__init__(
            ProblemCode.job_files_invalid,
            f"job {invalid.jobid}'s {invalid.name} {invalid.why}: the job changed its own bookkeeping, "
            f"so its state cannot be read or recorded{done}; purge it (DELETE with purge=true) to remove it",
            jobid=invalid.jobid,
            file=invalid.name,
        )
        self.invalid = invalid


def job_view(jobid: str, owner: str, files: jobdir.JobFiles) -> Job:
    """The API's :class:`Job` of ``jobid`` (owned by ``owner``) as ``files`` found it."""
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
        labels=files.spec.labels,
        group=files.group,
        history=[r.transition() for r in sorted(files.history, key=lambda r: r.time)],
    )


class JobRecords:
    """Reading job directories and recording what they say in the index (blocking
    methods: callers run them in a worker thread, one trip per step)."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        disk: DiskFull,
        access: JobAccess,
        runners: RunnerWatch | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.disk = disk
        self.access = access
        #: Local jobs recorded final whose runner still runs keep their slot until it
        #: exits (a job can write its own final row: :mod:`~..backends.local.runners`).
        self.runners = runners
        #: Told, for each new status row the watcher saw, the seconds from the row's own
        #: time to its change being in the index (the metrics' watcher lag).
        self.observe_lag: Callable[[float], None] = lambda seconds: None

    def _runner(
        self, jobid: str, backend: str | None, history: Sequence[Row], state: tuple[JobState, int]
    ) -> tuple[int, int, float] | None:
        """The still running runner of a local job whose history (``state``, derived from
        it) says it ended, if any (``backend`` None: read from the index)."""
        if self.runners is None or not state[0].is_final:
            return None
        if backend is None:
            row = self.store.get(jobid)
            backend = None if row is None else row.backend
        if backend is None or not self.backend.is_local(backend):
            return None
        if self.backend.settings[backend].slot_limit() is None:
            return None  # no job slots to hold
        return self.runners.running(history, state[1])

    def path(self, jobid: str) -> Path:
        return self.backend.path(jobid)

    def refresh(
        self,
        jobid: str,
        read: Callable[[Path], jobdir.JobFiles] = jobdir.read_job,
        *,
        strict: bool = False,
        invalid: bool = False,
    ) -> jobdir.JobFiles | None:
        """Re-read a job's directory and update its index row; None if it cannot be read
        (with ``invalid``, files the job made invalid raise :class:`JobFileInvalid`).
        A failed update (a full disk) is said once and ignored, unless ``strict`` (a
        request that changes the job: it must not act on a stale row)."""
        try:
            files = read(self.path(jobid))
        except JobFileInvalid:
            if invalid:
                raise
            return None
        except (OSError, ValueError):
            return None
        self.record(jobid, files, strict=strict)
        return files

    def record(self, jobid: str, files: jobdir.JobFiles, *, strict: bool = False) -> None:
        """Record the state ``files`` show in the index (see :meth:`refresh`)."""
        state, jobndx = files.state
        runner = self._runner(jobid, files.spec.backend, files.history, files.state)
        try:
            if self.store.set_state(
                jobid,
                state,
                jobndx,
                files.updated,
                exit_code=files.exit_code,
                rows=files.history,
                hold=runner is not None,
            ):
                self.disk.cleared(INDEX)
            if runner is not None and self.runners is not None:
                self.runners.hold(jobid, *runner)
        except (sqlite3.Error, OSError) as e:
            if strict:
                raise
            # A read must not need a write (the disk may be full): the answer comes from
            # the directory, and the watcher records the state once it can.
            self.disk.write_failed(e, f"recording job {jobid}'s state in the index")

    def owned_files(self, principal: Principal, jobid: str, action: Action) -> tuple[str, jobdir.JobFiles]:
        """The job's owner and its directory read once (recorded in the index), if
        ``principal`` may do ``action`` to it (see :meth:`.access.JobAccess.owned`); 404
        if the directory is unreadable, :class:`JobFilesInvalid` if the job
        made its files invalid."""
        owner = self.access.owned(principal, jobid, action).owner
        try:
            files = self.refresh(jobid, strict=action is not Action.read, invalid=True)
        except JobFileInvalid as e:
            raise JobFilesInvalid(e) from None
        if files is None:
            raise ApiError(ProblemCode.not_found, f"job {jobid} has no readable directory", jobid=jobid)
        return owner, files

    def release_start(self, jobid: str) -> jobdir.JobFiles | None:
        """Give back a start claim, with the state the start left: the one re-read at the
        end of a request that submitted the job, returned for its answer (None if the
        directory cannot be read)."""
        try:
            files = jobdir.read_job(self.path(jobid))
        except (OSError, ValueError):
            self.store.release_start(jobid)
            return None
        self.release_start_with(jobid, files.spec.backend, files.history, files.state)
        return files

    def release_start_with(
        self, jobid: str, backend: str, history: list[jobdir.Row], state: tuple[JobState, int] | None = None
    ) -> None:
        """:meth:`release_start` with the job's history as the caller has just read or
        written it (a group's members recorded waiting for a slot: no second read)."""
        state = derive_state(history) if state is None else state
        runner = self._runner(jobid, backend, history, state)
        updated = max((r.time for r in history), default=float(jobid))
        exit_code = run_outcome(history)[1]
        self.store.release_start(jobid, *state, updated, exit_code, history, hold=runner is not None)
        if runner is not None and self.runners is not None:
            self.runners.hold(jobid, *runner)

    def release_slot_unless_running(self, jobid: str) -> None:
        """After a launch that was cut short: give the job's slot back unless the job was
        submitted all the same (its directory says it is queued or active)."""
        try:
            state = jobdir.read_job(self.path(jobid)).state[0]
        except (OSError, ValueError):
            state = JobState.failed
        if state not in (JobState.queued, JobState.active):
            self.store.release_slot(jobid)

    async def record_changes(self, changes: list[Change]) -> None:
        """Record what the watcher saw in the index, in one transaction (a full disk: said
        once; the watcher keeps the changes and tries again)."""

        def record() -> int:
            states = []
            runners = {}
            for c in changes:
                state, jobndx = c.state()
                states.append(
                    (c.jobid, state, jobndx, max(r.time for r in c.rows), run_outcome(c.rows)[1], c.rows)
                )
                if (runner := self._runner(c.jobid, None, c.rows, (state, jobndx))) is not None:
                    runners[c.jobid] = runner
            changed = self.store.set_states(states, hold=set(runners))
            for jobid, runner in runners.items():  # once the hold is committed
                assert self.runners is not None
                self.runners.hold(jobid, *runner)
            return changed

        try:
            changed = await in_thread(record)
        except Exception as e:
            self.disk.note(e)
            raise
        if changed:
            self.disk.cleared(INDEX)
        now = time.time()  # the rows' clock: psik stamps them with the wall clock
        for c in changes:
            for r in c.new:
                self.observe_lag(max(0.0, now - r.time))
