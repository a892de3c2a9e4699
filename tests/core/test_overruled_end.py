"""A run's end as the server records it over an end row the job wrote itself while its
scheduler still ran it (a Slurm job that appended its own ``completed``, issue 14): the
scheduler's view is trusted over a row the job could write, so that row wins."""

from __future__ import annotations

from dataclasses import dataclass

from psik_api_core import OVERRULED_INFO, JobState, derive_state


@dataclass
class R:
    time: float
    jobndx: int
    state: JobState
    info: str


def rows(*r: tuple[float, int, str, str]) -> list[R]:
    return [R(t, n, JobState(s), i) for t, n, s, i in r]


def test_the_server_s_overruling_row_wins_over_the_job_s_own_end() -> None:
    history = rows((1, 0, "new", ""), (2, 1, "queued", "42"), (3, 1, "active", ""), (4, 1, "completed", ""))
    assert derive_state(history) == (JobState.completed, 1)
    for state in ("canceled", "failed"):
        overruled = [*history, *rows((9, 1, state, f"{OVERRULED_INFO}: Slurm job 42 still ran"))]
        assert derive_state(overruled) == (JobState(state), 1)


def test_only_a_canceled_or_failed_row_of_the_current_run_overrules() -> None:
    # The mark cannot make a job `completed` (the job could write it), nor reach another run.
    history = rows((1, 0, "new", ""), (2, 1, "queued", "42"), (4, 1, "failed", "3"))
    assert derive_state([*history, *rows((5, 1, "completed", OVERRULED_INFO))]) == (JobState.failed, 1)
    again = [*history, *rows((5, 1, "canceled", OVERRULED_INFO), (6, 2, "queued", "43"))]
    assert derive_state(again) == (JobState.queued, 2)
    # Without the mark, the first end of the run wins as before.
    assert derive_state([*history, *rows((5, 1, "canceled", "x"))]) == (JobState.failed, 1)
