"""The README's examples are run as written, against a live server: the curl lines
(the original README's, quoting fixed) and the `psik-api` command line."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psik_api_client.cli import main as psik_api
from support import LiveServer, free_port, readme_python_blocks

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


def _run_script(source: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PSIK_API_URL": url}
    env.pop("PSIK_API_UDS", None)
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, env=env
    )


def test_readme_python_examples_run_as_scripts(live_app: LiveServer) -> None:
    """Each ```python block of the README, pasted into a file and run, works as is."""
    # The third, the staging flow, runs in test_files_logs.py; the fourth, a Parsl
    # config, in tests_workflows/parsl/test_readme_config.py (Parsl is there).
    sync_example, async_example, _staging, _parsl = readme_python_blocks(README)
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


def _recipe(name: str) -> list[str]:
    """The commands of the fenced block after ``<!-- recipe: NAME -->``, one a line,
    comments and blank lines left out."""
    text = README.read_text()
    marker = f"<!-- recipe: {name} -->\n```\n"
    start = text.index(marker) + len(marker)
    block = text[start : text.index("\n```", start)]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(
    not Path(sys.executable).with_name("certified").exists(), reason="certified is not installed"
)
def test_readme_certified_recipe_runs_as_written(tmp_path: Path) -> None:
    """Every line of the README's certified recipe, run by bash in a fresh HOME, in order;
    the server line in the background. Changed only where a site's names cannot be had
    here: ``hpc.example`` is ``localhost``, port 4433 a free one, ``/srv/psik`` a
    directory of the test's. It ends with alice's job done and an agent's list, each a
    mutual-TLS request."""
    home, site, admin = tmp_path / "home", tmp_path / "srv", tmp_path / "admin"
    for directory in (home, site, admin):
        directory.mkdir()
    port = str(free_port())
    bin_dir = str(Path(sys.executable).parent)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PSIK_API_", "CERTIFIED_", "XDG_"))
    }
    env.update(HOME=str(home), PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", XDG_RUNTIME_DIR="")
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    commands = [
        line.replace("hpc.example", "localhost").replace(":4433", f":{port}").replace("/srv/psik", str(site))
        for line in _recipe("certified")
    ]
    assert sum("certified serve" in c for c in commands) == 1
    server: subprocess.Popen[bytes] | None = None
    outputs: list[str] = []
    log = tmp_path / "server.log"
    try:
        for command in commands:
            if "certified serve" in command:
                assert command.endswith(" &")
                with log.open("wb") as out:
                    server = subprocess.Popen(
                        ["bash", "-c", command.removesuffix(" &")],
                        cwd=admin, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                _wait_for_tls(server, port, admin / "SRV" / "CA.crt", log)
                continue
            done = subprocess.run(
                ["bash", "-c", command], cwd=admin, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append(done.stdout)
    finally:
        if server is not None:
            _stop(server)
    jobid, state = outputs[commands.index(next(c for c in commands if "submit" in c)) - 1].split()
    assert state == "completed"
    listing = outputs[-1].splitlines()
    assert listing[0].split()[0] == "JOBID" and listing[1].split()[:2] == [jobid, "completed"]


def _wait_for_tls(server: subprocess.Popen[bytes], port: str, ca: Path, log: Path) -> None:
    """Until the server's TLS port takes a connection (the recipe's next line needs it);
    it asks for a client certificate, which this probe does not have: a handshake that
    gets that far is enough."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with (
                socket.create_connection(("localhost", int(port)), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    raise AssertionError(f"the recipe's server did not listen:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
