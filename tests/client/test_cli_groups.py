"""``psik-api`` for workflows: submit --after/--label, sweep -p, ls --label/--group,
group and cancel-group, against a mocked server (respx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import respx

from client.fakes import job_json, summary_json
from psik_api_client import cli

URL = "http://127.0.0.1:8000"
A, B = "1693992878.203", "1693992878.204"
GROUP = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    with respx.mock(base_url=URL, assert_all_called=False) as router:
        yield router


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"script": "./fit $X $Y"}))
    return path


def test_submit_after_and_label(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = server.post("/v1/jobs").respond(201, json=job_json(A))
    argv = [
        "submit",
        str(spec_file),
        "--after",
        B,
        "--after",
        f"{A}:any",
        "--label",
        "run=r1",
        "--label",
        "k=a=b",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == f"{A}\n"
    sent = json.loads(route.calls.last.request.content)
    assert sent["after"] == [{"jobid": B, "condition": "ok"}, {"jobid": A, "condition": "any"}]
    assert sent["labels"] == {"run": "r1", "k": "a=b"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--after", f"{A}:done"], "a condition is one of ok, failed, any, not 'done'"),
        (["--label", "run"], "a label is KEY=VALUE"),
        (["--after", "nope"], "not a job id"),
        (["--label", "bad key=v"], "labels"),
    ],
)
def test_submit_refuses_bad_after_and_labels(
    server: respx.MockRouter,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    route = server.post("/v1/jobs").respond(201, json=job_json(A))
    assert cli.main(["submit", str(spec_file), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not route.called


def test_sweep_prints_the_group_and_each_job_with_its_values(
    server: respx.MockRouter, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [job_json(f"{n}.0") for n in range(1, 7)]
    route = server.post("/v1/groups").respond(201, json={"group": GROUP, "jobs": jobs})
    assert cli.main(["sweep", str(spec_file), "-p", "X=1,2,3", "--param", "Y=a,b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == GROUP
    assert lines[1].split() == ["JOBID", "STATE", "PARAMS"]
    assert [line.split() for line in lines[2:4]] == [
        ["1.0", "queued", "X=1", "Y=a"],
        ["2.0", "queued", "X=1", "Y=b"],
    ]
    assert lines[-1].split() == ["6.0", "queued", "X=3", "Y=b"]
    request = route.calls.last.request
    assert json.loads(request.content) == {
        "spec": {"script": "./fit $X $Y"},
        "params": {"X": ["1", "2", "3"], "Y": ["a", "b"]},
    }
    assert "Idempotency-Key" in request.headers


@pytest.mark.parametrize(
    ("argv", "message", "status"),
    [
        (["-p", "X"], "a parameter is NAME=V1,V2", 2),
        (["-p", "X=1", "-p", "X=2"], "-p X is given twice", 2),
        (["-p", "1X=1"], "invalid sweep", 2),
        ([], "the following arguments are required: -p/--param", 2),
    ],
)
def test_sweep_refuses_bad_params(
    server: respx.MockRouter,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
    status: int,
) -> None:
    route = server.post("/v1/groups").respond(201, json={"group": GROUP, "jobs": []})
    assert cli.main(["sweep", str(spec_file), *argv]) == status
    assert message in capsys.readouterr().err
    assert not route.called


def test_ls_by_label_and_group(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    route = server.get("/v1/jobs").respond(200, json={"items": [summary_json(A)], "next_cursor": None})
    assert cli.main(["ls", "--label", "run=r1", "--label", "step=fit", "--group", GROUP]) == 0
    assert A in capsys.readouterr().out
    params = route.calls.last.request.url.params
    assert params.get_list("label") == ["run=r1", "step=fit"]
    assert params["group"] == GROUP


def test_ls_refuses_a_label_without_a_value(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ls", "--label", "run"]) == 2
    assert "a label is KEY=VALUE" in capsys.readouterr().err


def test_group_and_cancel_group(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    members = [summary_json(A, "completed", exit_code=0), summary_json(B, "canceled", name="b")]
    answer = {"group": GROUP, "jobs": members, "states": {"completed": 1, "canceled": 1}}
    server.get(f"/v1/groups/{GROUP}").respond(200, json=answer)
    deleted = server.delete(f"/v1/groups/{GROUP}").respond(200, json=answer)
    assert cli.main(["group", GROUP]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{GROUP}: 2 jobs (1 completed, 1 canceled)"
    assert lines[1].split() == ["JOBID", "STATE", "ENDED", "(UTC)", "EXIT", "NAME"]
    assert lines[2].split() == [A, "completed", "2024-01-01", "00:00:00", "0", "hello"]
    assert lines[3].split() == [B, "canceled", "2024-01-01", "00:00:00", "-", "b"]
    assert cli.main(["cancel-group", GROUP]) == 0
    assert deleted.called
    assert capsys.readouterr().out.splitlines()[0] == f"{GROUP}: 2 jobs (1 completed, 1 canceled)"


def test_group_refuses_a_malformed_id(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["group", "../x"]) == 2
    assert "not a group id" in capsys.readouterr().err
    assert cli.main(["cancel-group", "nope"]) == 2


def test_an_unknown_group_exits_5(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    body = {"title": "Not found", "status": 404, "code": "not_found", "detail": f"no group {GROUP}"}
    server.get(f"/v1/groups/{GROUP}").respond(404, json=body)
    assert cli.main(["group", GROUP]) == 5
    assert capsys.readouterr().err == f"psik-api: error: no group {GROUP}\n"
