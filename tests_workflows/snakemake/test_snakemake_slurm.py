"""One workflow on the real single-node Slurm cluster (tests/slurm's): every job an sbatch
job through a psik-api server with a Slurm backend, its resources as sbatch options."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from psik_api_client import Client, JobState

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SNAKEFILE = """
rule all:
    input: expand("out/{i}.txt", i=range(3))

rule one:
    output: "out/{i}.txt"
    resources: runtime=5, mem_mb=100, slurm_partition="debug"
    shell: "echo $SLURM_JOB_ID > {output}"
"""


def test_a_workflow_runs_on_slurm(tmp_path: Path, start_psik_server: Any) -> None:
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    server = start_psik_server(
        [tmp_path],
        {"slurm": {"type": "slurm", "queue_name": "debug", "attributes": {"psik_python": sys.executable}}},
    )
    argv = [sys.executable, "-m", "snakemake", "--executor", "psik-api", "--psik-api-url", server.url]
    run = subprocess.run(
        [*argv, "--psik-api-backend", "slurm", "--jobs", "3", "--seconds-between-status-checks", "1"],
        cwd=wf,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    slurm_ids = {(wf / "out" / f"{i}.txt").read_text().strip() for i in range(3)}
    assert all(s.isdigit() for s in slurm_ids) and len(slurm_ids) == 3  # three sbatch jobs
    with Client(server.url) as api:
        jobs = [api.get(j.jobid) for j in api.list(backend="slurm")]
    assert len(jobs) == 3 and all(j.state == JobState.completed for j in jobs)
    assert {j.native_id for j in jobs} == slurm_ids
    for job in jobs:
        assert job.spec.attributes["--mem"] == "100M" and job.spec.attributes["--partition"] == "debug"
        assert job.spec.resources.duration == 5 and not job.spec.resources.exclusive_node_use
