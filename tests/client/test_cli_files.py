"""``psik-api upload / download / files / logs`` and ``submit --wait --output``, against a
mocked server (respx): what they send, what they print, and how they exit."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx

from client.fakes import T0, job_json, no_events, problem, status_json
from psik_api_client import cli

URL = "http://127.0.0.1:8000"
JOBID = "1693992878.203"
FILES = f"/v1/jobs/{JOBID}/files"
LOGS = f"/v1/jobs/{JOBID}/logs"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    with respx.mock(base_url=URL, assert_all_called=False) as router:
        # A server without events: the waits here are about polling (the stream's own
        # tests are in test_events_cli).
        router.get("/v1/events").mock(side_effect=lambda _: no_events())
        yield router


def stored(request: httpx.Request) -> httpx.Response:
    path = request.url.path.removeprefix(FILES + "/")
    info = {
        "name": path.rsplit("/", 1)[-1],
        "path": path,
        "type": "file",
        "size": len(request.content),
        "mtime": T0,
    }
    return httpx.Response(201, json=info)


def file_answer(data: bytes, checksum: str | None = None) -> httpx.Response:
    headers = {"ETag": '"e"', "X-Checksum-Sha256": checksum or hashlib.sha256(data).hexdigest()}
    return httpx.Response(200, headers=headers, content=data)


# ---- upload ----


def test_upload_a_file_prints_where_it_went(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data.txt").write_text("hello\n")
    route = server.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    assert cli.main(["upload", JOBID, str(tmp_path / "data.txt")]) == 0
    assert cli.main(["upload", JOBID, str(tmp_path / "data.txt"), "in/"]) == 0
    assert cli.main(["upload", JOBID, str(tmp_path / "data.txt"), "in/renamed.txt"]) == 0
    assert capsys.readouterr().out == "data.txt\nin/data.txt\nin/renamed.txt\n"
    assert [c.request.content for c in route.calls] == [b"hello\n"] * 3


def test_upload_a_directory_uploads_its_files(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "inputs" / "sub").mkdir(parents=True)
    (tmp_path / "inputs" / "a").write_text("a")
    (tmp_path / "inputs" / "sub" / "b").write_text("b")
    server.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    assert cli.main(["upload", JOBID, str(tmp_path / "inputs")]) == 0
    assert cli.main(["upload", JOBID, str(tmp_path / "inputs"), "data"]) == 0
    assert capsys.readouterr().out.split() == ["inputs/a", "inputs/sub/b", "data/a", "data/sub/b"]


def test_an_unreadable_upload_exits_2_before_any_request(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["upload", JOBID, str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("psik-api: error: cannot read ") and "missing.txt" in err
    assert err.count("\n") == 1
    assert len(server.calls) == 0


def test_a_path_that_leaves_the_job_exits_2(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").write_text("rm -rf ~")
    assert cli.main(["upload", JOBID, str(tmp_path / "run"), "../scripts/run"]) == 2
    assert "'..' segment" in capsys.readouterr().err
    assert len(server.calls) == 0


def test_an_existing_file_refused_by_the_server_exits_5(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "big").write_text("x")
    server.put(f"{FILES}/big").mock(return_value=problem(413, "too_large", "uploads are at most 4 GiB"))
    assert cli.main(["upload", JOBID, str(tmp_path / "big")]) == 5
    assert capsys.readouterr().err == "psik-api: error: uploads are at most 4 GiB\n"


# ---- download ----


def test_download_into_the_current_directory(
    server: respx.MockRouter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    server.get(f"{FILES}/out/result.csv").mock(return_value=file_answer(b"a,b\n1,2\n"))
    assert cli.main(["download", JOBID, "out/result.csv"]) == 0
    assert (tmp_path / "result.csv").read_bytes() == b"a,b\n1,2\n"
    assert cli.main(["download", JOBID, "out/result.csv", "copy.csv"]) == 0
    assert (tmp_path / "copy.csv").read_bytes() == b"a,b\n1,2\n"
    assert capsys.readouterr().out == "result.csv\ncopy.csv\n"


def test_a_damaged_download_exits_5_and_leaves_nothing(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(f"{FILES}/out.dat").mock(return_value=file_answer(b"damaged", checksum="0" * 64))
    assert cli.main(["download", JOBID, "out.dat", str(tmp_path)]) == 5
    assert "SHA-256" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_cannot_be_written_exits_6(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(f"{FILES}/out.dat").mock(return_value=file_answer(b"data"))
    assert cli.main(["download", JOBID, "out.dat", str(tmp_path / "no" / "such" / "dir")]) == 6
    err = capsys.readouterr().err
    assert err.startswith("psik-api: error: cannot write ") and "No such file or directory" in err


# ---- files ----


def test_files_prints_a_table(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    entries = [
        {"name": "out", "path": "out", "type": "dir", "size": 0, "mtime": T0},
        {"name": "r.csv", "path": "out/r.csv", "type": "file", "size": 12, "mtime": T0},
    ]
    route = server.get(FILES).respond(200, json={"path": "", "entries": entries})
    assert cli.main(["files", JOBID, "--recursive"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["TYPE", "SIZE", "MTIME", "(UTC)", "PATH"],
        ["dir", "0", "2024-01-01", "00:00:00", "out/"],
        ["file", "12", "2024-01-01", "00:00:00", "out/r.csv"],
    ]
    assert route.calls.last.request.url.params["recursive"] == "true"
    server.get(f"{FILES}/out").respond(200, json={"path": "out", "entries": entries[1:], "truncated": True})
    assert cli.main(["files", JOBID, "out"]) == 0
    assert "more entries than the server lists" in capsys.readouterr().err


# ---- logs ----


def test_logs_prints_every_log_under_a_header(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(LOGS).respond(200, json={"stderr.1": "", "stdout.1": "one\ntwo\nthree\n"})
    assert cli.main(["logs", JOBID]) == 0
    assert capsys.readouterr().out == "==> stderr.1 <==\n==> stdout.1 <==\none\ntwo\nthree\n"
    assert cli.main(["logs", JOBID, "--tail", "1"]) == 0
    assert capsys.readouterr().out == "==> stderr.1 <==\n==> stdout.1 <==\nthree\n"


def test_logs_of_one_name_are_the_bytes_the_job_wrote(
    server: respx.MockRouter, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    route = server.get(f"{LOGS}/stdout.2").respond(200, content=b"\xff binary\n")
    assert cli.main(["logs", JOBID, "stdout.2", "-n", "5"]) == 0
    assert capsysbinary.readouterr().out == b"\xff binary\n"
    assert dict(route.calls.last.request.url.params) == {"tail": "5"}


def test_logs_follow_streams_stdout_until_the_server_ends_it(
    server: respx.MockRouter, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    route = server.get(f"{LOGS}/stdout").respond(200, content=b"progress 1\nprogress 2\n")
    assert cli.main(["logs", JOBID, "--follow"]) == 0
    assert capsysbinary.readouterr().out == b"progress 1\nprogress 2\n"
    assert dict(route.calls.last.request.url.params) == {"offset": "0", "follow": "true"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["logs", JOBID, "--tail", "0"], "a count of lines is >= 1"),
        (["logs", JOBID, "status.csv"], "not a log name"),
        (["submit", "SPEC", "--output"], "give --wait too"),
    ],
)
def test_bad_log_requests_exit_2(
    server: respx.MockRouter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"script": "date"}))
    assert cli.main([str(spec) if a == "SPEC" else a for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert len(server.calls) == 0


# ---- submit --wait --output ----


@pytest.mark.parametrize(("state", "status"), [("completed", 0), ("failed", 1)])
def test_submit_wait_output_prints_the_jobs_stdout(
    server: respx.MockRouter,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    state: str,
    status: int,
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"script": "echo hello; hostname"}))
    server.post("/v1/jobs").respond(201, json=job_json(JOBID))
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, state))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, state))
    server.get(f"{LOGS}/stdout.1").respond(200, content=b"hello\nnode1\n")
    assert cli.main(["submit", str(spec), "--wait", "--output"]) == status
    assert capsysbinary.readouterr().out == f"{JOBID} {state}\nhello\nnode1\n".encode()


def test_wait_output_of_a_job_without_stdout_says_so(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "canceled"))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "canceled"))
    server.get(f"{LOGS}/stdout.1").mock(return_value=problem(404, "not_found", "no log stdout.1"))
    assert cli.main(["wait", JOBID, "--output"]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{JOBID} canceled\n"
    assert captured.err == f"psik-api: job {JOBID} has no stdout\n"


def test_downloading_a_directory_exits_2_and_writes_nothing(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {"path": "out", "entries": [], "truncated": False}
    server.get(f"{FILES}/out").mock(
        return_value=httpx.Response(200, json=answer, headers={"X-File-Type": "dir"})
    )
    assert cli.main(["download", JOBID, "out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'out' is a directory" in err
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_arrives_short_without_a_checksum_exits_5(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a damaged one (the documented status): no checksum came, and the size is wrong."""
    answer = httpx.Response(200, headers={"ETag": '"e"', "Content-Length": "10"}, content=b"short")
    server.get(f"{FILES}/out.dat").mock(return_value=answer)
    assert cli.main(["download", JOBID, "out.dat", str(tmp_path)]) == 5
    assert "5 bytes arrived" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file names are UTF-8 by force")
def test_uploading_a_file_name_that_is_not_utf8_exits_2(
    server: respx.MockRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Latin-1 name (café.txt from an old archive): a clear line, status 2, nothing sent.
    Before, the URL quoting raised UnicodeEncodeError: a traceback and status 1."""
    name = os.fsdecode(b"caf\xe9.txt")
    (tmp_path / name).write_text("x")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("a")
    (tmp_path / "tree" / name).write_text("x")
    server.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    assert cli.main(["upload", JOBID, str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("psik-api: error: ") and err.count("\n") == 1
    assert "not valid UTF-8" in err and "give REMOTE" in err
    assert cli.main(["upload", JOBID, str(tmp_path / "tree")]) == 2  # before any file is sent
    assert "not valid UTF-8" in capsys.readouterr().err
    assert len(server.calls) == 0
    assert cli.main(["upload", JOBID, str(tmp_path / name), "cafe.txt"]) == 0  # renamed: fine
