"""The state machine and deriving a job's state from psik's rows, in any order."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from psik_api_core import TRANSITIONS, JobState, can_cancel, can_start, can_transition, derive_state

S = JobState


@dataclass
class R:
    time: float
    jobndx: int
    state: JobState


def test_final_states() -> None:
    assert {s for s in S if s.is_final} == {S.completed, S.failed, S.canceled}


def test_every_state_has_its_transitions_written_down() -> None:
    assert set(TRANSITIONS) == set(S)
    assert not can_transition(S.completed, S.canceled)  # a final job stays as it was
    assert not can_transition(S.active, S.queued)  # no double start
    assert can_transition(S.new, S.failed)  # a refused submission


@pytest.mark.parametrize(
    ("state", "start", "cancel"),
    [
        (S.new, True, True),
        (S.queued, False, True),
        (S.active, False, True),
        (S.completed, True, False),
        (S.failed, True, False),
        (S.canceled, True, False),
    ],
)
def test_start_and_cancel_rules(state: JobState, start: bool, cancel: bool) -> None:
    assert can_start(state) is start
    assert can_cancel(state) is cancel


def test_new_job() -> None:
    assert derive_state([R(1.0, 0, S.new)]) == (S.new, 0)
    assert derive_state([]) == (S.new, 0)


def test_normal_run_in_any_file_order() -> None:
    rows = [R(1.0, 0, S.new), R(2.0, 1, S.queued), R(2.1, 1, S.active), R(2.2, 1, S.completed)]
    for perm in itertools.permutations(rows):
        assert derive_state(perm) == (S.completed, 1)


def test_late_queued_row_never_reopens_a_finished_job() -> None:
    # Seen with psik: active and completed written before queued.
    rows = [R(1.0, 0, S.new), R(2.1, 1, S.active), R(2.2, 1, S.completed), R(2.0, 1, S.queued)]
    assert derive_state(rows) == (S.completed, 1)


def test_cancel_row_at_jobndx_zero_applies_to_current_run() -> None:
    rows = [R(1.0, 0, S.new), R(2.0, 1, S.queued), R(2.1, 1, S.active), R(3.0, 0, S.canceled)]
    assert derive_state(rows) == (S.canceled, 1)


def test_first_final_row_wins_when_cancel_races_completion() -> None:
    rows = [
        R(1.0, 0, S.new),
        R(2.0, 1, S.queued),
        R(2.1, 1, S.active),
        R(3.0, 0, S.canceled),
        R(3.1, 1, S.completed),
    ]
    assert derive_state(rows) == (S.canceled, 1)


def test_an_old_cancel_does_not_end_a_restarted_run() -> None:
    rows = [R(1.0, 0, S.new), R(2.0, 1, S.queued), R(3.0, 0, S.canceled), R(4.0, 2, S.queued)]
    assert derive_state(rows) == (S.queued, 2)
    assert derive_state([*rows, R(4.1, 2, S.active)]) == (S.active, 2)


def test_cancel_and_submit_failure_of_a_new_job() -> None:
    assert derive_state([R(1.0, 0, S.new), R(2.0, 0, S.canceled)]) == (S.canceled, 0)
    assert derive_state([R(1.0, 0, S.new), R(2.0, 1, S.failed)]) == (S.failed, 1)


def test_accepts_state_strings() -> None:
    @dataclass
    class Raw:
        time: float
        jobndx: int
        state: str

    assert derive_state([Raw(1.0, 0, "new"), Raw(2.0, 1, "queued")]) == (S.queued, 1)
