"""``psik-api-server check`` against the real cluster: a Slurm backend whose partition
exists is ok; one whose partition does not is FAIL, naming the cluster's partitions to
pick from; an account the server's user has no association with is FAIL too."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest

from psik_api_server import preflight

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def check(tmp_path: Path, backend: dict[str, Any]) -> tuple[int, list[str]]:
    site = tmp_path / "site"
    site.mkdir(mode=0o700, exist_ok=True)
    config = site / "psik_api.json"
    config.write_text(
        json.dumps(
            {
                "prefix": str(site / "jobs"),
                "state_dir": str(site / "state"),
                "port": 0,
                "backends": {"cluster": {"type": "slurm", **backend}},
            }
        )
    )
    parser = argparse.ArgumentParser()
    preflight.add_arguments(parser)
    out = io.StringIO()
    code = preflight.run(parser.parse_args(["--config", str(config)]), out=out)
    return code, [line for line in out.getvalue().splitlines() if "backend cluster (slurm):" in line]


def test_a_real_partition_is_ok(tmp_path: Path) -> None:
    code, lines = check(tmp_path, {"queue_name": "debug"})
    assert code == 0, lines
    assert lines[0].startswith("ok   backend cluster (slurm): the Slurm controller answers"), lines
    assert "ok   backend cluster (slurm): partition 'debug' exists and is UP" in lines


def test_an_unknown_partition_fails_naming_the_partitions_there_are(tmp_path: Path) -> None:
    code, lines = check(tmp_path, {"queue_name": "nosuch"})
    assert code == 1, lines
    [line] = [line for line in lines if line.startswith("FAIL")]
    assert "partition 'nosuch'" in line
    assert "set queue_name to one of the cluster's partitions (debug)" in line


def test_an_account_without_the_servers_user_fails(tmp_path: Path) -> None:
    code, lines = check(tmp_path, {"queue_name": "debug", "project_name": "nosuch"})
    assert code == 1, lines
    [line] = [line for line in lines if line.startswith("FAIL")]
    assert "account 'nosuch' has no association" in line and "fix project_name" in line
