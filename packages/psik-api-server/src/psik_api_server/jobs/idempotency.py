"""Idempotency-Keys: :class:`IdempotencyKeys`, what :class:`~.creates.JobCreator` does a
keyed request's bookkeeping with.

A key is claimed first, linked to its job in the same transaction as the job's index
row (before any submit), and settled only once the answer is ready. A replay finds the
job from the link on; while the first request still runs (this process knows which do)
it is told to retry; a replay of a submit whose job is still ``new`` (its request
stopped short) submits it. A request that made no job frees its key for a retry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable

from psik_api_core import JobSpec, ProblemCode, field_error

from ..aio import in_thread
from ..errors import ApiError
from .diskfull import DiskFull, is_disk_full
from .store import IdempotencyRecord, JobStore

#: An Idempotency-Key claimed this long ago, by a request that is not one of this
#: server's (its claims are released at start-up, but the index may be shared), no
#: longer blocks retries.
STALE_CLAIM_SECONDS = 300.0


def body_hash(spec: JobSpec, submit: bool) -> str:
    doc = spec.model_dump(mode="json", exclude_none=False)
    doc["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    doc["__submit"] = submit
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class IdempotencyKeys:
    """The keys of create requests: claimed, linked, settled or released (see the
    module); and which of them this process is handling now."""

    def __init__(self, store: JobStore, disk: DiskFull, clock: Callable[[], float]) -> None:
        self.store = store
        self.disk = disk
        self.clock = clock
        # (owner, key) of the keyed requests this process is handling now: a replay of
        # one of them is told to retry; any other unanswered key was abandoned.
        self._inflight: set[tuple[str, str]] = set()

    def claim(self, owner: str, key: str, digest: str, submit: bool, fingerprint: str) -> str | None:
        """Claim ``key`` for this request and count it in flight (None); or the job an
        earlier request with ``key`` made. A 422 if that request had another body
        (``digest``), a 409 while it is still being handled. Blocking."""
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

    def answered(self, owner: str, key: str) -> None:
        """The request with ``key`` is no longer being handled here."""
        self._inflight.discard((owner, key))

    def settle(self, owner: str, key: str, jobid: str) -> None:
        """The request's answer is ready: a full disk leaves it linked, unsettled (a replay
        answers with this job, start-up settles it). Blocking."""
        try:
            self.store.settle_key(owner, key, jobid)
        except (sqlite3.Error, OSError) as e:
            if not is_disk_full(e):
                raise
            self.disk.note(e)

    async def release(self, owner: str, key: str) -> None:
        """``release_key``; a failure (a full index) is logged: the claim then blocks
        the key until it is stale (``STALE_CLAIM_SECONDS``) or the server restarts."""
        try:
            await in_thread(self.store.release_key, owner, key)
        except (sqlite3.Error, OSError) as e:
            self.disk.write_failed(e, f"freeing the Idempotency-Key of a request that made no job ({owner})")
