"""psik's ``Job`` with the callbacks the server sends: the seam psik offers is its
``send_callback`` method, overridden here (psik 3.1's ``reached``, ``submit`` and
``cancel`` all send through it), rather than patched onto each job object."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from psik.job import Job
from psik.models import JobState

#: ``send(job, jobndx, state, info)``: posts the job's callback; True if delivered.
Sender = Callable[[Any, int, JobState, str], Awaitable[bool]]


class CallbackJob(Job):
    """A psik job whose callbacks go through ``send``."""

    def __init__(self, base: str | Path, send: Sender) -> None:
        super().__init__(base)
        self._send = send

    async def send_callback(self, jobndx: int, state: JobState, info: str) -> bool:
        return await self._send(self, jobndx, state, info)


async def open_job(base: str | Path, send: Sender) -> CallbackJob:
    """The psik job at ``base``, read."""
    job = CallbackJob(base, send)
    await job.read_info()
    return job


# ---- psik's create, in one go ----
#
# psik 3's JobManager.create makes a job directory through anyio's async file calls: about
# 17 worker-thread trips per job, the larger part of a submit's cost here
# (bench/bench_submit_trips.py). create_sync makes the same directory, file for file and
# byte for byte (tests/server/test_psik_create.py compares the two), in one blocking call,
# with psik's own models; it is pinned with psik (psik_api_server's dependency range).

#: What psik's ``_alloc`` waits before trying the next stamp (its names are milliseconds).
_STAMP_RETRY = 0.001


def create_sync(manager: Any, spec: Any) -> str:
    """Make the directory of a new job of psik spec ``spec`` (a ``psik.models.JobSpec``)
    under ``manager``'s prefix as psik's ``JobManager.create`` does; its jobid. Blocking.
    A failure after the directory was made removes what was made."""
    import fcntl
    import os
    import shutil
    import time

    from psik.models import ExtraInfo

    prefix = Path(str(manager.prefix))
    while True:
        base = prefix / ("%.3f" % round(time.time(), 3))  # noqa: UP031 (psik's own naming)
        try:
            base.mkdir()
            break
        except FileExistsError:
            time.sleep(_STAMP_RETRY)
    try:
        spec = spec.model_copy(deep=True)
        if spec.directory is None:
            (base / "work").mkdir()
            spec.directory = str(base / "work")
        backend = manager.config.backends[spec.backend]
        spec.attributes = {**backend.attributes, **spec.attributes}
        info = ExtraInfo(backend=backend).model_dump_json(exclude_defaults=True)
        if not Path(spec.directory).is_dir():
            raise NotADirectoryError(spec.directory)
        (base / "log").mkdir()
        text = spec.model_dump_json(indent=4)
        with open(base / "spec.json", "w", encoding="utf-8") as f:
            os.chmod(base / "spec.json", 0o644)
            f.write(text if text.endswith("\n") or not text else text + "\n")
        with open(base / "status.csv", "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(",".join(map(str, (time.time(), 0, "new", info))) + "\n")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base.name
