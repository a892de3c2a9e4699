"""The local driver: jobs run on the server's host, started by the
:class:`~psik_api_server.backends.local.launcher.LocalLauncher` (never forked from the server), their
process trees contained (:mod:`~psik_api_server.backends.local.containment`: a cancel ends the whole
tree, a finished job's leftovers are ended) and their liveness read from ``/proc``
(:mod:`~psik_api_server.backends.local.liveness`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psik_api_core import JobSpec

from ...aio import in_thread
from ...jobs import directory as jobdir
from .. import BackendDriver, BackendRefused, DriverContext, Finding, register
from .containment import Containment
from .liveness import local_pid, vanished_jobs
from .proctree import ProcessTable

if TYPE_CHECKING:
    from ...jobs.store import JobRow
    from ...settings import BackendSettings


def missing_interpreter(spec: JobSpec) -> str | None:
    """Why the script's interpreter cannot run here, or None if it can."""
    first = spec.script.split("\n", 1)[0]
    argv = first[2:].split() if first.startswith("#!") else ["/bin/bash"]
    if not argv:
        return "the script's #! line names no interpreter"
    path_env = spec.environment.get("PATH")
    if path_env is None:
        path_env = os.environ.get("PATH", os.defpath) if spec.inherit_environment else os.defpath
    prog = argv[0]
    if os.path.basename(prog) == "env" and len(argv) > 1:
        # `#!/usr/bin/env python3`: env looks the program up on the job's PATH.
        if not os.access(prog, os.X_OK):
            return f"interpreter {prog} not found or not executable"
        prog = next((a for a in argv[1:] if not a.startswith("-") and "=" not in a), argv[1])
        if shutil.which(prog, path=path_env) is None:
            return f"interpreter {prog!r} (from '{first}') not found on the job's PATH"
        return None
    if os.sep in prog:
        if not os.access(prog, os.X_OK) or os.path.isdir(prog):
            return f"interpreter {prog} not found or not executable"
        return None
    if shutil.which(prog, path=path_env) is None:
        return f"interpreter {prog!r} not found on the job's PATH"
    return None


@register("local")
class LocalDriver(BackendDriver):
    """Local jobs: the launcher, containment and ``/proc`` liveness."""

    runs_here = True

    def __init__(self, ctx: DriverContext, type_name: str, backends: Mapping[str, BackendSettings]) -> None:
        super().__init__(ctx, type_name, backends)
        self.containment = Containment(ctx.prefix, set(backends))
        self._warm_up: asyncio.Task[object] | None = None

    @classmethod
    def default_slots(cls) -> int | None:
        return os.cpu_count() or 1

    def load(self) -> str | None:
        self.containment.prefix = self.ctx.prefix  # made absolute by now
        return super().load()

    def warm_up(self) -> None:
        """The launcher now (unless it is a lazy one), so that the first local submit
        does not wait for it, and the sweep that ends what finished jobs leave running
        (also the leftovers of jobs that ended while the server was down)."""
        if self.containment.supported:
            self.containment.start()
        if self._warm_up is None and self.ctx.launcher.eager:
            self._warm_up = asyncio.get_running_loop().create_task(self.ctx.launcher.start())

    async def submit(self, job: Any, jobndx: int, waited: int | None) -> tuple[int, str]:
        spec = JobSpec.model_validate(job.spec.model_dump())
        reason = await in_thread(missing_interpreter, spec)
        if reason is not None:
            raise BackendRefused(reason)
        return await self.ctx.launcher.submit(self.ctx.path(job.stamp), waited)

    async def cancel(self, job: Any) -> None:
        """The job's whole process tree gets SIGTERM now and SIGKILL after the grace
        period (:mod:`.containment`), instead of psik's SIGTERM to its runner alone.
        Returns once SIGTERM is sent: the SIGKILL does not hold up the caller."""
        from psik.models import JobState as PsikJobState

        if not self.containment.supported:
            await job.cancel()
            return
        jobid = job.stamp
        with self.containment.hold(jobid):  # the sweep would see it final and race us
            files = await in_thread(jobdir.read_job, self.ctx.path(jobid))
            run, runner = files.state[1], local_pid(files)
            # As psik's cancel does, `canceled` before any signal: whatever the job's
            # processes record as they die comes after it and changes nothing.
            await job.reached(0, PsikJobState.canceled)
            await in_thread(self.containment.end_job, jobid, run, runner)
        self.containment.start()
        self.containment.wake()

    async def vanished(self, rows: Sequence[JobRow]) -> list[Finding]:
        return list(await in_thread(vanished_jobs, rows, self.ctx.prefix))

    async def end_processes(self, jobid: str, run: int, runner: tuple[int, float] | None) -> None:
        """End every process of run ``run`` of ``jobid`` (``runner``: psik's runner, if
        known), as a cancel does, with nothing recorded in its files."""
        if not self.containment.supported:
            return
        if runner is None:
            runner = await in_thread(self._runner_of, jobid, run)
        with self.containment.hold(jobid):
            await in_thread(self.containment.end_job, jobid, run, runner)
        self.containment.start()
        self.containment.wake()

    def _runner_of(self, jobid: str, run: int) -> tuple[int, float] | None:
        """psik's runner of a run whose status.csv cannot be read: the leader of the
        session a process of the run is in (psik setsid()s each run's runner), else None.
        Blocking (reads /proc)."""
        table = ProcessTable.read()
        base = str(self.ctx.path(jobid))
        for pid, (tagged, tagged_run) in table.tagged().items():
            if tagged_run != run or os.path.realpath(tagged) != base:
                continue
            sid = table.procs[pid].sid
            if sid > 0 and sid != os.getsid(0) and table.get(sid) is not None:
                return sid, time.time()
        return None

    async def aclose(self) -> None:
        await self.containment.aclose()
        if self._warm_up is not None:
            with contextlib.suppress(Exception):
                await self._warm_up
            self._warm_up = None
