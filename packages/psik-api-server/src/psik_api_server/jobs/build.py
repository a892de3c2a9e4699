"""Building the job service: :func:`build_job_service` makes its collaborators around
the index, psik and the policy, and wires them (``create_app`` calls it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from psik_api_core import Policy

from ..backends.local.runners import RunnerWatch
from ..backends.psik_backend import PsikBackend
from . import directory as jobdir
from .access import JobAccess
from .callbacks import CallbackRelay
from .creates import JobCreator
from .deps import DependencyGate
from .directory import JobFileInvalid
from .diskfull import DiskFull
from .events import EventHub
from .idempotency import IdempotencyKeys
from .liveness import LivenessLoop
from .locks import JobLocks
from .records import JobRecords
from .recovery import StartupRecovery, UploadSweeper
from .service import JobService
from .slots import JobSlots
from .speclimits import SpecLimits
from .specs import SpecCheck
from .store import JobStore
from .submitter import Submitter
from .watcher import Change, StatusWatcher


def build_job_service(
    store: JobStore,
    backend: PsikBackend,
    policy: Policy,
    *,
    import_owner: str,
    directory_roots: Iterable[Path] = (),
    watch_interval: float = 0.05,
    liveness_interval: float = 2.0,
    clock: Callable[[], float] = time.time,
    callback_url: str | None = None,
    spec_limits: SpecLimits | None = None,
    events: EventHub | None = None,
) -> JobService:
    """The job service with its collaborators built around ``store``, ``backend`` and
    ``policy`` (no I/O: :meth:`JobService.open` starts it).

    ``import_owner``: who owns jobs found without an index row or an owner record;
    ``callback_url``: every job reports to it (see :mod:`.callbacks`);
    ``spec_limits``: what a spec may ask for (token mode, :mod:`.speclimits`)."""
    disk = DiskFull(backend.prefix, store.path)
    locks = JobLocks()
    access = JobAccess(store, policy)
    # Slots of local jobs that said they ended are kept until their runner exits.
    submitter: Submitter | None = None

    def slot_freed() -> None:
        assert submitter is not None
        submitter.fill_slots()

    runners = RunnerWatch(store.release_slot_after, slot_freed)
    records = JobRecords(store, backend, disk, access, runners)
    specs = SpecCheck(
        backend,
        store.path,
        directory_roots=directory_roots,
        callback_url=callback_url,
        spec_limits=spec_limits,
    )
    slots = JobSlots({name: cfg.slot_limit() for name, cfg in backend.settings.items()})
    # The watcher reports to the submitter, which follows the jobs it submits with it.

    async def on_changes(changes: list[Change]) -> None:
        assert submitter is not None
        await submitter.on_changes(changes)

    async def on_broken(invalid: JobFileInvalid, rows: Sequence[jobdir.Row]) -> None:
        assert submitter is not None
        await submitter.on_broken(invalid, rows)

    watcher = StatusWatcher(on_changes, interval=watch_interval, on_broken=on_broken)
    deps = DependencyGate(store, backend, records, access)
    submitter = Submitter(store, backend, records, slots, locks, watcher, clock, deps)
    keys = IdempotencyKeys(store, disk, clock)
    return JobService(
        store=store,
        backend=backend,
        access=access,
        records=records,
        specs=specs,
        creator=JobCreator(store, backend, access, records, specs, keys, submitter, locks, disk),
        submitter=submitter,
        watcher=watcher,
        relay=CallbackRelay(),
        recovery=StartupRecovery(store, backend, submitter, watcher, specs, locks, clock, import_owner),
        liveness=LivenessLoop(store, backend, records, submitter, locks, disk, liveness_interval),
        uploads=UploadSweeper(backend, specs),
        locks=locks,
        disk=disk,
        clock=clock,
        events=events,
    )
