"""Groups: ``POST /v1/groups`` makes many jobs in one request, all or nothing.

A request is checked whole first: every spec (as a single submit checks it, its errors
named ``jobs[i]...``, or ``spec...`` for a sweep), and the ``after`` entries that name
the request's own jobs by ``index`` (in range, no cycle). Then, in steps that each
survive a crash (the groups table of the index):

1. the group's row is made, ``settled = 0`` (with the request's Idempotency-Key: a
   replay finds the group, a different body is 422, one in progress 409);
2. the members are made in dependency order, each ``new``, each the group's member
   from its own first index row (``jobs.grp``, and ``.psik-api-group`` in its directory);
   an ``index`` entry becomes the jobid of the member it names;
3. the group is settled: from here it is the answer, to this request and to replays;
4. every member is started (its dependencies decide when it runs), then ``started = 1``.

A server that dies before 3 left only ``new`` members that nobody was told of: start-up
removes them and the group's row, so a replay makes the group again, once. A server that
dies during 4 left a settled group: start-up starts the members still ``new``. So after
a restart a replay gives the same group and jobs, none twice, none lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psik_api_core import (
    Action,
    Group,
    GroupRequest,
    Job,
    JobSpec,
    JobState,
    JobSummary,
    Principal,
    ProblemCode,
    field_error,
)

from ..aio import in_thread
from ..errors import ApiError
from . import directory as jobdir
from .creates import MemberRefused
from .diskfull import PREFIX
from .store import JobRow, JobStore

if TYPE_CHECKING:
    from .service import JobService

_logger = logging.getLogger(__name__)

_SELECT = "SELECT id, owner, created, size, key, body_hash, settled, started FROM groups"


@dataclass(frozen=True)
class GroupRecord:
    id: str
    owner: str
    created: float
    size: int
    key: str | None
    body_hash: str | None
    settled: bool
    started: bool


def _record(r: Sequence[Any]) -> GroupRecord:
    return GroupRecord(str(r[0]), str(r[1]), float(r[2]), int(r[3]), r[4], r[5], bool(r[6]), bool(r[7]))


class GroupLog:
    """The groups table of a :class:`JobStore` (blocking, like the store)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def claim(
        self, gid: str, owner: str, created: float, size: int, key: str | None, body_hash: str
    ) -> GroupRecord | None:
        """Make the group's row (None), or the group an earlier request with ``key`` made."""
        with self.store.transaction():
            if key is not None:
                found = self.store.db.execute(
                    f"{_SELECT} WHERE owner = ? AND key = ?", (owner, key)
                ).fetchone()
                if found is not None:
                    return _record(found)
            self.store.db.execute(
                "INSERT INTO groups (id, owner, created, size, key, body_hash) VALUES (?, ?, ?, ?, ?, ?)",
                (gid, owner, created, size, key, body_hash),
            )
        return None

    def get(self, gid: str) -> GroupRecord | None:
        found = self.store.db.execute(f"{_SELECT} WHERE id = ?", (gid,)).fetchone()
        return None if found is None else _record(found)

    def mark(self, gid: str, column: str) -> None:
        assert column in ("settled", "started")
        self.store.db.execute(f"UPDATE groups SET {column} = 1 WHERE id = ?", (gid,))  # noqa: S608

    def delete(self, gid: str) -> None:
        self.store.db.execute("DELETE FROM groups WHERE id = ?", (gid,))

    def pending(self) -> list[GroupRecord]:
        """Groups a request did not see through (not settled, or not started)."""
        cur = self.store.db.execute(f"{_SELECT} WHERE settled = 0 OR started = 0")
        return [_record(r) for r in cur]

    def members(self, gid: str, owner: str) -> list[JobRow]:
        """The group's jobs in the order they were made (the request's order)."""
        rows: list[JobRow] = []
        cursor = None
        while True:
            page, cursor = self.store.list(owner, group=gid, limit=1000, cursor=cursor)
            rows += page
            if cursor is None:
                return rows[::-1]


def body_hash(request: GroupRequest) -> str:
    doc = request.model_dump(mode="json")
    for spec, dumped in zip(request.specs(), _dumped_specs(doc), strict=False):
        dumped["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _dumped_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["jobs"]) if doc.get("jobs") is not None else [doc["spec"]]


def _order(specs: Sequence[JobSpec], where: Callable[[int], list[str | int]]) -> list[int]:
    """The members in an order where every ``index`` entry comes after the job it names
    (422 naming the entry for one out of range, naming itself, or in a cycle)."""
    n = len(specs)
    needs: list[set[int]] = []
    for i, spec in enumerate(specs):
        parents = set()
        for j, dep in enumerate(spec.after):
            if dep.index is None:
                continue
            if not 0 <= dep.index < n or dep.index == i:
                why = "names this job itself" if dep.index == i else f"is no job of this request (0..{n - 1})"
                raise ApiError(
                    ProblemCode.validation_error,
                    f"{_loc_text(where(i))}.after[{j}].index {why}",
                    errors=[field_error(["body", *where(i), "after", j, "index"], why)],
                )
            parents.add(dep.index)
        needs.append(parents)
    order: list[int] = []
    done: set[int] = set()
    ready = [i for i in range(n) if not needs[i]]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, parents in enumerate(needs):
        for p in parents:
            children[p].append(i)
    waiting = [len(p) for p in needs]
    while ready:
        i = ready.pop(0)
        order.append(i)
        done.add(i)
        for c in children[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                ready.append(c)
    if len(order) < n:
        cycle = min(i for i in range(n) if i not in done)
        raise ApiError(
            ProblemCode.validation_error,
            f"{_loc_text(where(cycle))}.after is part of a cycle: these jobs would wait for each other",
            errors=[field_error(["body", *where(cycle), "after"], "part of a dependency cycle")],
        )
    return order


def _loc_text(loc: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))


def _rerooted(e: ApiError, prefix: list[str | int]) -> ApiError:
    """``e`` (a single spec's refusal, naming ``body...``) naming ``body.<prefix>...``."""
    if e.errors:
        for fe in e.errors:
            loc = list(fe.loc)
            if loc[:1] == ["body"]:
                fe.loc = ["body", *prefix, *loc[1:]]
    e.detail = f"{_loc_text(prefix)}: {e.detail}"
    e.args = (e.detail,)
    return e


class GroupService:
    """``POST``, ``GET`` and ``DELETE /v1/groups``, over the job service."""

    def __init__(self, service: JobService) -> None:
        self.service = service
        self.log = GroupLog(service.store)
        self._inflight: set[tuple[str, str]] = set()

    async def create(
        self, principal: Principal, request: GroupRequest, key: str | None
    ) -> tuple[Group, bool]:
        """Make the group (see the module doc); the group and whether it was made now."""
        service = self.service
        service.access.may_create(principal)
        specs = request.specs()
        sweep = request.jobs is None

        def where(i: int) -> list[str | int]:
            return ["spec"] if sweep else ["jobs", i]

        order = _order(specs, where)
        for i, spec in enumerate(specs):  # every spec as a single submit checks it, first
            try:
                await in_thread(service.specs.check, spec.model_copy(update={"after": []}))
            except ApiError as e:
                raise _rerooted(e, where(i)) from None
        owner = principal.user
        gid = secrets.token_hex(16)
        digest = body_hash(request)
        found = await in_thread(self.log.claim, gid, owner, service.clock(), len(specs), key, digest)
        if found is not None:
            return await self._replay(principal, found, digest), False
        if key is not None:
            self._inflight.add((owner, key))
        try:
            jobids = await self._make(principal, gid, specs, order, where)
            await in_thread(self.log.mark, gid, "settled")
        finally:
            if key is not None:
                self._inflight.discard((owner, key))
        await self._start(principal, gid, jobids)
        return await self._answer(principal, gid, jobids), True

    async def _make(
        self,
        principal: Principal,
        gid: str,
        specs: Sequence[JobSpec],
        order: Sequence[int],
        where: Callable[[int], list[str | int]],
    ) -> list[str]:
        """The members, made ``new`` in one go (:meth:`~.creates.JobCreator.create_members_sync`);
        all or nothing. A refusal of one names it (``jobs[i]...``)."""
        try:
            files = await in_thread(self.service.creator.create_members_sync, principal, specs, order, gid)
        except MemberRefused as e:
            await self._remove([], gid)
            raise _rerooted(e.error, where(e.index)) from None
        except BaseException:
            await self._remove([], gid)
            raise
        self.service.disk.cleared(PREFIX)
        return [f.jobid for f in files]

    async def _remove(self, jobids: Sequence[str], gid: str) -> None:
        """Remove members never started, and the group's row (nobody was told of them)."""
        import anyio

        with anyio.CancelScope(shield=True):
            for jobid in jobids:
                try:
                    await self.service.backend.remove(jobid)
                    await in_thread(self.service.store.delete, jobid)
                except Exception as e:
                    _logger.warning("group %s: cannot remove its member %s: %s", gid, jobid, e)
            await in_thread(self.log.delete, gid)

    async def _start(self, principal: Principal, gid: str, jobids: Sequence[str]) -> None:
        """Start every member still ``new``, in order (their start claims taken in one
        worker-thread trip; :meth:`~.submitter.Submitter.start_claimed_many`); then the
        group is started. A member's own failure to start is in its history."""
        store = self.service.store
        prefix = self.service.backend

        def claim() -> list[tuple[str, str, bool]]:
            claimed = []
            for jobid in jobids:
                row = store.get(jobid)
                if row is None or row.owner != principal.user or row.state is not JobState.new:
                    continue
                if row.jobndx == 0 and store.claim_start(jobid, 0):
                    claimed.append((jobid, row.backend, bool(jobdir.read_after(prefix.path(jobid)))))
            return claimed

        await self.service.submitter.start_claimed_many(await in_thread(claim))
        await in_thread(self.log.mark, gid, "started")

    async def _replay(self, principal: Principal, found: GroupRecord, digest: str) -> Group:
        if found.body_hash != digest:
            raise ApiError(
                ProblemCode.idempotency_mismatch,
                "this Idempotency-Key was used for a different request; use a new key",
                errors=[field_error(["header", "Idempotency-Key"], "reused with another body")],
            )
        if not found.settled or (found.owner, found.key or "") in self._inflight:
            raise ApiError(
                ProblemCode.idempotency_in_flight,
                "a request with this Idempotency-Key is still being handled; retry shortly",
                headers={"Retry-After": "1"},
            )
        members = await in_thread(self.log.members, found.id, found.owner)
        if not found.started:
            await self._start(principal, found.id, [m.jobid for m in members])
        return await self._answer(principal, found.id, [m.jobid for m in members])

    async def _answer(self, principal: Principal, gid: str, jobids: Sequence[str]) -> Group:
        jobs: list[Job | JobSummary] = list(await self.service.get_many(principal, jobids))
        return Group(group=gid, jobs=jobs)

    def _owned(self, principal: Principal, gid: str) -> GroupRecord:
        found = self.log.get(gid)
        if (
            found is None
            or not found.settled
            or not self.service.policy.allows(principal, Action.read, found.owner, None)
            or found.owner != principal.user
        ):
            raise ApiError(ProblemCode.not_found, f"no group {gid}", group=gid)
        return found

    async def get(self, principal: Principal, gid: str) -> Group:
        """The group: its members (summaries, in order) and how many are in each state."""
        found = await in_thread(self._owned, principal, gid)
        members = await in_thread(self.log.members, gid, found.owner)
        if principal.jobs is not None:
            members = [m for m in members if m.jobid in principal.jobs]
        states: dict[JobState, int] = {}
        for m in members:
            states[m.state] = states.get(m.state, 0) + 1
        return Group(group=gid, jobs=[m.summary() for m in members], states=states)

    async def cancel(self, principal: Principal, gid: str) -> Group:
        """Cancel every member that has not ended; the group as it then is."""
        found = await in_thread(self._owned, principal, gid)
        for member in await in_thread(self.log.members, gid, found.owner):
            if not member.state.is_final:
                try:
                    await self.service.cancel(principal, member.jobid)
                except ApiError as e:
                    _logger.info("group %s: member %s not canceled: %s", gid, member.jobid, e.detail)
        return await self.get(principal, gid)

    async def recover(self) -> None:
        """At start-up: the groups a request did not see through (see the module doc)."""
        for found in await in_thread(self.log.pending):
            members = await in_thread(self.log.members, found.id, found.owner)
            if not found.settled:
                _logger.warning(
                    "group %s: its request stopped before it was answered; removing its %d member(s)",
                    found.id,
                    len(members),
                )
                await self._remove([m.jobid for m in members], found.id)
            else:
                await self._start(Principal(found.owner), found.id, [m.jobid for m in members])
