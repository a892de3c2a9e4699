"""The adapter between the server and psik: create, submit, cancel and remove jobs.

psik does the job work (directories, status.csv, backends). Two things are added here:
local submissions go through the :class:`~psik_api_server.launcher.LocalLauncher`, and a
submission that cannot work (a missing interpreter, a backend error) is refused with a
reason *and* recorded in the job's history as ``failed``, so no job is left in ``new``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from psik_api_core import BackendInfo, JobSpec

from .jobdir import job_path
from .launcher import LaunchError, LocalLauncher
from .settings import BackendSettings

_logger = logging.getLogger(__name__)


class SubmitError(Exception):
    """The backend did not take the job; the message says why (already in its history)."""

    def __init__(self, jobid: str, reason: str) -> None:
        super().__init__(reason)
        self.jobid = jobid
        self.reason = reason


def _one_line(text: str, limit: int = 500) -> str:
    # A newline (or a lone CR) inside `info` would break the status.csv row.
    return " ".join(text.split())[:limit]


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


class PsikBackend:
    """psik's JobManager plus the launcher, for one prefix and its named backends."""

    def __init__(
        self,
        prefix: Path,
        backends: Mapping[str, BackendSettings],
        launcher: LocalLauncher | None = None,
    ) -> None:
        import psik  # the one place the server imports psik's job machinery
        import psik.backend

        self.prefix = prefix.expanduser()
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.prefix = self.prefix.resolve()
        self.settings = dict(backends)
        self.health: dict[str, str | None] = {}
        usable: dict[str, psik.BackendConfig] = {}
        for name, cfg in self.settings.items():
            try:
                psik.backend.check(cfg.type)
            except Exception as e:
                self.health[name] = f"psik cannot load backend type {cfg.type!r}: {e}"
                _logger.error("backend %s: %s", name, self.health[name])
                continue
            self.health[name] = None
            usable[name] = psik.BackendConfig(**cfg.psik_fields())
        self._manager = psik.JobManager(psik.Config(prefix=self.prefix, backends=usable))
        self._launcher = launcher or LocalLauncher(self.prefix.parent / "launcher.log")

    def info(self, name: str) -> BackendInfo:
        cfg = self.settings[name]
        detail = self.health.get(name)
        return BackendInfo(
            name=name,
            type=cfg.type,
            queue_name=cfg.queue_name,
            project_name=cfg.project_name,
            healthy=detail is None,
            detail=detail,
        )

    def usable(self, name: str) -> bool:
        return name in self.settings and self.health.get(name) is None

    def path(self, jobid: str) -> Path:
        return job_path(self.prefix, jobid)

    async def create(self, spec: JobSpec) -> str:
        """Make the job directory (state ``new``); returns the jobid."""
        import psik

        pspec = psik.JobSpec.model_validate(spec.model_dump())
        job = await self._manager.create(pspec)
        return str(job.stamp)

    async def submit(self, jobid: str) -> tuple[int, str]:
        """Submit the job; on failure record ``failed`` in its history and raise SubmitError."""
        import psik

        base = self.path(jobid)
        job = await psik.Job(base)
        jobndx = job.summarize()[0]
        btype = job.info.backend.type
        spec = JobSpec.model_validate(job.spec.model_dump())
        reason = missing_interpreter(spec) if btype == "local" else None
        if reason is None:
            try:
                if btype == "local":
                    return await self._launcher.submit(base)
                return await job.submit()
            except (LaunchError, Exception) as e:
                reason = f"{btype} backend refused the job: {e}"
        await job.reached(jobndx, psik.JobState.failed, _one_line(reason), backdate=time.time())
        raise SubmitError(jobid, reason)

    async def cancel(self, jobid: str) -> None:
        """Ask the backend to stop the job; psik records ``canceled`` first."""
        import psik

        job = await psik.Job(self.path(jobid))
        await job.cancel()

    async def remove(self, jobid: str) -> None:
        """Delete the job's directory (only ever called for final jobs)."""
        base = self.path(jobid)
        await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    async def aclose(self) -> None:
        await self._launcher.aclose()
