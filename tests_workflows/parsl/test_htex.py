"""Parsl programs on PsikApiProvider: a HighThroughputExecutor whose blocks psik-api
starts runs 50 apps on a local server, and one app through the real Slurm cluster. The
DFK is cleaned up as a Parsl program ends, and that cancels the blocks: no process is
left (tests/leaks.py)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import parsl
import pytest
from parsl.app.app import python_app
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor

from psik_api_client import Client, JobState
from psik_api_client.parsl import LABEL, PsikApiProvider

#: The apps are this module's functions, which the workers import by name (as pytest
#: named the module: from the repository's root).
ROOT = Path(__file__).resolve().parents[2]


@python_app
def square(x: int) -> int:
    return x * x


@python_app
def where() -> tuple[str, str | None]:
    import os
    import socket

    return socket.gethostname(), os.environ.get("SLURM_JOB_ID")


def htex_config(provider: PsikApiProvider, run_dir: Path) -> Config:
    # The workers reach the interchange on loopback: the blocks run on this machine.
    return Config(
        executors=[
            HighThroughputExecutor(
                label="htex_psik",
                address="127.0.0.1",
                # Found without this interpreter's bin/ on PATH (nox puts it there).
                interchange_launch_cmd=[str(Path(sys.executable).parent / "interchange.py")],
                max_workers_per_node=4,
                provider=provider,
            )
        ],
        run_dir=str(run_dir),
        strategy="none",  # the init_blocks only: the test's block count is fixed
    )


@pytest.fixture
def dfk_of() -> Iterator[list[DataFlowKernel]]:
    """Cleans up the DFK a test loaded, however it ends."""
    loaded: list[DataFlowKernel] = []
    yield loaded
    for dfk in loaded:
        dfk.cleanup()
    parsl.clear()


@pytest.fixture
def worker_init(worker_init: str) -> str:
    return f"{worker_init}\nexport PYTHONPATH={ROOT}"


def test_fifty_apps_on_a_local_server(
    local_url: str, worker_init: str, tmp_path: Path, dfk_of: list[DataFlowKernel]
) -> None:
    provider = PsikApiProvider(local_url, worker_init=worker_init, status_polling_interval=1)
    dfk_of.append(parsl.load(htex_config(provider, tmp_path / "runinfo")))

    assert [f.result(timeout=120) for f in [square(i) for i in range(50)]] == [i * i for i in range(50)]

    with Client(local_url) as api:
        (block,) = api.list(label={LABEL: provider.instance_id})
    assert block.state is JobState.active
    assert block.name == "parsl.htex_psik.block-0"

    dfk_of.pop().cleanup()  # scales in: cancels the block
    parsl.clear()
    with Client(local_url) as api:
        assert api.wait(block.jobid, timeout=60).state is JobState.canceled


def test_one_app_through_slurm(
    slurm_url: str, worker_init: str, tmp_path: Path, dfk_of: list[DataFlowKernel]
) -> None:
    provider = PsikApiProvider(
        slurm_url,
        backend="slurm",
        walltime="00:05:00",
        # The test cluster's one node is shared with other tests: not exclusively.
        spec={"resources": {"exclusive_node_use": False}},
        worker_init=worker_init,
        status_polling_interval=1,
    )
    dfk_of.append(parsl.load(htex_config(provider, tmp_path / "runinfo")))

    host, slurm_job = where().result(timeout=180)
    assert host == socket.gethostname()  # the single-node cluster is this machine
    assert slurm_job is not None  # the worker ran inside a Slurm job

    with Client(slurm_url) as api:
        (block,) = api.list(label={LABEL: provider.instance_id})
    assert block.backend == "slurm"
    assert block.state is JobState.active

    dfk_of.pop().cleanup()
    parsl.clear()
    with Client(slurm_url) as api:
        assert api.wait(block.jobid, timeout=120).state is JobState.canceled
