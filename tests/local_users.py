"""Another local user for attack tests: created when the tests run as root (and removed
again at the end of the session if it was made here), with a python3 it can run.
Elsewhere the tests that need it skip with a message, except under CI=true, where
they fail: there the attacks must run."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from typing import NamedTuple

import pytest

OTHER_USER = "psikapi-other"


class Other(NamedTuple):
    uid: int
    gid: int
    python: str


def cannot(reason: str) -> None:
    """Skip (fail under CI=true): the attack cannot run here, for ``reason``."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: this attack must run, but {reason}")
    pytest.skip(f"needs another uid: {reason}")


def another_user() -> Iterator[Other]:
    """Another local user (created when we are root) and a python3 it can run: the body
    of a session fixture (``yield from another_user()``), removed again if made here."""
    if os.geteuid() != 0:
        cannot("not root, so no user can be created and no process run as another uid")
    made = False
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        added = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            capture_output=True,
            text=True,
        )
        if added.returncode != 0:
            cannot(f"useradd {OTHER_USER} failed: {added.stderr.strip()}")
        made = True
        entry = pwd.getpwnam(OTHER_USER)
    try:
        for python in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
            if python and run_as(entry.pw_uid, entry.pw_gid, [python, "-c", "pass"]).returncode == 0:
                yield Other(entry.pw_uid, entry.pw_gid, python)
                break
        else:
            cannot(f"no python3 that {OTHER_USER} can run")
    finally:
        if made:
            subprocess.run(["userdel", OTHER_USER], capture_output=True, check=False)


def run_as(uid: int, gid: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``uid``:``gid`` (no supplementary groups, a bare environment) to its end."""
    return subprocess.run(
        argv,
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
