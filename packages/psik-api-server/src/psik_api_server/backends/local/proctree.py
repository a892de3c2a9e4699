"""Processes as Linux's ``/proc`` shows them: who descends from whom, which session each
is in, and which psik job (if any) each belongs to.

A process is named by its PID *and* its start time (clock ticks since boot): a PID can
be reused, the pair cannot. :func:`send` checks the pair again right before it signals,
so a process that ended meanwhile is left alone, and so is a stranger that got its PID.

psik's local runner starts a job's script with ``base`` (the job's directory) and
``jobndx`` (the run) in its environment, which every process the script starts
inherits: that is the job's **tag**, found in ``/proc/<pid>/environ`` (the environment
the process was started with) even after the process left the job's session and its
parent died. A process that drops it (``env -i``) is not tagged.

Everything here is blocking (it reads ``/proc``): call it from a worker thread.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

PROC = Path("/proc")

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def boot_time(proc: Path = PROC) -> float | None:
    """Boot time on the wall clock *now*: ``btime`` is whole seconds and the wall clock
    may have been stepped since boot, so it is derived from the uptime instead."""
    try:
        uptime = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime


def has_proc(proc: Path = PROC) -> bool:
    """True if ``proc`` is a procfs (Linux): this process's own entry is there."""
    return (proc / str(os.getpid()) / "stat").exists()


@dataclass(frozen=True)
class Proc:
    """One process, as ``/proc/<pid>/stat`` showed it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int  # clock ticks after boot; (pid, start) names one process

    @property
    def alive(self) -> bool:
        """False for a process that exited and was not reaped yet (a zombie)."""
        return self.state not in {"Z", "X"}

    def started(self, boot: float) -> float:
        """When it started, on the wall clock (``boot``: :func:`boot_time`)."""
        return boot + self.start / TICKS


def parse_stat(pid: int, text: str) -> Proc:
    """A :class:`Proc` from the text of ``/proc/<pid>/stat`` (ValueError if malformed)."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return Proc(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0],
            start=int(fields[19]),
        )
    except IndexError as e:
        raise ValueError(f"malformed /proc/{pid}/stat") from e


def read_proc(pid: int, proc: Path = PROC) -> Proc | None:
    """The process ``pid`` now, or None if there is none (or it cannot be read)."""
    try:
        return parse_stat(pid, (proc / str(pid) / "stat").read_text())
    except (OSError, ValueError):
        return None


def read_tag(pid: int, proc: Path = PROC) -> tuple[str, int] | None:
    """``(base, jobndx)`` from the environment ``pid`` started with; None if it has no
    psik job tag or cannot be read (another user's process)."""
    try:
        environ = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    base = jobndx = None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"base="):
            base = entry[5:]
        elif entry.startswith(b"jobndx="):
            jobndx = entry[7:]
    if base is None or jobndx is None or not jobndx.isdigit():
        return None
    return os.fsdecode(base), int(jobndx)


class ProcessTable:
    """One look at every process of this user (``read``), and the links between them."""

    def __init__(self, procs: Iterable[Proc], proc: Path = PROC) -> None:
        self.procs = {p.pid: p for p in procs}
        self._proc = proc
        self._children: dict[int, list[int]] = {}
        for p in self.procs.values():
            self._children.setdefault(p.ppid, []).append(p.pid)
        self._tags: dict[int, tuple[str, int] | None] = {}

    @classmethod
    def read(cls, proc: Path = PROC) -> ProcessTable:
        """Every process this user owns (processes of others are never signalled)."""
        uid = os.geteuid()
        procs = []
        try:
            names = os.listdir(proc)
        except OSError:
            names = []
        for name in names:
            if not name.isdigit():
                continue
            try:
                if os.stat(proc / name).st_uid != uid:
                    continue
            except OSError:
                continue
            if (p := read_proc(int(name), proc)) is not None:
                procs.append(p)
        return cls(procs, proc)

    def get(self, pid: int, start: int | None = None) -> Proc | None:
        """The live process ``pid`` (started at ``start``, if given), else None."""
        p = self.procs.get(pid)
        if p is None or not p.alive or (start is not None and p.start != start):
            return None
        return p

    def children(self, pid: int) -> list[int]:
        """The live children of ``pid``."""
        return [c for c in self._children.get(pid, ()) if self.get(c) is not None]

    def descendants(self, roots: Iterable[int]) -> set[int]:
        """``roots`` and every process below them by parent links (not zombies)."""
        found: set[int] = set()
        todo = [pid for pid in roots if self.get(pid) is not None]
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            todo.extend(self.children(pid))
        return found

    def session(self, sid: int) -> set[int]:
        """The live members of session ``sid``."""
        return {p.pid for p in self.procs.values() if p.sid == sid and p.alive}

    def lineage(self, pid: int) -> set[int]:
        """``pid`` and its ancestors: processes never to signal when ``pid`` is us."""
        seen: set[int] = set()
        while pid > 0 and pid not in seen:
            seen.add(pid)
            p = self.procs.get(pid) or read_proc(pid, self._proc)
            if p is None:
                break
            pid = p.ppid
        return seen

    def tag(self, pid: int) -> tuple[str, int] | None:
        """The psik job tag of ``pid`` (read once per table)."""
        if pid not in self._tags:
            self._tags[pid] = read_tag(pid, self._proc)
        return self._tags[pid]

    def tagged(self) -> dict[int, tuple[str, int]]:
        """Every live process that carries a psik job tag."""
        out = {}
        for pid, p in self.procs.items():
            if p.alive and (tag := self.tag(pid)) is not None:
                out[pid] = tag
        return out


def send(pid: int, start: int | None, sig: signal.Signals, proc: Path = PROC) -> bool:
    """Send ``sig`` to the process ``pid`` if it still is the one started at ``start``
    (None: no /proc to check against). False if it is gone: a benign race, not logged."""
    if start is not None:
        now = read_proc(pid, proc)
        if now is None or now.start != start or not now.alive:
            return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as e:  # not ours (any more): never worth more than a warning
        _logger.warning("cannot signal process %d: %s", pid, e)
        return False
    return True
