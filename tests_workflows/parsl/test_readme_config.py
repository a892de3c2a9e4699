"""The README's Parsl config, pasted into a file and run, works as is: it builds the
Config with a HighThroughputExecutor on PsikApiProvider, which loads and runs an app on a
real server (the provider's full checks are in test_provider.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import readme_python_blocks

README = Path(__file__).resolve().parents[2] / "README.md"


def _parsl_block() -> str:
    (block,) = [b for b in readme_python_blocks(README) if "PsikApiProvider" in b]
    return block


def test_the_readme_parsl_config_builds_as_written() -> None:
    check = """
provider = config.executors[0].provider
print(type(provider).__name__, provider.url, provider.backend, config.executors[0].address)
"""
    env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_URL", "PSIK_API_UDS"}}
    out = subprocess.run(
        [sys.executable, "-c", _parsl_block() + check], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PsikApiProvider", "http://127.0.0.1:8000", "default", "127.0.0.1"]
