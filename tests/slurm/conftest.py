"""A real single-node Slurm cluster for the tests in this directory (scripts/slurm_cluster.py).

The cluster is brought up once per test session in ``/tmp/psik-api-slurm`` (installing
Debian's packages when missing) and reused if it already runs there; it is stopped at the
end only if this session started it and no other session is using it (a shared flock on
``/tmp/psik-api-slurm.lock`` marks a user). Where Slurm cannot run (not root, no apt) the
tests skip saying why, except under ``CI=true``, where that is a failure. The cluster has
accounting (slurmdbd, MariaDB: ``sacct`` answers) and a MinJobAge of 5 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Not under pytest's tmp dirs: munged and slurm need every parent enterable by others.
STATE = Path("/tmp/psik-api-slurm")
LOCK = Path("/tmp/psik-api-slurm.lock")


def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_cluster", ROOT / "scripts" / "slurm_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm tests cannot run under CI=true: {why}", pytrace=False)
    pytest.skip(f"no Slurm cluster on this machine: {why}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Any]:
    """The cluster (``slurm_cluster.Cluster``), up; ``SLURM_CONF`` is set for the session,
    so the server's sbatch/squeue/scancel (and the tests' own) find it."""
    sc = harness()
    why = sc.cannot_run()
    if why is not None:
        _unavailable(why)
    cluster = sc.Cluster(STATE)
    with open(LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            started = sc.up(cluster)
        except sc.ClusterError as e:
            fcntl.flock(lock, fcntl.LOCK_UN)
            _unavailable(str(e))
        fcntl.flock(lock, fcntl.LOCK_SH)  # in use: another session's teardown leaves it up
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if started:
                sc.down(cluster)
