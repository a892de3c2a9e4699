"""The places ``serve`` writes: the prefix and the state directory (checked with the
server's own start-up checks), and the free space and inodes of their filesystems."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .report import Report

if TYPE_CHECKING:
    from ..settings import Settings

#: The free space (MiB) and inodes below which a filesystem the server writes fails.
DEFAULT_MIN_FREE_MIB = 512
MIN_FREE_INODES = 10_000


class _Warnings(logging.Handler):
    """The server's own start-up warnings (a parent directory others may write, say),
    said while one of its checks runs: each becomes a ``warn`` line of that check."""

    def __init__(self, report: Report, what: str) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        self.what = what

    def emit(self, record: logging.LogRecord) -> None:
        self.report.warn(self.what, record.getMessage())


@contextlib.contextmanager
def _server_warnings(report: Report, what: str) -> Iterator[None]:
    logger = logging.getLogger("psik_api_server")
    handler = _Warnings(report, what)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _absent_parts(path: Path) -> list[Path]:
    """The components of ``path`` that do not exist, deepest first."""
    parts: list[Path] = []
    current = path.absolute()
    while not os.path.lexists(current) and current != current.parent:
        parts.append(current)
        current = current.parent
    return parts


def _existing_ancestor(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def _check_dir(report: Report, what: str, path: Path, check: Callable[[Path], None]) -> bool:
    """Run the server's own check of a directory it makes at start-up. A directory not
    there yet is made by that check as ``serve`` would make it, and removed again (with
    the parents made for it). True if the directory was there before and passed."""
    from ..errors import StartupError

    absent = _absent_parts(path)
    try:
        with _server_warnings(report, what):
            check(path)
    except StartupError as e:
        report.fail(what, str(e))
        return False
    else:
        if absent:
            report.ok(what, f"{path} does not exist yet; serve makes it (mode 0700), as was tried here")
        else:
            report.ok(what, f"{path}: this user's own, mode {stat.S_IMODE(path.stat().st_mode):04o}")
    finally:
        for part in absent:  # deepest first; only what this check made, and only if empty
            with contextlib.suppress(OSError):
                part.rmdir()
    return not absent


def check_directories(report: Report, settings: Settings) -> tuple[bool, bool]:
    """The prefix and the state directory (and the index's own directory, when
    ``database`` puts it elsewhere); whether each was there and passed."""
    from ..auth.private_dir import check_private_dir
    from ..errors import StartupError
    from ..jobs import statedir

    prefix = _check_dir(report, "prefix", settings.prefix, check_private_dir)
    state = _check_dir(report, "state directory", settings.state_directory, statedir.check_state_dir)
    if settings.database is not None:
        parent = settings.database.parent
        if not parent.is_dir() and not os.access(_existing_ancestor(parent), os.W_OK | os.X_OK):
            report.fail(
                "index directory",
                f"{parent} does not exist and cannot be made by this user; make it (mode 0700) "
                "or change database",
            )
    if state:
        try:
            statedir.check_own_files(settings)
        except StartupError as e:
            report.fail("server's files", str(e))
    return prefix, state


def check_free_space(report: Report, settings: Settings, min_free: int) -> None:
    """Free space and inodes on each filesystem the server writes (once each), and a
    probe write where the directory is there already."""
    from ..jobs.diskfull import full_place

    places = [("prefix", settings.prefix), ("state directory", settings.state_directory)]
    if settings.database is not None:
        places.append(("index directory", settings.database.parent))
    seen: set[int] = set()
    for what, path in places:
        where = _existing_ancestor(path)
        try:
            st = os.statvfs(where)
            dev = where.stat().st_dev
        except OSError as e:
            report.fail(f"free space ({what})", f"cannot read the filesystem of {where}: {e.strerror or e}")
            continue
        if dev in seen:
            continue
        seen.add(dev)
        label = f"free space ({what})"
        free = st.f_bavail * st.f_frsize
        fix = f"free some space on the filesystem of {where}, or move the {what} to another one"
        if free < min_free:
            report.fail(
                label, f"{_mib(free)} free on the filesystem of {where}, below {_mib(min_free)}; {fix}"
            )
            continue
        if st.f_files > 0 and st.f_favail < MIN_FREE_INODES:
            report.fail(label, f"{st.f_favail} inodes free on the filesystem of {where}; {fix}")
            continue
        if path.is_dir():
            try:
                _probe_write(path)
            except OSError as e:
                if full_place(e) is not None:
                    report.fail(
                        label, f"the filesystem of {where} is full (writing a probe: {e.strerror}); {fix}"
                    )
                else:
                    report.fail(label, f"cannot write in {path}: {e.strerror or e}")
                continue
        report.ok(label, f"{_mib(free)} free on the filesystem of {where}")


def _probe_write(directory: Path) -> None:
    """Write, sync and remove 64 KiB in ``directory`` (a full disk fails it)."""
    fd, name = tempfile.mkstemp(prefix=".psik-api-check.", dir=directory)
    try:
        left = memoryview(b"\0" * (64 << 10))
        while left:  # a nearly full disk writes part, then refuses the rest
            left = left[os.write(fd, left) :]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)
