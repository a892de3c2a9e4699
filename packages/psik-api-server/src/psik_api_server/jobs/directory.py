"""Reading psik job directories, cheaply and defensively.

A job directory (``prefix/<jobid>/``) holds ``spec.json`` and ``status.csv`` (rows of
``time,jobndx,state,info``). These readers never raise on a malformed row: psik writes
without validation, so a bad row is skipped and logged, never a 500.

psik's create is not atomic: it makes ``<jobid>/``, ``work/``, ``log/``, writes
``spec.json`` and then the first row of ``status.csv``. A server killed part-way leaves
a directory that is no job yet (:func:`half_created`).

A job runs as the server's user and may replace any of these files by a FIFO (a plain
open would wait for a writer for ever), a directory, a link or something huge: every
file of a job directory is read through :func:`open_job_file` (non-blocking, no link
followed, a regular file of bounded size), and one that is not such a file is
:class:`JobFileInvalid`, its job's own problem.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from psik_api_core import (
    GROUP_ID_PATTERN,
    LIMITS,
    JobSpec,
    JobState,
    Transition,
    derive_state,
    is_jobid,
    run_outcome,
    utc,
)
from psik_api_core.models import Dependency, LabelKey, LabelValue

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One row of status.csv."""

    time: float
    jobndx: int
    state: JobState
    info: str

    def transition(self) -> Transition:
        return Transition(time=utc(self.time), jobndx=self.jobndx, state=self.state, info=self.info)


#: The bounds of a row's time (the UNIX epoch to the end of year 9999, what a datetime
#: holds) and run number (what SQLite's INTEGER and every client hold). A job can write
#: its own status.csv: a row outside them is malformed, not a 500 on every read.
MAX_ROW_TIME = 253402300799.0
MAX_JOBNDX = 2**31 - 1


def _row(line: str) -> Row:
    parts = line.rstrip("\r\n").split(",", 3)
    if len(parts) < 3:
        raise ValueError("fewer than 3 fields")
    time_, jobndx = float(parts[0]), int(parts[1])
    if not 0.0 <= time_ <= MAX_ROW_TIME:  # NaN and the infinities fail this too
        raise ValueError(f"time {parts[0][:40]!r} out of range")
    if not 0 <= jobndx <= MAX_JOBNDX:
        raise ValueError(f"run number {parts[1][:40]!r} out of range")
    return Row(time=time_, jobndx=jobndx, state=JobState(parts[2]), info=parts[3] if len(parts) > 3 else "")


@functools.lru_cache(maxsize=1024)
def _warn_malformed(where: str, line: str, why: str) -> None:
    """Once per job and row (a job's file is read again on every request), bounded."""
    _logger.warning("%s: skipping malformed status row %r (%s)", where, line, why)


def parse_rows(text: str, where: str = "") -> list[Row]:
    """Rows from (complete lines of) status.csv text; malformed rows are skipped."""
    rows: list[Row] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(_row(line))
        except ValueError as e:
            _warn_malformed(where, line[:200], str(e))
    return rows


def job_path(prefix: Path, jobid: str) -> Path:
    """The directory of ``jobid``; refuses anything but a well-formed id."""
    if not is_jobid(jobid):
        raise ValueError(f"not a job id: {jobid!r}")
    return prefix / jobid


#: Bounds of the files psik writes in a job directory: far past any real job's (a
#: status row is ~50 bytes; a spec is bounded by the request body), so only a job that
#: wrote them itself reaches them.
MAX_STATUS = 16 * 1024 * 1024
MAX_SPEC = 16 * 1024 * 1024


class JobFileInvalid(OSError):
    """A job's file ``name`` is not what the server writes there: not a regular file (a
    FIFO, a directory, a link, a socket...), too large, or not writable. The job itself
    did it (it runs as the server's user): its own problem, answered
    ``job_files_invalid`` and never read on."""

    def __init__(self, base: Path, name: str, why: str) -> None:
        super().__init__(errno.EINVAL, f"job {base.name}: {name} {why}")
        self.jobid = base.name
        self.name = name
        self.why = why

    def __str__(self) -> str:
        return f"job {self.jobid}: {self.name} {self.why}"


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_job_file(base: Path, name: str, limit: int, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file ``base/name`` of at most ``limit`` bytes, opened
    with ``flags`` (O_RDONLY, or O_WRONLY | O_APPEND), non-blocking and without following
    a link: a FIFO (which a plain open waits on for ever), a directory or a link is
    :class:`JobFileInvalid`, and so is a file over ``limit``. FileNotFoundError if there
    is none; other OSErrors as they come. The caller closes it."""
    try:
        fd = os.open(base / name, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JobFileInvalid(base, name, "is a symbolic link, not a regular file") from None
        if e.errno == errno.EISDIR:
            raise JobFileInvalid(base, name, "is a directory, not a regular file") from None
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing with no reader
            raise JobFileInvalid(base, name, "is a FIFO or a socket, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
            raise JobFileInvalid(base, name, f"is {kind}, not a regular file")
        if st.st_size > limit:
            raise JobFileInvalid(base, name, f"is larger than {limit} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_job_file(base: Path, name: str, limit: int) -> bytes:
    """The content of the regular file ``base/name`` (see :func:`open_job_file`); a file
    that grew past ``limit`` while it was read is :class:`JobFileInvalid` too."""
    fd = open_job_file(base, name, limit)
    try:
        # Plain reads of the descriptor (no buffered file object around it: a job's
        # files are read several times per request, and small).
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise JobFileInvalid(base, name, f"is larger than {limit} bytes")
    return data


def append_row(base: Path, time_: float, jobndx: int, state: JobState, info: str) -> None:
    """Append one row to the job's status.csv as psik's ``reached`` does (the same
    fields, under psik's own exclusive flock), through :func:`open_job_file`'s checks."""
    fd = open_job_file(base, "status.csv", MAX_STATUS, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        os.set_blocking(fd, True)
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(",".join(map(str, (time_, jobndx, state.value, info))) + "\n")


def check_job_files(base: Path) -> None:
    """Raise :class:`JobFileInvalid` unless the job's spec.json and status.csv are sane
    regular files: psik reads (and appends to) them with plain blocking opens, so this
    comes before a job is handed to psik. FileNotFoundError if one is missing."""
    for name, limit in (("spec.json", MAX_SPEC), ("status.csv", MAX_STATUS)):
        os.close(open_job_file(base, name, limit))


def read_history(base: Path) -> list[Row]:
    text = read_job_file(base, "status.csv", MAX_STATUS).decode("utf-8", errors="replace")
    return parse_rows(text, str(base))


def read_spec(base: Path) -> JobSpec:
    """The job's spec.json; :class:`JobFileInvalid` if it is no job spec (a job can
    rewrite it: its own problem, answered as such, never a 404 or a 500)."""
    raw = read_job_file(base, "spec.json", MAX_SPEC)
    try:
        return JobSpec.model_validate_json(raw)
    except (ValueError, RecursionError) as e:
        raise JobFileInvalid(base, "spec.json", "is not a job spec psik wrote") from e


@dataclass(frozen=True)
class JobFiles:
    """What a job directory says about its job."""

    jobid: str
    spec: JobSpec
    history: list[Row]
    #: The group that made the job (``.psik-api-group``), if one did.
    group: str | None = None

    @functools.cached_property
    def state(self) -> tuple[JobState, int]:
        # Once per read: each derivation reads every row (a job can write 100,000).
        return derive_state(self.history)

    @property
    def exit_code(self) -> int | None:
        """The current run's exit status once it ended (see :func:`run_outcome`)."""
        return run_outcome(self.history)[1]

    @property
    def created(self) -> float:
        return self.history[0].time if self.history else float(self.jobid)

    @property
    def updated(self) -> float:
        return max((r.time for r in self.history), default=self.created)


def read_job(base: Path) -> JobFiles:
    """Spec (with its labels and dependencies) and history of the job at ``base`` (OSError/ValueError if
    it is not one)."""
    spec = read_spec(base)
    labels = read_labels(base)
    if labels:
        spec = spec.model_copy(update={"labels": labels})
    after = read_after(base)
    if after:
        spec = spec.model_copy(update={"after": after})
    return JobFiles(jobid=base.name, spec=spec, history=read_history(base), group=read_group(base))


def read_made(base: Path, labels: dict[str, str], after: list[Dependency], group: str | None) -> JobFiles:
    """:func:`read_job` of a job this server has just made, whose labels, dependencies
    and group it wrote itself a moment ago: only psik's spec.json and status.csv are read."""
    spec = read_spec(base)
    if labels or after:
        spec = spec.model_copy(update={"labels": labels, "after": after})
    return JobFiles(jobid=base.name, spec=spec, history=read_history(base), group=group)


def list_jobids(prefix: Path) -> set[str]:
    """Ids of the job directories under ``prefix`` (names only: no file is read)."""
    try:
        with os.scandir(prefix) as it:
            return {e.name for e in it if is_jobid(e.name) and e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def read_job_settled(base: Path, timeout: float = 10.0) -> JobFiles:
    """:func:`read_job`, once no psik submit of this job is under way: psik holds an
    exclusive flock on status.csv from before it runs the backend until the ``queued``
    row is written, so a job read ``new`` here was not being submitted. TimeoutError
    (an OSError) if a submit holds it longer than ``timeout`` seconds."""
    with os.fdopen(open_job_file(base, "status.csv", MAX_STATUS), "rb") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{base.name}: status.csv stays locked by a submit") from None
                time.sleep(0.05)
        try:
            return read_job(base)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fingerprint(spec: JobSpec, base: Path | None = None) -> str:
    """A digest of the spec psik writes to a job's spec.json, equal whether it is taken
    from a request (with the backend's attributes merged in, as psik merges them) or read
    back from the job directory ``base`` (where the default ``base/work`` stands for no
    directory given). It lets start-up recognise the directory of a request that died
    before the index knew its jobid."""
    if base is not None and spec.directory == str(base / "work"):
        spec = spec.model_copy(update={"directory": None})
    doc = spec.model_dump(mode="json", exclude=set(spec.API_ONLY))  # kept beside spec.json, not in it
    doc["cb_secret"] = spec.cb_secret.get_secret_value() if spec.cb_secret else None
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


#: What psik's create puts in a job directory before its first status row.
_CREATE_MAKES = frozenset({"spec.json", "status.csv", "work", "log"})


def half_created(base: Path) -> bool:
    """True if ``base`` is a directory psik's create was stopped in: no complete status
    row, and nothing but what create makes (empty ``work/`` and ``log/``, a spec.json).
    A directory holding anything of a job's own is never one, whatever it lacks."""
    try:
        status = read_job_file(base, "status.csv", MAX_STATUS)
    except FileNotFoundError:
        status = b""
    except OSError:  # JobFileInvalid among them: no directory of psik's making
        return False
    if b"\n" in status:  # psik writes its first row, newline included, in one write
        return False
    try:
        with os.scandir(base) as it:
            entries = list(it)
        if any(e.name not in _CREATE_MAKES for e in entries):
            return False
        for e in entries:
            if e.name in {"work", "log"}:
                if not e.is_dir(follow_symlinks=False):
                    return False
                with os.scandir(e.path) as inner:
                    if next(inner, None) is not None:
                        return False
    except OSError:
        return False
    return True


def age(base: Path) -> float:
    """Seconds since anything in ``base`` (one level deep) last changed."""
    newest = base.stat().st_mtime
    with os.scandir(base) as it:
        for e in it:
            try:
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
            except OSError:
                continue
    return time.time() - newest


#: The job's owner as recorded at creation, kept in the job directory too: the index is
#: the fast copy, this one is what a rebuilt index (corrupt or deleted) takes owners from.
OWNER_NAME = ".psik-api-owner"
_MAX_OWNER = 1024


def write_private(path: Path, text: str, sync: bool = True) -> None:
    """Write a new file ``path`` (never over one, never through a symlink), mode 0600
    from the start, and sync it (``sync=False``: the caller syncs the filesystem once
    for many, :func:`sync_filesystem`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush every file written on ``path``'s filesystem (Linux ``syncfs``; else
    ``sync``): one flush for the files of many jobs instead of one fsync each."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs is not None and _libc_syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _find_syncfs() -> Any:
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_libc_syncfs = _find_syncfs()


def write_owner(base: Path, owner: str, sync: bool = True) -> None:
    """Record ``owner`` in the job directory ``base``, owner-only from the start."""
    write_private(base / OWNER_NAME, owner, sync)


LABELS_NAME = ".psik-api-labels"
_MAX_LABELS = 64 * 1024
_LABELS: TypeAdapter[dict[str, str]] = TypeAdapter(dict[LabelKey, LabelValue])


def write_labels(base: Path, labels: dict[str, str], sync: bool = True) -> None:
    """Record a job's labels beside its spec.json (psik's spec has no place for them)."""
    if labels:
        write_private(base / LABELS_NAME, json.dumps(labels), sync)


def read_labels(base: Path) -> dict[str, str]:
    """The labels recorded in ``base``; none if there are none or the file is not a
    labels record (the job can rewrite it: its own labels only, never an error)."""
    try:
        raw = read_job_file(base, LABELS_NAME, _MAX_LABELS)
    except OSError:
        return {}
    try:
        labels = _LABELS.validate_json(raw)
    except ValueError:
        return {}
    return labels if len(labels) <= LIMITS.max_labels else {}


GROUP_NAME = ".psik-api-group"
_GROUP = re.compile(GROUP_ID_PATTERN)


def write_group(base: Path, group: str | None, sync: bool = True) -> None:
    """Record the group that made the job (its membership survives a lost index)."""
    if group is not None:
        write_private(base / GROUP_NAME, group, sync)


def read_group(base: Path) -> str | None:
    """The group recorded in ``base``; None if none, or not a group id."""
    try:
        raw = read_job_file(base, GROUP_NAME, 64)
    except OSError:
        return None
    text = raw.decode("ascii", errors="replace")
    return text if _GROUP.fullmatch(text) else None


def read_owner(base: Path) -> str | None:
    """The owner recorded in ``base``; None if there is none (a job made without the
    server, or before it kept one) or it cannot be read."""
    try:
        raw = read_job_file(base, OWNER_NAME, _MAX_OWNER)
    except OSError:  # none, or not a file of ours (a FIFO, a link...)
        return None
    try:
        owner = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not owner or not owner.isprintable():
        return None
    return owner


#: A job's ``JobSpec.after`` (its dependencies), kept beside its spec.json as its labels
#: are: the index's ``job_deps`` is the fast copy, this one what a start-up rebuilds from.
AFTER_NAME = ".psik-api-after"
_MAX_AFTER = 64 * 1024
_AFTER: TypeAdapter[list[Dependency]] = TypeAdapter(list[Dependency])


def write_after(base: Path, after: list[Dependency], sync: bool = True) -> None:
    """Record a job's dependencies beside its spec.json (psik's spec has no place for them)."""
    if after:
        write_private(base / AFTER_NAME, _AFTER.dump_json(after, exclude_none=True).decode(), sync)


def read_after(base: Path) -> list[Dependency]:
    """The dependencies recorded in ``base`` (by jobid); none if there are none or the
    file is not such a record (the job can rewrite it: the server checks every parent's
    owner again before it acts on one)."""
    try:
        raw = read_job_file(base, AFTER_NAME, _MAX_AFTER)
    except OSError:
        return []
    try:
        after = _AFTER.validate_json(raw)
    except ValueError:
        return []
    if len(after) > LIMITS.max_after or any(d.jobid is None for d in after):
        return []
    return after
