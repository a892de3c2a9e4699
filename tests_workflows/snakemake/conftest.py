"""Live psik-api servers for the Snakemake tests: ``psik-api-server serve`` with a
config of its own (the workflows' directories in ``directory_roots``), its access log
kept, to count the requests a run makes. ``psik_server``: one in local mode for the
session, its ``directory_roots`` the session's temporary directory (where every test's
workflow is); ``start_psik_server``: others, configured by the test (stopped after it).
(Here rather than in a module of their own: test directories are not packages, and
pytest's importlib mode puts none of them on sys.path.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from support import free_port, wait_healthy

#: uvicorn's access log line of one API request: method and path with its query.
REQUEST = re.compile(r'"(GET|POST|DELETE|PUT|PATCH) (/v1/[^ ]*) HTTP/[0-9.]+" (\d{3})')


class PsikServer:
    """``python -m psik_api_server serve`` on a free port; :meth:`requests` reads what
    it was asked since a mark."""

    def __init__(
        self,
        home: Path,
        directory_roots: list[Path],
        backends: Mapping[str, Any] | None = None,
    ) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "server.log"
        self.config = home / "psik_api.json"
        config = {
            "prefix": str(home / "jobs"),
            "database": str(home / "index.sqlite"),
            "state_dir": str(home / "state"),
            "directory_roots": [str(r) for r in directory_roots],
            "backends": dict(backends or {"default": {"type": "local"}}),
        }
        self.config.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PsikServer:
        argv = [sys.executable, "-m", "psik_api_server", "serve", "--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*argv, "--port", str(self.port)], stdout=log, stderr=log)
        wait_healthy(self.url, self.proc, lambda: self.log.read_text()[-3000:])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def mark(self) -> int:
        """Where the access log is now (pass it to :meth:`requests`)."""
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of each API request logged after ``since``."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [(m, p, int(s)) for m, p, s in REQUEST.findall(text)]


@pytest.fixture(scope="session")
def psik_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PsikServer]:
    home = tmp_path_factory.mktemp("psik-server")
    server = PsikServer(home, directory_roots=[tmp_path_factory.getbasetemp()]).start()
    yield server
    server.stop()


StartServer = Callable[..., PsikServer]


@pytest.fixture
def start_psik_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """``start_psik_server(directory_roots, backends=None)``: a server of the test's own."""
    started: list[PsikServer] = []

    def start(directory_roots: list[Path], backends: Mapping[str, Any] | None = None) -> PsikServer:
        server = PsikServer(tmp_path_factory.mktemp("psik-server"), directory_roots, backends)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
