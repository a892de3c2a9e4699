"""Live psik-api servers for the Parsl provider's tests (``python -m psik_api_server
serve`` on a loopback port, as a user runs it), with a local or a Slurm backend, given
to the tests as their URLs; a transport that counts requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import free_port, wait_healthy

#: Where Parsl's worker pool (process_worker_pool.py) is installed: a block's shell,
#: started by the server, finds it through its worker_init.
WORKER_INIT = f"export PATH={Path(sys.executable).parent}:$PATH"


class PsikServer:
    """``python -m psik_api_server serve`` (local mode) on a free loopback port, its
    state in ``state``, with ``backends`` (the settings' dict)."""

    def __init__(self, state: Path, backends: dict[str, Any]) -> None:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config = state / "psik_api.json"
        self.config.write_text(
            json.dumps(
                {
                    "prefix": str(state / "jobs"),
                    "database": str(state / "index.sqlite"),
                    "state_dir": str(state),
                    "backends": backends,
                    "watch_interval": 0.05,
                }
            )
        )
        self.log = state / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PsikServer:
        env = {**os.environ, "PSIK_API_CONFIG": str(self.config)}
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        wait_healthy(self.url, self.proc, self.log.read_text)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CountingTransport(httpx.HTTPTransport):
    """httpx's own transport, counting the requests it sends (by method and path)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return super().handle_request(request)


@pytest.fixture(scope="module")
def local_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a server whose ``default`` backend runs jobs on this machine."""
    with PsikServer(tmp_path_factory.mktemp("psik-local"), {"default": {"type": "local"}}) as server:
        yield server.url


@pytest.fixture
def slurm_url(slurm_cluster: Any, tmp_path: Path) -> Iterator[str]:
    """The URL of a server whose ``slurm`` backend submits to the test cluster's
    ``debug`` partition."""
    backends = {
        "slurm": {"type": "slurm", "queue_name": "debug", "attributes": {"psik_python": sys.executable}},
    }
    with PsikServer(tmp_path / "psik-slurm", backends) as server:
        yield server.url


@pytest.fixture
def counting_transport() -> Iterator[CountingTransport]:
    with CountingTransport() as transport:
        yield transport


@pytest.fixture
def worker_init() -> str:
    """A block's worker_init: Parsl's worker pool is found on its PATH."""
    return WORKER_INIT
