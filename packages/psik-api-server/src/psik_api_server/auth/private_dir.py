"""The prefix is the owner's alone: the start-up checks that refuse a prefix, a state
directory or an index other users can reach (ssh's StrictModes, for the job prefix).
The app's lifespan runs them first (``app``), so that ``uvicorn psik_api_server.main:app``
refuses a shared prefix as ``psik-api-server serve`` does."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from pathlib import Path

from ..errors import StartupError

_logger = logging.getLogger(__name__)


def user_name(uid: int) -> str:
    """``uid 1000 (alice)``, or ``uid 1000`` where it names nobody: for messages."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _access(mode: int) -> str:
    who = [name for bits, name in ((0o070, "your group"), (0o007, "other users")) if mode & bits]
    return " and ".join(who)


def check_private_dir(path: Path, what: str = "prefix") -> None:
    """Refuse (:class:`StartupError`) a directory that is not the owner's alone, as ssh's
    StrictModes does: ``path`` must belong to this uid with no group or other access,
    and no directory above it may be writable by every user (who could swap it for
    their own) unless it is sticky (``/tmp``). A directory above that only a group may
    write, or that belongs to another user (a project directory, often), is logged as a
    warning: its members could do the same. A ``path`` that does not exist is made here,
    0700, and then checked like any other: had it been left to be made later, another
    user could make it in between (in /tmp, say) and own every job of ours. A component
    of ``path`` that is a symbolic link of another user's (in /tmp: theirs to re-point at
    will) is refused too. The message names the mode and the fix."""
    me = os.geteuid()
    if (link := _foreign_link(path, me)) is not None:
        raise StartupError(
            f"{what} {path} goes through {link}, a symbolic link of {user_name(link.lstat().st_uid)}'s: "
            f"its owner can point it elsewhere at any time; use a {what} whose path is yours"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)  # not exist_ok: whoever made one first, it is checked below
        st = path.stat()
    except OSError as e:
        raise StartupError(f"{what} {path}: cannot be made or read: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{what} {path} is not a directory")
    if st.st_uid != me:
        raise StartupError(
            f"{what} {path} belongs to {user_name(st.st_uid)}, not to you ({user_name(me)}): "
            "its owner controls your jobs' scripts; use a prefix of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StartupError(
            f"{what} {path} is mode {mode:04o}: {_access(mode)} can reach your jobs' scripts and "
            f"secrets; chmod 700 {path}"
        )
    for parent in path.resolve().parents:
        try:
            pst = parent.stat()
        except OSError:
            continue
        pmode = stat.S_IMODE(pst.st_mode)
        if pmode & stat.S_ISVTX:
            continue  # only a file's owner may rename it there
        if pmode & 0o002:
            raise StartupError(
                f"{what} {path} is inside {parent}, which is mode {pmode:04o}: any user could "
                f"replace your {what}; chmod o-w {parent}, or use a {what} in a directory only you can write"
            )
        if pmode & 0o020 or pst.st_uid not in (me, 0):
            who = "its group" if pmode & 0o020 else user_name(pst.st_uid)
            _logger.warning(
                "%s %s is inside %s (mode %04o, %s): %s could replace your %s",
                what, path, parent, pmode, user_name(pst.st_uid), who, what,
            )  # fmt: skip
            return  # one warning: the directories above it matter no more


def _foreign_link(path: Path, me: int) -> Path | None:
    """The first component of ``path`` that is a symbolic link owned by neither ``me``
    nor root, if any (components that do not exist yet end the walk)."""
    current = Path(path.absolute().anchor)
    for part in path.absolute().parts[1:]:
        current = current / part
        try:
            st = current.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (me, 0):
            return current
    return None


def check_private_file(path: Path, what: str) -> None:
    """Refuse a file (the index) that others can read: the mode and the fix."""
    try:
        st = path.stat()
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StartupError(f"{what} {path} is mode {mode:04o}: {_access(mode)} can read it; chmod 600 {path}")
