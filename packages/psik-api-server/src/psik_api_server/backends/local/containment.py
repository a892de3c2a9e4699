"""Jobs are contained, as Slurm does: ending a local job ends all of its processes.

psik's local cancel sends SIGTERM to the job's runner only (the process psik recorded);
the runner passes it on to the script's process group, and a child that setsid()s, moves
to another process group or ignores TERM survives. A script that exits leaves its
background processes running. Without cgroups, :class:`Containment` finds a job's
processes in ``/proc`` (see :mod:`psik_api_server.backends.local.proctree`), as the union of

* the runner and its descendants (parent links, read *before* anything is signalled,
  so children orphaned by the TERM are still known);
* the members of the runner's session (psik setsid()s each job) and their descendants;
* every process tagged with the job's directory and run in its environment, and their
  descendants: this finds a process that double-forked away from the job (its parent is
  gone, it is in a session of its own) and a finished job's leftovers, also after a
  restart of the server.

and ends them: SIGTERM to each (once: the processes a TERM handler starts to clean up
are left to do it), then, :data:`GRACE` seconds later, SIGKILL to whatever is left,
processes started meanwhile included. psik's runner passes SIGTERM on to its script's
process group itself, so that group gets it from the runner only. That runs when a job is cancelled
(:meth:`Containment.end_job`) and, for a run that ended (completed, failed, cancelled,
or found vanished) with tagged processes still running, from a sweep every
:data:`SWEEP_INTERVAL` seconds (:meth:`Containment.run`). A psik runner that hangs in
its own SIGTERM handler (psik 3.1.1, when a cancel races the job's start) is one of the
job's processes: it gets SIGKILL after the grace period too.

What is not found: a process that both left the job's process tree and session *and*
dropped the job's environment (``env -i``, a daemon that scrubs it), and processes of
another user. Only ``/proc`` (Linux) gives all this; elsewhere the backend falls back to
psik's own cancel.

The server's own process and its ancestors are never signalled; every signal is checked
against the process's start time first, so a reused PID is left alone. The waiting is
done by an asyncio task, the ``/proc`` reading in worker threads: nothing here blocks
the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from psik_api_core import is_jobid

from ...aio import in_thread, wait_event
from ...jobs import directory as jobdir
from .liveness import started_by
from .proctree import PROC, ProcessTable, boot_time, has_proc, send

_logger = logging.getLogger(__name__)

#: Seconds between a job's SIGTERM and the SIGKILL of what is left (Slurm's KillWait is 30 s).
#: What is left of a grace period when the server stops (seconds).
SHUTDOWN_GRACE = 1.0
GRACE = 5.0
#: Seconds between two looks for the leftovers of ended runs.
SWEEP_INTERVAL = 1.0
#: Seconds after its SIGKILL that a process still there (stuck in the kernel) is given up on.
GIVE_UP = 30.0


@dataclass
class _Ending:
    """One run of one job being ended: what was found of it so far, and when to KILL."""

    jobid: str
    run: int
    why: str
    deadline: float  # monotonic: SIGKILL from then on
    members: dict[int, int] = field(default_factory=dict)  # pid -> start ticks
    sid: int | None = None  # the runner's session, read while the runner lived
    runner: int | None = None  # signalled first, so that psik's handler does its part


class Containment:
    """Ends the processes of local jobs: on cancel, and what ended runs left behind.

    ``local_backends``: the names of the backends whose jobs run on this host. Blocking
    methods (``end_job``, ``sweep``) run in worker threads; one lock makes them take
    turns."""

    def __init__(
        self,
        prefix: Path,
        local_backends: Iterable[str],
        *,
        grace: float = GRACE,
        interval: float = SWEEP_INTERVAL,
        proc: Path = PROC,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.local_backends = set(local_backends)
        self.grace = grace
        self.interval = interval
        self._proc = proc
        self._clock = clock
        self._lock = threading.Lock()
        self._endings: list[_Ending] = []
        self._held: set[str] = set()
        self._dirs: dict[str, bool] = {}  # a tag's parent directory -> is it our prefix?
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def supported(self) -> bool:
        """True where ``/proc`` tells what this needs (Linux)."""
        return has_proc(self._proc)

    @property
    def pending(self) -> int:
        """How many job runs are being ended."""
        return len(self._endings)

    # ---- the blocking part (worker threads) ----

    def end_job(self, jobid: str, run: int, runner: tuple[int, float] | None) -> int:
        """SIGTERM every process of run ``run`` of ``jobid`` now; the sweep sends SIGKILL
        to what is left after the grace period. ``runner``: the PID psik recorded for the
        run and when (its queued row). Returns how many processes were found."""
        with self._lock:
            table = ProcessTable.read(self._proc)
            ending = _Ending(jobid, run, "cancelled", self._clock() + self.grace)
            boot = boot_time(self._proc)
            p = table.get(runner[0]) if runner is not None else None
            forwarded: set[int] = set()
            if (
                p is not None
                and runner is not None
                and (boot is None or started_by(p.started(boot), runner[1]))
            ):
                ending.members[p.pid] = p.start
                ending.runner = p.pid
                if p.sid not in (0, os.getsid(0)):
                    ending.sid = p.sid
                # psik's runner passes SIGTERM on to its script's process group itself:
                # a second one would hit the script's TERM handler as it runs.
                forwarded = {table.procs[c].pgid for c in table.children(p.pid)}
            return self._start(table, ending, self._tags(table), table.lineage(os.getpid()), forwarded)

    def sweep(self, *, leftovers: bool = True) -> None:
        """One look: move every ending on (SIGKILL once past its grace, forget it once
        nothing of it runs), and, with ``leftovers``, start ending what ended runs left."""
        with self._lock:
            table = ProcessTable.read(self._proc)
            tags = self._tags(table)
            spare = table.lineage(os.getpid())
            for ending in list(self._endings):
                try:
                    self._advance(table, ending, tags, spare)
                except Exception:  # one job's trouble never stops the others'
                    _logger.exception("job %s: ending its processes", ending.jobid)
                    self._endings.remove(ending)
            if leftovers:
                self._find_leftovers(table, tags, spare)

    def _tags(self, table: ProcessTable) -> dict[int, tuple[str, int]]:
        """``pid -> (jobid, run)`` for the processes tagged with one of our jobs."""
        out = {}
        for pid, (base, run) in table.tagged().items():
            if (jobid := self._jobid(base)) is not None:
                out[pid] = (jobid, run)
        return out

    def _jobid(self, base: str) -> str | None:
        """The jobid of a job directory under our prefix, else None."""
        parent, _, name = base.rstrip("/").rpartition("/")
        if not is_jobid(name):
            return None
        ours = self._dirs.get(parent)
        if ours is None:
            if len(self._dirs) > 1000:
                self._dirs.clear()
            prefix = str(self.prefix)
            ours = self._dirs[parent] = parent == prefix or os.path.realpath(parent) == prefix
        return name if ours else None

    def _collect(
        self, table: ProcessTable, ending: _Ending, tags: dict[int, tuple[str, int]], spare: set[int]
    ) -> list[int]:
        """The live processes of ``ending``'s job run, the runner first; remembers them."""
        seeds = {pid for pid, start in ending.members.items() if table.get(pid, start) is not None}
        if ending.sid is not None:
            seeds |= table.session(ending.sid)
        seeds |= {pid for pid, tag in tags.items() if tag == (ending.jobid, ending.run)}
        found = table.descendants(seeds) - spare
        for pid in found:
            ending.members.setdefault(pid, table.procs[pid].start)
        return sorted(found, key=lambda pid: (pid != ending.runner, pid))

    def _start(
        self,
        table: ProcessTable,
        ending: _Ending,
        tags: dict[int, tuple[str, int]],
        spare: set[int],
        forwarded: AbstractSet[int] = frozenset(),
    ) -> int:
        """The one SIGTERM of an ending, to all it finds but the process groups in
        ``forwarded`` (the runner passes it on to those). Processes that appear later get
        no SIGTERM (they may be the job's TERM handlers at work), only the SIGKILL."""
        found = self._collect(table, ending, tags, spare)
        if not found:
            return 0
        self._endings.append(ending)
        term = [pid for pid in found if pid == ending.runner or table.procs[pid].pgid not in forwarded]
        _logger.info("job %s run %d (%s): SIGTERM to %s", ending.jobid, ending.run, ending.why, term)
        for pid in term:
            send(pid, ending.members[pid], signal.SIGTERM, self._proc)
        return len(found)

    def _advance(
        self, table: ProcessTable, ending: _Ending, tags: dict[int, tuple[str, int]], spare: set[int]
    ) -> None:
        """A later look at an ending: SIGKILL to all it finds once past the grace period;
        forgotten once nothing of it runs."""
        found = self._collect(table, ending, tags, spare)
        now = self._clock()
        if not found:
            self._endings.remove(ending)
            return
        if now < ending.deadline:
            return
        if now > ending.deadline + GIVE_UP:
            _logger.warning(
                "job %s: processes %s survive SIGKILL (stuck in the kernel?); no longer followed",
                ending.jobid,
                found,
            )
            self._endings.remove(ending)
            return
        if ending.runner in found:
            _logger.warning(
                "job %s: psik's runner %d did not end %.0f s after SIGTERM (hung in its handler?): SIGKILL",
                ending.jobid,
                ending.runner,
                self.grace,
            )
        _logger.info("job %s run %d: SIGKILL to %s, left after the grace", ending.jobid, ending.run, found)
        for pid in found:
            send(pid, ending.members[pid], signal.SIGKILL, self._proc)

    def _find_leftovers(self, table: ProcessTable, tags: dict[int, tuple[str, int]], spare: set[int]) -> None:
        claimed = {pid for ending in self._endings for pid in ending.members}
        runs: dict[tuple[str, int], list[int]] = {}
        for pid, (jobid, run) in tags.items():
            if pid not in claimed and pid not in spare and jobid not in self._held:
                runs.setdefault((jobid, run), []).append(pid)
        for (jobid, run), pids in runs.items():
            try:
                if not self._run_ended(jobid, run):
                    continue
            except jobdir.JobFileInvalid:
                continue  # the job broke its own files: the service fails it, and ends it
            except (OSError, ValueError) as e:
                _logger.warning("job %s: cannot tell whether run %d ended: %s", jobid, run, e)
                continue
            ending = _Ending(jobid, run, "left behind", self._clock() + self.grace)
            ending.members = {pid: table.procs[pid].start for pid in pids}
            self._start(table, ending, tags, spare)

    def _run_ended(self, jobid: str, run: int) -> bool:
        """True if run ``run`` of local job ``jobid`` is over (or the job was removed)."""
        base = self.prefix / jobid
        try:
            files = jobdir.read_job(base)
        except FileNotFoundError:
            if base.exists():
                raise
            return True  # removed (purged): nothing is left to run for
        if files.spec.backend not in self.local_backends:
            return False
        state, current = files.state
        return run < current or (run == current and state.is_final)

    # ---- the asynchronous part (the event loop) ----

    @contextlib.contextmanager
    def hold(self, jobid: str) -> Iterator[None]:
        """The sweep leaves ``jobid`` alone meanwhile (its cancel is under way)."""
        self._held.add(jobid)
        try:
            yield
        finally:
            self._held.discard(jobid)

    def start(self) -> None:
        """Start sweeping (on the running event loop), unless it already is."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="containment")

    def wake(self) -> None:
        """Look again now (an ending was just started)."""
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await in_thread(self.sweep)
            except Exception:
                _logger.exception("looking for processes of ended jobs")
            await wait_event(self._wake, self._next_look())
            self._wake.clear()

    def _next_look(self) -> float:
        """Seconds to the next look: the sweep interval, or sooner for a SIGKILL due."""
        delay = self.interval
        now = self._clock()
        for ending in list(self._endings):
            delay = min(delay, max(ending.deadline - now, 0.0) + 0.01 if now < ending.deadline else 0.1)
        return max(delay, 0.01)

    async def aclose(self) -> None:
        """Stop sweeping, after seeing through the endings under way (their grace cut to
        ``SHUTDOWN_GRACE``: a SIGKILL is not skipped because the server stops)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A stopping server cannot wait out a whole grace period (uvicorn and test
        # harnesses give shutdown a few seconds): what got SIGTERM has SHUTDOWN_GRACE
        # left, then SIGKILL, rather than being left running.
        now = self._clock()
        for ending in self._endings:
            ending.deadline = min(ending.deadline, now + SHUTDOWN_GRACE)
        limit = now + SHUTDOWN_GRACE + 1.5
        while self._endings and self._clock() < limit:
            await in_thread(lambda: self.sweep(leftovers=False))
            if self._endings:
                await asyncio.sleep(self._next_look())
