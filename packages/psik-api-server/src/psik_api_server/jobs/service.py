"""JobService: what the job routes do, independent of HTTP.

It ties the index (:class:`JobStore`), psik (:class:`PsikBackend`) and the
:class:`StatusWatcher` together, and enforces what psik does not: legal transitions
(no double start, a final job stays final), ownership, and idempotent creation.

Never lose a job, never run one twice:

* a job is submitted only under a start claim taken in the index by one conditional
  UPDATE (``JobStore.claim_start``), so two starts never both run, even from two
  processes; a create-and-submit's job is born claimed;
* an Idempotency-Key is claimed first, linked to its job in the same transaction as the
  job's index row (before any submit), and settled only once the answer is ready. A
  replay finds the job from the link on; while the first request still runs (this
  process knows which do) it is told to retry; a replay of a submit whose job is still
  ``new`` (its request stopped short) submits it (:mod:`psik_api_server.jobs.idempotency`);
* at start-up (``reconcile``) what a dead server left is finished: a keyed
  create-and-submit whose job is still ``new`` is submitted, claims are released
  (:mod:`psik_api_server.jobs.recovery`).

Its life is the app's lifespan: :meth:`open` opens the index and psik, reconciles the
index with the job directories, and starts the watcher, the liveness loop and the
launcher; :meth:`aclose` stops them. Nothing here blocks the event loop: the index,
the job directories and ``/proc`` are read in worker threads, one hop per operation
(the ``_..._sync`` methods are what runs there), and psik does its own file I/O through
anyio's worker threads.

The parts: :mod:`psik_api_server.jobs.base` (collaborators, per-job steps, submitting and job
slots), :mod:`.idempotency`, :mod:`.recovery`; this module is the façade the routes
call.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import anyio.to_thread

from psik_api_core import (
    Action,
    BackendInfo,
    Job,
    JobSpec,
    JobState,
    JobStatus,
    JobSummary,
    Page,
    Principal,
    ProblemCode,
    can_cancel,
    can_start,
    field_error,
    http_url_problem,
    is_slot_wait,
    utc,
)

from ..aio import in_thread
from ..backends import AttributeRefused, CancelUnavailable
from ..backends.psik_backend import one_line
from ..errors import ApiError
from . import directory as jobdir
from .base import JobFilesInvalid
from .callbacks import CallbackRecord, split_spec
from .directory import JobFileInvalid
from .idempotency import STALE_CLAIM_SECONDS, IdempotentCreates, body_hash
from .recovery import Recovery
from .store import BadCursor

__all__ = ["STALE_CLAIM_SECONDS", "JobService", "body_hash", "in_thread"]


class JobService(Recovery, IdempotentCreates):
    """What the job routes do (see the module); built with its collaborators, see
    :class:`~psik_api_server.jobs.base.JobServiceBase`."""

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

    async def create(
        self, principal: Principal, spec: JobSpec, *, submit: bool, idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Create (and submit) a job. Returns the job and whether it was made just now
        (False when an Idempotency-Key replays an earlier request)."""
        if not self.policy.allows(principal, Action.create, None, None):
            raise ApiError(ProblemCode.forbidden, "not allowed to create jobs")
        key = idempotency_key
        spec, record, replay = await in_thread(self._prepare_sync, principal, spec, submit, key)
        if replay is not None:
            assert key is not None
            return await self._replay(principal, replay, submit, key), False
        try:
            return await self._create(principal, spec, record, submit, key), True
        finally:
            if key is not None:
                self._inflight.discard((principal.user, key))

    def _prepare_sync(
        self, principal: Principal, spec: JobSpec, submit: bool, key: str | None
    ) -> tuple[JobSpec, CallbackRecord | None, str | None]:
        """The checked spec as psik gets it, its callback record (see :mod:`psik_api_server.jobs.callbacks`),
        and the job an earlier request with ``key`` made (if any); claims ``key`` for
        this request otherwise (and counts it in flight)."""
        spec = self._check_spec(spec)
        digest = body_hash(spec, submit)  # of the request's spec: a replay has no new secret
        spec, record = split_spec(spec, self.callback_url)
        if key is None:
            return spec, record, None
        return (
            spec,
            record,
            self._claim_key_sync(principal.user, key, digest, submit, self._fingerprint(spec)),
        )

    def _fingerprint(self, spec: JobSpec) -> str:
        """``jobdir.fingerprint`` of the spec.json psik will write for ``spec``."""
        attributes = {**self.backend.settings[spec.backend].attributes, **spec.attributes}
        return jobdir.fingerprint(spec.model_copy(update={"attributes": attributes}))

    def _check_spec(self, spec: JobSpec) -> JobSpec:
        """``spec`` if this server can run it (with ``directory`` resolved), else a 4xx.
        Blocking: resolving ``directory`` touches the filesystem."""
        if spec.backend not in self.backend.settings:
            raise ApiError(
                ProblemCode.unknown_backend,
                f"no backend {spec.backend!r}; configured: " + ", ".join(sorted(self.backend.settings)),
                errors=[field_error(["body", "backend"], "not a configured backend")],
            )
        try:
            # Refused before anything is made or submitted (a Slurm backend: sbatch's allow-list).
            self.backend.check_attributes(spec.backend, spec.attributes)
        except AttributeRefused as e:
            raise ApiError(
                ProblemCode.validation_error,
                str(e),
                errors=[field_error(["body", "attributes", e.name], e.why)],
            ) from None
        if not self.backend.usable(spec.backend):
            raise ApiError(
                ProblemCode.backend_unavailable,
                f"backend {spec.backend!r} is unavailable: {self.backend.health.get(spec.backend)}",
            )
        if spec.callback is not None and (why := http_url_problem(spec.callback)) is not None:
            raise ApiError(
                ProblemCode.validation_error,
                f"callback {spec.callback[:100]!r} {why}",
                errors=[field_error(["body", "callback"], why)],
            )
        spec = self.spec_limits.check(spec)
        if spec.directory is not None:
            # The resolved path is what psik gets: a symlink swapped after this check
            # cannot point the job elsewhere.
            spec = spec.model_copy(update={"directory": str(self._check_directory(spec.directory))})
        return spec

    def _check_directory(self, directory: str) -> Path:
        def refuse(why: str) -> ApiError:
            return ApiError(
                ProblemCode.validation_error,
                f"directory {directory!r} {why}",
                errors=[field_error(["body", "directory"], why)],
            )

        if not os.path.isabs(directory):
            raise refuse("must be an absolute path")
        try:
            real = Path(directory).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop; NUL (the input check's)
            raise refuse("cannot be resolved (a symlink loop, or NUL)") from None
        if not any(real == root or real.is_relative_to(root) for root in self.directory_roots):
            roots = ", ".join(str(r) for r in self.directory_roots) or "none configured"
            raise refuse(f"is outside the allowed directory roots ({roots})")
        # The server's own directories, even where the roots reach them: the files
        # routes would serve (and write) other jobs' files, or the index and its journal.
        # A directory beside the index (inside its directory) holds none of its files.
        index_dir = Path(self.store.path).expanduser().resolve().parent
        if index_dir.is_relative_to(real):
            raise refuse(f"is or holds the directory of the server's job index ({index_dir})")
        prefix = Path(self.backend.prefix).resolve()
        if real.is_relative_to(prefix) or prefix.is_relative_to(real):
            raise refuse(f"is, holds or lies inside the server's job directories ({prefix})")
        if not real.is_dir():
            raise refuse("does not exist or is not a directory")
        return real

    async def start(self, principal: Principal, jobid: str) -> Job:
        async with self._lock(jobid):
            _, files = await in_thread(self._owned_files, principal, jobid, Action.write)
            state, jobndx = files.state
            if not can_start(state):
                raise ApiError(
                    ProblemCode.conflict,
                    f"job {jobid} is {state.value}; cancel it or wait for it to end before starting it again",
                    jobid=jobid,
                    state=state.value,
                )
            if not await in_thread(self.store.claim_start, jobid, jobndx):
                raise ApiError(
                    ProblemCode.conflict,
                    f"job {jobid} is being started by another request",
                    jobid=jobid,
                    state=state.value,
                )
            try:
                await self._submit(jobid)
            finally:
                with anyio.CancelScope(shield=True):
                    await in_thread(self._release_start_sync, jobid)
        return await self.get(principal, jobid)

    async def get(self, principal: Principal, jobid: str) -> Job:
        return await in_thread(self._get_sync, principal, jobid)

    async def status(self, principal: Principal, jobid: str) -> JobStatus:
        return await in_thread(self._status_sync, principal, jobid)

    def _status_sync(self, principal: Principal, jobid: str) -> JobStatus:
        row = self._owned(principal, jobid, Action.read)
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
    ) -> Page[JobSummary]:
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
            )
        except BadCursor as e:
            raise ApiError(
                ProblemCode.validation_error,
                f"query parameter 'cursor': {e}",
                errors=[field_error(["query", "cursor"], str(e))],
            ) from None
        return Page[JobSummary](items=[r.summary() for r in rows], next_cursor=next_cursor)

    async def cancel(self, principal: Principal, jobid: str) -> Job:
        """Cancel a job that is not final; a final job stays as it was (idempotent)."""
        async with self._lock(jobid):
            try:
                _, files = await in_thread(self._owned_files, principal, jobid, Action.write)
            except JobFilesInvalid as e:  # what cancel can do without its files: end it
                raise JobFilesInvalid(e.invalid, await self._fail_invalid(e.invalid)) from None
            # A Slurm job's own end row does not stop a cancel while Slurm still runs it.
            if can_cancel(files.state[0]) or await self.backend.still_scheduled(files):
                try:
                    await self.backend.cancel(jobid)
                except JobFileInvalid as e:  # made unwritable, or swapped since the read
                    raise JobFilesInvalid(e, await self._fail_invalid(e, files.history)) from None
                except CancelUnavailable as e:
                    raise ApiError(
                        ProblemCode.backend_unavailable,
                        f"job {jobid} was not canceled (its backend cannot be reached: {e.reason}); "
                        "it may still run: cancel it again once the backend is back",
                        jobid=jobid,
                    ) from e
                await in_thread(self._refresh, jobid)
                self.watcher.poke(jobid)
        return await self.get(principal, jobid)

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
        self._refresh(jobid)
        return True

    async def purge(self, principal: Principal, jobid: str) -> None:
        """Remove a final job and its directory (a job whose directory is already gone:
        its index row)."""
        async with self._lock(jobid):
            try:
                has_directory = await in_thread(self._purgeable_sync, principal, jobid)
            except JobFilesInvalid as e:  # failed (and ended) as it is: nothing more to lose
                await self._fail_invalid(e.invalid)
                has_directory = True
            self.watcher.forget(jobid)
            if has_directory:
                await self.backend.remove(jobid)
            await in_thread(self.store.delete, jobid)

    def _purgeable_sync(self, principal: Principal, jobid: str) -> bool:
        """Whether a purge has a directory to remove (False: only the index row is
        left); a 409 unless the job is final and nobody is starting it."""
        row = self._owned(principal, jobid, Action.write)
        if not os.path.lexists(self.backend.path(jobid)):
            return False
        try:
            files = self._refresh(jobid, invalid=True)
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
