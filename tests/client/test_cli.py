"""The ``psik-api`` command line, against a mocked server (respx)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from client.fakes import job_json, no_events, problem, status_json, summary_json
from psik_api_client import cli

URL = "http://127.0.0.1:8000"
JOBID = "1693992878.203"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    with respx.mock(base_url=URL, assert_all_called=False) as router:
        # A server without events: the waits here are about polling (the stream's own
        # tests are in test_events_cli).
        router.get("/v1/events").mock(side_effect=lambda _: no_events())
        yield router


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "hello", "script": "echo hello"}))
    return path


def test_submit_prints_the_job_id(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    assert cli.main(["submit", str(spec_file)]) == 0
    assert capsys.readouterr().out == f"{JOBID}\n"
    request = route.calls.last.request
    assert json.loads(request.content) == {"name": "hello", "script": "echo hello"}
    assert "Idempotency-Key" in request.headers


def test_submit_yaml_and_wait(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: hello\nscript: |\n  echo hello\n  hostname\nresources:\n  duration: 5\n")
    route = server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "completed"))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "completed"))
    assert cli.main(["submit", "--wait", str(spec)]) == 0
    assert capsys.readouterr().out == f"{JOBID} completed\n"
    body = json.loads(route.calls.last.request.content)
    assert body["script"] == "echo hello\nhostname\n"
    assert body["resources"] == {"duration": 5}


def test_submit_reads_stdin(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    route = server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    monkeypatch.setattr("sys.stdin", io.StringIO('{"script": "date"}'))
    assert cli.main(["submit", "-"]) == 0
    assert json.loads(route.calls.last.request.content) == {"script": "date"}


def test_yaml_without_pyyaml_is_a_clear_error(
    server: respx.MockRouter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "job.yml"
    spec.write_text("script: date\n")
    monkeypatch.setattr(cli, "_yaml", lambda: None)
    assert cli.main(["submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "needs PyYAML" in err and "psik-api-client[yaml]" in err
    assert len(server.calls) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"name": "x"}', "invalid job spec: script: Field required"),
        ('{"script": "x", "nmae": "y"}', "unknown field(s) nmae"),
        ("{oops", "is not valid JSON"),
        ('["script"]', "does not hold a job spec"),
    ],
)
def test_bad_job_files_exit_2_before_any_request(
    server: respx.MockRouter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(content)
    assert cli.main(["submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert len(server.calls) == 0


def test_missing_file_exits_2(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["create", "/nonexistent/job.json"]) == 2
    assert "cannot read /nonexistent/job.json" in capsys.readouterr().err


def test_ls_prints_a_table_and_sends_filters(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [summary_json("2.5", "failed", name="long-name"), summary_json("1.5", "failed", name=None)]
    route = server.get("/v1/jobs").respond(200, json={"items": items, "next_cursor": None})
    assert cli.main(["ls", "--state", "failed", "--state", "canceled", "--backend", "default"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOBID", "STATE", "JOBNDX", "BACKEND", "ENDED", "(UTC)", "EXIT", "NAME"]
    assert lines[1].split() == ["2.5", "failed", "1", "default", "2024-01-01", "00:00:00", "-", "long-name"]
    assert lines[2].split() == ["1.5", "failed", "1", "default", "2024-01-01", "00:00:00", "-", "-"]
    assert lines[1].index("failed") == lines[0].index("STATE")  # aligned columns
    params = route.calls.last.request.url.params
    assert params.get_list("state") == ["failed", "canceled"]
    assert params["backend"] == "default"
    assert params["limit"] == "101"  # the 100 shown, and one to tell whether there are more


def test_api_errors_exit_5_with_the_problem_detail(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    detail = f"job {JOBID} is active; cancel it before starting it again"
    server.post(f"/v1/jobs/{JOBID}/start").mock(return_value=problem(409, "conflict", detail))
    assert cli.main(["start", JOBID]) == 5
    assert capsys.readouterr().err == f"psik-api: error: {detail}\n"


def test_connection_refused_is_retried_then_exits_4(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    route = server.get(f"/v1/jobs/{JOBID}/state").mock(side_effect=httpx.ConnectError("Connection refused"))
    assert cli.main(["state", JOBID]) == 4
    assert route.call_count == 3 and len(sleeps) == 2
    assert capsys.readouterr().err == f"psik-api: error: cannot reach {URL}: Connection refused\n"


def test_url_option_and_get_prints_json(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    with respx.mock(base_url="http://other:9") as other:
        other.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "active"))
        assert cli.main(["--url", "http://other:9", "get", JOBID]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "active"


def test_cancel_and_state(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    server.delete(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "canceled"))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "canceled"))
    assert cli.main(["cancel", JOBID]) == 0
    assert cli.main(["state", JOBID]) == 0
    assert capsys.readouterr().out == f"{JOBID} canceled\ncanceled\n"


def test_backends_table(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    server.get("/v1/backends").respond(
        200, json=[{"name": "default", "type": "local"}, {"name": "perl", "type": "slurm", "healthy": False}]
    )
    assert cli.main(["backends"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["NAME", "TYPE", "HEALTHY", "DETAIL"],
        ["default", "local", "yes"],
        ["perl", "slurm", "no"],
    ]


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["start"], ["ls", "--limit", "many"]])
def test_usage_errors_exit_2(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err
    assert len(server.calls) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "--limit", "-1"], "argument --limit: a count of jobs is >= 0 (0: all), not -1"),
        (["wait", JOBID, "--timeout", "-5"], "argument --timeout: seconds are >= 0 (0: look once), not -5"),
        (["wait", JOBID, "--timeout", "nan"], "argument --timeout: seconds are >= 0"),
        (["submit", "--wait", "--timeout", "-5", "SPEC"], "argument --timeout: seconds are >= 0"),
        (["submit", "--timeout", "-0.5", "SPEC"], "argument --timeout: seconds are >= 0"),
    ],
)
def test_negative_limits_and_timeouts_are_usage_errors(
    server: respx.MockRouter,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    argv = [str(spec_file) if arg == "SPEC" else arg for arg in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err
    assert len(server.calls) == 0  # nothing submitted, nothing waited for


def test_submit_refused_by_the_backend_exits_5_and_names_the_job(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job was created, then its backend refused it (502 submit_failed): it exists,
    # failed. The detail need not name it; the error line does, and nothing waits.
    refused = problem(502, "submit_failed", "the backend refused the job: sbatch: not found", jobid=JOBID)
    post = server.post("/v1/jobs").mock(return_value=refused)
    state = server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "failed"))
    for argv in (["submit", str(spec_file)], ["submit", "--wait", str(spec_file)]):
        assert cli.main(argv) == 5
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            "psik-api: error: the backend refused the job: sbatch: not found "
            f"(job {JOBID} exists, failed: psik-api get {JOBID})\n"
        )
    assert post.call_count == 2  # once per run: never retried
    assert not state.called


def test_a_malformed_job_id_exits_2_without_a_request(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["get", "../etc"]) == 2
    assert "not a job id" in capsys.readouterr().err
    assert len(server.calls) == 0


@pytest.mark.parametrize(
    "argv", [["wait", JOBID, "--timeout", "0"], ["submit", "--wait", "--timeout", "0", "SPEC"]]
)
def test_wait_timeout_exits_3_and_does_not_cancel(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "active"))
    delete = server.delete(f"/v1/jobs/{JOBID}")
    argv = [str(spec_file) if arg == "SPEC" else arg for arg in argv]
    assert cli.main(argv) == 3
    assert "not final after 0 s (last state: active)" in capsys.readouterr().err
    assert not delete.called


@pytest.mark.parametrize(("state", "status"), [("completed", 0), ("failed", 1), ("canceled", 1)])
@pytest.mark.parametrize("argv", [["wait", JOBID], ["submit", "--wait", "SPEC"]])
def test_waiting_exits_by_how_the_job_ended(
    server: respx.MockRouter,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    state: str,
    status: int,
) -> None:
    server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, state))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, state))
    argv = [str(spec_file) if arg == "SPEC" else arg for arg in argv]
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    assert captured.out == f"{JOBID} {state}\n"
    said = f"psik-api: job {JOBID} submitted; waiting (Ctrl-C leaves it running)\n"
    assert captured.err == (said if argv[0] == "submit" else "")


def test_a_job_that_failed_earlier_does_not_fail_get_or_state(server: respx.MockRouter) -> None:
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "failed"))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "failed"))
    assert cli.main(["get", JOBID]) == 0
    assert cli.main(["state", JOBID]) == 0


def test_an_answer_that_is_not_the_apis_exits_5(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get("/v1/backends").respond(200, text="<html>captive portal</html>")
    assert cli.main(["backends"]) == 5
    assert "unexpected answer to GET /v1/backends" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host/", "http://"])
def test_a_bad_server_url_exits_2(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    assert cli.main(["--url", url, "backends"]) == 2
    assert "http:// or https://" in capsys.readouterr().err
    monkeypatch.setenv("PSIK_API_URL", url)
    assert cli.main(["backends"]) == 2
    assert len(server.calls) == 0


def test_interrupted_exits_130(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Client, "backends", interrupted)
    assert cli.main(["backends"]) == 130
    assert capsys.readouterr().err == ""


def test_get_never_prints_the_callback_secret(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server that (wrongly) sends the write-only secret back.
    spec = {"script": "true", "callback": "https://hook.example", "cb_secret": "s3cr3t-v4lue"}
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "completed", spec=spec))
    assert cli.main(["get", JOBID]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["spec"]["callback"] == "https://hook.example"
    assert "s3cr3t" not in out
    assert "cb_secret" not in out


class FullDisk(io.StringIO):
    """A stdout on a full disk: every write fails."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskOnFlush(io.StringIO):
    """A buffered stdout on a full disk: writes are kept, the flush fails."""

    def flush(self) -> None:
        if self.getvalue():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stdout", [FullDisk, FullDiskOnFlush])
@pytest.mark.parametrize(
    "argv", [["get", JOBID], ["state", JOBID], ["ls"], ["wait", JOBID], ["submit", "SPEC"]]
)
def test_output_that_cannot_be_written_exits_6(
    server: respx.MockRouter,
    spec_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdout: type[io.StringIO],
    argv: list[str],
) -> None:
    server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "failed"))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "failed"))
    server.get("/v1/jobs").respond(200, json={"items": [summary_json(JOBID)], "next_cursor": None})
    monkeypatch.setattr("sys.stdout", stdout())
    argv = [str(spec_file) if arg == "SPEC" else arg for arg in argv]
    # Not 1 ("the job failed"), even for wait on a failed job: the output is lost.
    assert cli.main(argv) == 6
    assert capsys.readouterr().err == "psik-api: error: cannot write the output: No space left on device\n"


def test_a_closed_stdout_descriptor_exits_6(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "failed"))
    monkeypatch.setattr("sys.stdout", None)  # psik-api state ID >&-
    assert cli.main(["state", JOBID]) == 6
    assert capsys.readouterr().err == "psik-api: error: cannot write the output: stdout is closed\n"


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone: every write fails as it would on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_quietly(
    server: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [summary_json(f"{n}.5") for n in range(5)]
    server.get("/v1/jobs").respond(200, json={"items": items, "next_cursor": None})
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["ls"]) == 141
    assert capsys.readouterr().err == ""


class _Jobs(BaseHTTPRequestHandler):
    """``GET /v1/jobs``: a few thousand jobs, more than a pipe holds."""

    def do_GET(self) -> None:
        items = [summary_json(f"{n}.5", "active") for n in range(3000, 0, -1)]
        body = json.dumps({"items": items, "next_cursor": None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_ls_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Jobs)
    thread = threading.Thread(target=http.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}"
        argv = [sys.executable, "-c", "import sys; from psik_api_client.cli import main; sys.exit(main())"]
        env = {**os.environ, "PSIK_API_URL": url}
        env.pop("PSIK_API_UDS", None)
        # psik-api ls --limit 0 | head -1
        ls = subprocess.Popen(
            [*argv, "ls", "--limit", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert ls.stdout is not None and ls.stderr is not None
        head = subprocess.Popen(["head", "-1"], stdin=ls.stdout, stdout=subprocess.PIPE)
        ls.stdout.close()  # head alone reads it now
        out, _ = head.communicate(timeout=60)
        err = ls.stderr.read().decode()
        ls.stderr.close()
        status = ls.wait(timeout=60)
    finally:
        http.shutdown()
        http.server_close()
        thread.join()
    assert out.decode().split() == ["JOBID", "STATE", "JOBNDX", "BACKEND", "ENDED", "(UTC)", "EXIT", "NAME"]
    assert err == ""  # no BrokenPipeError traceback
    assert status == 141


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
# 3000 lines fail as they are printed; 2 lines sit in the buffer and fail at the flush.
@pytest.mark.parametrize("args", [["ls", "--limit", "0"], ["ls", "--limit", "1"]])
def test_output_to_a_full_device_exits_6_in_one_line(args: list[str]) -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Jobs)
    thread = threading.Thread(target=http.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        argv = [sys.executable, "-c", "import sys; from psik_api_client.cli import main; sys.exit(main())"]
        env = {**os.environ, "PSIK_API_URL": f"http://127.0.0.1:{http.server_address[1]}"}
        env.pop("PSIK_API_UDS", None)
        # psik-api ls ... > /dev/full: the writes fail with ENOSPC
        with open("/dev/full", "w") as full:
            done = subprocess.run([*argv, *args], stdout=full, stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        http.shutdown()
        http.server_close()
        thread.join()
    # One line, no traceback, and no "Exception ignored" from the flush at exit.
    assert done.stderr.decode() == "psik-api: error: cannot write the output: No space left on device\n"
    assert done.returncode == 6


def test_exit_statuses_are_documented_alike(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    table = cli.EPILOG.splitlines()[1:]
    assert [int(line.split()[0]) for line in table] == [int(status) for status in cli.ExitStatus]
    for line in table:
        assert line.strip() in help_text
        assert line.strip() in (cli.__doc__ or "")
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("The command line:") :].split("\n\n")[0]
    for status in cli.ExitStatus:
        assert f"`{int(status)}`" in paragraph


# ---- issue 14: what new users hit ----


def test_submit_wait_shows_the_job_id_before_waiting(
    server: respx.MockRouter,
    spec_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while waiting leaves a running job: its id was said as soon as it existed."""
    server.post("/v1/jobs").respond(201, json=job_json(JOBID))

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Client, "wait", interrupted)
    assert cli.main(["submit", "--wait", str(spec_file)]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout's contract: "ID STATE" once it ends
    assert captured.err == f"psik-api: job {JOBID} submitted; waiting (Ctrl-C leaves it running)\n"


def test_submit_a_script_without_a_job_file(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    assert cli.main(["submit", "--script", "echo hi"]) == 0
    assert capsys.readouterr().out == f"{JOBID}\n"
    assert json.loads(route.calls.last.request.content) == {"script": "echo hi"}
    new = server.post("/v1/jobs/new").respond(201, json=job_json(JOBID, "new"))
    assert cli.main(["create", "--script", "date"]) == 0
    assert json.loads(new.calls.last.request.content) == {"script": "date"}


@pytest.mark.parametrize("argv", [["submit"], ["submit", "SPEC", "--script", "date"], ["create"]])
def test_submit_needs_a_job_file_or_a_script(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert cli.main([str(spec_file) if a == "SPEC" else a for a in argv]) == 2
    assert "a job file or --script" in capsys.readouterr().err
    assert len(server.calls) == 0


def test_waiting_for_a_job_never_started_says_so(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "new"))
    assert cli.main(["wait", JOBID, "--timeout", "0"]) == 3
    err = capsys.readouterr().err
    assert f"job {JOBID} was never started (state new: psik-api start {JOBID})" in err
    assert "left running" not in err


def test_following_the_log_of_a_job_never_started_says_so(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server ends a follow of a new job at once: there is nothing to follow.
    server.get(f"/v1/jobs/{JOBID}/logs/stdout").respond(200, content=b"")
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "new"))
    assert cli.main(["logs", JOBID, "--follow"]) == 1
    assert capsys.readouterr().err == (
        f"psik-api: error: job {JOBID} was never started: no log to follow (psik-api start {JOBID})\n"
    )


def test_ls_says_when_there_are_more_jobs_and_all_pages_through(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    first = [summary_json(f"{n}.5", "queued") for n in range(9, 6, -1)]
    rest = [summary_json(f"{n}.5", "queued") for n in range(6, 4, -1)]

    def pages(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("cursor") == "c1":
            return httpx.Response(200, json={"items": rest, "next_cursor": None})
        limit = int(request.url.params["limit"])
        return httpx.Response(200, json={"items": first[:limit], "next_cursor": "c1"})

    server.get("/v1/jobs").mock(side_effect=pages)
    assert cli.main(["ls", "--limit", "3"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 + 3
    assert captured.err == "psik-api: more jobs than shown (--limit 3): --all lists every one\n"
    assert cli.main(["ls", "--all"]) == 0
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()[1:]] == ["9.5", "8.5", "7.5", "6.5", "5.5"]
    assert captured.err == ""


def test_ls_shows_when_a_job_ended_and_its_exit_code(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [
        summary_json("4.5", "completed", exit_code=0),
        summary_json("3.5", "completed"),  # from a server older than exit codes in lists
        summary_json("2.5", "failed", exit_code=3),
        summary_json("1.5", "active"),
    ]
    server.get("/v1/jobs").respond(200, json={"items": items, "next_cursor": None})
    assert cli.main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["JOBID", "STATE", "JOBNDX", "BACKEND", "ENDED", "(UTC)", "EXIT", "NAME"]
    assert lines[1].split() == ["4.5", "completed", "1", "default", "2024-01-01", "00:00:00", "0", "hello"]
    assert lines[2].split() == ["3.5", "completed", "1", "default", "2024-01-01", "00:00:00", "-", "hello"]
    assert lines[3].split() == ["2.5", "failed", "1", "default", "2024-01-01", "00:00:00", "3", "hello"]
    assert lines[4].split() == ["1.5", "active", "1", "default", "-", "-", "hello"]
    assert [c.request.url.path for c in server.calls] == ["/v1/jobs"]  # the list alone


def test_cancel_and_wait_take_several_ids(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    other, missing = "1693992878.204", "1693992878.205"
    server.delete(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "canceled"))
    server.delete(f"/v1/jobs/{other}").respond(200, json=job_json(other, "canceled"))
    server.delete(f"/v1/jobs/{missing}").mock(return_value=problem(404, "not_found", f"no job {missing}"))
    # One that is not there does not stop the others; the status says one was refused.
    assert cli.main(["cancel", JOBID, missing, other]) == 5
    captured = capsys.readouterr()
    assert captured.out == f"{JOBID} canceled\n{other} canceled\n"
    assert captured.err == f"psik-api: error: no job {missing}\n"
    items = [summary_json(JOBID, "completed"), summary_json(other, "canceled")]
    server.get("/v1/jobs").respond(200, json={"items": items, "next_cursor": None})
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "completed"))
    server.get(f"/v1/jobs/{other}").respond(200, json=job_json(other, "canceled"))
    assert cli.main(["wait", JOBID, other]) == 1  # one did not complete
    assert capsys.readouterr().out == f"{JOBID} completed\n{other} canceled\n"
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "completed"))
    assert cli.main(["wait", JOBID]) == 0


def test_purge_removes_final_jobs(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    other = "1693992878.204"
    purge = server.delete(f"/v1/jobs/{JOBID}", params={"purge": "true"}).respond(204)
    active = problem(409, "conflict", f"job {other} is active; cancel it before purging it")
    server.delete(f"/v1/jobs/{other}", params={"purge": "true"}).mock(return_value=active)
    assert cli.main(["purge", JOBID, other]) == 5
    captured = capsys.readouterr()
    assert captured.out == f"{JOBID} purged\n"
    assert captured.err == f"psik-api: error: job {other} is active; cancel it before purging it\n"
    assert purge.called
