"""The index file (its mode, soundness and version, read without changing it) and the
locks ``serve`` takes on the prefix and the index."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from .report import Report

if TYPE_CHECKING:
    from ..settings import Settings


def check_index(report: Report, settings: Settings, prefix_there: bool, state_there: bool) -> None:
    """The index file (mode, sound, a version this server knows, not locked), and the
    locks ``serve`` takes (no other server on the prefix or the index)."""
    from ..auth.private_dir import check_private_file
    from ..errors import StartupError
    from ..jobs.prefix_lock import PrefixLock
    from ..jobs.store import _EXIT_CODES_VERSION

    path = settings.database_path
    what = "index"
    if not path.exists():
        report.ok(
            what, f"{path} does not exist yet; serve makes it (and rebuilds it from the job directories)"
        )
    else:
        try:
            check_private_file(path, what)
            with _no_server_on(path) as unused:
                _read_index(report, path, _EXIT_CODES_VERSION, unused)
        except StartupError as e:
            report.fail(what, str(e))
    if not (prefix_there and (state_there or settings.database is not None)):
        return  # nothing there yet: no server can hold it
    lock = PrefixLock(settings.prefix, path)
    try:
        lock.acquire()
    except StartupError as e:
        report.fail("locks", str(e))
    else:
        report.ok("locks", "no other psik-api server serves this prefix or this index")
    finally:
        lock.release()


@contextlib.contextmanager
def _no_server_on(path: Path) -> Iterator[bool]:
    """True if no server uses the index ``path``, kept true through the block: a shared
    lock on the index's lock file (a server starting meanwhile fails to take its
    exclusive one, and says so); False if a server holds it or that cannot be told."""
    from ..errors import StartupError
    from ..jobs.prefix_lock import lock_path, open_lock_file

    try:
        fd = open_lock_file(lock_path(path))
    except (OSError, StartupError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            held = False
        else:
            held = True
        yield held
    finally:
        os.close(fd)  # and with it the lock


def _read_index(report: Report, path: Path, known_version: int, unused: bool) -> None:
    """Open the index read-only, as the store's own open reads it first (quick_check),
    leaving nothing behind: with no server on it (``unused``) and no ``-wal``/``-shm``
    beside it, as immutable (SQLite makes neither); else, with none on it, the ones this
    open made are removed after. A running server's are never touched."""
    sidecars = [Path(f"{path}{side}") for side in ("-wal", "-shm")]
    there = {p for p in sidecars if os.path.lexists(p)}
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    if unused and not there:
        uri += "&immutable=1"
    try:
        _query_index(report, path, known_version, uri)
    finally:
        if unused:
            for made in set(sidecars) - there:
                with contextlib.suppress(FileNotFoundError):
                    made.unlink()


def _query_index(report: Report, path: Path, known_version: int, uri: str) -> None:
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0)
    except sqlite3.Error as e:
        report.fail("index", f"SQLite cannot open {path}: {e}; check its permissions")
        return
    try:
        verdict = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as e:
        name = getattr(e, "sqlite_errorname", "")
        if name in {"SQLITE_BUSY", "SQLITE_LOCKED"}:
            report.fail(
                "index",
                f"{path} is locked by another process ({e}); stop whatever holds it (fuser {path})",
            )
        elif name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
            _corrupt(report, path, str(e))
        else:
            report.fail("index", f"SQLite cannot read {path}: {e}")
        return
    finally:
        conn.close()
    if verdict != "ok":
        _corrupt(report, path, " ".join(str(verdict).split())[:200])
    elif tables and "jobs" not in tables:
        report.fail("index", f"{path} is a SQLite file, but not a psik-api index; set database elsewhere")
    elif version > known_version:
        report.warn(
            "index",
            f"{path} is version {version}, newer than this server's ({known_version}): a newer "
            "server wrote it; run that version, or expect what it added to be ignored",
        )
    else:
        report.ok("index", f"{path} opens, is sound, version {version}")


def _corrupt(report: Report, path: Path, why: str) -> None:
    # serve starts: recovery moves the file aside and rebuilds from the job directories.
    report.warn(
        "index",
        f"{path} is damaged ({why}); serve moves it aside ({path.name}.corrupt-<time>) and rebuilds "
        "it from the job directories, losing the Idempotency-Keys and any owner but the local user",
    )
