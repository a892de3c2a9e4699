"""Idempotent creation: what :meth:`.service.JobService.create` does with an Idempotency-Key.

A key is claimed first, linked to its job in the same transaction as the job's index
row (before any submit), and settled only once the answer is ready. A replay finds the
job from the link on; while the first request still runs (this process knows which do)
it is told to retry; a replay of a submit whose job is still ``new`` (its request
stopped short) submits it. A request that made no job frees its key for a retry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3

import anyio.to_thread

from psik_api_core import Job, JobSpec, JobState, Principal, ProblemCode, field_error

from ..aio import in_thread
from ..backends import UNAVAILABLE_INFO
from ..errors import ApiError
from . import directory as jobdir
from .base import JobServiceBase, not_submitted
from .callbacks import CallbackRecord
from .diskfull import INDEX, PREFIX, is_disk_full
from .reconcile import index_row
from .store import IdempotencyRecord

#: An Idempotency-Key claimed this long ago, by a request that is not one of this
#: server's (its claims are released at start-up, but the index may be shared), no
#: longer blocks retries.
STALE_CLAIM_SECONDS = 300.0


def body_hash(spec: JobSpec, submit: bool) -> str:
    doc = spec.model_dump(mode="json", exclude_none=False)
    doc["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    doc["__submit"] = submit
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class IdempotentCreates(JobServiceBase):
    """Creating a job, with or without an Idempotency-Key (see the module)."""

    def _claim_key_sync(
        self, owner: str, key: str, digest: str, submit: bool, fingerprint: str
    ) -> str | None:
        """Claim ``key`` for this request and count it in flight (None); or the job an
        earlier request with ``key`` made. A 422 if that request had another body
        (``digest``), a 409 while it is still being handled."""
        mine = (owner, key)
        now = self.clock()

        def claim() -> IdempotencyRecord | None:
            return self.store.claim_key(owner, key, digest, now, submit=submit, fingerprint=fingerprint)

        seen = claim()
        if (
            seen is not None
            and seen.jobid is None
            and mine not in self._inflight
            and now - seen.created > STALE_CLAIM_SECONDS
        ):
            self.store.release_key(owner, key)
            seen = claim()
        if seen is None:
            self._inflight.add(mine)  # before the key is linked, so a replay sees it
            return None
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
        return seen.jobid

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
            raise not_submitted(jobid, why, True)
        return job
