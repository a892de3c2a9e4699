"""One server per prefix: an exclusive ``flock`` on ``<prefix>.lock``, held for the
server's whole life.

Two servers on one prefix would each reconcile, watch and submit the same jobs (and
start-up clean-up assumes that claims it finds are a dead server's), so the second one
must not start. The lock file sits next to the prefix, not in it (the prefix holds job
directories only), and says who holds it (pid and host), for the second server's message.
The kernel drops the lock when its holder dies, ``kill -9`` included: there is never a
stale lock to clear by hand. Its descriptor is not inherited (Python opens files
close-on-exec), so neither the launcher nor a job keeps the lock after the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from .errors import StartupError


def lock_path(prefix: Path) -> Path:
    """``<prefix>.lock`` beside the prefix; a symlinked prefix shares its target's lock."""
    real = prefix.expanduser().resolve()
    return real.with_name(real.name + ".lock")


class PrefixLock:
    """Building one does no I/O; :meth:`acquire` and :meth:`release` block (briefly):
    call them from a worker thread."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return lock_path(self.prefix)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StartupError` naming the server holding it."""
        path = self.path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StartupError(f"cannot create the prefix lock {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StartupError(
                f"another psik-api server ({holder}) is serving the jobs in {self.prefix.expanduser()}; "
                f"stop it first, or give this one another prefix (lock file {path})"
            ) from None
        except OSError as e:
            os.close(fd)
            raise StartupError(f"cannot lock {path}: {e}") from e
        # Truncate first: a shorter line must not leave the end of a longer old one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (the file stays: removing it would let two servers lock two
        different files of one name)."""
        fd, self._fd = self._fd, None
        if fd is not None:
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
