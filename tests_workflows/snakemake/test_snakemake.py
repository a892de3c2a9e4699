"""The Snakemake executor plugin against a live psik-api server in local mode:
Snakemake's own workflow tests (its bundled workflows), then what the plugin promises
on top: resources mapped to the JobSpec, one status request per cycle for the whole
run, a failed job's log tail in its error (its last bytes, control characters escaped),
a bad setting or a refused directory a clear error, attributes a backend cannot take
said, and Ctrl-C canceling every job of the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase

from psik_api_client import Client, JobState, JobSummary
from snakemake_executor_plugin_psik_api import ExecutorSettings
from snakemake_executor_plugin_psik_api.failures import TAIL_BYTES, failure_message
from snakemake_executor_plugin_psik_api.resources import ResourceMapper


class TestPsikApiWorkflows(TestWorkflowsLocalStorageBase):
    """Snakemake's bundled workflows (simple, groups), every job through psik-api."""

    __test__ = True

    @pytest.fixture(autouse=True)
    def _server(self, psik_server: Any) -> None:
        self.server = psik_server

    def get_executor(self) -> str:
        return "psik-api"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(url=self.server.url)


# ---- resources ----


def test_resources_map_to_the_jobspec_on_any_backend() -> None:
    mapped = ResourceMapper("local").map(
        4,
        {"runtime": 90, "gpu": 1, "nodes": 2, "tasks": 3, "mem_mb": 2000, "tmpdir": "/scratch", "_cores": 4},
    )
    r = mapped.resources
    assert (r.cpu_cores_per_process, r.duration, r.gpu_cores_per_process) == (4, 90, 1)
    assert (r.node_count, r.process_count, r.exclusive_node_use) == (2, 3, False)
    assert mapped.attributes == {}
    assert mapped.unmapped == ["mem_mb"]  # a local backend has no memory limit to set


def test_resources_map_to_sbatch_options_on_slurm() -> None:
    mapped = ResourceMapper("slurm").map(
        2,
        {
            "runtime": "30",
            "mem_mb": 1500,
            "mem_mib": 1431,
            "slurm_partition": "debug",
            "slurm_account": "proj1",
            "qos": "low",
            "constraint": "cpu",
            "slurm_extra": "--exclusive",
            "disk_mb": 1000,
        },
    )
    assert mapped.resources.duration == 30 and mapped.resources.cpu_cores_per_process == 2
    assert mapped.attributes == {
        "--mem": "1500M",
        "--partition": "debug",
        "--account": "proj1",
        "--qos": "low",
        "--constraint": "cpu",
    }
    assert mapped.unmapped == ["disk_mb", "slurm_extra"]


def test_a_value_that_is_no_number_is_left_to_the_backend() -> None:
    mapped = ResourceMapper("local").map(1, {"runtime": "soon"})
    assert mapped.resources.duration == 10 and mapped.unmapped == ["runtime"]


# ---- runs through the snakemake command ----


def snakemake(
    workdir: Path, server: Any, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``snakemake --executor psik-api`` in ``workdir``, as a user runs it."""
    argv = [sys.executable, "-m", "snakemake", "--executor", "psik-api", "--psik-api-url", server.url]
    return subprocess.run(
        [*argv, "--jobs", "20", "--seconds-between-status-checks", "1", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def workflow(directory: Path, snakefile: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Snakefile").write_text(textwrap.dedent(snakefile))
    return directory


FAN_OUT = """
    rule all:
        input: expand("out/{i}.txt", i=range(N))

    rule one:
        output: "out/{i}.txt"
        resources: runtime=5, mem_mb=100, foo=1
        shell: "sleep 1; echo {wildcards.i} > {output}"
"""


def test_status_costs_one_request_per_cycle_for_the_whole_run(tmp_path: Path, psik_server: Any) -> None:
    jobs = 12
    wf = workflow(tmp_path / "wf", FAN_OUT.replace("N", str(jobs)))
    mark = psik_server.mark()
    start = time.monotonic()
    run = snakemake(wf, psik_server)
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (wf / "out").iterdir()) == sorted(f"{i}.txt" for i in range(jobs))
    requests = psik_server.requests(mark)
    lists = [p for m, p, _ in requests if m == "GET" and urlsplit(p).path == "/v1/jobs"]
    per_job = [p for m, p, _ in requests if m == "GET" and urlsplit(p).path.startswith("/v1/jobs/")]
    assert per_job == []  # no job is ever asked about alone
    for path in lists:  # each cycle: the run's active jobs, by its label
        query = parse_qs(urlsplit(path).query)
        assert query["label"][0].startswith("snakemake-run=") and query["id"]
    # One request per cycle (a cycle per second here), not one per job per cycle.
    assert 1 <= len(lists) <= elapsed + 2, (len(lists), elapsed)
    # The jobs came in one group (POST /v1/groups), the unmapped resource said once.
    submits = [p for m, p, _ in requests if m == "POST"]
    assert submits == ["/v1/groups"], submits
    assert run.stderr.count("has no place for the resource(s) foo, mem_mb") == 1, run.stderr


def test_each_job_runs_in_the_workflow_directory_with_its_resources(tmp_path: Path, psik_server: Any) -> None:
    wf = workflow(
        tmp_path / "wf",
        """
        rule all:
            input: "where.txt"

        rule where:
            output: "where.txt"
            threads: 2
            resources: runtime=7, gpu=0
            shell: "pwd > {output}"
        """,
    )
    env = {**os.environ, "PSIK_SMK_TEST": "passed"}
    argv = [sys.executable, "-m", "snakemake", "--executor", "psik-api", "--psik-api-url", psik_server.url]
    run = subprocess.run(
        [*argv, "--jobs", "1", "--seconds-between-status-checks", "1", "--envvars", "PSIK_SMK_TEST"],
        cwd=wf,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (wf / "where.txt").read_text().strip() == str(wf.resolve())
    with Client(psik_server.url) as api:
        (job,) = [j for j in api.list(name="smk-where-1")]
        spec = api.get(job.jobid).spec
    assert spec.directory == str(wf.resolve())
    assert (spec.resources.cpu_cores_per_process, spec.resources.duration) == (2, 7)
    assert spec.environment == {"PSIK_SMK_TEST": "passed"}  # --envvars: not in the script
    assert "passed" not in spec.script
    assert spec.labels["snakemake-rule"] == "where" and spec.labels["snakemake-run"]


def test_a_failed_job_reports_its_log_tail(tmp_path: Path, psik_server: Any) -> None:
    wf = workflow(
        tmp_path / "wf",
        """
        rule fails:
            output: "never.txt"
            shell: "echo the-tail-of-stderr-7c1 >&2; exit 3"
        """,
    )
    run = snakemake(wf, psik_server)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "psik-api job" in out and "failed (exit code 1)" in out, out
    assert "--- last lines of stderr.1 ---" in out and "the-tail-of-stderr-7c1" in out, out


def failed_job() -> JobSummary:
    return JobSummary.model_validate(
        {"jobid": "1796691938.730", "state": "failed", "jobndx": 1, "exit_code": 1, "name": "smk-a-0",
         "backend": "default", "owner": "local", "created": "2026-12-08T01:00:00Z",
         "updated": "2026-12-08T01:00:00Z"}
    )  # fmt: skip


def test_a_huge_one_line_log_is_cut_to_its_last_bytes() -> None:
    # The server's /logs gives up to 1 MiB of each: one line of it went whole into
    # Snakemake's output. Each log's tail is at most TAIL_BYTES, its end kept.
    huge = "A" * (1 << 20) + "the-end-3f9"
    msg = failure_message(failed_job(), {"stderr.1": huge, "stdout.1": "é" * (1 << 19) + "x", "console": ""})
    assert len(msg.encode()) < 3 * TAIL_BYTES + 1024, len(msg)
    stderr_tail = msg.split("--- last lines of stderr.1 ---\n", 1)[1].split("\n", 1)[0]
    assert stderr_tail.startswith("...A") and stderr_tail.endswith("the-end-3f9")
    assert "\ufffd" not in msg  # a character cut at the byte limit is dropped, not mangled


def test_control_characters_of_a_log_are_escaped_not_sent_to_the_terminal() -> None:
    text = bytes(range(256)).decode("utf-8", errors="replace") + "\x1b[31mred\x07\tcol\nnext line\x9b"
    msg = failure_message(failed_job(), {"stdout.1": text})
    assert not any((ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in msg), repr(msg)
    assert "\\x1b[31mred\\x07\tcol\nnext line\\x9b" in msg  # tab and newline kept, shown


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--psik-api-url", "ftp://x"], "--psik-api-url: the server's URL is http:// or https://"),
        (["--psik-api-url", "notaurl"], "--psik-api-url: the server's URL is http:// or https://"),
        (["--psik-api-url", "http://[::1"], "--psik-api-url: the server's URL is http:// or https://"),
        (["--psik-api-cert-dir", "/nonexistent"], "--psik-api-cert-dir: no such directory: /nonexistent"),
    ],
)
def test_a_bad_setting_is_an_error_naming_it_not_a_traceback(
    tmp_path: Path, args: list[str], named: str
) -> None:
    wf = workflow(tmp_path / "wf", FAN_OUT.replace("N", "1"))
    argv = [sys.executable, "-m", "snakemake", "--executor", "psik-api", *args, "--jobs", "1"]
    run = subprocess.run(argv, cwd=wf, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Traceback" not in out and "ValueError" not in out, out
    assert named in out, out


def test_attributes_a_local_backend_cannot_take_are_said_once(tmp_path: Path, psik_server: Any) -> None:
    wf = workflow(
        tmp_path / "wf",
        """
        rule attrs:
            output: "done.txt"
            shell: "touch {output}"
        """,
    )
    run = snakemake(wf, psik_server, "--psik-api-attributes", '{"--qos": "debug", "--account": "p1"}')
    assert run.returncode == 0, run.stdout + run.stderr
    warning = "a local backend takes no attributes: those of --psik-api-attributes (--account, --qos)"
    assert run.stderr.count(warning) == 1, run.stderr
    with Client(psik_server.url) as api:
        jobs = [api.get(j.jobid) for j in api.list() if (j.name or "").startswith("smk-attrs-")]
    assert jobs and all(j.spec.attributes == {} for j in jobs)


def test_a_refused_directory_says_what_to_put_in_the_server_config(psik_server: Any) -> None:
    # Outside the session's temporary directory, the server's only directory root.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as outside:
        wf = workflow(Path(outside) / "wf", FAN_OUT.replace("N", "2"))
        run = snakemake(wf, psik_server)
        out = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"does not run jobs in the workflow's directory {wf.resolve()}" in out, out
    assert f'"directory_roots": ["{wf.resolve()}"]' in out, out
    assert "is outside the allowed directory roots" in out, out


def test_ctrl_c_cancels_every_job_of_the_run(tmp_path: Path, psik_server: Any) -> None:
    wf = workflow(
        tmp_path / "wf",
        """
        rule all:
            input: expand("out/{i}.txt", i=range(4))

        rule slow:
            output: "out/{i}.txt"
            shell: "sleep 300; touch {output}"
        """,
    )
    argv = [sys.executable, "-m", "snakemake", "--executor", "psik-api", "--psik-api-url", psik_server.url]
    proc = subprocess.Popen(
        [*argv, "--jobs", "4", "--seconds-between-status-checks", "1"],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with Client(psik_server.url) as api:
        try:
            deadline = time.monotonic() + 60
            # Two run at once on this local backend (its CPU count): the others wait queued.
            pending = ("queued", "active")
            while (
                len(running := [j for j in api.list(state=pending) if (j.name or "").startswith("smk-slow-")])
                < 4
            ):
                assert time.monotonic() < deadline and proc.poll() is None, running
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        jobs = [api.get(j.jobid) for j in running]
    assert all(j.state == JobState.canceled for j in jobs), [(j.jobid, j.state) for j in jobs]
    assert "psik-api: canceled 4 job(s)" in out, out
