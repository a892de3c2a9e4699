"""Submitting jobs: the start claim, the job slots, the launch, and the claim's release.

A job is submitted only under its start claim (``JobStore.claim_start``), which the
request that submits it releases with the state it left (:meth:`Submitter.run_claimed`).
On a backend with a slot limit (:mod:`.slots`) the job first takes a slot in the index
(``JobStore.claim_slot``: one conditional UPDATE, so no lock is held across the launch
and submits to one backend launch side by side); with none free it waits, ``queued``
with a slot-wait row, until a job that ends lets the slot filler start it.

A job with ``after`` passes the dependency gate first (:mod:`.deps`): it may wait,
``queued`` with a dependency-wait row and holding no slot, until the jobs it names end;
when a job is recorded final here, the jobs waiting for it are reconsidered (started
through the job slots, or canceled) in the background (:meth:`Submitter.parents_ended`).

A job that made its own bookkeeping files invalid is failed here too
(:meth:`Submitter.fail_invalid`): that frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import anyio

from psik_api_core import JobState, ProblemCode, slot_wait

from ..aio import in_thread
from ..backends.local.liveness import runner_pid
from ..backends.psik_backend import PsikBackend, SubmitError
from ..errors import ApiError
from . import directory as jobdir
from .deps import DependencyGate
from .directory import JobFileInvalid
from .locks import JobLocks
from .records import JobFilesInvalid, JobRecords
from .slots import JobSlots
from .store import JobStore
from .watcher import Change, StatusWatcher

_logger = logging.getLogger(__name__)

#: How many jobs with invalid files are remembered as already logged.
_MAX_SAID = 10_000


def not_submitted(jobid: str, reason: str, unavailable: bool) -> ApiError:
    """The answer to a refused submit: 503 if the backend could not be reached (start the
    job again later), else 502; the job exists, failed, with ``reason`` in its history."""
    if unavailable:
        return ApiError(
            ProblemCode.backend_unavailable,
            f"job {jobid} was not submitted: {reason}; it is kept (failed): start it again once the "
            "backend is back",
            jobid=jobid,
        )
    return ApiError(ProblemCode.submit_failed, f"job {jobid} was not submitted: {reason}", jobid=jobid)


class Submitter:
    """Submits jobs and fills job slots (see the module)."""

    def __init__(
        self,
        store: JobStore,
        backend: PsikBackend,
        records: JobRecords,
        slots: JobSlots,
        locks: JobLocks,
        watcher: StatusWatcher,
        clock: Callable[[], float],
        deps: DependencyGate,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.slots = slots
        self.locks = locks
        self.watcher = watcher
        self.clock = clock
        self.deps = deps
        # Jobs whose invalid files were logged already: once per job, not per look.
        self._said_invalid: set[str] = set()
        self._filling: asyncio.Task[None] | None = None
        self._fill_again = False
        self._releasing: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- what the watcher reports ----

    async def on_changes(self, changes: list[Change]) -> None:
        await self.records.record_changes(changes)
        ended = [c.jobid for c in changes if c.state()[0].is_final]
        if ended:
            self.fill_slots()  # a job that ended freed its slot (nothing else frees one)
            self.parents_ended(ended)

    async def on_broken(self, invalid: JobFileInvalid, rows: Sequence[jobdir.Row]) -> None:
        async with self.locks(invalid.jobid):
            await self.fail_invalid(invalid, rows)

    async def fail_invalid(self, invalid: JobFileInvalid, rows: Sequence[jobdir.Row] = ()) -> str:
        """The job made its own status.csv or spec.json unreadable or unwritable (see
        :class:`JobFilesInvalid`): its state can no longer be read nor recorded there, so
        the index records it failed (its job slot is free) and a local job's processes
        are ended (``rows``: what was read of its status.csv before, naming psik's
        runner). Logged once per job. Called holding the job's lock. Returns what was done,
        for an answer."""
        jobid = invalid.jobid
        self.watcher.forget(jobid)
        row = await in_thread(self.store.get, jobid)
        if row is None:
            return ""
        local = self.backend.is_local(row.backend)
        if jobid not in self._said_invalid:
            if len(self._said_invalid) < _MAX_SAID:
                self._said_invalid.add(jobid)
            _logger.warning(
                "%s; the job changed it itself: failed in the index%s",
                invalid,
                ", its processes are ended" if local else "",
            )
        if not row.state.is_final:
            await in_thread(self.store.record_failed, jobid, row.jobndx, self.clock(), str(invalid))
        if local:
            await self.backend.end_processes(jobid, row.jobndx, runner_pid(list(rows)))
        self.fill_slots()
        self.parents_ended([jobid])
        return "; it is recorded failed" + (" and its processes are ended" if local else "")

    # ---- submitting ----

    def wants_slot(self, backend: str) -> int | None:
        """The slot limit to claim a slot under for a new submit to ``backend``; None if
        it has no limit, or if jobs already wait (a new job waits behind them)."""
        limit = self.slots.limit(backend)
        return None if limit is None or self.slots.queue(backend) else limit

    async def run_claimed(
        self, jobid: str, backend: str, slot: bool | None = None, *, after: bool = False
    ) -> jobdir.JobFiles | None:
        """Submit ``jobid`` (its start claim held by the caller, as is its lock), then give
        the claim back with the state the submit left: that one re-read is returned for
        the answer. ``slot``: whether the caller already claimed a slot (None: not tried);
        ``after``: the job has dependencies (it passes their gate first, holding no slot)."""
        try:
            await self.submit(jobid, backend, slot, after=after)
        finally:
            with anyio.CancelScope(shield=True):
                files = await in_thread(self.records.release_start, jobid)
        return files

    async def submit(
        self,
        jobid: str,
        backend: str,
        slot: bool | None = None,
        *,
        waited: int | None = None,
        after: bool = False,
    ) -> None:
        """Submit and follow the job. On a backend with a slot limit and no free slot (or
        others already waiting), the job is recorded ``queued``, waiting for a slot,
        instead (see :mod:`.slots`). ``after``: the job has dependencies; it waits for
        them first, or is canceled, unless they are met (see :mod:`.deps`). ``waited``:
        start that run, which waited for its dependencies."""
        if after:
            try:
                held = await self.deps.hold(jobid)
            except JobFileInvalid as e:  # swapped since it was read: not queued
                raise JobFilesInvalid(e, await self.fail_invalid(e)) from None
            if held:
                self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
                self.parents_ended([jobid])  # if it was canceled, so are the jobs after it
                return
        limit = self.slots.limit(backend)
        if limit is None:
            await self.launch(jobid, waited)
            return
        if slot is None:
            slot = not self.slots.queue(backend) and await in_thread(
                self.store.claim_slot, jobid, backend, limit
            )
        if slot:
            await self._launch_in_slot(jobid, waited)
            return
        try:
            _, since = await self.backend.wait_for_slot(jobid, self.slots.why(backend), waited)
        except JobFileInvalid as e:  # swapped since it was read: not queued
            raise JobFilesInvalid(e, await self.fail_invalid(e)) from None
        self.slots.wait(backend, jobid, since)
        self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
        self.fill_slots()  # a slot may have freed while this one was being recorded

    async def start_claimed_many(self, jobs: Sequence[tuple[str, str, bool]]) -> None:
        """:meth:`run_claimed` of many jobs just made (a group's), each ``(jobid,
        backend, has_after)`` with its start claimed by the caller: those that wait for a
        job slot are recorded so in one worker-thread trip (the common case: a group far
        larger than the slots), the others each as a single start. A job's own refusal
        (its submit failed) is logged, not raised: it is recorded in its history."""
        waiting: dict[str, list[str]] = {}
        for jobid, backend, after in jobs:
            limit = self.slots.limit(backend)
            slot = None
            if not after and limit is not None:
                if self.slots.queue(backend) or waiting.get(backend):
                    waiting.setdefault(backend, []).append(jobid)
                    continue
                slot = await in_thread(self.store.claim_slot, jobid, backend, limit)
                if not slot:
                    waiting.setdefault(backend, []).append(jobid)
                    continue
            async with self.locks(jobid):
                try:
                    await self.run_claimed(jobid, backend, slot, after=after)
                except ApiError as e:
                    _logger.info("job %s: not started: %s", jobid, e.detail)
        for backend, jobids in waiting.items():
            why = self.slots.why(backend)

            def record(
                jobids: list[str] = jobids, why: str = why, backend: str = backend
            ) -> list[tuple[str, float | JobFileInvalid]]:
                out: list[tuple[str, float | JobFileInvalid]] = []
                for jobid in jobids:
                    try:
                        _, since, history = self.backend.wait_for_slot_sync(jobid, why)
                    except JobFileInvalid as e:
                        out.append((jobid, e))
                        self.records.release_start(jobid)
                    except BaseException:
                        self.records.release_start(jobid)
                        raise
                    else:
                        out.append((jobid, since))
                        # The history it has just written: no second read of the job.
                        self.records.release_start_with(jobid, backend, history)
                return out

            for jobid, since in await in_thread(record):
                if isinstance(since, JobFileInvalid):
                    await self.fail_invalid(since)
                    continue
                self.slots.wait(backend, jobid, since)
                self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")
        self.fill_slots()  # slots may have freed meanwhile

    async def _launch_in_slot(self, jobid: str, waited: int | None = None) -> None:
        try:
            await self.launch(jobid, waited)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await in_thread(self.records.release_slot_unless_running, jobid)
            self.fill_slots()
            raise

    async def launch(self, jobid: str, waited: int | None = None) -> None:
        """Submit (``waited``: start that run, which waited for a slot) and follow the job."""
        try:
            await self.backend.submit(jobid, waited=waited)
        except SubmitError as e:
            raise not_submitted(jobid, e.reason, e.unavailable) from e
        except JobFileInvalid as e:  # swapped since it was read: not submitted
            raise JobFilesInvalid(e, await self.fail_invalid(e)) from None
        self.watcher.follow(jobid, self.backend.path(jobid) / "status.csv")

    async def submit_if_new(self, jobid: str) -> bool:
        """Submit ``jobid`` if it is still ``new`` and nobody else is starting it; True
        if this call submitted it."""
        async with self.locks(jobid):
            files = await in_thread(self.records.refresh, jobid, jobdir.read_job_settled)
            if files is None or files.state != (JobState.new, 0):
                return False
            if not await in_thread(self.store.claim_start, jobid, 0):
                return False
            await self.run_claimed(jobid, files.spec.backend, after=bool(files.spec.after))
            return True

    # ---- dependencies ----

    def parents_ended(self, jobids: Sequence[str]) -> None:
        """``jobids`` were recorded final: reconsider, in the background, the jobs waiting
        for them (and, as those end, the jobs waiting for those)."""
        if self._closed:  # shutting down: start-up reconsiders them
            return
        task = asyncio.get_running_loop().create_task(self._parents_ended(list(jobids)), name="dependencies")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _parents_ended(self, parents: list[str]) -> None:
        try:
            while parents:
                children = await in_thread(self.deps.children_sync, parents)
                parents = await self.reconsider(children)
        except Exception:  # the index went (shutting down): start-up reconsiders them
            _logger.exception("reconsidering the jobs waiting for %s", ", ".join(parents[:10]))

    async def reconsider(self, jobids: Sequence[str]) -> list[str]:
        """Start each of ``jobids`` that waits for its dependencies and may start now,
        cancel those that never can; returns the jobs that ended (canceled, or their
        launch refused)."""
        ended: list[str] = []
        for jobid in jobids:
            try:
                if await self._reconsider(jobid):
                    ended.append(jobid)
            except Exception as e:  # one job must not keep the others waiting
                _logger.warning("job %s: its dependencies not reconsidered: %s", jobid, e)
        return ended

    async def _reconsider(self, jobid: str) -> bool:
        async with self.locks(jobid):
            found = await self.deps.reconsider(jobid)
            if found is None or not found[0].met:
                return found is not None and found[0].reason is not None
            _, run, backend = found
            try:
                await self.submit(jobid, backend, waited=run)
            except ApiError as e:  # refused: the job is failed, its history says why
                _logger.warning("job %s: %s", jobid, e)
            files = await in_thread(self.records.refresh, jobid)
            return files is not None and files.state[0].is_final

    # ---- the slot filler ----

    def fill_slots(self) -> None:
        """Start waiting jobs while slots are free, in the background (one filler at a
        time; a call while it runs makes it look again when done)."""
        if not self.slots.backends_waiting():
            return
        if self._filling is not None and not self._filling.done():
            self._fill_again = True
            return
        self._filling = asyncio.get_running_loop().create_task(self._fill(), name="job slots")

    async def _fill(self) -> None:
        while True:
            self._fill_again = False
            for backend in self.slots.backends_waiting():
                for jobid in self.slots.queue(backend):
                    try:
                        if not await self._start_waiting(backend, jobid):
                            break  # no free slot: the next job that ends calls again
                    except Exception as e:  # one job must not keep the others waiting
                        _logger.warning("job %s: not started from the slot queue: %s", jobid, e)
                        self.slots.done(backend, jobid)
            if not self._fill_again:
                return

    async def _start_waiting(self, backend: str, jobid: str) -> bool:
        """Start ``jobid`` if a slot is free and it still waits; False if no slot is free."""
        limit = self.slots.limit(backend)
        assert limit is not None
        async with self.locks(jobid):
            claimed = await in_thread(self._claim_waiting_sync, jobid, backend, limit)
            if claimed is None:
                self.slots.done(backend, jobid)  # purged while it waited: the next one
                return True
            if not claimed:
                return False
            files = await in_thread(self.records.refresh, jobid, jobdir.read_job_settled)
            wait = None if files is None else slot_wait(files.history)
            self.slots.done(backend, jobid)
            if wait is None:  # cancelled (or purged) while it waited
                await in_thread(self.store.release_slot, jobid)
                return True
            try:
                await self._launch_in_slot(jobid, waited=wait[0])
            except ApiError as e:  # refused: the job is failed, its history says why
                _logger.warning("job %s: %s", jobid, e)
            await in_thread(self.records.refresh, jobid)
            return True

    def _claim_waiting_sync(self, jobid: str, backend: str, limit: int) -> bool | None:
        """A slot for a waiting job (True), none free (False), or None: the job is gone."""
        if self.store.claim_slot(jobid, backend, limit):
            return True
        return None if self.store.get(jobid) is None else False

    async def aclose(self) -> None:
        """Stop the slot filler and the reconsidering of dependencies."""
        self._closed = True
        for task in list(self._releasing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
            self._filling = None
