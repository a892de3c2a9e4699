"""``psik-api watch``, and ``wait`` on the event stream (or ``--poll``), against a mocked server (respx)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import respx

from client.fakes import job_json, status_json
from client.test_events import SSE, Chunks, event, frame
from psik_api_client import cli

URL = "http://127.0.0.1:8000"
JOBID = "1693992878.203"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.delenv("PSIK_API_URL", raising=False)
    monkeypatch.delenv("PSIK_API_UDS", raising=False)
    with respx.mock(base_url=URL, assert_all_called=False) as router:
        yield router


RECONNECTS: list[httpx.Request] = []


def interrupt(request: httpx.Request) -> httpx.Response:
    RECONNECTS.append(request)
    raise KeyboardInterrupt  # Ctrl-C, while it reconnects


def sse(*chunks: bytes) -> httpx.Response:
    return httpx.Response(200, headers=SSE, stream=Chunks([b"retry: 1000\n\n", *chunks]))


def test_watch_prints_each_event_until_interrupted(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = event(8, state="failed") | {"info": "3", "exit_code": 3}
    route = server.get("/v1/events").mock(side_effect=[sse(frame(event(7)), frame(failed)), interrupt])
    assert cli.main(["watch", JOBID, "--after", "5"]) == 130
    assert capsys.readouterr().out == (
        f"7 2024-01-01T00:00:00+00:00 {JOBID} run 1 active\n"
        f"8 2024-01-01T00:00:00+00:00 {JOBID} run 1 failed exit 3: 3\n"
    )
    first, again = route.calls[0].request, RECONNECTS[-1]
    assert first.url.params.get_list("jobs") == [JOBID]
    assert (first.headers["Last-Event-ID"], again.headers["Last-Event-ID"]) == ("5", "8")


def test_watch_json_prints_json_lines(server: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    server.get("/v1/events").mock(side_effect=[sse(frame(event(1)), frame(event(2))), interrupt])
    assert cli.main(["watch", "--json"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2]
    assert json.loads(lines[0]) == event(1)


def test_watch_on_a_server_without_events_exits_5(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    server.get("/v1/events").respond(404, json={"title": "Not found", "status": 404, "code": "not_found"})
    assert cli.main(["watch"]) == 5
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--events"]])
def test_wait_listens(server: respx.MockRouter, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    # The stream is the default; --events (which once turned it on) still says so.
    stream = server.get("/v1/events").mock(side_effect=[sse(frame(event(3, state="completed")))])
    state = server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "active"))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "completed"))
    assert cli.main(["wait", JOBID, *flags]) == 0
    assert capsys.readouterr().out == f"{JOBID} completed\n"
    assert (stream.call_count, state.call_count) == (1, 1)


def test_wait_poll_never_asks_for_events(
    server: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = server.get("/v1/events").mock(side_effect=[sse(frame(event(3, state="completed")))])
    server.get(f"/v1/jobs/{JOBID}/state").respond(200, json=status_json(JOBID, "completed"))
    server.get(f"/v1/jobs/{JOBID}").respond(200, json=job_json(JOBID, "completed"))
    assert cli.main(["wait", JOBID, "--poll"]) == 0
    assert capsys.readouterr().out == f"{JOBID} completed\n"
    assert stream.call_count == 0


def test_wait_takes_events_or_poll_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["wait", JOBID, "--events", "--poll"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_watch_after_is_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["watch", "--after", "-1"]) == 2
    assert "--after" in capsys.readouterr().err
