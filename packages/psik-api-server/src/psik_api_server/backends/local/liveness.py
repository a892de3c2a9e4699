"""Liveness of local jobs: a job whose process is gone without a final row is failed.

psik's local backend records ``completed``/``failed`` from inside the job's own process,
and its ``poll()`` does nothing: a job killed with SIGKILL, or lost in a reboot, would say
``active`` forever. So the server looks at every non-final local job now and then
(:func:`vanished_jobs`, from the JobService's liveness loop): if the process psik
recorded (the ``queued`` row's info) no longer runs and the history still has no final
row, the service records ``failed`` and why.

A PID can be reused: a process that started well after the job was queued is not the
job's, so it counts as gone. How a PID is checked depends on the system:

* with ``/proc`` (Linux): the process's state and start time, so a zombie or a reused
  PID counts as gone;
* without it (macOS, the BSDs): ``kill(pid, 0)`` only. A PID that exists counts as the
  job's (a reused PID is not noticed until it exits too); a PID that does not exist is
  gone. A job is never failed while its process may be running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from psik_api_core import JobState, derive_state

from ...jobs import directory as jobdir
from ...jobs.store import JobRow
from .proctree import PROC, boot_time, has_proc, parse_stat

__all__ = [
    "PROC",
    "Vanished",
    "has_proc",
    "local_pid",
    "process_running",
    "runner_pid",
    "started_by",
    "vanished_jobs",
]

_logger = logging.getLogger(__name__)

#: A process that started this long after its job's queued row is someone else's. Generous:
#: failing a live job would be far worse than noticing a reused PID late.
_START_SLACK = 30.0


def started_by(started: float, since: float) -> bool:
    """True if a process that started at ``started`` may be the one psik recorded at
    ``since`` (the job's queued row): it did not start well after."""
    return started <= since + _START_SLACK


def process_running(pid: int, since: float, *, proc: Path = PROC) -> bool:
    """True if ``pid`` runs and may be the process started at about ``since``."""
    if pid <= 0:
        return False
    if not has_proc(proc):
        return _signal_zero(pid)
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return _signal_zero(pid)
    p = parse_stat(pid, stat)
    if not p.alive:  # exited, not yet reaped
        return False
    boot = boot_time(proc)
    if boot is None:
        return True
    return started_by(p.started(boot), since)


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_pid(files: jobdir.JobFiles) -> tuple[int, float] | None:
    """The PID psik recorded for the current run of a local job, and when; None if the
    job is final or has no PID recorded (yet)."""
    return runner_pid(files.history)


def runner_pid(history: list[jobdir.Row]) -> tuple[int, float] | None:
    """:func:`local_pid` from the rows of a job's status.csv."""
    state, jobndx = derive_state(history)
    if state.is_final:
        return None
    queued = [r for r in history if r.jobndx == jobndx and r.state is JobState.queued]
    if not queued or not queued[-1].info.isdigit():
        return None
    return int(queued[-1].info), queued[-1].time


@dataclass(frozen=True)
class Vanished:
    """A non-final local job whose process is gone."""

    jobid: str
    pid: int

    @property
    def reason(self) -> str:
        return f"process {self.pid} ended without recording an end state (killed, or the machine restarted)"

    def overrules_end(self, files: jobdir.JobFiles) -> bool:
        """Never: an end the job recorded since stands."""
        return False


@dataclass(frozen=True)
class EndedUnrecorded:
    """A job the index shows running whose own directory says it ended: the liveness
    loop's re-read records the end (a lost watcher change must not leave it running in
    the index for good). Never a failure."""

    jobid: str

    @property
    def reason(self) -> str:
        return "its directory says it ended; the index had not recorded it"

    def overrules_end(self, files: jobdir.JobFiles) -> bool:
        return False


def vanished_jobs(
    rows: Iterable[JobRow], prefix: Path, *, proc: Path = PROC
) -> list[Vanished | EndedUnrecorded]:
    """Of ``rows`` (index rows of non-final local jobs), the jobs whose process is gone,
    and those whose directory says they ended (:class:`EndedUnrecorded`).
    Blocking (reads each job's status.csv, only that, and ``/proc``): run it in a worker
    thread. A job that cannot be read is skipped, never failed."""
    gone: list[Vanished | EndedUnrecorded] = []
    for row in rows:
        if row.jobndx == 0:
            continue
        try:
            history = jobdir.read_history(jobdir.job_path(prefix, row.jobid))
        except (OSError, ValueError):
            continue
        if derive_state(history)[0].is_final:
            gone.append(EndedUnrecorded(row.jobid))
            continue
        pid = runner_pid(history)
        if pid is not None and not process_running(*pid, proc=proc):
            gone.append(Vanished(row.jobid, pid[0]))
    return gone
