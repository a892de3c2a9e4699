"""The server's own files, in its private state directory.

The index (``index.sqlite``, unless ``database`` puts it elsewhere) and its lock, the
launcher's log and, in token mode, the token signing key live in the state directory:
``state_dir``, else ``$XDG_STATE_HOME/psik_api/<prefix name>-<digest>`` (settings.py).
They used to sit beside the prefix: with the README's ``/tmp/psik_jobs`` that was /tmp
itself, where a second user's server collided with the first's files and anyone could
make those names first (a link to elsewhere, a file of theirs).

Start-up (:func:`prepare`, before the locks) makes the directory 0700, or refuses one
that is a link, another user's, or writable by others; and refuses any of the server's
files in it (or at ``database``) that is a link, not a regular file, or another user's.
Then, holding the locks, :func:`migrate` moves what an older version left beside the
prefix (each file the server's own, regular, not a link; anything else stays where it
is, with a warning) into the state directory, logged in one line. An older server still
running on the prefix (it holds ``<prefix>.lock``) stops start-up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
from pathlib import Path

from ..errors import StartupError
from ..settings import Settings
from .prefix_lock import lock_path, open_lock_file

_logger = logging.getLogger(__name__)

#: SQLite's companions of the index: the write-ahead log (moved with it) and the
#: shared-memory index of that log (rebuilt by SQLite, so removed, not moved).
_WAL, _SHM = "-wal", "-shm"


def own_files(settings: Settings) -> list[Path]:
    """The server's own files (existing or not) that must be its own when they exist."""
    index = settings.database_path
    return [
        index,
        index.with_name(index.name + _WAL),
        index.with_name(index.name + _SHM),
        lock_path(index),
        settings.launcher_log_path,
        settings.token_key_path,
    ]


def _refusal(path: Path, st: os.stat_result, what: str) -> str | None:
    """Why ``path`` (lstat ``st``) cannot be the server's ``what``; None if it can."""
    from ..auth.private_dir import user_name as _user  # here: auth imports this module

    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symbolic link: the server's own files are its own, never links; remove it"
    if st.st_uid != me:
        return (
            f"{what} {path} belongs to {_user(st.st_uid)}, not to this server's user ({_user(me)}): "
            "someone else made it first; remove it, or set state_dir"
        )
    return None


def check_state_dir(path: Path) -> None:
    """Make the state directory (0700) or check the one there: a directory of this user,
    not a link, not writable by others. :class:`StartupError` saying why and what to do."""
    path = path.expanduser()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        st = path.lstat()
    except OSError as e:
        raise StartupError(f"cannot make the state directory {path}: {e.strerror or e}") from None
    if (why := _refusal(path, st, "state directory")) is not None:
        raise StartupError(why)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"state directory {path} is not a directory; remove it, or set state_dir")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise StartupError(
            f"state directory {path} is mode {mode:04o}: others can write to it and replace the "
            f"server's index, lock or key; chmod 700 {path}"
        )


def check_own_files(settings: Settings) -> None:
    """Refuse any of :func:`own_files` that is a link, not a regular file, or another
    user's (:class:`StartupError` naming the file and what to do)."""
    for path in own_files(settings):
        try:
            st = path.lstat()
        except OSError:
            continue  # nothing there (or no directory): whoever opens it says why
        if (why := _refusal(path, st, "the server's file")) is not None:
            raise StartupError(why)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"the server's file {path} is not a regular file; remove it")


def prepare(settings: Settings) -> None:
    """Before the locks: the state directory made or checked, and the server's files in
    it (see module doc). Blocking: call it from a worker thread."""
    check_state_dir(settings.state_directory)
    if settings.database is not None:
        # The index elsewhere: its directory is the operator's choice, made if missing.
        with contextlib.suppress(OSError):
            settings.database.expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_own_files(settings)


# ---- an older layout: the files beside the prefix ----


def _ours(path: Path) -> bool | None:
    """True: a regular file of this user (not a link); None: nothing there; False:
    something else (left alone, with a warning)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _move(old: Path, new: Path) -> None:
    """Move the file ``old`` to ``new`` (which does not exist): a rename, or across
    filesystems a copy (0600, synced) and an unlink."""
    try:
        os.rename(old, new)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    src = os.open(old, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        tmp = new.with_name(f".{new.name}.{secrets.token_hex(8)}")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
        os.replace(tmp, new)
    finally:
        os.close(src)
    os.unlink(old)


class _OldLocks:
    """The locks an older server held beside the prefix, taken (non-blocking) while its
    files move, so that an older server still running stops this start-up."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._held: list[tuple[Path, int]] = []

    def __enter__(self) -> _OldLocks:
        for path in self.paths:
            if not _ours(path):
                continue  # none, or not an older install's of ours
            try:
                fd = open_lock_file(path, create=False)
            except (OSError, StartupError):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._release(unlink=False)
                raise StartupError(
                    f"an older psik-api server holds {path}: it serves these jobs; stop it first"
                ) from None
            self._held.append((path, fd))
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self._release(unlink=kind is None)

    def _release(self, unlink: bool) -> None:
        held, self._held = self._held, []
        for path, fd in held:
            if unlink:  # the older layout is gone; held by us, so no server waits on it
                with contextlib.suppress(OSError):
                    path.unlink()
            os.close(fd)


def migrate(settings: Settings) -> list[str]:
    """Move what an older version kept beside the prefix into the state directory (see
    module doc); the names moved. Call it holding the prefix and index locks, from a
    worker thread."""
    old_dir = settings.prefix.expanduser().parent
    new_dir = settings.state_directory.expanduser()
    moves: list[tuple[str, Path]] = [("launcher.log", settings.launcher_log_path)]
    if settings.database is None:
        moves.insert(0, ("index.sqlite", settings.database_path))
    if settings.state_dir is None:  # a given state_dir held the key already
        moves.append(("token-key.pem", settings.token_key_path))
    try:
        same = os.path.samefile(old_dir, new_dir)
    except OSError:
        same = False
    old_locks = [lock_path(settings.prefix)]
    if settings.database is None and not same:  # (the same dir: it is our own index lock)
        old_locks.append(lock_path(old_dir / "index.sqlite"))
    moved: list[str] = []
    with _OldLocks(old_locks):
        for name, new in [] if same else moves:
            old = old_dir / name
            found = _ours(old)
            if found is None:
                continue
            if not found:
                _logger.warning(
                    "%s is not this server's own file (a link, or another user's): not moved", old
                )
                continue
            if new.exists():
                _logger.warning("%s is left where it is: the state directory has its own %s", old, new)
                continue
            _move(old, new)
            if name == "index.sqlite":
                wal = old.with_name(name + _WAL)
                if _ours(wal):
                    _move(wal, new.with_name(name + _WAL))
                shm = old.with_name(name + _SHM)
                if _ours(shm):
                    shm.unlink()
            moved.append(name)
    if moved:
        _logger.warning(
            "moved %s from %s (beside the prefix, where other users may write) to the state directory %s",
            ", ".join(moved),
            old_dir,
            new_dir,
        )
    return moved
