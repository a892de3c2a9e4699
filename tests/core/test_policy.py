"""The default policy as a table: who may do what to whose job (core, pure)."""

from __future__ import annotations

import pytest

from psik_api_core import OwnerPolicy, Principal
from psik_api_core.authz import Action

ALICE = Principal("uid:alice")
BOB = Principal("uid:bob")
ALICE_RO = Principal("uid:alice", read_only=True)
ALICE_JOB1 = Principal("uid:alice", jobs=frozenset({"1.1"}))
ALICE_NONE = Principal("uid:alice", jobs=frozenset())

R, W, C = Action.read, Action.write, Action.create

CASES = [
    # principal, action, owner, jobid, allowed
    (ALICE, R, "uid:alice", "1.1", True),
    (ALICE, W, "uid:alice", "1.1", True),
    (BOB, R, "uid:alice", "1.1", False),
    (BOB, W, "uid:alice", "1.1", False),
    (ALICE, R, None, "1.1", False),  # a job with no recorded owner is nobody's
    (ALICE, C, None, None, True),
    (ALICE, R, None, None, True),  # listing (filtered to the caller's own jobs)
    (BOB, C, None, None, True),
    (ALICE_RO, R, "uid:alice", "1.1", True),
    (ALICE_RO, W, "uid:alice", "1.1", False),
    (ALICE_RO, C, None, None, False),
    (ALICE_JOB1, R, "uid:alice", "1.1", True),
    (ALICE_JOB1, W, "uid:alice", "1.1", True),
    (ALICE_JOB1, R, "uid:alice", "1.2", False),
    (ALICE_JOB1, C, None, None, False),
    (ALICE_JOB1, R, "uid:bob", "1.1", False),  # a job list does not widen the owner
    (ALICE_NONE, R, "uid:alice", "1.1", False),
    (Principal("uid:alice", read_only=True, jobs=frozenset({"1.1"})), W, "uid:alice", "1.1", False),
    (Principal("cn:alice"), R, "uid:alice", "1.1", False),  # names are compared whole
]


@pytest.mark.parametrize(("who", "action", "owner", "jobid", "allowed"), CASES)
def test_owner_policy(
    who: Principal, action: Action, owner: str | None, jobid: str | None, allowed: bool
) -> None:
    assert OwnerPolicy().allows(who, action, owner, jobid) is allowed
