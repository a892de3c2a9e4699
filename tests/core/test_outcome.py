"""``run_outcome``: what psik's free-text ``info`` column meant, said plainly."""

from __future__ import annotations

from dataclasses import dataclass

from psik_api_core import SLOT_WAIT_INFO, JobState, run_outcome, slot_wait


@dataclass
class R:
    time: float
    jobndx: int
    state: JobState
    info: str = ""


NEW = R(1.0, 0, JobState.new, '{"backend": {"type": "local"}}')
QUEUED = R(2.0, 1, JobState.queued, "77")  # psik's info on queued: the backend's id


def test_a_new_job_has_neither() -> None:
    assert run_outcome([NEW]) == (None, None)


def test_a_running_job_has_its_native_id_and_no_exit_code() -> None:
    running = [NEW, R(2.0, 1, JobState.queued, "4242"), R(2.1, 1, JobState.active)]
    assert run_outcome(running) == ("4242", None)


def test_completed_is_exit_code_zero_and_failed_carries_the_status() -> None:
    assert run_outcome([NEW, QUEUED, R(3.0, 1, JobState.completed)]) == ("77", 0)
    assert run_outcome([NEW, QUEUED, R(3.0, 1, JobState.failed, "3")]) == ("77", 3)
    # killed by a signal: psik writes subprocess's negative return code
    assert run_outcome([NEW, QUEUED, R(3.0, 1, JobState.failed, "-9")]) == ("77", -9)


def test_a_failure_that_is_not_an_exit_status_has_no_exit_code() -> None:
    refused = [NEW, R(2.0, 1, JobState.failed, "local backend refused the job: no bash")]
    assert run_outcome(refused) == (None, None)
    vanished = [NEW, R(2.0, 1, JobState.queued, "77"), R(9.0, 1, JobState.failed, "process 77 ended without")]
    assert run_outcome(vanished) == ("77", None)


def test_a_canceled_run_has_no_exit_code_even_if_the_script_then_ended() -> None:
    rows = [NEW, QUEUED, R(3.0, 0, JobState.canceled), R(3.5, 1, JobState.failed, "143")]
    assert run_outcome(rows) == ("77", None)


def test_the_current_run_counts_not_an_earlier_one() -> None:
    rows = [
        NEW,
        R(2.0, 1, JobState.queued, "77"),
        R(3.0, 1, JobState.failed, "1"),
        R(4.0, 2, JobState.queued, "88"),
    ]
    assert run_outcome(rows) == ("88", None)
    assert run_outcome([*rows, R(5.0, 2, JobState.completed)]) == ("88", 0)


def test_rows_out_of_time_order_are_read_by_time() -> None:
    # psik can write a local job's active/completed rows before its queued row.
    rows = [NEW, R(2.2, 1, JobState.completed), R(2.1, 1, JobState.active), R(2.0, 1, JobState.queued, "5")]
    assert run_outcome(rows) == ("5", 0)


def test_a_run_waiting_for_a_job_slot_is_queued_with_no_native_id_yet() -> None:
    wait = SLOT_WAIT_INFO + ": backend 'default' runs at most 1 job at once"
    waiting = [NEW, R(2.0, 1, JobState.queued, wait)]
    assert slot_wait(waiting) == (1, 2.0)
    assert run_outcome(waiting) == (None, None)
    started = [*waiting, R(3.0, 1, JobState.queued, "4242")]
    assert slot_wait(started) is None
    assert run_outcome([*started, R(4.0, 1, JobState.active), R(5.0, 1, JobState.completed)]) == ("4242", 0)
    # Cancelled while waiting (psik records a cancel as jobndx 0): not waiting any more.
    assert slot_wait([*waiting, R(3.0, 0, JobState.canceled)]) is None
    # A second run that waits, after a first that ran.
    rerun = [*started, R(5.0, 1, JobState.completed), R(6.0, 2, JobState.queued, wait)]
    assert slot_wait(rerun) == (2, 6.0)
    assert slot_wait([NEW]) is None
