"""Who may do what to a job: the default policy and the interface sites replace.

A :class:`Principal` is the authenticated caller; the policy decides from it, the
action and the job's owner. The default, :class:`OwnerPolicy`, lets only the owner act.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Action(StrEnum):
    read = "read"  # GET a job, its state, logs, files, events
    write = "write"  # start, cancel, purge, upload
    create = "create"  # make a new job


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``read_only`` and ``jobs`` narrow what it may touch
    (a delegated token); ``jobs=None`` means any job of the user."""

    user: str
    read_only: bool = False
    jobs: frozenset[str] | None = field(default=None)


#: The identity of every caller in ``authz: local`` mode.
LOCAL_USER = "local:psik_api"


class Policy(Protocol):
    def allows(self, principal: Principal, action: Action, owner: str | None, jobid: str | None) -> bool:
        """May ``principal`` do ``action`` to the job ``jobid`` owned by ``owner``?
        ``owner``/``jobid`` are None for actions on no particular job (create, list)."""
        ...


class OwnerPolicy:
    """Only a job's owner may act on it, within what the principal's token allows."""

    def allows(self, principal: Principal, action: Action, owner: str | None, jobid: str | None) -> bool:
        if principal.read_only and action is not Action.read:
            return False
        if jobid is None:
            # Listing is filtered to the principal's own jobs elsewhere; a token
            # narrowed to some jobs may not create new ones.
            return action is Action.read or principal.jobs is None
        if principal.jobs is not None and jobid not in principal.jobs:
            return False
        return owner == principal.user
