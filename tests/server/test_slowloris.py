"""Slow or idle connections (slowloris) cannot take the server down.

A live server started the README way (``python -m psik_api_server serve``), with the
soft open-file limit of a typical login node (1,024) and short timeouts from its config
file. Before the connection limits, 1,000 idle sockets plus 50 slow ones ran it out of
file descriptors: asyncio logged a traceback per pending accept (150 MB in 25 s) and
/healthz stopped answering; a client sending a header line every half second held its
connection for ever.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from psik_api_server.serving.limit_enforcer import _Body, _why_stalled
from psik_api_server.serving.limits import MIN_BODY_RATE, RESERVE_FDS, ConnectionLimits, RepeatFilter, fit
from support import free_port, wait_healthy

resource = pytest.importorskip("resource")

HEADER_TIMEOUT = 2.0  # seconds, set in the server's config file for these tests
KEEP_ALIVE = 1
IDLE = 1000
SLOW = 50
LOGIN_NODE_SOFT_LIMIT = 1024


@dataclass
class Server:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def log_size(self) -> int:
        return self.log.stat().st_size


def _raise_own_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {needed} this test opens")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _login_node_limit() -> None:  # in the server's process, before it starts
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOGIN_NODE_SOFT_LIMIT, hard))


@pytest.fixture(params=["serve", "uvicorn"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """The server started the README way, or the seed README's ``uvicorn
    psik_api_server.main:app`` (the limits come from the config file either way)."""
    with _server(request.param, tmp_path) as started:
        yield started


@contextlib.contextmanager
def _server(how: str, tmp_path: Path, **config: object) -> Iterator[Server]:
    _raise_own_limit(IDLE + SLOW + 200)
    cfg = tmp_path / "psik_api.json"
    cfg.write_text(
        json.dumps(
            {
                "prefix": str(tmp_path / "data" / "jobs"),
                "backends": {"default": {"type": "local"}},
                "header_timeout": HEADER_TIMEOUT,
                "keep_alive_timeout": KEEP_ALIVE,
                **config,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PSIK_CONFIG"}}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), PSIK_API_CONFIG=str(cfg))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        command = ["psik_api_server", "serve"] if how == "serve" else ["uvicorn", "psik_api_server.main:app"]
        proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_login_node_limit,
        )
    try:
        wait_healthy(url, proc, lambda: log.read_text(errors="replace")[:4000])
        yield Server(url, port, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if the server closed ``sock`` (EOF or reset); reads what it sent."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:
        return e.errno in (errno.ECONNRESET, errno.EPIPE)


@dataclass
class Trickler:
    """Connections that send ``head`` then a byte every ``every`` seconds (of a header
    name that never ends, by default; of a body after a complete head otherwise; none
    at all if ``every`` is 0), noting when the server closed each one and what it
    answered."""

    port: int
    count: int
    every: float = 0.5
    head: bytes = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    opened: dict[socket.socket, float] = field(default_factory=dict)
    closed: dict[socket.socket, float] = field(default_factory=dict)
    answers: dict[socket.socket, bytes] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickler:
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(self.head)
            sock.setblocking(False)
            self.opened[sock] = time.monotonic()
            self.answers[sock] = b""
        self.thread.start()
        return self

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self.opened:
                sel.register(sock, selectors.EVENT_READ)
            next_send = time.monotonic() + (self.every or 1.0)
            while not self.stop.is_set() and len(self.closed) < len(self.opened):
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    self.answers[sock] += data
                    if not data:
                        self.closed[sock] = time.monotonic()
                        sel.unregister(sock)
                if self.every and time.monotonic() >= next_send:
                    next_send += self.every
                    for sock in self.opened:
                        if sock not in self.closed:
                            with contextlib.suppress(OSError):
                                sock.send(b"X")  # one byte of a header name or a body, never finished

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sock in self.opened:
            sock.close()


def _timed(call: str, url: str) -> tuple[int, float]:
    start = time.monotonic()
    if call == "healthz":
        r = httpx.get(f"{url}/healthz", timeout=10)
    else:
        r = httpx.post(f"{url}/v1/jobs", json={"name": "under attack", "script": "true"}, timeout=10)
    return r.status_code, time.monotonic() - start


def test_idle_and_slow_connections_do_not_take_the_server_down(server: Server) -> None:
    idle: list[socket.socket] = []
    try:
        with Trickler(server.port, SLOW):
            for _ in range(IDLE):
                idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            opened = time.monotonic()
            # Real clients still get answers, promptly, with 1,050 sockets held open.
            for call in ["healthz", "submit", "healthz", "submit", "healthz"]:
                try:
                    status, took = _timed(call, server.url)
                except httpx.TransportError as e:
                    raise AssertionError(
                        f"{call} got no answer under {IDLE} idle connections: {e!r}"
                    ) from None
                assert status in (200, 201) and took < 3.0, (call, status, took)
            # The idle sockets are not held for ever: the server closes every one of
            # them by the header timeout (or sooner, to make room for real clients).
            for sock in idle:
                sock.setblocking(False)
            left = idle
            while left and time.monotonic() < opened + HEADER_TIMEOUT + 3:
                time.sleep(0.2)
                left = [s for s in left if not _closed_by_peer(s)]
            assert not left, f"{len(left)} of {IDLE} idle connections still open"
    finally:
        for sock in idle:
            sock.close()
    assert server.proc.poll() is None, "the server died"
    size = server.log_size()
    text = server.log.read_text(errors="replace")
    assert size < 100_000, f"log grew to {size} bytes: {text[:2000]}"
    # The soft open-file limit was raised to the hard one, and the log says so.
    assert f"open files {LOGIN_NODE_SOFT_LIMIT} -> " in text, text[:2000]


def test_a_slow_request_head_is_cut_at_the_header_timeout(server: Server) -> None:
    with Trickler(server.port, SLOW, every=0.25) as slow:
        # A keep-alive connection that answered one request, then trickles the next.
        keep = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert keep.recv(65536).startswith(b"HTTP/1.1 200"), "keep-alive request not answered"
        keep.sendall(b"GET /healthz HTTP/1.1\r\n")
        keep_started = time.monotonic()
        keep.settimeout(0.25)
        keep_closed: float | None = None
        # A real client whose head comes in pieces, but in time, is served.
        honest = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        for piece in [b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"]:
            honest.sendall(piece)
            time.sleep(0.3)
        assert honest.recv(65536).startswith(b"HTTP/1.1 200")
        honest.close()
        deadline = time.monotonic() + HEADER_TIMEOUT + 3
        while time.monotonic() < deadline and (len(slow.closed) < SLOW or keep_closed is None):
            if keep_closed is None:
                try:
                    keep.send(b"X")
                    if keep.recv(65536) == b"":
                        keep_closed = time.monotonic()
                except TimeoutError:
                    pass
                except OSError:
                    keep_closed = time.monotonic()
            else:
                time.sleep(0.1)
        keep.close()
        assert len(slow.closed) == SLOW, f"{SLOW - len(slow.closed)} of {SLOW} slow connections still open"
        lifetimes = sorted(slow.closed[s] - slow.opened[s] for s in slow.closed)
        # Not before the timeout (the head had not come yet), and not long after it.
        assert lifetimes[0] > HEADER_TIMEOUT - 0.3 and lifetimes[-1] < HEADER_TIMEOUT + 2, lifetimes
        assert all(a.startswith(b"HTTP/1.1 408") for a in slow.answers.values()), set(slow.answers.values())
        assert keep_closed is not None, "a keep-alive connection trickling its next head was never closed"
        assert keep_closed - keep_started < HEADER_TIMEOUT + 2
    assert server.log_size() < 100_000


# --- request bodies that stall or trickle ----------------------------------------------

#: A complete head announcing 100,000 bytes of a job, then its first byte.
STALLED_BODY = (
    b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n{"
)


def _submit_job(url: str, script: str) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"name": "talks", "script": script}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["jobid"])


@dataclass
class Follower:
    """``GET /v1/jobs/{id}/logs/stdout.1?follow=true`` in a thread: a response the server
    streams for as long as the job runs, the client reading it."""

    url: str
    jobid: str
    got: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    ended: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream(
                "GET", f"{self.url}/v1/jobs/{self.jobid}/logs/stdout.1?follow=true", timeout=30
            ) as r:
                assert r.status_code == 200, r.read()
                for chunk in r.iter_bytes():
                    self.got += chunk
        except BaseException as e:
            self.error = e
        finally:
            self.ended = time.monotonic()


def _slow_upload(port: int, jobid: str, pieces: int, every: float, pause: float) -> bytes:
    """A raw upload of ``pieces`` of 4 KiB, one every ``every`` seconds (16 KiB/s at
    0.25), silent for ``pause`` seconds half way; the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(
            f"PUT /v1/jobs/{jobid}/files/slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {pieces * 4096}\r\nConnection: close\r\n\r\n".encode()
        )
        for i in range(pieces):
            time.sleep(pause if i == pieces // 2 else every)
            sock.sendall(b"x" * 4096)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


TALKING_JOB = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; sleep 0.5; done"


def test_a_stalled_or_trickled_request_body_is_cut(server: Server) -> None:
    # Each sent a complete head, then one byte of its body and nothing more, or one
    # byte every half second: under a pure idle timeout the second held its connection
    # for ever. Both are closed with a 408 by the header timeout (the trickle: by the
    # rate floor, 2 bytes/s being far under it); a follow whose response streams longer
    # than that, the client reading, is not cut.
    jobid = _submit_job(server.url, TALKING_JOB)
    follower = Follower(server.url, jobid)
    upload: list[bytes] = []
    # A slow but real upload: 16 KiB/s for 4 s, with a pause just under the timeout.
    uploader = threading.Thread(
        target=lambda: upload.append(_slow_upload(server.port, jobid, 16, 0.25, HEADER_TIMEOUT - 0.5))
    )
    uploader.start()
    time.sleep(0.5)
    with (
        Trickler(server.port, 20, every=0, head=STALLED_BODY) as stalled,
        Trickler(server.port, 20, every=0.5, head=STALLED_BODY) as trickled,
    ):
        deadline = time.monotonic() + HEADER_TIMEOUT + 4
        while time.monotonic() < deadline and len(stalled.closed) + len(trickled.closed) < 40:
            time.sleep(0.1)
        for kind, conns in [("stalled", stalled), ("trickled", trickled)]:
            assert len(conns.closed) == 20, f"{20 - len(conns.closed)} {kind} bodies still open"
            lifetimes = sorted(conns.closed[s] - conns.opened[s] for s in conns.closed)
            assert lifetimes[0] > HEADER_TIMEOUT - 0.3 and lifetimes[-1] < HEADER_TIMEOUT + 2, (
                kind,
                lifetimes,
            )
            assert all(a.startswith(b"HTTP/1.1 408") for a in conns.answers.values()), set(
                conns.answers.values()
            )
    follower.thread.join(timeout=20)
    assert follower.error is None, repr(follower.error)
    assert follower.got.count(b"line") == 12, bytes(follower.got)  # streamed for ~6 s, to the end
    uploader.join(timeout=20)
    assert upload and upload[0].startswith(b"HTTP/1.1 201"), upload[:1]
    assert server.proc.poll() is None, "the server died"
    assert server.log_size() < 100_000


@pytest.mark.parametrize("how", ["serve", "uvicorn"])
def test_stalled_bodies_at_the_connection_cap_do_not_lock_everyone_out(how: str, tmp_path: Path) -> None:
    # 60 stalled bodies against a cap of 50: every connection had "a request in
    # progress", so each newcomer was closed, /healthz included, for as long as they
    # stayed open. A stalled body now makes room, long before its own timeout; a follow
    # whose response is streaming is not one of them.
    timeout = 6.0
    with _server(how, tmp_path, max_connections=50, header_timeout=timeout) as server:
        follower = Follower(server.url, _submit_job(server.url, TALKING_JOB))
        time.sleep(0.5)
        with Trickler(server.port, 60, every=0, head=STALLED_BODY) as stalled:
            time.sleep(1.5)  # stalled for longer than STALL_GRACE, far from the timeout
            for call in ["healthz", "submit", "healthz"]:
                try:
                    status, took = _timed(call, server.url)
                except httpx.TransportError as e:
                    raise AssertionError(f"{call} locked out by 60 stalled bodies: {e!r}") from None
                assert status in (200, 201) and took < 2.0, (call, status, took)
            assert time.monotonic() - min(stalled.opened.values()) < timeout
        follower.thread.join(timeout=20)
        assert follower.error is None, repr(follower.error)
        assert follower.got.count(b"line") == 12, bytes(follower.got)
        text = server.log.read_text(errors="replace")
        assert "request body was stalled longest" in text, text[-3000:]
        assert server.log_size() < 100_000


# --- the pieces, in process -----------------------------------------------------------


def test_the_same_warning_is_logged_once_then_counted() -> None:
    now = [0.0]
    repeats = RepeatFilter(window=10, clock=lambda: now[0])
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("psik_api_server.tests.repeats")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    logger.addFilter(repeats)
    try:
        for i in range(1000):
            now[0] = i * 0.001
            logger.warning("closed a connection from %s: too slow", f"127.0.0.1:{i}")
        logger.info("an info line %d", 1)
        logger.info("an info line %d", 2)  # below WARNING: never counted
        logger.warning("something else")
        assert records == [
            "closed a connection from 127.0.0.1:0: too slow",
            "an info line 1",
            "an info line 2",
            "something else",
        ]
        now[0] = 12.0
        logger.warning("closed a connection from %s: too slow", "127.0.0.1:5")
        assert (
            records[-1]
            == "closed a connection from 127.0.0.1:5: too slow (999 more like this in the last 12 s)"
        )
        logger.warning("closed a connection from %s: too slow", "127.0.0.1:6")
        now[0] = 13.0
        repeats.flush()
        assert (
            records[-1] == "1 more like this in the last 1 s: closed a connection from 127.0.0.1:5: too slow"
        )
        repeats.flush()
        assert len(records) == 6  # nothing more to say
    finally:
        logger.removeFilter(repeats)
        logger.handlers.clear()


def test_exceptions_of_different_kinds_are_not_merged() -> None:
    repeats = RepeatFilter(window=60)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "accept failed", (), (type(exc), exc, None)
        )

    assert repeats.filter(record(OSError(errno.EMFILE, "Too many open files")))
    assert not repeats.filter(record(OSError(errno.EMFILE, "Too many open files")))
    assert repeats.filter(record(OSError(errno.ENOBUFS, "No buffer space available")))


@pytest.mark.parametrize(
    ("files", "cap", "backlog"),
    [
        (20000, 1000, 2048),  # room for everything asked
        (1024, 1024 - RESERVE_FDS - 64, 64),  # a login node's hard limit: the backlog gives way first
        (4096, 1000, 2048),
        (300, 22, 22),  # hardly any: still a server
    ],
)
def test_the_connection_cap_fits_under_the_open_file_limit(files: int, cap: int, backlog: int) -> None:
    assert fit(1000, 2048, files) == (cap, backlog)


@pytest.mark.parametrize(
    ("received", "owed", "idle", "cut"),
    [
        (1, 9.9, 9.9, False),  # one byte, silent for just under the timeout
        (1, 10.0, 10.0, True),  # ... and for the timeout
        (2, 10.0, 1.0, True),  # a byte every 9 s: under 1 KiB/s once 10 s are charged
        (1 << 20, 9.0, 0.0, False),  # not yet 10 s: the floor does not apply
        (10 * MIN_BODY_RATE, 10.0, 0.0, False),  # exactly the floor
        (60 * MIN_BODY_RATE - 1, 60.0, 0.0, True),  # a minute just under it
        (4 << 30, 3600.0, 9.0, False),  # a 4 GiB upload in an hour, a 9 s hiccup
    ],
)
def test_a_body_is_cut_when_stalled_or_under_the_rate_floor(
    received: int, owed: float, idle: float, cut: bool
) -> None:
    body = _Body(None, received, 0.0)
    body.owed, body.idle = owed, idle
    assert (_why_stalled(body, ConnectionLimits(1000, 10.0)) is not None) is cut
