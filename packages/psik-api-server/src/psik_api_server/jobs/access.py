"""Who may do what to which job: the policy, asked about the job's index row."""

from __future__ import annotations

from psik_api_core import Action, Policy, Principal, ProblemCode

from ..errors import ApiError
from .store import JobRow, JobStore


class JobAccess:
    """The ownership checks every job route makes (blocking: one index query)."""

    def __init__(self, store: JobStore, policy: Policy) -> None:
        self.store = store
        self.policy = policy

    def may_create(self, principal: Principal) -> None:
        """403 unless ``principal`` may create jobs."""
        if not self.policy.allows(principal, Action.create, None, None):
            raise ApiError(ProblemCode.forbidden, "not allowed to create jobs")

    def check(self, principal: Principal, action: Action, owner: str, jobid: str) -> None:
        """:meth:`owned`'s answer about a job whose owner is known (no I/O)."""
        if not self.policy.allows(principal, Action.read, owner, jobid):
            raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
        if not self.policy.allows(principal, action, owner, jobid):
            raise ApiError(ProblemCode.forbidden, f"not allowed to {action.value} job {jobid}")

    def owned(self, principal: Principal, jobid: str, action: Action) -> JobRow:
        """The job's index row if ``principal`` may do ``action`` to it; 404 otherwise (a
        job that is not yours is indistinguishable from one that does not exist)."""
        # The same work whether the job is another's or does not exist (one query that
        # yields a row either way, the policy always asked): no timing tells them apart.
        found, row = self.store.lookup(jobid)
        readable = self.policy.allows(principal, Action.read, row.owner, jobid)
        if not (found and readable):
            raise ApiError(ProblemCode.not_found, f"no job {jobid}", jobid=jobid)
        if not self.policy.allows(principal, action, row.owner, jobid):
            raise ApiError(ProblemCode.forbidden, f"not allowed to {action.value} job {jobid}")
        return row
