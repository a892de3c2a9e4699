"""The TLS test harness: certified identities for a server and two users, and the server
run as a site would run it, ``certified serve psik_api_server.main:app https://...``.

* :func:`make_identities` runs the ``certified`` CLI (init, add-client, add-service,
  get-ident, introduce, add-intro; see ../shared/reference/auth.md) to make a server
  identity and the users ``alice`` (``uid:alice``) and ``bob`` (``uid:bob``), each in
  its own config directory; ~5 s per user, so the fixture making them is session-wide.
* :class:`TlsServer` starts ``certified serve`` on a free loopback port with its own
  ``PSIK_API_CONFIG`` (``authz`` as asked, a fresh prefix and index), waits until it
  answers, and stops it; :meth:`TlsServer.restart` runs a new process on the same state.
* :func:`user_ssl_context` is a user's mTLS context (their certificate, the server's CA),
  and :meth:`TlsServer.client` an httpx client with it (and a bearer token if given).

The fixtures (``tls_identities``, ``tls_server``) are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support import free_port

#: The ``certified`` CLI of the interpreter running the tests.
CERTIFIED = str(Path(sys.executable).with_name("certified"))
USERS = ("alice", "bob")


def _certified(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [CERTIFIED, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"certified {' '.join(args)} failed ({done.returncode}): {done.stderr or done.stdout}"
        )
    return done.stdout


@dataclass(frozen=True)
class Identities:
    """Config directories made by :func:`make_identities`."""

    root: Path
    server: Path
    users: dict[str, Path]


def make_identities(root: Path, users: tuple[str, ...] = USERS) -> Identities:
    """A server identity (``SRV``) for 127.0.0.1/localhost and one per user, each user
    known to the server (``known_clients/<user>.crt``) and introduced to it."""
    server = root / "SRV"
    _certified(
        "init", "--org", "Test Lab", "--unit", "Job API", "--host", "127.0.0.1", "--host", "localhost",
        "--config", str(server), cwd=root,
    )  # fmt: skip
    dirs: dict[str, Path] = {}
    for user in users:
        cfg = root / user
        _certified(
            "init", f"{user.title()} Tester", "--uid", user, "--email", f"{user}@localhost",
            "--config", str(cfg), cwd=root,
        )  # fmt: skip
        _certified("add-client", user, str(cfg / "CA.crt"), "--config", str(server), cwd=root)
        _certified("add-service", "127.0.0.1", str(server / "CA.crt"), "--config", str(cfg), cwd=root)
        ident = root / f"{user}.b64"
        ident.write_text(_certified("get-ident", "--config", str(cfg), cwd=root))
        intro = root / f"{user}-intro.json"
        intro.write_text(_certified("introduce", str(ident), "--config", str(server), cwd=root))
        _certified("add-intro", str(intro), "--config", str(cfg), cwd=root)
        dirs[user] = cfg
    return Identities(root, server, dirs)


def user_ssl_context(user_dir: Path, server_dir: Path) -> ssl.SSLContext:
    """The user's client context: their certificate and key, trusting the server's CA."""
    ctx = ssl.create_default_context(cafile=str(server_dir / "CA.crt"))
    ctx.load_cert_chain(str(user_dir / "id.crt"), str(user_dir / "id.key"))
    return ctx


def write_config(path: Path, state: Path, **extra: Any) -> Path:
    """A psik-api config for a server on ``state`` (prefix ``state/jobs``), as JSON."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {
        "prefix": str(state / "jobs"),
        "database": str(state / "index.sqlite"),
        "state_dir": str(state),  # the token key at state/token-key.pem
        "backends": {"default": {"type": "local"}},
        "watch_interval": 0.02,
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


@dataclass
class TlsServer:
    """``certified serve --config <server identity> psik_api_server.main:app`` as a
    subprocess; ``config`` is its PSIK_API_CONFIG. Use as a context manager."""

    identities: Identities
    config: Path
    log: Path
    tls: bool = True
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def ssl_context(self, user: str) -> ssl.SSLContext:
        return user_ssl_context(self.identities.users[user], self.identities.server)

    def client(self, user: str = "alice", token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An httpx client for ``user`` (mTLS; a bearer ``token`` if given)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        verify: ssl.SSLContext | bool = self.ssl_context(user) if self.tls else True
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=30, **kwargs)

    def start(self) -> None:
        self.port = free_port()
        url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        if self.tls:
            argv = [
                CERTIFIED,
                "serve",
                "--config",
                str(self.identities.server),
                "psik_api_server.main:app",
                url,
            ]
        else:  # the "insecure" mode: plain uvicorn, no TLS
            uvicorn = str(Path(sys.executable).with_name("uvicorn"))
            argv = [uvicorn, "psik_api_server.main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        env = {
            **os.environ,
            "PSIK_API_CONFIG": str(self.config),
            "XDG_DATA_HOME": str(self.config.parent / "xdg-data"),
            "XDG_RUNTIME_DIR": "",
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.config.parent, env=env, stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        verify: ssl.SSLContext | bool = (
            self.ssl_context(next(iter(self.identities.users))) if self.tls else True
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", verify=verify, timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop, then start a new server process on the same config (and state)."""
        self.stop()
        self.start()

    def __enter__(self) -> TlsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def tls_server(
    identities: Identities, state: Path, *, tls: bool = True, **config: Any
) -> Iterator[TlsServer]:
    """A running server on the state directory ``state`` (its prefix, index, token key)."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg = write_config(state / "psik_api.json", state, **config)
    with TlsServer(identities, cfg, state / "server.log", tls=tls) as server:
        yield server
