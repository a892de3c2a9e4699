"""The README's examples are run as written, against a live server: the curl lines
(the original README's, quoting fixed) and the `psik-api` command line."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from psik_api_client.cli import main as psik_api
from support import LiveServer

README = Path(__file__).parents[2] / "README.md"
EXAMPLE_JOBID = "1693992878.203"


def _curl_lines() -> list[str]:
    blocks, current, inside = [], [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            current, inside = [], not inside
        elif inside:
            current.append(line)
    block = next(b for b in blocks if b.startswith("curl "))
    commands, current = [], ""
    for line in block.splitlines():
        current += line.split("  # ")[0] + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(current)  # a command ends where its quotes are balanced
        except ValueError:
            continue
        commands.append(current.strip())
        current = ""
    return [c for c in commands if c]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples(live_app: LiveServer) -> None:
    commands = _curl_lines()
    assert len(commands) == 5
    created: list[str] = []
    for cmd in commands:
        cmd = cmd.replace("http://127.0.0.1:8000", live_app.url)
        if EXAMPLE_JOBID in cmd:
            cmd = cmd.replace(EXAMPLE_JOBID, created[-1])  # "your job's id"
        out = subprocess.run(
            ["bash", "-c", cmd + " -sS -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (cmd, out.stderr)
        body, _, status = out.stdout.rpartition("\n")
        assert status in {"200", "201"}, (cmd, status, body)
        doc = json.loads(body)
        if status == "201":
            created.append(doc["jobid"])
    assert len(created) == 2  # the submit and the /new


def test_cli_submit_wait_ls_get_cancel(
    live_app: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"name": "from-cli", "script": "echo hi"}))
    url = ["--url", live_app.url]
    assert psik_api([*url, "submit", str(spec), "--wait", "--timeout", "30"]) == 0
    assert "completed" in capsys.readouterr().out
    assert psik_api([*url, "ls", "--name", "from-cli"]) == 0
    listing = capsys.readouterr().out
    assert "from-cli" in listing and "completed" in listing
    jobid = listing.splitlines()[1].split()[0]
    assert psik_api([*url, "get", jobid]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["script"] == "echo hi"
    assert psik_api([*url, "cancel", jobid]) == 0  # final: stays completed
    assert "completed" in capsys.readouterr().out
    assert psik_api([*url, "start", "1000000000.001"]) == 5  # the server refused
    assert "no job 1000000000.001" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"script": "x", "resources": {"nodes": 2}}))
    assert psik_api([*url, "submit", str(bad)]) == 2


def _python_blocks() -> list[str]:
    blocks, current, inside = [], [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            current, inside = [], line.strip() == "```python"
        elif inside:
            current.append(line)
    return blocks


def _run_script(source: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PSIK_API_URL": url}
    env.pop("PSIK_API_UDS", None)
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, env=env
    )


def test_readme_python_examples_run_as_scripts(live_app: LiveServer) -> None:
    """Each ```python block of the README, pasted into a file and run, works as is."""
    # The third, the staging flow, runs in test_files_logs.py.
    sync_example, async_example, _staging = _python_blocks()
    out = _run_script(sync_example.replace("http://127.0.0.1:8000", live_app.url), live_app.url)
    assert out.returncode == 0, out.stderr
    state, exit_code, native_id = out.stdout.splitlines()[0].split()
    assert (state, exit_code) == ("completed", "0") and native_id.isdigit()  # the job's process id
    out = _run_script(async_example, live_app.url)  # its server: $PSIK_API_URL
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "100 of 100 completed"
    assert "100/100 final" in out.stderr  # progress=True


def test_cli_rough_edges_against_the_real_server(
    live_app: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14's command-line items, end to end: a script without a job file, the exit
    code in ``ls``, a job never started, several ids, ``purge``."""
    url = ["--url", live_app.url]
    assert psik_api([*url, "submit", "--script", "exit 3", "--wait", "--timeout", "30"]) == 1
    captured = capsys.readouterr()
    failed, state = captured.out.split()
    assert state == "failed" and f"job {failed} submitted; waiting" in captured.err
    assert psik_api([*url, "create", "--script", "echo never"]) == 0
    new = capsys.readouterr().out.strip()
    assert psik_api([*url, "ls"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[failed][1] == "failed" and rows[failed][6] == "3"  # ENDED is date and time
    assert rows[new][1:] == ["new", "0", "default", "-", "-", "-"]
    assert psik_api([*url, "wait", new, "--timeout", "0"]) == 3
    assert f"job {new} was never started" in capsys.readouterr().err
    assert psik_api([*url, "logs", new, "--follow"]) == 1
    assert f"job {new} was never started: no log to follow" in capsys.readouterr().err
    assert psik_api([*url, "cancel", new, failed]) == 0
    assert capsys.readouterr().out.split() == [new, "canceled", failed, "failed"]
    assert psik_api([*url, "wait", new, failed]) == 1
    assert capsys.readouterr().out.split() == [new, "canceled", failed, "failed"]
    assert psik_api([*url, "purge", new, failed]) == 0
    assert capsys.readouterr().out.split() == [new, "purged", failed, "purged"]
    assert psik_api([*url, "get", failed]) == 5
