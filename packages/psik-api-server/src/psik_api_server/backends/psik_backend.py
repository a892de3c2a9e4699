"""The adapter between the server and psik: create, submit, cancel and remove jobs.

psik does the job work (directories, status.csv, backends); its own file I/O goes
through ``anyio.Path``, i.e. worker threads, and what is added here does the same.
What differs by backend type is its driver's (:mod:`.backends`: local, Slurm, plain
psik), looked up in a registry, never by comparing type names. Added here for every
type: a submission that cannot work (a missing interpreter, a backend error) is refused
with a reason *and* recorded in the job's history as ``failed``, so no job is left in
``new``; job directories are owner-only; a job's callbacks are posted in the background,
with a timeout (:meth:`PsikBackend._send_callback`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from psik_api_core import BackendInfo, JobSpec, JobState

from ..aio import in_thread
from ..errors import StartupError
from ..jobs import directory as jobdir
from ..jobs.callbacks import CallbackRecord, psik_sender, write_record
from ..jobs.directory import JobFileInvalid, check_job_files, job_path
from ..jobs.store import JobRow
from ..settings import BackendSettings
from . import BackendDriver, BackendRefused, DriverContext, Finding, driver_class
from .local.launcher import LocalLauncher, forget_slot_wait

_logger = logging.getLogger(__name__)


class SubmitError(Exception):
    """The backend did not take the job; the message says why (already in its history).
    ``unavailable``: the backend could not be reached (try again later), rather than
    refused this job."""

    def __init__(self, jobid: str, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.jobid = jobid
        self.reason = reason
        self.unavailable = unavailable


def one_line(text: str, limit: int = 500) -> str:
    # A newline (or a lone CR) inside `info` would break the status.csv row.
    return " ".join(text.split())[:limit]


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
    await in_thread(check_job_files, base)
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
    """psik's JobManager and a driver per backend type, for one prefix and its named backends."""

    def __init__(
        self,
        prefix: Path,
        backends: Mapping[str, BackendSettings],
        launcher: LocalLauncher | None = None,
    ) -> None:
        """Only remembers its arguments and builds the drivers: :meth:`open` does the
        filesystem work."""
        self.settings = dict(backends)
        self.health: dict[str, str | None] = {}
        self._launcher = launcher or LocalLauncher(prefix.expanduser().parent / "launcher.log")
        self._callbacks: set[asyncio.Task[None]] = set()
        self._ctx = DriverContext(prefix.expanduser(), self._launcher, self._open_job)
        by_type: dict[str, dict[str, BackendSettings]] = {}
        for name, cfg in self.settings.items():
            by_type.setdefault(cfg.type, {})[name] = cfg
        #: {type name: its driver}, serving every configured backend of that type.
        self.drivers: dict[str, BackendDriver] = {
            t: driver_class(t)(self._ctx, t, cfgs) for t, cfgs in by_type.items()
        }

    @property
    def prefix(self) -> Path:
        return self._ctx.prefix

    def driver(self, name: str) -> BackendDriver:
        """The driver of the configured backend ``name``."""
        return self.drivers[self.settings[name].type]

    def _job_driver(self, job: Any) -> BackendDriver:
        """The driver of a psik job: its backend's, else (a backend no longer configured)
        that of the type its history records, made for the occasion if need be."""
        if job.spec.backend in self.settings:
            return self.driver(job.spec.backend)
        type_name = job.info.backend.type
        found = self.drivers.get(type_name)
        return found if found is not None else driver_class(type_name)(self._ctx, type_name, {})

    def open(self) -> None:
        """Create the prefix (owner-only), load psik and each backend type. Blocking:
        run it in a worker thread (the app's lifespan does)."""
        # psik is imported here, not at module level: it costs ~0.5 s and only the
        # server process (and the launcher) need it.
        from psik.config import Config
        from psik.manager import JobManager
        from psik.models import BackendConfig

        # Job directories hold scripts, outputs and psik's spec.json (with any callback
        # secret in clear): a prefix we create is the owner's alone.
        self._ctx.prefix.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ctx.prefix = self._ctx.prefix.resolve()
        # In every mode: a prefix another user made (first, or in between) is theirs to
        # fill with job directories of their choosing; never use one.
        owner = self._ctx.prefix.stat().st_uid
        if owner != os.geteuid():
            raise StartupError(
                f"prefix {self._ctx.prefix} belongs to uid {owner}, not to this server's user "
                f"(uid {os.geteuid()}): use a prefix of your own"
            )
        usable: dict[str, BackendConfig] = {}
        for driver in self.drivers.values():
            why = driver.load()
            for name in driver.backends:
                self.health[name] = why
                if why is not None:
                    _logger.error("backend %s: %s", name, why)
                else:
                    fields = self.settings[name].psik_fields()
                    usable[name] = BackendConfig(**{**fields, "type": driver.psik_type or fields["type"]})
        self._ctx.manager = JobManager(Config(prefix=self._ctx.prefix, backends=usable))
        for driver in self.drivers.values():
            if driver.loaded:
                driver.adopt_orphans()

    def warm_up(self) -> None:
        """Start each loaded driver's background work (local jobs: the launcher and the
        sweep of finished jobs' leftovers)."""
        for driver in self.drivers.values():
            if driver.loaded:
                driver.warm_up()

    async def live_info(self, name: str) -> BackendInfo:
        """:meth:`info`, with the backend's live health asked of its driver (a Slurm
        backend's controller and partition, cached)."""
        if not self.usable(name):
            return self.info(name)
        return self.info(name, await self.driver(name).health(name))

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
        """Whether backend ``name``'s jobs run here, as processes the server ends itself."""
        return name in self.settings and self.driver(name).runs_here

    def usable(self, name: str) -> bool:
        return name in self.settings and self.health.get(name) is None

    def check_attributes(self, name: str, attributes: Mapping[str, str]) -> None:
        """:class:`~.backends.AttributeRefused` for an attribute backend ``name`` must not get."""
        self.driver(name).check_attributes(attributes)

    def path(self, jobid: str) -> Path:
        return job_path(self.prefix, jobid)

    async def create(self, spec: JobSpec, record: CallbackRecord | None = None) -> str:
        """Make the job directory (state ``new``), with the job's callback ``record``
        if it has one; returns the jobid."""
        jobid = await self.driver(spec.backend).create(spec, record)
        await in_thread(self._finish_create, jobid, record)
        return jobid

    def create_sync(self, spec: JobSpec, record: CallbackRecord | None = None) -> str:
        """:meth:`create`, blocking (many jobs in one worker-thread trip: a group's),
        through the driver's ``create_sync``."""
        jobid = self.driver(spec.backend).create_sync(spec)
        self._finish_create(jobid, record)
        return jobid

    def _finish_create(self, jobid: str, record: CallbackRecord | None) -> None:
        """The new directory made the owner's alone, with the callback record; on a
        failure nothing is left of it."""
        base = self.path(jobid)
        try:
            # psik makes it with the umask's mode: the job's files are the owner's alone.
            _owner_only(base)
            if record is not None:
                # A job whose reports would all be refused must not be: nobody knows it yet.
                write_record(base, record)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise

    async def submit(self, jobid: str, *, waited: int | None = None) -> tuple[int, str]:
        """Submit the job; on failure record ``failed`` in its history and raise SubmitError.
        ``waited``: start that run, which has waited for a job slot (:meth:`wait_for_slot`)."""
        base = self.path(jobid)
        async with _psik_job(base):
            job = await self._open_job(jobid)
        if waited is not None:
            forget_slot_wait(job, waited)
        jobndx = job.summarize()[0]
        driver = self._job_driver(job)
        unavailable = False
        try:
            return await driver.submit(job, jobndx, waited)
        except BackendRefused as e:
            reason, unavailable = e.reason, e.unavailable
        except Exception as e:
            reason = f"{driver.type_name} backend refused the job: {e}"
        await self.record_failure(jobid, jobndx, reason)
        raise SubmitError(jobid, reason, unavailable=unavailable)

    async def wait_for_slot(self, jobid: str, why: str, run: int | None = None) -> tuple[int, float]:
        """Record the job's next run (or run ``run``, which waited for other jobs) as
        ``queued``, waiting for a job slot or for other jobs (``why`` starts with
        ``SLOT_WAIT_INFO`` or ``DEPENDENCY_WAIT_INFO``); nothing is started. Returns the
        run's jobndx and the row's time."""
        from psik.job import Job as PsikJob
        from psik.models import JobState as PsikJobState

        async with _psik_job(self.path(jobid)):
            job = await PsikJob(self.path(jobid))
            jobndx = job.summarize()[0] if run is None else run
            now = time.time()
            # backdate: the backend's own `queued` row, when the job starts, fires the callback.
            await job.reached(jobndx, PsikJobState.queued, one_line(why), backdate=now)
        return jobndx, now

    def wait_for_slot_sync(self, jobid: str, why: str) -> tuple[int, float, list[jobdir.Row]]:
        """:meth:`wait_for_slot` of a job's next run, blocking and without psik's ``Job``
        (many jobs in one worker-thread trip: a group's): the same row, under the same lock;
        with the job's history, that row last. :class:`JobFileInvalid` for files the job
        made invalid."""
        base = self.path(jobid)
        check_job_files(base)
        history = jobdir.read_history(base)
        jobndx = max((r.jobndx for r in history), default=0) + 1  # psik's summarize()
        now = time.time()
        info = one_line(why)
        jobdir.append_row(base, now, jobndx, JobState.queued, info)
        return jobndx, now, [*history, jobdir.Row(now, jobndx, JobState.queued, info)]

    async def record_failure(self, jobid: str, jobndx: int, reason: str) -> None:
        """Append ``failed`` for run ``jobndx`` to the job's history, with ``reason``."""
        from psik.job import Job as PsikJob
        from psik.models import JobState as PsikJobState

        async with _psik_job(self.path(jobid)):
            job = PsikJob(self.path(jobid))  # not awaited: appending needs no read
            # backdate: record only; psik would otherwise also fire the job's callback here.
            await job.reached(jobndx, PsikJobState.failed, one_line(reason), backdate=time.time())

    async def record_canceled(self, jobid: str, run: int | None, reason: str) -> int:
        """Append ``canceled`` for run ``run`` (None: the next run) to the job's history,
        with ``reason``, for a run never launched (its dependencies cannot be met); the
        job's callback, if it has one, is told. Returns the run."""
        from psik.models import JobState as PsikJobState

        async with _psik_job(self.path(jobid)):
            job = await self._open_job(jobid)
            jobndx = job.summarize()[0] if run is None else run
            await job.reached(jobndx, PsikJobState.canceled, one_line(reason))
        return int(jobndx)

    async def cancel(self, jobid: str) -> None:
        """Ask the backend (its driver) to stop the job; ``canceled`` is recorded, by
        psik's rule before any signal is sent. :class:`~.backends.CancelUnavailable` if
        the backend cannot be reached; :class:`JobFileInvalid` if the job's files are
        not sane (nothing recorded)."""
        async with _psik_job(self.path(jobid)):
            job = await self._open_job(jobid)
            await self._job_driver(job).cancel(job)

    async def still_scheduled(self, files: jobdir.JobFiles) -> bool:
        """Whether a job whose history says it ended is still run by its scheduler (a
        Slurm job that wrote its own end row while squeue shows it running): cancel
        ends it all the same."""
        cfg = self.settings.get(files.spec.backend)
        return cfg is not None and await self.drivers[cfg.type].still_scheduled(files)

    async def vanished(self, rows: Sequence[JobRow]) -> list[Finding]:
        """Of ``rows`` (the index rows of the non-final jobs), those each backend's driver
        finds ended without a final row."""
        found: list[Finding] = []
        for driver in self.drivers.values():
            found += await driver.vanished([r for r in rows if r.backend in driver.backends])
        return found

    async def end_processes(self, jobid: str, run: int, runner: tuple[int, float] | None) -> None:
        """End every process of run ``run`` of the job ``jobid`` on a backend whose jobs
        run here (``runner``: psik's runner, if known), as a cancel does, with nothing
        recorded in its files."""
        for driver in self.drivers.values():
            if driver.runs_here:
                await driver.end_processes(jobid, run, runner)
                return

    async def _open_job(self, jobid: str) -> Any:
        """The psik job, read, whose callbacks :meth:`_send_callback` posts."""
        from ._psik_job import open_job

        return await open_job(self.path(jobid), self._send_callback)

    async def _send_callback(self, job: Any, jobndx: int, state: Any, info: str) -> bool:
        """psik awaits a job's callback POST inside submit() and cancel(), with aiohttp's
        5-minute default timeout, and a failed POST stops cancel() before it signals the
        job. Here the POST is made in the background, with a timeout, and its failure
        only logged: the job's own state never waits on someone else's web server."""
        send = psik_sender(job)  # psik's own trusts the environment (netrc, proxies)
        task = asyncio.get_running_loop().create_task(_post_callback(send, job.stamp, jobndx, state, info))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)
        return True

    async def remove(self, jobid: str) -> None:
        """Delete the job's directory (only ever called for final jobs)."""
        base = self.path(jobid)
        await in_thread(shutil.rmtree, base, ignore_errors=True)

    async def aclose(self) -> None:
        for task in list(self._callbacks):
            task.cancel()
        for driver in self.drivers.values():
            await driver.aclose()
        await self._launcher.aclose()
