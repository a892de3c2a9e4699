"""Backend drivers: what the server does differently for each psik backend type.

One :class:`BackendDriver` per configured backend *type*, serving every configured
backend of that type; :class:`~psik_api_server.backends.psik_backend.PsikBackend` asks the driver and
never compares type names. The driver class of a type comes from a registry
(:func:`register`, :func:`driver_class`): ``local`` (:mod:`.local`: the launcher, process
containment and liveness), ``slurm`` (:mod:`.slurm`: sbatch, scancel, squeue) and, for
every other type psik knows (nersc, globus, iri, ...), the plain-psik driver
(:mod:`.psik_plain`). Adding a scheduler (PBS, LSF) is one module in this package that
defines a driver class and registers it under its type name, plus its tests: the
package's modules are imported when a driver is first asked for.

A driver is built with the :class:`DriverContext` (the prefix, the launcher, psik's
job manager once loaded, how a job is opened) and the ``{name: settings}`` of its
backends. What it may do, in the order the server asks:

* at configuration time (class methods, no instance): :meth:`~BackendDriver.default_slots`
  and :meth:`~BackendDriver.check_attributes` (also each job's, before it is created);
* at start-up (blocking, in a worker thread): :meth:`~BackendDriver.load`, then
  :meth:`~BackendDriver.adopt_orphans`; in the event loop :meth:`~BackendDriver.warm_up`;
* per request: :meth:`~BackendDriver.health`, :meth:`~BackendDriver.create`,
  :meth:`~BackendDriver.submit`, :meth:`~BackendDriver.cancel`,
  :meth:`~BackendDriver.still_scheduled`;
* in the liveness loop: :meth:`~BackendDriver.vanished` (the index rows of its
  non-final jobs, never the index itself);
* at shut-down: :meth:`~BackendDriver.aclose`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..aio import in_thread
from ..jobs.directory import job_path

if TYPE_CHECKING:
    from psik_api_core import JobSpec

    from ..jobs.callbacks import CallbackRecord
    from ..jobs.directory import JobFiles
    from ..jobs.store import JobRow
    from ..settings import BackendSettings
    from .local.launcher import LocalLauncher

__all__ = [
    "DRIVERS",
    "UNAVAILABLE_INFO",
    "AttributeRefused",
    "BackendDriver",
    "BackendRefused",
    "CancelUnavailable",
    "DriverContext",
    "Finding",
    "driver_class",
    "register",
]


#: How the history's ``failed`` row of a run that was refused because its backend
#: could not be reached begins (a replay of that request is answered 503 again).
UNAVAILABLE_INFO = "backend unavailable"


class AttributeRefused(ValueError):
    """An attribute the backend must not get: ``name`` is the attribute, ``why`` the
    reason (:meth:`BackendDriver.check_attributes` raises it)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"attribute {name[:100]!r} {why}")
        self.name = name
        self.why = why


class BackendRefused(Exception):
    """The backend did not take the job; ``reason`` is what its history records.
    ``unavailable``: the backend could not be reached (try again later)."""

    def __init__(self, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unavailable = unavailable


class CancelUnavailable(Exception):
    """The backend could not be reached to cancel the job; nothing was recorded."""

    def __init__(self, jobid: str, reason: str) -> None:
        super().__init__(reason)
        self.jobid = jobid
        self.reason = reason


class Finding(Protocol):
    """A non-final job the liveness loop found ended without a final row."""

    @property
    def jobid(self) -> str: ...

    @property
    def reason(self) -> str: ...

    def overrules_end(self, files: JobFiles) -> bool:
        """Whether it is recorded even over the end ``files`` now show."""
        ...


@dataclass
class DriverContext:
    """What every driver shares: the prefix (made absolute at start-up), the launcher of
    local jobs, psik's job manager (once loaded) and ``open_job``, which reads a psik
    job whose callbacks go where the server sends them."""

    prefix: Path
    launcher: LocalLauncher
    open_job: Callable[[str], Awaitable[Any]]
    manager: Any = None

    def path(self, jobid: str) -> Path:
        return job_path(self.prefix, jobid)


class BackendDriver:
    """The server's dealings with the backends of one type. The defaults are psik's
    plain ways (what :mod:`.psik_plain` is); a driver overrides what its type does
    otherwise. ``job`` arguments are psik ``Job`` objects, read."""

    #: The type's jobs run on the server's host as the server's user, as processes the
    #: server ends itself (a token-mode server warns; a job's leftovers are ended).
    runs_here: ClassVar[bool] = False
    #: The psik backend module psik's own code uses for this type's jobs (it loads only
    #: its own, ``psik.backends.<type>``): None, the type name; a scheduler psik has no
    #: module for names a stand-in and does its own submit and cancel.
    psik_type: ClassVar[str | None] = None

    def __init__(self, ctx: DriverContext, type_name: str, backends: Mapping[str, BackendSettings]) -> None:
        self.ctx = ctx
        self.type_name = type_name
        self.backends = dict(backends)
        #: psik could load the type (set by :meth:`load`).
        self.loaded = False

    @classmethod
    def default_slots(cls) -> int | None:
        """How many jobs of a backend may run at once unless ``max_running`` says; None: no cap."""
        return None

    @classmethod
    def check_attributes(cls, attributes: Mapping[str, str]) -> None:
        """Raise :class:`AttributeRefused` for an attribute the backend must not get
        (a backend's own at start-up, each job's before it is created)."""

    def load(self) -> str | None:
        """Why psik cannot run this type, or None. Blocking."""
        from psik.backend import check

        try:
            check(self.psik_type or self.type_name)  # type: ignore[no-untyped-call]
        except Exception as e:
            return f"psik cannot load backend type {self.psik_type or self.type_name!r}: {e}"
        self.loaded = True
        return None

    def adopt_orphans(self) -> None:
        """At start-up, once loaded: set right what a server that died mid-submit left. Blocking."""

    def warm_up(self) -> None:
        """Start background work (in the event loop), once loaded."""

    async def health(self, name: str) -> str | None:
        """Why backend ``name`` cannot take jobs now, or None."""
        return None

    async def create(self, spec: JobSpec, record: CallbackRecord | None) -> str:
        """Make the job directory with psik (state ``new``); returns the jobid. A driver
        that makes directories its own way overrides :meth:`create_sync` (a group's jobs
        are made with it, many in one go)."""
        return await in_thread(self.create_sync, spec)

    def create_sync(self, spec: JobSpec) -> str:
        """:meth:`create`, blocking: psik's layout made in one go (``_psik_job.create_sync``).
        The API's own fields (labels, after) are kept beside the job, never given to psik,
        whose spec refuses fields it does not know."""
        from psik.models import JobSpec as PsikJobSpec

        from ._psik_job import create_sync

        return create_sync(self.ctx.manager, PsikJobSpec.model_validate(spec.psik_fields()))

    async def submit(self, job: Any, jobndx: int, waited: int | None) -> tuple[int, str]:
        """Start run ``jobndx``; (jobndx, native id). :class:`BackendRefused` with the
        reason to record; any other exception is recorded as the backend's refusal."""
        ndx, native_id = await job.submit()
        return int(ndx), str(native_id)

    async def cancel(self, job: Any) -> None:
        """Stop the job, ``canceled`` recorded (:class:`CancelUnavailable`: nothing was)."""
        await job.cancel()

    async def still_scheduled(self, files: JobFiles) -> bool:
        """Whether a job whose history says it ended still runs in the backend's view."""
        return False

    async def vanished(self, rows: Sequence[JobRow]) -> list[Finding]:
        """Of ``rows`` (index rows of non-final jobs on this type's backends), the jobs
        that ended without a final row."""
        return []

    async def end_processes(self, jobid: str, run: int, runner: tuple[int, float] | None) -> None:
        """End what run ``run`` of ``jobid`` left running here (only if :attr:`runs_here`)."""

    async def aclose(self) -> None:
        """Stop background work."""


#: {type name: driver class}; ``"*"``: the driver of every other type (:func:`register`).
DRIVERS: dict[str, type[BackendDriver]] = {}
#: The key of the driver of every type without one of its own.
_FALLBACK = "*"


def register(type_name: str) -> Callable[[type[BackendDriver]], type[BackendDriver]]:
    """Class decorator: the driver of backend type ``type_name`` (``"*"``: of every type
    no driver is registered for)."""

    def add(cls: type[BackendDriver]) -> type[BackendDriver]:
        DRIVERS[type_name] = cls
        return cls

    return add


def driver_class(type_name: str) -> type[BackendDriver]:
    """The driver class of backend type ``type_name``: its own, else the plain-psik one.
    The drivers that come with the server are this package's public modules, imported
    on first use rather than with the package (they import the server's modules, which
    may import this one): a new one is found by being here."""
    if _FALLBACK not in DRIVERS:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
    return DRIVERS.get(type_name) or DRIVERS[_FALLBACK]
