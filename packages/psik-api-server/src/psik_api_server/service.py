"""JobService: what the job routes do, independent of HTTP.

It ties the index (:class:`JobStore`), psik (:class:`PsikBackend`) and the
:class:`StatusWatcher` together, and enforces what psik does not: legal transitions
(no double start, a final job stays final), ownership, and idempotent creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

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
    derive_state,
    field_error,
    run_outcome,
    utc,
)

from .backend import PsikBackend, SubmitError
from .errors import ApiError
from .jobdir import JobFiles, Row, list_jobids, read_job
from .liveness import process_running
from .store import BadCursor, JobRow, JobStore
from .watcher import StatusWatcher

_logger = logging.getLogger(__name__)

#: An Idempotency-Key claimed this long ago by a request that never finished (a crashed
#: server) no longer blocks retries.
STALE_CLAIM_SECONDS = 300.0


def body_hash(spec: JobSpec, submit: bool) -> str:
    doc = spec.model_dump(mode="json", exclude_none=False)
    doc["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    doc["__submit"] = submit
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class JobService:
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
    ) -> None:
        self.store = store
        self.backend = backend
        self.policy = policy
        self.clock = clock
        self.import_owner = import_owner
        self.directory_roots = [Path(p).expanduser().resolve() for p in directory_roots]
        self.watcher = StatusWatcher(self._on_rows, interval=watch_interval)
        self.liveness_interval = liveness_interval
        self._liveness: asyncio.Task[None] | None = None
        # One lock per job being started/cancelled/purged; weak, so that locks of jobs
        # nobody is touching do not pile up in a long-running server.
        self._job_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ---- lifecycle ----

    def ensure_running(self) -> None:
        """Start the watcher on first use (ASGI transports without lifespan included)."""
        if not self.watcher.running:
            self.watcher.start()
            self.backend.warm_up()
            self._liveness = asyncio.get_running_loop().create_task(self._liveness_loop())

    async def aclose(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
            self._liveness = None
        await self.watcher.stop()
        await self.backend.aclose()

    async def _liveness_loop(self) -> None:
        while True:
            try:
                await self.check_liveness()
            except Exception:
                _logger.exception("liveness check")
            await asyncio.sleep(self.liveness_interval)

    async def check_liveness(self) -> list[str]:
        """Record ``failed`` for every non-final local job whose process is gone
        without a final row (see ``liveness``); returns their ids."""
        gone: list[str] = []
        for row in self.store.live():
            if not self.backend.is_local(row.backend) or row.jobndx == 0:
                continue
            pid = self._local_pid(row.jobid)
            if pid is None or process_running(*pid):
                continue
            async with self._lock(row.jobid):
                files = self._refresh(row.jobid)  # it may have just ended properly
                if files is None or files.state[0].is_final:
                    continue
                reason = (
                    f"process {pid[0]} ended without recording an end state "
                    "(killed, or the machine restarted)"
                )
                await self.backend.record_failure(row.jobid, files.state[1], reason)
                self._refresh(row.jobid)
                gone.append(row.jobid)
        return gone

    def _local_pid(self, jobid: str) -> tuple[int, float] | None:
        """The PID psik recorded for the current run of a local job, and when."""
        try:
            files = read_job(self.backend.path(jobid))
        except (OSError, ValueError):
            return None
        state, jobndx = files.state
        if state.is_final:
            return None
        queued = [r for r in files.history if r.jobndx == jobndx and r.state is JobState.queued]
        if not queued or not queued[-1].info.isdigit():
            return None
        return int(queued[-1].info), queued[-1].time

    def reconcile(self) -> dict[str, int]:
        """Bring the index in line with the prefix: import jobs made elsewhere (the psik
        CLI), drop rows of removed directories, refresh every non-final job's state, and
        follow the non-final ones. Reads only new and non-final jobs."""
        on_disk = list_jobids(self.backend.prefix)
        indexed = self.store.jobids()
        counts = {"imported": 0, "removed": 0, "refreshed": 0}
        for jobid in indexed - on_disk:
            self.store.delete(jobid)
            counts["removed"] += 1
        for jobid in sorted(on_disk - indexed):
            try:
                files = read_job(self.backend.path(jobid))
            except (OSError, ValueError) as e:
                _logger.warning("not importing %s: %s", jobid, e)
                continue
            self.store.put(self._row(files, self.import_owner))
            counts["imported"] += 1
        for row in self.store.live():
            try:
                files = read_job(self.backend.path(row.jobid))
            except (OSError, ValueError) as e:
                _logger.warning("cannot read live job %s: %s", row.jobid, e)
                continue
            state, jobndx = files.state
            if self.store.set_state(row.jobid, state, jobndx, files.updated):
                counts["refreshed"] += 1
            if not state.is_final:
                self.watcher.follow(row.jobid, self.backend.path(row.jobid) / "status.csv")
        return counts

    @staticmethod
    def _row(files: JobFiles, owner: str) -> JobRow:
        state, jobndx = files.state
        return JobRow(
            jobid=files.jobid,
            backend=files.spec.backend,
            owner=owner,
            name=files.spec.name,
            state=state,
            jobndx=jobndx,
            created=files.created,
            updated=files.updated,
        )

    async def _on_rows(self, jobid: str, rows: list[Row], new: list[Row]) -> None:
        state, jobndx = derive_state(rows)
        self.store.set_state(jobid, state, jobndx, max(r.time for r in rows))

    # ---- checks ----

    def _lock(self, jobid: str) -> asyncio.Lock:
        lock = self._job_locks.get(jobid)
        if lock is None:
            lock = self._job_locks[jobid] = asyncio.Lock()
        return lock

    def _owned(self, principal: Principal, jobid: str, action: Action) -> JobRow:
        """The job's row if ``principal`` may do ``action`` to it; 404 otherwise (a job
        that is not yours is indistinguishable from one that does not exist)."""
        row = self.store.get(jobid)
        if row is None or not self.policy.allows(principal, Action.read, row.owner, jobid):
            raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
        if not self.policy.allows(principal, action, row.owner, jobid):
            raise ApiError(ProblemCode.forbidden, f"not allowed to {action.value} job {jobid}")
        return row

    def _check_spec(self, spec: JobSpec) -> JobSpec:
        """``spec`` if this server can run it (with ``directory`` resolved), else a 4xx."""
        if spec.backend not in self.backend.settings:
            raise ApiError(
                ProblemCode.unknown_backend,
                f"no backend {spec.backend!r}; configured: " + ", ".join(sorted(self.backend.settings)),
                errors=[field_error(["body", "backend"], "not a configured backend")],
            )
        if not self.backend.usable(spec.backend):
            raise ApiError(
                ProblemCode.backend_unavailable,
                f"backend {spec.backend!r} is unavailable: {self.backend.health.get(spec.backend)}",
            )
        if spec.callback is not None:
            url = urlsplit(spec.callback)
            if url.scheme not in {"http", "https"} or not url.hostname:
                raise ApiError(
                    ProblemCode.validation_error,
                    f"callback {spec.callback[:100]!r} is not an absolute http(s) URL",
                    errors=[field_error(["body", "callback"], "must be an absolute http(s) URL")],
                )
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
        real = Path(directory).resolve()
        if not any(real == root or real.is_relative_to(root) for root in self.directory_roots):
            roots = ", ".join(str(r) for r in self.directory_roots) or "none configured"
            raise refuse(f"is outside the allowed directory roots ({roots})")
        if not real.is_dir():
            raise refuse("does not exist or is not a directory")
        return real

    # ---- operations ----

    def backends(self) -> list[BackendInfo]:
        """Every configured backend, with its health."""
        return [self.backend.info(name) for name in self.backend.settings]

    def backend_info(self, name: str) -> BackendInfo:
        """One configured backend; 404 naming the configured ones otherwise."""
        if name not in self.backend.settings:
            raise ApiError(
                ProblemCode.not_found,
                f"no backend {name!r}; configured: {', '.join(sorted(self.backend.settings))}",
            )
        return self.backend.info(name)

    async def create(
        self, principal: Principal, spec: JobSpec, *, submit: bool, idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Create (and submit) a job. Returns the job and whether it was made just now
        (False when an Idempotency-Key replays an earlier request)."""
        if not self.policy.allows(principal, Action.create, None, None):
            raise ApiError(ProblemCode.forbidden, "not allowed to create jobs")
        spec = self._check_spec(spec)
        if idempotency_key is None:
            return await self._create(principal, spec, submit), True

        digest = body_hash(spec, submit)
        now = self.clock()
        seen = self.store.claim_key(principal.user, idempotency_key, digest, now)
        if seen is not None and seen.jobid is None and now - seen.created > STALE_CLAIM_SECONDS:
            self.store.release_key(principal.user, idempotency_key)
            seen = self.store.claim_key(principal.user, idempotency_key, digest, now)
        if seen is not None:
            if seen.body_hash != digest:
                raise ApiError(
                    ProblemCode.idempotency_mismatch,
                    "this Idempotency-Key was used for a different request; use a new key",
                    errors=[field_error(["header", "Idempotency-Key"], "reused with another body")],
                )
            if seen.jobid is None:
                raise ApiError(
                    ProblemCode.idempotency_in_flight,
                    "a request with this Idempotency-Key is still being handled; retry shortly",
                    headers={"Retry-After": "1"},
                )
            return await self.get(principal, seen.jobid), False
        try:
            job = await self._create(principal, spec, submit, idempotency_key)
        except SubmitError:
            raise  # the job exists (failed) and the key is settled to it
        except BaseException:
            self.store.release_key(principal.user, idempotency_key)
            raise
        return job, True

    async def _create(self, principal: Principal, spec: JobSpec, submit: bool, key: str | None = None) -> Job:
        jobid = await self.backend.create(spec)
        files = read_job(self.backend.path(jobid))
        self.store.put(self._row(files, principal.user))
        if key is not None:
            self.store.settle_key(principal.user, key, jobid)
        if submit:
            async with self._lock(jobid):
                await self._submit(jobid)
        return await self.get(principal, jobid)

    async def _submit(self, jobid: str) -> None:
        """Submit and follow the job; callers answer with ``get``, which refreshes the index."""
        try:
            await self.backend.submit(jobid)
        except SubmitError as e:
            self._refresh(jobid)
            raise ApiError(
                ProblemCode.submit_failed, f"job {jobid} was not submitted: {e.reason}", jobid=jobid
            ) from e
        finally:
            self.ensure_running()
        self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")

    def _refresh(self, jobid: str) -> JobFiles | None:
        """Re-read a job's directory and update its index row."""
        try:
            files = read_job(self.backend.path(jobid))
        except (OSError, ValueError):
            return None
        state, jobndx = files.state
        self.store.set_state(jobid, state, jobndx, files.updated)
        return files

    async def start(self, principal: Principal, jobid: str) -> Job:
        self._owned(principal, jobid, Action.write)
        async with self._lock(jobid):
            files = self._refresh(jobid)
            if files is None:
                raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
            state, _ = files.state
            if not can_start(state):
                raise ApiError(
                    ProblemCode.conflict,
                    f"job {jobid} is {state.value}; cancel it or wait for it to end before starting it again",
                    jobid=jobid,
                    state=state.value,
                )
            await self._submit(jobid)
        return await self.get(principal, jobid)

    async def get(self, principal: Principal, jobid: str) -> Job:
        row = self._owned(principal, jobid, Action.read)
        files = self._refresh(jobid)
        if files is None:
            raise ApiError(ProblemCode.not_found, f"job {jobid} has no readable directory", jobid=jobid)
        state, jobndx = files.state
        native_id, exit_code = run_outcome(files.history)
        return Job(
            jobid=jobid,
            name=files.spec.name,
            backend=files.spec.backend,
            owner=row.owner,
            state=state,
            jobndx=jobndx,
            native_id=native_id,
            exit_code=exit_code,
            created=utc(files.created),
            updated=utc(files.updated),
            spec=files.spec,
            history=[r.transition() for r in sorted(files.history, key=lambda r: r.time)],
        )

    def status(self, principal: Principal, jobid: str) -> JobStatus:
        row = self._owned(principal, jobid, Action.read)
        return JobStatus(jobid=jobid, state=row.state, jobndx=row.jobndx, updated=utc(row.updated))

    def list(
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
            rows, next_cursor = self.store.list(
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
        self._owned(principal, jobid, Action.write)
        async with self._lock(jobid):
            files = self._refresh(jobid)
            if files is not None and can_cancel(files.state[0]):
                await self.backend.cancel(jobid)
                self._refresh(jobid)
                self.watcher.poke(jobid)
        return await self.get(principal, jobid)

    async def purge(self, principal: Principal, jobid: str) -> None:
        """Remove a final job and its directory."""
        self._owned(principal, jobid, Action.write)
        async with self._lock(jobid):
            files = self._refresh(jobid)
            if files is not None and not files.state[0].is_final:
                raise ApiError(
                    ProblemCode.conflict,
                    f"job {jobid} is {files.state[0].value}; cancel it before purging it",
                    jobid=jobid,
                    state=files.state[0].value,
                )
            self.watcher.forget(jobid)
            await self.backend.remove(jobid)
            self.store.delete(jobid)
