"""Creating jobs, with or without an Idempotency-Key: :class:`JobCreator`.

One create-and-submit reads its job's directory twice: once as it indexes the new job
(taking its start claim, and a job slot where the backend has a limit, in that same
transaction), once as it gives the claim back; the answer is built from that second
read. Idempotency-Keys: see :mod:`.idempotency`.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Sequence

import anyio

from psik_api_core import Action, Dependency, Job, JobSpec, JobState, Principal

from ..aio import in_thread
from ..backends import UNAVAILABLE_INFO
from ..backends.psik_backend import PsikBackend
from ..errors import ApiError
from . import directory as jobdir
from .access import JobAccess
from .callbacks import CallbackRecord
from .diskfull import INDEX, PREFIX, Creates, DiskFull, is_disk_full
from .idempotency import IdempotencyKeys, body_hash
from .locks import JobLocks
from .reconcile import index_row
from .records import JobRecords, job_view
from .specs import SpecCheck
from .store import JobStore
from .submitter import Submitter, not_submitted


class MemberRefused(Exception):
    """The ``index``-th member of a group was refused, with ``error``: nothing was made."""

    def __init__(self, index: int, error: ApiError) -> None:
        super().__init__(error.detail)
        self.index = index
        self.error = error


class JobCreator:
    """``POST /v1/jobs`` and ``POST /v1/jobs/new`` (see the module)."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        access: JobAccess,
        records: JobRecords,
        specs: SpecCheck,
        keys: IdempotencyKeys,
        submitter: Submitter,
        locks: JobLocks,
        disk: DiskFull,
    ) -> None:
        self.store = store
        self.backend = backend
        self.access = access
        self.records = records
        self.specs = specs
        self.keys = keys
        self.submitter = submitter
        self.locks = locks
        self.disk = disk
        self._creates = Creates()

    async def create(
        self,
        principal: Principal,
        spec: JobSpec,
        *,
        submit: bool,
        idempotency_key: str | None,
        group: str | None = None,
    ) -> tuple[Job, bool]:
        """Create (and submit) a job. Returns the job and whether it was made just now
        (False when an Idempotency-Key replays an earlier request). ``group``: the
        job is that group's member from its first index row on (see :mod:`.groups`)."""
        self.access.may_create(principal)
        key = idempotency_key
        spec, record, replay = await in_thread(self._prepare_sync, principal, spec, submit, key)
        if replay is not None:
            assert key is not None
            return await self._replay(principal, replay, submit, key), False
        try:
            return await self._create(principal, spec, record, submit, key, group), True
        finally:
            if key is not None:
                self.keys.answered(principal.user, key)

    def _prepare_sync(
        self, principal: Principal, spec: JobSpec, submit: bool, key: str | None
    ) -> tuple[JobSpec, CallbackRecord | None, str | None]:
        """The checked spec as psik gets it, its callback record (see :mod:`.callbacks`),
        and the job an earlier request with ``key`` made (if any); claims ``key`` for
        this request otherwise (and counts it in flight)."""
        checked = self.specs.check(spec)
        if checked.after:  # every parent the caller's, before anything is made
            self.submitter.deps.check(principal, checked.after)
        digest = body_hash(checked, submit)  # of the request's spec: a replay has no new secret
        checked, record = self.specs.split(checked)
        if key is None:
            return checked, record, None
        return (
            checked,
            record,
            self.keys.claim(principal.user, key, digest, submit, self.specs.fingerprint(checked)),
        )

    async def _create(
        self,
        principal: Principal,
        spec: JobSpec,
        record: CallbackRecord | None,
        submit: bool,
        key: str | None,
        group: str | None = None,
    ) -> Job:
        owner = principal.user
        try:
            # A create a full disk stopped leaves no directory (psik's is not atomic).
            async with self._creates.creating(self.backend.prefix, lambda j: self.store.get(j) is not None):
                jobid = await self.backend.create(spec, record)
        except BaseException as e:
            if key is not None:
                with anyio.CancelScope(shield=True):
                    await self.keys.release(owner, key)
            if is_disk_full(e):
                raise self.disk.error(e, "create the job", made=True) from e
            raise
        self.disk.cleared(PREFIX)
        # A job with dependencies takes a slot only once they are met (.deps).
        limit = self.submitter.wants_slot(spec.backend) if submit and not spec.after else None
        try:
            files, slot = await in_thread(
                self._index_new_sync, owner, jobid, key, submit, limit, spec.labels, group, spec.after
            )
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._forget_unindexed(owner, jobid, key)
            if is_disk_full(e):
                raise self.disk.error(e, "record the job in the index", made=True) from e
            raise
        self.disk.cleared(INDEX)
        if submit:
            try:
                async with self.locks(jobid):
                    files = (
                        await self.submitter.run_claimed(jobid, spec.backend, slot, after=bool(spec.after))
                        or files
                    )
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
        self.access.check(principal, Action.read, owner, jobid)  # as a GET of it would
        if key is not None:
            await in_thread(self.keys.settle, owner, key, jobid)
        return job_view(jobid, owner, files)

    def _index_new_sync(
        self,
        owner: str,
        jobid: str,
        key: str | None,
        submit: bool,
        limit: int | None,
        labels: dict[str, str] | None = None,
        group: str | None = None,
        after: Sequence[Dependency] = (),
    ) -> tuple[jobdir.JobFiles, bool | None]:
        """The job's row (its start claimed if this request submits it, and a slot if
        ``limit``) and the key's link to it (and its dependencies), in one step: from here a replay, or the
        next start-up, finds it. Returns what was read of the job, and whether it got
        a slot (None: none was asked for)."""
        base = self.backend.path(jobid)
        jobdir.write_owner(base, owner)
        jobdir.write_labels(base, labels or {})
        jobdir.write_group(base, group)
        jobdir.write_after(base, list(after))
        files = jobdir.read_job(base)
        slot = None
        with self.store.transaction():
            row = index_row(files, owner)
            self.store.put(row, claim=submit, rows=files.history)
            if after:
                self.submitter.deps.record_sync(jobid, after)
            if limit is not None:
                slot = self.store.claim_slot(jobid, row.backend, limit)
            if key is not None:
                self.store.link_key(owner, key, jobid)
        return files, slot

    def create_members_sync(
        self, principal: Principal, specs: Sequence[JobSpec], order: Sequence[int], group: str
    ) -> list[jobdir.JobFiles]:
        """The members of ``group`` (:mod:`.groups`), made ``new`` in one go: in ``order``
        (every ``index`` entry of ``after`` after the job it names, whose jobid it becomes),
        each directory made and read, then every index row (and its dependencies) in one
        transaction. All or nothing: on any failure nothing made is left. Returns the
        members' files in the order of ``specs``. Blocking (one worker-thread trip)."""
        owner = principal.user
        made: dict[int, jobdir.JobFiles] = {}
        afters: dict[int, list[Dependency]] = {}
        try:
            for i in order:
                spec = specs[i]
                after = [
                    Dependency(jobid=made[d.index].jobid, condition=d.condition) if d.index is not None else d
                    for d in spec.after
                ]
                try:
                    named = [d for d in spec.after if d.index is None]
                    if named:
                        self.submitter.deps.check(principal, named)
                    checked, record = self.specs.split(
                        self.specs.check(spec.model_copy(update={"after": after}))
                    )
                except ApiError as e:
                    raise MemberRefused(i, e) from None
                jobid = self.backend.create_sync(checked, record)
                base = self.backend.path(jobid)
                jobdir.write_owner(base, owner, sync=False)
                jobdir.write_labels(base, checked.labels, sync=False)
                jobdir.write_group(base, group, sync=False)
                jobdir.write_after(base, after, sync=False)
                made[i] = jobdir.read_made(base, checked.labels, after, group)
                afters[i] = after
            # One flush for every member's records (each fsync'd alone, a third of the time).
            jobdir.sync_filesystem(self.backend.prefix)
            with self.store.transaction():
                for i, files in made.items():
                    self.store.put(index_row(files, owner), rows=files.history)
                    if afters[i]:
                        self.submitter.deps.record_sync(files.jobid, afters[i])
        except BaseException:
            for files in made.values():
                shutil.rmtree(self.backend.path(files.jobid), ignore_errors=True)
            raise
        return [made[i] for i in range(len(specs))]

    def _answer_sync(self, principal: Principal, jobid: str, key: str | None) -> Job:
        """The job read afresh, as the answer to a request with ``key``, which is
        settled with it (a replay, or a submit a full disk cut short)."""
        owner, files = self.records.owned_files(principal, jobid, Action.read)
        if key is not None:
            self.keys.settle(principal.user, key, jobid)
        return job_view(jobid, owner, files)

    async def _forget_unindexed(self, owner: str, jobid: str, key: str | None) -> None:
        """A job psik made that the index could not take: nobody can know it, so its
        directory goes and the key is free for a retry."""
        if await in_thread(self.store.get, jobid) is not None:
            return  # recorded after all (cancelled while the write finished)
        await self.backend.remove(jobid)
        if key is not None:
            await self.keys.release(owner, key)

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
                await self.submitter.submit_if_new(jobid)
        except ApiError:
            await in_thread(self.store.settle_key, principal.user, key, jobid)
            raise
        job = await in_thread(self._answer_sync, principal, jobid, key)
        why = job.history[-1].info if job.history else ""
        if submit and job.state is JobState.failed and why.startswith(UNAVAILABLE_INFO):
            # Its backend could not be reached: the same answer as the first time (a 503,
            # not the failed job as if it had run), until it is started again.
            raise not_submitted(jobid, why, True)
        return job
