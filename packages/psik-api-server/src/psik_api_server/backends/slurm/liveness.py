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
under its lock before anything is recorded), but for one case:

**An end row the job wrote while Slurm still runs it.** psik's batch script writes the
run's ``completed``/``failed`` on the compute node, so the job itself can append such a
row and go on running. Slurm's view is trusted over it: a job followed here (seen live
at a check) whose history then says it ended stays followed while squeue shows it
pending or running. The index shows the row the job wrote meanwhile (it mirrors the
status file, and a ``completed`` psik wrote before a slow callback is no lie); cancel
still ``scancel``s it (see ``SlurmDriver.still_scheduled``). Once Slurm ends it, a
``completed`` that Slurm contradicts (the job ended FAILED, TIMEOUT, CANCELLED outside
psik-api, NODE_FAIL...) is overruled: ``failed`` with what Slurm said, in a row marked
``OVERRULED_INFO`` that wins over the job's own. A ``failed`` the job wrote stands (its
exit code is the job's), and so does any end Slurm agrees with (COMPLETED) or no longer
knows. A job that writes its end before any check saw it live is not followed.

Bound: a Slurm job ended outside psik is failed within 2 x ``liveness_interval`` plus the
time of one squeue call (default: about 4-5 s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from psik_api_core import OVERRULED_INFO, JobState

from ...jobs import directory as jobdir
from ...jobs.store import JobRow
from . import commands


@dataclass(frozen=True)
class Ended:
    """A non-final job whose Slurm job is over; ``reason`` says what Slurm said.
    ``overrules``: the job recorded an end Slurm contradicts (``reason`` starts with
    ``OVERRULED_INFO``), see :meth:`overrules_end`."""

    jobid: str
    reason: str
    overrules: bool = False

    def overrules_end(self, files: jobdir.JobFiles) -> bool:
        """Whether it is recorded over the end ``files`` show: it overrules, while that
        end is still the job's own."""
        return self.overrules and claimed_end(files) is not None


@dataclass(frozen=True)
class Claimed:
    """A job whose run's end (``state``) is a row it could have written itself, and the
    run's Slurm job id."""

    nid: str
    state: JobState


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
    # The ping first, as for liveness: squeue retries a controller that is down for ~18 s.
    code, ping, _ = await commands.run("scontrol", "ping", limit=5)
    if code != 0 or "UP" not in ping:
        return False
    states = await commands.slurm_states([nid])
    seen = (states or {}).get(nid)
    return seen is not None and seen.state in _MAY_RUN


def slurm_jobs(rows: Iterable[JobRow], prefix: Path) -> dict[str, str]:
    """``{jobid: Slurm job id}`` of ``rows`` (index rows of non-final Slurm jobs).
    Blocking; a job that cannot be read is left out (never failed)."""
    found: dict[str, str] = {}
    for row in rows:
        if row.jobndx == 0:
            continue
        try:
            nid = native_id(jobdir.read_job(jobdir.job_path(prefix, row.jobid)))
        except (OSError, ValueError):
            continue
        if nid is not None:
            found[row.jobid] = nid
    return found


def claimed_ends(prefix: Path, jobids: Iterable[str]) -> dict[str, Claimed]:
    """Of ``jobids`` (jobs :meth:`SlurmLiveness.left` lists), those whose end is a row the
    job could have written (:func:`claimed_end`). Blocking; a job that cannot be read, or
    purged, is left out."""
    found: dict[str, Claimed] = {}
    for jobid in jobids:
        try:
            files = jobdir.read_job(jobdir.job_path(prefix, jobid))
        except (OSError, ValueError):
            continue
        nid = claimed_end(files)
        if nid is not None:
            found[jobid] = Claimed(nid, files.state[0])
    return found


class SlurmLiveness:
    """Remembers which jobs were seen ended at the previous check, and which it follows
    (see the module doc)."""

    def __init__(self) -> None:
        self._suspect: dict[str, str] = {}
        #: {jobid: Slurm job id}: seen live, or ended by their own row while Slurm ran them.
        self._followed: dict[str, str] = {}

    def left(self, jobs: Mapping[str, str]) -> list[str]:
        """The jobs followed at the last check that are not among ``jobs`` (the live
        ones) any more: ended, by their own row or otherwise, or purged."""
        return [jobid for jobid in self._followed if jobid not in jobs]

    async def check(self, jobs: dict[str, str], claimed: Mapping[str, Claimed] | None = None) -> list[Ended]:
        """The jobs among ``jobs`` (``{jobid: Slurm job id}``) seen ended in this check
        and the one before; and those among ``claimed`` (:func:`claimed_ends` of
        :meth:`left`) that Slurm ended otherwise than they said (overruling)."""
        claimed = dict(claimed or {})
        if not jobs and not claimed:
            self._suspect.clear()
            self._followed.clear()
            return []
        # A cheap ping first: squeue against a controller that is down takes ~18 s of
        # retries, which would hold up the liveness of every other job.
        code, ping, _ = await commands.run("scontrol", "ping", limit=5)
        asked = [*jobs.values(), *(c.nid for c in claimed.values())]
        states = await commands.slurm_states(asked) if code == 0 and "UP" in ping else None
        if states is None:
            self._followed = {**jobs, **{j: c.nid for j, c in claimed.items()}}  # ask again
            return []  # the controller could not be asked: conclude nothing
        self._followed = dict(jobs)
        overruled = self._contradicted(claimed, states)
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
        out: list[Ended] = overruled
        for e in ended:
            reason = e.reason
            if "no longer known" in reason:
                reason = await self._from_accounting(jobs[e.jobid], reason)
            out.append(Ended(e.jobid, reason + " and psik recorded no end state"))
        return out

    def _contradicted(
        self, claimed: Mapping[str, Claimed], states: Mapping[str, commands.SlurmJob]
    ) -> list[Ended]:
        """Of the jobs that recorded their own end, those Slurm ended otherwise (their
        ``completed`` is overruled); the ones Slurm still runs stay followed."""
        out: list[Ended] = []
        for jobid, c in claimed.items():
            seen = states.get(c.nid)
            if seen is None:
                continue  # Slurm no longer knows it: the job's row stands
            if not seen.ended:
                self._followed[jobid] = c.nid
            elif c.state is JobState.completed and seen.state.split(" ", 1)[0] != "COMPLETED":
                why = "" if seen.reason in ("None", "") else f", reason {seen.reason}"
                out.append(
                    Ended(
                        jobid,
                        f"{OVERRULED_INFO}: the job recorded completed, but Slurm job {c.nid}"
                        f" ended {seen.state}{why}",
                        overrules=True,
                    )
                )
        return out

    @staticmethod
    async def _from_accounting(nid: str, lost: str) -> str:
        """Why a job squeue no longer shows is over: its end per ``sacct`` (squeue forgets
        a job MinJobAge after its end), else ``lost``."""
        acct = await commands.accounting_state(nid)
        if acct is None:
            return lost
        if acct.ended:
            return (
                f"Slurm job {nid} ended {acct.state}, exit code {acct.reason}"
                " (from accounting: squeue no longer shows it)"
            )
        return f"{lost}; accounting last saw it {acct.state}"
