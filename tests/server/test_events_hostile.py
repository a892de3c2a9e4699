"""Hostile jobs against the event log (issue 17): a job runs as the server's user and can
write its own status.csv. A job that appends 100,000 rows at once, writes a 1 MB row or
rewrites the file shorter gets bounded events (eventlog.MAX_NEW rows a read, MAX_INFO
characters of info), the server keeps answering, and other jobs' events are as ever;
a job whose status.csv becomes a FIFO gets its one ``failed`` event and holds up no one."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import lazy_app
from psik_api_core import Event
from psik_api_server.backends.local.proctree import ProcessTable
from psik_api_server.jobs.eventlog import MAX_INFO, MAX_NEW
from psik_api_server.settings import BackendSettings, Settings
from support import LiveServer

#: Seconds within which every answer must come.
PROMPT = 5.0
JSON = {"Accept": "application/json"}
#: Waits until the test has the job's id (so that it can look before the job acts).
GO = "while [ ! -e go ]; do sleep 0.02; done; "


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    settings.backends = {"default": BackendSettings(type="local", max_running=8)}
    settings.event_heartbeat = 0.2
    try:
        with LiveServer(lazy_app(settings)) as server:
            yield server
    finally:
        _free(settings.prefix)


def _free(prefix: Path) -> None:
    """End the jobs' processes, and any read a FIFO holds (a failing run)."""
    for pid, (base, _) in ProcessTable.read().tagged().items():
        if base.startswith(str(prefix) + os.sep):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for path in prefix.glob("*/status.csv"):
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(path.lstat().st_mode):
                os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))


def _get(url: str, **kwargs: object) -> httpx.Response:
    try:
        return httpx.get(url, timeout=PROMPT, **kwargs)  # type: ignore[arg-type]
    except httpx.TimeoutException:
        raise AssertionError(f"GET {url}: no answer within {PROMPT} s") from None


def _submit(url: str, script: str, prefix: Path) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"script": GO + script}, timeout=PROMPT)
    assert r.status_code == 201, r.text
    jobid = str(r.json()["jobid"])
    (prefix / jobid / "work" / "go").touch()
    return jobid


def _events(url: str, jobid: str) -> list[Event]:
    out: list[Event] = []
    while True:
        r = _get(
            f"{url}/v1/jobs/{jobid}/events",
            params={"after": out[-1].id if out else 0, "timeout": 0},
            headers=JSON,
        )
        assert r.status_code == 200, r.text
        if not r.json():
            return out
        out += [Event.model_validate(e) for e in r.json()]


def _until_final(url: str, jobid: str, timeout: float = 15) -> list[Event]:
    deadline = time.monotonic() + timeout
    while not (evs := _events(url, jobid)) or not evs[-1].job_state.is_final:
        assert time.monotonic() < deadline, f"{jobid}: no final event in {timeout} s"
        time.sleep(0.05)
    return evs


def _ordinary(url: str, prefix: Path) -> None:
    """Another job's events are as ever, and arrive."""
    jobid = _submit(url, "true", prefix)
    evs = _until_final(url, jobid)
    states = [e.job_state.value for e in evs]
    assert states[0] == "new" and states[-2:] == ["active", "completed"], states
    assert evs[-1].exit_code == 0
    assert [e.id for e in evs] == sorted({e.id for e in evs})


def _responsive(url: str, stop: threading.Event, slowest: list[float]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            ok = httpx.get(f"{url}/v1/jobs", timeout=PROMPT).status_code == 200
        except httpx.HTTPError:
            ok = False
        slowest.append(time.monotonic() - t0 if ok else float("inf"))
        time.sleep(0.05)


@contextlib.contextmanager
def _watching(url: str) -> Iterator[list[float]]:
    """The times GET /v1/jobs takes meanwhile (inf: it failed)."""
    stop, times = threading.Event(), []
    thread = threading.Thread(target=_responsive, args=(url, stop, times), daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(PROMPT + 1)


#: Appends ``n`` rows of its own run to status.csv in one write.
APPEND = (
    'python3 -c "import time, os\n'
    "rows = ''.join('%.6f,1,active,row %d\\n' % (time.time(), i) for i in range({n}))\n"
    "fd = os.open('../status.csv', os.O_WRONLY | os.O_APPEND)\n"
    'os.write(fd, rows.encode())"'
)


def test_a_job_appending_100000_rows_gets_bounded_events(live: LiveServer, settings: Settings) -> None:
    with _watching(live.url) as times:
        jobid = _submit(live.url, APPEND.format(n=100_000), settings.prefix)
        _ordinary(live.url, settings.prefix)
        evs = _until_final(live.url, jobid, timeout=20)
    assert max(times) < 2.0, f"GET /v1/jobs took {max(times):.1f} s meanwhile"
    # At most MAX_NEW a read of it: a few reads, not 100,000 events.
    assert len(evs) <= 4 + 3 * MAX_NEW, len(evs)
    assert evs[-1].job_state == "completed" and evs[-1].state == "completed"
    ids = [e.id for e in evs]
    assert ids == sorted(set(ids))
    # The last of the flood is among them (a read keeps its newest rows).
    assert any(e.info == "row 99999" for e in evs)


def test_a_one_megabyte_row_gives_an_event_with_its_info_cut(live: LiveServer, settings: Settings) -> None:
    big = (
        'python3 -c "import time; '
        "open('../status.csv', 'a').write('%.6f,1,active,' % time.time() + 'x' * (1 << 20) + '\\n')\""
    )
    jobid = _submit(live.url, big, settings.prefix)
    evs = _until_final(live.url, jobid)
    long_ = [e for e in evs if e.info.startswith("xxx")]
    assert len(long_) == 1 and len(long_[0].info) == MAX_INFO
    # The stream says it too, in a frame of bounded size.
    with httpx.stream("GET", f"{live.url}/v1/jobs/{jobid}/events", params={"after": 0}, timeout=PROMPT) as r:
        frames = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(line)
                if len(frames) == len(evs):
                    break
    assert max(len(f) for f in frames) < MAX_INFO + 1024
    _ordinary(live.url, settings.prefix)


def test_a_job_rewriting_its_status_shorter_repeats_no_event(live: LiveServer, settings: Settings) -> None:
    shorter = (
        "sleep 0.3; head -n 1 ../status.csv > ../short && cat ../short > ../status.csv; "
        'sleep 0.3; echo "$(date +%s.%N),1,active,after the rewrite" >> ../status.csv; sleep 0.3'
    )
    with _watching(live.url) as times:
        jobid = _submit(live.url, shorter, settings.prefix)
        deadline = time.monotonic() + 15
        while "completed" not in (settings.prefix / jobid / "status.csv").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # a few looks of the watcher
        _ordinary(live.url, settings.prefix)
    assert max(times) < 2.0
    evs = _events(live.url, jobid)
    rows = [(e.jobndx, e.state, e.info, e.time) for e in evs]
    assert len(rows) == len(set(rows)), "a row became two events"
    ids = [e.id for e in evs]
    assert ids == sorted(set(ids))


def test_a_status_file_turned_fifo_gets_one_failed_event(live: LiveServer, settings: Settings) -> None:
    fifo = "rm -f ../status.csv && mkfifo ../status.csv && touch broken && exec sleep 30"
    with _watching(live.url) as times:
        jobid = _submit(live.url, fifo, settings.prefix)
        deadline = time.monotonic() + 15
        while _get(f"{live.url}/v1/jobs/{jobid}/state").json().get("state") != "failed":
            assert time.monotonic() < deadline, "the job was never failed"
            time.sleep(0.05)
        time.sleep(0.5)  # the watcher and liveness look again: no second event
        _ordinary(live.url, settings.prefix)
        evs = _events(live.url, jobid)
    assert max(times) < 2.0
    failed = [e for e in evs if e.state == "failed"]
    assert len(failed) == 1, [(e.id, e.state) for e in evs]
    assert failed[0] == evs[-1] and failed[0].job_state == "failed"
    assert "status.csv" in failed[0].info
    # The per-job stream replays it and goes on (heartbeats), held by no FIFO.
    with httpx.stream("GET", f"{live.url}/v1/jobs/{jobid}/events", params={"after": 0}, timeout=PROMPT) as r:
        assert r.status_code == 200
        seen: list[str] = []
        for line in r.iter_lines():
            seen.append(line)
            if line.startswith(": keep-alive"):
                break
    assert sum(1 for line in seen if line.startswith("data: ")) == len(evs)
