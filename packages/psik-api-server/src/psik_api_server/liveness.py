"""Liveness of local jobs: a job whose process is gone without a final row is failed.

psik's local backend records ``completed``/``failed`` from inside the job's own process,
and its ``poll()`` does nothing: a job killed with SIGKILL, or lost in a reboot, would say
``active`` forever. So the server looks at every non-final local job now and then
(``JobService.check_liveness``): if the process psik recorded (the ``queued`` row's info)
no longer runs and the history still has no final row, it records ``failed`` and why.

A PID can be reused: a process that started well after the job was queued is not the
job's, so it counts as gone. Where that cannot be told (no ``/proc``), a live PID is
given the benefit of the doubt: a job is never failed while its process may be running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: A process that started this long after its job's queued row is someone else's. Generous:
#: failing a live job would be far worse than noticing a reused PID late.
_START_SLACK = 30.0


def _boot_time() -> float | None:
    """Boot time on the wall clock *now*: ``btime`` is whole seconds and the wall clock
    may have been stepped since boot, so it is derived from the uptime instead."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_running(pid: int, since: float) -> bool:
    """True if ``pid`` runs and may be the process started at about ``since``."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return _signal_zero(pid)
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])
    if state in {"Z", "X"}:  # exited, not yet reaped
        return False
    boot = _boot_time()
    if boot is None:
        return True
    started = boot + start_ticks / _TICKS
    return started <= since + _START_SLACK


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
