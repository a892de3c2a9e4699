"""Test support shared by the test trees: a live uvicorn in a thread, a free port and a
wait for a server process to answer, a sync transport into an in-process app, and
adapters that let one async test body drive both clients; the state of a TCP client end
and a hold of a live server's event loop, for the peer-lookup tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import uvicorn
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from psik_api_client import AsyncClient, Client
from psik_api_server.serving.uvicorn_seam import ConnectionHooks


class LiveServer:
    """uvicorn on a free loopback port, in a thread, as `psik-api-server serve` runs it."""

    def __init__(self, app: Starlette, uds: str | None = None) -> None:
        self.uds = uds
        kwargs: dict[str, Any] = {"uds": uds} if uds else {"host": "127.0.0.1", "port": 0}
        # serve's protocol class (uvicorn_protocol), without serve's connection limits.
        kwargs["http"] = ConnectionHooks().protocol()
        self.server = uvicorn.Server(
            uvicorn.Config(app, proxy_headers=False, log_level="warning", lifespan="on", **kwargs)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        sock: socket.socket = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def client_tcp_state(port: int, server_port: int) -> str | None:
    """The /proc/net/tcp state of the client end ``port -> server_port`` (by both ports: a
    TIME_WAIT row of an earlier connection from the same ephemeral port to elsewhere may
    come first)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        if (local, remote) == (port, server_port):
            return fields[3]
    return None


def hold_loop(live: LiveServer) -> threading.Event:
    """Hold the live server's event loop until the returned event is set: nothing is
    accepted or read meanwhile (a server busy in its loop, made exact)."""
    release, held = threading.Event(), threading.Event()
    loop: asyncio.AbstractEventLoop = live.server.servers[0].get_loop()

    def hold() -> None:
        held.set()
        release.wait(60)

    loop.call_soon_threadsafe(hold)
    assert held.wait(30), "the server's loop never ran the hold"
    return release


def free_port() -> int:
    """A loopback TCP port that was free just now (for a server started as a process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], output: Callable[[], str]) -> None:
    """Wait (30 s at most) until the server process ``proc`` answers 200 on
    ``url``/healthz; an AssertionError with its ``output()`` if it exits or never does."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server did not start: {output()}")
        time.sleep(0.05)


class ASGIThreadTransport(httpx.BaseTransport):
    """Lets the *sync* client talk to an in-process app: the app runs on an event loop
    in a portal thread (with its lifespan), the sync client blocks on it."""

    def __init__(self, app: Starlette) -> None:
        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal("asyncio"))
        self._lifespan = LifespanManager(app)
        self.portal.call(self._lifespan.__aenter__)
        self._inner = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            request.stream = httpx.ByteStream(request.read())
            response = await self._inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self.portal.call(send)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.portal.call(self._lifespan.__aexit__, None, None, None)
        self._stack.close()


#: The client methods that return an iterator: the adapters collect them into a list.
ITERATORS = frozenset({"list", "follow_log"})


class SyncApi:
    """The sync Client behind awaitable methods, so one async test body drives both."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                result = method(*args, **kwargs)
                return list(result) if name in ITERATORS else result

            return await anyio.to_thread.run_sync(run)

        return call


class AsyncApi:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if name not in ITERATORS:
            return method  # type: ignore[no-any-return]

        @functools.wraps(method)
        async def collect(*args: Any, **kwargs: Any) -> list[Any]:
            return [j async for j in method(*args, **kwargs)]

        return collect


class ServerProcess:
    """``python -m psik_api_server serve`` on a fixed port, started and killed at will."""

    def __init__(self, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            k: v for k, v in os.environ.items() if k not in {"PSIK_API_CONFIG", "VIRTUAL_ENV", "PSIK_CONFIG"}
        }
        self.env["XDG_DATA_HOME"] = str(data)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.url}/healthz", timeout=1)).status_code == 200:
                        return
                assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "server did not start"
                await asyncio.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def readme_python_blocks(readme: Path) -> list[str]:
    """The ```python blocks of ``readme``, in order (the README's examples, run as written)."""
    blocks: list[str] = []
    current: list[str] = []
    inside = False
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            current, inside = [], line.strip() == "```python"
        elif inside:
            current.append(line)
    return blocks
