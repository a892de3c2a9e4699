"""The adapter between the server and psik: create, submit, cancel and remove jobs.

psik does the job work (directories, status.csv, backends); its own file I/O goes
through ``anyio.Path``, i.e. worker threads, and what is added here does the same. Added:
local submissions go through the :class:`~psik_api_server.launcher.LocalLauncher`; a
submission that cannot work (a missing interpreter, a backend error) is refused with a
reason *and* recorded in the job's history as ``failed``, so no job is left in ``new``;
local jobs are contained (:mod:`.containment`): a cancel ends the job's whole process
tree, and what a finished job left running is ended; job directories are owner-only.
Slurm jobs are submitted by :mod:`.slurm` (sbatch's own message is the reason of a
refusal; attributes meant for psik never reach sbatch), and each Slurm backend's health
is asked of its controller (cached a few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread

from psik_api_core import OVERRULED_INFO, BackendInfo, JobSpec

from . import jobdir, slurm
from .callbacks import CallbackRecord, psik_sender, write_record
from .containment import Containment
from .jobdir import JobFileInvalid, check_job_files, job_path
from .launcher import LaunchError, LocalLauncher, forget_slot_wait
from .liveness import local_pid
from .proctree import ProcessTable
from .settings import BackendSettings

_logger = logging.getLogger(__name__)


#: How the history's ``failed`` row of a run that was refused because its backend
#: could not be reached begins (a replay of that request is answered 503 again).
UNAVAILABLE_INFO = "backend unavailable"


class SubmitError(Exception):
    """The backend did not take the job; the message says why (already in its history).
    ``unavailable``: the backend could not be reached (try again later), rather than
    refused this job."""

    def __init__(self, jobid: str, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.jobid = jobid
        self.reason = reason
        self.unavailable = unavailable


class CancelUnavailable(Exception):
    """The backend could not be reached to cancel the job; nothing was recorded."""

    def __init__(self, jobid: str, reason: str) -> None:
        super().__init__(reason)
        self.jobid = jobid
        self.reason = reason


def one_line(text: str, limit: int = 500) -> str:
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


def _owner_only(base: Path) -> None:
    """Make a new job directory and what psik put in it the owner's alone: the directory
    first (0700 shields all below it), then spec.json (the environment, any callback
    secret) and status.csv (0600), and log/ and work/ (0700), so that none of them is
    readable by others should the directory's mode ever be loosened. Files the job itself
    writes later follow the owner's umask, inside those directories."""
    os.chmod(base, 0o700)
    for name, mode in (("spec.json", 0o600), ("status.csv", 0o600), ("log", 0o700), ("work", 0o700)):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(base / name, mode, follow_symlinks=False)


#: A status.csv the job made unwritable (chmod, or chattr +i when the server is root).
_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM})


@contextlib.asynccontextmanager
async def _psik_job(base: Path) -> AsyncIterator[None]:
    """Around handing the job at ``base`` to psik, which opens its spec.json and
    status.csv with plain blocking opens: they are checked to be sane regular files
    first (a FIFO would hold psik's open, and a worker thread, for ever), and a
    status.csv psik cannot append to is :class:`JobFileInvalid` too (the job's own
    doing), never an internal error."""
    await anyio.to_thread.run_sync(check_job_files, base)
    try:
        yield
    except PermissionError as e:
        if e.errno not in _UNWRITABLE or Path(e.filename or "").name != "status.csv":
            raise
        raise JobFileInvalid(base, "status.csv", f"cannot be written ({e.strerror})") from e


#: How long a job's callback POST may take before it is given up (and logged).
CALLBACK_TIMEOUT = 30.0


async def _post_callback(
    send: Callable[[int, Any, str], Awaitable[bool]], jobid: str, jobndx: int, state: Any, info: str
) -> None:
    try:
        await asyncio.wait_for(send(jobndx, state, info), CALLBACK_TIMEOUT)
    except Exception as e:
        _logger.warning("job %s: callback for %s not delivered: %s", jobid, getattr(state, "value", state), e)


class PsikBackend:
    """psik's JobManager plus the launcher, for one prefix and its named backends."""

    def __init__(
        self,
        prefix: Path,
        backends: Mapping[str, BackendSettings],
        launcher: LocalLauncher | None = None,
    ) -> None:
        """Only remembers its arguments: :meth:`open` does the filesystem work."""
        self.prefix = prefix.expanduser()
        self.settings = dict(backends)
        self.health: dict[str, str | None] = {}
        self._manager: Any = None
        self._launcher = launcher or LocalLauncher(self.prefix.parent / "launcher.log")
        self._warm_up: asyncio.Task[object] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        #: Each Slurm backend's controller and partition, asked when someone wants to know.
        self.slurm_health = {
            name: slurm.SlurmHealth(cfg.queue_name)
            for name, cfg in self.settings.items()
            if cfg.type == "slurm"
        }
        self.containment = Containment(
            self.prefix, {name for name, cfg in self.settings.items() if cfg.type == "local"}
        )

    def open(self) -> None:
        """Create the prefix (owner-only), load psik and each backend type. Blocking:
        run it in a worker thread (the app's lifespan does)."""
        # psik is imported here, not at module level: it costs ~0.5 s and only the
        # server process (and the launcher) need it.
        from psik.backend import check
        from psik.config import Config
        from psik.manager import JobManager
        from psik.models import BackendConfig

        # Job directories hold scripts, outputs and psik's spec.json (with any callback
        # secret in clear): a prefix we create is the owner's alone.
        self.prefix.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prefix = self.containment.prefix = self.prefix.resolve()
        usable: dict[str, BackendConfig] = {}
        for name, cfg in self.settings.items():
            try:
                check(cfg.type)  # type: ignore[no-untyped-call]
            except Exception as e:
                self.health[name] = f"psik cannot load backend type {cfg.type!r}: {e}"
                _logger.error("backend %s: %s", name, self.health[name])
                continue
            self.health[name] = None
            usable[name] = BackendConfig(**cfg.psik_fields())
        self._manager = JobManager(Config(prefix=self.prefix, backends=usable))
        if any(cfg.type == "slurm" for cfg in usable.values()):
            self._adopt_slurm_orphans()

    def _adopt_slurm_orphans(self) -> None:
        """A server killed while sbatch ran leaves a Slurm job no status row names: give
        each job its Slurm job back (:func:`.slurm.adopt`), and cancel any further ones
        (a job is one Slurm job per run). Blocking; the controller down: nothing done."""
        from . import slurm

        found = slurm.jobs_by_console(self.prefix)
        for jobid, nids in (found or {}).items():
            base = self.path(jobid)
            try:
                adopted, extra = slurm.adopt(base, nids, time.time())
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
                    timeout=slurm.COMMAND_TIMEOUT,
                    check=False,
                )

    def warm_up(self) -> None:
        """Start the background work of local jobs: the launcher now (unless it is a lazy
        one), so that the first local submit does not wait for it, and the sweep that
        ends what finished jobs leave running (also the leftovers of jobs that ended
        while the server was down)."""
        if not any(cfg.type == "local" and self.usable(name) for name, cfg in self.settings.items()):
            return
        if self.containment.supported:
            self.containment.start()
        if self._warm_up is None and self._launcher.eager:
            self._warm_up = asyncio.get_running_loop().create_task(self._launcher.start())

    async def live_info(self, name: str) -> BackendInfo:
        """:meth:`info`, with a Slurm backend's controller and partition asked (cached)."""
        check = self.slurm_health.get(name)
        if check is None or not self.usable(name):
            return self.info(name)
        return self.info(name, await check.check())

    def info(self, name: str, live: str | None = None) -> BackendInfo:
        """The backend as configured; ``live``: why it cannot take jobs now, if it cannot."""
        cfg = self.settings[name]
        detail = self.health.get(name) or live
        return BackendInfo(
            name=name,
            type=cfg.type,
            queue_name=cfg.queue_name,
            project_name=cfg.project_name,
            healthy=detail is None,
            detail=detail,
        )

    def is_local(self, name: str) -> bool:
        return name in self.settings and self.settings[name].type == "local"

    def usable(self, name: str) -> bool:
        return name in self.settings and self.health.get(name) is None

    def path(self, jobid: str) -> Path:
        return job_path(self.prefix, jobid)

    async def create(self, spec: JobSpec, record: CallbackRecord | None = None) -> str:
        """Make the job directory (state ``new``), with the job's callback ``record``
        if it has one; returns the jobid."""
        from psik.models import JobSpec as PsikJobSpec

        pspec = PsikJobSpec.model_validate(spec.model_dump())
        job = await self._manager.create(pspec)
        base = self.path(str(job.stamp))
        # psik makes it with the umask's mode: the job's files are the owner's alone.
        await anyio.to_thread.run_sync(_owner_only, base)
        if record is not None:
            try:
                await anyio.to_thread.run_sync(write_record, base, record)
            except BaseException:
                # A job whose reports would all be refused must not be: nobody knows it yet.
                with anyio.CancelScope(shield=True):
                    await self.remove(str(job.stamp))
                raise
        return str(job.stamp)

    async def submit(self, jobid: str, *, waited: int | None = None) -> tuple[int, str]:
        """Submit the job; on failure record ``failed`` in its history and raise SubmitError.
        ``waited``: start that run, which has waited for a job slot (:meth:`wait_for_slot`)."""
        from psik.job import Job as PsikJob

        base = self.path(jobid)
        async with _psik_job(base):
            job = await PsikJob(base)
        if waited is not None:
            forget_slot_wait(job, waited)
        jobndx = job.summarize()[0]
        btype = job.info.backend.type
        spec = JobSpec.model_validate(job.spec.model_dump())
        reason = await anyio.to_thread.run_sync(missing_interpreter, spec) if btype == "local" else None
        unavailable = False
        if reason is None:
            try:
                if btype == "local":
                    return await self._launcher.submit(base, waited)
                self._defer_callbacks(job)
                if btype == "slurm":
                    return jobndx, await self._submit_slurm(job, jobndx)
                jobndx, native_id = await job.submit()
                return int(jobndx), str(native_id)
            except slurm.SbatchRefused as e:
                unavailable = e.unavailable
                if unavailable:
                    reason = f"{UNAVAILABLE_INFO}: Slurm backend {spec.backend!r} cannot be reached: {e}"
                else:
                    reason = f"sbatch refused the job: {e}"
            except (LaunchError, Exception) as e:
                reason = f"{btype} backend refused the job: {e}"
        await self.record_failure(jobid, jobndx, reason)
        raise SubmitError(jobid, reason, unavailable=unavailable)

    async def _submit_slurm(self, job: Any, jobndx: int) -> str:
        """sbatch the run (see :mod:`.slurm`) and send its ``queued`` callback, as psik's
        submit does. A refusal makes the backend's health be asked afresh."""
        from psik.models import JobState as PsikJobState

        check = self.slurm_health.get(job.spec.backend)
        try:
            native_id = await slurm.submit(job, jobndx)
        except slurm.SbatchRefused as e:
            if check is not None:
                check.forget()
                why = await check.check()
                if why is not None and not e.unavailable and "unreachable" in why:
                    raise slurm.SbatchRefused(str(e), unavailable=True) from e
            raise
        await job.send_callback(jobndx, PsikJobState.queued, native_id)
        return native_id

    async def wait_for_slot(self, jobid: str, why: str) -> tuple[int, float]:
        """Record the job's next run as ``queued``, waiting for a job slot (``why`` starts
        with ``SLOT_WAIT_INFO``); nothing is started. Returns the run's jobndx and the
        row's time."""
        from psik.job import Job as PsikJob
        from psik.models import JobState as PsikJobState

        async with _psik_job(self.path(jobid)):
            job = await PsikJob(self.path(jobid))
            jobndx = job.summarize()[0]
            now = time.time()
            # backdate: the backend's own `queued` row, when the job starts, fires the callback.
            await job.reached(jobndx, PsikJobState.queued, one_line(why), backdate=now)
        return jobndx, now

    async def record_failure(self, jobid: str, jobndx: int, reason: str) -> None:
        """Append ``failed`` for run ``jobndx`` to the job's history, with ``reason``."""
        from psik.job import Job as PsikJob
        from psik.models import JobState as PsikJobState

        async with _psik_job(self.path(jobid)):
            job = PsikJob(self.path(jobid))  # not awaited: appending needs no read
            # backdate: record only; psik would otherwise also fire the job's callback here.
            await job.reached(jobndx, PsikJobState.failed, one_line(reason), backdate=time.time())

    async def cancel(self, jobid: str) -> None:
        """Ask the backend to stop the job; ``canceled`` is recorded first.

        A local job's whole process tree gets SIGTERM now and SIGKILL after the grace
        period (:mod:`.containment`), instead of psik's SIGTERM to its runner alone.
        Returns once SIGTERM is sent: the SIGKILL does not hold up the caller.
        :class:`JobFileInvalid` if the job's files are not sane (nothing recorded)."""
        async with _psik_job(self.path(jobid)):
            await self._cancel(jobid)

    async def _cancel(self, jobid: str) -> None:
        from psik.job import Job as PsikJob
        from psik.models import JobState as PsikJobState

        job = await PsikJob(self.path(jobid))
        self._defer_callbacks(job)
        if job.info.backend.type == "slurm":
            await self._cancel_slurm(jobid, job)
            return
        if job.info.backend.type != "local" or not self.containment.supported:
            await job.cancel()
            return
        with self.containment.hold(jobid):  # the sweep would see it final and race us
            files = await anyio.to_thread.run_sync(jobdir.read_job, self.path(jobid))
            run, runner = files.state[1], local_pid(files)
            # As psik's cancel does, `canceled` before any signal: whatever the job's
            # processes record as they die comes after it and changes nothing.
            await job.reached(0, PsikJobState.canceled)
            await anyio.to_thread.run_sync(self.containment.end_job, jobid, run, runner)
        self.containment.start()
        self.containment.wake()

    async def still_scheduled(self, files: jobdir.JobFiles) -> bool:
        """Whether a job whose history says it ended is still run by its scheduler: a
        Slurm job that wrote its own ``completed``/``failed`` row (the job can) while squeue
        shows it pending or running. Cancel ends it all the same: Slurm's view is trusted
        over a row the job could write."""
        from . import slurm_liveness

        cfg = self.settings.get(files.spec.backend)
        if cfg is None or cfg.type != "slurm":
            return False
        nid = slurm_liveness.claimed_end(files)
        return nid is not None and await slurm_liveness.still_runs(nid)

    async def _cancel_slurm(self, jobid: str, job: Any) -> None:
        """scancel first, then ``canceled``: psik's cancel records ``canceled`` and only
        logs a failed scancel, so with the controller unreachable the job was said to be
        canceled while Slurm went on to run it. Here a controller that cannot be reached
        is :class:`CancelUnavailable` and nothing is recorded (cancel again later); an
        scancel refused otherwise (the job already gone from Slurm) changes nothing.
        A run that recorded its own end while Slurm still runs it (:meth:`still_scheduled`)
        is cancelled too, its ``canceled`` row marked to overrule that end."""
        from psik.models import JobState as PsikJobState

        from . import slurm
        from .slurm_liveness import run_native_id

        files = await anyio.to_thread.run_sync(jobdir.read_job, self.path(jobid))
        state, run = files.state
        nid = run_native_id(files)
        if nid is not None:
            said = await slurm.cancel([nid])
            if said is not None and slurm.unreachable(said):
                raise CancelUnavailable(jobid, f"scancel {nid}: {said}")
        if state.is_final:
            why = f"{OVERRULED_INFO}: Slurm job {nid} still ran after the job recorded {state.value}"
            await job.reached(run, PsikJobState.canceled, why)
        else:
            await job.reached(0, PsikJobState.canceled)

    async def end_processes(self, jobid: str, run: int, runner: tuple[int, float] | None) -> None:
        """End every process of run ``run`` of the local job ``jobid`` (``runner``: psik's
        runner, if known), as a cancel does, with nothing recorded in its files."""
        if not self.containment.supported:
            return
        if runner is None:
            runner = await anyio.to_thread.run_sync(self._runner_of, jobid, run)
        with self.containment.hold(jobid):
            await anyio.to_thread.run_sync(self.containment.end_job, jobid, run, runner)
        self.containment.start()
        self.containment.wake()

    def _runner_of(self, jobid: str, run: int) -> tuple[int, float] | None:
        """psik's runner of a run whose status.csv cannot be read: the leader of the
        session a process of the run is in (psik setsid()s each run's runner), else None.
        Blocking (reads /proc)."""
        table = ProcessTable.read()
        base = str(self.path(jobid))
        for pid, (tagged, tagged_run) in table.tagged().items():
            if tagged_run != run or os.path.realpath(tagged) != base:
                continue
            sid = table.procs[pid].sid
            if sid > 0 and sid != os.getsid(0) and table.get(sid) is not None:
                return sid, time.time()
        return None

    def _defer_callbacks(self, job: Any) -> None:
        """psik awaits a job's callback POST inside submit() and cancel(), with aiohttp's
        5-minute default timeout, and a failed POST stops cancel() before it signals the
        job. Here the POST is made in the background, with a timeout, and its failure
        only logged: the job's own state never waits on someone else's web server."""
        send = psik_sender(job)  # psik's own trusts the environment (netrc, proxies)

        async def deferred(jobndx: int, state: Any, info: str) -> bool:
            task = asyncio.get_running_loop().create_task(
                _post_callback(send, job.stamp, jobndx, state, info)
            )
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
            return True

        job.send_callback = deferred

    async def remove(self, jobid: str) -> None:
        """Delete the job's directory (only ever called for final jobs)."""
        base = self.path(jobid)
        await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    async def aclose(self) -> None:
        for task in list(self._callbacks):
            task.cancel()
        await self.containment.aclose()
        if self._warm_up is not None:
            with contextlib.suppress(Exception):
                await self._warm_up
            self._warm_up = None
        await self._launcher.aclose()
