"""Job slots: at most ``max_running`` jobs of a backend run at once, the rest wait.

As Slurm caps jobs per user, a backend with a slot limit (``BackendSettings.slot_limit``:
``max_running``, by default the CPU count for ``local``) starts a job only while fewer
than the limit of its jobs hold a slot: are ``queued`` with the backend or ``active``
(or being launched). A job
submitted while all slots are taken is recorded ``queued`` with a slot-wait row
(:data:`psik_api_core.SLOT_WAIT_INFO`) in its own ``status.csv`` and nothing is
started; when a slot frees, the oldest waiting job is started as that same run.

The waiting list lives in the job directories, not only here: at start-up it is rebuilt
from them (:func:`psik_api_core.slot_wait`), so jobs keep their order across a restart,
and even across a rebuilt index.

Who holds a slot is kept in the index (``JobStore.claim_slot``: one conditional UPDATE,
so two submits never both take the last slot, and no lock is held across a launch; a
job that ends gives its slot back; start-up recounts them from the states). This
module keeps the limits and the waiting list (which jobs wait, in what order); the
:class:`~.submitter.Submitter` makes the decisions.
"""

from __future__ import annotations

from collections.abc import Mapping

from psik_api_core import SLOT_WAIT_INFO


class JobSlots:
    """The slot limits of the backends that have one, and the jobs waiting for a slot."""

    def __init__(self, limits: Mapping[str, int | None]) -> None:
        self.limits = {name: n for name, n in limits.items() if n is not None}
        # backend -> {jobid: since}; since = the time of the job's slot-wait row.
        self._waiting: dict[str, dict[str, float]] = {name: {} for name in self.limits}

    def limit(self, backend: str) -> int | None:
        """The backend's slot limit; None: no cap."""
        return self.limits.get(backend)

    def wait(self, backend: str, jobid: str, since: float) -> None:
        """``jobid`` waits for a slot of ``backend`` since ``since``."""
        self._waiting[backend][jobid] = since

    def done(self, backend: str, jobid: str) -> None:
        """``jobid`` no longer waits (started, cancelled, or gone)."""
        self._waiting.get(backend, {}).pop(jobid, None)

    def waiting(self) -> set[str]:
        """Every job waiting for a slot, of any backend (nothing of theirs runs)."""
        return {jobid for waiting in self._waiting.values() for jobid in waiting}

    def forget(self, jobid: str) -> None:
        """``jobid`` no longer waits for any backend's slot (it was purged)."""
        for waiting in self._waiting.values():
            waiting.pop(jobid, None)

    def queue(self, backend: str) -> list[str]:
        """The jobs waiting for a slot of ``backend``, oldest first."""
        waiting = self._waiting.get(backend, {})
        return sorted(waiting, key=lambda jobid: (waiting[jobid], jobid))

    def backends_waiting(self) -> list[str]:
        """The backends that have jobs waiting for a slot."""
        return [name for name, waiting in self._waiting.items() if waiting]

    def why(self, backend: str) -> str:
        """The slot-wait row's info for a job of ``backend``."""
        n = self.limits[backend]
        return f"{SLOT_WAIT_INFO}: backend {backend!r} runs at most {n} job{'s' if n != 1 else ''} at once"
