"""Dependencies (``JobSpec.after``): a job that starts only once other jobs ended as it says.

A job submitted with ``after`` passes this gate before it is launched
(:meth:`DependencyGate.hold`, called by the :class:`~.submitter.Submitter` under the
job's lock): if every parent already ended as needed, it starts as any job does
(through the job slots); if one no longer can (an ``ok`` parent failed or was
canceled, a ``failed`` one completed, a parent gone), it ends ``canceled`` with the
reason in its history; otherwise it waits, ``queued`` with a dependency-wait row
(:data:`psik_api_core.states.DEPENDENCY_WAIT_INFO`) in its status.csv, nothing
launched and no job slot held.

What a job waits for is kept twice, as its labels are: ``.psik-api-after`` in its
directory (written before it is indexed) and the index's ``job_deps`` (written in its
indexing transaction). A condition is read off the parent's state in the index. When a
parent is recorded final (the watcher's changes, a cancel, a job that broke its files),
the submitter asks about its waiting children (:meth:`DependencyGate.reconsider`) and
starts those that may. Nothing is held only in memory: at start-up the waiting jobs are
found again from the index and their directories (:meth:`DependencyGate.found_waiting`)
and reconsidered, so a parent that ended while the server was down releases or
cancels them then.

On Slurm too the server holds the job itself rather than ``sbatch --dependency``: a
parent that failed must end its child ``canceled`` with a reason, never leave it
pending in Slurm for ever (``DependencyNeverSatisfied``), and a parent may be a job
of another backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from psik_api_core import Action, Dependency, JobState, Principal, ProblemCode, field_error
from psik_api_core.states import DEPENDENCY_WAIT_INFO, dependency_wait

from ..aio import in_thread
from ..errors import ApiError
from . import directory as jobdir

if TYPE_CHECKING:  # the store runs this module's SCHEMA: it imports this module
    from ..backends.psik_backend import PsikBackend
    from .access import JobAccess
    from .records import JobRecords
    from .store import JobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS job_deps (
    child     TEXT NOT NULL,
    parent    TEXT NOT NULL,
    condition TEXT NOT NULL, -- ok | failed | any (Dependency.condition)
    PRIMARY KEY (child, parent, condition)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_deps_by_parent ON job_deps (parent);
"""

#: What each condition needs its parent to have done, for a reason.
_NEEDS = {"ok": "complete", "failed": "fail", "any": "end"}
_ENDED = {JobState.completed: "completed", JobState.failed: "failed", JobState.canceled: "was canceled"}


def met(condition: str, state: JobState) -> bool:
    """Whether a parent in ``state`` meets ``condition``."""
    if condition == "ok":
        return state is JobState.completed
    if condition == "failed":
        return state is JobState.failed
    return state.is_final


@dataclass(frozen=True)
class Verdict:
    """What a job's dependencies say now: ``reason`` why it can never start (it is to be
    canceled), else ``waiting`` (``"<jobid> (<condition>)"`` of each parent it still
    waits for: none, it may start)."""

    waiting: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def met(self) -> bool:
        return self.reason is None and not self.waiting


def decide(owner: str, parents: Iterable[Sequence[object]]) -> Verdict:
    """The :class:`Verdict` of a job of ``owner`` from its ``(parent, condition, state,
    parent's owner)`` rows (state None: the parent is gone from the index). A parent of
    another owner (only a job that rewrote its ``.psik-api-after`` names one) counts as
    gone: nothing about another's job is ever told."""
    waiting: list[str] = []
    for parent, condition, state, parent_owner in parents:
        need = _NEEDS[str(condition)]
        if state is None or parent_owner != owner:
            return Verdict(reason=f"job {parent} no longer exists; this job needed it to {need}")
        ended = JobState(str(state))
        if not ended.is_final:
            waiting.append(f"{parent} ({condition})")
        elif not met(str(condition), ended):
            return Verdict(reason=f"job {parent} {_ENDED[ended]}; this job needed it to {need}")
    return Verdict(waiting=waiting)


def wait_info(waiting: Sequence[str]) -> str:
    """The dependency-wait row's info: what the job waits for."""
    return f"{DEPENDENCY_WAIT_INFO}: {', '.join(waiting)}"


def _refused(i: int, name: str, why: str) -> ApiError:
    return ApiError(
        ProblemCode.validation_error,
        f"after[{i}].{name}: {why}",
        errors=[field_error(["body", "after", i, name], why)],
    )


#: Parents asked about per query (SQLite's variable limit is far above).
_CHUNK = 500


class DependencyGate:
    """Decides, from the index, whether a job with ``after`` starts, waits or is
    canceled, and records what it decided in the job's status.csv (see the module)."""

    def __init__(self, store: JobStore, backend: PsikBackend, records: JobRecords, access: JobAccess) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.access = access

    # ---- at submit ----

    def check(self, principal: Principal, after: Sequence[Dependency]) -> None:
        """422 naming the entry unless every parent is a job of ``principal``'s (the same
        answer, by the same work, for a job that does not exist and another's) and is
        named by jobid (``index`` is for ``POST /v1/groups``). Blocking."""
        for i, dep in enumerate(after):
            if dep.jobid is None:
                raise _refused(
                    i, "index", "names a job of the same POST /v1/groups request; name it by jobid"
                )
            found, row = self.store.lookup(dep.jobid)
            readable = self.access.policy.allows(principal, Action.read, row.owner, dep.jobid)
            if not (found and readable and row.owner == principal.user):
                raise _refused(i, "jobid", f"no job {dep.jobid}")

    def record_sync(self, child: str, after: Sequence[Dependency]) -> None:
        """``child``'s dependencies in the index (in its indexing transaction). Blocking."""
        self.store.db.executemany(
            "INSERT OR IGNORE INTO job_deps (child, parent, condition) VALUES (?, ?, ?)",
            [(child, d.jobid, d.condition) for d in after if d.jobid is not None],
        )

    def verdict_sync(self, child: str) -> Verdict:
        """What ``child``'s dependencies say now, from the index. Blocking."""
        row = self.store.get(child)
        parents = self.store.db.execute(
            "SELECT d.parent, d.condition, j.state, j.owner FROM job_deps AS d "
            "LEFT JOIN jobs AS j ON j.jobid = d.parent WHERE d.child = ? ORDER BY d.parent, d.condition",
            (child,),
        )
        return decide("" if row is None else row.owner, parents)

    async def hold(self, jobid: str) -> bool:
        """At the submit of a job with ``after`` (its lock held): False if it may start
        now; True if it was held back instead, waiting (a dependency-wait row) or, as a
        condition can no longer be met, ``canceled``."""
        verdict = await in_thread(self.verdict_sync, jobid)
        if verdict.met:
            return False
        if verdict.reason is not None:
            await self.backend.record_canceled(jobid, None, verdict.reason)
        else:
            await self.backend.wait_for_slot(jobid, wait_info(verdict.waiting))
        await in_thread(self.records.refresh, jobid)
        return True

    # ---- when parents end ----

    def children_sync(self, parents: Sequence[str]) -> list[str]:
        """The jobs that named any of ``parents`` in their ``after``. Blocking."""
        found: dict[str, None] = {}
        for i in range(0, len(parents), _CHUNK):
            part = parents[i : i + _CHUNK]
            marks = ", ".join("?" * len(part))
            sql = f"SELECT DISTINCT child FROM job_deps WHERE parent IN ({marks})"  # noqa: S608 (placeholders only)
            cur = self.store.db.execute(sql, part)
            found.update((str(r[0]), None) for r in cur)
        return list(found)

    async def reconsider(self, jobid: str) -> tuple[Verdict, int, str] | None:
        """If ``jobid`` waits for its dependencies (its lock held), what they say now, with
        its run and backend: met, it may start that run; a ``reason``, it was recorded
        ``canceled`` here, saying why; else it waits on. None if it does not wait."""
        files = await in_thread(self.records.refresh, jobid, jobdir.read_job_settled)
        wait = None if files is None else dependency_wait(files.history)
        if files is None or wait is None:
            return None
        verdict = await in_thread(self.verdict_sync, jobid)
        if verdict.reason is not None:
            await self.backend.record_canceled(jobid, wait[0], verdict.reason)
            await in_thread(self.records.refresh, jobid)
        return verdict, wait[0], files.spec.backend

    # ---- at start-up ----

    def found_waiting(self, jobid: str, files: jobdir.JobFiles) -> bool:
        """At start-up, of a job read from its directory: whether it waits for its
        dependencies. If the index lost them (it was rebuilt), they are put back from
        its ``.psik-api-after``. Blocking."""
        if dependency_wait(files.history) is None:
            return False
        known = self.store.db.execute("SELECT 1 FROM job_deps WHERE child = ? LIMIT 1", (jobid,)).fetchone()
        if known is None:
            self.record_sync(jobid, files.spec.after)
        return True
