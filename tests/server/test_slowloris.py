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

from psik_api_server.limits import RESERVE_FDS, RepeatFilter, fit

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    _raise_own_limit(IDLE + SLOW + 200)
    cfg = tmp_path / "psik_api.json"
    cfg.write_text(
        json.dumps(
            {
                "prefix": str(tmp_path / "data" / "jobs"),
                "backends": {"default": {"type": "local"}},
                "header_timeout": HEADER_TIMEOUT,
                "keep_alive_timeout": KEEP_ALIVE,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PSIK_CONFIG"}}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), PSIK_API_CONFIG=str(cfg))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        how = (
            ["psik_api_server", "serve"]
            if request.param == "serve"
            else ["uvicorn", "psik_api_server.main:app"]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", *how, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_login_node_limit,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {log.read_text(errors='replace')[:4000]}")
            time.sleep(0.05)
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
    """Connections that send a request head a piece at a time, every ``every`` seconds,
    noting when the server closed each one and what it answered."""

    port: int
    count: int
    every: float = 0.5
    opened: dict[socket.socket, float] = field(default_factory=dict)
    closed: dict[socket.socket, float] = field(default_factory=dict)
    answers: dict[socket.socket, bytes] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickler:
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sock.setblocking(False)
            self.opened[sock] = time.monotonic()
            self.answers[sock] = b""
        self.thread.start()
        return self

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self.opened:
                sel.register(sock, selectors.EVENT_READ)
            next_send = time.monotonic() + self.every
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
                if time.monotonic() >= next_send:
                    next_send += self.every
                    for sock in self.opened:
                        if sock not in self.closed:
                            with contextlib.suppress(OSError):
                                sock.send(b"X")  # one byte of a header name, never finished

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
