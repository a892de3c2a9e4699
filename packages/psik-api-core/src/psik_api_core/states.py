"""The job state machine, written down once.

psik records a job's life as rows of ``status.csv``: ``(time, jobndx, state, info)``.
Each submission of a job gets the next ``jobndx`` (1, 2, ...); row 0 is ``new``.
psik itself validates nothing, and its rows are not always in time order (a local
job's ``active`` row can land before its ``queued`` row), so the current state is
*derived* here from the whole history rather than read off the last line.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol


class JobState(StrEnum):
    """Where a job is in its life. ``completed``, ``failed`` and ``canceled`` are final."""

    new = "new"
    queued = "queued"
    active = "active"
    completed = "completed"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES: frozenset[JobState] = frozenset({JobState.completed, JobState.failed, JobState.canceled})

#: The legal transitions. A final job may be started again (``-> queued``, next jobndx);
#: ``new -> failed`` records a submission the backend refused.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.new: frozenset({JobState.queued, JobState.failed, JobState.canceled}),
    JobState.queued: frozenset({JobState.active, JobState.completed, JobState.failed, JobState.canceled}),
    JobState.active: frozenset({JobState.completed, JobState.failed, JobState.canceled}),
    JobState.completed: frozenset({JobState.queued}),
    JobState.failed: frozenset({JobState.queued}),
    JobState.canceled: frozenset({JobState.queued}),
}


def can_transition(current: JobState, target: JobState) -> bool:
    """True if a job in ``current`` may move to ``target``."""
    return target in TRANSITIONS[current]


def can_start(state: JobState) -> bool:
    """A job may be (re)submitted when it is new or final, never while queued or active."""
    return can_transition(state, JobState.queued)


def can_cancel(state: JobState) -> bool:
    """Cancelling means something only for a job that is not final yet."""
    return can_transition(state, JobState.canceled)


#: Starts the ``info`` of a ``canceled`` or ``failed`` row the server records over an end
#: row the job itself could have written while its scheduler still ran it (a Slurm job
#: that appended its own ``completed`` and went on): such a row wins over the run's other
#: end rows. It can only end a run ``canceled``/``failed``, never ``completed``.
OVERRULED_INFO = "overruled: the scheduler still ran the job"


class Row(Protocol):
    """Anything shaped like a status.csv row (core's ``Transition`` or psik's)."""

    @property
    def time(self) -> float: ...

    @property
    def jobndx(self) -> int: ...

    @property
    def state(self) -> JobState | str: ...


class InfoRow(Row, Protocol):
    """A row with psik's free-text ``info`` column."""

    @property
    def info(self) -> str: ...


def derive_state(history: Iterable[Row]) -> tuple[JobState, int]:
    """The current ``(state, jobndx)`` of a job from its history, in any row order.

    Rules (see the module docstring for why):

    * the current run is the largest jobndx seen;
    * psik records a cancel as ``jobndx 0``; it applies to the run under way at its time;
    * the *first* final row of the current run (by time) wins: a job cancelled and then
      seen to complete stays ``canceled``, and a late ``queued`` row never reopens it;
      but a row the server marked :data:`OVERRULED_INFO` wins over the run's other ends;
    * otherwise ``active`` if the run was seen active, else ``queued``; ``new`` if never run.
    """
    history = list(history)
    rows = [(float(r.time), int(r.jobndx), JobState(r.state)) for r in history]
    run = max((ndx for _, ndx, _ in rows), default=0)
    if run == 0:
        finals = sorted((t, s) for t, _, s in rows if s.is_final)
        return (finals[0][1] if finals else JobState.new), 0

    start = min(t for t, ndx, _ in rows if ndx == run)
    finals = sorted(
        (t, s)
        for t, ndx, s in rows
        if s.is_final and (ndx == run or (ndx == 0 and s is JobState.canceled and t >= start))
    )
    overruled = sorted(
        (t, s)
        for (t, ndx, s), r in zip(rows, history, strict=True)
        if ndx == run
        and s in (JobState.canceled, JobState.failed)
        and str(getattr(r, "info", "")).startswith(OVERRULED_INFO)
    )
    if overruled:
        return overruled[0][1], run
    if finals:
        return finals[0][1], run
    if any(ndx == run and s is JobState.active for _, ndx, s in rows):
        return JobState.active, run
    return JobState.queued, run


def run_outcome(history: Iterable[InfoRow]) -> tuple[str | None, int | None]:
    """``(native_id, exit_code)`` of the current run, from what psik wrote in ``info``.

    psik writes the backend's id (a local PID, a Slurm job id) as the info of the run's
    ``queued`` row, and the script's exit status as the info of its ``failed`` row
    (``completed`` means 0). A ``failed`` row whose info is not a number (a refused
    submission, a vanished process) and a cancelled run have no exit code. A run still
    waiting for a job slot has no native id yet.
    """
    rows = list(history)
    state, run = derive_state(rows)
    if run == 0:
        return None, None
    native_id = next(
        (
            r.info
            for r in sorted(rows, key=lambda r: r.time)
            if r.jobndx == run
            and JobState(r.state) is JobState.queued
            and r.info
            and not is_slot_wait(r.info)
        ),
        None,
    )
    exit_code: int | None = None
    if state is JobState.completed:
        exit_code = 0
    elif state is JobState.failed:
        ended = sorted(
            (r for r in rows if r.jobndx == run and JobState(r.state) is JobState.failed),
            key=lambda r: r.time,
        )
        info = ended[0].info.strip() if ended else ""
        if info.lstrip("-").isdigit():
            exit_code = int(info)
    return native_id, exit_code


#: The ``info`` of the ``queued`` row the server writes for a run that waits for a free
#: job slot (a backend's ``max_running``): the run is ``queued``, and nothing is running
#: yet. When a slot frees, the backend's own ``queued`` row (with the native id) follows
#: for the same jobndx.
SLOT_WAIT_INFO = "waiting for a free job slot"


#: The ``info`` of the ``queued`` row the server writes for a run that waits for other
#: jobs to end (``JobSpec.after``): the run is ``queued``, nothing runs and it holds no
#: job slot. Once they ended as it needs, a slot-wait row or the backend's own ``queued``
#: row follows for the same jobndx; if they cannot, the run ends ``canceled``.
DEPENDENCY_WAIT_INFO = "waiting for other jobs to end"


def is_dependency_wait(info: str) -> bool:
    """True if ``info`` is that of a dependency-wait row (:data:`DEPENDENCY_WAIT_INFO`)."""
    return info.startswith(DEPENDENCY_WAIT_INFO)


def is_slot_wait(info: str) -> bool:
    """True if ``info`` is that of a ``queued`` row the server wrote for a run it holds
    back, nothing launched: waiting for a job slot (:data:`SLOT_WAIT_INFO`) or for
    other jobs (:data:`DEPENDENCY_WAIT_INFO`). Such a row names no native id, and the
    launch that ends the wait starts that same run."""
    return info.startswith(SLOT_WAIT_INFO) or is_dependency_wait(info)


def _held(history: Iterable[InfoRow]) -> tuple[int, list[InfoRow]] | None:
    """The current run and its ``queued`` rows (oldest first), if it is ``queued`` and
    all of them are the server's wait rows (nothing launched); None otherwise."""
    rows = list(history)
    state, run = derive_state(rows)
    if state is not JobState.queued or run == 0:
        return None
    queued = sorted(
        (r for r in rows if r.jobndx == run and JobState(r.state) is JobState.queued), key=lambda r: r.time
    )
    if not queued or not all(is_slot_wait(r.info) for r in queued):
        return None
    return run, queued


def slot_wait(history: Iterable[InfoRow]) -> tuple[int, float] | None:
    """``(jobndx, since)`` if the job's current run is waiting for a job slot: it is
    ``queued``, its only ``queued`` rows are wait rows, and the last is a slot-wait row
    (a run that waited for other jobs first then waits for a slot); None otherwise."""
    held = _held(history)
    if held is None or is_dependency_wait(held[1][-1].info):
        return None
    run, queued = held
    return run, min(float(r.time) for r in queued if not is_dependency_wait(r.info))


def dependency_wait(history: Iterable[InfoRow]) -> tuple[int, float] | None:
    """``(jobndx, since)`` if the job's current run is waiting for other jobs to end
    (its only ``queued`` rows are wait rows, none for a slot yet); None otherwise."""
    held = _held(history)
    if held is None or not all(is_dependency_wait(r.info) for r in held[1]):
        return None
    return held[0], float(held[1][0].time)
