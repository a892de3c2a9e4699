"""The Slurm driver: jobs submitted with sbatch and cancelled with scancel
(:mod:`.commands`: sbatch's own message is the reason of a refusal; attributes meant
for psik never reach sbatch, :mod:`.options`), each backend's health asked of its
controller (cached a few seconds), liveness asked of squeue (:mod:`.liveness`), and the
Slurm jobs of a server that died mid-submit adopted at start-up."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psik_api_core import OVERRULED_INFO

from ...aio import in_thread
from ...jobs import directory as jobdir
from .. import (
    UNAVAILABLE_INFO,
    BackendDriver,
    BackendRefused,
    CancelUnavailable,
    DriverContext,
    Finding,
    register,
)
from . import commands
from .liveness import SlurmLiveness, claimed_end, claimed_ends, run_native_id, slurm_jobs, still_runs
from .options import sbatch_options

if TYPE_CHECKING:
    from ...jobs.store import JobRow
    from ...settings import BackendSettings

_logger = logging.getLogger(__name__)


@register("slurm")
class SlurmDriver(BackendDriver):
    """Slurm backends: sbatch, scancel, squeue and the controller's health."""

    def __init__(self, ctx: DriverContext, type_name: str, backends: Mapping[str, BackendSettings]) -> None:
        super().__init__(ctx, type_name, backends)
        #: Each backend's controller and partition, asked when someone wants to know.
        self.checks = {name: commands.SlurmHealth(cfg.queue_name) for name, cfg in backends.items()}
        self.liveness = SlurmLiveness()

    @classmethod
    def check_attributes(cls, attributes: Mapping[str, str]) -> None:
        sbatch_options(attributes)

    def adopt_orphans(self) -> None:
        """A server killed while sbatch ran leaves a Slurm job no status row names: give
        each job its Slurm job back (:func:`.commands.adopt`), and cancel any further ones
        (a job is one Slurm job per run). Blocking; the controller down: nothing done."""
        found = commands.jobs_by_console(self.ctx.prefix)
        for jobid, nids in (found or {}).items():
            try:
                adopted, extra = commands.adopt(self.ctx.path(jobid), nids, time.time())
            except OSError:
                continue  # purged, or not a job directory
            if adopted is not None:
                _logger.warning(
                    "job %s: adopted Slurm job %s, submitted by a server that died before recording it",
                    jobid,
                    adopted,
                )
            if extra:
                _logger.warning(
                    "job %s: cancelling Slurm jobs %s, submitted by a server that died before recording them",
                    jobid,
                    ", ".join(extra),
                )
                subprocess.run(
                    ["scancel", *extra],  # noqa: S607 (on PATH, as sbatch is)
                    capture_output=True,
                    timeout=commands.COMMAND_TIMEOUT,
                    check=False,
                )

    async def health(self, name: str) -> str | None:
        check = self.checks.get(name)
        return None if check is None else await check.check()

    async def submit(self, job: Any, jobndx: int, waited: int | None) -> tuple[int, str]:
        """sbatch the run and send its ``queued`` callback, as psik's submit does. A
        refusal makes the backend's health be asked afresh."""
        from psik.models import JobState as PsikJobState

        name = job.spec.backend
        check = self.checks.get(name)
        try:
            try:
                native_id = await commands.submit(job, jobndx)
            except commands.SbatchRefused as e:
                if check is not None:
                    check.forget()
                    why = await check.check()
                    if why is not None and not e.unavailable and "unreachable" in why:
                        raise commands.SbatchRefused(str(e), unavailable=True) from e
                raise
        except commands.SbatchRefused as e:
            if e.unavailable:
                raise BackendRefused(
                    f"{UNAVAILABLE_INFO}: Slurm backend {name!r} cannot be reached: {e}", unavailable=True
                ) from e
            raise BackendRefused(f"sbatch refused the job: {e}") from e
        await job.send_callback(jobndx, PsikJobState.queued, native_id)
        return jobndx, native_id

    async def cancel(self, job: Any) -> None:
        """scancel first, then ``canceled``: psik's cancel records ``canceled`` and only
        logs a failed scancel, so with the controller unreachable the job was said to be
        canceled while Slurm went on to run it. Here a controller that cannot be reached
        is :class:`CancelUnavailable` and nothing is recorded (cancel again later); an
        scancel refused otherwise (the job already gone from Slurm) changes nothing.
        A run that recorded its own end while Slurm still runs it (:meth:`still_scheduled`)
        is cancelled too, its ``canceled`` row marked to overrule that end."""
        from psik.models import JobState as PsikJobState

        jobid = job.stamp
        files = await in_thread(jobdir.read_job, self.ctx.path(jobid))
        state, run = files.state
        nid = run_native_id(files)
        if nid is not None:
            said = await commands.cancel([nid])
            if said is not None and commands.unreachable(said):
                raise CancelUnavailable(jobid, f"scancel {nid}: {said}")
        if state.is_final:
            why = f"{OVERRULED_INFO}: Slurm job {nid} still ran after the job recorded {state.value}"
            await job.reached(run, PsikJobState.canceled, why)
        else:
            await job.reached(0, PsikJobState.canceled)

    async def still_scheduled(self, files: jobdir.JobFiles) -> bool:
        """A Slurm job that wrote its own ``completed``/``failed`` row (the job can) while
        squeue shows it pending or running. Cancel ends it all the same: Slurm's view is
        trusted over a row the job could write."""
        nid = claimed_end(files)
        return nid is not None and await still_runs(nid)

    async def vanished(self, rows: Sequence[JobRow]) -> list[Finding]:
        if not self.loaded:
            return []
        jobs = await in_thread(slurm_jobs, rows, self.ctx.prefix)
        # Those that ended by a row of their own since: Slurm's view is trusted over it.
        claimed = await in_thread(claimed_ends, self.ctx.prefix, self.liveness.left(jobs))
        return list(await self.liveness.check(jobs, claimed))
