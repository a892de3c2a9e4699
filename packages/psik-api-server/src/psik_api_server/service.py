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
  ``new`` (its request stopped short) submits it;
* at start-up (``reconcile``) what a dead server left is finished: a keyed
  create-and-submit whose job is still ``new`` is submitted, claims are released.

Its life is the app's lifespan: :meth:`open` opens the index and psik, reconciles the
index with the job directories, and starts the watcher, the liveness loop and the
launcher; :meth:`aclose` stops them. Nothing here blocks the event loop: the index,
the job directories and ``/proc`` are read in worker threads, one hop per operation
(the ``_..._sync`` methods are what runs there), and psik does its own file I/O through
anyio's worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

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
    Policy,
    Principal,
    ProblemCode,
    can_cancel,
    can_start,
    derive_state,
    field_error,
    is_slot_wait,
    run_outcome,
    slot_wait,
    utc,
)

from . import jobdir
from .backend import UNAVAILABLE_INFO, CancelUnavailable, PsikBackend, SubmitError, one_line
from .callbacks import CallbackRecord, CallbackRelay, split_spec
from .diskfull import INDEX, PREFIX, Creates, DiskFull, is_disk_full
from .errors import ApiError, StartupError
from .liveness import Vanished, vanished_jobs
from .reconcile import Reconciled, index_row, reconcile
from .slots import JobSlots
from .slurm_liveness import Ended, SlurmLiveness, slurm_jobs
from .speclimits import SpecLimits
from .store import BadCursor, CorruptIndex, IdempotencyRecord, JobRow, JobStore, OpenKey
from .watcher import Change, StatusWatcher

_logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: An Idempotency-Key claimed this long ago, by a request that is not one of this
#: server's (its claims are released at start-up, but the index may be shared), no
#: longer blocks retries.
STALE_CLAIM_SECONDS = 300.0


def _not_submitted(jobid: str, reason: str, unavailable: bool) -> ApiError:
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


def body_hash(spec: JobSpec, submit: bool) -> str:
    doc = spec.model_dump(mode="json", exclude_none=False)
    doc["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    doc["__submit"] = submit
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


async def in_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking ``fn`` in a worker thread (anyio's pool, bounded)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


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
        callback_url: str | None = None,
        spec_limits: SpecLimits | None = None,
    ) -> None:
        """Only remembers its collaborators: :meth:`start` does the work.
        ``callback_url``: every job reports to it (see :mod:`.callbacks`);
        ``spec_limits``: what a spec may ask for (token mode, :mod:`.speclimits`)."""
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
        self.watcher = StatusWatcher(self._on_changes, interval=watch_interval)
        self.liveness_interval = liveness_interval
        self._liveness: asyncio.Task[None] | None = None
        self._slurm_liveness = SlurmLiveness()
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

    # ---- lifecycle (the app's lifespan) ----

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
        self.backend.warm_up()
        for backend, jobid, since in await in_thread(self._waiting_sync):
            self.slots.wait(backend, jobid, since)
        await self._resume(done.pending)
        self._fill_slots()
        self._liveness = asyncio.get_running_loop().create_task(self._liveness_loop(), name="liveness")

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

    async def aclose(self) -> None:
        """Stop the liveness loop, the watcher and the launcher; close the index."""
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
        """Record ``failed`` for every non-final local job whose process is gone
        without a final row (see ``liveness``), and every Slurm job Slurm has ended or
        forgotten without one (see ``slurm_liveness``); returns their ids."""
        local = {name for name in self.backend.settings if self.backend.is_local(name)}
        gone: list[str] = []
        found: list[Vanished | Ended] = []
        found += await in_thread(vanished_jobs, self.store, self.backend.prefix, local)
        scheduled = {
            n for n, c in self.backend.settings.items() if c.type == "slurm" and self.backend.usable(n)
        }
        if scheduled:
            jobs = await in_thread(slurm_jobs, self.store, self.backend.prefix, scheduled)
            found += await self._slurm_liveness.check(jobs)
        for job in found:
            async with self._lock(job.jobid):
                files = await in_thread(self._refresh, job.jobid)  # it may have just ended properly
                if files is None or files.state[0].is_final:
                    continue
                await self.backend.record_failure(job.jobid, files.state[1], job.reason)
                await in_thread(self._refresh, job.jobid)
                gone.append(job.jobid)
        return gone

    async def _on_changes(self, changes: list[Change]) -> None:
        def states() -> Iterable[tuple[str, JobState, int, float]]:
            for c in changes:
                state, jobndx = derive_state(c.rows)
                yield c.jobid, state, jobndx, max(r.time for r in c.rows)

        try:
            changed = await in_thread(self.store.set_states, list(states()))
        except Exception as e:
            self.disk.note(e)  # a full disk is said once; the watcher keeps the changes, retries
            raise
        if changed:
            self.disk.cleared(INDEX)
        self._fill_slots()  # a job that ended frees its slot

    # ---- checks (blocking: called from the _sync methods) ----

    def _lock(self, jobid: str) -> asyncio.Lock:
        lock = self._job_locks.get(jobid)
        if lock is None:
            lock = self._job_locks[jobid] = asyncio.Lock()
        return lock

    def _owned(self, principal: Principal, jobid: str, action: Action) -> JobRow:
        """The job's index row if ``principal`` may do ``action`` to it; 404 otherwise (a
        job that is not yours is indistinguishable from one that does not exist)."""
        row = self.store.get(jobid)
        if row is None or not self.policy.allows(principal, Action.read, row.owner, jobid):
            raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
        if not self.policy.allows(principal, action, row.owner, jobid):
            raise ApiError(ProblemCode.forbidden, f"not allowed to {action.value} job {jobid}")
        return row

    def _refresh(
        self, jobid: str, read: Callable[[Path], jobdir.JobFiles] = jobdir.read_job, *, strict: bool = False
    ) -> jobdir.JobFiles | None:
        """Re-read a job's directory and update its index row. A failed update (a full
        disk) is said once and ignored, unless ``strict`` (a request that changes the
        job: it must not act on a stale row)."""
        try:
            files = read(self.backend.path(jobid))
        except (OSError, ValueError):
            return None
        state, jobndx = files.state
        try:
            if self.store.set_state(jobid, state, jobndx, files.updated):
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
        self.store.release_start(jobid, state, jobndx, files.updated)

    def _purgeable_sync(self, principal: Principal, jobid: str) -> bool:
        """Whether a purge has a directory to remove (False: only the index row is
        left); a 409 unless the job is final and nobody is starting it."""
        row = self._owned(principal, jobid, Action.write)
        if not os.path.lexists(self.backend.path(jobid)):
            return False
        files = self._refresh(jobid)
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

    def _owned_files(self, principal: Principal, jobid: str, action: Action) -> tuple[str, jobdir.JobFiles]:
        """``_owned`` and ``_refresh`` in one go; 404 if the directory is unreadable."""
        owner = self._owned(principal, jobid, action).owner
        files = self._refresh(jobid, strict=action is not Action.read)
        if files is None:
            raise ApiError(ProblemCode.not_found, f"job {jobid} has no readable directory", jobid=jobid)
        return owner, files

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

    # ---- operations ----

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
        """The checked spec as psik gets it, its callback record (see :mod:`.callbacks`),
        and the job an earlier request with ``key`` made (if any); claims ``key`` for
        this request otherwise (and counts it in flight)."""
        spec = self._check_spec(spec)
        digest = body_hash(spec, submit)  # of the request's spec: a replay has no new secret
        spec, record = split_spec(spec, self.callback_url)
        if key is None:
            return spec, record, None
        mine = (principal.user, key)
        now = self.clock()

        def claim() -> IdempotencyRecord | None:
            return self.store.claim_key(
                principal.user, key, digest, now, submit=submit, fingerprint=self._fingerprint(spec)
            )

        seen = claim()
        if (
            seen is not None
            and seen.jobid is None
            and mine not in self._inflight
            and now - seen.created > STALE_CLAIM_SECONDS
        ):
            self.store.release_key(principal.user, key)
            seen = claim()
        if seen is None:
            self._inflight.add(mine)  # before the key is linked, so a replay sees it
            return spec, record, None
        if seen.body_hash != digest:
            raise ApiError(
                ProblemCode.idempotency_mismatch,
                "this Idempotency-Key was used for a different request; use a new key",
                errors=[field_error(["header", "Idempotency-Key"], "reused with another body")],
            )
        if seen.jobid is None or mine in self._inflight:
            raise ApiError(
                ProblemCode.idempotency_in_flight,
                "a request with this Idempotency-Key is still being handled; retry shortly",
                headers={"Retry-After": "1"},
            )
        return spec, record, seen.jobid

    async def _create(
        self,
        principal: Principal,
        spec: JobSpec,
        record: CallbackRecord | None,
        submit: bool,
        key: str | None,
    ) -> Job:
        owner = principal.user
        try:
            # A create a full disk stopped leaves no directory (psik's is not atomic).
            async with self._creates.creating(self.backend.prefix, lambda j: self.store.get(j) is not None):
                jobid = await self.backend.create(spec, record)
        except BaseException as e:
            if key is not None:
                with anyio.CancelScope(shield=True):
                    await self._release_key(owner, key)
            if is_disk_full(e):
                raise self.disk.error(e, "create the job", made=True) from e
            raise
        self.disk.cleared(PREFIX)
        try:
            await in_thread(self._index_new_sync, owner, jobid, key, submit)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._forget_unindexed(owner, jobid, key)
            if is_disk_full(e):
                raise self.disk.error(e, "record the job in the index", made=True) from e
            raise
        self.disk.cleared(INDEX)
        if submit:
            try:
                async with self._lock(jobid):
                    try:
                        await self._submit(jobid)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await in_thread(self._release_start_sync, jobid)
            except ApiError:  # refused: the job is failed, and that is this request's answer
                if key is not None:
                    await in_thread(self.store.settle_key, owner, key, jobid)
                raise
            except Exception as e:
                if not is_disk_full(e):
                    raise
                with anyio.CancelScope(shield=True):
                    unmade = await in_thread(self._unmake_unsubmitted_sync, jobid)
                if unmade:
                    raise self.disk.error(e, "submit the job", made=True) from e
                self.disk.note(e)  # it was submitted all the same: that is the answer
        return await in_thread(self._answer_sync, principal, jobid, key)

    def _answer_sync(self, principal: Principal, jobid: str, key: str | None) -> Job:
        """The job, as the answer to a request with ``key``, which is settled with it."""
        job = self._get_sync(principal, jobid)
        if key is not None:
            try:
                self.store.settle_key(principal.user, key, jobid)
            except (sqlite3.Error, OSError) as e:
                if not is_disk_full(e):
                    raise
                # Left linked, unsettled: a replay answers with this job, start-up settles it.
                self.disk.note(e)
        return job

    def _index_new_sync(self, owner: str, jobid: str, key: str | None, submit: bool) -> None:
        """The job's row (its start claimed if this request submits it) and the key's
        link to it, in one step: from here a replay, or the next start-up, finds it."""
        base = self.backend.path(jobid)
        jobdir.write_owner(base, owner)
        files = jobdir.read_job(base)
        with self.store.transaction():
            self.store.put(index_row(files, owner), claim=submit)
            if key is not None:
                self.store.link_key(owner, key, jobid)

    async def _forget_unindexed(self, owner: str, jobid: str, key: str | None) -> None:
        """A job psik made that the index could not take: nobody can know it, so its
        directory goes and the key is free for a retry."""
        if await in_thread(self.store.get, jobid) is not None:
            return  # recorded after all (cancelled while the write finished)
        await self.backend.remove(jobid)
        if key is not None:
            await self._release_key(owner, key)

    async def _release_key(self, owner: str, key: str) -> None:
        """``release_key``; a failure (a full index) is logged: the claim then blocks
        the key until it is stale (``STALE_CLAIM_SECONDS``) or the server restarts."""
        try:
            await in_thread(self.store.release_key, owner, key)
        except (sqlite3.Error, OSError) as e:
            self.disk.write_failed(e, f"freeing the Idempotency-Key of a request that made no job ({owner})")

    def _unmake_unsubmitted_sync(self, jobid: str) -> bool:
        """After a submit a full disk stopped: remove the job (directory, index row, key
        link) if it never ran, so that a retry makes it afresh; False if it did run
        (psik recorded it ``queued``), and stays."""
        base = self.backend.path(jobid)
        try:
            files = jobdir.read_job_settled(base)
        except (OSError, ValueError):
            files = None
        if files is not None and files.state != (JobState.new, 0):
            return False
        # A process psik forked for it can record nothing either, so it never ran the
        # script (psik's first step, the ``active`` row, failed), and ends.
        shutil.rmtree(base, ignore_errors=True)
        try:
            self.store.delete(jobid)  # and the keys linked to it
        except (sqlite3.Error, OSError) as e:
            self.disk.write_failed(e, f"removing job {jobid} from the index (start-up drops it)")
        return True

    async def _replay(self, principal: Principal, jobid: str, submit: bool, key: str) -> Job:
        """The answer to a repeated keyed request: its job, submitted first if the
        request was to submit it and it is still ``new`` (the first request stopped
        between creating and submitting it)."""
        try:
            if submit:
                await self._submit_if_new(jobid)
        except ApiError:
            await in_thread(self.store.settle_key, principal.user, key, jobid)
            raise
        job = await in_thread(self._answer_sync, principal, jobid, key)
        why = job.history[-1].info if job.history else ""
        if submit and job.state is JobState.failed and why.startswith(UNAVAILABLE_INFO):
            # Its backend could not be reached: the same answer as the first time (a 503,
            # not the failed job as if it had run), until it is started again.
            raise _not_submitted(jobid, why, True)
        return job

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
        is recorded ``queued``, waiting for a slot, instead (see :mod:`.slots`)."""
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
            _, since = await self.backend.wait_for_slot(jobid, self.slots.why(backend))
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
            raise _not_submitted(jobid, e.reason, e.unavailable) from e
        self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
        await in_thread(self._refresh, jobid)

    # ---- job slots ----

    def _free_slots_sync(self, backend: str) -> int:
        return self.slots.free(backend, self.store.live())

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
            _, files = await in_thread(self._owned_files, principal, jobid, Action.write)
            if can_cancel(files.state[0]):
                try:
                    await self.backend.cancel(jobid)
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
        if recorded:
            self.watcher.poke(jobid)
        return recorded

    def _record_report_sync(self, jobid: str, jobndx: int, state: JobState, info: str) -> bool:
        base = self.backend.path(jobid)
        fd = os.open(base / "status.csv", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
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
            has_directory = await in_thread(self._purgeable_sync, principal, jobid)
            self.watcher.forget(jobid)
            if has_directory:
                await self.backend.remove(jobid)
            await in_thread(self.store.delete, jobid)
