"""Liveness of Slurm jobs: a job Slurm has ended, or no longer knows, without psik
recording an end state is failed, with what Slurm said.

psik's batch script records ``active`` and ``completed``/``failed`` itself on the compute
node, and psik's slurm ``poll()`` does nothing: a job cancelled with ``scancel`` outside
psik, killed by a node failure, or forgotten by a controller that lost its state would
say ``queued``/``active`` forever. So at every liveness check the server asks ``squeue``
(one call per check for all non-final Slurm jobs) about the Slurm job id recorded in each
job's ``queued`` row. A job that Slurm shows ended (CANCELLED, TIMEOUT, NODE_FAIL, ...),
or does not know at all, in two checks in a row while its status.csv still has no end
state is failed: the second look leaves psik's own end row (written just before the
batch script exits) time to arrive. Where accounting is configured, ``sacct`` gives the
final state (and exit code) of a job squeue has forgotten (``MinJobAge`` after its end,
300 s by default: e.g. a job that ended while the server was down); without it, such a
job is failed as lost.

A job is never failed when squeue cannot be asked (the controller is down): nothing can
be concluded then. The end state psik wrote is never overridden (the job is re-read
under its lock before anything is recorded).

Bound: a Slurm job ended outside psik is failed within 2 x ``liveness_interval`` plus the
time of one squeue call (default: about 4-5 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psik_api_core import OVERRULED_INFO, JobState

from . import jobdir, slurm
from .store import JobStore


@dataclass(frozen=True)
class Ended:
    """A non-final job whose Slurm job is over; ``reason`` says what Slurm said."""

    jobid: str
    reason: str


def native_id(files: jobdir.JobFiles) -> str | None:
    """The Slurm job id psik recorded for the current run (None if final or none yet)."""
    return None if files.state[0].is_final else run_native_id(files)


def run_native_id(files: jobdir.JobFiles) -> str | None:
    """The Slurm job id recorded for the current run, ended or not (None: none yet)."""
    jobndx = files.state[1]
    queued = [r for r in files.history if r.jobndx == jobndx and r.state is JobState.queued]
    if not queued or not queued[-1].info.isdigit():
        return None  # not submitted yet (e.g. waiting for a job slot)
    return queued[-1].info


def claimed_end(files: jobdir.JobFiles) -> str | None:
    """The Slurm job id of a run whose end (``completed``/``failed``) is a row the job
    itself could have written (psik's batch script writes them on the compute node);
    None if the run has not ended so, or the server overruled it already."""
    state, jobndx = files.state
    if state not in (JobState.completed, JobState.failed):
        return None
    if any(r.jobndx == jobndx and r.info.startswith(OVERRULED_INFO) for r in files.history):
        return None
    return run_native_id(files)


#: Slurm states in which the job's batch script may still run (COMPLETING: it has exited).
_MAY_RUN = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "STOPPED", "RESIZING", "REQUEUED", "REQUEUE_HOLD"}
)


async def still_runs(nid: str) -> bool:
    """Whether squeue shows Slurm job ``nid`` pending or running; False if it cannot be
    asked (then the job's own rows stand)."""
    states = await slurm.slurm_states([nid])
    seen = (states or {}).get(nid)
    return seen is not None and seen.state in _MAY_RUN


def slurm_jobs(store: JobStore, prefix: Path, backends: set[str]) -> dict[str, str]:
    """``{jobid: Slurm job id}`` of the non-final jobs on ``backends``. Blocking; a job
    that cannot be read is left out (never failed)."""
    found: dict[str, str] = {}
    for row in store.live():
        if row.backend not in backends or row.jobndx == 0:
            continue
        try:
            nid = native_id(jobdir.read_job(jobdir.job_path(prefix, row.jobid)))
        except (OSError, ValueError):
            continue
        if nid is not None:
            found[row.jobid] = nid
    return found


class SlurmLiveness:
    """Remembers which jobs were seen ended at the previous check (see the module doc)."""

    def __init__(self) -> None:
        self._suspect: dict[str, str] = {}

    async def check(self, jobs: dict[str, str]) -> list[Ended]:
        """The jobs among ``jobs`` (``{jobid: Slurm job id}``) seen ended in this check
        and the one before."""
        if not jobs:
            self._suspect.clear()
            return []
        # A cheap ping first: squeue against a controller that is down takes ~18 s of
        # retries, which would hold up the liveness of every other job.
        code, ping, _ = await slurm.run("scontrol", "ping", limit=5)
        states = await slurm.slurm_states(jobs.values()) if code == 0 and "UP" in ping else None
        if states is None:
            return []  # the controller could not be asked: conclude nothing
        suspect: dict[str, str] = {}
        for jobid, nid in jobs.items():
            seen = states.get(nid)
            if seen is None:
                suspect[jobid] = f"Slurm job {nid} is no longer known to the controller (lost)"
            elif seen.ended:
                why = "" if seen.reason in ("None", "") else f", reason {seen.reason}"
                outside = " (cancelled outside psik-api, e.g. scancel)" if seen.state == "CANCELLED" else ""
                suspect[jobid] = f"Slurm job {nid} ended {seen.state}{why}{outside}"
        ended = [Ended(jobid, why) for jobid, why in suspect.items() if jobid in self._suspect]
        self._suspect = suspect
        out: list[Ended] = []
        for e in ended:
            reason = e.reason
            if "no longer known" in reason:
                reason = await self._from_accounting(jobs[e.jobid], reason)
            out.append(Ended(e.jobid, reason + " and psik recorded no end state"))
        return out

    @staticmethod
    async def _from_accounting(nid: str, lost: str) -> str:
        """Why a job squeue no longer shows is over: its end per ``sacct`` (squeue forgets
        a job MinJobAge after its end), else ``lost``."""
        acct = await slurm.accounting_state(nid)
        if acct is None:
            return lost
        if acct.ended:
            return (
                f"Slurm job {nid} ended {acct.state}, exit code {acct.reason}"
                " (from accounting: squeue no longer shows it)"
            )
        return f"{lost}; accounting last saw it {acct.state}"
