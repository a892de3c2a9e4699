"""One server per prefix and per index: an exclusive ``flock`` on ``<prefix>/.psik-api.lock``
and one on ``<index>.lock``, held for the server's whole life.

Two servers on one prefix would each reconcile, watch and submit the same jobs (and
start-up clean-up assumes that claims it finds are a dead server's), so the second one
must not start. Two servers on two prefixes but one index would each reconcile that
index with their own prefix, removing the other's jobs from it (and a replayed
Idempotency-Key would then make a second job): the index is locked too. The prefix's
lock file sits in the prefix (owner-only, and psik and the server skip what is not a job
directory): beside it, in /tmp say, anyone could have made that name first. A lock file
must be a regular file of the server's user, never a link. It says who holds it (pid
and host), for the second server's message.
The kernel drops the lock when its holder dies, ``kill -9`` included: there is never a
stale lock to clear by hand. Its descriptor is not inherited (Python opens files
close-on-exec), so neither the launcher nor a job keeps the lock after the server.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from ..errors import StartupError

#: The prefix's lock file, in the prefix.
PREFIX_LOCK = ".psik-api.lock"


def lock_path(path: Path) -> Path:
    """``<path>.lock`` beside ``path`` (the index's); a symlinked path shares its target's
    lock. (Before the state directory, also the prefix's: statedir.py moves on from it.)"""
    real = path.expanduser().resolve()
    return real.with_name(real.name + ".lock")


def open_lock_file(path: Path, create: bool = True) -> int:
    """A descriptor of the lock file ``path``: a regular file of this user, not a link
    (OSError if it cannot be opened at all, :class:`StartupError` if it is not ours)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StartupError(
                f"lock file {path} is a symbolic link; the server's lock must be its own file"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"the file of uid {st.st_uid}"
        raise StartupError(
            f"lock file {path} is {what}, not this server's own (uid {os.geteuid()}); remove it"
        )
    return fd


class PrefixLock:
    """The locks of a prefix and (when given) of the job index. Building one does no
    I/O; :meth:`acquire` and :meth:`release` block (briefly): call them from a worker
    thread."""

    def __init__(self, prefix: Path, index: Path | None = None) -> None:
        self.prefix = prefix
        self.index = index
        self._fds: list[int] = []

    @property
    def path(self) -> Path:
        return self.prefix.expanduser() / PREFIX_LOCK

    def acquire(self) -> None:
        """Take the locks, or raise :class:`StartupError` naming the server holding one."""
        try:
            self._take(
                self.path,
                f"cannot use the job prefix {self.prefix.expanduser()}",
                f"is serving the jobs in {self.prefix.expanduser()}; "
                "stop it first, or give this one another prefix",
            )
            if self.index is not None:
                self._take(
                    lock_path(self.index),
                    f"cannot open the job index {self.index.expanduser()}",
                    f"is using the job index {self.index.expanduser()}; "
                    "stop it first, or give this one another database",
                )
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, cannot: str, held: str) -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = open_lock_file(path)
        except OSError as e:
            raise StartupError(f"{cannot}: cannot create its lock file {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StartupError(f"another psik-api server ({holder}) {held} (lock file {path})") from None
        except OSError as e:
            os.close(fd)
            raise StartupError(f"{cannot}: cannot lock {path}: {e.strerror or e}") from e
        # Truncate first: a shorter line must not leave the end of a longer old one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        """Let the locks go (the files stay: removing one would let two servers lock two
        different files of one name)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _holder(fd: int) -> str:
    """Who the lock file says holds it: ``pid N on host H``."""
    try:
        words = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    if not words or not words[0].isdigit():
        return "pid unknown"  # it has just taken the lock and not yet written its pid
    host = f" on host {words[1]}" if len(words) > 1 else ""
    return f"pid {words[0]}{host}"
