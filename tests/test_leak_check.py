"""The leak check itself (tests/leaks.py): a test that leaves a process running fails,
naming itself and the process, whether the process is its child or detached as psik
detaches a job; a wider-scoped fixture's leftover fails the session; each is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

TESTS = Path(__file__).parent


def _alive(tag: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = (Path(entry.path) / "cmdline").read_bytes()
                state = (Path(entry.path) / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if tag.encode() in cmd and state != b"Z":
                found.append(int(entry.name))
    return found


def test_a_leaking_test_fails_naming_what_it_left(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]  # in each sleeper's argv, to find them in /proc
    sleeper = f'["sh", "-c", "sleep 300; : {tag}-%s"]'
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(TESTS)!r})
        import pytest
        from leaks import _ends_what_it_starts, pytest_sessionfinish

        @pytest.fixture(scope="module")
        def module_sleeper():
            subprocess.Popen({sleeper % "module"})  # never ended: the session's leak
        """)
    )
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(f"""
        import os, signal, subprocess

        def test_leaves_a_child():
            subprocess.Popen({sleeper % "child"})

        def test_leaves_a_detached_process():
            # setsid and a fork, as psik starts a job: not below pytest any more
            subprocess.run(["setsid", "sh", "-c", "sh -c 'sleep 300; : {tag}-detached' &"], check=True)

        def test_ends_what_it_starts():
            # The shell and the sleep it may have forked already (a loaded machine lets it
            # run before the kill): its whole process group.
            p = subprocess.Popen({sleeper % "ended"}, start_new_session=True)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

        def test_uses_a_leaking_module_fixture(module_sleeper):
            pass
        """)
    )
    env = {**os.environ, "PSIK_API_TEST_LEAK_GRACE": "1"}
    try:
        inner = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = inner.stdout + inner.stderr
        assert inner.returncode == 1, out
        assert "4 passed, 2 errors" in out, out
        assert "ERROR at teardown of test_leaves_a_child" in out, out
        assert "test_leaves_a_child left 2 process(es) running" in out, out
        assert f"{tag}-child" in out
        assert "test_leaves_a_detached_process left 2 process(es) running" in out, out
        assert f"{tag}-detached" in out
        assert "processes left running after the session" in out, out
        assert f"{tag}-module" in out
        assert "started during test_inner.py::test_uses_a_leaking_module_fixture" in out, out
        assert f"{tag}-ended" not in out
        assert _alive(tag) == [], "the check kills what it reports"
    finally:
        for pid in _alive(tag):
            os.kill(pid, 9)
