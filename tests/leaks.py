"""Every test ends what it starts: find the processes this test session started.

A process is ours when it carries the session's marker in its environment (``MARKER``,
set by conftest before any test runs, inherited by every process a test spawns: servers,
launchers, jobs, scripts; psik's jobs are detached with setsid and a double fork, so
ancestry alone would lose them) or when the pytest process is one of its ancestors (a
plain fork of pytest keeps the environment pytest was started with, without the marker).
psutil is not a dependency: this reads /proc. conftest imports the fixture and the hook
below, so they apply to every test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The environment variable that marks the processes of one test session.
MARKER = "PSIK_API_TEST_SESSION"

_PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.cmdline}"


def mark_session() -> str:
    """Set a new marker for this session and return it (a pytest run by a test has its
    own, so that neither counts the other's processes)."""
    os.environ[MARKER] = uuid.uuid4().hex
    return os.environ[MARKER]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid``, or None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def ours(marker: str, root: int | None = None, spare: Collection[int] = ()) -> dict[int, Proc]:
    """The live processes (not zombies) of the session ``marker``, or below ``root``,
    except the ``spare`` ones and those below them."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[str, int]] = {}
    for entry in os.scandir(_PROC):
        if entry.name.isdigit() and int(entry.name) != root:
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    needle = f"{MARKER}={marker}".encode()
    found: dict[int, Proc] = {}
    for pid, (state, _) in stats.items():
        if state in {"Z", "X"} or pid in spare or _below(pid, spare, stats):
            continue  # ended (only its parent's wait is missing), or not this test's
        if _below(pid, {root}, stats) or _marked(pid, needle):
            found[pid] = Proc(pid, _cmdline(pid))
    return found


def _below(pid: int, roots: Collection[int], stats: dict[int, tuple[str, int]]) -> bool:
    seen: set[int] = set()
    while pid in stats and pid not in seen:
        seen.add(pid)
        pid = stats[pid][1]
        if pid in roots:
            return True
    return False


def _marked(pid: int, needle: bytes) -> bool:
    try:
        env = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return needle in env.split(b"\0")


def left_alive(marker: str, before: set[int], grace: float) -> list[Proc]:
    """The processes of ``marker`` neither in ``before`` nor below one of those (a server
    a wider-scoped fixture runs starts its launcher when it is first needed) still alive
    after ``grace`` seconds (time for a process being ended to go: a job's ``true``, a
    launcher reading EOF)."""
    deadline = time.monotonic() + grace
    while True:
        left = list(ours(marker, spare=before).values())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def end(procs: list[Proc]) -> None:
    """Kill the leaked processes, each by its pid, so one leak does not spill into the
    next test's check."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)


# ---- the check: a fixture for each test, a hook for the session ----

#: Inherited by every process a test starts, so the leak check below finds them.
SESSION = mark_session()
#: Seconds a test's processes get to end after its teardown (a job's `true` being reaped,
#: a launcher reading EOF: LocalLauncher.aclose waits 5 s before it kills).
LEAK_GRACE = float(os.environ.get("PSIK_API_TEST_LEAK_GRACE", "10"))
#: pid -> the test during whose setup a wider-scoped fixture started it.
_BORN_IN: dict[int, str] = {}


@pytest.fixture(autouse=True)
def _ends_what_it_starts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process alive after its teardown (and end those).

    Function-scoped autouse fixtures are set up after every wider-scoped fixture of the
    test and torn down after every other function-scoped one: a process new here and
    still alive then was started by the test or its function fixtures."""
    before = set(ours(SESSION))
    for pid in before:
        _BORN_IN.setdefault(pid, request.node.nodeid)
    yield
    left = left_alive(SESSION, before, LEAK_GRACE)
    if left:
        end(left)
        pytest.fail(
            f"{request.node.nodeid} left {len(left)} process(es) running {LEAK_GRACE:.0f} s after its "
            "teardown (now killed):\n" + "\n".join(f"  {p}" for p in left),
            pytrace=False,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Wider-scoped fixtures are torn down by now: whatever of ours is alive leaked."""
    left = left_alive(SESSION, set(), LEAK_GRACE)
    if not left:
        return
    end(left)
    lines = [f"  {p} (started during {_BORN_IN.get(p.pid, 'no test: collection or a hook')})" for p in left]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes left running after the session (now killed):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
