"""Slurm, as the server talks to it: submit, health and liveness of a ``slurm`` backend's jobs.

psik 3.1.1's slurm backend is used for what it gets right (the batch script that runs
the job through psik on the compute node, and the mapping of resources to sbatch
options), but submission is made here, because psik's:

* passes every backend attribute to sbatch, including ``psik_python``, meant for psik
  itself (sbatch then reads the interpreter's path as its script, and refuses);
* drops sbatch's own message ("Invalid partition name specified", "Unable to contact
  slurm controller") into the server log and raises "Job submission failed.".

Here only the sbatch options of an allow-list reach sbatch, one ``--name=value``
argument each (:mod:`.options`: attributes meant for psik never do, anything else
is refused by name before the job is made), and sbatch's message is the reason a refused
job's history and the problem's ``detail`` give. An answer that is no job id (the job
may still have been submitted) has any Slurm job with this job's console cancelled. A refusal because
the controller cannot be reached is told apart (:attr:`SbatchRefused.unavailable`): that
is a 503, worth retrying once Slurm is back.

Liveness (:func:`slurm_states`): the server asks ``squeue`` (one call for all of a
backend's live jobs) what became of each; a job Slurm has ended, or no longer knows,
while psik recorded no end state, is failed with what Slurm said. Health
(:class:`SlurmHealth`): ``scontrol ping`` and the partition's state, cached a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import sbatch_options

_logger = logging.getLogger(__name__)

#: How long one Slurm command may take before it counts as failed (seconds).
COMMAND_TIMEOUT = 20.0

#: sbatch's words when it cannot reach the controller (or find its configuration).
_UNREACHABLE = (
    "unable to contact slurm controller",
    "could not establish a configuration source",
    "fetch_config",
    "socket timed out",
    "zero bytes were transmitted",
    "connection refused",
    "communication connection failure",
    "standby mode",
)

#: Slurm job states after which the job runs no more (squeue --states=all shows them for
#: MinJobAge seconds).
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


class SbatchRefused(Exception):
    """sbatch did not take the job; the message is its own (one line)."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


def unreachable(message: str) -> bool:
    """True if a Slurm command's message says the controller could not be reached."""
    low = message.lower()
    return any(s in low for s in _UNREACHABLE)


async def run(*argv: str, stdin: str | None = None, limit: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
    """Run a Slurm command; (returncode, stdout, stderr). A command that cannot be run or
    that times out is returncode -1 with the reason as stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            close_fds=True,
        )
    except OSError as e:
        return -1, "", f"cannot run {argv[0]}: {e.strerror or e}"
    try:
        async with asyncio.timeout(limit):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, "", f"{argv[0]} did not answer within {limit:g} s"
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def sbatch_args(spec: Any, info: Any) -> list[str]:
    """sbatch's arguments for a psik job: psik's mapping of its resources, then its
    attributes (:func:`.options.sbatch_options`), every option one ``--name=value``
    argument so that no value is ever read as an option of its own."""
    from psik.backends.slurm import mk_args

    args = mk_args(spec.model_copy(update={"attributes": {}}), info)
    joined: list[str] = []
    while args:
        option = args.pop(0)
        # psik's own options all take a value, but for --exclusive.
        joined.append(option if option == "--exclusive" else f"{option}={args.pop(0)}")
    return joined + sbatch_options(spec.attributes)


async def submit(job: Any, jobndx: int) -> str:
    """Submit run ``jobndx`` of the psik job ``job`` (read) with sbatch, recording
    ``queued`` with the Slurm job id as psik does (under its status.csv lock, so a
    concurrent reader sees the submission or nothing). Returns the Slurm job id;
    raises :class:`SbatchRefused` with sbatch's message, or
    :class:`~psik_api_server.backends.AttributeRefused` (a ValueError) for a bad attribute."""
    from anyio import open_file
    from psik.backends.slurm import slurm_script
    from psik.models import JobState as PsikJobState
    from psik.models import Transition
    from psik.statfile import WriteLock

    psik_python = job.info.backend.attributes.get("psik_python", sys.executable)
    script = slurm_script % {"psik_python": psik_python, "base": job.base, "jobndx": jobndx}
    args = sbatch_args(job.spec, job.info)
    async with await open_file(job.base / "status.csv", "a", encoding="utf-8") as f, WriteLock(f):  # type: ignore[no-untyped-call]
        t0 = time.time()
        code, out, err = await run("sbatch", "--parsable", *args, stdin=script)
        if code != 0:
            message = " ".join((err or out or f"sbatch exited {code}").split())
            # Unavailable (503, worth retrying): sbatch missing or not answering, or
            # saying the controller cannot be reached; not an E2BIG or the like.
            gone = code == -1 and ("did not answer" in message or "No such file" in message)
            raise SbatchRefused(message, unavailable=gone or unreachable(message))
        native_id = out.strip().split(";")[0]
        if not native_id.isdigit():
            raise SbatchRefused(await _end_unrecorded(job.base, out, job.history))
        row = Transition(time=t0, jobndx=jobndx, state=PsikJobState.queued, info=native_id)
        await f.write(",".join(map(str, row.fields())) + "\n")
    job.history.append(row)
    return native_id


async def _end_unrecorded(base: Path, answer: str, history: list[Any]) -> str:
    """sbatch said something that is no job id, yet may have submitted the job: cancel
    every Slurm job whose console is this job's that its history does not name (nobody
    would track it). Returns the reason the submission failed."""
    said = f"sbatch answered {answer.strip()[:200]!r}, not a job id"
    code, out, err = await run("squeue", *_CONSOLE_LISTING)
    if code != 0:
        return f"{said}; squeue could not say whether it submitted a job ({' '.join(err.split())[:200]})"
    known = {str(r.info) for r in history if getattr(r.state, "value", r.state) == "queued"}
    strays = [n for n in _consoles(out, base.parent).get(base.name, []) if n not in known]
    if not strays:
        return f"{said}; no Slurm job was made"
    failed = await cancel(strays)
    if failed is not None:
        return f"{said}; the Slurm job it made ({', '.join(strays)}) could not be cancelled: {failed}"
    return f"{said}; the Slurm job it made ({', '.join(strays)}) was cancelled"


async def cancel(native_ids: Iterable[str]) -> str | None:
    """scancel the jobs; None, or scancel's message if it failed."""
    ids = list(native_ids)
    if not ids:
        return None
    code, _, err = await run("scancel", *ids)
    return None if code == 0 else " ".join(err.split()) or f"scancel exited {code}"


@dataclass(frozen=True)
class SlurmJob:
    """What squeue says of one job: its state (RUNNING, CANCELLED...) and reason (for
    sacct's answer, the exit code)."""

    state: str
    reason: str

    @property
    def ended(self) -> bool:
        # sacct says "CANCELLED by <uid>"
        return self.state.split(" ", 1)[0] in ENDED


async def slurm_states(native_ids: Iterable[str]) -> dict[str, SlurmJob] | None:
    """What Slurm knows of each job (a job it no longer knows is absent); None if the
    controller could not be asked (then nothing can be concluded)."""
    ids = sorted(set(native_ids))
    if not ids:
        return {}
    code, out, err = await run(
        "squeue", "--states=all", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r", limit=10
    )
    if code != 0:
        if "invalid job id" in err.lower():
            return {}  # none of them is known any more
        _logger.warning("squeue failed (%d): %s", code, " ".join(err.split()))
        return None
    found: dict[str, SlurmJob] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            found[parts[0]] = SlurmJob(parts[1], parts[2])
    return found


async def accounting_state(native_id: str) -> SlurmJob | None:
    """What ``sacct`` last recorded of the job: its state and exit code (as ``reason``,
    e.g. ``SlurmJob("FAILED", "0:9")``, ``SlurmJob("CANCELLED by 0", "0:0")``). None where
    accounting is disabled, cannot be asked or does not know the job. Of several jobs
    with that id (ids start over after a controller lost its state), the latest."""
    code, out, _ = await run("sacct", "-n", "-X", "-P", "-j", native_id, "-o", "State,ExitCode", limit=10)
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 1] if code == 0 else []
    if not rows or not rows[-1][0]:
        return None
    return SlurmJob(rows[-1][0], rows[-1][1])


class SlurmHealth:
    """Whether the controller answers and the backend's partition is up; each answer is
    kept ``ttl`` seconds, so ``GET /v1/backends`` costs at most two commands per ttl."""

    def __init__(self, partition: str | None, ttl: float = 5.0) -> None:
        self.partition = partition
        self.ttl = ttl
        self._checked = -float("inf")
        self._answer: str | None = None
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        """Ask again next time (a command just failed or succeeded)."""
        self._checked = -float("inf")

    async def check(self) -> str | None:
        """None if the backend can take jobs, else why not."""
        async with self._lock:
            if time.monotonic() - self._checked >= self.ttl:
                self._answer = await self._ask()
                self._checked = time.monotonic()
            return self._answer

    async def _ask(self) -> str | None:
        code, out, err = await run("scontrol", "ping", limit=10)
        if code != 0 or "UP" not in out:
            said = " ".join((err or out).split()) or f"scontrol ping exited {code}"
            return f"Slurm controller unreachable: {said}"
        argv = ["sinfo", "-h", "-o", "%P|%a"]
        if self.partition:
            argv[1:1] = ["-p", self.partition]
        code, out, err = await run(*argv, limit=10)
        if code != 0:
            return f"sinfo failed: {' '.join(err.split())}"
        rows = [line.split("|") for line in out.splitlines() if "|" in line]
        if not rows:
            return f"no partition {self.partition!r}" if self.partition else "no partitions"
        if self.partition is None:
            rows = [r for r in rows if r[0].endswith("*")] or rows  # the default partition
        name, avail = rows[0][0].rstrip("*"), rows[0][1]
        if avail != "up":
            return f"partition {name!r} is {avail}"
        return None


# ---- start-up: Slurm jobs a dead server submitted but never recorded ----


def jobs_by_console(prefix: Path) -> dict[str, list[str]] | None:
    """``{psik jobid: [Slurm job ids]}`` of the Slurm jobs (any state squeue still shows)
    whose console is a job directory's under ``prefix`` (see :data:`_CONSOLE_LISTING`). None if
    the controller cannot be asked. Blocking (start-up, in a worker thread)."""
    try:
        ping = subprocess.run(
            ["scontrol", "ping"],  # noqa: S607 (Slurm's commands are on PATH, as sbatch is)
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if ping.returncode != 0 or "UP" not in ping.stdout:
            return None
        listed = subprocess.run(
            ["squeue", *_CONSOLE_LISTING],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return _consoles(listed.stdout, prefix)


#: squeue's arguments listing every job it shows with its console (psik's batch script
#: writes it to ``<prefix>/<jobid>/log/console``; no attribute can move it).
_CONSOLE_LISTING = ("-h", "--states=all", "-O", "JobID:40,StdOut:4096")


def _consoles(listing: str, prefix: Path) -> dict[str, list[str]]:
    """``{psik jobid: [Slurm job ids]}`` from squeue's :data:`_CONSOLE_LISTING`."""
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        nid, _, console = line.strip().partition(" ")
        path = Path(console.strip())
        if (
            nid.isdigit()
            and path.name == "console"
            and path.parent.name == "log"
            and path.parent.parent.parent == prefix
        ):
            found.setdefault(path.parent.parent.name, []).append(nid)
    return found


def adopt(base: Path, native_ids: list[str], clock: float) -> tuple[str | None, list[str]]:
    """Record, for the psik job ``base``, the Slurm job a server killed during sbatch
    submitted without writing its ``queued`` row (the only record of its Slurm id): a
    job that looked ``new`` (and would have been submitted twice) or could not be
    cancelled. Returns (the id adopted, if any; the other unknown ids, to cancel). Under
    psik's status.csv lock; a job whose history knows all ``native_ids`` is left alone."""
    from psik_api_core import JobState as CoreState
    from psik_api_core import derive_state

    from ...jobs import directory as jobdir

    # Non-blocking, no link followed, a regular file: a FIFO there must not hold start-up.
    fd = jobdir.open_job_file(base, "status.csv", jobdir.MAX_STATUS, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        history = jobdir.read_history(base)
        known = {r.info for r in history if r.state is CoreState.queued}
        unknown = sorted((n for n in native_ids if n not in known), key=int)
        if not unknown:
            return None, []
        state, run = derive_state(history)
        if state.is_final:
            return None, unknown  # nobody waits for these: end them
        current = [r for r in history if r.jobndx == run and r.state is CoreState.queued and r.info.isdigit()]
        # The run the orphan is: the current one if it has no Slurm id (its batch script
        # already wrote `active`), else the next, never recorded.
        ndx = run if run > 0 and not current else run + 1
        f.write(f"{clock},{ndx},{CoreState.queued.value},{unknown[0]}\n")
    return unknown[0], unknown[1:]
