"""Submitting local jobs from a separate launcher process.

psik's local backend double-forks *the calling process* and blocks on ``waitpid``. Done
in the server, every job would inherit the server's listening sockets and stdio, and
the event loop would stall on each fork. So the server keeps one small launcher process
(``python -m psik_api_server.backends.local.launcher``) that has psik imported once and does the
forking. The launcher:

* runs in its own session with only two pipes to the server (moved off fds 0 and 1,
  which point at /dev/null) and a log file as stderr;
* closes its end of those pipes in every child it forks, so jobs hold nothing of the
  server's;
* never lets a process psik forked come back: psik's job process is meant to end in
  ``os._exit``, but if psik's code in it raises or returns, it would unwind through
  ``job.submit()`` (sharing its lock on status.csv) into the request loop and serve
  requests as a second launcher. psik's ``fork_job`` is wrapped so that the forked
  process logs why and calls ``os._exit`` in a ``finally``, and the loop checks its PID too;
* answers one JSON line per request: ``{"id", "base"}`` -> ``{"id", "jobndx",
  "native_id"}`` or ``{"id", "error"}``; with ``"jobndx": n`` in the request it starts
  run ``n`` of a job whose run ``n`` has waited for a job slot (psik itself would start
  run ``n + 1``);
* exits when the server closes the pipe. Jobs are detached by psik (setsid + double
  fork), so they outlive both the launcher and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import IO, Any

from ...aio import in_thread
from ...jobs.directory import check_job_files

_logger = logging.getLogger(__name__)


class LaunchError(Exception):
    """The launcher could not submit the job; the message says why."""


def _open_log(path: Path | None) -> IO[bytes] | int:
    """The launcher's log, for appending; the owner's alone (job names, paths, errors)."""
    if path is None:
        return asyncio.subprocess.DEVNULL
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Never through a link, nor onto a FIFO (start-up checks the state directory, but a
    # name planted after that check must not send the log elsewhere or hang the open).
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "the launcher's log is not a regular file", str(path))
    os.set_blocking(fd, True)
    try:
        os.fchmod(fd, 0o600)  # a log an older version left readable by others
    except OSError as e:
        _logger.warning("cannot make %s owner-only: %s", path, e)
    return os.fdopen(fd, "ab")


class LocalLauncher:
    """Server side: owns the launcher process and sends it submit requests."""

    def __init__(self, log_path: Path | None = None, *, eager: bool = True) -> None:
        #: Started with the server (the default), or only at the first local submit
        #: (tests that never run a job then never spawn one).
        self.eager = eager
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()

    async def start(self) -> asyncio.subprocess.Process:
        """Start the launcher process if it is not running (it imports psik: ~0.5 s)."""
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            log = await in_thread(_open_log, self._log_path)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "psik_api_server.backends.local.launcher",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    close_fds=True,
                    start_new_session=True,
                )
            finally:
                if not isinstance(log, int):
                    log.close()
            # Each launcher process has its own pending requests: a dying one fails
            # only what it was asked.
            self._pending = {}
            self._reader = asyncio.create_task(self._read_replies(self._proc, self._pending))
            return self._proc

    @property
    def pending(self) -> int:
        """Submits sent to the launcher process and not answered yet (its queue)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        """True while a launcher process is up."""
        return self._proc is not None and self._proc.returncode is None

    async def _read_replies(
        self, proc: asyncio.subprocess.Process, pending: dict[int, asyncio.Future[dict[str, Any]]]
    ) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                try:
                    reply = json.loads(line)
                except json.JSONDecodeError:
                    _logger.error("launcher said something unreadable: %r", line[:200])
                    continue
                fut = pending.pop(int(reply.get("id", -1)), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        finally:
            if self._proc is proc:
                self._proc = None  # the next submit starts a new launcher
            # The launcher is gone: nobody will answer what is pending.
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(LaunchError("the job launcher process exited"))
            pending.clear()

    async def submit(self, base: Path, jobndx: int | None = None) -> tuple[int, str]:
        """Submit the job at ``base`` on psik's local backend: ``(jobndx, pid)``;
        ``jobndx``: start that run, which has waited for a job slot.

        A launcher found dead before the request reached it is restarted once; one
        that dies after is not retried (the job may have started)."""
        for attempt in (1, 2):
            proc = await self.start()
            assert proc.stdin is not None
            rid = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            pending = self._pending
            pending[rid] = fut
            try:
                request: dict[str, Any] = {"id": rid, "base": str(base)}
                if jobndx is not None:
                    request["jobndx"] = jobndx
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as e:
                pending.pop(rid, None)
                if self._proc is proc:
                    self._proc = None
                if attempt == 2:
                    raise LaunchError("the job launcher process cannot be started") from e
                continue
            reply = await fut
            if "error" in reply:
                raise LaunchError(str(reply["error"]))
            return int(reply["jobndx"]), str(reply["native_id"])
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


# ---- the launcher process itself ----

#: The exit status of a forked job process whose psik code raised or returned (EX_SOFTWARE).
ESCAPED = 70


def forget_slot_wait(job: Any, run: int) -> None:
    """Make psik's ``job.submit()`` start run ``run`` of ``job`` (a loaded psik Job),
    which has waited for a job slot.

    The run's only rows are the server's slot-wait ``queued`` rows; with them out of the
    job's history in memory (the file keeps them), psik's submit(), which takes the
    largest jobndx seen plus one, starts that run, under its own lock on status.csv."""
    from psik_api_core import is_slot_wait

    job.history = [t for t in job.history if not (t.jobndx == run and is_slot_wait(t.info))]
    if job.summarize()[0] != run:
        raise RuntimeError(f"run {run} of job {job.stamp} is not waiting for a job slot")


def _contain_forks(launcher_pid: int) -> None:
    """Make psik's ``fork_job`` end every process it runs in, whatever happens there.

    psik's local ``submit()`` forks; the child calls ``fork_job()``, which setsid()s,
    forks the job's process and exits; the job's process runs the job and is meant to
    ``os._exit``. An exception (or a return) in either would unwind into ``submit()``
    and the launcher's loop in a process that is not the launcher."""
    from psik.backends import local

    fork_job = local.fork_job

    def contained(write_fd: int, job: Any, jobndx: int) -> None:
        if os.getpid() == launcher_pid:
            # psik calls fork_job() in its caller when its first fork failed: that would
            # setsid() the launcher and run the job inside it.
            raise OSError("psik could not fork the job's process")
        try:
            fork_job(write_fd, job, jobndx)
            _logger.error("job %s: psik's job process %d returned; it exits", job.stamp, os.getpid())
        except BaseException as e:
            _logger.exception("job %s: psik's job process %d raised %s; it exits", job.stamp, os.getpid(), e)
        finally:
            os._exit(ESCAPED)

    local.fork_job = contained


def _post_later(send: Any, jobid: str, jobndx: int, state: Any, info: str) -> None:
    async def post() -> None:
        await asyncio.wait_for(send(jobndx, state, info), 30)

    try:
        asyncio.run(post())
    except Exception as e:
        _logger.warning("job %s: callback not delivered: %s", jobid, e)


def _post_detached(send: Any, jobid: str, jobndx: int, state: Any, info: str) -> None:
    """Post a callback from a process of its own (forked twice: nobody waits for it).

    Not from a thread: psik forks every job from this process, and a fork taken while
    another thread holds a lock (the import lock as it loads aiohttp, any of aiohttp's)
    gives a job process that waits on that lock for ever and never runs its script."""
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                _post_later(send, jobid, jobndx, state, info)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _serve(requests: IO[str], replies: IO[str]) -> None:
    # psik imported once, here, not in the server's process
    from ...jobs.callbacks import psik_sender
    from .._psik_job import open_job

    launcher_pid = os.getpid()
    _contain_forks(launcher_pid)

    async def send_callback(job: Any, jobndx: int, state: Any, info: str) -> bool:
        send = psik_sender(job)  # psik's own trusts the environment (netrc, proxies)
        if os.getpid() != launcher_pid:  # in the job's own process, psik's way
            return bool(await send(jobndx, state, info))
        # psik awaits the `queued` callback inside submit() (aiohttp: up to 5 min);
        # a slow callback URL must not hold up everyone else's submits.
        _post_detached(send, job.stamp, jobndx, state, info)
        return True

    async def submit(base: str, run: int | None) -> tuple[int, str]:
        # psik's plain opens would wait for ever on a FIFO the job put there, and with
        # them every later submit: its files are checked first (JobFileInvalid).
        check_job_files(Path(base))
        job = await open_job(base, send_callback)
        if run is not None:
            forget_slot_wait(job, run)
        jobndx, native_id = await job.submit()
        return int(jobndx), str(native_id)

    for line in requests:
        rid: Any = None
        try:
            req = json.loads(line)
            rid = req["id"]
            run = req.get("jobndx")
            jobndx, native_id = asyncio.run(submit(str(req["base"]), None if run is None else int(run)))
            reply: dict[str, Any] = {"id": rid, "jobndx": jobndx, "native_id": native_id}
        except Exception as e:
            reply = {"id": rid, "error": f"{type(e).__name__}: {e}"}
        finally:
            if os.getpid() != launcher_pid:  # a forked process got past _contain_forks
                _logger.error("a process psik forked (%d) returned into the launcher; it exits", os.getpid())
                os._exit(ESCAPED)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    # Move the protocol pipes off fds 0/1 and drop them in every forked child, so a job
    # never holds a pipe to the server (psik forks from inside job.submit()).
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)

    # Only the first fork below the launcher closes them: by the time a job forks its
    # script, these fd numbers may name the job's own log files.
    pipes = [rfd, wfd]

    def _drop_pipes() -> None:
        while pipes:
            with contextlib.suppress(OSError):
                os.close(pipes.pop())

    os.register_at_fork(after_in_child=_drop_pipes)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    with os.fdopen(rfd, "r", encoding="utf-8") as requests, os.fdopen(wfd, "w", encoding="utf-8") as replies:
        _serve(requests, replies)


if __name__ == "__main__":
    main()
