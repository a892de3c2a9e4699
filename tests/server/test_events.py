"""The event stream under attack and across crashes (issue 17), server side, read with
plain sockets and httpx:

- resume across a restart, and across kill -9 while jobs change state: replay from the
  last id seen gives every other event once, in id order, rows written while no server
  ran included, and ids only grow;
- a reader that never reads is dropped at ``event_buffer`` (its stream ends with
  ``: dropped``) while another gets every event promptly, and the hub lets it go;
- shutdown ends every stream with ``: server shutting down``, and the server exits at once;
- ``max_event_streams``: 503 ``too_many_streams`` with Retry-After, other requests answer;
- who may open a stream: a page of another Origin as on the job routes, another local user
  not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import lazy_app
from local_users import Other, another_user, run_as
from psik_api_core import Event
from psik_api_server.jobs.eventlog import MAX_NEW
from psik_api_server.settings import Settings
from support import LiveServer, free_port, wait_healthy

JSON = {"Accept": "application/json"}


# ---- reading a stream (sync httpx, in a thread) ----


class Reader:
    """An SSE stream read in a thread until it ends or :meth:`close`: its events and comments."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._client = httpx.Client(timeout=httpx.Timeout(20, read=20))
        self._thread = threading.Thread(target=self._run, args=(url, kwargs), daemon=True)
        self._thread.start()
        assert self._opened.wait(10), "the stream's headers never came"
        assert self.status == 200, self.error

    def _run(self, url: str, kwargs: dict[str, Any]) -> None:
        try:
            with self._client.stream("GET", url, **kwargs) as r:
                self.status = r.status_code
                self._opened.set()
                for line in r.iter_lines():
                    if self._stop.is_set():  # seen at the next line (a heartbeat at worst)
                        break
                    with self._changed:
                        if line.startswith("data: "):
                            self.events.append(Event.model_validate_json(line[6:]))
                        elif line.startswith(":"):
                            self.comments.append(line[1:].strip())
                        self._changed.notify_all()
        except BaseException as e:  # a cut connection: what some tests do
            self.error = e
        finally:
            self._opened.set()
            self.ended.set()
            with self._changed:
                self._changed.notify_all()

    def until(self, done: Callable[[list[Event]], bool], timeout: float = 15) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: done(self.events) or self.ended.is_set(), timeout)
        assert ok and done(self.events), f"not seen in {timeout} s: {self.comments} {self.error!r}"

    def close(self) -> None:
        """Stop reading and hang up (at the next line: tests keep heartbeats short)."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the reader is stuck"
        self._client.close()


def finals(jobids: list[str]) -> Callable[[list[Event]], bool]:
    return lambda events: set(jobids) <= {e.jobid for e in events if e.job_state.is_final}


def everything(url: str) -> list[Event]:
    out: list[Event] = []
    while True:
        r = httpx.get(
            f"{url}/v1/events", params={"after": out[-1].id if out else 0, "timeout": 0}, headers=JSON
        )
        assert r.status_code == 200, r.text
        if not r.json():
            return out
        out += [Event.model_validate(e) for e in r.json()]


def submit(url: str, script: str) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"script": script}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["jobid"])


# ---- a real server process ----


class Served:
    """``python -m psik_api_server serve`` on a config of its own, started, stopped and
    killed at will (its jobs live on: they write their rows while it is down)."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = tmp_path / "jobs"
        self.config = tmp_path / "psik_api.json"
        doc = {
            "prefix": str(self.prefix),
            "database": str(tmp_path / "index.sqlite"),
            "backends": {"default": {"type": "local", "max_running": 16}},
            "watch_interval": 0.02,
            "event_heartbeat": 0.2,  # a reader hangs up at the next line
            **config,
        }
        self.config.write_text(json.dumps(doc))
        self.log = tmp_path / "server.log"
        self.env = {k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV"}}
        self.env["XDG_DATA_HOME"] = str(tmp_path / "data")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--config", str(self.config)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port)], env=self.env, stdout=log, stderr=log
            )
        wait_healthy(self.url, self.proc, lambda: self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> float:
        """SIGTERM; the seconds until the process exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(20)
        return time.monotonic() - t0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(**config: Any) -> Served:
        made.append(Served(tmp_path, **config))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)
        _end_jobs(tmp_path / "jobs")


def _end_jobs(prefix: Path) -> None:
    from psik_api_server.backends.local.proctree import ProcessTable

    for pid, (base, _) in ProcessTable.read().tagged().items():
        if base.startswith(str(prefix) + os.sep):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _rows_say(prefix: Path, jobids: list[str], state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    for jobid in jobids:
        while f",{state}," not in (prefix / jobid / "status.csv").read_text():
            assert time.monotonic() < deadline, f"{jobid}: no {state} row in {timeout} s"
            time.sleep(0.02)


def _assert_once_in_order(seen: list[Event], kept: list[Event]) -> None:
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids)), "an id twice, or out of order"
    assert seen == kept, "what the streams gave is not what the index kept"


# ---- 3. resume across a restart, and across kill -9 ----


@pytest.mark.parametrize("how", ["stop", "kill9"])
def test_resume_across_a_restart_gives_every_event_once_in_order(
    served: Callable[..., Served], how: str
) -> None:
    server = served()
    server.start()
    first = Reader(f"{server.url}/v1/events")
    slow = [submit(server.url, "sleep 1.2") for _ in range(4)]
    first.until(lambda evs: {e.jobid for e in evs if e.state == "active"} >= set(slow))
    # Jobs that change state while the server goes down.
    quick = [submit(server.url, f"sleep 0.{i}") for i in range(1, 5)]
    if how == "kill9":
        server.kill9()
    else:
        server.stop()
    first.ended.wait(10)
    first.close()
    before = list(first.events)
    last = before[-1].id
    # Rows the jobs write while no server runs.
    _rows_say(server.prefix, slow + quick, "completed")
    server.start()
    try:
        second = Reader(f"{server.url}/v1/events", headers={"Last-Event-ID": str(last)})
        second.until(lambda evs: finals(slow + quick)(before + evs))
        kept_before = max(e.id for e in everything(server.url))
        late = submit(server.url, "true")
        second.until(finals([late]))
        second.close()
        after = second.events
        assert after[0].id > last
        _assert_once_in_order(before + after, everything(server.url))
        # The ends written while down are events now, after every event from before.
        for jobid in slow:
            end = [e for e in after if e.jobid == jobid and e.state == "completed"]
            assert len(end) == 1 and end[0].job_state == "completed" and end[0].exit_code == 0
        assert min(e.id for e in after if e.jobid == late) > kept_before
    finally:
        server.stop()


# ---- 6. a reader that never reads ----


def _never_reads(url: str, path: str) -> socket.socket:
    """A raw connection with a small receive window that asks for a stream and reads nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def _read_to_end(sock: socket.socket, timeout: float = 15) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data


#: A job that writes many rows to its own status.csv, in bursts (each within MAX_NEW),
#: each row ~1 KiB of info: events that fill a stalled reader's socket fast.
FLOOD = (
    'python3 -c "import sys, time\n'
    "for burst in range({bursts}):\n"
    "    with open('../status.csv', 'a') as f:\n"
    "        f.write(''.join('%.6f,1,active,%s\\n' % (time.time(), 'x' * 1000) for _ in range(200)))\n"
    '    time.sleep(0.02)"'
)


def test_a_reader_that_never_reads_is_dropped_and_holds_up_no_one(settings: Settings) -> None:
    settings.event_buffer = 20
    settings.event_heartbeat = 0.2
    app = lazy_app(settings)
    hub = app.state.context.service.events
    with LiveServer(app) as live:
        stalled = _never_reads(live.url, "/v1/events")
        good = Reader(f"{live.url}/v1/events")
        deadline = time.monotonic() + 5
        while hub.streams < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:
            most = 0
            jobid = submit(live.url, FLOOD.format(bursts=40))
            # Meanwhile the hub never holds more than event_buffer events and one commit's
            # (a commit is queued whole) for anyone.
            while not finals([jobid])(good.events):
                most = max([most, *(len(s.queue) for subs in list(hub._subs.values()) for s in list(subs))])
                assert time.monotonic() < deadline + 20, "the good reader did not get the job's end"
                time.sleep(0.005)
            # The stalled reader was let go (the hub no longer holds it), the good one not.
            assert most <= settings.event_buffer + MAX_NEW
            assert hub.streams == 1
            assert not good.ended.is_set()
            kept = everything(live.url)
            assert len(kept) > 4000
            good.until(lambda evs: len(evs) >= len(kept), timeout=5)
            assert good.events == kept, "the good reader missed or repeated an event"
            # When the stalled one reads at last: what was on its way, then the reason.
            data = _read_to_end(stalled)
            assert b"\r\n: dropped: " in data and b"resume with Last-Event-ID" in data
            assert data.count(b"\nevent: status\n") < len(kept)
        finally:
            stalled.close()
            good.close()


# ---- 7. shutdown ----


def test_shutdown_ends_every_stream_with_its_reason_and_is_prompt(served: Callable[..., Served]) -> None:
    server = served()
    server.start()
    jobid = submit(server.url, "true")
    readers = [
        Reader(f"{server.url}/v1/events"),
        Reader(f"{server.url}/v1/events", params={"after": 0}),
        Reader(f"{server.url}/v1/jobs/{jobid}/events", params={"after": 0}),
    ]
    readers[1].until(finals([jobid]))
    took = server.stop()
    for r in readers:
        assert r.ended.wait(5)
        r.close()
        assert r.comments and r.comments[-1].startswith("server shutting down"), r.comments
        assert r.error is None, r.error
    assert took < 2.5, f"the server took {took:.1f} s to stop with streams open"


# ---- 8. max_event_streams ----


def test_past_max_event_streams_a_stream_is_503_and_requests_still_answer(settings: Settings) -> None:
    settings.max_event_streams = 2
    settings.event_heartbeat = 0.2
    app = lazy_app(settings)
    hub = app.state.context.service.events
    with LiveServer(app) as live:
        open_ = [Reader(f"{live.url}/v1/events"), Reader(f"{live.url}/v1/events")]
        try:
            r = httpx.get(f"{live.url}/v1/events", timeout=5)
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "too_many_streams"
            assert r.headers["retry-after"].isdigit()
            r = httpx.get(f"{live.url}/v1/jobs", timeout=5)
            assert r.status_code == 200
            r = httpx.get(f"{live.url}/v1/events", params={"timeout": 0}, headers=JSON, timeout=5)
            assert r.status_code == 200 and r.json() == []
            # A stream closed by its reader gives its place back.
            open_.pop().close()
            deadline = time.monotonic() + 5
            while hub.streams > 1:
                assert time.monotonic() < deadline, "a closed stream still counts"
                time.sleep(0.01)
            open_.append(Reader(f"{live.url}/v1/events"))
        finally:
            for reader in open_:
                reader.close()


# ---- 5. who may open a stream ----


def test_a_page_of_another_origin_is_refused_as_on_the_job_routes(live_app: LiveServer) -> None:
    jobid = submit(live_app.url, "true")
    foreign = {"Origin": "http://evil.example"}
    job = httpx.get(f"{live_app.url}/v1/jobs/{jobid}", headers=foreign)
    assert job.status_code == 403
    for path in ("/v1/events", f"/v1/jobs/{jobid}/events"):
        for accept in ("text/event-stream", "application/json"):
            r = httpx.get(f"{live_app.url}{path}", headers={**foreign, "Accept": accept}, timeout=5)
            assert r.status_code == job.status_code, r.text
            assert r.json()["code"] == job.json()["code"] == "forbidden"
            assert r.json()["detail"] == job.json()["detail"]
    # Its own origin is let in.
    own = {"Origin": live_app.url, "Accept": "application/json"}
    r = httpx.get(f"{live_app.url}/v1/events", params={"timeout": 0}, headers=own, timeout=5)
    assert r.status_code == 200


ATTACK = r"""
import http.client, json, sys
host, port, path = sys.argv[1:4]
conn = http.client.HTTPConnection(host, int(port), timeout=5)
conn.request("GET", path, headers={"Accept": sys.argv[4]})
r = conn.getresponse()
print(json.dumps({"status": r.status, "type": r.getheader("content-type"), "body": r.read(4096).decode()}))
"""


@pytest.fixture(scope="module")
def other_user() -> Iterator[Other]:
    yield from another_user()


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
def test_another_local_user_cannot_open_the_stream(
    other_user: Other, live_app: LiveServer, accept: str
) -> None:
    jobid = submit(live_app.url, "true")
    host, port = live_app.url.removeprefix("http://").split(":")
    for path in ("/v1/events?after=0", f"/v1/jobs/{jobid}/events?after=0"):
        out = run_as(
            other_user.uid,
            other_user.gid,
            [other_user.python, "-c", ATTACK, host, port, path, accept],
            timeout=15,
        )
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["status"] == 403, answer
        assert answer["type"].startswith("application/problem+json")
        assert json.loads(answer["body"])["code"] == "forbidden"
        assert '"jobndx"' not in answer["body"]  # no event
